"""SIGKILL real ``edgefleet agent install`` processes; every restart recovers cleanly.

The same campaign runs hundreds of times in ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import pytest

from firmware_sim.sigkill import KillCampaign


@pytest.mark.slow
def test_install_sigkill_random_moments(tmp_path):
    campaign = KillCampaign.prepare(tmp_path)
    assert 0 < campaign.window_s < campaign.total_s
    runs = campaign.run(15, seed=20261125, cli_status_every=3)
    assert len(runs) == 15
    assert sum(r.exited is None for r in runs) >= 10, "most runs are killed mid-flight"
    assert {r.final for r in runs if r.bundle == "bad"} == {"tiny v1"}
    assert {r.final for r in runs if r.bundle == "good"} <= {"tiny v1", "tiny v2"}
    assert any(r.cli_checked for r in runs)
