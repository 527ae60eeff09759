"""A sender pool end to end: real ``dramatiq`` workers, RabbitMQ, PostgreSQL and the sandbox
(SPEC R-POOL-2, R-POOL-3, E-33). The moves alone: tests/integration/campaign/test_failover.py."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import time

import scheduler
from campaign import dispatch, planner, recovery
from campaign.db import db
from campaign.inbound.connection import apply_connection
from campaign.inbound.envelopes import ConnectionChange
from campaign.ops.monitor import verify
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun
from tests.integration import factories as f
from tests.integration.test_pipeline_workers import engine  # noqa: F401  (the workers fixture)

MIN_GAP = 0.3  # each number's floor between two sends (parts included): R-RATE-1
GAP = (0.4, 0.6)  # the campaign's gaps, per number (R-POOL-2)


def _per_instance_gaps(sends: list[dict]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = collections.defaultdict(list)
    for s in sends:
        if s["outcome"] == "ok":
            times[s["instance"]].append(s["t"])
    return {i: [b - a for a, b in zip(sorted(ts), sorted(ts)[1:])] for i, ts in times.items()}


def test_e33_pool_of_two_fails_over_a_disconnect_mid_run_each_number_at_its_pace(engine, sb):  # noqa: F811
    """E-33 with real workers: sales-2 is disconnected mid-run (the sandbox's control API); after
    POOL_FAILOVER_SECONDS its not-started messages go out through sales-1; the run never pauses;
    a message whose first part went out on sales-2 finishes there once it is back (never on two
    numbers); every number's sends in the sandbox ledger are at least its minimum gap apart."""
    ws, cols = f.workspace("acme")
    a = f.inbox(ws, "sales-1", min_gap_seconds=MIN_GAP)
    b = f.inbox(ws, "sales-2", min_gap_seconds=MIN_GAP)
    cfg = f.config(
        ws,
        a,
        cols["New"],
        cols["Contacted"],
        name="pooled",
        gap_min_seconds=GAP[0],
        gap_max_seconds=GAP[1],
        split_enabled=True,
        max_parts=2,
        part_gap_min_seconds=0.2,
        part_gap_max_seconds=0.4,
    )
    cfg = f.pool(cfg, a, b)
    f.bulk_leads(ws, cols["New"], 40)
    run = planner.plan_run(cfg.id)
    planned_on_b = len(CampaignMessage.select().where(CampaignMessage.run == run.id, CampaignMessage.inbox == b.id))
    assert planned_on_b == 20
    settings = dataclasses.replace(get_settings(), pool_failover_seconds=1.0)
    engine.start(processes=1, threads=4, POOL_FAILOVER_SECONDS="1")

    def sent_on(inbox_id: int) -> int:
        return db.execute_sql(
            "SELECT count(*) FROM campaign_messages WHERE run_id = %s AND inbox_id = %s AND status = 'sent'",
            (run.id, inbox_id),
        ).fetchone()[0]

    down_at = back_at = None
    down_wall, started = 0.0, 0
    deadline = time.monotonic() + 150
    while CampaignRun.get_by_id(run.id).status != "completed":
        assert time.monotonic() < deadline, db.execute_sql(
            "SELECT inbox_id, status, count(*) FROM campaign_messages GROUP BY 1, 2"
        ).fetchall()
        dispatch.dispatch_due(settings)
        scheduler._pool_failover(settings, lambda: True)
        recovery.recovery_sweep(settings)
        if down_at is None and sent_on(b.id) >= 4:
            # the number drops mid-run, right after a message's first bubble went out on it
            half = db.execute_sql(
                """SELECT m.id FROM campaign_messages m WHERE m.run_id = %s AND m.inbox_id = %s
                      AND m.status = 'sending'
                      AND EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id AND p.status = 'sent')
                      AND EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id AND p.status = 'pending')
                    LIMIT 1""",
                (run.id, b.id),
            ).fetchone()
            if half is not None:
                sb.set_connection(b.instance_name, "close")
                down_at, down_wall, started = time.monotonic(), time.time(), half[0]
        moved = db.execute_sql(
            "SELECT count(*) FROM campaign_events WHERE run_id = %s AND step = 'failover'", (run.id,)
        ).fetchone()[0]
        if down_at is not None and back_at is None and moved and time.monotonic() - down_at > 4:
            sb.set_connection(b.instance_name, "open")  # back: its parked started messages finish on it
            apply_connection(ConnectionChange(instance=b.instance_name, state="open", reason=None, at=None))
            back_at = time.monotonic()
        time.sleep(0.1)
    assert down_at is not None and back_at is not None
    # the message caught between its bubbles never moved: it finished on sales-2 once it was back
    kept = CampaignMessage.get_by_id(started)
    assert (kept.inbox_id, kept.status) == (b.id, "sent")
    phone = db.execute_sql("SELECT phone FROM leads WHERE id = %s", (kept.lead_id,)).fetchone()[0]
    its_sends = [s for s in sb.ledger()["sends"] if s["outcome"] == "ok" and s["number"] == phone.lstrip("+")]
    assert {s["instance"] for s in its_sends} == {b.instance_name}
    assert min(s["t"] for s in its_sends) < down_wall < max(s["t"] for s in its_sends)

    r = CampaignRun.get_by_id(run.id)
    assert (r.leads_sent, r.leads_total) == (40, 40)
    paused = db.execute_sql(
        "SELECT count(*) FROM campaign_events WHERE run_id = %s AND text LIKE 'run paused%%'", (run.id,)
    ).fetchone()[0]
    assert paused == 0  # sales-1 could always send: the run never paused (R-POOL-3)
    moves = [
        row[0]
        for row in db.execute_sql(
            "SELECT details FROM campaign_events WHERE run_id = %s AND step = 'failover'", (run.id,)
        ).fetchall()
    ]
    moved = sum(m["moved"] for m in moves)
    assert moved > 0 and all(m["from_inbox"] == b.id and set(m["to"]) == {str(a.id)} for m in moves)
    assert sent_on(a.id) == 20 + moved and sent_on(b.id) == 20 - moved

    sends = sb.ledger()["sends"]
    numbers: dict[str, set[str]] = collections.defaultdict(set)
    for s in sends:
        if s["outcome"] == "ok":
            numbers[s["number"]].add(s["instance"])
    assert len(numbers) == 40 and all(len(v) == 1 for v in numbers.values())  # no message on two numbers
    gaps = _per_instance_gaps(sends)
    assert set(gaps) == {a.instance_name, b.instance_name}
    assert min(min(g) for g in gaps.values()) >= MIN_GAP - 0.02, {k: min(v) for k, v in gaps.items()}
    assert sb.summary()["duplicate_sends"] == 0
    assert verify() == []
    last_part = max(s["t"] for s in sends if s["outcome"] == "ok")
    first_part = min(s["t"] for s in sends if s["outcome"] == "ok")
    assert dt.timedelta(seconds=last_part - first_part) < dt.timedelta(seconds=120)
