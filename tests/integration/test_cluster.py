"""T-REL-3 on a real 3-node RabbitMQ cluster (devtools/rabbit_cluster.py), quorum queues.

The cluster is three extra nodes of the installed RabbitMQ on their own ports and data
directories (the machine's node is never touched). A campaign of 500 messages runs through real
workers; the node every process is connected to is killed with SIGKILL mid-run and restarted:
0 lost, 0 duplicate, every message final (SPEC T-REL-3, R-SCALE-1, R-SCALE-2).
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from campaign import dispatch, recovery
from campaign.db import db
from campaign.settings import get_settings
from devtools.rabbit_cluster import Cluster, free_port_block
from tests.integration import factories as f
from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, run_counters
from tests.integration.workers import quorum_engine_on, wait_for

# three more RabbitMQ nodes and worker processes on a 2-core machine, and a node SIGKILLed: make
# test runs it after the parallel part, alone
pytestmark = pytest.mark.exclusive

TOTAL = 500


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="ce-test-cluster-"))  # /tmp: reachable by the rabbitmq user
    c = Cluster(base, free_port_block())
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def _types_and_members(cluster: Cluster) -> dict[str, tuple[str, int]]:
    """{queue: (type, replica count)} of the cluster's default vhost, as RabbitMQ reports it."""
    out = cluster.ctl(cluster.nodes[1], "list_queues", "name", "type", "members", "--formatter", "json")
    return {q["name"]: (q["type"], len(q.get("members") or [])) for q in json.loads(out)}


def test_t_rel_3_a_node_killed_mid_run_loses_nothing_and_sends_nothing_twice(
    cluster, clean_db, sb, tmp_path, monkeypatch
):
    log = tmp_path / "worker.log"
    with quorum_engine_on(cluster.url(), sb, log, monkeypatch, processes=2, HANDOFF_GRACE_SECONDS="3"):
        ws, cols = f.workspace("acme")
        inboxes = [f.inbox(ws, f"sales-{i}", min_gap_seconds=0) for i in range(2)]
        runs = []
        for i, ibx in enumerate(inboxes):
            cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name=f"c{i}", split_enabled=True, max_parts=3)
            run = f.run(cfg)
            for _ in range(TOTAL // 2):
                f.message(run, f.lead(ws, cols["New"]))
            run.leads_total = TOTAL // 2
            run.save()
            runs.append(run)
        deadline = time.monotonic() + 120
        while db.execute_sql("SELECT count(*) FROM campaign_messages WHERE status = 'pending'").fetchone()[0]:
            assert time.monotonic() < deadline, "dispatch did not drain"
            dispatch.dispatch_due(get_settings())
            time.sleep(0.2)
        wait_for(lambda: len(sb.ledger()["sends"]) >= 150, timeout=120, message="the run to be under way")
        victim = cluster.nodes[0]  # every client connected to the first node of RABBITMQ_URL
        cluster.kill_node(victim)
        final_at_kill = db.execute_sql(
            "SELECT count(*) FROM campaign_messages WHERE status IN ('sent', 'failed', 'skipped', 'in_doubt')"
        ).fetchone()[0]
        time.sleep(3)
        cluster.start_node(victim)
        cluster.await_node(victim)

        sweeps: list[float] = []

        def terminal() -> bool:
            # the scheduler's recovery sweep, as often as a test-speed scheduler would run it: a
            # publish refused while the queues elect new leaders (RabbitMQ nacks it for a few
            # seconds) is re-published from PostgreSQL's wake_at (R-FAIL-8), as in production
            if not sweeps or time.monotonic() - sweeps[-1] > 2:
                sweeps.append(time.monotonic())
                recovery.recovery_sweep(fast_settings())
            return not db.execute_sql(
                "SELECT count(*) FROM campaign_messages WHERE status NOT IN ('sent', 'failed', 'skipped', 'in_doubt')"
            ).fetchone()[0]

        try:
            wait_for(terminal, timeout=300, interval=0.5, message="every message to be terminal")
        except AssertionError:
            rows = db.execute_sql("SELECT status, count(*) FROM campaign_messages GROUP BY 1").fetchall()
            raise AssertionError(f"not terminal: {rows}; worker log tail:\n{log.read_text()[-4000:]}") from None
    assert final_at_kill < TOTAL - 50, f"the node died with {final_at_kill} of {TOTAL} final: too late to test anything"
    for run in runs:
        c = run_counters(run.id)
        assert c["status"] == "completed", c
        assert_counters_match(run.id)
    statuses = dict(db.execute_sql("SELECT status, count(*) FROM campaign_messages GROUP BY 1").fetchall())
    assert set(statuses) <= {"sent", "in_doubt"} and sum(statuses.values()) == TOTAL, statuses
    sends = sb.ledger()["sends"]
    counts = collections.Counter((s["instance"], s["number"], s["text"]) for s in sends)
    assert [k for k, n in counts.items() if n > 1] == [] and sb.summary()["duplicate_sends"] == 0
    sent_parts = db.execute_sql("SELECT provider_message_id FROM message_parts WHERE status = 'sent'").fetchall()
    assert sorted(r[0] for r in sent_parts) == sorted(s["key_id"] for s in sends if s["outcome"] == "ok")
    assert "Restarting consumer" in log.read_text()  # the workers did lose their node
    members = _types_and_members(cluster)
    assert members and all(t == "quorum" and n == 3 for t, n in members.values()), members
