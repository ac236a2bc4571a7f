"""``edgefleet agent run --config agent.toml [--json]``: the device daemon as a CLI verb.

Flow: ``agent.cli`` calls ``add_run_parser`` on its sub-parsers; the handler
loads the TOML configuration, opens the agent core on the state directory
(the "boot": recovery runs here), starts the ``Daemon`` (and the core's local
HTTP endpoint, ``agent.http_endpoint``, when ``[http] enabled``), and runs until SIGTERM/SIGINT or
``--exit-after``. Importing this module is cheap: the core, numpy, paho and
onnxruntime are imported by the handler only.

Output: with ``--json``, one JSON object per line: ``{"event": "started",
...}``, then ``{"event": "update", "update": {...}}`` per update event, and a
final ``{"ok": true, "status": {...}}``. Without it, readable lines. Exit
status: 0 after a clean stop; 1 for an invalid configuration or unreadable
file; the error's ``code`` for an agent or verification error at start-up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error, kv_table

__all__ = ["add_run_parser"]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``agent run`` on the ``agent`` verb's sub-parsers."""
    p = sub.add_parser(
        "run",
        help="run the daemon: MQTT updates, inference telemetry",
        description=(
            "Connect to the broker, apply director-signed desired states (chunked download, "
            "verified install, shadow), and stream telemetry until SIGTERM/SIGINT."
        ),
    )
    p.add_argument("--config", required=True, type=Path, help="agent.toml")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument(
        "--exit-after",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop cleanly after this many seconds (scheduled runs, smoke tests)",
    )
    p.set_defaults(func=_run)


def _line(as_json: bool, payload: Mapping[str, Any], text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
    else:
        console.print(text)


def _render_status(result: Mapping[str, Any]) -> None:
    status = result["status"]
    rows = {
        "device": status["device_id"],
        "connected": status["connected"],
        "desired": status["desired"],
        "telemetry": status["telemetry"],
        "counters": status["counters"],
        "last event": status["last_event"],
    }
    console.print(kv_table("edgefleet agent stopped", rows))


def _run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from edgefleet.errors import EdgefleetError

    as_json = bool(args.json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return emit_error("ConfigError", 1, str(exc), as_json)

    from agent.core import Agent
    from agent.daemon import Daemon
    from agent.http_endpoint import HttpEndpoint
    from edgefleet.wire import UpdateEvent

    def on_event(ev: UpdateEvent) -> None:
        model = f" {ev.model.name} v{ev.model.version}" if ev.model else ""
        reason = f": {ev.reason}" if ev.reason else ""
        _line(as_json, {"event": "update", "update": ev.to_dict()}, f"{ev.kind}{model}{reason}")

    # Opening the core runs its recovery; keep those outcomes for the daemon.
    boot_events: list[Any] = []
    try:
        agent = Agent(
            config.device.state_dir, config.agent_options(), event_sink=boot_events.append
        )
    except EdgefleetError as exc:
        return emit_error(type(exc).__name__, exc.code, str(exc), as_json)
    http = None
    try:
        try:
            daemon = Daemon(config, agent, on_event=on_event)
        except ConfigError as exc:
            return emit_error("ConfigError", 1, str(exc), as_json)
        except OSError as exc:
            return emit_error(
                "FileError", 1, f"{exc.filename or ''} {exc.strerror or exc}", as_json
            )
        except EdgefleetError as exc:
            return emit_error(type(exc).__name__, exc.code, str(exc), as_json)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        if args.exit_after is not None:
            timer = threading.Timer(args.exit_after, stop.set)
            timer.daemon = True
            timer.start()
        daemon.start()
        for event in boot_events:
            daemon.core_event(event)
        if config.http.enabled:
            http = HttpEndpoint(
                agent, port=config.http.port, host=config.http.bind,
                exploring=daemon.recorder.exploring,
            ).start()  # fmt: skip
        broker = f"{config.broker.host}:{config.broker.port}"
        _line(
            as_json,
            {
                "event": "started",
                "device_id": config.device.id,
                "broker": broker,
                "state_dir": str(config.device.state_dir),
                "http": None if http is None else http.url,
            },
            f"edgefleet agent [bold]{config.device.id}[/] running (broker {broker}); "
            "Ctrl-C to stop",
        )
        try:
            stop.wait()
        finally:
            if http is not None:
                http.close()
            daemon.stop()
        emit({"ok": True, "status": daemon.status()}, as_json, _render_status)
        return 0
    finally:
        agent.close()
