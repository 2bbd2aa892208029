"""The HTTP API: FastAPI app factory, routes, schemas, auth, metrics exporter and the uvicorn server."""
