"""Capacity on the real PostgreSQL (issue 22, SPEC R-HEALTH-1, R-RATE-1, R-POOL-2, E-34): the effective
caps in SQL equal the pure ones, plans fit them (with a pool and without, two campaigns sharing an
inbox), the send-time caps and the dispatcher hold them, `apply` validates `warmup` and warns about
gaps the caps cannot take, `status` shows each inbox's day. The ramp's edges and the never-past-a-cap
property over random configs: tests/unit/campaign/test_capacity.py.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
from rich.console import Console

from campaign import capacity, dispatch, planner, ratelimit
from campaign.db import db
from campaign.errors import ConfigFileError
from campaign.ops import cli, monitor
from campaign.ops.configfile import apply_text
from campaign.settings import get_settings
from models import CampaignMessage, Inbox
from tests.integration import factories as f

UTC = dt.UTC
NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday
WARM: dict[str, Any] = dict(max_per_day=300, warmup_start_per_day=20, warmup_days=14)


def bulk_leads(ws, column, n: int, start: int = 0) -> list[int]:
    rows = db.execute_sql(
        """INSERT INTO leads (workspace_id, column_id, name, phone)
           SELECT %s, %s, 'Lead ' || g, '+5521' || (900000000 + g)::text FROM generate_series(%s, %s) g
           RETURNING id""",
        (ws.id, column.id, start + 1, start + n),
    ).fetchall()
    return sorted(r[0] for r in rows)


def planned_by_inbox(run_id: int) -> dict[int, int]:
    rows = db.execute_sql(
        "SELECT inbox_id, count(*) FROM campaign_messages WHERE run_id = %s GROUP BY inbox_id", (run_id,)
    ).fetchall()
    return {int(i): int(n) for i, n in rows}


def sent_parts(ibx: Inbox, column, n: int, *, ago: str = "10 minutes") -> None:
    """``n`` parts the inbox sent ``ago`` (history the send-time caps and the dispatcher count)."""
    cfg = f.config(ibx.workspace, ibx, column, None, name=f"history-{random.randrange(10**9)}", active=False)
    run = f.run(cfg, run_date=dt.date(2000, 1, 1), status="completed")
    msg = f.message(run, None, inbox=ibx.id, status="sent", sent_at=dt.datetime.now(UTC))
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sending_at, sent_at)
           SELECT %s, %s, g, 'hi', 'sent', now() - %s::interval, now() - %s::interval
             FROM generate_series(0, %s - 1) g""",
        (msg.id, ibx.id, ago, ago, n),
    )


def world(ws_name: str = "acme", **inbox_kw: Any):
    ws, cols = f.workspace(ws_name)
    ibx = f.inbox(ws, "sales-1", **inbox_kw)
    return ws, cols, ibx


# --------------------------------------------------------------------------------------------
# one definition: SQL == Python
# --------------------------------------------------------------------------------------------


def test_sql_caps_equal_the_pure_caps(clean_db):
    """campaign.capacity: the SQL fragments every statement uses give the pure functions' numbers."""
    ws, _ = f.workspace("acme")
    cases = [(300, 20, 14), (10, 7, 3), (100, 100, 5), (500, None, None), (None, None, None)]
    inboxes = []
    for k, (mpd, start, days) in enumerate(cases):
        inboxes.append(
            f.inbox(ws, f"i{k}", max_per_day=mpd, warmup_start_per_day=start, warmup_days=days, max_per_hour=25)
        )
    for first in (None, NOON):
        for hours in (-5, 0, 1, 23.9, 24, 24 * 3 + 1, 24 * 13.5, 24 * 14, 24 * 40):
            at = NOON + dt.timedelta(hours=hours)
            for ibx, (mpd, start, days) in zip(inboxes, cases, strict=True):
                db.execute_sql("UPDATE inboxes SET first_send_at = %s WHERE id = %s", (first, ibx.id))
                got = db.execute_sql(
                    f"SELECT {capacity.daily_cap_sql('i', '%(at)s')}, {capacity.hourly_cap_sql('i')} "
                    "FROM inboxes i WHERE i.id = %(id)s",
                    {"at": at, "id": ibx.id},
                ).fetchone()
                warm = capacity.Warmup(start, days) if start and days else None
                assert got == (capacity.daily_cap(mpd, warm, first, at), 25), (mpd, start, days, first, hours)


def test_warmup_constraints_hold_in_the_schema(clean_db):
    ws, _ = f.workspace("acme")
    with pytest.raises(Exception, match="inboxes_warmup_check"), db.atomic():
        f.inbox(ws, "no-max", warmup_start_per_day=20, warmup_days=14)
    with pytest.raises(Exception, match="inboxes_warmup_check"), db.atomic():
        f.inbox(ws, "above-max", max_per_day=10, warmup_start_per_day=20, warmup_days=14)


