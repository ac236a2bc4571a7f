"""Settings (env, TOML file, refusals outside demo) and schema creation/upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from server.api.app import create_app
from server.db import make_engine, upgrade_schema
from server.models import Base
from server.settings import ConfigError, check_production, load_settings, prepare_demo
from tests.server.conftest import Keys, make_settings


def test_migrations_match_models(engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_upgrade_is_idempotent_and_reports_head(engine) -> None:
    assert upgrade_schema(engine) == "0006"
    assert upgrade_schema(engine) == "0006"


def test_schema_created_on_start(tmp_path: Path, keys: Keys) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}", keys, env="demo")
    app = create_app(settings)
    tables = set(inspect(app.state.engine).get_table_names())
    assert {"devices", "telemetry", "audit_log", "model_versions", "alembic_version"} <= tables
    with app.state.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    app.state.engine.dispose()


def test_production_refuses_without_admin_token(tmp_path: Path, keys: Keys) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", keys)
    with pytest.raises(ConfigError, match="edgefleet server init"):
        create_app(settings)


def test_production_refuses_missing_secrets(tmp_path: Path, keys: Keys) -> None:
    base = make_settings(tmp_path, "sqlite:///x.db", keys)
    check_production(base)
    for update, needle in (
        ({"trust_root": None}, "EDGEFLEET_TRUST_ROOT"),
        ({"trust_root": tmp_path / "missing.json"}, "does not exist"),
        (
            {"mqtt_password": None, "mosquitto_password_file": None, "mosquitto_acl_file": None},
            "EDGEFLEET_MQTT_PASSWORD is not",
        ),
        ({"mosquitto_acl_file": None}, "set both"),
        ({"release_key": tmp_path / "nope.key"}, "release key"),
    ):
        with pytest.raises(ConfigError, match=needle) as info:
            check_production(base.model_copy(update=update))
        assert "EDGEFLEET_ENV=demo" in str(info.value)


def test_settings_from_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "edgefleet.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\njob_max_attempts = 5\n')
    monkeypatch.setenv("EDGEFLEET_PORT", "9100")
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(config))
    s = load_settings()
    assert (s.port, s.host, s.job_max_attempts) == (9100, "0.0.0.0", 5)  # env beats the file
    assert load_settings(port=9200).port == 9200
    assert s.effective_database_url.startswith("sqlite:///")


def test_settings_invalid_values_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(port=70000)
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(database_url="mysql://x")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("unknown_key = 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        load_settings(bad)


def test_demo_generates_keys_and_secrets(tmp_path: Path) -> None:
    s = prepare_demo(load_settings(env="demo", data_dir=tmp_path / "demo"))
    assert s.trust_root is not None and s.trust_root.is_file()
    assert s.release_key is not None and s.release_key.is_file()
    assert s.mqtt_password is not None and len(s.mqtt_password.get_secret_value()) >= 24
    check_production(s)
    again = prepare_demo(load_settings(env="demo", data_dir=tmp_path / "demo"))
    assert again.mqtt_password == s.mqtt_password and again.trust_root == s.trust_root
    with pytest.raises(ConfigError):
        prepare_demo(load_settings())


def test_postgres_url_is_normalized(pg_database: str) -> None:
    engine = make_engine(pg_database)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_migrations_run_from_any_directory(tmp_path: Path) -> None:
    """The Alembic scripts are package resources, not files next to the caller."""
    import subprocess
    import sys

    code = (
        "from server.db import make_engine, upgrade_schema;"
        f"print(upgrade_schema(make_engine('sqlite:///{tmp_path / 'x.db'}')))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0006"
