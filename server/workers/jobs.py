"""Each replica's build-job loop: requeue dead replicas' jobs, claim, run, repeat.

The queue and the per-job claim (a compare-and-set plus the lease
``job:<id>``) are ``server.services.jobs``; this module is only the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session

from server.services.jobs import replica_id, run_pending
from server.settings import Settings

__all__ = ["JobWorker"]

log = logging.getLogger("edgefleet.server.jobs")


class JobWorker:
    """A daemon thread running queued jobs for one replica, every ``worker_poll_seconds``."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        settings: Settings,
        owner: str | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.owner = owner or replica_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to stop and wait for it (a running job finishes first)."""
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                run_pending(self.session_factory, self.settings, self.owner)
            except Exception:
                log.exception("worker iteration failed; retrying")
            self._stop.wait(self.settings.worker_poll_seconds)
