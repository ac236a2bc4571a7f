"""Which devices each wave takes: deterministic, stratified by device class (pure).

Within each device class, devices are ordered by ``sha256(rollout id, device
id)``; each gets the position ``(rank + 0.5) / class size``, and the group's
order is by position (hash breaking ties). So the order depends only on the
rollout and the group, any prefix takes every class in proportion (to within
one device), and a device's place does not move when others join or leave
the group. Wave ``k`` with cumulative share ``p`` holds the first
``max(k + 1, ceil(p / 100 * N))`` devices of that order (at least one more
device per wave while any remain); the devices not yet in a wave are the
concurrent control cohort.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

__all__ = ["order", "wave_sizes"]


def _key(rollout_id: str, device_id: str) -> bytes:
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()


def order(rollout_id: str, devices: Iterable[tuple[str, str]]) -> list[str]:
    """The group's ``(device id, device class)`` pairs in wave order."""
    by_class: dict[str, list[str]] = {}
    for device_id, device_class in devices:
        by_class.setdefault(device_class, []).append(device_id)
    placed: list[tuple[float, bytes, str]] = []
    for members in by_class.values():
        ranked = sorted(members, key=lambda d: _key(rollout_id, d))
        for rank, device_id in enumerate(ranked):
            placed.append(((rank + 0.5) / len(ranked), _key(rollout_id, device_id), device_id))
    placed.sort()
    return [device_id for _, _, device_id in placed]


def wave_sizes(waves: Sequence[float], n: int) -> list[int]:
    """Cumulative device counts of each wave for a group of ``n`` devices."""
    sizes = []
    for k, share in enumerate(waves):
        size = min(n, max(k + 1, math.ceil(share / 100 * n - 1e-9)))
        sizes.append(size)
    if sizes:
        sizes[-1] = n if waves[-1] >= 100 else sizes[-1]
    return sizes
