"""Build jobs: the persisted queue, claims under a lease, and running one job.

Flow: ``registry.submit_version`` inserts a ``queued`` job. Every replica's
job worker (``server.workers.jobs.JobWorker``) loops: requeue jobs whose
lease expired (their replica died), claim the oldest queued job with a
compare-and-set ``UPDATE ... WHERE status='queued'`` plus the job's lease
(``job:<id>`` in ``server.workers.lease``: a new epoch), run it while a
heartbeat thread renews the lease, and record the outcome fenced by the
epoch. ``get_job``/``list_jobs`` expose stage and progress.
``run_pending`` runs everything queued, in the calling thread (the CLI and
tests use it).

Invariants: a job is run by at most one replica at a time (the claim is an
atomic conditional update; a lease that runs out without heartbeats is the
only way another replica may take it over, and the old holder's later writes
are fenced off by the lease epoch). A job is retried at most
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
from server.models import Job, Lease, ModelVersion
from server.services import registry
from server.settings import Settings
from server.workers import lease
from server.workers.lease import HeldLease

__all__ = [
    "claim",
    "claim_next",
    "get_job",
    "job_lease",
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


def job_lease(job_id: str) -> str:
    """The lease name of a job (``server.workers.lease``)."""
    return f"job:{job_id}"


def requeue_expired(session: Session, settings: Settings, *, now: datetime | None = None) -> int:
    """Return jobs whose replica stopped renewing their lease to the queue (or fail them).

    The expired lease is also cleared, so the old holder, should it wake up,
    fails its next renewal or fenced write (``LeaseLostError``) and stops.

    Returns:
        How many jobs were requeued or failed. The caller commits.
    """
    now = now or _now()
    running = session.scalars(select(Job).where(Job.status == "running").with_for_update()).all()
    stale: list[tuple[Job, str | None]] = []
    for job in running:
        lease = session.get(Lease, job_lease(job.id))
        if lease is None or lease.expires_at is None or lease.expires_at <= now:
            stale.append((job, None if lease is None else lease.holder))
            if lease is not None:
                lease.holder, lease.expires_at = None, None
    for job, holder in stale:
        if job.attempts >= settings.job_max_attempts:
            _finish(
                session,
                job,
                ok=False,
                error=(
                    f"gave up after {job.attempts} attempts: the replica running it stopped "
                    f"(last: {holder})"
                ),
                now=now,
            )
        else:
            job.status, job.stage = "queued", "queued"
            job.message = f"requeued: replica stopped during attempt {job.attempts}"
            job.updated_at = now
    return len(stale)


def claim_next(session: Session, settings: Settings, owner: str) -> str | None:
    """Claim the oldest queued job for ``owner``; commit; return its id (or None).

    The claim is a compare-and-set on the job's status plus the job's lease
    (a new epoch), in one transaction.
    """
    held = claim(session, settings, owner)
    return None if held is None else held[0]


def claim(session: Session, settings: Settings, owner: str) -> tuple[str, HeldLease] | None:
    """``claim_next`` that also returns the held lease (its epoch fences the job's writes)."""
    ttl = timedelta(seconds=settings.job_lease_seconds)
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
                attempts=Job.attempts + 1,
                updated_at=now,
                message=f"claimed by {owner}",
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            continue
        held = lease.acquire(session, job_lease(job_id), owner, ttl, now=now)
        if held is None:  # a stale holder's lease is still live: leave the job queued
            session.rollback()
            return None
        session.commit()
        return job_id, held
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
    job.finished_at = job.updated_at = now
    if not ok and job.version_id is not None:
        version = session.get(ModelVersion, job.version_id)
        if version is not None and version.status in ("queued", "building"):
            version.status = "failed"
            version.error = error


def _heartbeat(
    session_factory: Callable[[], Session],
    settings: Settings,
    held: HeldLease,
    stop: threading.Event,
) -> None:
    interval = max(1.0, settings.job_lease_seconds / 3)
    ttl = timedelta(seconds=settings.job_lease_seconds)
    while not stop.wait(interval):
        try:
            with session_factory() as s, s.begin():
                held = lease.renew(s, held, ttl, now=_now())
        except lease.LeaseLostError:
            log.warning("job lease %s was taken over; its writes are fenced off", held.name)
            return
        except Exception:  # a missed heartbeat only shortens the lease
            log.exception("heartbeat for %s failed", held.name)


def run_job(
    session_factory: Callable[[], Session],
    settings: Settings,
    job_id: str,
    owner: str,
    held: HeldLease | None = None,
) -> str:
    """Run a job this replica has claimed; record success or failure.

    Every write about the job (progress, outcome) is fenced by the claim's
    lease epoch: once another replica took the job over, this one's progress
    calls raise ``LeaseLostError`` (which ends the build) and its outcome is
    not recorded.

    Returns:
        The job's final status, or ``"lost"`` when the lease was taken over.
    """
    if held is None:
        with session_factory() as s:
            row = s.get(Lease, job_lease(job_id))
            if row is None or row.holder != owner:
                raise lease.LeaseLostError(f"job {job_id} is not held by {owner}")
            assert row.expires_at is not None
            held = HeldLease(row.name, owner, int(row.epoch), row.expires_at)
    fenced = held

    def progress(stage: str, fraction: float, message: str) -> None:
        with session_factory() as s, s.begin():
            lease.fence(s, fenced)
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(stage=stage, progress=fraction, message=message, updated_at=_now())
            )

    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(session_factory, settings, held, stop), daemon=True
    )
    beat.start()
    error: str | None = None
    outcome = ""
    try:
        outcome = registry.run_build(session_factory, settings, job_id, progress)
    except lease.LeaseLostError:
        log.warning("job %s was taken over by another replica; stopping", job_id)
        return "lost"
    except (registry.BuildError, ServerError) as exc:
        error = str(exc)
    except Exception as exc:  # a bug must fail the job visibly, not kill the worker
        log.exception("job %s crashed", job_id)
        error = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        stop.set()
        beat.join()
    try:
        with session_factory() as s, s.begin():
            lease.fence(s, held)
            job = s.get(Job, job_id)
            if job is None:
                return "failed"
            if error is None:
                _finish(s, job, ok=True, status_text=f"version {outcome}")
            else:
                _finish(s, job, ok=False, error=error)
                from server.services import audit

                audit.record(s, "server:build", "job.fail", f"job/{job_id}", {"error": error[:500]})
            lease.release(s, held)
            return job.status
    except lease.LeaseLostError:
        log.warning("job %s was taken over by another replica; outcome not recorded", job_id)
        return "lost"


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
            claimed = claim(s, settings, owner)
        if claimed is None:
            return ran
        job_id, held = claimed
        run_job(session_factory, settings, job_id, owner, held)
        ran += 1
