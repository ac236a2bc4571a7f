"""The daemon's configuration file (``agent.toml``): typed, bounded, strict.

Flow: ``load_config(path)`` reads TOML with ``tomllib``, refuses unknown
sections and keys (a typo must not silently fall back to a default), checks
every value's type and range, resolves relative paths against the file's
directory, and returns a frozen ``AgentConfig``. Helpers turn it into the
option objects of the parts it configures (``AgentOptions`` for the core,
``MqttOptions``, ``DownloadOptions``, ``TelemetryOptions``).

Example (every key but ``device.id``, ``device.state_dir`` and
``broker.host`` has the default shown)::

    [device]
    id = "pi-7"                    # MQTT client id and username; topic-safe
    class = "generic"              # matched against bundle targets
    state_dir = "/var/lib/edgefleet"
    groups = []                    # group desired-state topics, highest priority first
    trust_root = ""                # trust-root.json pinned on first start ("" = already pinned)

    [broker]
    host = "broker.example.net"    # or url = "mqtts://broker.example.net:8883"
    port = 1883                    # 8883 is usual with TLS
    tls = false
    ca_file = ""                   # "" = system trust store
    cert_file = ""                 # client certificate (optional)
    key_file = ""
    username = ""                  # "" = the device id
    password_file = ""             # "" = no password (anonymous or certificate auth)
    keepalive_s = 30
    session_expiry_s = 604800      # how long the broker keeps our session while away
    connect_timeout_s = 10
    backoff_initial_s = 0.5
    backoff_max_s = 60

    [download]
    chunk_size = 65536             # bytes per block
    chunk_timeout_s = 10           # seconds without a block before asking again
    window_blocks = 64
    max_bundle_bytes = 2147483648

    [telemetry]
    window_s = 60
    spool_max_bytes = 67108864
    spool_max_records = 10000
    sample_rate = 0.0              # raw-input sampling is off by default
    samples_per_window = 0
    explore_share = 0.02           # always-sampled, flagged share while sampling is on
    buffer_max = 10000             # observations held between 1 s drains (lower it for big inputs)

    [http]
    enabled = false                # local HTTP endpoint (agent.http_endpoint), off by default
    bind = "127.0.0.1"             # loopback addresses only
    port = 8080

    [runtime]
    onnxruntime_threads = 1        # 0 = onnxruntime decides
    trial_boot_limit = 3           # starts on trial before the previous model returns
"""

from __future__ import annotations

