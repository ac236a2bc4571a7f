"""``edgefleet`` verbs of the server: run it, bootstrap it, and talk to its API.

Registered through ``add_parser(subparsers)`` (see ``edgefleet.cli``). This
module imports only the standard library and ``edgefleet.console`` at import
time; FastAPI, SQLAlchemy and httpx are imported inside the handlers, so
``edgefleet --help`` stays fast and the agent's install never needs them.

Verbs:

* ``server run|mqtt|init|migrate``: operate a server from its settings
  (database access, no token): ``run`` serves the API with the job worker and
  the MQTT service, ``mqtt`` runs only the MQTT service (a separate worker),
  ``init`` creates the schema and prints a new admin token.
* ``tokens create|ls|revoke``, ``publish``, ``models ls|show|sign|release``,
  ``jobs show``, ``devices enroll|ls|show|rm|desired``, ``deploy``,
  ``deployments ls``, ``telemetry show``, ``audit verify|ls``: API clients
  (``--server URL`` or ``EDGEFLEET_SERVER``; ``--token`` or ``EDGEFLEET_TOKEN``).

Every verb has ``--json`` (one JSON object on stdout) and readable rich
output. Exit status: 0 success; 1 the server refused the request or the input
is unusable; 10 ``audit verify`` found tampering; 30 the server is unreachable.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error, kv_table, positive_int

__all__ = ["add_parser", "uvicorn_config"]

EXIT_TAMPERED = 10


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="server URL (default: $EDGEFLEET_SERVER)")
    p.add_argument("--token", default=None, help="API token (default: $EDGEFLEET_TOKEN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the server's verbs on the ``edgefleet`` command."""
    srv = sub.add_parser("server", help="run or bootstrap the edgefleet server")
    ssub = srv.add_subparsers(dest="server_command", metavar="VERB", required=True)
    run = ssub.add_parser("run", help="serve the REST API (uvicorn)")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")
    run.add_argument("--host", default=None, help="listen address (default: settings)")
    run.add_argument("--port", type=int, default=None, help="listen port (default: settings)")
    run.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="ADDRESSES",
        help=(
            "comma-separated proxy addresses or networks whose X-Forwarded-For/-Proto are "
            "trusted (default: forwarded_allow_ips; none: forwarded headers are ignored)"
        ),
    )
    run.set_defaults(func=_server_run)
    mq = ssub.add_parser(
        "mqtt", help="run only the MQTT service (ingest, chunks, desired state) as a worker"
    )
    mq.add_argument("--config", type=Path, default=None, help="TOML settings file")
    mq.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    mq.set_defaults(func=_server_mqtt)
    init = ssub.add_parser("init", help="create or upgrade the schema and print a new admin token")
    init.add_argument("--config", type=Path, default=None)
    init.add_argument("--name", default="admin", help="name of the new admin token")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=_server_init)
    mig = ssub.add_parser("migrate", help="create or upgrade the database schema")
    mig.add_argument("--config", type=Path, default=None)
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(func=_server_migrate)
    bc = ssub.add_parser(
        "broker-config",
        help="print the mosquitto.conf for the broker files this server manages",
        description=(
            "The Mosquitto configuration that goes with the server's password and ACL files: "
            "device listeners (device logins; the session is named after the login) and the "
            "replicas' own listener (server logins only). See docs/server.md."
        ),
    )
    bc.add_argument("--config", type=Path, default=None, help="TOML settings file")
    bc.add_argument(
        "--device-listener",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a device listener (repeatable; default: the host and port of device_mqtt_url)",
    )
    bc.add_argument(
        "--server-listener",
        default=None,
        metavar="HOST:PORT",
        help="the replicas' listener (default: the host and port of mqtt_url)",
    )
    bc.add_argument("--cafile", type=Path, default=None, help="TLS CA for the device listeners")
    bc.add_argument("--certfile", type=Path, default=None, help="TLS certificate (device side)")
    bc.add_argument("--keyfile", type=Path, default=None, help="TLS private key (device side)")
    bc.add_argument(
        "--persistence-dir", type=Path, required=True, help="Mosquitto's persistence_location"
    )
    bc.add_argument("--log-file", type=Path, default=None, help="log_dest file (default stderr)")
    bc.add_argument("--user", default=None, help="Mosquitto's 'user' option (run as this user)")
    bc.add_argument("--out", type=Path, default=None, help="write the file here (atomically)")
    bc.add_argument("--json", action="store_true", help="print one JSON object")
    bc.set_defaults(func=_server_broker_config)

    tok = sub.add_parser("tokens", help="API tokens (admin)")
    tsub = tok.add_subparsers(dest="tokens_command", metavar="VERB", required=True)
    tc = tsub.add_parser("create", help="create a token (printed once)")
    tc.add_argument("--name", required=True)
    tc.add_argument("--role", required=True, choices=["admin", "publisher", "operator", "viewer"])
    _client_args(tc)
    tc.set_defaults(func=_tokens_create)
    tl = tsub.add_parser("ls", help="list tokens")
    _client_args(tl)
    tl.set_defaults(func=_tokens_ls)
    tr = tsub.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("token_id")
    _client_args(tr)
    tr.set_defaults(func=_tokens_revoke)

    pub = sub.add_parser("publish", help="upload a model and build (compress, sign) its bundle")
    pub.add_argument("model", type=Path, help="*.onnx or *.pt2")
    pub.add_argument("--name", required=True, help="model name (lowercase, digits, ._-)")
    pub.add_argument("--version", type=positive_int, default=None, help="default: next")
    pub.add_argument("--calib", type=Path, default=None, help="CALIB .npz")
    pub.add_argument("--eval", dest="eval_data", type=Path, default=None, help="EVAL .npz")
    pub.add_argument(
        "--no-compress",
        action="store_true",
        help="bundle the ONNX model as is (default when no --calib is given); "
        "health_check.json and drift_reference.json beside the model (as 'edgefleet "
        "compress' writes them) go into the bundle",
    )
    pub.add_argument(
        "--health-check",
        type=Path,
        default=None,
        help="health_check.json to use instead of the one beside the model (no compression)",
    )
    pub.add_argument(
        "--drift-reference",
        type=Path,
        default=None,
        help="drift_reference.json to use instead of the one beside the model (no compression)",
    )
    pub.add_argument(
        "--no-metadata",
        action="store_true",
        help="attach no health_check.json / drift_reference.json found beside the model",
    )
    pub.add_argument("--max-drop", type=float, default=None, help="allowed metric drop (0.01)")
    pub.add_argument("--signing", choices=["online", "offline"], default="online")
    pub.add_argument("--device-class", action="append", default=[], help="repeatable")
    pub.add_argument("--arch", action="append", default=[], help="repeatable")
    pub.add_argument("--min-agent-version", default=None)
    pub.add_argument("--expires-days", type=positive_int, default=None)
    pub.add_argument("--description", default=None)
    pub.add_argument("--model-card", type=Path, default=None, help="JSON object file")
    pub.add_argument("--wait", action="store_true", help="wait for the build job to finish")
    pub.add_argument("--timeout", type=float, default=3600.0, help="seconds to --wait (3600)")
    _client_args(pub)
    pub.set_defaults(func=_publish)

    mod = sub.add_parser("models", help="the model registry")
    msub = mod.add_subparsers(dest="models_command", metavar="VERB", required=True)
    ml = msub.add_parser("ls", help="list models, or the versions of one model")
    ml.add_argument("name", nargs="?", default=None)
    _client_args(ml)
    ml.set_defaults(func=_models_ls)
    ms = msub.add_parser("show", help="one version: report, model card, lineage, bundle")
    ms.add_argument("name")
    ms.add_argument("version", type=positive_int)
    _client_args(ms)
    ms.set_defaults(func=_models_show)
    mg = msub.add_parser("sign", help="sign a version's manifest with a local release key")
    mg.add_argument("name")
    mg.add_argument("version", type=positive_int)
    mg.add_argument("--key", type=Path, required=True, help="release private key (PEM)")
    _client_args(mg)
    mg.set_defaults(func=_models_sign)
    mr = msub.add_parser("release", help="publish a version once enough signatures are in")
    mr.add_argument("name")
    mr.add_argument("version", type=positive_int)
    _client_args(mr)
    mr.set_defaults(func=_models_release)

    jobs = sub.add_parser("jobs", help="build jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="VERB", required=True)
    js = jsub.add_parser("show", help="one job's status and progress")
    js.add_argument("job_id")
    _client_args(js)
    js.set_defaults(func=_jobs_show)

    dev = sub.add_parser("devices", help="the fleet")
    dsub = dev.add_subparsers(dest="devices_command", metavar="VERB", required=True)
    de = dsub.add_parser("enroll", help="enroll a device; prints its broker credentials once")
    de.add_argument("--id", dest="device_id", default=None, help="default: generated")
    de.add_argument("--class", dest="device_class", required=True)
    de.add_argument("--group", action="append", default=[], help="repeatable")
    de.add_argument("--tag", action="append", default=[], help="repeatable")
    de.add_argument("--out", type=Path, default=None, help="also write the enrollment as JSON")
    _client_args(de)
    de.set_defaults(func=_devices_enroll)
    dl = dsub.add_parser("ls", help="list devices")
    dl.add_argument("--group", default=None)
    dl.add_argument("--tag", default=None)
    dl.add_argument("--class", dest="device_class", default=None)
    dl.add_argument("--online", action="store_true", help="only online devices")
    dl.add_argument("--limit", type=positive_int, default=100)
    _client_args(dl)
    dl.set_defaults(func=_devices_ls)
    ds = dsub.add_parser("show", help="one device")
    ds.add_argument("device_id")
    _client_args(ds)
    ds.set_defaults(func=_devices_show)
    dd = dsub.add_parser("desired", help="a device's desired state (own, groups, effective)")
    dd.add_argument("device_id")
    _client_args(dd)
    dd.set_defaults(func=_devices_desired)
    dr = dsub.add_parser("rm", help="decommission a device (revokes its broker login)")
    dr.add_argument("device_id")
    _client_args(dr)
    dr.set_defaults(func=_devices_rm)

    dep = sub.add_parser(
        "deploy", help="assign a published model version to a device or group (signed, retained)"
    )
    dep.add_argument("model", help="model name")
    dep.add_argument("version", type=positive_int, help="a published version")
    where = dep.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", default=None, help="target device id")
    where.add_argument("--group", default=None, help="target group")
    dep.add_argument("--shadow", default=None, metavar="MODEL:VERSION", help="shadow candidate")
    dep.add_argument("--rollout-id", default=None, help="label carried in the signed state")
    dep.add_argument("--expires-days", type=positive_int, default=None)
    _client_args(dep)
    dep.set_defaults(func=_deploy)
    deps = sub.add_parser("deployments", help="desired states issued")
    depsub = deps.add_subparsers(dest="deployments_command", metavar="VERB", required=True)
    dls = depsub.add_parser("ls", help="newest first")
    dls.add_argument("--device", default=None)
    dls.add_argument("--group", default=None)
    dls.add_argument("--limit", type=positive_int, default=50)
    _client_args(dls)
    dls.set_defaults(func=_deployments_ls)

    tel = sub.add_parser("telemetry", help="stored telemetry")
    tsub2 = tel.add_subparsers(dest="telemetry_command", metavar="VERB", required=True)
    tsh = tsub2.add_parser("show", help="records by device, model version and time window")
    tsh.add_argument("--device", default=None)
    tsh.add_argument("--model", default=None)
    tsh.add_argument("--model-version", type=positive_int, default=None)
    tsh.add_argument("--since", default=None, help="ISO time, e.g. 2025-01-01T00:00:00Z")
    tsh.add_argument("--until", default=None)
    tsh.add_argument("--limit", type=positive_int, default=50)
    _client_args(tsh)
    tsh.set_defaults(func=_telemetry_show)

    aud = sub.add_parser("audit", help="the hash-chained audit log (admin)")
    asub = aud.add_subparsers(dest="audit_command", metavar="VERB", required=True)
    av = asub.add_parser("verify", help="detect edited, deleted or reordered entries")
    _client_args(av)
    av.set_defaults(func=_audit_verify)
    al = asub.add_parser("ls", help="list entries")
    al.add_argument("--after", type=int, default=0)
    al.add_argument("--limit", type=positive_int, default=100)
    _client_args(al)
    al.set_defaults(func=_audit_ls)


# ------------------------------------------------------------------ helpers


def _api(args: argparse.Namespace, call: Callable[[Any], int]) -> int:
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


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from server.settings import load_settings, prepare_demo

    settings = load_settings(args.config, **overrides)
    return prepare_demo(settings) if settings.is_demo else settings


def _make_dirs(settings: Any) -> None:
    """Create ``data_dir`` and the SQLite file's directory (a fresh install has neither).

    Raises:
        ConfigError: a directory cannot be created (naming it and why).
    """
    from sqlalchemy.engine import make_url

    from server.settings import ConfigError

    dirs = [("data_dir", Path(settings.data_dir))]
    url = make_url(settings.effective_database_url)
    database = url.database or ""
    on_disk = database not in ("", ":memory:") and not database.startswith("file:")
    if url.get_backend_name() == "sqlite" and on_disk:
        dirs.append(("the SQLite database's directory", Path(database).parent))
    for what, path in dirs:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from None


def _database_error(settings: Any, exc: Exception) -> str:
    """What went wrong with the database, without its password."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"cannot use the database {url}: {reason[0] if reason else type(exc).__name__}"


# ------------------------------------------------------------------- server


def _server_run(args: argparse.Namespace) -> int:
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from server.settings import ConfigError

    settings = None
    try:
        overrides = {}
        if args.forwarded_allow_ips is not None:
            overrides["forwarded_allow_ips"] = [
                a.strip() for a in args.forwarded_allow_ips.split(",") if a.strip()
            ]
        settings = _settings(args, **overrides)
        _make_dirs(settings)
        token = _demo_admin(settings) if settings.is_demo else None
        from server.api.app import create_app

        app = create_app(settings)
    except ConfigError as exc:
        return emit_error("ConfigError", 1, str(exc), False)
    except SQLAlchemyError as exc:
        return emit_error("DatabaseError", 1, _database_error(settings, exc), False)
    if token:
        console.print(f"[bold]demo admin token[/] (also in {settings.data_dir / 'admin-token'}):")
        console.print(token)
    uvicorn.Server(uvicorn_config(app, settings, host=args.host, port=args.port)).run()
    return 0


def uvicorn_config(
    app: Any, settings: Any, *, host: str | None = None, port: int | None = None
) -> Any:
    """The ``uvicorn.Config`` that ``server run`` serves ``app`` with (tests start it too).

    ``X-Forwarded-For``/``-Proto`` are applied only from the proxies in
    ``settings.forwarded_allow_ips``; with none, uvicorn's proxy-header
    middleware is off. (uvicorn's own default trusts 127.0.0.1, so any local
    client could pick the address the failed-token limit counts against.)
    """
    import uvicorn

    trusted = list(settings.forwarded_allow_ips)
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=port or settings.port,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted,
    )


def _server_mqtt(args: argparse.Namespace) -> int:
    """Run the MQTT service alone until SIGTERM/SIGINT (schema upgraded first)."""
    import logging
    import signal
    import threading

    from server.db import make_engine, session_factory, upgrade_schema
    from server.settings import ConfigError, check_production

    try:
        settings = _settings(args)
        check_production(settings)
        if not settings.mqtt_url:
            raise ConfigError("server mqtt needs EDGEFLEET_MQTT_URL")
        from server.mqtt.service import MqttService

        engine = make_engine(settings.effective_database_url)
        upgrade_schema(engine)
        service = MqttService(session_factory(engine), settings, retention=True)
    except ConfigError as exc:
        return emit_error("ConfigError", 1, str(exc), False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.metrics_port:
        from prometheus_client import start_http_server

        from server.metrics import REGISTRY

        start_http_server(args.metrics_port, addr=settings.host, registry=REGISTRY)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    console.print(
        f"mqtt service {service.connection.options.client_id} -> {settings.mqtt_url} "
        f"(telemetry: {settings.telemetry_subscription})"
    )
    try:
        stop.wait()
    finally:
        service.stop()
        engine.dispose()
    return 0


def _demo_admin(settings: Any) -> str | None:
    """In demo mode, make sure an admin token exists; return it when created now."""
    from edgefleet.fsutil import atomic_write_bytes
    from server.db import make_engine, session_factory, upgrade_schema
    from server.services import tokens

    engine = make_engine(settings.effective_database_url)
    upgrade_schema(engine)
    try:
        with session_factory(engine)() as session:
            if tokens.has_admin(session):
                return None
            _, plaintext = tokens.create_token(session, "demo-admin", "admin", "cli:demo")
            session.commit()
    finally:
        engine.dispose()
    atomic_write_bytes(settings.data_dir / "admin-token", plaintext.encode() + b"\n", mode=0o600)
    return plaintext


def _server_init(args: argparse.Namespace) -> int:
    """Create ``data_dir`` and the schema, and an admin token; every failure is exit 1.

    With ``--json`` a failure is one error object (never a traceback).
    """
    import getpass

    from sqlalchemy.exc import SQLAlchemyError

    from server.db import make_engine, session_factory, upgrade_schema
    from server.errors import ServerError
    from server.services import tokens
    from server.settings import ConfigError

    settings = None
    try:
        settings = _settings(args)
        _make_dirs(settings)
        engine = make_engine(settings.effective_database_url)
        try:
            revision = upgrade_schema(engine)
            with session_factory(engine)() as session:
                row, plaintext = tokens.create_token(
                    session, args.name, "admin", f"cli:{getpass.getuser()}"
                )
                session.commit()
        finally:
            engine.dispose()
    except (ConfigError, ServerError) as exc:
        return emit_error(type(exc).__name__, 1, str(exc), args.json)
    except SQLAlchemyError as exc:
        return emit_error("DatabaseError", 1, _database_error(settings, exc), args.json)
    except Exception as exc:  # the promise of --json: one object, not a traceback
        return emit_error(type(exc).__name__, 1, str(exc) or repr(exc), args.json)
    result = {
        "ok": True,
        "schema_revision": revision,
        "token_id": row.id,
        "name": row.name,
        "role": "admin",
        "token": plaintext,
    }

    def render(r: Mapping[str, Any]) -> None:
        console.print(f"schema at revision {r['schema_revision']}")
        console.print(f"admin token [bold]{r['name']}[/] (shown once, store it safely):")
        console.print(r["token"])

    emit(result, args.json, render)
    return 0


def _server_migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from server.db import make_engine, upgrade_schema
    from server.settings import ConfigError

    settings = None
    try:
        settings = _settings(args)
        _make_dirs(settings)
        engine = make_engine(settings.effective_database_url)
        try:
            revision = upgrade_schema(engine)
        finally:
            engine.dispose()
    except ConfigError as exc:
        return emit_error("ConfigError", 1, str(exc), args.json)
    except SQLAlchemyError as exc:
        return emit_error("DatabaseError", 1, _database_error(settings, exc), args.json)
    emit(
        {"ok": True, "schema_revision": revision},
        args.json,
        lambda r: console.print(f"schema at revision {r['schema_revision']}"),
    )
    return 0


def _listener_address(text: str, what: str) -> tuple[str, int]:
    from server.settings import ConfigError

    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what} {text!r} must look like HOST:PORT")
    return host.strip("[]"), int(port)


def _url_address(url: str | None, what: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    from server.settings import ConfigError

    if not url:
        raise ConfigError(f"give --{what} HOST:PORT (no URL is configured for it)")
    parts = urlsplit(url)
    return str(parts.hostname), parts.port or (8883 if parts.scheme == "mqtts" else 1883)


def _server_broker_config(args: argparse.Namespace) -> int:
    from edgefleet.fsutil import atomic_write_bytes
    from server.services.broker import Listener, mosquitto_conf
    from server.settings import ConfigError

    try:
        settings = _settings(args)
        tls = {"cafile": args.cafile, "certfile": args.certfile, "keyfile": args.keyfile}
        if args.device_listener:
            addresses = [_listener_address(x, "--device-listener") for x in args.device_listener]
        else:
            addresses = [_url_address(settings.device_mqtt_url, "device-listener")]
        if args.server_listener:
            server_address = _listener_address(args.server_listener, "--server-listener")
        else:
            server_address = _url_address(settings.mqtt_url, "server-listener")
        try:
            devices = [Listener(host, port, **tls) for host, port in addresses]
            server = Listener(*server_address)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        text = mosquitto_conf(
            settings,
            devices=devices,
            server=server,
            persistence_dir=args.persistence_dir.resolve(),
            log_file=args.log_file.resolve() if args.log_file else None,
            run_as_user=args.user,
        )
        if args.out is not None:
            atomic_write_bytes(args.out, text.encode(), mode=0o640)
    except ConfigError as exc:
        return emit_error("ConfigError", 1, str(exc), args.json)
    except OSError as exc:
        return emit_error("OSError", 1, f"cannot write {args.out}: {exc}", args.json)
    result = {"ok": True, "path": str(args.out) if args.out else None, "config": text}
    if args.out is not None and not args.json:
        console.print(f"wrote {args.out}")
    else:
        emit(result, args.json, lambda r: print(r["config"], end=""))
    return 0


# ------------------------------------------------------------------- tokens


def _tokens_create(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        r = client.json("POST", "/tokens", json={"name": args.name, "role": args.role})

        def render(x: Mapping[str, Any]) -> None:
            console.print(f"token [bold]{x['name']}[/] ({x['role']}), shown once:")
            console.print(x["token"])

        emit(r, args.json, render)
        return 0

    return _api(args, call)


def _tokens_ls(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        rows = client.json("GET", "/tokens")
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
    def call(client: Any) -> int:
        r = client.json("DELETE", f"/tokens/{args.token_id}")
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

    def call(client: Any) -> int:
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
            result["version"] = client.json(
                "GET", f"/models/{args.name}/versions/{result['version']['version']}"
            )
            result["job"] = job
        emit(result, args.json, _render_submit)
        return 0 if job["status"] != "failed" else 1

    return _api(args, call)


def _wait_job(client: Any, job_id: str, timeout: float, *, show: bool) -> dict[str, Any]:
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
            job: dict[str, Any] = client.json("GET", f"/jobs/{job_id}")
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
    def call(client: Any) -> int:
        if args.name is None:
            r = client.json("GET", "/models")
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
            r = client.json("GET", f"/models/{args.name}")
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
    def call(client: Any) -> int:
        emit(
            client.json("GET", f"/models/{args.name}/versions/{args.version}"),
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

    def call(client: Any) -> int:
        manifest = client.request(
            "GET", f"/models/{args.name}/versions/{args.version}/manifest"
        ).content
        body = {"keyid": key.keyid, "sig": base64.b64encode(key.sign(manifest)).decode()}
        r = client.json(
            "POST", f"/models/{args.name}/versions/{args.version}/signatures", json=body
        )
        emit(r, args.json, _render_version)
        return 0

    return _api(args, call)


def _models_release(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        r = client.json("POST", f"/models/{args.name}/versions/{args.version}/publish")
        emit(r, args.json, _render_version)
        return 0

    return _api(args, call)


def _jobs_show(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        r = client.json("GET", f"/jobs/{args.job_id}")
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
    def call(client: Any) -> int:
        body = {
            "device_id": args.device_id,
            "device_class": args.device_class,
            "groups": args.group,
            "tags": args.tag,
        }
        r = client.json("POST", "/devices", json=body)
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
    def call(client: Any) -> int:
        params: dict[str, Any] = {"limit": args.limit}
        for key in ("group", "tag", "device_class"):
            if getattr(args, key):
                params[key] = getattr(args, key)
        if args.online:
            params["online"] = "true"
        r = client.json("GET", "/devices", params=params)
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
    def call(client: Any) -> int:
        emit(client.json("GET", f"/devices/{args.device_id}"), args.json, _render_device)
        return 0

    return _api(args, call)


def _devices_rm(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        r = client.json("DELETE", f"/devices/{args.device_id}")
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
    body: dict[str, Any] = {"model": args.model, "version": args.version}
    if args.shadow:
        name, _, version = args.shadow.rpartition(":")
        if not name or not version.isdigit():
            return emit_error("InvalidInput", 1, "--shadow must be MODEL:VERSION", args.json)
        body["shadow"] = {"model": name, "version": int(version)}
    if args.rollout_id:
        body["rollout_id"] = args.rollout_id
    if args.expires_days:
        body["expires_days"] = args.expires_days
    body["target"] = {"device": args.device} if args.device else {"group": args.group}

    def call(client: Any) -> int:
        r = client.json("POST", "/deployments", json=body)
        emit(r, args.json, _render_deployment)
        return 0

    return _api(args, call)


def _deployments_ls(args: argparse.Namespace) -> int:
    def call(client: Any) -> int:
        params: dict[str, Any] = {"limit": args.limit}
        if args.device:
            params["device"] = args.device
        if args.group:
            params["group"] = args.group
        r = client.json("GET", "/deployments", params=params)
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
    def call(client: Any) -> int:
        r = client.json("GET", f"/devices/{args.device_id}/desired")

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
    def call(client: Any) -> int:
        params: dict[str, Any] = {"limit": args.limit}
        for key, name in (
            ("device", "device_id"),
            ("model", "model"),
            ("model_version", "version"),
            ("since", "since"),
            ("until", "until"),
        ):
            if getattr(args, key) is not None:
                params[name] = getattr(args, key)
        r = client.json("GET", "/telemetry", params=params)
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
    def call(client: Any) -> int:
        r = client.json("GET", "/audit/verify")

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
    def call(client: Any) -> int:
        r = client.json("GET", "/audit", params={"after": args.after, "limit": args.limit})
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
