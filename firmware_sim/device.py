"""A simulated edge device running the real agent: disk, boot, power.

Flow: ``SimDevice(root)`` owns a ``SimDisk`` and a state directory; ``boot()``
constructs a real ``agent.core.Agent`` on it (that *is* the boot: the agent
takes the lock and runs its recovery table) and counts boots. Operations run
through ``run(fn)``: when the disk's armed fault kills the process or cuts the
power mid-operation, ``run`` returns the ``SimulatedCrash`` instead of
raising, the agent object is dropped as a dead process would drop it
(``Agent.abandon``: the lock goes, nothing is written) and the device is off
until ``power_cycle()`` (which applies the durability model for a power cut)
boots it again. A crash *during* boot (recovery itself interrupted) leaves the
device off too; ``boot_until_up`` keeps cycling.

The network: given a ``firmware_sim.network.SimNetwork``, ``connect()`` opens
the process's MQTT connection (a ``SimLink``; it dies with the process) and
``download_and_install(bundle)`` runs the real chunked downloader into
``state/daemon/downloads`` and installs the verified file with the real agent.
``cut_power_now()`` cuts the power from any thread (a link's frame trigger):
the download stops as a dead process does, and the next ``power_cycle`` also
loses the download blocks no durable checkpoint claims. ``fetch`` maps a bundle
reference to a readable stream for ``install`` (default: open a local file).
``crash_on_load`` makes onnxruntime "segfault" (kill the process) whenever it
loads a model whose bytes hash to one of the given digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from agent.core import Agent, InstallResult
from agent.options import AgentOptions
from agent.runtime import Session, SessionFactory, make_session
from agent.state import UpdateOutcome
from edgefleet.manifest import DeviceFacts
from firmware_sim.disk import FaultPlan, PowerCut, ProcessKilled, SimDisk, SimulatedCrash
from firmware_sim.network import (
    NetworkInstall,
    SimLink,
    SimNetwork,
    download_and_install,
    lose_unsynced_downloads,
)

if TYPE_CHECKING:
    from agent.download import DownloadOptions, NetworkFaults
    from edgefleet.wire import BundleRef

__all__ = ["SimDevice"]

T = TypeVar("T")

SIM_FACTS = DeviceFacts(
    device_class="sim",
    arch="aarch64",
    agent_version="0.1.0",
    onnxruntime_version="1.17.0",
    max_opset=20,
)


class SimDevice:
    """One simulated device.

    Args:
        root: directory holding the device's state directory (``root/state``).
        options: agent options (device class ``sim`` by default).
        facts: what the device reports to the verifier (a Raspberry Pi 4 by default).
        clock: the device's UTC clock.
        free_bytes: disk space for new data (None: unlimited).
        fetch: bundle reference -> readable stream for ``install``.
        crash_on_load: sha256 digests of model bytes whose loading kills the process.
        network: the simulated network the device downloads bundles over.
        device_id: its MQTT client id and topic name.
    """

    def __init__(
        self,
        root: Path,
        *,
        options: AgentOptions | None = None,
        facts: DeviceFacts | None = SIM_FACTS,
        clock: Callable[[], datetime] | None = None,
        free_bytes: int | None = None,
        fetch: Callable[[str], IO[bytes]] | None = None,
        crash_on_load: Iterable[str] = (),
        network: SimNetwork | None = None,
        device_id: str = "sim-1",
    ) -> None:
        self.root = Path(root)
        self.state_dir = self.root / "state"
        self.disk = SimDisk(free_bytes=free_bytes)
        self.options = options or AgentOptions(device_class="sim")
        self.facts = facts
        self.clock = clock
        self.fetch: Callable[[str], IO[bytes]] = fetch or (lambda ref: open(ref, "rb"))  # noqa: SIM115
        self.crash_on_load = set(crash_on_load)
        self.agent: Agent | None = None
        self.boots = 0
        self.crashes: list[SimulatedCrash] = []
        self.events: list[UpdateOutcome] = []
        self._session_factory: SessionFactory = self._make_session
        self.network = network
        self.device_id = device_id
        self.link: SimLink | None = None

    # ------------------------------------------------------------- power

    @property
    def up(self) -> bool:
        """Whether an agent is running."""
        return self.agent is not None

    def boot(self) -> Agent | None:
        """Power on: construct the agent (recovery runs). None if it died while booting."""
        if self.agent is not None:
            raise RuntimeError("the device is already running; power_cycle() first")
        self.boots += 1
        try:
            self.agent = Agent(
                self.state_dir,
                self.options,
                fs=self.disk,
                clock=self.clock,
                event_sink=self.events.append,
                session_factory=self._session_factory,
                facts=self.facts,
            )
        except SimulatedCrash as crash:
            self.crashes.append(crash)
            return None
        return self.agent

    def power_cycle(
        self, *, lose_unsynced: bool | None = None, arm: FaultPlan | None = None
    ) -> Agent | None:
        """Cut power (if on), apply the durability model, and boot.

        Args:
            lose_unsynced: drop what was never made durable. Default: only if
                the last crash was a power cut (a killed process loses nothing).
            arm: a fault for the boot that follows (a crash during recovery).
        """
        self.power_off()
        last = self.crashes[-1] if self.crashes else None
        if lose_unsynced is None:
            lose_unsynced = isinstance(last, PowerCut)
        if lose_unsynced:
            self.disk.power_loss()
            lose_unsynced_downloads(self.daemon_dir)
        else:
            self.disk.revive()
        self.disk.arm(arm)
        return self.boot()

    def boot_until_up(self, max_boots: int = 20) -> Agent:
        """Power-cycle until the agent survives its boot.

        Raises:
            RuntimeError: it did not within ``max_boots``.
        """
        for _ in range(max_boots):
            agent = self.agent or self.power_cycle()
            if agent is not None:
                return agent
        raise RuntimeError(f"the device did not come up within {max_boots} boots")

    def power_off(self) -> None:
        """Drop the running agent as a dead process would (lock released, nothing written).

        Its MQTT connection dies with it (no DISCONNECT).
        """
        agent, self.agent = self.agent, None
        link, self.link = self.link, None
        if link is not None:
            link.kill()
        if agent is not None:
            agent.abandon()

    # ------------------------------------------------------------ faults

    def arm(self, plan: FaultPlan | None) -> None:
        """Arm a fault on the k-th disk mutation from now (see ``FaultPlan``)."""
        self.disk.arm(plan)

    def cut_power_at(self, k: int) -> None:
        """Cut the power at the k-th mutation from now."""
        self.disk.arm(FaultPlan(at=k, kind="power"))

    def kill_at(self, k: int) -> None:
        """Kill the agent's process at the k-th mutation from now."""
        self.disk.arm(FaultPlan(at=k, kind="kill"))

    def fail_at(self, k: int, err: int, *, sticky: bool = False) -> None:
        """Make the k-th mutation from now fail with ``OSError(err)``."""
        self.disk.arm(FaultPlan(at=k, kind="oserror", errno=err, sticky=sticky))

    def cut_power_now(self) -> None:
        """Cut the power now, from any thread: the running operation dies at its next step."""
        self.disk.kill(PowerCut("power cut"))

    # --------------------------------------------------------------- run

    def run(self, op: Callable[[Agent], T]) -> T | SimulatedCrash:
        """Run ``op`` on the running agent; a simulated crash turns the device off.

        Returns:
            ``op``'s result, or the crash (the device is then off).

        Raises:
            RuntimeError: the device is off.
        """
        agent = self.agent
        if agent is None:
            raise RuntimeError("the device is off: power_cycle() first")
        try:
            return op(agent)
        except SimulatedCrash as crash:
            self.crashes.append(crash)
            self.power_off()
            return crash

    def install(self, bundle: str | Path) -> InstallResult | SimulatedCrash:
        """Fetch ``bundle`` through the network hook and install it."""
        ref = str(bundle)

        def op(agent: Agent) -> InstallResult:
            with self.fetch(ref) as stream:
                return agent.install(stream, source_name=ref)

        return self.run(op)

    @property
    def daemon_dir(self) -> Path:
        """Where the daemon keeps its files (``downloads/``), as ``agent run`` does."""
        return self.state_dir / "daemon"

    def connect(self) -> SimLink:
        """The running process's MQTT connection (opened on first use).

        Raises:
            RuntimeError: no network, or the device is off.
            MqttError: the broker did not accept the connection.
        """
        if self.network is None:
            raise RuntimeError("this device has no network")
        if self.agent is None:
            raise RuntimeError("the device is off: power_cycle() first")
        if self.link is None:
            self.link = self.network.connect(self.device_id, dead=lambda: self.disk.dead)
        return self.link

    def download_and_install(
        self,
        bundle: BundleRef,
        *,
        faults: NetworkFaults | None = None,
        options: DownloadOptions | None = None,
        update_id: str | None = None,
        deadline_s: float = 30.0,
    ) -> NetworkInstall | SimulatedCrash:
        """Download ``bundle`` over the network and install it.

        See ``firmware_sim.network.download_and_install``; a simulated crash is
        returned (the device is then off), as with ``run``.

        Raises:
            RuntimeError: no network, or the device is off.
            MqttError: the broker did not accept the connection.
            StorageError: the agent could not store its state.
        """
        link = self.connect()
        network = self.network
        assert network is not None

        def op(agent: Agent) -> NetworkInstall:
            return download_and_install(
                agent,
                link,
                bundle,
                daemon_dir=self.daemon_dir,
                options=options or network.options,
                faults=faults,
                update_id=update_id,
                deadline_s=deadline_s,
                dead=lambda: self.disk.dead,
            )

        return self.run(op)

    def status(self) -> dict[str, Any]:
        """The running agent's status.

        Raises:
            RuntimeError: the device is off.
        """
        if self.agent is None:
            raise RuntimeError("the device is off")
        return self.agent.status()

    # ----------------------------------------------------------- runtime

    def _make_session(self, model: bytes, threads: int) -> Session:
        if self.crash_on_load and hashlib.sha256(model).hexdigest() in self.crash_on_load:
            raise self.disk.kill(ProcessKilled("onnxruntime crashed loading the model"))
        return make_session(model, threads)
