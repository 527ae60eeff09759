"""chaos.checks, the fault suite's judge, on made-up evidence: it must be able to say FAIL (SPEC T-REL-1,
E-14/15/16)."""

from __future__ import annotations

from chaos import checks, faults


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
