"""``edgefleet drift profile|compute``: the offline drift check, no server needed.

* ``profile`` builds a ``drift_reference.json`` from data alone, with the
  code ``edgefleet compress`` uses (``compression.profiles.drift_reference``).
* ``compute`` checks a batch of production data against a profile (a
  bundle's ``drift_reference.json``) with the analysis core the server uses
  (``server.analysis``): one JSON object with every feature's statistics and
  status (docs/drift.md).
* ``report`` asks a server (``GET /api/v1/drift``) for the drift of a model
  version's fleet telemetry, for the fleet, a group or a device.

numpy, scipy and the compression package are imported in the handlers only.
Exit status: 0 the check ran (whatever it found); 1 unusable input (a missing
or unreadable file, a profile that is not one, data that does not fit it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error

__all__ = ["add_alerts_parser", "add_drift_parser", "add_retrain_parser"]


def add_drift_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``edgefleet drift``."""
    drift = sub.add_parser("drift", help="drift profiles and offline drift checks (docs/drift.md)")
    dsub = drift.add_subparsers(dest="drift_command", metavar="VERB", required=True)
    prof = dsub.add_parser(
        "profile",
        help="build a drift reference profile (drift_reference.json) from data",
        description="The same profile edgefleet compress writes: 10 equal-frequency bins "
        "per feature (rank-1/2 inputs) or per channel (rank >= 3), with the counts.",
    )
    prof.add_argument("--data", type=Path, required=True, help="X.npz keyed by input name")
    prof.add_argument("--input", default=None, help="only this array of the .npz")
    prof.add_argument("--feature-names", default=None, help="comma-separated column names")
    prof.add_argument("--out", type=Path, required=True, help="where to write REF.json")
    prof.add_argument("--json", action="store_true", help="print one JSON object")
    prof.set_defaults(func=_profile)
    comp = dsub.add_parser(
        "compute",
        help="check a batch of data against a profile (PSI, JS, KS, chi-square, status)",
    )
    comp.add_argument("--reference", type=Path, required=True, help="drift_reference.json")
    comp.add_argument("--data", type=Path, required=True, help="X.npz keyed by input name")
    comp.add_argument("--input", default=None, help="read this array of the .npz as the input")
    comp.add_argument("--min-n", type=int, default=500, help="observations needed (500)")
    comp.add_argument("--json", action="store_true", help="print one JSON object")
    comp.set_defaults(func=_compute)
    from server.cli.remote import client_args

    rep = dsub.add_parser("report", help="the fleet's drift for a model version (from a server)")
    rep.add_argument("--model", required=True)
    rep.add_argument("--version", type=int, default=None, help="default: newest published")
    scope = rep.add_mutually_exclusive_group()
    scope.add_argument("--group", default=None)
    scope.add_argument("--device", default=None)
    rep.add_argument("--since", default=None, help="ISO time with a zone (window_end >= since)")
    rep.add_argument("--until", default=None, help="ISO time with a zone (window_end < until)")
    rep.add_argument("--min-n", type=int, default=None, help="observations needed (500)")
    client_args(rep)
    rep.set_defaults(func=_report)


def add_alerts_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``edgefleet alerts``."""
    from server.cli.remote import client_args

    alerts = sub.add_parser("alerts", help="drift alerts kept by the server (docs/drift.md)")
    asub = alerts.add_subparsers(dest="alerts_command", metavar="VERB", required=True)
    ls = asub.add_parser("ls", help="list drift alerts, most severe first")
    ls.add_argument("--model", default=None)
    ls.add_argument("--level", choices=("ok", "warn", "alarm", "insufficient"), default=None)
    ls.add_argument("--scope", default=None, help="fleet, group:NAME or device:ID")
    ls.add_argument("--limit", type=int, default=100)
    client_args(ls)
    ls.set_defaults(func=_alerts_ls)


def add_retrain_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``edgefleet retrain``."""
    from server.cli.remote import client_args

    rt = sub.add_parser("retrain", help="retraining policies and requests (docs/drift.md)")
    rsub = rt.add_subparsers(dest="retrain_command", metavar="VERB", required=True)
    ls = rsub.add_parser("ls", help="retraining requests, newest first")
    ls.add_argument("--model", default=None)
    ls.add_argument("--limit", type=int, default=100)
    client_args(ls)
    ls.set_defaults(func=_retrain_ls)
    show = rsub.add_parser("show", help="one request: reason, evidence, dataset, hook runs")
    show.add_argument("id")
    client_args(show)
    show.set_defaults(func=_retrain_show)
    pol = rsub.add_parser("policy", help="show, or set with any option, a model's policy")
    pol.add_argument("--model", required=True)
    pol.add_argument("--key-features", default=None, help="comma-separated feature names")
    pol.add_argument("--on-outputs", choices=("yes", "no"), default=None)
    pol.add_argument("--min-accuracy", type=float, default=None)
    pol.add_argument("--min-labels", type=int, default=None)
    pol.add_argument("--max-estimated-drop", type=float, default=None,
                     help="label-free: fire when the estimated accuracy drops by more")  # fmt: skip
    pol.add_argument("--min-estimate-n", type=int, default=None)
    pol.add_argument("--cooldown", type=float, default=None, help="seconds between requests")
    pol.add_argument("--enabled", choices=("yes", "no"), default=None)
    client_args(pol)
    pol.set_defaults(func=_retrain_policy)


