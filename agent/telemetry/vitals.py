"""The vitals probe: CPU, load, RSS, free disk and temperature, where the platform has them.

"Vitals" are the device's own metrics in each telemetry record; they are not
the model's install-time health check (``agent.health``) nor the server's
liveness probe (``/healthz``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from edgefleet.wire import (
    Vitals,
)

__all__ = ["VitalsProbe"]


class VitalsProbe:
    """Reads device vitals where the platform exposes it; ``None`` elsewhere."""

    def __init__(
        self, disk_path: Path, thermal_glob: str = "/sys/class/thermal/thermal_zone*/temp"
    ):
        self.disk_path = Path(disk_path)
        self.thermal_glob = thermal_glob
        self._last = (time.monotonic(), time.process_time())

    def snapshot(self) -> Vitals:
        now, cpu = time.monotonic(), time.process_time()
        last_now, last_cpu = self._last
        self._last = (now, cpu)
        cpu_percent = None
        if now - last_now > 0:
            cpu_percent = round(max(0.0, (cpu - last_cpu) / (now - last_now) * 100), 3)
        load1 = None
        with contextlib.suppress(OSError, AttributeError):
            load1 = round(os.getloadavg()[0], 3)
        disk = None
        with contextlib.suppress(OSError):
            st = os.statvfs(self.disk_path)  # what shutil.disk_usage(...).free reads
            disk = st.f_bavail * st.f_frsize
        return Vitals(cpu_percent, load1, self._rss(), disk, self._temperature())

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):  # pragma: no cover - non-POSIX
            return None

    def _temperature(self) -> float | None:
        import glob

        best = None
        for path in glob.glob(self.thermal_glob):
            try:
                with open(path) as fh:
                    value = int(fh.read().strip()) / 1000.0
            except (OSError, ValueError):
                continue
            if -273.15 <= value <= 1000 and (best is None or value > best):
                best = value
        return best
