"""Build jobs: persisted queue, leases, and the worker thread of each replica.

Flow: ``registry.submit_version`` inserts a ``queued`` job. Every replica's
``Worker`` loops: requeue jobs whose lease expired (their replica died),
claim the oldest queued job with a compare-and-set ``UPDATE ... WHERE
status='queued'``, run it while a heartbeat thread extends the lease, and
record the outcome. ``get_job``/``list_jobs`` expose stage and progress.
``run_pending`` runs everything queued, in the calling thread (the CLI and
tests use it).

Invariants: a job is run by at most one replica at a time (the claim is an
atomic conditional update; a lease that runs out without heartbeats is the
only way another replica may take it over). A job is retried at most
``job_max_attempts`` times, then fails with a message saying so. A job that
ends in failure leaves its version ``failed`` with the same message, so a
re-upload of that version number is allowed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.errors import NotFoundError, ServerError
from server.models import Job, ModelVersion
from server.services import registry, telemetry
from server.settings import Settings

__all__ = [
    "Worker",
    "claim_next",
    "get_job",
    "list_jobs",
    "requeue_expired",
    "run_job",
    "run_pending",
]

log = logging.getLogger("edgefleet.server.jobs")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def replica_id() -> str:
    """A name for this process in job leases (host, pid and a random suffix)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def get_job(session: Session, job_id: str) -> Job:
    """Raises NotFoundError."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}")
    return job


def list_jobs(session: Session, *, status: str | None = None, limit: int = 100) -> list[Job]:
    """Newest jobs first, optionally of one status."""
    q = select(Job)
    if status is not None:
        q = q.where(Job.status == status)
    return list(session.scalars(q.order_by(Job.created_at.desc()).limit(limit)).all())


def requeue_expired(session: Session, settings: Settings, *, now: datetime | None = None) -> int:
    """Return jobs whose replica stopped heartbeating to the queue (or fail them).

    Returns:
        How many jobs were requeued or failed. The caller commits.
    """
    now = now or _now()
    stale = session.scalars(
        select(Job).where(Job.status == "running", Job.lease_expires < now).with_for_update()
    ).all()
    for job in stale:
        if job.attempts >= settings.job_max_attempts:
            _finish(
                session,
                job,
                ok=False,
                error=(
                    f"gave up after {job.attempts} attempts: the replica running it stopped "
                    f"(last: {job.lease_owner})"
                ),
                now=now,
            )
        else:
            job.status, job.stage, job.lease_owner, job.lease_expires = (
                "queued",
                "queued",
                None,
                None,
            )
            job.message = f"requeued: replica stopped during attempt {job.attempts}"
            job.updated_at = now
    return len(stale)


def claim_next(session: Session, settings: Settings, owner: str) -> str | None:
    """Claim the oldest queued job for ``owner``; commit; return its id (or None)."""
    for _ in range(5):
        job_id = session.scalar(
            select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(1)
        )
        if job_id is None:
            session.rollback()
            return None
        now = _now()
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(
                status="running",
                stage="starting",
                lease_owner=owner,
                lease_expires=now + timedelta(seconds=settings.job_lease_seconds),
                attempts=Job.attempts + 1,
                updated_at=now,
                message=f"claimed by {owner}",
            )
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return job_id
    return None


def _finish(
    session: Session,
    job: Job,
    *,
    ok: bool,
    error: str | None = None,
    status_text: str = "",
    now: datetime | None = None,
) -> None:
    now = now or _now()
    job.status = "succeeded" if ok else "failed"
    job.stage = "done" if ok else "failed"
    job.progress = 1.0 if ok else job.progress
    job.error = error
    job.message = status_text or (error or "")
    job.lease_owner, job.lease_expires = None, None
    job.finished_at = job.updated_at = now
    if not ok and job.version_id is not None:
        version = session.get(ModelVersion, job.version_id)
        if version is not None and version.status in ("queued", "building"):
            version.status = "failed"
            version.error = error


def _heartbeat(
    session_factory: Callable[[], Session],
    settings: Settings,
    job_id: str,
    owner: str,
    stop: threading.Event,
) -> None:
    interval = max(1.0, settings.job_lease_seconds / 3)
    while not stop.wait(interval):
        try:
            with session_factory() as s, s.begin():
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.lease_owner == owner)
                    .values(lease_expires=_now() + timedelta(seconds=settings.job_lease_seconds))
                )
        except Exception:  # a missed heartbeat only shortens the lease
            log.exception("heartbeat for job %s failed", job_id)


def run_job(
    session_factory: Callable[[], Session], settings: Settings, job_id: str, owner: str
) -> str:
    """Run a job this replica has claimed; record success or failure.

    Returns:
        The job's final status.
    """

    def progress(stage: str, fraction: float, message: str) -> None:
        with session_factory() as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(stage=stage, progress=fraction, message=message, updated_at=_now())
            )

    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(session_factory, settings, job_id, owner, stop), daemon=True
    )
    beat.start()
    error: str | None = None
    outcome = ""
    try:
        outcome = registry.run_build(session_factory, settings, job_id, progress)
    except (registry.BuildError, ServerError) as exc:
        error = str(exc)
    except Exception as exc:  # a bug must fail the job visibly, not kill the worker
        log.exception("job %s crashed", job_id)
        error = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        stop.set()
        beat.join()
    with session_factory() as s, s.begin():
        job = s.get(Job, job_id)
        if job is None:
            return "failed"
        if error is None:
            _finish(s, job, ok=True, status_text=f"version {outcome}")
        else:
            _finish(s, job, ok=False, error=error)
            from server.services import audit

            audit.record(s, "server:build", "job.fail", f"job/{job_id}", {"error": error[:500]})
        return job.status


def run_pending(
    session_factory: Callable[[], Session], settings: Settings, owner: str | None = None
) -> int:
    """Run queued jobs in this thread until none is left; return how many ran."""
    owner = owner or replica_id()
    ran = 0
    while True:
        with session_factory() as s:
            requeue_expired(s, settings)
            s.commit()
            job_id = claim_next(s, settings, owner)
        if job_id is None:
            return ran
        run_job(session_factory, settings, job_id, owner)
        ran += 1


class Worker:
    """A daemon thread running queued jobs and telemetry retention for one replica."""

    RETENTION_EVERY = timedelta(hours=1)

    def __init__(self, session_factory: Callable[[], Session], settings: Settings) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.owner = replica_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-worker", daemon=True)
        self._last_retention: datetime | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to stop and wait for it (a running job finishes first)."""
        self._stop.set()
        self._thread.join(timeout)

    def _retention(self) -> None:
        now = _now()
        if self._last_retention and now - self._last_retention < self.RETENTION_EVERY:
            return
        self._last_retention = now
        with self.session_factory() as s, s.begin():
            deleted = telemetry.apply_retention(
                s, timedelta(days=self.settings.telemetry_retention_days), now=now
            )
        if deleted:
            log.info("retention removed %d telemetry records", deleted)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._retention()
                run_pending(self.session_factory, self.settings, self.owner)
            except Exception:
                log.exception("worker iteration failed; retrying")
            self._stop.wait(self.settings.worker_poll_seconds)
