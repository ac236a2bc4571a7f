"""The REST API: a FastAPI app of thin routes over ``server.services``."""
