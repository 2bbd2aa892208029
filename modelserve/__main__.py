"""`python -m modelserve` is the `modelserve` command."""

from modelserve.cli import main

raise SystemExit(main())
