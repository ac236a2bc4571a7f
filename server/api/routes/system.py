"""``/healthz`` (public liveness) and ``/metrics`` (Prometheus, viewer token unless public)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import metrics
from server.api import schemas
from server.api.deps import Reader, SessionDep

router = APIRouter(tags=["system"])
public_router = APIRouter(tags=["system"])
open_metrics_router = APIRouter(tags=["system"])


@public_router.get("/healthz", response_model=schemas.Liveness)
def healthz(request: Request) -> schemas.Liveness:
    """Liveness: the process is up and its schema is at ``schema_revision``."""
    return schemas.Liveness(status="ok", schema_revision=request.app.state.schema_revision)


def _metrics(session: SessionDep) -> Response:
    return Response(metrics.render(session), media_type=metrics.CONTENT_TYPE)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "exposition"}},
)
def metrics_protected(session: SessionDep, _: Reader) -> Response:
    """Prometheus exposition: ingest, devices online, update outcomes, API latency."""
    return _metrics(session)


@open_metrics_router.get("/metrics", response_class=Response)
def metrics_public(session: SessionDep) -> Response:
    """The same exposition without a token (``metrics_public = true``)."""
    return _metrics(session)
