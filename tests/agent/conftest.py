"""Fixtures for the agent tests: one release (keys + bundles) per session, fresh agents."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core import Agent
from agent.options import AgentOptions
from agent.state import UpdateOutcome
from firmware_sim.models import BundleSet


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> BundleSet:
    return BundleSet.build(tmp_path_factory.mktemp("release"))


@pytest.fixture
def events() -> list[UpdateOutcome]:
    return []


@pytest.fixture
def make_agent(
    tmp_path: Path, bundles: BundleSet, events: list[UpdateOutcome]
) -> Iterator[Callable[..., Agent]]:
    """``make_agent(pin=True, options={...}, **agent_kw)``: an agent on ``tmp_path/state``."""
    made: list[Agent] = []

    def make(*, pin: bool = True, state_dir: Path | None = None, **kw: Any) -> Agent:
        opts = {"health_runs": 2, **kw.pop("options", {})}
        kw.setdefault("event_sink", events.append)
        agent = Agent(state_dir or tmp_path / "state", AgentOptions(**opts), **kw)
        made.append(agent)
        if pin:
            agent.pin_trust_root(bundles.release.trust_root_bytes)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent()
