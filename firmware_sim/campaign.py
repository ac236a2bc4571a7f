"""Crash campaigns: fault every mutation of an update, reboot, check the device.

Flow of a sweep: a ``Scenario`` prepares a starting state directory once
(fault-free, on a ``SimDevice``) and names an operation (install a bundle,
roll back). The reference run counts the operation's disk mutations, N. Then,
for every k in 1..N, a fresh copy of the starting state boots, the k-th
mutation of the operation fails (``oserror``), kills the process (``kill``) or
cuts the power (``power``, losing whatever was not durable), the device
recovers (same agent ``recover()`` after an ``OSError``; a new agent = reboot
after a crash) and ``check_device`` verifies the result. ``double=True``
also cuts the power at every mutation *of the recovery* that follows.

``check_device`` is the invariant every run must satisfy: the persisted state
is ``idle``; the active model is one the scenario allows (the old or the new
one, never a third, never a bad one); its manifest hashes to what the state
names and its model file hashes to the manifest's ``uncompressed_sha256``;
onnxruntime loads it and runs it; the rollback floor is at least its version;
and the agent's own status and serving model agree with the files.

``benchmarks/reliability.py`` and the tests share this module (and
``firmware_sim.sigkill`` for real processes).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.core import Agent, read_status
from agent.errors import StorageError
from agent.options import AgentOptions
from edgefleet.errors import EdgefleetError
from edgefleet.manifest import Manifest
from firmware_sim.device import SimDevice
from firmware_sim.disk import FaultPlan, Mutation, SimulatedCrash

__all__ = [
    "CampaignFailure",
    "Scenario",
    "SweepRun",
    "check_device",
    "count_mutations",
    "sweep",
]

ModelKey = tuple[str, int] | None


class CampaignFailure(AssertionError):
    """A device ended in a state that breaks an invariant (the message lists which)."""


@dataclass(frozen=True)
class Scenario:
    """A starting state and one operation to fault.

    ``prepare`` runs on a fault-free device (its state directory becomes the
    template); ``operate`` is what gets faulted; ``allowed`` lists the
    (model, version) pairs (or None: no model) the device may serve after.
    """

    name: str
    prepare: Callable[[SimDevice], None]
    operate: Callable[[Agent], Any]
    allowed: Collection[ModelKey]
    options: AgentOptions = field(default_factory=lambda: AgentOptions(device_class="sim"))
    # (persisted state, model): once a store of that state is durable, a crash
    # must end with that model serving (progress is never lost).
    durable: tuple[str, ModelKey] | None = None


@dataclass(frozen=True)
class SweepRun:
    """One faulted run and what the device ended with."""

    scenario: str
    mode: str
    k: int
    fault: str  # the mutation that was faulted ("" if none fired)
    recovery_cut: int | None  # double faults: the recovery mutation that was cut
    active: ModelKey
    boots: int


def _key(ref: Mapping[str, Any] | None) -> ModelKey:
    return None if ref is None else (str(ref["model"]), int(ref["version"]))


def check_device(
    state_dir: Path, allowed: Collection[ModelKey], *, agent: Agent | None = None
) -> dict[str, Any]:
    """Check the recovery invariants of a state directory (see the module docstring).

    Returns:
        The status read from disk (what ``edgefleet agent status`` prints).

    Raises:
        CampaignFailure: naming every broken invariant.
    """
    problems: list[str] = []
    status = read_status(state_dir)
    if status["state"] != "idle":
        problems.append(f"state is {status['state']}, not idle")
    active = status["active"]
    key = _key(active)
    if key not in allowed:
        problems.append(f"active model {key} is not one of {sorted(allowed, key=str)}")
    if active is not None:
        problems += _check_slot_files(state_dir, active, status)
    if agent is not None:
        live = agent.status()
        if live["active"] != active:
            problems.append(f"agent status says {live['active']}, the file says {active}")
        if _key(live["serving"]) != key:
            problems.append(f"agent serves {live['serving']}, the active pointer is {active}")
        if active is not None:
            try:
                _predict_zeros(agent)
            except EdgefleetError as exc:
                problems.append(f"predict failed: {exc}")
    if problems:
        raise CampaignFailure(f"{state_dir}: " + "; ".join(problems))
    return status


def _check_slot_files(
    state_dir: Path, active: Mapping[str, Any], status: Mapping[str, Any]
) -> list[str]:
    import onnxruntime as ort

    problems = []
    slot = state_dir / "slots" / active["slot"]
    try:
        manifest_bytes = (slot / "manifest.json").read_bytes()
        model_bytes = (slot / "model.onnx").read_bytes()
    except OSError as exc:
        return [f"active slot {active['slot']} is unreadable: {exc}"]
    if hashlib.sha256(manifest_bytes).hexdigest() != active["manifest_sha256"]:
        problems.append("active manifest.json does not hash to the state's manifest_sha256")
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except EdgefleetError as exc:
        return [*problems, f"active manifest does not parse: {exc}"]
    if hashlib.sha256(model_bytes).hexdigest() != manifest.model_entry.uncompressed_sha256:
        problems.append("active model.onnx does not hash to the manifest's uncompressed_sha256")
    if (manifest.name, manifest.version) != _key(active):
        problems.append(f"manifest names {manifest.name} v{manifest.version}")
    floor = status["rollback_floor"].get(manifest.name, 0)
    if floor < manifest.version:
        problems.append(f"rollback floor {floor} is below the active version {manifest.version}")
    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        feed = {
            i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()
        }
        session.run(None, feed)
    except Exception as exc:  # onnxruntime's own errors
        problems.append(f"onnxruntime cannot run the active model: {exc}")
    return problems


def _predict_zeros(agent: Agent) -> None:
    manifest = agent.serving_manifest
    assert manifest is not None
    feed = {
        spec.name: np.zeros([d if isinstance(d, int) else 1 for d in spec.shape], spec.dtype)
        for spec in manifest.inputs
    }
    agent.predict(feed)


def _tolerant(operate: Callable[[Agent], Any]) -> Callable[[Agent], Any]:
    def run(agent: Agent) -> Any:
        try:
            return operate(agent)
        except (StorageError, EdgefleetError) as exc:
            return exc

    return run


def _device(root: Path, template: Path, scenario: Scenario) -> SimDevice:
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(template, root / "state", symlinks=True)
    return SimDevice(root, options=scenario.options)


def prepare_template(scenario: Scenario, workdir: Path) -> Path:
    """Run the scenario's fault-free preparation; return the template state directory."""
    root = workdir / f"{scenario.name}-template"
    if root.exists():
        shutil.rmtree(root)
    device = SimDevice(root, options=scenario.options)
    if device.boot() is None:
        raise RuntimeError("the template device did not boot")
    scenario.prepare(device)
    device.power_off()
    return device.state_dir


