"""Dispatching and keeping runs in their window on the real services (R-DISP-1/3/4, E-03, E-06)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading

import pytest

from campaign import dispatch, outcomes, runs, steps
from campaign.db import db
from campaign.ops.monitor import SYSTEM_QUEUE, verify
from campaign.settings import get_settings
from devtools import services
from models import CampaignMessage, CampaignRun
from tests.integration import factories as f

UTC = dt.UTC
_lead_blocks = itertools.count(1)


def purge_queues() -> None:
    """Empty every pipeline queue (and its .DQ/.XQ) of the test vhost with a pika connection of our own
    (the broker's thread-local connection may have been closed by an earlier test)."""
    services.purge_queues(get_settings().rabbitmq_url, (*steps.QUEUES, SYSTEM_QUEUE))


@pytest.fixture
def broker_queues(clean_db):
    """The test vhost's queues emptied before and after."""
    purge_queues()
    yield
    purge_queues()


def _due_run(
    ws, cols, cfg, n: int, *, scheduled_at: dt.datetime, status: str = "running", run_date: dt.date | None = None
) -> CampaignRun:
    """A run with ``n`` pending messages at ``scheduled_at`` (bulk, like the planner writes them)."""
    f.bulk_leads(ws, cols["New"], n, start=next(_lead_blocks) * 100_000)
    run = f.run(
        cfg,
        run_date=run_date or scheduled_at.date(),
        status=status,
        leads_total=n,
        **({"pause_reason": "manual"} if status == "paused" else {}),
    )
    db.execute_sql(
        """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
                      SELECT %s, l.id, %s, %s FROM leads l
                       WHERE l.workspace_id = %s
                         AND NOT EXISTS (SELECT 1 FROM campaign_messages m WHERE m.lead_id = l.id)
                       ORDER BY l.id LIMIT %s""",
        (run.id, cfg.inbox_id, scheduled_at, ws.id, n),
    )
    return run


def _drain(queue: str) -> list[int]:
    """Every message id waiting in ``queue`` (consumed with acks), via pika."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    ids: list[int] = []
    try:
        ch = conn.channel()
        while True:
            method, _, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(json.loads(body)["args"][0])
    finally:
        conn.close()


def test_two_dispatchers_claim_each_message_exactly_once(world, broker_queues):
    """R-DISP-1 / E-03: two dispatchers on separate connections over 5,000 due messages."""
    ws, cols, _, cfg = world
    now = dt.datetime.now(UTC)
    run = _due_run(ws, cols, cfg, 5000, scheduled_at=now - dt.timedelta(seconds=5))
    settings = get_settings()
    counts: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def dispatcher():
        total = 0
        try:
            with db.connection_context():
                barrier.wait()
                while (n := dispatch.dispatch_due(settings)) > 0:
                    total += n
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        counts.append(total)

    threads = [threading.Thread(target=dispatcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(counts) == 5000 and all(c > 0 for c in counts), counts  # both worked, together exactly once
    statuses = dict(
        db.execute_sql(
            "SELECT status, count(*) FROM campaign_messages WHERE run_id = %s GROUP BY 1", (run.id,)
        ).fetchall()
    )
    assert statuses == {"queued": 5000}
    published = _drain(steps.GENERATE.queue)
    assert len(published) == 5000 and len(set(published)) == 5000
    assert set(published) == {m.id for m in CampaignMessage.select(CampaignMessage.id)}


def test_dispatch_claims_only_due_messages_of_running_runs(world, broker_queues):
    ws, cols, _, cfg = world
    now = dt.datetime.now(UTC)
    due = _due_run(ws, cols, cfg, 3, scheduled_at=now - dt.timedelta(seconds=1))
    _due_run(
        ws,
        cols,
        cfg,
        4,
        scheduled_at=now - dt.timedelta(seconds=1),
        status="paused",
        run_date=now.date() - dt.timedelta(days=1),
    )
    cfg2 = f.config(ws, cfg.inbox, cols["New"], cols["Replied"], name="later")
    _due_run(ws, cols, cfg2, 5, scheduled_at=now + dt.timedelta(hours=1))
    assert dispatch.dispatch_due(get_settings()) == 3
    due_messages = CampaignMessage.select().where(CampaignMessage.run == due)
    assert sorted(_drain(steps.GENERATE.queue)) == sorted(m.id for m in due_messages)


def test_window_closes_mid_run(world):
    """E-06: at window end pending -> skipped window_closed; the in-flight one finishes; the run completes."""
    ws, cols, _, cfg = world
    cfg.window_start_minute, cfg.window_end_minute = 9 * 60, 10 * 60
    cfg.save()
    nine = dt.datetime(2026, 6, 10, 9, 0, tzinfo=UTC)
    run = _due_run(ws, cols, cfg, 10, scheduled_at=nine + dt.timedelta(minutes=50))
    msgs = list(CampaignMessage.select().where(CampaignMessage.run == run).order_by(CampaignMessage.id))
    s = get_settings()
    for m in msgs[:2]:
        outcomes.finish_message(m.id, "sent", s, from_statuses=("pending",))
    CampaignMessage.update(status="sending").where(CampaignMessage.id == msgs[2].id).execute()

    assert runs.close_windows(now=nine + dt.timedelta(minutes=59))["runs"] == []  # still open
    result = runs.close_windows(now=nine + dt.timedelta(hours=1))
    assert result["runs"] == [run.id] and result["skipped"] == 7
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "running"  # the part already going out finishes first (R-DISP-4)
    assert CampaignMessage.select().where(CampaignMessage.skip_reason == "window_closed").count() == 7
    assert CampaignMessage.get_by_id(msgs[2].id).status == "sending"
    outcomes.finish_message(msgs[2].id, "sent", s, from_statuses=("sending",))
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "completed" and (run.leads_sent, run.leads_skipped) == (3, 7)
    assert verify() == []


def test_run_of_a_past_local_date_is_closed(world):
    """The local date moved past the run date: its window is over whatever the clock time."""
    ws, cols, _, cfg = world
    yesterday = dt.datetime(2026, 6, 9, 12, 0, tzinfo=UTC)
    run = _due_run(ws, cols, cfg, 4, scheduled_at=yesterday)
    result = runs.close_windows(now=yesterday + dt.timedelta(days=1, hours=-11))  # 01:00 next day
    assert result["runs"] == [run.id] and result["completed"] in ([], [run.id])
    assert CampaignRun.get_by_id(run.id).status == "completed"


def test_too_late_skip_is_one_set_based_statement(world):
    """R-DISP-3: > max_lateness late -> skipped too_late, in ONE statement, whatever the count."""
    ws, cols, _, cfg = world
    now = dt.datetime(2026, 6, 10, 15, 0, tzinfo=UTC)
    late = _due_run(ws, cols, cfg, 1000, scheduled_at=now - dt.timedelta(hours=2))
    cfg2 = f.config(ws, cfg.inbox, cols["New"], cols["Replied"], name="b")
    recent = _due_run(ws, cols, cfg2, 10, scheduled_at=now - dt.timedelta(minutes=30))
    cfg3 = f.config(ws, cfg.inbox, cols["New"], cols["Replied"], name="c")
    paused = _due_run(ws, cols, cfg3, 10, scheduled_at=now - dt.timedelta(hours=3), status="paused")
    with f.recorded_sql() as seen:
        n = runs.skip_too_late(get_settings(), now=now)
    assert n == 1000
    updates = [s for s in seen if "UPDATE campaign_messages" in s]
    assert len(updates) == 1, updates
    late, recent, paused = (CampaignRun.get_by_id(r.id) for r in (late, recent, paused))
    assert late.status == "completed" and late.leads_skipped == 1000
    assert recent.leads_skipped == 0 and paused.leads_skipped == 0  # paused: re-planned on resume instead
    assert CampaignMessage.select().where(CampaignMessage.skip_reason == "too_late").count() == 1000
    assert verify() == []
