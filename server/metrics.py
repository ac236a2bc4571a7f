"""Prometheus metrics of one server process.

Flow: services increment counters as things happen (telemetry stored and
duplicated, update events by outcome); the API middleware observes request
latency per route template; ``render(session)`` refreshes the gauges that come
from the database (devices online, jobs by status) and returns the exposition
text for ``GET /metrics``.

Invariants: all metrics live in this module's own ``REGISTRY`` (never the
global default one), labels are bounded sets (route templates, not raw paths;
update kinds from a fixed list, anything else counted as ``other``). Counters
are per process: with several replicas, Prometheus scrapes each and ``sum()``
gives the fleet-wide rate, while the database-backed gauges are the same on
every replica (use ``max()``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

__all__ = [
    "API_LATENCY",
    "CHUNK_BYTES",
    "CHUNK_REQUESTS",
    "CONTENT_TYPE",
    "DESIRED_PUBLISHED",
    "DEVICES",
    "DEVICES_ONLINE",
    "INGEST_BATCH_SECONDS",
    "MQTT_CONNECTED",
    "MQTT_MESSAGES",
    "REGISTRY",
    "TELEMETRY_RECORDS",
    "TELEMETRY_REJECTED",
    "UPDATE_EVENTS",
    "observe_update",
    "render",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REGISTRY = CollectorRegistry(auto_describe=True)

TELEMETRY_RECORDS = Counter(
    "edgefleet_telemetry_records",
    "Telemetry records handed to ingest_batch, by result (stored or duplicate).",
    ["result"],
    registry=REGISTRY,
)
UPDATE_EVENTS = Counter(
    "edgefleet_update_events",
    "Update steps reported by devices, by outcome (the agent's event kind).",
    ["outcome"],
    registry=REGISTRY,
)
API_LATENCY = Histogram(
    "edgefleet_api_request_seconds",
    "API request latency in seconds, by method, route template and status class.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
MQTT_CONNECTED = Gauge(
    "edgefleet_mqtt_connected", "1 while this process holds its broker session.", registry=REGISTRY
)
MQTT_MESSAGES = Counter(
    "edgefleet_mqtt_messages",
    "Messages received from devices, by channel (telemetry, status, facts, chunks/req).",
    ["channel"],
    registry=REGISTRY,
)
TELEMETRY_REJECTED = Counter(
    "edgefleet_telemetry_rejected",
    "Device messages dropped without storing, by reason (malformed, wrong-device).",
    ["reason"],
    registry=REGISTRY,
)
INGEST_BATCH_SECONDS = Histogram(
    "edgefleet_ingest_batch_seconds",
    "Time to store and commit one ingest batch, in seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
CHUNK_REQUESTS = Counter(
    "edgefleet_chunk_requests",
    "Chunk requests by result (served, denied, unknown-bundle, bad-request, malformed, dropped).",
    ["result"],
    registry=REGISTRY,
)
CHUNK_BYTES = Counter(
    "edgefleet_chunk_bytes", "Bundle bytes sent in chunk frames.", registry=REGISTRY
)
DESIRED_PUBLISHED = Counter(
    "edgefleet_desired_published",
    "Desired-state messages acknowledged by the broker, by action (assign, reissue, clear).",
    ["action"],
    registry=REGISTRY,
)
DEVICES_ONLINE = Gauge(
    "edgefleet_devices_online", "Enrolled devices whose last status is online.", registry=REGISTRY
)
DEVICES = Gauge("edgefleet_devices", "Enrolled devices.", registry=REGISTRY)
JOBS = Gauge("edgefleet_jobs", "Build jobs by status.", ["status"], registry=REGISTRY)

UPDATE_OUTCOMES = frozenset(
    {
        "desired-accepted",
        "desired-rejected",
        "download-started",
        "download-complete",
        "download-failed",
        "install-started",
        "installed",
        "install-failed",
        "rolled-back",
        "committed",
        "aborted",
        "download-retry",
        "shadow-started",
        "shadow-failed",
        "shadow-stopped",
    }
)
JOB_STATUSES = ("queued", "running", "succeeded", "failed")

for _result in ("stored", "duplicate"):
    TELEMETRY_RECORDS.labels(_result)
for _outcome in sorted(UPDATE_OUTCOMES):
    UPDATE_EVENTS.labels(_outcome)
for _reason in ("malformed", "wrong-device"):
    TELEMETRY_REJECTED.labels(_reason)
for _result in ("served", "denied", "unknown-bundle", "bad-request", "malformed", "dropped"):
    CHUNK_REQUESTS.labels(_result)


def observe_update(kind: str) -> None:
    """Count one update event reported by a device."""
    UPDATE_EVENTS.labels(kind if kind in UPDATE_OUTCOMES else "other").inc()


def render(session: Session) -> bytes:
    """Refresh the database-backed gauges and return the exposition text."""
    from server.models import Device, Job

    total, online = session.execute(
        select(func.count(), func.count().filter(Device.online.is_(True))).select_from(Device)
    ).one()
    DEVICES.set(total or 0)
    DEVICES_ONLINE.set(online or 0)
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for status in JOB_STATUSES:
        JOBS.labels(status).set(counts.get(status, 0))
    return generate_latest(REGISTRY)