# --------------------------------------------------------------------------------------------
# E-34: day 3 of a 14-day ramp, planned
# --------------------------------------------------------------------------------------------


def test_e34_day_3_of_the_ramp_is_never_planned_past_its_cap(clean_db):
    """E-34 (no pool): on day 3 of 20 -> 300 over 14 days the cap is 80 sends: 80 one-part messages,
    26 three-part ones; the rest is overflow and stays in the source column."""
    ws, cols, ibx = world(**WARM, first_send_at=NOON - dt.timedelta(days=3, hours=2))
    bulk_leads(ws, cols["New"], 200)
    one = f.config(ws, ibx, cols["New"], cols["Contacted"], name="one-part")
    run = planner.plan_run(one.id, now=NOON, rng=random.Random(1))
    assert (run.leads_total, run.leads_overflow) == (80, 120)
    assert planned_by_inbox(run.id) == {ibx.id: 80}

    ws2, cols2, ibx2 = world("beta", **WARM, first_send_at=NOON - dt.timedelta(days=3, hours=2))
    bulk_leads(ws2, cols2["New"], 200, start=1000)
    three = f.config(ws2, ibx2, cols2["New"], cols2["Contacted"], name="three-parts", split_enabled=True, max_parts=3)
    run3 = planner.plan_run(three.id, now=NOON, rng=random.Random(1))
    assert (run3.leads_total, run3.leads_overflow) == (26, 174)  # 26 x 3 = 78 <= 80 < 27 x 3


def test_e34_day_3_of_the_ramp_in_a_pool(clean_db):
    """E-34 (pool): the warming member takes its day-3 cap, the other its own cap; the rest overflows."""
    ws, cols, warm = world(**WARM, first_send_at=NOON - dt.timedelta(days=3, hours=2))
    other = f.inbox(ws, "sales-2", max_per_day=50)
    cfg = f.pool(f.config(ws, warm, cols["New"], cols["Contacted"], name="pooled"), warm, other)
    bulk_leads(ws, cols["New"], 300)
    run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(2))
    assert planned_by_inbox(run.id) == {warm.id: 80, other.id: 50}
    assert (run.leads_total, run.leads_overflow) == (130, 170)


def test_never_sent_inbox_plans_its_day_zero_cap(clean_db):
    """R-HEALTH-1: an inbox that never sent is on day 0 of its ramp."""
    ws, cols, ibx = world(**WARM)
    bulk_leads(ws, cols["New"], 50)
    run = planner.plan_run(f.config(ws, ibx, cols["New"], cols["Contacted"]).id, now=NOON, rng=random.Random(3))
    assert (run.leads_total, run.leads_overflow) == (20, 30)


def test_two_campaigns_on_one_inbox_share_its_daily_cap(clean_db):
    """issue 22 / R-POOL-2: what one campaign planned on an inbox today leaves the other only the rest."""
    ws, cols, ibx = world(max_per_day=100)
    a = f.config(ws, ibx, cols["New"], cols["Contacted"], name="a", split_enabled=True, max_parts=2)
    b = f.config(ws, ibx, cols["Replied"], cols["Contacted"], name="b")
    bulk_leads(ws, cols["New"], 30)
    bulk_leads(ws, cols["Replied"], 100, start=1000)
    run_a = planner.plan_run(a.id, now=NOON, rng=random.Random(4))
    run_b = planner.plan_run(b.id, now=NOON + dt.timedelta(minutes=5), rng=random.Random(4))
    assert run_a.leads_total == 30  # 60 sends
    assert (run_b.leads_total, run_b.leads_overflow) == (40, 60)  # the 40 sends left


def test_gaps_are_widened_to_the_hourly_cap(clean_db):
    """issue 22: 25 sends/hour and sub-second gaps: messages 144 s apart (3 parts: 450 s); overflow counted."""
    ws, cols, ibx = world(max_per_hour=25)
    cfg = f.config(
        ws,
        ibx,
        cols["New"],
        cols["Contacted"],
        window_start_minute=12 * 60,
        window_end_minute=13 * 60,
        gap_min_seconds=0.1,
        gap_max_seconds=0.3,
    )
    bulk_leads(ws, cols["New"], 100)
    run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(5))
    times = [m.scheduled_at for m in f.messages_of(run.id)]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 144.0 - 1e-6 and max(gaps) <= 144.0 + 1e-6
    assert run.leads_total == 25 and run.leads_overflow == 75  # one hour: 25 messages, no more


# --------------------------------------------------------------------------------------------
# E-34: day 3 of the ramp, sent (send-time caps) and dispatched (just in time)
# --------------------------------------------------------------------------------------------


