"""Suite-wide fixtures: a real Mosquitto broker per test (see tests/mosquitto.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Mosquitto


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with custom settings (users, ACL); all are stopped at teardown."""
    brokers: list[Mosquitto] = []

    def make(
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        name: str = "broker",
        **kw: Any,
    ) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"{name}-{len(brokers)}", users=users, acl=acl, **kw)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """An anonymous broker with persistence, on a free port."""
    return mosquitto_factory()
