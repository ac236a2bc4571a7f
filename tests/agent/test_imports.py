"""The device install stays small: the agent never imports torch or server code."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "fastapi", "sqlalchemy", "server", "compression", "onnx")
CORE = [
    "agent", "agent.core", "agent.cli", "agent.machine", "agent.state", "agent.fs",
    "agent.slots", "agent.health", "agent.runtime", "agent.shadow", "agent.http_endpoint",
    "agent.options", "agent.errors",
]  # fmt: skip


def loaded_after(code: str) -> set[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_agent_imports_no_heavy_or_server_packages():
    mods = loaded_after("\n".join(f"import {m}" for m in CORE))
    bad = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN)
    assert bad == []


def test_agent_cli_import_is_light():
    mods = loaded_after("import agent.cli")
    assert not {"onnxruntime", "numpy", "agent.core"} & mods
