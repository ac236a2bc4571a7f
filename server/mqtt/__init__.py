"""The server's MQTT side: one persistent broker session per replica.

``connection`` (paho behind manual acknowledgements and an explicit
reconnect loop), ``ingest`` (telemetry, status and facts into the database in
batches, acknowledged after commit), ``chunks`` (bundle blocks for assigned
devices, paced per device), ``service`` (wires them and the desired-state
publisher of ``server.workers.desired`` to one connection; started by
``server run`` or ``server mqtt``). docs/server.md describes operation.
"""
