"""`python -m service` is the `modelserve` command."""

from service.cli import main

raise SystemExit(main())
