"""Mosquitto's configuration, password and ACL files, generated from the database, and reload.

Flow: after a device is enrolled, changed or removed, ``sync_broker_files``
regenerates the files from the devices table inside the caller's
transaction, writes each atomically, and after the commit ``reload_broker``
asks Mosquitto to re-read them (SIGHUP to the pid in ``mosquitto_pid_file``,
or ``mosquitto_reload_command``). ``mosquitto_conf`` writes the broker
configuration those files belong to (``edgefleet server broker-config``; the
demo's broker uses the same text).

The broker has two kinds of listener (``per_listener_settings true``):

- **device listeners** take device logins only (``mosquitto_password_file``)
  with ``use_username_as_clientid true``: a device's MQTT session is always
  named after its own login, so no device can resume, kick or impersonate
  another's session or a replica's;
- **the server listener** takes the replicas' login only
  (``mosquitto_server_password_file``) and keeps their chosen client ids,
  so several replicas can share one username with distinct sessions.

Mosquitto 2.0's ``acl_file`` grants every SUBSCRIBE and applies the ACL when
it delivers; a device's subscription outside its subtree therefore receives
nothing, and the replicas' ``$share`` groups carry ``Settings.broker_secret``
so that no device can join one and be dealt (then denied) other devices'
messages.

Invariants: the files are always a function of committed database state: the
regeneration runs under a cross-replica lock (PostgreSQL advisory lock, held
until commit, plus an ``flock`` on a sibling lock file for processes sharing a
host), so a slower replica can never overwrite a newer file with an older
snapshot. Password lines use Mosquitto's own ``$7$`` format (PBKDF2-SHA512,
101 iterations, 12-byte salt, 64-byte key, base64), as ``mosquitto_passwd``
writes them; the plaintext is never stored. The ACL comes from
``edgefleet.topics.mosquitto_acl``: a device may write only its own status,
telemetry, facts and chunk-request topics, and read only its own desired-state
and chunk-data topics and its groups' desired-state topics.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.fsutil import atomic_write_bytes
from edgefleet.topics import mosquitto_acl
from server.db import LOCK_BROKER_FILES, transaction_lock
from server.models import Device
from server.settings import Settings

__all__ = [
    "BrokerSync",
    "Listener",
    "broker_files_configured",
    "hash_password",
    "mosquitto_conf",
    "reload_broker",
    "sync_broker_files",
    "verify_password",
]

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto ``$7$`` password hash of ``password``."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class BrokerSync:
    """What happened to the broker files."""

    written: bool
    reloaded: bool
    detail: str


def broker_files_configured(settings: Settings) -> bool:
    return settings.mosquitto_password_file is not None and settings.mosquitto_acl_file is not None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sync_broker_files(
    session: Session, settings: Settings
) -> contextlib.AbstractContextManager[object]:
    """Lock, regenerate and write both files from the session's view of the devices.

    Use as a context manager around the commit: the lock is held until the
    block ends, so the files and the committed rows agree::

        with sync_broker_files(session, settings):
            session.commit()

    Raises:
        OSError: a file could not be written (the caller's transaction should
            then roll back; the old files stay in place).
    """
    if not broker_files_configured(settings):
        return contextlib.nullcontext()
    passwd = settings.mosquitto_password_file
    acl = settings.mosquitto_acl_file
    assert passwd is not None and acl is not None
    stack = contextlib.ExitStack()
    stack.enter_context(_file_lock(passwd))
    try:
        transaction_lock(session, LOCK_BROKER_FILES)
        session.flush()
        # A device id in the replicas' namespace (enrolled before it was reserved)
        # could claim a replica's client id: such a login is left out.
        devices = [
            d
            for d in session.scalars(select(Device).order_by(Device.id)).all()
            if not settings.is_reserved_device_id(d.id)
        ]
        server_users: list[str] = []
        server_lines: list[str] = []
        if settings.mqtt_password is not None:
            server_users.append(settings.mqtt_username)
            secret = settings.mqtt_password.get_secret_value()
            server_lines.append(f"{settings.mqtt_username}:{hash_password(secret)}")
        device_lines = [f"{d.id}:{d.password_hash}" for d in devices]
        acl_text = mosquitto_acl(
            {d.id: [g.group for g in d.groups] for d in devices}, server_users=server_users
        )
        server_passwd = settings.effective_mosquitto_server_password_file
        assert server_passwd is not None
        # 0640: the broker (often another user in the same group) must read them.
        atomic_write_bytes(server_passwd, _lines(server_lines), mode=0o640)
        atomic_write_bytes(passwd, _lines(device_lines), mode=0o640)
        atomic_write_bytes(acl, acl_text.encode(), mode=0o640)
    except BaseException:
        stack.close()
        raise
    return stack


def _lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


@dataclass(frozen=True)
class Listener:
    """One Mosquitto listener: address and, for ``mqtts``, PEM files."""

    host: str
    port: int
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"listener port {self.port} is outside 1-65535")
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"listener host {self.host!r} is not an address")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("a TLS listener needs both certfile and keyfile")

    def lines(self) -> list[str]:
        out = [f"listener {self.port} {self.host}"]
        for key in ("cafile", "certfile", "keyfile"):
            value = getattr(self, key)
            if value is not None:
                out.append(f"{key} {value}")
        return out


def mosquitto_conf(
    settings: Settings,
    *,
    devices: list[Listener],
    server: Listener,
    persistence_dir: Path,
    log_file: Path | None = None,
    run_as_user: str | None = None,
    max_queued_messages: int = 100_000,
) -> str:
    """The ``mosquitto.conf`` for the broker files these settings manage.

    Args:
        settings: the server's settings (broker files must be configured).
        devices: listeners for devices (at least one; TLS in production).
        server: the replicas' listener (bind it where only they reach it).
        persistence_dir: where Mosquitto keeps sessions and retained messages.
        log_file: log destination (default: syslog-free stderr).
        run_as_user: Mosquitto's ``user`` option (drops root privileges).
        max_queued_messages: per client: what a slow or absent replica may owe.

    Raises:
        ConfigError: the settings do not manage broker files, or a listener repeats.
    """
    from server.settings import ConfigError

    passwd = settings.mosquitto_password_file
    acl = settings.mosquitto_acl_file
    server_passwd = settings.effective_mosquitto_server_password_file
    if passwd is None or acl is None or server_passwd is None:
        raise ConfigError(
            "a broker configuration needs EDGEFLEET_MOSQUITTO_PASSWORD_FILE and "
            "EDGEFLEET_MOSQUITTO_ACL_FILE (the files this server manages)"
        )
    if not devices:
        raise ConfigError("a broker configuration needs at least one device listener")
    ports = [x.port for x in devices] + [server.port]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"listener ports repeat: {sorted(ports)}")
    out = [
        "# generated by edgefleet (server.services.broker.mosquitto_conf); see docs/server.md",
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        "persistence_file mosquitto.db",
        f"max_queued_messages {max_queued_messages}",
        "max_keepalive 3600",
    ]
    if settings.mosquitto_pid_file is not None:
        out.append(f"pid_file {settings.mosquitto_pid_file}")
    if log_file is not None:
        out += [f"log_dest file {log_file}", "connection_messages true"]
    else:
        out.append("log_dest stderr")
    if run_as_user:
        out.append(f"user {run_as_user}")
    for listener in devices:
        out += ["", "# devices: device logins only; the session is named after the login"]
        out += listener.lines()
        out += [
            "allow_anonymous false",
            "use_username_as_clientid true",
            f"password_file {passwd}",
            f"acl_file {acl}",
        ]
    out += ["", "# server replicas: their login only; they keep their own client ids"]
    out += server.lines()
    out += ["allow_anonymous false", f"password_file {server_passwd}", f"acl_file {acl}"]
    return "\n".join(out) + "\n"


def reload_broker(settings: Settings) -> BrokerSync:
    """Ask the broker to re-read its files; never raises (the result says what happened)."""
    if not broker_files_configured(settings):
        return BrokerSync(False, False, "broker files are not managed by this server")
    if settings.mosquitto_pid_file is not None:
        try:
            pid = int(settings.mosquitto_pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            return BrokerSync(True, False, f"could not signal the broker: {exc}")
        return BrokerSync(True, True, f"sent SIGHUP to broker pid {pid}")
    if settings.mosquitto_reload_command:
        try:
            done = subprocess.run(
                settings.mosquitto_reload_command, capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return BrokerSync(True, False, f"reload command failed: {exc}")
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[:200]
            return BrokerSync(True, False, f"reload command exited {done.returncode}: {err}")
        return BrokerSync(True, True, "reload command succeeded")
    return BrokerSync(True, False, "files written; no broker pid file or reload command set")
