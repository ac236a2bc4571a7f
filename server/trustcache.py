"""The trust root as the API shows it, re-read when the file changes.

Rotating keys replaces ``trust-root.json``; replicas notice by modification
time and size, so no restart is needed. A missing or unreadable file reads
as None (routes that need it raise ``UnavailableError`` through the registry).
"""

from __future__ import annotations

import threading
from pathlib import Path

from edgefleet.errors import VerificationError
from edgefleet.trust import TrustRoot

__all__ = ["TrustRootCache"]


class TrustRootCache:
    """Caches one parsed trust-root file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._root: TrustRoot | None = None

    def get(self) -> TrustRoot | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._root = TrustRoot.from_bytes(self.path.read_bytes())
                except (OSError, VerificationError):
                    self._root = None
                self._stamp = stamp
            return self._root
