"""Fixtures for server tests: a real database (SQLite file or PostgreSQL), keys, an app.

``db_url`` is parametrized over ``sqlite`` (a fresh WAL file per test) and
``postgresql`` (one database created for the session on the local server and
dropped at the end; every test starts from empty tables). No mock database.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from server.db import make_engine, session_factory, upgrade_schema
from server.models import Base
from server.settings import Settings
from tests.mosquitto import Mosquitto, free_port

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import psycopg

    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    engine = make_engine(f"{base}/{name}")
    upgrade_schema(engine)
    engine.dispose()
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    url: str = request.getfixturevalue("pg_database")
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> Callable[[], Any]:
    return session_factory(engine)


@dataclass
class Keys:
    dir: Path
    trust_root: Path
    release: list[Path]
    root: list[Path]
    director: list[Path]


def make_keys(directory: Path, *, release_keys: int = 1, release_threshold: int = 1) -> Keys:
    from edgefleet.keystore import KeyStore

    store = KeyStore(directory)
    store.init(release_keys=release_keys, release_threshold=release_threshold)
    return Keys(
        directory,
        store.trust_root_path,
        sorted(directory.glob("release-*.key")),
        sorted(directory.glob("root-*.key")),
        sorted(directory.glob("director-*.key")),
    )


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def keys_2of2(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys2"), release_keys=2, release_threshold=2)


def make_settings(tmp: Path, db_url: str, keys: Keys, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "production",
        "data_dir": tmp / "data",
        "database_url": db_url,
        "trust_root": keys.trust_root,
        "release_key": keys.release[0],
        "mqtt_url": "mqtt://127.0.0.1:1883",
        "mqtt_password": "server-secret",
        "mosquitto_password_file": tmp / "broker" / "passwd",
        "mosquitto_acl_file": tmp / "broker" / "acl",
        "worker_enabled": False,
        "mqtt_enabled": False,
        "director_keys": keys.director,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, keys: Keys) -> Settings:
    return make_settings(tmp_path, db_url, keys)


ROLES = ("admin", "publisher", "operator", "viewer")


@dataclass
class Api:
    """A TestClient plus one token per role."""

    client: Any
    tokens: dict[str, str]
    settings: Settings
    sessions: Callable[[], Any]
    app: Any

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.get(path, headers=self.headers(role), **kw)

    def post(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.post(path, headers=self.headers(role), **kw)

    def patch(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.patch(path, headers=self.headers(role), **kw)

    def put(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.put(path, headers=self.headers(role), **kw)

    def delete(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.delete(path, headers=self.headers(role), **kw)


def bootstrap_tokens(sessions: Callable[[], Any]) -> dict[str, str]:
    from server.services import tokens

    out = {}
    with sessions() as session:
        for role in ROLES:
            _, plaintext = tokens.create_token(session, f"test-{role}", role, "test")
            out[role] = plaintext
        session.commit()
    return out


def make_api(settings: Settings, engine: Engine) -> Api:
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    sessions = session_factory(engine)
    tokens = bootstrap_tokens(sessions)
    app = create_app(settings, engine=engine)
    return Api(TestClient(app), tokens, settings, sessions, app)


@dataclass
class ManagedBroker:
    """A real Mosquitto on the configuration and files the server generates.

    ``broker.port`` is the device listener, ``server_port`` the replicas' own.
    """

    broker: Mosquitto
    server_port: int
    settings: Settings
    api: Api

    def close(self) -> None:
        self.broker.kill()


def managed_broker(
    tmp: Path, db_url: str, keys: Keys, engine: Engine, **overrides: Any
) -> ManagedBroker:
    """Settings with server-managed broker files, the app (which writes them), and the broker.

    The broker runs ``server.services.broker.mosquitto_conf`` for those
    settings: a device listener (device logins, client id = login) and a
    server listener (the replicas' login only), both on 127.0.0.1.
    """
    import getpass

    from server.services.broker import Listener, mosquitto_conf

    workdir = tmp / "mosquitto"
    device_port, server_port = free_port(), free_port()
    while server_port == device_port:
        server_port = free_port()
    values: dict[str, Any] = {
        "mqtt_url": f"mqtt://127.0.0.1:{server_port}",
        "device_mqtt_url": f"mqtt://127.0.0.1:{device_port}",
        "mqtt_password": "server-secret",
        "mosquitto_password_file": workdir / "passwd",
        "mosquitto_acl_file": workdir / "acl",
        "mosquitto_pid_file": workdir / "mosquitto.pid",
    }
    values.update(overrides)
    settings = make_settings(tmp, db_url, keys, **values)
    api = make_api(settings, engine)  # writes the three files (nothing to SIGHUP yet)
    conf = mosquitto_conf(
        settings,
        devices=[Listener("127.0.0.1", device_port)],
        server=Listener("127.0.0.1", server_port),
        persistence_dir=workdir,
        log_file=workdir / "mosquitto.log",
        run_as_user=getpass.getuser() if os.geteuid() == 0 else None,
    )
    mq = Mosquitto(workdir, port=device_port, config_text=conf)
    mq.start()
    return ManagedBroker(mq, server_port, settings, api)


@pytest.fixture
def api(settings: Settings, engine: Engine) -> Iterator[Api]:
    made = make_api(settings, engine)
    with made.client:
        yield made


# ------------------------------------------------------------------ models


def onnx_model(seed: int = 0, features: int = 4, classes: int = 3) -> bytes:
    """A tiny self-contained ONNX classifier (MatMul + Add), opset 17."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(features, classes)).astype("float32"), "W")
    b = numpy_helper.from_array(rng.normal(size=(classes,)).astype("float32"), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def npz(**arrays: Any) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def model_metadata(model: bytes, rows: int = 64) -> tuple[dict[str, Any], dict[str, Any]]:
    """``health_check`` and ``drift_reference`` for ``onnx_model()``, as ``compress`` makes them."""
    import numpy as np
    import onnxruntime as ort

    from compression.config import HealthCheckConfig
    from compression.profiles import drift_reference, health_check

    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 4)).astype("float32")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x[:4]})
    return (
        health_check({"x": x[:4]}, {"y": y}, 0.05, False, HealthCheckConfig()),
        drift_reference({"x": x}),
    )


def upload(
    api: Api,
    name: str,
    model: bytes,
    *,
    filename: str = "model.onnx",
    role: str = "publisher",
    files: dict[str, Any] | None = None,
    **form: Any,
) -> Any:
    parts: dict[str, Any] = {"model": (filename, model, "application/octet-stream")}
    parts.update(files or {})
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}
    return api.post(f"/api/v1/models/{name}/versions", role=role, files=parts, data=data)


def run_jobs(api: Api) -> int:
    from server.services.jobs import run_pending

    return run_pending(api.sessions, api.settings)
