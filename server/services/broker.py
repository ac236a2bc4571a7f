"""Mosquitto's password and ACL files, generated from the database, and broker reload.

Flow: after a device is enrolled, changed or removed, ``sync_broker_files``
regenerates both files from the devices table (plus the server replicas' own
user) inside the caller's transaction, writes each atomically, and after the
commit ``reload_broker`` asks Mosquitto to re-read them (SIGHUP to the pid in
``mosquitto_pid_file``, or ``mosquitto_reload_command``).

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
    "broker_files_configured",
    "hash_password",
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
        devices = session.scalars(select(Device).order_by(Device.id)).all()
        lines = []
        server_users: list[str] = []
        if settings.mqtt_password is not None:
            server_users.append(settings.mqtt_username)
            lines.append(
                f"{settings.mqtt_username}:{hash_password(settings.mqtt_password.get_secret_value())}"
            )
        lines += [f"{d.id}:{d.password_hash}" for d in devices if d.id != settings.mqtt_username]
        acl_text = mosquitto_acl(
            {d.id: [g.group for g in d.groups] for d in devices}, server_users=server_users
        )
        # 0640: the broker (often another user in the same group) must read them.
        atomic_write_bytes(passwd, ("\n".join(lines) + "\n").encode(), mode=0o640)
        atomic_write_bytes(acl, acl_text.encode(), mode=0o640)
    except BaseException:
        stack.close()
        raise
    return stack


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
