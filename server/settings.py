"""Server configuration: environment variables, an optional TOML file, and checks.

Flow: ``load_settings(config_file)`` merges, highest priority first, keyword
overrides, ``EDGEFLEET_*`` environment variables and the TOML file named by
``config_file`` or ``EDGEFLEET_CONFIG`` into one validated, frozen ``Settings``.
``prepare_demo`` fills in generated secrets (keys, MQTT password, broker files)
under ``data_dir`` when ``env`` is ``demo``; ``check_production`` refuses a
production start that lacks a secret or would rely on a default one.

Invariants: no field holds a working secret by default. Outside ``demo`` the
server starts only with a trust root on disk, an MQTT password whenever an MQTT
URL is set, and (checked later, against the database) at least one admin token.
Every bound has its unit in the field description.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgefleet.errors import ConfigError
from edgefleet.ids import ID_PATTERN

__all__ = [
    "ConfigError",
    "Settings",
    "check_production",
    "load_settings",
    "prepare_demo",
]

CONFIG_ENV = "EDGEFLEET_CONFIG"
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "edgefleet_config_file", default=None
)


class Settings(BaseSettings):
    """Everything a server replica needs; identical on every replica."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid", frozen=True)

    env: Literal["production", "demo"] = Field(
        "production", description="'demo' auto-creates keys, tokens and broker secrets"
    )
    data_dir: Path = Field(Path("edgefleet-data"), description="base for the defaults below")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/edgefleet.db (WAL)"
    )
    storage_dir: Path | None = Field(
        None, description="bundles and uploads, shared by replicas; default <data_dir>/storage"
    )
    trust_root: Path | None = Field(None, description="trust-root.json devices pin")
    release_key: Path | None = Field(
        None, description="online release key (PEM); absent: offline signing only"
    )
    mqtt_url: str | None = Field(
        None, description="mqtt://host:port of the broker listener the replicas use"
    )
    device_mqtt_url: str | None = Field(
        None,
        description="mqtt(s)://host:port devices are told at enrollment; default mqtt_url",
    )
    mqtt_username: str = Field("edgefleet-server", description="the replicas' broker username")
    mqtt_password: SecretStr | None = Field(None, description="the replicas' broker password")
    mosquitto_password_file: Path | None = Field(None, description="password_file to rewrite")
    mosquitto_acl_file: Path | None = Field(None, description="acl_file to rewrite")
    mosquitto_server_password_file: Path | None = Field(
        None,
        description=(
            "password_file of the replicas' own listener (server logins only); "
            "default <mosquitto_password_file>-server"
        ),
    )
    mosquitto_pid_file: Path | None = Field(None, description="broker pid file (SIGHUP reload)")
    mosquitto_reload_command: list[str] | None = Field(
        None, description="argv run after rewriting broker files (instead of SIGHUP)"
    )
    host: str = Field("127.0.0.1", description="HTTP listen address")
    port: int = Field(8080, ge=1, le=65535, description="HTTP listen port")
    worker_enabled: bool = Field(True, description="run the build-job worker in this replica")
    worker_poll_seconds: float = Field(2.0, ge=0.05, le=60.0, description="seconds")
    job_lease_seconds: int = Field(
        120, ge=5, le=86400, description="seconds a job stays claimed without a heartbeat"
    )
    job_max_attempts: int = Field(3, ge=1, le=20, description="claims before a job fails")
    auth_failure_limit: int = Field(
        20, ge=1, le=10_000, description="failed token checks per client IP per window"
    )
    auth_failure_window_seconds: int = Field(300, ge=1, le=86400, description="seconds")
    max_upload_bytes: int = Field(
        1 << 30, ge=1 << 10, le=1 << 40, description="bytes per uploaded file"
    )
    max_json_body_bytes: int = Field(
        1 << 20, ge=1 << 10, le=1 << 30, description="bytes of a JSON request body"
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        description=(
            "proxy addresses whose X-Forwarded-For/-Proto are trusted (uvicorn's "
            "forwarded_allow_ips); empty: forwarded headers are ignored"
        ),
    )
    telemetry_retention_days: int = Field(90, ge=1, le=36500, description="days kept")
    rollout_interval_seconds: float = Field(
        5.0, ge=0.1, le=3600.0, description="seconds between rollout reconcile passes"
    )
    drift_interval_seconds: float = Field(
        300.0, ge=1.0, le=86400.0, description="seconds between drift evaluations (docs/drift.md)"
    )
    drift_min_n: int = Field(500, ge=1, le=10_000_000, description="observations per judged window")
    drift_psi_warn: float = Field(0.10, gt=0.0, le=10.0, description="PSI worth a warning")
    drift_psi_alarm: float = Field(0.25, gt=0.0, le=10.0, description="PSI that alarms")
    retrain_hook: list[str] | None = Field(
        None,
        max_length=64,
        description="command run for each retraining request (argv; the request's dataset "
        "manifest path is appended); none: requests are only recorded and exported",
    )
    retrain_hook_timeout_seconds: float = Field(600.0, ge=1.0, le=86400.0, description="seconds")
    retrain_hook_attempts: int = Field(3, ge=1, le=10, description="runs before giving up")
    retrain_window_hours: float = Field(
        24.0, ge=0.1, le=8760.0, description="telemetry exported and scored per request"
    )
    retrain_policies: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        max_length=1000,
        description="model name -> retraining policy (the API's fields, docs/drift.md); "
        "a policy set through the API takes precedence for its model",
    )
    bundle_expires_days: int = Field(90, ge=1, le=3650, description="default bundle lifetime")
    metrics_public: bool = Field(False, description="serve /metrics without a token")
    director_keys: list[Path] = Field(
        default_factory=list,
        description="director private keys (PEM) that sign desired states; none: no deployments",
    )
    desired_expires_days: int = Field(
        7, ge=1, le=365, description="days a signed desired state stays valid"
    )
    desired_reissue_hours: int = Field(
        48, ge=1, le=8760, description="re-sign a desired state this many hours before it expires"
    )
    desired_poll_seconds: float = Field(
        1.0, ge=0.05, le=60.0, description="seconds between checks for unpublished desired states"
    )
    desired_republish_seconds: float = Field(
        300.0, ge=1.0, le=86400.0, description="seconds between re-publishing every desired state"
    )
    mqtt_enabled: bool = Field(
        True, description="run the MQTT service (ingest, chunks, desired state) in 'server run'"
    )
    mqtt_client_id: str | None = Field(
        None,
        description=(
            "this replica's stable MQTT client id (session), starting '<mqtt_username>-'; "
            "default <mqtt_username>-<host>-<secret>"
        ),
    )
    mqtt_ca_file: Path | None = Field(None, description="CA bundle for mqtts:// brokers")
    mqtt_session_expiry_seconds: int = Field(
        86400, ge=0, le=0xFFFFFFFF, description="seconds the broker keeps a replica's session"
    )
    mqtt_receive_maximum: int = Field(
        1000, ge=1, le=65535, description="unacknowledged QoS 1 messages the broker may send us"
    )
    mqtt_share_group: str = Field(
        "edgefleet",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$",
        description="prefix of the $share groups (<prefix>-ingest, <prefix>-chunks)",
    )
    telemetry_subscription: Literal["shared", "exclusive"] = Field(
        "exclusive",
        description=(
            "exclusive: every replica gets all telemetry on its own persistent session "
            "(safe across broker restarts); shared: $share load-splitting"
        ),
    )
    ingest_batch_max: int = Field(
        500, ge=1, le=10_000, description="telemetry records per database transaction"
    )
    ingest_batch_seconds: float = Field(
        0.2, ge=0.001, le=60.0, description="longest wait, seconds, before a partial batch commits"
    )
    chunk_rate_bytes_per_second: int = Field(
        0, ge=0, le=1 << 40, description="chunk bytes per second per device (0: unlimited)"
    )
    chunk_max_pending_blocks: int = Field(
        4096, ge=1, le=1 << 20, description="blocks queued per device before requests are dropped"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("mqtt_username")
    @classmethod
    def _safe_username(cls, value: str) -> str:
        from edgefleet.topics import TopicError, validate_device_id

        try:
            validate_device_id(value)
        except TopicError as exc:
            raise ValueError(f"mqtt_username: {exc}") from exc
        return value

    @field_validator("mqtt_client_id")
    @classmethod
    def _safe_client_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(ID_PATTERN, value):
            raise ValueError("mqtt_client_id: use 1-128 ASCII letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _client_id_in_server_namespace(self) -> Settings:
        # Device ids under '<mqtt_username>-' are refused at enrollment, so a
        # replica's client id in that namespace can never be a device's.
        prefix = f"{self.mqtt_username}-"
        if self.mqtt_client_id is not None and not self.mqtt_client_id.startswith(prefix):
            raise ValueError(f"mqtt_client_id must start with {prefix!r} (the server's namespace)")
        return self

    @model_validator(mode="after")
    def _drift_thresholds_ordered(self) -> Settings:
        if self.drift_psi_warn > self.drift_psi_alarm:
            raise ValueError(
                f"drift_psi_warn={self.drift_psi_warn} must not exceed "
                f"drift_psi_alarm={self.drift_psi_alarm}"
            )
        return self

    @field_validator("retrain_policies")
    @classmethod
    def _valid_policies(cls, value: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        from server.analysis.retrain import Policy

        known = set(Policy().to_dict())
        for model, policy in value.items():
            unknown = set(policy) - known
            if unknown:
                raise ValueError(f"retrain_policies.{model}: unknown fields {sorted(unknown)}")
            try:
                Policy.from_dict(policy)
            except (ConfigError, TypeError, ValueError) as exc:
                raise ValueError(f"retrain_policies.{model}: {exc}") from exc
        return value

    @field_validator("mqtt_url", "device_mqtt_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("mqtt_url must look like mqtt://host[:port] or mqtts://host[:port]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"mqtt_url: {exc}") from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("database_url must be a sqlite:// or postgresql:// URL")
        return value

    # ---------------------------------------------------------------- derived

    @property
    def is_demo(self) -> bool:
        return self.env == "demo"

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the default SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"

    @property
    def broker_secret(self) -> str:
        """16 hex digits only the replicas can compute (HMAC of their broker password).

        Names a device must not guess (the share groups, the default client
        id) carry it; empty when no broker password is set.
        """
        if self.mqtt_password is None:
            return ""
        key = self.mqtt_password.get_secret_value().encode("utf-8")
        return hmac.new(key, b"edgefleet broker names v1", hashlib.sha256).hexdigest()[:16]

    def _secret_suffix(self) -> str:
        return f"-{self.broker_secret}" if self.broker_secret else ""

    @property
    def effective_mqtt_client_id(self) -> str:
        """The configured client id, or ``<mqtt_username>-<host>-<secret>`` (stable per host)."""
        if self.mqtt_client_id:
            return self.mqtt_client_id
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
        return f"{self.mqtt_username}-{host}{self._secret_suffix()}"[:128]

    @property
    def chunk_share_group(self) -> str:
        """The replicas' ``$share`` group for chunk requests (not guessable by a device)."""
        return f"{self.mqtt_share_group}-chunks{self._secret_suffix()}"

    @property
    def ingest_share_group(self) -> str:
        """The replicas' ``$share`` group for telemetry in ``shared`` mode."""
        return f"{self.mqtt_share_group}-ingest{self._secret_suffix()}"

    @property
    def effective_device_mqtt_url(self) -> str | None:
        """The broker URL devices connect to (``device_mqtt_url``, else ``mqtt_url``)."""
        return self.device_mqtt_url or self.mqtt_url

    @property
    def effective_mosquitto_server_password_file(self) -> Path | None:
        """The server listener's password file (replica logins only), when files are managed."""
        if self.mosquitto_server_password_file is not None:
            return self.mosquitto_server_password_file
        if self.mosquitto_password_file is None:
            return None
        return self.mosquitto_password_file.with_name(self.mosquitto_password_file.name + "-server")

    def is_reserved_device_id(self, device_id: str) -> bool:
        """True for the replicas' namespace: ``<mqtt_username>`` and ``<mqtt_username>-*``."""
        return device_id == self.mqtt_username or device_id.startswith(f"{self.mqtt_username}-")

    @property
    def mqtt_address(self) -> tuple[str, int, bool]:
        """``(host, port, tls)`` of ``mqtt_url``.

        Raises:
            ConfigError: no broker URL is configured.
        """
        if not self.mqtt_url:
            raise ConfigError("no broker configured (EDGEFLEET_MQTT_URL)")
        parts = urlsplit(self.mqtt_url)
        tls = parts.scheme == "mqtts"
        return str(parts.hostname), parts.port or (8883 if tls else 1883), tls

    @property
    def effective_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

    @property
    def bundles_dir(self) -> Path:
        return self.effective_storage_dir / "bundles"

    @property
    def uploads_dir(self) -> Path:
        return self.effective_storage_dir / "uploads"


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read settings from overrides, the environment and a TOML file.

    Args:
        config_file: TOML file (keys are the field names); default: the file
            named by ``EDGEFLEET_CONFIG``, if set.
        **overrides: field values that win over everything else.

    Raises:
        ConfigError: the TOML file is missing, or a value is invalid (the
            message names the field).
    """
    import os

    from pydantic import ValidationError

    path = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
    finally:
        _CONFIG_FILE.reset(token)


def prepare_demo(settings: Settings) -> Settings:
    """Create the demo's keys, MQTT password and broker file paths under ``data_dir``.

    Existing files are reused, so restarting a demo keeps its keys and devices.
    Returns settings with the generated paths and secrets filled in.

    Raises:
        ConfigError: called outside demo mode.
    """
    if not settings.is_demo:
        raise ConfigError("prepare_demo is only for EDGEFLEET_ENV=demo")
    from edgefleet.fsutil import atomic_write_bytes
    from edgefleet.keystore import KeyStore

    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(data / "keys")
    if not keys.trust_root_path.exists():
        keys.init()
    release = sorted((data / "keys").glob("release-*.key"))
    director = sorted((data / "keys").glob("director-*.key"))
    password_path = data / "mqtt-password"
    if not password_path.exists():
        atomic_write_bytes(password_path, secrets.token_urlsafe(24).encode(), mode=0o600)
    update: dict[str, object] = {
        "mqtt_url": settings.mqtt_url or "mqtt://127.0.0.1:1883",
        "trust_root": settings.trust_root or keys.trust_root_path,
        "release_key": settings.release_key or (release[0] if release else None),
        "mqtt_password": settings.mqtt_password or SecretStr(password_path.read_text().strip()),
        "mosquitto_password_file": settings.mosquitto_password_file
        or data / "mosquitto" / "passwd",
        "mosquitto_acl_file": settings.mosquitto_acl_file or data / "mosquitto" / "acl",
        "director_keys": settings.director_keys or director,
    }
    return settings.model_copy(update=update)


def check_production(settings: Settings) -> None:
    """Refuse settings that would run production on missing or default secrets.

    Raises:
        ConfigError: naming every missing item and how to provide it.
    """
    if settings.is_demo:
        return
    problems = []
    if settings.trust_root is None:
        problems.append(
            "EDGEFLEET_TRUST_ROOT is not set (create keys with 'edgefleet keys init --dir KEYS' "
            "and point it at KEYS/trust-root.json)"
        )
    elif not settings.trust_root.is_file():
        problems.append(f"trust root {settings.trust_root} does not exist")
    if settings.release_key is not None and not settings.release_key.is_file():
        problems.append(f"release key {settings.release_key} does not exist")
    for key in settings.director_keys:
        if not key.is_file():
            problems.append(f"director key {key} does not exist")
    if settings.mqtt_url and settings.mqtt_password is None:
        problems.append("EDGEFLEET_MQTT_URL is set but EDGEFLEET_MQTT_PASSWORD is not")
    if (settings.mosquitto_password_file is None) != (settings.mosquitto_acl_file is None):
        problems.append(
            "set both EDGEFLEET_MOSQUITTO_PASSWORD_FILE and EDGEFLEET_MOSQUITTO_ACL_FILE, "
            "or neither"
        )
    if settings.mosquitto_password_file is not None and settings.mqtt_password is None:
        problems.append(
            "broker files are managed but EDGEFLEET_MQTT_PASSWORD (the server's own broker "
            "password) is not set"
        )
    if problems:
        raise ConfigError(
            "refusing to start outside demo mode (set EDGEFLEET_ENV=demo to try it out): "
            + "; ".join(problems)
        )
