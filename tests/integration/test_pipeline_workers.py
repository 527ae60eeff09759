"""The pipeline on real RabbitMQ + PostgreSQL + the sandbox, in real ``dramatiq`` worker processes."""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest

from campaign import dispatch, recovery, steps
from campaign.db import db
from campaign.settings import get_settings
from devtools.services import purge_queues, sandbox_env, start_worker, stop_worker
from models import CampaignMessage, DeadLetter, Lead
from tests.integration import factories as f
from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, make_world, run_counters
from tests.integration.workers import wait_for


@pytest.fixture
def engine(clean_db, sb, tmp_path):
    """Start/stop real worker processes wired to the sandbox; queues purged before and after."""
    import actors

    queues = tuple(sorted(actors.broker.get_declared_queues()))
    purge_queues(get_settings().rabbitmq_url, queues)
    procs = []
    env = {
        **sandbox_env(sb),
        "MIN_BACKOFF_SECONDS": "0.05",
        "MAX_BACKOFF_SECONDS": "1",
        "MAX_ATTEMPTS": "4",
        "LEASE_SECONDS": "5",
        "SEND_TIMEOUT_SECONDS": "2",
    }

    class Engine:
        log = tmp_path / "worker.log"

        def start(self, processes: int = 2, threads: int = 4, **extra: str):
            proc = start_worker(processes=processes, threads=threads, extra_env={**env, **extra}, log_path=self.log)
            procs.append(proc)
            return proc

        def dispatch_all(self, timeout: float = 60) -> None:
            """Run the dispatcher until nothing pending is left."""
            settings = get_settings()
            deadline = time.monotonic() + timeout
            while True:
                dispatch.dispatch_due(settings)
                left = db.execute_sql("SELECT count(*) FROM campaign_messages WHERE status = 'pending'").fetchone()[0]
                if not left:
                    return
                assert time.monotonic() < deadline, "dispatch did not drain"
                time.sleep(0.2)

        def wait_terminal(self, timeout: float = 120) -> None:
            def done():
                return (
                    db.execute_sql(
                        "SELECT count(*) FROM campaign_messages WHERE status NOT IN "
                        "('sent', 'failed', 'skipped', 'in_doubt')"
                    ).fetchone()[0]
                    == 0
                )

            try:
                wait_for(done, timeout=timeout, interval=0.25, message="every message to be terminal")
            except AssertionError:
                rows = db.execute_sql("SELECT status, count(*) FROM campaign_messages GROUP BY 1").fetchall()
                raise AssertionError(
                    f"not terminal: {rows}\nworker log tail:\n{self.log.read_text()[-4000:]}"
                ) from None

    yield Engine()
    for proc in procs:
        stop_worker(proc)
    purge_queues(get_settings().rabbitmq_url, queues)


def _sends(sb) -> list[dict]:
    return sb.ledger()["sends"]


def _assert_each_part_once(sb) -> None:
    sends = _sends(sb)
    counts = collections.Counter((s["instance"], s["number"], s["text"]) for s in sends)
    assert [k for k, n in counts.items() if n > 1] == []
    assert sb.summary()["duplicate_sends"] == 0
    sent_parts = db.execute_sql("SELECT p.provider_message_id FROM message_parts p WHERE p.status = 'sent'").fetchall()
    assert sorted(r[0] for r in sent_parts) == sorted(s["key_id"] for s in sends if s["outcome"] == "ok")


def test_run_of_200_messages_over_3_inboxes(engine, sb):
    ws, cols = f.workspace("acme")
    runs = []
    for i in range(3):
        ibx = f.inbox(ws, f"sales-{i}", min_gap_seconds=0)
        cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name=f"camp-{i}", split_enabled=True, max_parts=3)
        run = f.run(cfg)
        n = 67 if i < 2 else 66
        for _ in range(n):
            f.message(run, f.lead(ws, cols["New"], custom_fields={"city": "Recife"}))
        run.leads_total = n
        run.save()
        runs.append(run)
    engine.start(processes=2, threads=4)
    engine.dispatch_all()
    engine.wait_terminal(timeout=180)
    for run in runs:
        c = run_counters(run.id)
        assert c["status"] == "completed" and c["leads_sent"] == c["leads_total"], c
        assert_counters_match(run.id)
    _assert_each_part_once(sb)
    parts_per_message = collections.Counter(
        r[0] for r in db.execute_sql("SELECT count(*) FROM message_parts GROUP BY message_id").fetchall()
    )
    assert min(parts_per_message) == 1 and 1 < max(parts_per_message) <= 3, parts_per_message
    assert Lead.select().where(Lead.column == cols["Contacted"]).count() == 200
    assert DeadLetter.select().count() == 0


