"""Sender pools on the real PostgreSQL (SPEC §4.6b R-POOL-1/2): planning a pool, pacing and balance per
inbox, sticky leads, disabled and disconnected members. The pure assignment properties (hypothesis):
tests/unit/campaign/test_pools.py.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from campaign import inboxes, planner, recovery, runs
from campaign.db import db
from campaign.ops.monitor import verify
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Conversation, Lead
from tests.integration import factories as f

UTC = dt.UTC
START = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
NOON = START  # a Wednesday


# --------------------------------------------------------------------------------------------
# planning a pool on PostgreSQL
# --------------------------------------------------------------------------------------------


def bulk_leads(ws, column, n: int, start: int = 0) -> list[int]:
    """``n`` leads with valid, distinct phones in one statement; their ids, ascending."""
    rows = db.execute_sql(
        """INSERT INTO leads (workspace_id, column_id, name, phone)
           SELECT %s, %s, 'Lead ' || g, '+5521' || (900000000 + g)::text FROM generate_series(%s, %s) g
           RETURNING id""",
        (ws.id, column.id, start + 1, start + n),
    ).fetchall()
    return sorted(r[0] for r in rows)


@pytest.fixture
def world(clean_db):
    ws, cols = f.workspace("acme")
    a, b = f.inbox(ws, "sales-1"), f.inbox(ws, "sales-2")
    cfg = f.config(ws, a, cols["New"], cols["Contacted"], name="pooled")
    cfg = f.pool(cfg, a, b)
    return ws, cols, a, b, cfg


def _messages(run_id: int) -> list[CampaignMessage]:
    return list(CampaignMessage.select().where(CampaignMessage.run == run_id).order_by(CampaignMessage.scheduled_at))


def _gaps_by_inbox(msgs) -> dict[int, list[float]]:
    times: dict[int, list[dt.datetime]] = {}
    for m in msgs:
        times.setdefault(m.inbox_id, []).append(m.scheduled_at)
    return {i: [(b - a).total_seconds() for a, b in zip(ts, ts[1:], strict=False)] for i, ts in times.items()}


def test_pool_paces_each_inbox_on_its_own(world):
    """R-POOL-2: the campaign's gaps apply per inbox, so a pool of two plans about twice one inbox's window."""
    ws, cols, a, b, cfg = world
    window = dict(window_start_minute=12 * 60, window_end_minute=13 * 60, gap_min_seconds=100, gap_max_seconds=120)
    solo = f.config(ws, f.inbox(ws, "solo"), cols["Replied"], cols["Contacted"], name="solo", **window)
    db.execute_sql(
        "UPDATE campaign_configs SET window_start_minute = 720, window_end_minute = 780, "
        "gap_min_seconds = 100, gap_max_seconds = 120 WHERE id = %s",
        (cfg.id,),
    )
    bulk_leads(ws, cols["New"], 100)
    bulk_leads(ws, cols["Replied"], 100, start=1000)
    pooled_run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(1))
    solo_run = planner.plan_run(solo.id, now=NOON, rng=random.Random(1))
    msgs = _messages(pooled_run.id)
    gaps = _gaps_by_inbox(msgs)
    assert set(gaps) == {a.id, b.id}
    assert all(g >= 100 for gs in gaps.values() for g in gs), gaps
    assert all(NOON <= m.scheduled_at < NOON + dt.timedelta(hours=1) for m in msgs)
    assert 30 <= solo_run.leads_total <= 36  # one number: 3600 s / 100..120 s
    assert pooled_run.leads_total >= 2 * 30  # two numbers, each at that pace
    assert pooled_run.leads_total + pooled_run.leads_overflow == 100
    assert verify() == []


def test_pool_balances_by_remaining_capacity_of_the_day(world):
    """R-POOL-2: a member's room is its max_per_day minus what every campaign planned on it today."""
    ws, cols, a, b, cfg = world
    db.execute_sql("UPDATE inboxes SET max_per_day = 10 WHERE id IN (%s, %s)", (a.id, b.id))
    other = f.config(ws, a, cols["Replied"], cols["Contacted"], name="other")
    other_run = f.run(other, run_date=NOON.date())
    for ld in (f.lead(ws, cols["Replied"]) for _ in range(6)):  # 6 of sales-1's 10 already taken today
        f.message(other_run, ld, inbox=a, scheduled_at=NOON + dt.timedelta(hours=2))
    skipped = f.lead(ws, cols["Replied"])  # a skipped message never sent anything: it takes no room
    f.message(
        other_run, skipped, inbox=a, scheduled_at=NOON, status="skipped", skip_reason="window_closed", finished_at=NOON
    )
    bulk_leads(ws, cols["New"], 20)
    run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(2))
    counts = {i: 0 for i in (a.id, b.id)}
    for m in _messages(run.id):
        counts[m.inbox_id] += 1
    assert counts == {a.id: 4, b.id: 10}  # every room used, none exceeded
    assert run.leads_total == 14 and run.leads_overflow == 6


