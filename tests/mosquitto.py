"""A real Mosquitto broker for tests: generated config, free port, restart, teardown.

Flow: ``Mosquitto(workdir)`` writes ``mosquitto.conf`` (and, when users are
given, a password file with PBKDF2-SHA512 ``$7$`` hashes and an ACL file; with
``tls``, a TLS listener with the given CA, certificate and key) into
``workdir``, or the complete ``config_text`` it is given (the server's
generated configuration, ``tests.server.conftest.managed_broker``);
``start()`` launches ``mosquitto -c`` and returns once the port accepts TCP
connections; ``stop()`` sends SIGTERM (Mosquitto then writes its
persistence database) and waits; ``restart()`` is stop + start on the same
port with the same persistence file, so retained messages and MQTT sessions
survive it; ``kill()`` is an unclean SIGKILL.

No mock: every test that talks MQTT talks to this process.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["MOSQUITTO_BINARY", "Mosquitto", "free_port", "password_line", "wait_until"]

MOSQUITTO_BINARY = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def password_line(user: str, password: str, *, iterations: int = 101) -> str:
    """One Mosquitto 2 password-file line (``$7$``: PBKDF2-SHA512, 12-byte salt)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


class Mosquitto:
    """One broker process bound to 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = True,
        tls: tuple[Path, Path, Path] | None = None,
        config_text: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.users = dict(users or {})
        self.acl = acl
        self.allow_anonymous = (not self.users) if allow_anonymous is None else allow_anonymous
        self.persistence = persistence
        self.tls = tls  # (CA certificate, server certificate, server key) PEM files
        # A complete mosquitto.conf (e.g. the server's generated one) used instead of
        # the one built from the options above; ``port`` must be one of its listeners.
        self.config_text = config_text
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    def _write_config(self) -> None:
        if self.config_text is not None:
            self.config_path.write_text(self.config_text)
            return
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 10000",
            "max_keepalive 3600",
        ]
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "persistence_file mosquitto.db",
                "autosave_interval 1",
            ]
        if self.users:
            pw = self.workdir / "passwords"
            pw.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            lines.append(f"password_file {pw}")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections.

        Raises:
            RuntimeError: it exited or did not listen within ``timeout_s``.
        """
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_config()
        self.proc = subprocess.Popen(
            [MOSQUITTO_BINARY, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (the persistence database is written on exit)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: an unclean broker crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The broker's log so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 10.0, step_s: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout_s`` passes; return the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(step_s)
