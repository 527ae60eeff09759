"""The OpenRouter per-minute budget taken in blocks per process (issue 7, T-PERF-1; R-RATE-1 kept)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
import uuid

from campaign import ratelimit
from campaign.db import db
from tests import ROOT

# One process: take requests as fast as possible from START for SECONDS; print each grant's wall time.
_HAMMER = """
import json, sys, time
from campaign.settings import get_settings
from campaign.db import db, init_db
from campaign import ratelimit
key, per_minute, start, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
init_db(get_settings(), max_connections=2)
db.connect(reuse_if_open=True)
grants, statements = [], 0
while time.time() < start:
    time.sleep(0.005)
while time.time() < start + seconds:
    local = ratelimit._blocks.get(key, (0, 0))[1]
    g = ratelimit.acquire_minute(key, per_minute)
    if g.granted:
        grants.append(time.time())
        if not local:
            statements += 1  # a grant that needed the database (refusals, which also do, are not counted)
    if not g.granted:
        time.sleep(min(g.wait, 0.02))
print(json.dumps({"grants": grants, "statements": statements}))
"""


def _minute_row(key: str) -> tuple:
    return db.execute_sql("SELECT minute_count FROM rate_limits WHERE key = %s", (key,)).fetchone()


def test_a_block_is_taken_once_and_spent_locally(services):
    """The first request of a minute takes a block; the next ones cost no statement."""
    key = f"openrouter:test-{uuid.uuid4().hex[:8]}"
    ratelimit._blocks.pop(key, None)
    with db.connection_context():
        assert ratelimit.acquire_minute(key, 600).granted
        left = ratelimit._blocks[key][1]
        # near a minute boundary the block may already be unusable; otherwise 9 are kept locally
        if time.monotonic() < ratelimit._blocks[key][0]:
            assert left == ratelimit.MINUTE_BLOCK - 1
            assert _minute_row(key) == (ratelimit.MINUTE_BLOCK,)
            assert ratelimit.acquire_minute(key, 600).granted
            assert ratelimit._blocks[key][1] == left - 1
            assert _minute_row(key) == (ratelimit.MINUTE_BLOCK,)  # no statement: the count did not move


def test_the_budget_is_never_exceeded_across_two_processes(services):
    """Two processes hammering one key get at most ``per_minute`` requests in any minute, together."""
    key = f"openrouter:test-{uuid.uuid4().hex[:8]}"
    per_minute = 200  # blocks of 10
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, key, str(per_minute), str(start), "1.5"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    per_min: collections.Counter = collections.Counter()
    for r in results:
        for t in r["grants"]:
            per_min[int(t // 60)] += 1
    total = sum(per_min.values())
    assert max(per_min.values()) <= per_minute, per_min
    assert total >= per_minute, f"the budget was not even used up ({total}): the test proves nothing"
    assert all(r["grants"] for r in results), "one process got nothing: no concurrency was tested"
    statements = sum(r["statements"] for r in results)
    assert statements < total / 2, f"{statements} of {total} grants needed a statement: blocks not used"


def test_a_small_budget_is_shared_one_request_at_a_time(services):
    """Below 20 requests a minute nothing is kept locally: one process cannot hog the budget."""
    key = f"openrouter:test-{uuid.uuid4().hex[:8]}"
    with db.connection_context():
        grants = [ratelimit.acquire_minute(key, 3) for _ in range(4)]
    assert key not in ratelimit._blocks
    # 3 granted, the 4th refused with a wait until the next minute (unless a minute began meanwhile)
    if _minute_row_minute_unchanged(key):
        assert [g.granted for g in grants] == [True, True, True, False]
        assert 0 < grants[-1].wait <= 60


def _minute_row_minute_unchanged(key: str) -> bool:
    with db.connection_context():
        return db.execute_sql("SELECT minute_count = 3 FROM rate_limits WHERE key = %s", (key,)).fetchone()[0]