def test_sticky_leads_keep_their_number_and_wait_when_it_is_full(world):
    """R-POOL-2: a lead that talks to a pool inbox stays on it; when that inbox is full it waits (overflow)."""
    ws, cols, a, b, cfg = world
    outside = f.inbox(ws, "not-in-pool")
    db.execute_sql("UPDATE inboxes SET max_per_day = 3 WHERE id = %s", (b.id,))
    lead_ids = bulk_leads(ws, cols["New"], 12)
    on_b = lead_ids[:5]  # five leads already talk to sales-2, which has room for three today
    for lid in on_b:
        Conversation.create(workspace=ws, lead=lid, inbox=b)
    Conversation.create(workspace=ws, lead=lead_ids[5], inbox=outside)  # not a pool member: no stickiness
    run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(3))
    where = {m.lead_id: m.inbox_id for m in _messages(run.id)}
    assert [where.get(lid) for lid in on_b] == [b.id, b.id, b.id, None, None]
    assert all(where[lid] == a.id for lid in lead_ids[5:])  # sales-2 is full: the rest balance to sales-1
    assert run.leads_total == 10 and run.leads_overflow == 2
    waiting = Lead.select().where(Lead.id.in_(on_b[3:]))
    assert {ld.column_id for ld in waiting} == {cols["New"].id}  # they stay for a later run
    details = db.execute_sql(
        "SELECT details FROM campaign_events WHERE run_id = %s AND text LIKE 'planned %%'", (run.id,)
    ).fetchone()[0]
    assert details["sticky_waiting"] == 2 and details["by_inbox"] == {str(a.id): 7, str(b.id): 3}


def test_one_inbox_config_plans_as_before(clean_db):
    """R-POOL-1: a config of one inbox is a pool of one; its plan is today's single-inbox plan."""
    ws, cols = f.workspace("solo")
    ibx = f.inbox(ws, "only")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], gap_min_seconds=5, gap_max_seconds=9)
    bulk_leads(ws, cols["New"], 30)
    run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(4))
    msgs = _messages(run.id)
    expected, overflow = planner.plan_schedule(
        now_utc=NOON,
        tz="UTC",
        weekdays=range(7),
        window_start_minute=0,
        window_end_minute=1440,
        gap_min=5,
        gap_max=9,
        daily_limit=1000,
        n_leads=30,
        rng=random.Random(4),
    )
    assert [m.scheduled_at for m in msgs] == expected and overflow == 0
    assert {m.inbox_id for m in msgs} == {ibx.id}


# --------------------------------------------------------------------------------------------
# a pool's runs pause only when no member can send (R-POOL-3; the moves: test_failover.py)
# --------------------------------------------------------------------------------------------


def _state(run_id: int) -> tuple[str, str | None]:
    r = CampaignRun.get_by_id(run_id)
    return r.status, r.pause_reason


def test_disabling_pool_members_pauses_the_run_only_when_none_is_left(world):
    """R-POOL-3: one disabled member leaves the run running (the other sends); all disabled pause it;
    enabling either resumes it."""
    ws, cols, a, b, cfg = world
    bulk_leads(ws, cols["New"], 4)
    run = planner.plan_run(cfg.id)  # today: a resume re-plans into today's window
    change = inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")
    assert change.paused == [] and _state(run.id) == ("running", None)
    change = inboxes.disable_inbox("sales-1", workspace="acme", reason="banned too", by="test")
    assert change.paused == [run.id] and _state(run.id) == ("paused", "inbox_disabled")
    assert inboxes.resume_runs_of_usable_inboxes() == []
    assert inboxes.enable_inbox("sales-1", workspace="acme", by="test").resumed == [run.id]
    assert _state(run.id)[0] == "running"


class _Gateway:
    """The one Evolution call of the inbox health check, one state per instance."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.asked: list[str] = []

    def connection_state(self, instance: str) -> str:
        self.asked.append(instance)
        return self.states[instance]


def test_disconnected_pool_member_is_probed_and_the_run_resumes_when_one_is_open(world):
    """E-07 with a pool: the health check probes every member; the run paused inbox_disconnected (every
    member closed) resumes as soon as one member is connected again (R-POOL-3)."""
    ws, cols, a, b, cfg = world
    bulk_leads(ws, cols["New"], 4)
    run = planner.plan_run(cfg.id)  # today: a resume re-plans into today's window
    for ibx in (a, b):
        inboxes.store_state(ibx.id, "close")
    assert runs.pause_inbox_runs(b.id, "inbox_disconnected") == [run.id]
    gateway = _Gateway({a.instance_name: "close", b.instance_name: "close"})
    result = recovery.check_inboxes(get_settings(), gateway)
    assert sorted(gateway.asked) == sorted([a.instance_name, b.instance_name])
    assert result["resumed"] == [] and _state(run.id) == ("paused", "inbox_disconnected")
    gateway.states[b.instance_name] = "open"
    assert recovery.check_inboxes(get_settings(), gateway)["resumed"] == [run.id]
    assert _state(run.id)[0] == "running"


def test_deleting_a_workspace_with_a_pool_deletes_it_all(world):
    """R-POOL-1: a workspace deleted with its campaigns and inboxes takes its pools along (the demo's reset)."""
    ws, cols, a, b, cfg = world
    planner.plan_run(cfg.id)
    db.execute_sql("DELETE FROM campaign_runs WHERE config_id = %s", (cfg.id,))
    db.execute_sql("DELETE FROM workspaces WHERE id = %s", (ws.id,))
    assert db.execute_sql("SELECT count(*) FROM campaign_config_inboxes").fetchone()[0] == 0