def count_mutations(scenario: Scenario, template: Path, workdir: Path) -> int:
    """Mutations of the scenario's operation on a fault-free run (checked too).

    Raises:
        CampaignFailure: the fault-free run itself breaks an invariant.
    """
    return _reference(scenario, template, workdir)[0]


def _reference(scenario: Scenario, template: Path, workdir: Path) -> tuple[int, int | None]:
    """(mutations of the operation, index of the one making ``durable``'s state durable)."""
    device = _device(workdir / f"{scenario.name}-reference", template, scenario)
    if device.boot() is None:
        raise RuntimeError("the reference device did not boot")
    before = device.disk.count
    durable_at: list[int] = []
    if scenario.durable is not None:
        wanted = scenario.durable[0]

        def watch(m: Mutation) -> None:
            if durable_at or Path(m.path) != device.state_dir:
                return
            if read_status(device.state_dir)["state"] == wanted:
                durable_at.append(m.index - before)

        device.disk.watch = watch
    device.run(_tolerant(scenario.operate))
    device.disk.watch = None
    status = check_device(device.state_dir, scenario.allowed, agent=device.agent)
    if scenario.durable is not None:
        if not durable_at:
            raise CampaignFailure(f"{scenario.name}: state {scenario.durable[0]} never stored")
        if _key(status["active"]) != scenario.durable[1]:
            raise CampaignFailure(f"{scenario.name}: fault-free run ends with {status['active']}")
    return device.disk.count - before, durable_at[0] if durable_at else None


