"""chaos.faults: the fault plan is seeded, spaced and complete, in both profiles (SPEC T-REL-1, T-REL-2)."""

from __future__ import annotations

import random

from chaos import faults


def test_fault_plan_is_seeded_spaced_and_complete():
    counts = {faults.KILL_MID_SEND: 1, faults.KILL: 2, faults.RABBIT_RESTART: 1, faults.PG_TERMINATE: 2}
    plan = faults.plan_faults(random.Random(42), counts, lo=0.08, hi=0.85, min_spacing=0.1)
    assert plan == faults.plan_faults(random.Random(42), counts, lo=0.08, hi=0.85, min_spacing=0.1)
    assert sorted(f.kind for f in plan) == sorted(k for k, n in counts.items() for _ in range(n))
    points = [f.at_progress for f in plan]
    assert points == sorted(points) and 0.08 <= points[0] and points[-1] <= 0.85
    assert all(b - a >= 0.1 - 1e-3 for a, b in zip(points, points[1:]))
    assert all(1.0 <= f.outage_s <= 3.0 for f in plan if f.kind == faults.RABBIT_RESTART)


def test_both_profiles_plan_the_outage_and_the_disconnect():
    """T-REL-2: the full run has a 60 s gateway outage and a 30 s disconnect; CI a short one of each."""
    from chaos import run

    for profile, outage, disconnect in ((run.FULL, 60.0, 30.0), (run.CI, 8.0, 6.0)):
        plan = faults.plan_faults(
            random.Random(7),
            profile.fault_counts,
            lo=profile.progress_window[0],
            hi=profile.progress_window[1],
            min_spacing=profile.fault_spacing,
            durations=profile.durations,
        )
        by_kind = {f.kind: f for f in plan}
        assert by_kind[faults.GATEWAY_OUTAGE].outage_s == outage
        assert by_kind[faults.DISCONNECT].outage_s == disconnect
    assert "INBOX_FAILURE_LIMIT" not in run.ENGINE_ENV  # no setting that keeps E-23 from showing
