"""Service modules: every query and state change of the server, testable without HTTP.

Each function takes a SQLAlchemy ``Session`` (one unit of work, committed by the
caller) plus plain values, and raises ``server.errors`` classes. The API routes
and the (later) MQTT ingester are thin callers of these functions.
"""