def sweep(
    scenario: Scenario,
    mode: str,
    workdir: Path,
    *,
    template: Path | None = None,
    double: bool = False,
    ks: Collection[int] | None = None,
) -> list[SweepRun]:
    """Fault every mutation of ``scenario``'s operation (see the module docstring).

    Args:
        scenario: what to fault.
        mode: ``oserror``, ``kill`` or ``power``.
        workdir: scratch directory.
        template: a prepared template (``prepare_template``); made when omitted.
        double: also cut the power at every mutation of each recovery.
        ks: only these mutation indexes (default: all).

    Returns:
        One ``SweepRun`` per faulted run.

    Raises:
        CampaignFailure: the first run whose device breaks an invariant.
    """
    template = template or prepare_template(scenario, workdir)
    total, durable_at = _reference(scenario, template, workdir)
    runs: list[SweepRun] = []
    for k in sorted(ks) if ks is not None else range(1, total + 1):
        device = _device(workdir / f"{scenario.name}-{mode}-{k}", template, scenario)
        if device.boot() is None:
            raise RuntimeError("the device did not boot before the fault")
        device.arm(FaultPlan(at=k, kind=mode))
        result = device.run(_tolerant(scenario.operate))
        fired = device.disk.tripped_at if device.disk.tripped else None
        fault = f"{fired.op} {Path(fired.path).relative_to(device.root)}" if fired else ""
        if mode == "oserror":
            agent = device.agent
            assert agent is not None
            device.arm(None)
            device.run(_tolerant(lambda a: a.recover()))
            check_device(device.state_dir, scenario.allowed, agent=device.agent)
            device.power_cycle(lose_unsynced=False)
        elif not isinstance(result, SimulatedCrash):
            raise CampaignFailure(f"{scenario.name} {mode} k={k}: the fault did not fire")
        if double and mode == "power":
            runs += _double(scenario, device, k, fault, workdir, durable_at)
            continue
        device.boot_until_up()
        try:
            status = check_device(device.state_dir, scenario.allowed, agent=device.agent)
            _check_progress(scenario, durable_at, k, status)
        except CampaignFailure as exc:
            raise CampaignFailure(f"{scenario.name} {mode} at k={k} ({fault}): {exc}") from exc
        runs.append(
            SweepRun(scenario.name, mode, k, fault, None, _key(status["active"]), device.boots)
        )
        device.power_off()
    return runs


def _check_progress(
    scenario: Scenario, durable_at: int | None, k: int, status: Mapping[str, Any]
) -> None:
    if scenario.durable is None or durable_at is None or k <= durable_at:
        return
    if _key(status["active"]) != scenario.durable[1]:
        raise CampaignFailure(
            f"the {scenario.durable[0]} state was durable (mutation {durable_at}) but the "
            f"device serves {status['active']} instead of {scenario.durable[1]}"
        )


def _double(
    scenario: Scenario,
    crashed: SimDevice,
    k: int,
    fault: str,
    workdir: Path,
    durable_at: int | None,
) -> list[SweepRun]:
    """Cut the power again at every mutation of the recovery after crash ``k``."""
    crashed.disk.power_loss()
    snapshot = workdir / f"{scenario.name}-snap-{k}"
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(crashed.state_dir, snapshot)
    probe = _device(workdir / f"{scenario.name}-probe-{k}", snapshot, scenario)
    if probe.boot() is None:
        raise RuntimeError("recovery did not boot without faults")
    recovery = probe.disk.count
    probe.power_off()
    runs = []
    for j in range(1, recovery + 1):
        device = _device(workdir / f"{scenario.name}-double-{k}-{j}", snapshot, scenario)
        device.arm(FaultPlan(at=j, kind="power"))
        device.boot()
        if device.agent is not None:
            raise CampaignFailure(f"{scenario.name} k={k} j={j}: the recovery cut did not fire")
        device.boot_until_up()
        try:
            status = check_device(device.state_dir, scenario.allowed, agent=device.agent)
            _check_progress(scenario, durable_at, k, status)
        except CampaignFailure as exc:
            raise CampaignFailure(
                f"{scenario.name} power at k={k} ({fault}) then at recovery mutation {j}: {exc}"
            ) from exc
        runs.append(
            SweepRun(scenario.name, "power", k, fault, j, _key(status["active"]), device.boots)
        )
        device.power_off()
    shutil.rmtree(snapshot, ignore_errors=True)
    return runs
