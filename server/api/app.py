"""The FastAPI application: state, error mapping, latency metrics, routers.

Flow: ``create_app(settings)`` builds the engine, creates or upgrades the
schema (Alembic, under a cross-replica lock), refuses a production start
without an admin token, regenerates the managed broker files from the
devices table (so the server's own broker login is always in them), and
mounts the routers under ``/api/v1`` behind the request guard
(``server.api.guard``: a request body is authenticated and capped before it
is read, JSON bodies are strict UTF-8). The lifespan starts this replica's job
worker (unless ``worker_enabled`` is off) and its MQTT service (ingest, chunk
service, desired-state publisher; when ``mqtt_enabled`` and ``mqtt_url`` are
set) and stops both on shutdown.

Invariants: the process keeps no state besides caches of the database and the
trust-root file, so any number of replicas can serve one database and one
bundle storage. Every ``ServerError`` becomes ``{"detail": message}`` with its
status (``guard.error_response``, which the guard's refusals use too); a 429
carries ``Retry-After``, a 401 ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from edgefleet import __version__
from server import metrics
from server.api.guard import RequestGuard, error_response
from server.api.routes import (
    audit,
    deployments,
    devices,
    drift,
    jobs,
    models,
    retrain,
    rollouts,
    system,
    telemetry,
    tokens,
)
from server.db import make_engine, session_factory, upgrade_schema
from server.errors import ServerError
from server.services import broker
from server.services import tokens as token_service
from server.settings import ConfigError, Settings, check_production
from server.trustcache import TrustRootCache
from server.workers.drift import drift_loop
from server.workers.jobs import JobWorker
from server.workers.retention import retention_loop
from server.workers.rollouts import rollout_loop

__all__ = ["API_PREFIX", "create_app"]

API_PREFIX = "/api/v1"


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """Build the app for ``settings`` (schema upgraded before this returns).

    Args:
        settings: validated settings (``prepare_demo`` already applied in demo mode).
        engine: an existing engine (tests share one); default: from the settings.

    Raises:
        ConfigError: production settings lack a secret, or no admin token exists.
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable.
    """
    check_production(settings)
    engine = engine or make_engine(settings.effective_database_url)
    revision = upgrade_schema(engine)
    factory = session_factory(engine)
    if not settings.is_demo:
        with factory() as session:
            if not token_service.has_admin(session):
                raise ConfigError(
                    "no admin token exists: create one with 'edgefleet server init' "
                    "(it prints the token once)"
                )

    if broker.broker_files_configured(settings):
        with factory() as session, broker.sync_broker_files(session, settings):
            session.commit()
        broker.reload_broker(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = JobWorker(factory, settings) if settings.worker_enabled else None
        # Retention runs once per deployment: every worker replica competes for its lease.
        retention = retention_loop(factory, settings, worker.owner) if worker else None
        # Drift evaluation, likewise once per deployment (docs/drift.md).
        drift_eval = drift_loop(factory, settings, worker.owner) if worker else None
        # The rollout controller, likewise (docs/rollouts.md).
        controller = rollout_loop(factory, settings, worker.owner) if worker else None
        mqtt = None
        if settings.mqtt_enabled and settings.mqtt_url:
            from server.mqtt.service import MqttService

            mqtt = MqttService(factory, settings)
        app.state.mqtt = mqtt
        if worker is not None:
            worker.start()
        if retention is not None:
            retention.start()
        if drift_eval is not None:
            drift_eval.start()
        if controller is not None:
            controller.start()
        if mqtt is not None:
            mqtt.start()
        try:
            yield
        finally:
            if mqtt is not None:
                mqtt.stop()
            if controller is not None:
                controller.stop()
            if drift_eval is not None:
                drift_eval.stop()
            if retention is not None:
                retention.stop()
            if worker is not None:
                worker.stop()

    app = FastAPI(
        title="edgefleet server",
        version=__version__,
        description="Model registry, signed OTA bundles, fleet enrollment and telemetry.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = factory
    app.state.schema_revision = revision
    app.state.trust_roots = TrustRootCache(settings.trust_root)
    app.state.mqtt = None

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # Defense in depth: a value the database cannot store is the client's problem.
        reason = str(exc.orig).splitlines()[0] if exc.orig else "invalid value"
        return JSONResponse({"detail": f"the database refused a value: {reason}"}, 422)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(request: Request, exc: IntegrityError) -> JSONResponse:
        # Two requests raced past a service's existence check (PostgreSQL runs them
        # concurrently): the loser's transaction is rolled back; it may retry.
        reason = str(exc.orig).splitlines()[0] if exc.orig else "a uniqueness rule"
        return JSONResponse(
            {"detail": f"a concurrent request changed the same data first ({reason}); retry"},
            409,
        )

    routers = (
        tokens,
        models,
        jobs,
        devices,
        deployments,
        telemetry,
        drift,
        retrain,
        rollouts,
        audit,
    )
    for module in routers:
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(system.public_router)
    app.include_router(system.open_metrics_router if settings.metrics_public else system.router)

    # Inside the latency metric (added last, so outermost): guard refusals are measured too.
    app.add_middleware(RequestGuard)

    @app.middleware("http")
    async def _latency(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", None)
        if template is None:
            template = "unmatched"  # bounded label set: never the raw path
        elif request.url.path.startswith(API_PREFIX + "/"):
            template = API_PREFIX + template  # routes hold their path without the prefix
        metrics.API_LATENCY.labels(
            request.method, template, f"{response.status_code // 100}xx"
        ).observe(time.perf_counter() - start)
        return response

    return app