def test_e34_the_send_time_cap_is_the_day_3_cap(clean_db):
    """E-34: with 79 of its 80 day-3 sends spent, the inbox grants one more send, then refuses until
    the oldest send leaves the day (without warm-up its 300 would allow it)."""
    ws, cols, ibx = world(**WARM, min_gap_seconds=0, first_send_at=dt.datetime.now(UTC) - dt.timedelta(days=3))
    sent_parts(ibx, cols["New"], 79, ago="2 hours")
    grant = ratelimit.acquire_inbox(ibx.id, 30)
    assert grant.granted
    sent_parts(ibx, cols["New"], 1, ago="0 seconds")
    ratelimit.release_inbox(grant, sent=True)
    refused = ratelimit.acquire_inbox(ibx.id, 30)
    assert not refused.granted and refused.wait > 20 * 3600  # the oldest of the 80 leaves the day in ~22 h
    db.execute_sql("UPDATE inboxes SET warmup_start_per_day = NULL, warmup_days = NULL WHERE id = %s", (ibx.id,))
    assert ratelimit.acquire_inbox(ibx.id, 30).granted


def _due_messages(run, ibx: Inbox, n: int, ws, column) -> list[int]:
    ids = []
    for _ in range(n):
        ld = f.lead(ws, column)
        ids.append(f.message(run, ld, inbox=ibx.id, scheduled_at=dt.datetime.now(UTC) - dt.timedelta(seconds=1)).id)
    return ids


@pytest.mark.parametrize("pooled", [False, True], ids=["one-inbox", "pool"])
def test_e34_dispatch_claims_only_what_the_day_3_cap_can_send(clean_db, pooled):
    """E-34 + R-DISP-2: 78 of 80 sends spent: of 10 due one-part messages on the warming inbox 2 are
    claimed; the other 8 stay pending, moved to when the cap has room (not generated); a pool's other
    member is not held back."""
    ws, cols, warm = world(**WARM, min_gap_seconds=0, first_send_at=dt.datetime.now(UTC) - dt.timedelta(days=3))
    other = f.inbox(ws, "sales-2", min_gap_seconds=0)
    cfg = f.config(ws, warm, cols["New"], cols["Contacted"], name="c")
    if pooled:
        f.pool(cfg, warm, other)
    run = f.run(cfg)
    sent_parts(warm, cols["New"], 78, ago="2 hours")
    on_warm = _due_messages(run, warm, 10, ws, cols["New"])
    on_other = _due_messages(run, other, 5, ws, cols["New"]) if pooled else []
    claimed: list[int] = []
    n = dispatch.dispatch_due(get_settings(), publish=lambda q, ids: claimed.extend(ids))
    assert n == 2 + len(on_other)
    assert sorted(claimed) == sorted(on_warm[:2] + on_other)
    waiting = list(CampaignMessage.select().where(CampaignMessage.id.in_(on_warm[2:])))
    assert {m.status for m in waiting} == {"pending"}
    assert all(m.generated_text is None for m in waiting)
    # the oldest spent send leaves the day in ~22 h: claimed then (minus the horizon), not before
    later = dt.datetime.now(UTC) + dt.timedelta(hours=21)
    assert all(m.scheduled_at > later for m in waiting)
    assert dispatch.dispatch_due(get_settings(), publish=lambda q, ids: claimed.extend(ids)) == 0


def test_dispatch_counts_messages_in_flight_against_the_hourly_cap(clean_db):
    """R-DISP-2: an hourly cap of 5, two-part messages: 2 claimed (4 sends); with those in flight, none more."""
    ws, cols, ibx = world(max_per_hour=5, min_gap_seconds=0)
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], split_enabled=True, max_parts=2)
    run = f.run(cfg)
    ids = _due_messages(run, ibx, 4, ws, cols["New"])
    claimed: list[int] = []
    assert dispatch.dispatch_due(get_settings(), publish=lambda q, i: claimed.extend(i)) == 2  # 2 x 2 <= 5
    assert claimed == ids[:2]
    assert dispatch.dispatch_due(get_settings(), publish=lambda q, i: claimed.extend(i)) == 0  # 4 in flight
    moved = CampaignMessage.get_by_id(ids[2])
    assert moved.status == "pending" and moved.scheduled_at > dt.datetime.now(UTC)


def test_uncapped_inboxes_are_claimed_as_before(clean_db):
    ws, cols, ibx = world(min_gap_seconds=0)
    run = f.run(f.config(ws, ibx, cols["New"], cols["Contacted"]))
    ids = _due_messages(run, ibx, 7, ws, cols["New"])
    claimed: list[int] = []
    assert dispatch.dispatch_due(get_settings(), publish=lambda q, i: claimed.extend(i)) == 7
    assert sorted(claimed) == sorted(ids)


