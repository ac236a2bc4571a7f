"""Route modules, one per resource; each is a thin layer over ``server.services``."""
