"""Property-based API run (schemathesis) with a valid admin token: never a 5xx.

Every operation of the app's OpenAPI document gets bounded generated
examples, positive (schema-valid) and negative (schema-violating), against the
real database (SQLite file and PostgreSQL). A published version and a device
exist, so some generated requests hit real rows. The schemathesis pytest
plugin (``from_fixture``) does not run under this pytest, so the operations'
hypothesis strategies are driven directly.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.server.conftest import Api, onnx_model, run_jobs, upload

EXAMPLES = 30  # per operation and generation mode


def test_api_never_answers_5xx(api: Api) -> None:
    upload(api, "m", onnx_model(), version=1)
    run_jobs(api)
    api.post("/api/v1/devices", role="operator", json={"device_class": "cam", "device_id": "d1"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    headers = api.headers("admin")
    ran: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                response = case.call(headers=headers)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                # Nothing to violate (an operation without parameters or body).
                assert mode is GenerationMode.NEGATIVE, operation.label
                continue
            ran.append(f"{mode.value} {operation.label}")
    assert len([r for r in ran if r.startswith("positive")]) == 43, ran
    assert len(ran) >= 40, ran
    # the generated requests may not have destroyed the admin's access
    assert api.get("/api/v1/whoami").status_code == 200
