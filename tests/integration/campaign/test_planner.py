"""Planning on the real PostgreSQL (SPEC §4.1 R-PLAN-1..6, E-05, E-19, E-20, E-21): one query for the
leads, idempotence under races, overflow, broken configs, DST days, due runs.

The schedule maths alone: tests/unit/campaign/test_planner.py; pause / resume / cancel and the
window's end: tests/integration/campaign/test_runs.py.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from zoneinfo import ZoneInfo

import pytest

from campaign import outcomes, planner, runs
from campaign.db import db
from campaign.ops.monitor import verify
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Column, Lead
from tests.integration import factories as f

UTC = dt.UTC


NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday


# --------------------------------------------------------------------------------------------
# planning on PostgreSQL
# --------------------------------------------------------------------------------------------


def test_plan_100_leads_with_one_lead_query(world):
    """R-PLAN-2/4: eligible leads in ONE query, messages bulk-inserted, counters and status in one go."""
    ws, cols, ibx, cfg = world
    f.bulk_leads(ws, cols["New"], 100)
    other_ws, other_cols = f.workspace("other")
    f.bulk_leads(other_ws, other_cols["New"], 5, start=1000)  # another workspace
    f.lead(ws, cols["New"], phone="12345")  # invalid phone (E-18)
    f.lead(ws, cols["New"], opted_out=True)  # opted out
    f.lead(ws, cols["Contacted"])  # another column
    with f.recorded_sql() as seen:
        run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(3))
    lead_queries = [s for s in seen if "FROM leads" in s]
    assert len(lead_queries) == 1, lead_queries
    assert len(seen) <= 10, seen  # a constant number of statements, whatever the number of leads
    assert run.status == "running" and run.leads_total == 100 and run.leads_overflow == 0
    assert run.started_at is not None
    msgs = f.messages_of(run.id)
    assert len(msgs) == 100
    assert {m.inbox_id for m in msgs} == {ibx.id}
    assert all(m.status == "pending" and m.scheduled_at >= NOON for m in msgs)
    assert {m.lead.workspace_id for m in msgs} == {ws.id}
    assert all(m.lead.phone.startswith("+") and not m.lead.opted_out for m in msgs)
    events = db.execute_sql(
        "SELECT text FROM campaign_events WHERE run_id = %s AND step = 'plan'", (run.id,)
    ).fetchall()
    assert any("invalid phone" in e[0] for e in events)
    assert verify() == []


def test_plan_run_is_idempotent_even_when_racing(world):
    """R-PLAN-1: twice (or two planners at once) -> one run per config and local date."""
    ws, cols, _, cfg = world
    f.bulk_leads(ws, cols["New"], 50)
    results: list = []
    barrier = threading.Barrier(4)

    def plan():
        with db.connection_context():
            barrier.wait()
            results.append(planner.plan_run(cfg.id, now=NOON))

    threads = [threading.Thread(target=plan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(r is not None for r in results) == 1
    assert planner.plan_run(cfg.id, now=NOON + dt.timedelta(hours=1)) is None
    assert CampaignRun.select().where(CampaignRun.config == cfg).count() == 1
    assert CampaignMessage.select().count() == 50


def test_plan_100k_leads_each_exactly_once(world):
    """T-PERF-4's run size: 100,000 eligible leads, each planned once, in order (its speed is measured
    by bench/bench_scale.py, not asserted here)."""
    ws, cols, _, cfg = world
    cfg.daily_limit = 100_000
    cfg.save()
    f.bulk_leads(ws, cols["New"], 100_000)
    run = planner.plan_run(cfg.id, now=NOON)
    assert run.leads_total == 100_000
    n, distinct, first = db.execute_sql(
        "SELECT count(*), count(DISTINCT lead_id), min(scheduled_at) FROM campaign_messages WHERE run_id = %s",
        (run.id,),
    ).fetchone()
    assert (n, distinct) == (100_000, 100_000)
    assert first >= NOON


def test_window_too_small_records_overflow_and_run_completes(world):
    """E-05: what does not fit is overflow (not scheduled), the run still completes, overflow leads stay."""
    ws, cols, _, cfg = world
    cfg.window_start_minute, cfg.window_end_minute = 12 * 60, 12 * 60 + 5
    cfg.gap_min_seconds = cfg.gap_max_seconds = 60
    cfg.save()
    f.bulk_leads(ws, cols["New"], 20)
    run = planner.plan_run(cfg.id, now=NOON)
    assert 4 <= run.leads_total <= 5
    assert run.leads_total + run.leads_overflow == 20
    msgs = f.messages_of(run.id)
    assert len(msgs) == run.leads_total
    assert all(NOON <= m.scheduled_at < NOON + dt.timedelta(minutes=5) for m in msgs)
    s = get_settings()
    for m in msgs:  # every message reaches a terminal state the way the pipeline finalizes one
        assert outcomes.finish_message(m.id, "sent", s, from_statuses=("pending",)) is not None
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "completed" and run.finished_at is not None
    assert Lead.select().where(Lead.column == cols["New"]).count() == run.leads_overflow
    assert Lead.select().where(Lead.column == cols["Contacted"]).count() == run.leads_total
    assert verify() == []


def test_two_configs_same_lead_and_never_two_active_runs_of_one_config(world):
    """E-19: each config holds a lead at most once; a lead in an active run is not planned again by it."""
    ws, cols, ibx, cfg_a = world
    cfg_b = f.config(ws, ibx, cols["New"], cols["Replied"], name="second-touch")
    f.bulk_leads(ws, cols["New"], 10)
    run_a = planner.plan_run(cfg_a.id, now=NOON)
    run_b = planner.plan_run(cfg_b.id, now=NOON)
    assert run_a.leads_total == run_b.leads_total == 10
    # next day, config A's first run still active (paused): none of its leads is planned again
    runs.pause_run(run_a.id)
    f.bulk_leads(ws, cols["New"], 3, start=100)
    run_a2 = planner.plan_run(cfg_a.id, now=NOON + dt.timedelta(days=1))
    assert run_a2.leads_total == 3
    dup = db.execute_sql("""SELECT m.lead_id, r.config_id, count(*) FROM campaign_messages m
                            JOIN campaign_runs r ON r.id = m.run_id
                            WHERE r.status IN ('planning', 'running', 'paused')
                            GROUP BY 1, 2 HAVING count(*) > 1""").fetchall()
    assert dup == []
    # once the first run is over (cancelled: not messaged), its leads are eligible again
    runs.cancel_run(run_a.id)
    run_a3 = planner.plan_run(cfg_a.id, now=NOON + dt.timedelta(days=2))
    assert run_a3.leads_total == 10  # the 3 newer ones are still in run_a2 (active)


def _yesterdays_run(cfg, **counters):
    """A completed run of the day before NOON's, with one processed message's counters."""
    return f.run(
        cfg,
        run_date=NOON.date() - dt.timedelta(days=1),
        status="completed",
        leads_total=1,
        leads_processed=1,
        **counters,
    )


def test_lead_messaged_today_by_config_is_not_planned_again(world):
    """E-19: a lead this config already sent to today (e.g. a run of another local date) is not planned."""
    ws, cols, _, cfg = world
    lead = f.lead(ws, cols["New"])
    old = _yesterdays_run(cfg, leads_sent=1)
    f.message(old, lead, status="sent", sent_at=NOON - dt.timedelta(hours=1), scheduled_at=NOON - dt.timedelta(hours=1))
    run = planner.plan_run(cfg.id, now=NOON)
    assert run.leads_total == 0 and run.status == "completed"


def test_lead_with_an_unresolved_in_doubt_message_is_not_planned_again(world):
    """R-FAIL-4 / R-PLAN-2: a message in doubt may have reached the lead (its run completed, the lead
    stayed in the source column); the next day's run must not write to it again until the operator
    resolves the doubt. The other leads of the column are planned as usual."""
    ws, cols, _, cfg = world
    doubtful, fresh = f.lead(ws, cols["New"]), f.lead(ws, cols["New"])
    old = _yesterdays_run(cfg, leads_in_doubt=1)
    f.message(old, doubtful, status="in_doubt", scheduled_at=NOON - dt.timedelta(days=1))
    run = planner.plan_run(cfg.id, now=NOON)
    assert [m.lead_id for m in f.messages_of(run.id)] == [fresh.id]


def test_cross_workspace_config_is_rejected(world):
    """E-20: apply refuses an inbox of another workspace; the database refuses it too (composite FKs)."""
    import peewee

    from campaign.ops.configfile import ConfigFileError, apply_text

    ws, cols, ibx, cfg = world
    other_ws, other_cols = f.workspace("other")
    other_inbox = f.inbox(other_ws, "theirs")
    text = """
