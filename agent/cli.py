"""``edgefleet agent``: sideload, inspect, roll back and query the device agent.

Verbs: ``install`` (a bundle through the same update machine an MQTT update
uses), ``status``, ``rollback``, ``predict``; ``run`` (the daemon) is added by
``agent.daemon_cli`` when that module is present. Importing this module is
cheap (argparse and rich only); handlers import the agent core, numpy and
onnxruntime when they run.

``--trust-root FILE`` pins the trust root in the state directory on first use;
later it may be omitted, and a different root is accepted only as a valid
successor of the pinned one. Exit status: 0 success; a verification error's
``code`` (10-25, 40-48 for health checks); the agent's own codes (31, 50-59);
1 for unreadable files; 2 for usage. With ``--json`` every verb prints exactly
one JSON object on stdout, errors included.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from edgefleet.console import (
    console,
    emit,
    emit_error,
    kv_table,
    non_negative_int,
    positive_int,
)

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``agent install|status|rollback|predict`` (and ``run`` if available)."""
    agent = sub.add_parser("agent", help="the device agent: install, status, rollback, predict")
    asub = agent.add_subparsers(dest="agent_command", metavar="VERB", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", required=True, type=Path, help="the agent's state directory")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    i = asub.add_parser(
        "install",
        help="verify, stage, health-check and switch to a bundle (or roll back)",
        description="Sideload a bundle through the same update state machine as an OTA update.",
    )
    i.add_argument("bundle", type=Path, metavar="BUNDLE")
    common(i)
    i.add_argument("--trust-root", type=Path, help="trust-root.json to pin (first use)")
    i.add_argument("--device-class", default="generic", help="this device's class (generic)")
    i.add_argument(
        "--intra-op-threads",
        type=non_negative_int,
        default=1,
        help="onnxruntime threads, 0 = automatic (1)",
    )
    i.add_argument(
        "--max-trial-restarts",
        type=positive_int,
        default=3,
        help="agent starts on trial before reverting (3)",
    )
    i.set_defaults(func=_run_install)

    s = asub.add_parser("status", help="show the update state, active model and last error")
    common(s)
    s.set_defaults(func=_run_status)

    r = asub.add_parser("rollback", help="switch back to the previous committed model")
    common(r)
    r.add_argument("--trust-root", type=Path, help="trust-root.json to pin (first use)")
    r.set_defaults(func=_run_rollback)

    p = asub.add_parser("predict", help="run the active model on a .npy array")
    common(p)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="[NAME=]FILE.npy",
        help="input array; NAME= is needed only for multi-input models; repeatable",
    )
    p.add_argument("--intra-op-threads", type=non_negative_int, default=1)
    p.set_defaults(func=_run_predict)

    try:  # the daemon's ``run`` verb lives with the daemon (agent/daemon_cli.py)
        daemon_cli = importlib.import_module("agent.daemon_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "agent.daemon_cli":
            raise
    else:
        daemon_cli.add_run_parser(asub)


def _fail(exc: BaseException, as_json: bool) -> int:
    from edgefleet.errors import EdgefleetError

    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return emit_error("FileError", 1, f"{where}{exc.strerror or exc}", as_json)
    code = exc.code if isinstance(exc, EdgefleetError) else 1
    return emit_error(type(exc).__name__, code, str(exc), as_json)


def _open_agent(args: argparse.Namespace, **options: Any) -> Any:
    from agent.core import Agent
    from agent.options import AgentOptions

    agent = Agent(args.state_dir, AgentOptions(**options))
    trust_root = getattr(args, "trust_root", None)
    try:
        if trust_root is not None:
            agent.pin_trust_root(trust_root.read_bytes())
    except BaseException:
        agent.close()
        raise
    return agent


class _Progress:
    """A file wrapper advancing a rich progress bar as the verifier reads."""

    def __init__(self, fh: IO[bytes], progress: Any, task: Any) -> None:
        self._fh = fh
        self._progress = progress
        self._task = task

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._progress.update(self._task, advance=len(data))
        return data


def _run_install(args: argparse.Namespace) -> int:
    from edgefleet.errors import EdgefleetError

    try:
        agent = _open_agent(
            args,
            device_class=args.device_class,
            intra_op_threads=args.intra_op_threads,
            max_trial_restarts=args.max_trial_restarts,
        )
    except (OSError, EdgefleetError, ValueError) as exc:
        return _fail(exc, args.json)
    try:
        with open(args.bundle, "rb") as fh:
            if args.json:
                result = agent.install(fh, source_name=str(args.bundle))
            else:
                from rich.progress import Progress

                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(
                        f"verifying {args.bundle.name}", total=args.bundle.stat().st_size
                    )
                    stream: Any = _Progress(fh, progress, task)
                    result = agent.install(stream, source_name=str(args.bundle))
        out = result.to_dict()
        out["status"] = agent.status()
    except (OSError, EdgefleetError, ValueError) as exc:
        return _fail(exc, args.json)
    finally:
        agent.close()
    emit(out, args.json, _render_outcome)
    return int(result.code)


def _render_outcome(result: Mapping[str, Any]) -> None:
    active = result["active"]
    serving = (
        "no model"
        if active is None
        else f"{active['model']} v{active['version']} (slot {active['slot']})"
    )
    subject = f"{result['model']} v{result['version']}" if result["model"] else "the bundle"
    if result["ok"]:
        verb = "committed" if result["outcome"] == "committed" else "rolled back from"
        console.print(f"[bold green]{verb}[/] {subject}; serving {serving}")
        return
    err = result["error"]
    console.print(
        f"[bold red]{result['outcome']}[/] {subject}: [bold]{err['error']}[/] {err['message']}"
    )
    console.print(f"serving {serving}")


def _run_status(args: argparse.Namespace) -> int:
    from agent.core import read_status
    from edgefleet.errors import EdgefleetError

    try:
        status = read_status(args.state_dir)
    except (OSError, EdgefleetError) as exc:
        return _fail(exc, args.json)
    emit(status, args.json, _render_status)
    return 0


def _ref(ref: Mapping[str, Any] | None) -> str:
    if ref is None:
        return "none"
    digest = ref["manifest_sha256"][:12]
    return f"{ref['model']} v{ref['version']} (slot {ref['slot']}, manifest {digest})"


def _render_status(status: Mapping[str, Any]) -> None:
    err = status["last_error"]
    rows = {
        "state": status["state"],
        "active": _ref(status["active"]),
        "serving": _ref(status["serving"]),
        "previous": _ref(status["previous"]),
        "rollback floor": ", ".join(f"{k} v{v}" for k, v in status["rollback_floor"].items())
        or "none",
        "last error": "none" if err is None else f"{err['error']}: {err['message']}",
        "trust root": "not pinned"
        if status["trust_root_version"] is None
        else f"v{status['trust_root_version']}",
    }
    if status["update"] is not None:
        upd = status["update"]
        rows["update"] = f"{upd['kind']} {upd['id']} from {upd['source']}"
    if status["state"] == "trial":
        rows["trial restarts"] = status["trial_restarts"]
    console.print(kv_table(f"agent {status['state_dir']}", rows))
    for event in status["history"]:
        what = f"{event['model']} v{event['version']}" if event["model"] else ""
        why = f" ({event['error']['error']})" if event["error"] else ""
        console.print(f"  {event['at']} {event['kind']} {event['outcome']} {what}{why}")


def _run_rollback(args: argparse.Namespace) -> int:
    from edgefleet.errors import EdgefleetError

    try:
        agent = _open_agent(args)
    except (OSError, EdgefleetError, ValueError) as exc:
        return _fail(exc, args.json)
    try:
        result = agent.rollback()
        out = result.to_dict()
        out["status"] = agent.status()
    except (OSError, EdgefleetError) as exc:
        return _fail(exc, args.json)
    finally:
        agent.close()
    emit(out, args.json, _render_outcome)
    return int(result.code)


def _load_inputs(specs: list[str], names: list[str]) -> dict[str, Any]:
    import numpy as np

    feed: dict[str, Any] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if not name:
            if len(names) != 1:
                raise ValueError(f"the model has inputs {names}: write --input NAME=FILE.npy")
            name = names[0]
        if name not in names:
            raise ValueError(f"the model has no input {name!r} (inputs: {names})")
        feed[name] = np.load(path, allow_pickle=False)
    missing = sorted(set(names) - set(feed))
    if missing:
        raise ValueError(f"missing --input for {missing}")
    return feed


def _run_predict(args: argparse.Namespace) -> int:
    from agent.core import Agent
    from agent.errors import NoActiveModelError
    from agent.options import AgentOptions
    from edgefleet.errors import EdgefleetError

    try:
        agent = Agent(
            args.state_dir, AgentOptions(intra_op_threads=args.intra_op_threads), readonly=True
        )
        manifest = agent.serving_manifest
        if manifest is None:
            raise NoActiveModelError(f"no model installed in {args.state_dir}")
        feed = _load_inputs(args.input, [t.name for t in manifest.inputs])
        pid, outputs = agent.predict_with_id(feed)
    except (OSError, EdgefleetError, ValueError) as exc:
        if isinstance(exc, ValueError) and not isinstance(exc, OSError):
            return emit_error("UsageError", 2, str(exc), args.json)
        return _fail(exc, args.json)
    ref = agent.serving
    assert ref is not None
    result = {
        "ok": True,
        "model": ref.model,
        "version": ref.version,
        "slot": ref.slot,
        "prediction_id": pid,
        "outputs": {
            spec.name: {
                "dtype": str(value.dtype),
                "shape": list(value.shape),
                "data": value.tolist(),
            }
            for spec, value in zip(manifest.outputs, outputs, strict=True)
        },
    }
    emit(result, args.json, _render_predict)
    return 0


def _render_predict(result: Mapping[str, Any]) -> None:
    console.print(f"{result['model']} v{result['version']} (slot {result['slot']})")
    for name, out in result["outputs"].items():
        console.print(f"[bold]{name}[/] {out['dtype']}{out['shape']}: {out['data']}")
