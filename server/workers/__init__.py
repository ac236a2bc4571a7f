"""The server's long-running loops, one module each, and the lease they share.

- ``lease``: named leases with an epoch used as a fencing token (acquire,
  renew, fence, release); the one mechanism for "at most one replica does
  this now".
- ``loop``: ``LeasedLoop``, a thread that runs a step on whichever replica
  holds a named lease (the rollout controller reuses it).
- ``jobs``: ``JobWorker``, each replica's build-job loop (claims are per job,
  under the lease ``job:<id>``; ``server.services.jobs`` holds the queue).
- ``retention``: telemetry retention, once per deployment under the lease
  ``"retention"``.
- ``desired``: ``DesiredPublisher``, the retained desired-state topics kept
  equal to the database (every replica with a broker session; publishing is
  idempotent).

This package's ``__init__`` imports nothing, so ``server.services`` may use
``server.workers.lease`` without loading the loops.
"""