def _retrain_ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    from server.cli.remote import _api

    def render(r: Mapping[str, Any]) -> None:
        table = Table(title="retraining requests", title_justify="left")
        for col in ("id", "model", "created", "status", "rows", "reason"):
            table.add_column(col)
        for q in r["requests"]:
            table.add_row(q["id"], f"{q['model']} v{q['version']}", q["created_at"],
                          q["status"], str(q["dataset"]["rows"]), q["reason"])  # fmt: skip
        console.print(table)

    def call(client: Any) -> int:
        emit(client.retrain_requests(model=args.model, limit=args.limit), args.json, render)
        return 0

    return int(_api(args, call))


def _retrain_show(args: argparse.Namespace) -> int:
    from edgefleet.console import kv_table
    from server.cli.remote import _api

    def render(r: Mapping[str, Any]) -> None:
        console.print(kv_table(f"retraining request {r['id']}", {
            "model": f"{r['model']} v{r['version']}", "status": r["status"],
            "reason": r["reason"], "window": f"{r['window']['start']} .. {r['window']['end']}",
            "dataset": f"{r['dataset']['path']} ({r['dataset']['rows']} rows, "
                       f"{r['dataset']['labelled_rows']} labelled)",
            "hook runs": len(r["hook"].get("attempts", [])),
        }))  # fmt: skip

    def call(client: Any) -> int:
        emit(client.retrain_request(args.id), args.json, render)
        return 0

    return int(_api(args, call))


def _retrain_policy(args: argparse.Namespace) -> int:
    from edgefleet.console import kv_table
    from server.cli.remote import _api

    changes: dict[str, Any] = {}
    if args.key_features is not None:
        changes["key_features"] = [f for f in args.key_features.split(",") if f]
    for key, value in (("min_accuracy", args.min_accuracy), ("min_labels", args.min_labels),
                       ("cooldown_s", args.cooldown),
                       ("max_estimated_drop", args.max_estimated_drop),
                       ("min_estimate_n", args.min_estimate_n)):  # fmt: skip
        if value is not None:
            changes[key] = value
    for key, value in (("on_outputs", args.on_outputs), ("enabled", args.enabled)):
        if value is not None:
            changes[key] = value == "yes"

    def call(client: Any) -> int:
        if changes:
            from server.client import ApiError

            try:
                current = client.retrain_policy(args.model)
            except ApiError as exc:  # no policy yet: start from the defaults
                if exc.status != 404:
                    raise
                current = {}
            result = client.set_retrain_policy(args.model, {**current, **changes})
        else:
            result = client.retrain_policy(args.model)
        emit(result, args.json, lambda r: console.print(kv_table(f"{args.model} policy", r)))
        return 0

    return int(_api(args, call))


def _audit_feedback(args: argparse.Namespace) -> int:
    from rich.table import Table

    from server.cli.remote import _api

    def render(r: Mapping[str, Any]) -> None:
        console.print(
            f"{r['model']} v{r['version']}: {r['labels']} labels for {r['predictions']} "
            f"predictions (coverage {r['coverage']}, max/min by class {r['coverage_ratio']})"
        )
        table = Table(title="by predicted class", title_justify="left")
        for col in ("class", "predictions", "labels", "coverage", "accuracy", "labelled share"):
            table.add_column(col)
        for c in r["classes"]:
            table.add_row(*(str(c[k]) for k in ("class", "predictions", "labels", "coverage",
                                                 "accuracy", "labelled_share")))  # fmt: skip
        console.print(table)
        delay, holdout, samples = r["label_delay"], r["exploration_holdout"], r["samples"]
        console.print(
            f"label delay: p50 {delay['p50_s']} s, p90 {delay['p90_s']} s "
            f"({delay['labels_with_times']} labels with times)"
        )
        console.print(
            f"accuracy on the exploration holdout {holdout['exploration']['accuracy']} "
            f"({holdout['exploration']['labelled']} labels) vs model-selected labels "
            f"{holdout['model_selected']['accuracy']} ({holdout['model_selected']['labelled']}); "
            f"gap {holdout['accuracy_gap']}"
        )
        console.print(
            f"samples: {samples['rows']} with an inclusion probability, effective sample "
            f"size {samples['effective_sample_size']}"
        )

    def call(client: Any) -> int:
        emit(client.feedback_audit(args.model, version=args.version), args.json, render)
        return 0

    return int(_api(args, call))


