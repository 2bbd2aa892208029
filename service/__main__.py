"""`python -m service`: the contract's alias of the `modelserve` command (only this entry shim names the CLI)."""

from modelserve.cli import main

raise SystemExit(main())
