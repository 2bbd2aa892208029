"""The `modelserve` command line: above `service/`, `training/` and `bench/`, which never import it."""