def test_duplicate_deliveries_and_racing_workers_have_one_effect(engine, sb):
    """E-03: every step delivered three times, to two worker processes racing: one effect each."""
    from actors.generate import generate
    from actors.send import send_part
    from actors.split import split

    w = make_world(split=True, max_parts=3)
    msgs = w.add_leads(20)
    db.execute_sql("UPDATE campaign_messages SET status = 'queued'")
    for m in msgs:
        for _ in range(3):
            generate.send(m.id)
    engine.start(processes=2, threads=4)
    engine.wait_terminal(timeout=90)
    # and late duplicates of every later step change nothing
    for m in msgs:
        split.send(m.id)
        send_part.send(m.id, w.inboxes[0].id)
    time.sleep(3)
    assert run_counters(w.run.id)["leads_sent"] == 20
    assert_counters_match(w.run.id)
    _assert_each_part_once(sb)
    assert len({s["number"] for s in _sends(sb)}) == 20


def test_kill_9_mid_send_makes_that_part_in_doubt_and_the_run_completes(engine, sb):
    """E-14: a worker killed during a send: that part in_doubt, nothing resent, the rest completes."""
    ws, cols = f.workspace("acme")
    runs = []
    for i in range(3):
        ibx = f.inbox(ws, f"sales-{i}", min_gap_seconds=0)
        cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name=f"camp-{i}")
        run = f.run(cfg, leads_total=3)
        for _ in range(3):
            f.message(run, f.lead(ws, cols["New"]))
        runs.append(run)
    sb.set_faults(send={"latency_ms": 1500})
    first = engine.start(processes=1, threads=4, SEND_TIMEOUT_SECONDS="10")
    engine.dispatch_all()
    wait_for(
        lambda: db.execute_sql("SELECT count(*) FROM message_parts WHERE status = 'sending'").fetchone()[0],
        timeout=30,
        interval=0.05,
        message="a send in flight",
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    # read after the kill: another inbox's send may start between a read and the kill, and the
    # dead worker can change nothing any more
    in_flight = {r[0] for r in db.execute_sql("SELECT message_id FROM message_parts WHERE status = 'sending'")}
    assert in_flight
    sb.set_faults(send={"latency_ms": 0})
    engine.start(processes=1, threads=4, SEND_TIMEOUT_SECONDS="10")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the scheduler's sweep, at test speed
        recovery.recovery_sweep(fast_settings(send_timeout_seconds=10))
        if (
            db.execute_sql(
                "SELECT count(*) FROM campaign_messages WHERE status NOT IN ('sent', 'failed', 'skipped', 'in_doubt')"
            ).fetchone()[0]
            == 0
        ):
            break
        time.sleep(1)
    engine.wait_terminal(timeout=5)
    statuses = {m.id: m.status for m in CampaignMessage.select()}
    assert all(statuses[mid] == "in_doubt" for mid in in_flight), (in_flight, statuses)
    assert all(s == "sent" for mid, s in statuses.items() if mid not in in_flight)
    _assert_each_part_once(sb)
    for run in runs:
        assert run_counters(run.id)["status"] == "completed"
        assert_counters_match(run.id)


def test_throttled_inbox_does_not_slow_the_other(engine, sb):
    """R-RATE-3: inbox A paced at 1.5 s between sends, inbox B free: B finishes long before A."""
    ws, cols = f.workspace("acme")
    slow = f.inbox(ws, "slow", min_gap_seconds=1.5)
    fast = f.inbox(ws, "fast", min_gap_seconds=0)
    runs = {}
    for ibx, n in ((slow, 5), (fast, 20)):
        cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name=f"camp-{ibx.name}")
        run = f.run(cfg, leads_total=n)
        for _ in range(n):
            f.message(run, f.lead(ws, cols["New"]))
        runs[ibx.instance_name] = run
    engine.start(processes=2, threads=4)
    engine.dispatch_all()
    engine.wait_terminal(timeout=90)
    by_inbox = collections.defaultdict(list)
    for s in _sends(sb):
        by_inbox[s["instance"]].append(s["t"])
    slow_times = sorted(by_inbox[slow.instance_name])
    fast_times = sorted(by_inbox[fast.instance_name])
    assert len(slow_times) == 5 and len(fast_times) == 20
    gaps = [b - a for a, b in zip(slow_times, slow_times[1:])]
    assert min(gaps) >= 1.5 - 0.05, gaps  # the configured floor (minus clock granularity)
    assert fast_times[-1] < slow_times[-1] - 2.0, (fast_times[-1], slow_times[-1])
    assert DeadLetter.select().count() == 0  # throttling never spends a retry nor dead-letters
    assert _xq_depth() == 0
    for run in runs.values():
        assert run_counters(run.id)["status"] == "completed"


def _xq_depth() -> int:
    import pika

    params = pika.URLParameters(get_settings().rabbitmq_url)
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        total = 0
        for q in steps.QUEUES:
            total += ch.queue_declare(queue=f"{q}.XQ", passive=True).method.message_count
        return total
    finally:
        conn.close()
