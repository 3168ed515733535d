"""Device and model registry operations (no FastAPI imports: the API and CLI call these)."""
