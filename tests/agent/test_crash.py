"""Every mutation of every update step, faulted: the device always recovers cleanly.

Each test sweeps k over *all* disk mutations of one operation (install, switch,
trial, commit, report, rollback): the k-th fails with EIO (``oserror``), kills
the process (``kill``) or cuts the power and loses what was not durable
(``power``); then the agent recovers (same process after an OSError, a new
``Agent`` = reboot after a crash) and ``check_device`` verifies the active
model loads, hashes to its manifest and matches what ``status`` reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.options import AgentOptions
from firmware_sim.campaign import Scenario, prepare_template, sweep
from firmware_sim.device import SimDevice
from firmware_sim.models import BundleSet

OPTIONS = AgentOptions(device_class="sim", health_runs=1)
V1, V2, V3 = ("tiny", 1), ("tiny", 2), ("tiny", 3)


def scenarios(b: BundleSet) -> dict[str, Scenario]:
    def pin(dev: SimDevice) -> None:
        assert dev.agent is not None
        dev.agent.pin_trust_root(b.release.trust_root_bytes)

    def v1(dev: SimDevice) -> None:
        pin(dev)
        assert dev.agent is not None and dev.agent.install(b.v1).ok

    def v1_v2(dev: SimDevice) -> None:
        v1(dev)
        assert dev.agent is not None and dev.agent.install(b.v2).ok

    return {
        "first_install": Scenario("first_install", pin, lambda a: a.install(b.v1),
                                  {None, V1}, OPTIONS, durable=("committed", V1)),
        "upgrade": Scenario("upgrade", v1_v2, lambda a: a.install(b.v3), {V2, V3}, OPTIONS,
                            durable=("committed", V3)),
        "bad_upgrade": Scenario("bad_upgrade", v1, lambda a: a.install(b.nan), {V1}, OPTIONS,
                                durable=("rolled-back", V1)),
        "bad_first_install": Scenario("bad_first_install", pin,
                                      lambda a: a.install(b.unknown_op), {None}, OPTIONS),
        "rollback": Scenario("rollback", v1_v2, lambda a: a.rollback(), {V1, V2}, OPTIONS,
                             durable=("rolled-back", V1)),
        "rejected_install": Scenario("rejected_install", v1_v2,
                                     lambda a: a.install(b.wrong_target), {V2}, OPTIONS),
    }  # fmt: skip


@pytest.fixture(scope="module")
def templates(bundles: BundleSet, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("templates")
    return {name: (s, prepare_template(s, work)) for name, s in scenarios(bundles).items()}


def run(templates, name: str, mode: str, tmp_path: Path, **kw):
    scenario, template = templates[name]
    runs = sweep(scenario, mode, tmp_path, template=template, **kw)
    assert runs, "the operation made no mutations"
    assert all(r.active in scenario.allowed for r in runs)
    return runs


@pytest.mark.parametrize("mode", ["oserror", "kill", "power"])
def test_first_install_every_mutation(templates, tmp_path, mode):
    runs = run(templates, "first_install", mode, tmp_path)
    assert {r.active for r in runs} == {None, V1}


@pytest.mark.parametrize("mode", ["oserror", "kill", "power"])
def test_upgrade_every_mutation(templates, tmp_path, mode):
    runs = run(templates, "upgrade", mode, tmp_path)
    assert {r.active for r in runs} == {V2, V3}
    faulted = {r.fault.split()[0] for r in runs}
    assert {"create", "write", "fsync", "replace", "fsync_dir", "unlink", "mkdir"} <= faulted


@pytest.mark.parametrize("mode", ["oserror", "kill", "power"])
def test_bad_upgrade_every_mutation(templates, tmp_path, mode):
    run(templates, "bad_upgrade", mode, tmp_path)


@pytest.mark.parametrize("mode", ["kill", "power"])
def test_bad_first_install_every_mutation(templates, tmp_path, mode):
    run(templates, "bad_first_install", mode, tmp_path)


@pytest.mark.parametrize("mode", ["oserror", "kill", "power"])
def test_rollback_every_mutation(templates, tmp_path, mode):
    runs = run(templates, "rollback", mode, tmp_path)
    assert {r.active for r in runs} == {V1, V2}


@pytest.mark.parametrize("mode", ["oserror", "power"])
def test_rejected_install_every_mutation(templates, tmp_path, mode):
    run(templates, "rejected_install", mode, tmp_path)


@pytest.mark.parametrize("name", ["upgrade", "rollback"])
def test_recovery_power_cut_at_every_recovery_mutation(templates, tmp_path, name):
    runs = run(templates, name, "power", tmp_path, double=True)
    assert any(r.recovery_cut for r in runs)
    assert all(r.boots >= 2 for r in runs if r.recovery_cut), "the cut boot, then the good one"