def _alerts_ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    from server.cli.remote import _api

    def render(r: Mapping[str, Any]) -> None:
        table = Table(title=f"drift alerts ({len(r['alerts'])} of {r['total']})",
                      title_justify="left")  # fmt: skip
        for col in ("id", "model", "scope", "subject", "level", "psi", "since", "note"):
            table.add_column(col)
        for a in r["alerts"]:
            table.add_row(
                str(a["id"]), f"{a['model']} v{a['version']}", a["scope"], a["subject"],
                a["level"], "-" if a["last_psi"] is None else f"{a['last_psi']:.3f}",
                a["since"] or "-", "under a fleet alert" if a["suppressed"] else "",
            )  # fmt: skip
        console.print(table)

    def call(client: Any) -> int:
        r = client.drift_alerts(
            model=args.model, level=args.level, scope=args.scope, limit=args.limit
        )
        emit(r, args.json, render)
        return 0

    return int(_api(args, call))


def _arrays(path: Path, only: str | None) -> dict[str, Any]:
    from compression.data import load_npz

    arrays = load_npz(path, "DATA")
    if only is None:
        return arrays
    if only not in arrays:
        from compression.errors import DataError

        raise DataError(f"DATA file {path} has no array {only!r} (it has {sorted(arrays)})")
    return {only: arrays[only]}


def _profile(args: argparse.Namespace) -> int:
    from compression.errors import CompressionError
    from compression.profiles import drift_reference
    from edgefleet.fsutil import atomic_write_bytes

    try:
        arrays = _arrays(args.data, args.input)
        names = args.feature_names.split(",") if args.feature_names else None
        profile = drift_reference(arrays, names)
    except (CompressionError, ValueError) as exc:
        return emit_error(type(exc).__name__, 1, str(exc), args.json)
    try:
        atomic_write_bytes(args.out, json.dumps(profile, indent=1).encode())
    except OSError as exc:
        return emit_error("OSError", 1, f"cannot write {args.out}: {exc}", args.json)
    result = {
        "ok": True,
        "out": str(args.out),
        "bins": profile["bins"],
        "features": len(profile["features"]),
        "channels": len(profile["channels"]),
    }
    emit(result, args.json, lambda r: console.print(
        f"wrote {r['out']}: {r['features']} feature(s), {r['channels']} channel(s), "
        f"{r['bins']} bins"))  # fmt: skip
    return 0


def _compute(args: argparse.Namespace) -> int:
    from compression.errors import CompressionError
    from edgefleet.errors import EdgefleetError
    from edgefleet.manifest import validate_drift_reference
    from server.analysis.batch import batch_drift
    from server.analysis.verdict import Thresholds

    try:
        text = args.reference.read_text()
    except OSError as exc:
        return emit_error("OSError", 1, f"cannot read {args.reference}: {exc}", args.json)
    try:
        profile = validate_drift_reference(json.loads(text))
        if profile is None:
            raise ValueError(f"{args.reference} holds no profile (null)")
        arrays = _arrays(args.data, None)
        if args.input is not None:
            if args.input not in arrays:
                raise ValueError(f"{args.data} has no array {args.input!r}")
            wanted = {str(f["input"]) for f in profile.get("features", [])} | {
                str(c["input"]) for c in profile.get("channels", [])
            }
            arrays = {name: arrays[args.input] for name in wanted}
        result = batch_drift(profile, arrays, Thresholds(min_n=args.min_n))
    except (CompressionError, EdgefleetError, ValueError) as exc:
        return emit_error(type(exc).__name__, 1, str(exc), args.json)
    emit(result, args.json, _render)
    return 0


def _report(args: argparse.Namespace) -> int:
    from server.cli.remote import _api

    def call(client: Any) -> int:
        r = client.drift_report(
            args.model,
            version=args.version,
            group=args.group,
            device_id=args.device,
            since=args.since,
            until=args.until,
            min_n=args.min_n,
        )
        emit(r, args.json, _render_report)
        return 0

    return int(_api(args, call))


def _render_report(r: Mapping[str, Any]) -> None:
    console.print(
        f"{r['model']} v{r['version']} ({r['scope']}): [bold]{r['status']}[/] "
        f"from {r['records']} record(s)"
    )
    _render({"features": r["features"], "channels": [], "dataset_drift": r["status"] == "alarm"})
    for device, d in sorted(r["devices"].items()):
        flagged = [f["name"] for f in d["features"] if f["status"] in ("warn", "alarm")]
        if flagged or d["outliers"]:
            console.print(
                f"  {device}: {d['status']}; drifting {', '.join(flagged) or '-'}; "
                f"unlike the fleet {', '.join(d['outliers']) or '-'}"
            )


def _render(r: Mapping[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="drift", title_justify="left")
    for col in ("feature", "n", "psi", "js", "ks", "chi2 p", "warn at", "status"):
        table.add_column(col)
    for v in [*r["features"], *r["channels"]]:
        table.add_row(
            v["name"], str(v["n"]),
            *("-" if v[k] is None else f"{v[k]:.4g}" for k in ("psi", "js", "ks", "chi2_p")),
            f"{v['warn_at']:.3f}", v["status"],
        )  # fmt: skip
    console.print(table)
    console.print(f"dataset drift: {'yes' if r['dataset_drift'] else 'no'}")
