"""The fault-injection suite (SPEC T-REL-1, E-14/15/16): its CI variant end to end (the judge on made-up
evidence: tests/unit/chaos/).

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

import pytest

from chaos import faults
from tests import ROOT

# it stops and starts the machine's RabbitMQ (rabbitmqctl stop_app / start_app): no other test may
# run beside it (make test runs it after the parallel part, alone)
pytestmark = pytest.mark.exclusive

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
