"""The pre-signing health check: run on the server what every device runs on install.

This is the server's one recorded use of the agent package (the import-linter
contract in pyproject.toml names this module and no other): a bundle whose
model does not load or fails its own health check would be rolled back by
every device, so it is refused before anything is signed.
"""

from __future__ import annotations

import math

from edgefleet.manifest import Manifest
from server.services.registry.catalog import BuildError

__all__ = ["preflight"]


def preflight(model: bytes, manifest: Manifest) -> None:
    """Run the health check devices run on install, here, before anything is signed.

    The latency budget is not enforced (this is not the device's CPU); outputs,
    shapes, finiteness and the golden comparison are. A bundle that fails here
    would be rolled back by every device.

    Raises:
        BuildError: naming the device's error.
    """
    from agent.errors import HealthCheckError, ModelLoadError
    from agent.health import run_health_check
    from agent.runtime import make_session

    try:
        run_health_check(make_session(model, 1), manifest, runs=1, latency_factor=math.inf)
    except (HealthCheckError, ModelLoadError) as exc:
        raise BuildError(
            f"the bundle's health check fails on the server ({type(exc).__name__}: {exc}); "
            "every device would roll it back"
        ) from exc
