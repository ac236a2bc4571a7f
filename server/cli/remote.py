"""Remote verbs: ``edgefleet tokens|publish|models|jobs|devices|deploy|deployments|
telemetry|audit``, clients of the server's HTTP API.

Flow: each handler checks its local input (files, keys, flags), then runs
``call(client)`` through ``_api``, which opens one ``server.client.ApiClient``
(``--server URL`` or ``EDGEFLEET_SERVER``; ``--token`` or ``EDGEFLEET_TOKEN``)
and calls its typed methods (URLs are built in ``server.client``, not here).
The answer is printed with ``emit``: one JSON object with ``--json``, rich
tables otherwise.

Invariants: no database or settings access here. Exit status: 0 success;
1 the server refused the request (``ApiError``, with its HTTP status) or the
input is unusable; 2 a usage error ``argparse`` cannot express; 10
``audit verify`` found tampering; 30 the server is unreachable. httpx is
imported only inside the handlers (through ``server.client``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.console import console, emit, emit_error, kv_table

if TYPE_CHECKING:
    from server.client import ApiClient

__all__ = ["EXIT_TAMPERED", "client_args"]

EXIT_TAMPERED = 10


def client_args(p: argparse.ArgumentParser) -> None:
    """The flags every remote verb takes: ``--server``, ``--token``, ``--json``."""
    p.add_argument("--server", default=None, help="server URL (default: $EDGEFLEET_SERVER)")
    p.add_argument("--token", default=None, help="API token (default: $EDGEFLEET_TOKEN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _api(args: argparse.Namespace, call: Callable[[ApiClient], int]) -> int:
    """Run ``call(client)`` and turn API and transport errors into exit codes."""
    from edgefleet.errors import TransportError
    from server.client import ApiClient, ApiError

    try:
        with ApiClient(args.server, args.token) as client:
            return call(client)
    except ApiError as exc:
        return emit_error("ApiError", 1, exc.detail, args.json, status=exc.status)
    except TransportError as exc:
        return emit_error("TransportError", exc.code, str(exc), args.json)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


# ------------------------------------------------------------------- tokens


def _tokens_create(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.create_token(args.name, args.role)

        def render(x: Mapping[str, Any]) -> None:
            console.print(f"token [bold]{x['name']}[/] ({x['role']}), shown once:")
            console.print(x["token"])

        emit(r, args.json, render)
        return 0

    return _api(args, call)


def _tokens_ls(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        rows = client.list_tokens()
        emit(
            {"tokens": rows},
            args.json,
            lambda r: _table(
                "API tokens",
                ["id", "name", "role", "prefix", "created", "revoked"],
                [
                    [t["id"], t["name"], t["role"], t["prefix"], t["created_at"], t["revoked_at"]]
                    for t in r["tokens"]
                ],
            ),
        )
        return 0

    return _api(args, call)


def _tokens_revoke(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.revoke_token(args.token_id)
        emit(r, args.json, lambda x: console.print(f"revoked token {x['name']} ({x['id']})"))
        return 0

    return _api(args, call)


# ------------------------------------------------------------------- models


def _publish(args: argparse.Namespace) -> int:
    paths = (
        args.model, args.calib, args.eval_data, args.model_card, args.health_check,
        args.drift_reference,
    )  # fmt: skip
    for path in paths:
        if path is not None and not path.is_file():
            return emit_error("FileNotFoundError", 1, f"{path} does not exist", args.json)
    compress = args.calib is not None and not args.no_compress
    metadata: dict[str, Path | None] = {"health_check": None, "drift_reference": None}
    if compress:
        if args.health_check or args.drift_reference:
            return emit_error(
                "UsageError",
                2,
                "--health-check and --drift-reference apply without compression; "
                "a compression job makes its own",
                args.json,
            )
    else:  # what 'edgefleet compress' wrote beside the model, unless given explicitly
        for key, given in (
            ("health_check", args.health_check),
            ("drift_reference", args.drift_reference),
        ):
            beside = args.model.parent / f"{key}.json"
            found = beside if beside.is_file() and not args.no_metadata else None
            metadata[key] = given or found
    form: dict[str, str] = {"compress": "true" if compress else "false", "signing": args.signing}
    if args.version is not None:
        form["version"] = str(args.version)
    if args.max_drop is not None:
        form["max_drop"] = str(args.max_drop)
    if args.device_class:
        form["device_classes"] = ",".join(args.device_class)
    if args.arch:
        form["archs"] = ",".join(args.arch)
    if args.min_agent_version:
        form["min_agent_version"] = args.min_agent_version
    if args.expires_days:
        form["expires_days"] = str(args.expires_days)
    if args.description:
        form["description"] = args.description
    if args.model_card is not None:
        form["model_card"] = args.model_card.read_text()

    def call(client: ApiClient) -> int:
        result = client.submit(
            args.name,
            args.model,
            calib=args.calib if compress else None,
            eval_data=args.eval_data if compress else None,
            form=form,
            **metadata,
        )
        job = result["job"]
        result["attached"] = {k: str(p) for k, p in metadata.items() if p is not None}
        if args.wait:
            job = _wait_job(client, job["id"], args.timeout, show=not args.json)
            result["version"] = client.get_version(args.name, result["version"]["version"])
            result["job"] = job
        emit(result, args.json, _render_submit)
        return 0 if job["status"] != "failed" else 1

    return _api(args, call)


def _wait_job(client: ApiClient, job_id: str, timeout: float, *, show: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[msg]}"),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    ) as bar:
        task = bar.add_task("queued", total=1.0, msg="")
        while True:
            job = client.get_job(job_id)
            bar.update(
                task, completed=job["progress"], description=job["stage"], msg=job["message"][:60]
            )
            if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(0.5)


def _render_submit(r: Mapping[str, Any]) -> None:
    v, job = r["version"], r["job"]
    console.print(
        kv_table(
            f"{v['name']} version {v['version']}",
            {
                "status": v["status"],
                "job": f"{job['id']} ({job['status']}, {job['stage']})",
                "error": job.get("error") or v.get("error") or "",
                "bundle": (v["bundle"] or {}).get("sha256", ""),
                "attached": ", ".join(r.get("attached", {}).values()) or "-",
            },
        )
    )


def _models_ls(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        if args.name is None:
            r = client.list_models()
            emit(
                r,
                args.json,
                lambda x: _table(
                    "models",
                    ["name", "versions", "latest published", "created", "by"],
                    [
                        [
                            m["name"],
                            m["versions"],
                            m["latest_published"],
                            m["created_at"],
                            m["created_by"],
                        ]
                        for m in x["models"]
                    ],
                ),
            )
        else:
            r = client.get_model(args.name)
            emit(
                r,
                args.json,
                lambda x: _table(
                    f"{x['name']} versions",
                    ["version", "status", "created", "published"],
                    [
                        [v["version"], v["status"], v["created_at"], v["published_at"]]
                        for v in x["version_list"]
                    ],
                ),
            )
        return 0

    return _api(args, call)


def _render_version(v: Mapping[str, Any]) -> None:
    rows: dict[str, Any] = {
        "status": v["status"],
        "signing": v["signing"],
        "source": f"{v['source_filename']} ({v['source_format']}, "
        f"sha256 {v['source_sha256'][:16]})",
        "manifest sha256": v["manifest_sha256"] or "",
        "signed by": ", ".join(k[:12] for k in v["signatures"]["keyids"]) or "-",
        "threshold": v["signatures"]["threshold"],
        "bundle": json.dumps(v["bundle"]) if v["bundle"] else "-",
        "error": v["error"] or "",
    }
    report = v.get("report") or {}
    if report:
        rows["compression"] = (
            f"{report.get('config', {}).get('name')}: {report.get('metric_name')} "
            f"{report.get('metric_fp32')} -> {report.get('metric')}, "
            f"size x{report.get('size_ratio')}, wire x{report.get('wire_ratio')}"
        )
    console.print(kv_table(f"{v['name']} version {v['version']}", rows))
    console.print(kv_table("lineage", v["lineage"]))
    console.print(kv_table("model card", {k: json.dumps(x) for k, x in v["model_card"].items()}))


def _models_show(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        emit(
            client.get_version(args.name, args.version),
            args.json,
            _render_version,
        )
        return 0

    return _api(args, call)


def _models_sign(args: argparse.Namespace) -> int:
    import base64

    from edgefleet.keys import KeyFileError, load_signing_key

    try:
        key = load_signing_key(args.key)
    except KeyFileError as exc:
        return emit_error("KeyFileError", 1, str(exc), args.json)

    def call(client: ApiClient) -> int:
        manifest = client.manifest(args.name, args.version)
        sig = base64.b64encode(key.sign(manifest)).decode()
        r = client.add_signature(args.name, args.version, keyid=key.keyid, sig=sig)
        emit(r, args.json, _render_version)
        return 0

    return _api(args, call)


def _models_release(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.publish_version(args.name, args.version)
        emit(r, args.json, _render_version)
        return 0

    return _api(args, call)


def _jobs_show(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.get_job(args.job_id)
        emit(
            r,
            args.json,
            lambda x: console.print(
                kv_table(
                    f"job {x['id']}",
                    {
                        k: x[k]
                        for k in (
                            "status",
                            "stage",
                            "progress",
                            "message",
                            "error",
                            "attempts",
                            "model",
                            "version",
                            "created_at",
                            "finished_at",
                        )
                    },
                )
            ),
        )
        return 0

    return _api(args, call)


# ------------------------------------------------------------------ devices


def _render_device(d: Mapping[str, Any]) -> None:
    facts = d["facts"]
    console.print(
        kv_table(
            f"device {d['id']}",
            {
                "class": d["device_class"],
                "groups": ", ".join(d["groups"]),
                "tags": ", ".join(d["tags"]),
                "online": d["online"],
                "last seen": d["last_seen"],
                "model": f"{d['model']} v{d['model_version']}" if d["model"] else "-",
                "arch": facts["arch"],
                "RAM bytes": facts["ram_bytes"],
                "onnxruntime": facts["onnxruntime_version"],
                "agent": facts["agent_version"],
            },
        )
    )


def _devices_enroll(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.enroll_device(
            device_id=args.device_id,
            device_class=args.device_class,
            groups=args.group,
            tags=args.tag,
        )
        if args.out is not None:
            from edgefleet.fsutil import atomic_write_bytes

            atomic_write_bytes(args.out, json.dumps(r, indent=2).encode(), mode=0o600)

        def render(x: Mapping[str, Any]) -> None:
            _render_device(x["device"])
            console.print(
                kv_table(
                    "broker credentials (shown once)",
                    {
                        "url": x["mqtt_url"],
                        "username": x["mqtt_username"],
                        "password": x["mqtt_password"],
                        "broker reload": x["broker"]["detail"],
                    },
                )
            )

        emit(r, args.json, render)
        return 0

    return _api(args, call)


def _devices_ls(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.list_devices(
            limit=args.limit,
            group=args.group,
            tag=args.tag,
            device_class=args.device_class,
            online=args.online,
        )
        emit(
            r,
            args.json,
            lambda x: _table(
                f"devices ({x['total']})",
                [
                    "id",
                    "class",
                    "online",
                    "model",
                    "arch",
                    "onnxruntime",
                    "agent",
                    "groups",
                    "tags",
                ],
                [
                    [
                        d["id"],
                        d["device_class"],
                        "yes" if d["online"] else "no",
                        f"{d['model']} v{d['model_version']}" if d["model"] else "",
                        d["facts"]["arch"],
                        d["facts"]["onnxruntime_version"],
                        d["facts"]["agent_version"],
                        ",".join(d["groups"]),
                        ",".join(d["tags"]),
                    ]
                    for d in x["devices"]
                ],
            ),
        )
        return 0

    return _api(args, call)


def _devices_show(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        emit(client.get_device(args.device_id), args.json, _render_device)
        return 0

    return _api(args, call)


def _devices_rm(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.remove_device(args.device_id)
        emit(
            r,
            args.json,
            lambda x: console.print(f"removed device {x['id']}; broker: {x['broker']['detail']}"),
        )
        return 0

    return _api(args, call)


# ------------------------------------------------------------ deployments


def _render_deployment(d: Mapping[str, Any]) -> None:
    target = ", ".join(f"{k} {v}" for k, v in d["target"].items())
    shadow = d.get("shadow")
    console.print(
        kv_table(
            f"desired state v{d['version']} for {target}",
            {
                "action": d["action"],
                "model": f"{d['model']} v{d['model_version']}" if d["model"] else "(cleared)",
                "bundle": d["bundle_id"] or "",
                "shadow": f"{shadow['model']} v{shadow['version']}" if shadow else "-",
                "rollout": d["rollout_id"] or "-",
                "expires": d["expires"] or "-",
                "topic": d["topic"],
                "published": d["published_at"] or "not yet (the MQTT service publishes it)",
            },
        )
    )


def _deploy(args: argparse.Namespace) -> int:
    shadow: tuple[str, int] | None = None
    if args.shadow:
        name, _, version = args.shadow.rpartition(":")
        if not name or not version.isdigit():
            return emit_error("InvalidInput", 1, "--shadow must be MODEL:VERSION", args.json)
        shadow = (name, int(version))

    def call(client: ApiClient) -> int:
        r = client.deploy(
            args.model,
            args.version,
            device=args.device,
            group=args.group,
            shadow=shadow,
            rollout_id=args.rollout_id,
            expires_days=args.expires_days,
        )
        emit(r, args.json, _render_deployment)
        return 0

    return _api(args, call)


def _deployments_ls(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.list_deployments(limit=args.limit, device=args.device, group=args.group)
        emit(
            r,
            args.json,
            lambda x: _table(
                f"deployments ({x['total']})",
                ["target", "version", "action", "model", "shadow", "by", "published"],
                [
                    [
                        ", ".join(f"{k} {v}" for k, v in d["target"].items()),
                        d["version"],
                        d["action"],
                        f"{d['model']} v{d['model_version']}" if d["model"] else "",
                        f"{d['shadow']['model']} v{d['shadow']['version']}" if d["shadow"] else "",
                        d["created_by"],
                        d["published_at"] or "pending",
                    ]
                    for d in x["deployments"]
                ],
            ),
        )
        return 0

    return _api(args, call)


def _devices_desired(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.device_desired(args.device_id)

        def render(x: Mapping[str, Any]) -> None:
            if x["effective"] is None:
                console.print(f"device {x['device_id']} has no desired state")
            else:
                _render_deployment(x["effective"])

        emit(r, args.json, render)
        return 0

    return _api(args, call)


# -------------------------------------------------------------- telemetry


def _telemetry_show(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.telemetry(
            limit=args.limit,
            device_id=args.device,
            model=args.model,
            version=args.model_version,
            since=args.since,
            until=args.until,
        )
        emit(
            r,
            args.json,
            lambda x: _table(
                f"telemetry ({len(x['records'])} of {x['total']})",
                ["device", "seq", "window end", "model", "predictions", "errors"],
                [
                    [
                        t["device_id"],
                        t["seq"],
                        t["window_end"],
                        f"{t['model']} v{t['model_version']}" if t["model"] else "",
                        t["predictions"],
                        t["errors"],
                    ]
                    for t in x["records"]
                ],
            ),
        )
        return 0

    return _api(args, call)


# ------------------------------------------------------------------ audit


def _audit_verify(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.verify_audit()

        def render(x: Mapping[str, Any]) -> None:
            if x["ok"]:
                console.print(
                    f"[green]audit log intact[/]: {x['entries']} entries, head "
                    f"{x['head_seq']} {x['head_hash']}"
                )
            else:
                _table(
                    "audit log TAMPERED",
                    ["seq", "kind", "problem"],
                    [[p["seq"], p["kind"], p["message"]] for p in x["problems"]],
                )

        emit(r, args.json, render)
        return 0 if r["ok"] else EXIT_TAMPERED

    return _api(args, call)


def _audit_ls(args: argparse.Namespace) -> int:
    def call(client: ApiClient) -> int:
        r = client.list_audit(after=args.after, limit=args.limit)
        emit(
            r,
            args.json,
            lambda x: _table(
                f"audit log ({x['total']} entries)",
                ["seq", "at", "actor", "action", "target"],
                [[e["seq"], e["at"], e["actor"], e["action"], e["target"]] for e in x["entries"]],
            ),
        )
        return 0

    return _api(args, call)