[workspaces.acme.campaigns.steal]
inbox = "theirs"
source_column = "New"
target_column = "Contacted"
daily_limit = 10
gap_seconds = { min = 1, max = 2 }
model = "m"
system_prompt = "p"
"""
    with pytest.raises(
        ConfigFileError,
        match=r"workspaces.acme.campaigns.steal.inbox: 'theirs' is not an inbox of "
        r"workspace 'acme' \(it belongs to workspace 'other'",
    ):
        apply_text(text)
    with pytest.raises(peewee.IntegrityError):
        with db.atomic():
            db.execute_sql("UPDATE campaign_configs SET inbox_id = %s WHERE id = %s", (other_inbox.id, cfg.id))
    with pytest.raises(peewee.IntegrityError):
        with db.atomic():
            db.execute_sql(
                "UPDATE campaign_configs SET target_column_id = %s WHERE id = %s", (other_cols["Contacted"].id, cfg.id)
            )


def test_broken_config_run_fails_with_reason(world):
    """R-PLAN-5 / E-20: a config whose target column is gone (or timezone unknown) fails, never starts."""
    ws, cols, ibx, cfg = world
    f.bulk_leads(ws, cols["New"], 5)
    Column.delete().where(Column.id == cols["Contacted"].id).execute()  # FK: target_column_id SET NULL
    run = planner.plan_run(cfg.id, now=NOON)
    assert run.status == "failed" and "target column" in (run.failure_reason or "")
    assert run.finished_at is not None and run.leads_total == 0
    assert CampaignMessage.select().count() == 0
    assert planner.plan_run(cfg.id, now=NOON) is None  # one failed run per day, no retry storm

    cfg2 = f.config(ws, ibx, cols["New"], cols["Replied"], name="bad-tz")
    db.execute_sql("UPDATE campaign_configs SET timezone = 'Mars/Olympus' WHERE id = %s", (cfg2.id,))
    run2 = planner.plan_run(cfg2.id, now=NOON)
    assert run2.status == "failed" and "timezone" in (run2.failure_reason or "")


def test_dst_day_plan_stays_in_local_window(world):
    """E-21: a Berlin run on the spring-forward day stays in 01:00-04:00 local, skipping the missing hour."""
    ws, cols, _, cfg = world
    cfg.timezone = "Europe/Berlin"
    cfg.window_start_minute, cfg.window_end_minute = 60, 240
    cfg.gap_min_seconds, cfg.gap_max_seconds = 30, 90
    cfg.save()
    f.bulk_leads(ws, cols["New"], 500)
    run = planner.plan_run(cfg.id, now=dt.datetime(2026, 3, 28, 23, 30, tzinfo=UTC))  # 00:30 CET
    zone = ZoneInfo("Europe/Berlin")
    msgs = f.messages_of(run.id)
    assert len(msgs) == run.leads_total > 0 and run.run_date == dt.date(2026, 3, 29)
    for m in msgs:
        local = m.scheduled_at.astimezone(zone)
        assert local.date() == dt.date(2026, 3, 29) and 1 <= local.hour < 4 and local.hour != 2
    gaps = [(b.scheduled_at - a.scheduled_at).total_seconds() for a, b in zip(msgs, msgs[1:])]
    assert min(gaps) >= 30 - 1e-6 and max(gaps) <= 90 + 1e-6


def test_plan_due_runs_respects_weekday_and_window(world):
    ws, cols, ibx, cfg = world  # always open
    closed = f.config(
        ws, ibx, cols["New"], cols["Replied"], name="morning", window_start_minute=8 * 60, window_end_minute=9 * 60
    )
    weekend = f.config(ws, ibx, cols["Contacted"], cols["Replied"], name="weekend", weekdays=[5, 6])
    later = f.config(
        ws, ibx, cols["Replied"], cols["New"], name="evening", window_start_minute=20 * 60, window_end_minute=22 * 60
    )
    inactive = f.config(ws, ibx, cols["Replied"], cols["Contacted"], name="off", active=False)
    planned = planner.plan_due_runs(get_settings(), now=NOON)
    assert [CampaignRun.get_by_id(i).config_id for i in planned] == [cfg.id]
    assert planner.plan_due_runs(get_settings(), now=NOON + dt.timedelta(minutes=1)) == []
    evening = planner.plan_due_runs(get_settings(), now=NOON.replace(hour=19, minute=59, second=30))
    assert [CampaignRun.get_by_id(i).config_id for i in evening] == [later.id]
    assert not CampaignRun.select().where(CampaignRun.config.in_([closed, weekend, inactive])).exists()