# --------------------------------------------------------------------------------------------
# apply: warmup validated, gaps vs caps warned
# --------------------------------------------------------------------------------------------

TOML = """
[workspaces.acme]
columns = ["New", "Contacted"]

[workspaces.acme.inboxes.sales-1]
instance = "acme-sales-1"
max_per_hour = 25
max_per_day = 300
{warmup}

[workspaces.acme.campaigns.fast]
inbox = "sales-1"
source_column = "New"
target_column = "Contacted"
daily_limit = 200
gap_seconds = {{ min = 0.2, max = 0.5 }}
model = "m"
system_prompt = "p"
"""


def test_apply_stores_warmup_and_warns_about_gaps_the_caps_cannot_take(clean_db):
    """R-HEALTH-1 + issue 22: `warmup` lands on the inbox; the 25/hour inbox with 0.2 s gaps gets a
    warning naming both numbers (applied all the same); re-applying changes nothing."""
    summary = apply_text(TOML.format(warmup="warmup = { start_per_day = 20, days = 14 }"))
    ibx = Inbox.get(Inbox.name == "sales-1")
    assert (ibx.warmup_start_per_day, ibx.warmup_days, ibx.first_send_at) == (20, 14, None)
    warnings = [line for line in summary.lines() if line.startswith("warning:")]
    assert len(warnings) == 1, summary.lines()
    assert "gap_seconds.min = 0.2 s" in warnings[0] and "18,000 sends/hour" in warnings[0]
    assert "max_per_hour is 25" in warnings[0] and "144 s apart" in warnings[0]
    again = apply_text(TOML.format(warmup="warmup = { start_per_day = 20, days = 14 }"))
    assert not again.changed
    apply_text(TOML.format(warmup=""))
    assert Inbox.get(Inbox.name == "sales-1").warmup_days is None


@pytest.mark.parametrize(
    ("warmup", "error"),
    [
        ("warmup = { start_per_day = 0, days = 14 }", "inboxes.sales-1.warmup.start_per_day: 0 is out of range"),
        ("warmup = { start_per_day = 20, days = 0 }", "inboxes.sales-1.warmup.days: 0 is out of range"),
        ("warmup = { start_per_day = 20.5, days = 3 }", "warmup.start_per_day: must be an integer"),
        ("warmup = { start_per_day = 400, days = 14 }", "warmup.start_per_day: 400 must not exceed max_per_day (300)"),
        ("warmup = { days = 14 }", "warmup.start_per_day: is required"),
        ("warmup = { start_per_day = 20, days = 14, curve = 'x' }", "warmup.curve: unknown key"),
        ("warmup = 20", "inboxes.sales-1.warmup: must be a table"),
    ],
)
def test_apply_refuses_a_bad_warmup_by_key_path(clean_db, warmup, error):
    with pytest.raises(ConfigFileError) as exc:
        apply_text(TOML.format(warmup=warmup))
    assert any(error in e for e in exc.value.errors), exc.value.errors


def test_apply_refuses_warmup_without_max_per_day(clean_db):
    text = TOML.format(warmup="warmup = { start_per_day = 20, days = 14 }").replace("max_per_day = 300\n", "")
    with pytest.raises(ConfigFileError) as exc:
        apply_text(text)
    assert any("inboxes.sales-1.warmup: needs max_per_day" in e for e in exc.value.errors), exc.value.errors


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def test_status_shows_each_inbox_day(clean_db):
    """issue 22 / R-HEALTH-1: per inbox: effective cap (warm-up day), used, planned, left."""
    ws, cols, ibx = world(**WARM, max_per_hour=60, first_send_at=dt.datetime.now(UTC) - dt.timedelta(days=3))
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], split_enabled=True, max_parts=3)
    run = f.run(cfg)
    sent_parts(ibx, cols["New"], 10, ago="30 minutes")
    sent_parts(ibx, cols["New"], 5, ago="5 hours")
    _due_messages(run, ibx, 4, ws, cols["New"])  # 4 x 3 expected sends
    (day,) = [d for d in capacity.inbox_days() if d.inbox_id == ibx.id]
    assert (day.day_cap, day.warmup_day, day.hour_cap) == (80, 3, 60)
    assert (day.used_hour, day.used_day, day.planned, day.left) == (10, 15, 12, 53)
    snap = monitor.status_snapshot(get_settings(), with_queues=False)
    console = Console(record=True, width=200)
    console.print(cli.render_status(snap))
    text = console.export_text()
    assert "inbox capacity" in text and "acme/sales-1" in text and "day 3 of 14" in text
    assert "10/60" in text and "53" in text
