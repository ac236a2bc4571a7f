"""Reliability campaigns for the device agent (make reliability).

1. SIGKILL: ``--runs N`` (default 200) real ``edgefleet agent install``
   processes killed at random moments; each restart must recover to a model
   that loads, hashes to its manifest and matches ``agent status``.
2. Every-mutation sweeps (``--sweeps``, on by default): for install, bad
   install and rollback, the k-th disk mutation fails / kills / cuts the power,
   for every k, plus a second power cut at every mutation of each recovery.

Usage: ``python benchmarks/reliability.py [--runs N] [--seed S] [--json]``.
Exit status 0 only if every run recovered; a failure prints the run and the
broken invariant. The baseline of each campaign is its fault-free reference
run, executed and checked first in the same process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.options import AgentOptions
from firmware_sim.campaign import CampaignFailure, Scenario, prepare_template, sweep
from firmware_sim.device import SimDevice
from firmware_sim.models import BundleSet
from firmware_sim.sigkill import KillCampaign, summarize


def scenarios(b: BundleSet) -> list[Scenario]:
    opts = AgentOptions(device_class="sim", health_runs=1)

    def v1(dev: SimDevice) -> None:
        assert dev.agent is not None
        dev.agent.pin_trust_root(b.release.trust_root_bytes)
        assert dev.agent.install(b.v1).ok

    def v1_v2(dev: SimDevice) -> None:
        v1(dev)
        assert dev.agent is not None and dev.agent.install(b.v2).ok

    one, two, three = ("tiny", 1), ("tiny", 2), ("tiny", 3)
    return [
        Scenario("upgrade", v1_v2, lambda a: a.install(b.v3), {two, three}, opts,
                 durable=("committed", three)),
        Scenario("bad_upgrade", v1, lambda a: a.install(b.nan), {one}, opts,
                 durable=("rolled-back", one)),
        Scenario("rollback", v1_v2, lambda a: a.rollback(), {one, two}, opts,
                 durable=("rolled-back", one)),
    ]  # fmt: skip


def run_sweeps(bundles: BundleSet, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario in scenarios(bundles):
        template = prepare_template(scenario, work)
        for mode in ("oserror", "kill", "power"):
            start = time.perf_counter()
            runs = sweep(scenario, mode, work, template=template, double=mode == "power")
            out[f"{scenario.name}/{mode}"] = {
                "runs": len(runs),
                "mutations": max(r.k for r in runs),
                "double_faults": sum(1 for r in runs if r.recovery_cut),
                "final": sorted({str(r.active) for r in runs}),
                "seconds": round(time.perf_counter() - start, 2),
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="SIGKILL runs (200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cli-status-every",
        type=int,
        default=5,
        help="compare 'agent status' from a new process every N runs (5)",
    )
    parser.add_argument("--no-sweeps", action="store_true", help="only the SIGKILL campaign")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    # Injected EIO makes the agent log warnings by design; the report says what matters.
    logging.getLogger("edgefleet.agent").setLevel(logging.ERROR)
    report: dict[str, Any] = {"ok": True}
    with tempfile.TemporaryDirectory(prefix="edgefleet-reliability-") as tmp:
        work = Path(tmp)
        try:
            campaign = KillCampaign.prepare(work / "sigkill")
            report["calibration"] = {
                "install_process_ms": round(campaign.total_s * 1000, 1),
                "update_window_ms": round(campaign.window_s * 1000, 1),
            }
            start = time.perf_counter()

            def progress(run: Any) -> None:
                if not args.json and (run.index + 1) % 25 == 0:
                    print(f"  sigkill {run.index + 1}/{args.runs}", file=sys.stderr)

            runs = campaign.run(
                args.runs, seed=args.seed, cli_status_every=args.cli_status_every, progress=progress
            )
            report["sigkill"] = summarize(runs, time.perf_counter() - start)
            if not args.no_sweeps:
                report["sweeps"] = run_sweeps(campaign.bundles, work / "sweeps")
        except CampaignFailure as exc:
            report["ok"] = False
            report["failure"] = str(exc)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
