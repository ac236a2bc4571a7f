"""Operations verbs: ``edgefleet server run|mqtt|init|migrate|broker-config``.

Flow: each handler loads the server's settings (``--config`` file and
``EDGEFLEET_*`` environment, the demo defaults when asked) and acts on the
local database and files directly: ``init``/``migrate`` create or upgrade the
schema (``init`` also prints a new admin token), ``run`` serves the API with
the job worker and the MQTT service (``uvicorn_config``), ``mqtt`` runs only
the MQTT service, ``broker-config`` writes the Mosquitto configuration.

Invariants: no API token and no HTTP client here; FastAPI, SQLAlchemy and
uvicorn are imported inside the handlers, never at import time. Exit status:
0 success; 1 unusable settings, database or files (one error line, or one
JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error

__all__ = ["uvicorn_config"]


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
        from server.services.jobs import replica_id
        from server.workers.retention import retention_loop

        engine = make_engine(settings.effective_database_url)
        upgrade_schema(engine)
        sessions = session_factory(engine)
        service = MqttService(sessions, settings)
        # Once per deployment: this process competes with the others for the lease.
        retention = retention_loop(sessions, settings, replica_id())
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
    retention.start()
    console.print(
        f"mqtt service {service.connection.options.client_id} -> {settings.mqtt_url} "
        f"(telemetry: {settings.telemetry_subscription})"
    )
    try:
        stop.wait()
    finally:
        retention.stop()
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
