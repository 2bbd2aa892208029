"""modelserve's service layer: CLI, settings, engine and HTTP API."""
