"""``edgefleet rollout``: start, show and steer rollouts (REST verbs; docs/rollouts.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit

__all__ = ["add_rollout_parser"]


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h`` or ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 90s, 10m, 2h)"
        ) from None


def _waves(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of percentages") from None


def add_rollout_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``edgefleet rollout``."""
    from server.cli.remote import client_args

    ro = sub.add_parser("rollout", help="canary and all-at-once rollouts (docs/rollouts.md)")
    rsub = ro.add_subparsers(dest="rollout_command", metavar="VERB", required=True)
    st = rsub.add_parser("start", help="start a rollout of MODEL VERSION to a group")
    st.add_argument("model")
    st.add_argument("version", type=int)
    st.add_argument("--group", required=True)
    st.add_argument("--strategy", choices=("canary", "all-at-once"), default="canary")
    st.add_argument("--waves", type=_waves, default=None, help="cumulative %%, e.g. 5,25,100")
    st.add_argument("--soak", type=_duration, default=None, help="e.g. 10m (default 10m)")
    st.add_argument("--timeout", type=_duration, default=None, help="per device (default 30m)")
    st.add_argument("--deadline", type=_duration, default=None,
                    help="inconclusive evaluations pause after this (default 1h)")  # fmt: skip
    st.add_argument("--previous", type=int, default=None,
                    help="version to return to (default: the group's current one)")  # fmt: skip
    st.add_argument("--revert-to", type=int, default=None,
                    help="the previous payload re-released above VERSION")  # fmt: skip
    st.add_argument("--gates", type=Path, default=None, help="JSON file of gate settings")
    client_args(st)
    st.set_defaults(func=_start)
    status = rsub.add_parser("status", help="waves, devices, gates and decisions of a rollout")
    status.add_argument("id")
    client_args(status)
    status.set_defaults(func=_status)
    ls = rsub.add_parser("ls", help="rollouts, newest first")
    ls.add_argument("--limit", type=int, default=100)
    client_args(ls)
    ls.set_defaults(func=_ls)
    for verb in ("pause", "resume", "abort", "promote"):
        cmd = rsub.add_parser(verb, help=f"{verb} a rollout (taken by the controller's next pass)")
        cmd.add_argument("id")
        client_args(cmd)
        cmd.set_defaults(func=_command, verb=verb)


def _render(r: Mapping[str, Any]) -> None:
    from edgefleet.console import kv_table

    console.print(kv_table(f"rollout {r['id']}", {
        "model": f"{r['model']} v{r['version']} -> group {r['group']}",
        "status": f"{r['status']} (wave {r['wave']}, {r['phase']})",
        "reason": r["reason"] or "-",
        "devices": ", ".join(f"{k} {v}" for k, v in sorted(r["device_counts"].items())),
        "pending command": (r["pending_command"] or {}).get("command", "-"),
    }))  # fmt: skip
    for g in r["gates"]:
        console.print(f"  gate {g['gate']}: {g['verdict']} - {g['reason']}")
    for e in r["events"][-10:]:
        d = e["detail"]
        what = d.get("decision") or d.get("command") or d.get("verdict")
        console.print(f"  {e['at']} {e['kind']}: {what} {d.get('reason') or d.get('result') or ''}")


def _start(args: argparse.Namespace) -> int:
    from server.cli.remote import _api

    spec: dict[str, Any] = {"model": args.model, "version": args.version, "group": args.group,
                            "strategy": args.strategy}  # fmt: skip
    for key, value in (("waves", args.waves), ("soak_s", args.soak),
                       ("device_timeout_s", args.timeout), ("decision_deadline_s", args.deadline),
                       ("previous", args.previous), ("revert_to", args.revert_to)):  # fmt: skip
        if value is not None:
            spec[key] = value
    if args.gates is not None:
        spec["gates"] = json.loads(args.gates.read_text())

    def call(client: Any) -> int:
        emit(client.start_rollout(spec), args.json, _render)
        return 0

    return int(_api(args, call))


def _status(args: argparse.Namespace) -> int:
    from server.cli.remote import _api

    def call(client: Any) -> int:
        emit(client.rollout(args.id), args.json, _render)
        return 0

    return int(_api(args, call))


def _ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    from server.cli.remote import _api

    def render(r: Mapping[str, Any]) -> None:
        table = Table(title="rollouts", title_justify="left")
        for col in ("id", "model", "group", "status", "wave", "created"):
            table.add_column(col)
        for x in r["rollouts"]:
            table.add_row(x["id"], f"{x['model']} v{x['version']}", x["group"], x["status"],
                          str(x["wave"]), x["created_at"])  # fmt: skip
        console.print(table)

    def call(client: Any) -> int:
        emit(client.rollouts(limit=args.limit), args.json, render)
        return 0

    return int(_api(args, call))


def _command(args: argparse.Namespace) -> int:
    from server.cli.remote import _api

    def call(client: Any) -> int:
        emit(client.rollout_command(args.id, args.verb), args.json, _render)
        return 0

    return int(_api(args, call))
