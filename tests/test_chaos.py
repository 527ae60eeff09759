"""The fault-injection suite (SPEC T-REL-1, E-14/15/16): its CI variant end to end, and its judge.

The CI variant runs ``scripts/fault_suite.py --ci`` as a subprocess (its own database, vhost, sandbox,
worker processes and scheduler; >= 300 messages; one kill -9 mid-send, one RabbitMQ restart, one
pg_terminate_backend, an 8 s gateway outage and a 6 s disconnect of one inbox) and asserts every
line of its verdict table from the JSON report.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from chaos import checks, faults

ROOT = Path(__file__).resolve().parent.parent
CI_BUDGET_S = 240  # the CI variant must finish within 4 minutes

EXPECTED_CHECKS = {
    "messages planned",
    "quiescence reached",
    "messages lost (not terminal)",
    "parts delivered twice (sandbox ledger)",
    "parts 'sent' the sandbox never accepted",
    "accepted sends the engine thinks unsent",
    "runs finalised",
    "verify mismatches",
    "in_doubt parts without a hang/kill/termination",
    "ambiguous sends not left in_doubt",
    "requests before Retry-After elapsed",
    "sends closer than the inbox's min gap",
    "faults injected",
    "messages of 1, 2 and 3 parts",
    "sandbox fault 429 exercised",
    "sandbox fault 500 exercised",
    "sandbox fault accept_then_hang exercised",
    # T-REL-2 / E-23 / E-24: a gateway outage and an inbox disconnect are waited out
    "messages failed/skipped by gateway trouble or a disconnect",
    "inboxes left disabled",
}


def test_ci_variant_passes_every_check(tmp_path):
    """T-REL-1 (CI size): nothing lost, nothing sent twice, runs finalised, counters right, in_doubt
    only where ambiguous, Retry-After honoured, inbox gaps kept; under 4 minutes."""
    seed = random.SystemRandom().randrange(1, 2**31)
    report = tmp_path / "chaos.json"
    cmd = [
        sys.executable,
        "scripts/fault_suite.py",
        "--ci",
        "--seed",
        str(seed),
        "--report",
        str(report),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=CI_BUDGET_S + 60)
    out = done.stdout + done.stderr[-6000:]
    assert report.exists(), f"no report (exit {done.returncode}):\n{out}"
    result = json.loads(report.read_text())
    assert "error" not in result, f"aborted: {result.get('error')}\n{out}"
    by_name = {c["name"]: c for c in result["checks"]}
    assert set(by_name) == EXPECTED_CHECKS, set(by_name) ^ EXPECTED_CHECKS
    failed = [
        f"{c['name']}: {c['value']} (expected {c['expected']}) {c['note']}" for c in result["checks"] if not c["ok"]
    ]
    assert not failed, f"seed {seed} failed checks:\n" + "\n".join(failed) + f"\nproblems: {result['problems']}\n{out}"
    assert done.returncode == 0, out
    assert result["facts"]["messages_by_status"] and sum(result["facts"]["messages_by_status"].values()) >= 300
    kinds = sorted(r["kind"] for r in result["recoveries"])
    assert kinds == sorted(
        [faults.KILL_MID_SEND, faults.RABBIT_RESTART, faults.PG_TERMINATE, faults.GATEWAY_OUTAGE, faults.DISCONNECT]
    ), kinds
    # every fault was followed by sends again (the engine recovered from each)
    assert all(r["next_send_s"] is not None for r in result["recoveries"]), result["recoveries"]
    assert result["duration_s"] < CI_BUDGET_S, f"CI variant took {result['duration_s']} s (budget {CI_BUDGET_S} s)"
    assert f"--seed {seed}" in result["replay"]


# -- the judge on made-up evidence (it must be able to say FAIL) ----------------------------------


def _part(pid: int, status: str, sending_at: float, text: str = "t", key: str | None = None) -> tuple:
    return (pid, pid, 0, status, sending_at, key, None, f"{text}{pid}", "inst", "+55 11 90000-0000")


def _send(pid: int, outcome: str = "ok", seen: bool = True, text: str = "t") -> dict:
    return {
        "instance": "inst",
        "number": "5511900000000",
        "text": f"{text}{pid}",
        "outcome": outcome,
        "seen": seen,
        "key_id": f"K{pid}",
        "t": 100.0 + pid,
    }


def test_in_doubt_is_explained_only_by_a_hang_or_a_fault_nearby():
    events = [faults.FaultEvent(faults.KILL, 0.5, t=500.0, t_end=500.0, progress=0.5, details={})]
    parts = [
        _part(1, "in_doubt", 101.0),
        _part(2, "in_doubt", 499.8),
        _part(3, "in_doubt", 300.0),
        _part(4, "sent", 104.0, key="K4"),
    ]
    sends = [_send(1, outcome="hang", seen=False), _send(4)]
    causes, problems, ambiguous = checks.classify_in_doubt(parts, sends, events, send_reach_s=7.0)
    assert causes["sandbox hang after accept (read timeout)"] == 1
    assert causes["worker killed mid-send (no send accepted)"] == 1
    assert causes["UNEXPLAINED"] == 1 and "part 3" in problems[0]  # nothing ambiguous near part 3
    assert ambiguous == []


def test_a_hung_send_whose_part_ended_sent_is_reported():
    parts = [_part(1, "sent", 101.0, key="K1")]
    causes, problems, ambiguous = checks.classify_in_doubt(parts, [_send(1, outcome="hang", seen=False)], [], 7.0)
    assert len(ambiguous) == 1 and "is sent" in ambiguous[0]


def test_ledger_and_parts_must_agree():
    parts = [_part(1, "sent", 1.0, key="K1"), _part(2, "sent", 1.0, key="NOT-IN-LEDGER"), _part(3, "failed", 1.0)]
    sent_without_ledger, unaccounted = checks.ledger_vs_parts(parts, [_send(1), _send(3)])
    assert sent_without_ledger == ["part 2 key NOT-IN-LEDGER"]
    assert len(unaccounted) == 1 and "part 3 is failed" in unaccounted[0]


def test_inbox_gap_violations_use_arrival_times():
    reqs = [
        {"route": "send", "instance": "a", "t": 10.05, "latency_ms": 50},  # arrived 10.00
        {"route": "send", "instance": "a", "t": 10.11, "latency_ms": 10},  # arrived 10.10: 0.10 later
        {"route": "send", "instance": "a", "t": 10.15, "latency_ms": 0},  # 0.05 later: too close
        {"route": "send", "instance": "b", "t": 10.16, "latency_ms": 0},
    ]  # another inbox: no gap
    violations, smallest = checks.gap_violations(reqs, min_gap=0.1, tolerance=0.01)
    assert smallest is not None
    assert violations == 1 and abs(smallest - 0.05) < 1e-6


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
