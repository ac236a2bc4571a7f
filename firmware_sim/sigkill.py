"""SIGKILL campaign: kill real ``edgefleet agent install`` processes at random moments.

Flow: ``KillCampaign.prepare`` makes a release (keys, a good v2 and a bad
NaN-producing v5 bundle) and a template state directory with v1 committed,
then calibrates: how long an uninterrupted install takes in total, and from
its first state store to its exit (the *update window*). Each run copies the
template, starts ``python -m edgefleet.cli agent install BUNDLE --state-dir
DIR --json``, and SIGKILLs it: most runs wait until ``state.json`` first
changes (the update has begun) and then a uniform random delay within the
update window; the rest kill at a uniform moment of the whole process
lifetime (imports, start-up, pinning included). The process gets no chance
to clean up; the page cache survives, as after a real SIGKILL.

Then a new ``Agent`` on the directory (the restart) runs recovery, and
``firmware_sim.campaign.check_device`` checks the invariants; every
``cli_status_every``-th run also compares ``edgefleet agent status --json``
from a fresh process with what is on disk. ``benchmarks/reliability.py``
(hundreds of runs) and ``tests/firmware_sim/test_sigkill.py`` (a few) share
this code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.core import Agent, read_status
from agent.options import AgentOptions
from firmware_sim.campaign import CampaignFailure, check_device
from firmware_sim.models import BundleSet

__all__ = ["KillCampaign", "KillRun", "summarize"]

_ALLOWED = {"good": {("tiny", 1), ("tiny", 2)}, "bad": {("tiny", 1)}}


@dataclass(frozen=True)
class KillRun:
    """One killed install and what recovery made of it."""

    index: int
    bundle: str  # "good" or "bad"
    anchored: bool  # the kill was timed from the first state store
    delay_ms: float
    exited: int | None  # the process's exit status if it finished before the kill
    state_at_kill: str  # the persisted state the kill left behind
    final: str  # "tiny v1", "tiny v2" or "none" after recovery
    cli_checked: bool


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet.cli", "agent", *argv]


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KillCampaign:
    """A prepared campaign in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, bundles: BundleSet, template: Path) -> None:
        self.workdir = workdir
        self.bundles = bundles
        self.template = template
        self.paths = {"good": bundles.v2, "bad": bundles.nan}
        self.total_s = 1.0
        self.window_s = 0.05

    @classmethod
    def prepare(cls, workdir: Path, bundles: BundleSet | None = None) -> KillCampaign:
        """Build (or reuse) the bundles, the v1 template, and calibrate the timings."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        bundles = bundles or BundleSet.build(workdir / "release")
        template = workdir / "template"
        if template.exists():
            shutil.rmtree(template)
        with Agent(template, AgentOptions()) as agent:
            agent.pin_trust_root(bundles.release.trust_root_bytes)
            if not agent.install(bundles.v1).ok:
                raise RuntimeError("the template install of v1 failed")
        campaign = cls(workdir, bundles, template)
        campaign.calibrate()
        return campaign

    def _copy(self, name: str) -> Path:
        target = self.workdir / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.template, target)
        return target

    def calibrate(self, rounds: int = 2) -> None:
        """Measure uninterrupted installs: whole process, and first to last state store."""
        totals, windows = [], []
        for i in range(rounds):
            for kind in ("good", "bad"):
                state_dir = self._copy(f"calibrate-{i}-{kind}")
                before = _stat(state_dir / "state.json")
                start = time.perf_counter()
                proc = subprocess.Popen(
                    _cli("install", str(self.paths[kind]), "--state-dir", str(state_dir), "--json"),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                first = last = None
                seen = before
                while proc.poll() is None:
                    now_stat = _stat(state_dir / "state.json")
                    if now_stat != seen:
                        seen = now_stat
                        last = time.perf_counter()
                        first = first or last
                end = time.perf_counter()
                totals.append(end - start)
                # From the first state store to the last: the update itself, not the
                # interpreter's start-up and shutdown around it.
                windows.append((last or end) - (first or end))
                shutil.rmtree(state_dir)
        self.total_s = statistics.median(totals)
        self.window_s = max(statistics.median(windows), 0.005)

    def run(
        self,
        runs: int,
        *,
        seed: int = 0,
        anchored_share: float = 0.8,
        cli_status_every: int = 1,
        progress: Callable[[KillRun], None] | None = None,
    ) -> list[KillRun]:
        """Kill ``runs`` installs and check each recovery.

        Raises:
            CampaignFailure: a recovered device breaks an invariant (names the run).
        """
        rng = random.Random(seed)
        out = []
        for index in range(runs):
            result = self._one(index, rng, anchored_share, cli_status_every)
            out.append(result)
            if progress is not None:
                progress(result)
        return out

    def _one(
        self, index: int, rng: random.Random, anchored_share: float, cli_every: int
    ) -> KillRun:
        kind = "good" if index % 2 == 0 else "bad"
        state_dir = self._copy(f"run-{index}")
        state_file = state_dir / "state.json"
        before = _stat(state_file)
        anchored = rng.random() < anchored_share
        delay = rng.uniform(0, self.window_s * 1.2 if anchored else self.total_s * 1.1)
        proc = subprocess.Popen(
            _cli("install", str(self.paths[kind]), "--state-dir", str(state_dir), "--json"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if anchored:
            deadline = time.monotonic() + 30
            while proc.poll() is None and _stat(state_file) == before:
                if time.monotonic() > deadline:
                    break
        time.sleep(delay)
        exited = proc.poll()
        if exited is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state_at_kill = json.loads(state_file.read_bytes())["state"]
        where = f"run {index} ({kind}, {'anchored' if anchored else 'free'}, {delay * 1000:.1f} ms)"
        try:
            with Agent(state_dir) as agent:
                status = check_device(state_dir, _ALLOWED[kind], agent=agent)
            cli_checked = cli_every > 0 and index % cli_every == 0
            if cli_checked:
                self._compare_cli(state_dir, status)
        except CampaignFailure as exc:
            raise CampaignFailure(f"{where}, killed in {state_at_kill}: {exc}") from exc
        active = status["active"]
        final = "none" if active is None else f"{active['model']} v{active['version']}"
        shutil.rmtree(state_dir)
        return KillRun(
            index, kind, anchored, delay * 1000, exited, state_at_kill, final, cli_checked
        )

    @staticmethod
    def _compare_cli(state_dir: Path, status: dict[str, Any]) -> None:
        proc = subprocess.run(
            _cli("status", "--state-dir", str(state_dir), "--json"),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise CampaignFailure(f"agent status exited {proc.returncode}: {proc.stdout}")
        printed = json.loads(proc.stdout)
        disk = read_status(state_dir)
        for key in ("state", "active", "rollback_floor", "last_error"):
            if printed[key] != disk[key] or printed[key] != status[key]:
                raise CampaignFailure(
                    f"agent status prints {key}={printed[key]!r}, not {disk[key]!r}"
                )


def summarize(runs: list[KillRun], elapsed_s: float) -> dict[str, Any]:
    """Counts by persisted state at the kill and by final model, for reports."""
    return {
        "runs": len(runs),
        "failures": 0,
        "elapsed_s": round(elapsed_s, 2),
        "killed": sum(1 for r in runs if r.exited is None),
        "finished_before_kill": sum(1 for r in runs if r.exited is not None),
        "anchored": sum(1 for r in runs if r.anchored),
        "cli_status_checked": sum(1 for r in runs if r.cli_checked),
        "state_at_kill": dict(Counter(r.state_at_kill for r in runs).most_common()),
        "final": {
            kind: dict(Counter(r.final for r in runs if r.bundle == kind))
            for kind in ("good", "bad")
        },
    }


def as_dicts(runs: list[KillRun]) -> list[dict[str, Any]]:
    """Runs as JSON-ready dicts."""
    return [asdict(r) for r in runs]
