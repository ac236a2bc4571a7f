"""The edgefleet server: registry, signed bundles, fleet enrollment, telemetry, audit.

Layout: ``settings`` (configuration and refusals), ``db`` + ``models`` +
``migrations`` (schema), ``services`` (every query and state change, used by
the API and by the MQTT side), ``api`` (FastAPI routes over the services),
``mqtt`` (ingest, chunk service, desired-state publisher on one broker
session per replica), ``metrics``, ``client`` + ``cli`` (the ``edgefleet``
verbs). docs/server.md
describes operation; docs/api.md the REST API.
"""