import ipaddress
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.download import DownloadOptions
from agent.mqtt import MqttOptions, TlsOptions, Will
from agent.options import AgentOptions
from agent.telemetry import TelemetryOptions
from edgefleet.errors import ConfigError
from edgefleet.topics import TopicError, validate_device_id, validate_group

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "ConfigError",
    "DeviceConfig",
    "DownloadConfig",
    "HttpConfig",
    "RuntimeConfig",
    "TelemetryConfig",
    "load_config",
    "parse_config",
]


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _section(doc: Mapping[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise _fail(f"[{name}]", "must be a table")
    unknown = set(value) - keys
    if unknown:
        raise _fail(f"[{name}]", f"unknown key(s) {sorted(unknown)}; allowed: {sorted(keys)}")
    return value


def _num(
    sec: Mapping[str, Any],
    name: str,
    key: str,
    default: float,
    lo: float,
    hi: float,
    *,
    integer: bool,
) -> Any:
    value = sec.get(key, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise _fail(f"[{name}] {key}", f"must be {kind} in [{lo}, {hi}], got {value!r}")
    return value if integer else float(value)


def _str(sec: Mapping[str, Any], name: str, key: str, default: str) -> str:
    value = sec.get(key, default)
    if not isinstance(value, str):
        raise _fail(f"[{name}] {key}", f"must be a string, got {value!r}")
    return value


def _bool(sec: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    value = sec.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"[{name}] {key}", f"must be true or false, got {value!r}")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(sec: Mapping[str, Any], name: str, key: str, base: Path) -> Path | None:
    text = _str(sec, name, key, "")
    if not text:
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path)


@dataclass(frozen=True)
class DeviceConfig:
    """Who this device is and where it keeps its state."""

    id: str
    state_dir: Path
    device_class: str = "generic"
    groups: tuple[str, ...] = ()  # highest priority first
    trust_root: Path | None = None  # pinned on first start when set


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the MQTT broker."""

    host: str
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None  # None: the device id
    password_file: Path | None = None
    keepalive_s: int = 30  # seconds
    session_expiry_s: int = 7 * 86400  # seconds
    connect_timeout_s: float = 10.0  # seconds
    backoff_initial_s: float = 0.5  # seconds
    backoff_max_s: float = 60.0  # seconds

    def password(self) -> str | None:
        """Read the password file (first line, stripped).

        Raises:
            ConfigError: it cannot be read, is empty, or other users may read it.
        """
        if self.password_file is None:
            return None
        try:
            mode = self.password_file.stat().st_mode
            text = self.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(
                "[broker] password_file", f"cannot read {self.password_file}: {exc}"
            ) from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise _fail(
                "[broker] password_file",
                f"{self.password_file} is accessible to other users; chmod 600 it",
            )
        lines = text.splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            raise _fail("[broker] password_file", f"{self.password_file} is empty")
        return password


@dataclass(frozen=True)
class DownloadConfig:
    """Chunked bundle download."""

    chunk_size: int = 64 << 10  # bytes per block
    chunk_timeout_s: float = 10.0  # seconds without progress before re-requesting
    window_blocks: int = 64  # blocks per request
    max_bundle_bytes: int = 2 << 30  # bytes


@dataclass(frozen=True)
class TelemetryConfig:
    """Telemetry windows and the on-disk spool."""

    window_s: float = 60.0  # seconds
    spool_max_bytes: int = 64 << 20  # bytes
    spool_max_records: int = 10_000
    sample_rate: float = 0.0  # fraction of predictions sampled (off)
    samples_per_window: int = 0
    explore_share: float = 0.02  # share always sampled and flagged, while sampling is on
    buffer_max: int = 10_000  # observations (array references) held between drains


@dataclass(frozen=True)
class HttpConfig:
    """The local HTTP endpoint (off by default)."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class RuntimeConfig:
    """Inference and update-trial settings handed to the agent core."""

    onnxruntime_threads: int = 1  # 0 = onnxruntime decides
    trial_boot_limit: int = 3  # agent starts on trial before reverting


@dataclass(frozen=True)
class AgentConfig:
    """The whole daemon configuration."""

    device: DeviceConfig
    broker: BrokerConfig
    download: DownloadConfig = field(default_factory=DownloadConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def agent_options(self) -> AgentOptions:
        """Options for ``agent.core.Agent``."""
        return AgentOptions(
            device_class=self.device.device_class,
            intra_op_threads=self.runtime.onnxruntime_threads,
            max_trial_restarts=self.runtime.trial_boot_limit,
        )

    def mqtt_options(self, will: Will | None = None) -> MqttOptions:
        """Options for ``agent.mqtt.MqttConnection`` (reads the password file).

        Raises:
            ConfigError: the password file is unreadable or unsafe.
        """
        b = self.broker
        tls = None
        if b.tls:
            tls = TlsOptions(ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file)
        return MqttOptions(
            host=b.host,
            port=b.port,
            client_id=self.device.id,
            username=b.username or self.device.id,
            password=b.password(),
            tls=tls,
            keepalive_s=b.keepalive_s,
            session_expiry_s=b.session_expiry_s,
            connect_timeout_s=b.connect_timeout_s,
            backoff_initial_s=b.backoff_initial_s,
            backoff_max_s=b.backoff_max_s,
            will=will,
        )

    def download_options(self) -> DownloadOptions:
        d = self.download
        return DownloadOptions(
            block_size=d.chunk_size,
            window_blocks=d.window_blocks,
            request_timeout_s=d.chunk_timeout_s,
            max_bundle_bytes=d.max_bundle_bytes,
        )

    def telemetry_options(self) -> TelemetryOptions:
        t = self.telemetry
        return TelemetryOptions(
            window_s=t.window_s,
            aggregate_interval_s=min(1.0, t.window_s),
            spool_max_records=t.spool_max_records,
            spool_max_bytes=t.spool_max_bytes,
            sample_rate=t.sample_rate,
            samples_per_window=t.samples_per_window,
            explore_share=t.explore_share,
            buffer_max=t.buffer_max,
        )

    @property
    def daemon_dir(self) -> Path:
        """Where the daemon keeps its own files (desired states, downloads, spool)."""
        return self.device.state_dir / "daemon"


_SECTIONS = {
    "device": {"id", "class", "state_dir", "groups", "trust_root"},
    "broker": {
        "url", "host", "port", "tls", "ca_file", "cert_file", "key_file", "username",
        "password_file", "keepalive_s", "session_expiry_s", "connect_timeout_s",
        "backoff_initial_s", "backoff_max_s",
    },
    "download": {"chunk_size", "chunk_timeout_s", "window_blocks", "max_bundle_bytes"},
    "telemetry": {
        "window_s", "spool_max_bytes", "spool_max_records", "sample_rate", "samples_per_window",
        "explore_share", "buffer_max",
    },
    "http": {"enabled", "bind", "port"},
    "runtime": {"onnxruntime_threads", "trial_boot_limit"},
}  # fmt: skip


def _broker_address(b: Mapping[str, Any]) -> tuple[str, int, bool]:
    """``(host, port, tls)`` from ``url`` or from ``host``/``port``/``tls`` (not both)."""
    url = _str(b, "broker", "url", "")
    if url:
        if {"host", "port", "tls"} & set(b):
            raise _fail("[broker] url", "give either url or host/port/tls, not both")
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise _fail("[broker] url", f"{url!r} must look like mqtt://HOST[:PORT] or mqtts://...")
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
            raise _fail("[broker] url", "no credentials, path or query in the url")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise _fail("[broker] url", str(exc)) from exc
        return parts.hostname, port, tls
    host = _str(b, "broker", "host", "")
    if not host:
        raise _fail("[broker] host", "is required (or give url)")
    return (
        host,
        _num(b, "broker", "port", 1883, 1, 65535, integer=True),
        _bool(b, "broker", "tls", False),
    )


def parse_config(doc: Mapping[str, Any], base: Path) -> AgentConfig:
    """Validate a decoded TOML document; relative paths are resolved against ``base``.

    Raises:
        ConfigError: naming the first bad section, key or value.
    """
    unknown = set(doc) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; allowed: {sorted(_SECTIONS)}")
    s = {name: _section(doc, name, keys) for name, keys in _SECTIONS.items()}

    dev = s["device"]
    try:
        device_id = validate_device_id(dev.get("id"))
        groups_raw = dev.get("groups", [])
        if not isinstance(groups_raw, list) or len(groups_raw) > 32:
            raise _fail("[device] groups", "must be a list of at most 32 group names")
        groups = tuple(validate_group(g) for g in groups_raw)
        device_class = _str(dev, "device", "class", "generic")
        validate_device_id(device_class)
    except TopicError as exc:
        raise _fail("[device]", str(exc)) from exc
    if len(set(groups)) != len(groups):
        raise _fail("[device] groups", "lists a group twice")
    state_dir = _path(dev, "device", "state_dir", base)
    if state_dir is None:
        raise _fail("[device] state_dir", "is required")
    device = DeviceConfig(
        id=device_id,
        state_dir=state_dir,
        device_class=device_class,
        groups=groups,
        trust_root=_path(dev, "device", "trust_root", base),
    )

    b = s["broker"]
    host, port, tls = _broker_address(b)
    username = _str(b, "broker", "username", "") or None
    broker = BrokerConfig(
        host=host,
        port=port,
        tls=tls,
        ca_file=_path(b, "broker", "ca_file", base),
        cert_file=_path(b, "broker", "cert_file", base),
        key_file=_path(b, "broker", "key_file", base),
        username=username,
        password_file=_path(b, "broker", "password_file", base),
        keepalive_s=_num(b, "broker", "keepalive_s", 30, 5, 3600, integer=True),
        session_expiry_s=_num(
            b, "broker", "session_expiry_s", 7 * 86400, 0, 0xFFFFFFFF, integer=True
        ),
        connect_timeout_s=_num(b, "broker", "connect_timeout_s", 10.0, 0.1, 300, integer=False),
        backoff_initial_s=_num(b, "broker", "backoff_initial_s", 0.5, 0.01, 3600, integer=False),
        backoff_max_s=_num(b, "broker", "backoff_max_s", 60.0, 0.01, 3600, integer=False),
    )
    if broker.backoff_max_s < broker.backoff_initial_s:
        raise _fail("[broker] backoff_max_s", "must be >= backoff_initial_s")
    if (broker.cert_file is None) != (broker.key_file is None):
        raise _fail("[broker]", "cert_file and key_file go together")
    if not broker.tls and (broker.ca_file or broker.cert_file):
        raise _fail("[broker]", "ca_file/cert_file/key_file need tls = true")

    d = s["download"]
    download = DownloadConfig(
        chunk_size=_num(d, "download", "chunk_size", 64 << 10, 256, 256 << 10, integer=True),
        chunk_timeout_s=_num(d, "download", "chunk_timeout_s", 10.0, 0.05, 3600, integer=False),
        window_blocks=_num(d, "download", "window_blocks", 64, 1, 2048, integer=True),
        max_bundle_bytes=_num(d, "download", "max_bundle_bytes", 2 << 30, 1, 1 << 40, integer=True),
    )
    t = s["telemetry"]
    telemetry = TelemetryConfig(
        window_s=_num(t, "telemetry", "window_s", 60.0, 0.05, 86400, integer=False),
        spool_max_bytes=_num(
            t, "telemetry", "spool_max_bytes", 64 << 20, 4096, 16 << 30, integer=True
        ),
        spool_max_records=_num(
            t, "telemetry", "spool_max_records", 10_000, 1, 1_000_000, integer=True
        ),
        sample_rate=_num(t, "telemetry", "sample_rate", 0.0, 0.0, 1.0, integer=False),
        samples_per_window=_num(t, "telemetry", "samples_per_window", 0, 0, 256, integer=True),
        explore_share=_num(t, "telemetry", "explore_share", 0.02, 0.0, 0.5, integer=False),
        buffer_max=_num(t, "telemetry", "buffer_max", 10_000, 16, 10_000_000, integer=True),
    )
    h = s["http"]
    http = HttpConfig(
        enabled=_bool(h, "http", "enabled", False),
        bind=_str(h, "http", "bind", "127.0.0.1"),
        port=_num(h, "http", "port", 8080, 1, 65535, integer=True),
    )
    if not _is_loopback(http.bind):
        raise _fail("[http] bind", f"{http.bind!r} is not a loopback address (local use only)")
    r = s["runtime"]
    runtime = RuntimeConfig(
        onnxruntime_threads=_num(r, "runtime", "onnxruntime_threads", 1, 0, 64, integer=True),
        trial_boot_limit=_num(r, "runtime", "trial_boot_limit", 3, 1, 100, integer=True),
    )
    return AgentConfig(device, broker, download, telemetry, http, runtime)


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``agent.toml``.

    Raises:
        ConfigError: unreadable, not TOML, or invalid (the message names the key).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(doc, path.resolve().parent)
