"""Planning (SPEC §4.1 R-PLAN-1..6, R-OPS-3, E-05, E-19, E-20, E-21, E-22).

Pure schedule properties with hypothesis (DST days included), then planning on the real
PostgreSQL: one query for the leads, idempotence under races, overflow, broken configs,
pause/resume re-planning and cancel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import random
import threading
import uuid
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import pipeline
from campaign import outcomes, planner, recovery, runs
from campaign.db import db
from campaign.ops.monitor import verify
from campaign.planner import plan_schedule, window_bounds
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Column, Lead
from tests import factories as f

UTC = dt.UTC
ZONES = [
    "UTC",
    "America/Sao_Paulo",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Chatham",
]
# days with a DST change (or the day before/after): São Paulo's historical midnight changes, Berlin 2026,
# New York 2026, Lord Howe's 30-minute shift
DST_DAYS = [
    dt.date(2018, 11, 3),
    dt.date(2018, 11, 4),
    dt.date(2019, 2, 16),
    dt.date(2019, 2, 17),
    dt.date(2017, 10, 15),
    dt.date(2018, 2, 17),
    dt.date(2026, 3, 29),
    dt.date(2026, 10, 25),
    dt.date(2026, 3, 8),
    dt.date(2026, 11, 1),
    dt.date(2026, 4, 5),
    dt.date(2026, 10, 4),
]


# --------------------------------------------------------------------------------------------
# pure schedule properties
# --------------------------------------------------------------------------------------------


def _wall_minutes(t: dt.datetime, zone: ZoneInfo) -> tuple[dt.date, float]:
    local = t.astimezone(zone)
    return local.date(), local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60


def check_schedule(times, overflow, *, now, zone, weekdays, start, end, gmin, gmax, limit, n):
    """Every invariant of plan_schedule (the test fails if any one breaks)."""
    today = now.astimezone(zone).date()
    assert len(times) + overflow == n
    assert len(times) <= min(limit, n)
    if today.weekday() not in weekdays:
        assert times == []
        return
    for t in times:
        assert t.tzinfo is not None and t >= now
        day, minutes = _wall_minutes(t, zone)
        assert day == today, (t, t.astimezone(zone))
        assert start <= minutes < end, (t.astimezone(zone), start, end)
    for a, b in zip(times, times[1:]):
        gap = (b - a).total_seconds()
        assert gmin - 1e-6 <= gap <= gmax + 1e-6, (gap, gmin, gmax)
    bounds = window_bounds(today, zone, start, end)
    if len(times) < min(limit, n):  # stopped early: only because the window ended
        assert bounds is not None or not times
        if times:
            assert bounds is not None
            assert times[-1] + dt.timedelta(seconds=gmax, microseconds=2) >= bounds[1]
        else:
            assert bounds is None or now >= bounds[1] or bounds[1] - max(bounds[0], now) <= dt.timedelta(0)


# (zone, day of a change, local minute of the change)
DST_CASES = [
    ("America/Sao_Paulo", dt.date(2018, 11, 4), 0),
    ("America/Sao_Paulo", dt.date(2019, 2, 16), 1380),
    ("America/Sao_Paulo", dt.date(2017, 10, 15), 0),
    ("America/Sao_Paulo", dt.date(2018, 2, 17), 1380),
    ("Europe/Berlin", dt.date(2026, 3, 29), 120),
    ("Europe/Berlin", dt.date(2026, 10, 25), 120),
    ("America/New_York", dt.date(2026, 3, 8), 120),
    ("America/New_York", dt.date(2026, 11, 1), 60),
    ("Australia/Lord_Howe", dt.date(2026, 4, 5), 90),
    ("Australia/Lord_Howe", dt.date(2026, 10, 4), 120),
]


@st.composite
def schedule_cases(draw):
    kind = draw(st.sampled_from(["dst", "dst", "any"]))
    if kind == "dst":
        # a DST-change day, "now" anywhere from the day before to the day after, the window near the change
        tz, day, hot = draw(st.sampled_from(DST_CASES))
        zone = ZoneInfo(tz)
        local_start = dt.datetime.combine(day, dt.time(0)) - dt.timedelta(hours=14)
        now = (local_start + dt.timedelta(seconds=draw(st.integers(0, 52 * 3600)))).replace(tzinfo=UTC)
        start = min(1439, max(0, hot + draw(st.integers(-90, 90))))
        end = min(1440, start + draw(st.integers(1, 240)))
    else:
        zone = ZoneInfo(draw(st.sampled_from(ZONES)))
        now = draw(
            st.datetimes(min_value=dt.datetime(2017, 1, 1), max_value=dt.datetime(2027, 12, 31), timezones=st.just(UTC))
        )
        start = draw(st.integers(0, 1439))
        end = draw(st.integers(start + 1, 1440))
    gmin = draw(st.one_of(st.just(0.0), st.floats(0, 900, allow_nan=False)))
    gmax = gmin + draw(st.one_of(st.just(0.0), st.floats(0, 900, allow_nan=False)))
    weekdays = draw(st.sets(st.integers(0, 6), min_size=1))
    limit = draw(st.integers(1, 400))
    n = draw(st.integers(0, 400))
    return dict(
        now=now,
        zone=zone,
        weekdays=weekdays,
        start=start,
        end=end,
        gmin=gmin,
        gmax=gmax,
        limit=limit,
        n=n,
        seed=draw(st.integers(0, 2**32)),
    )


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule_cases())
def test_schedule_invariants(case):
    """Inside the window (DST-correct), gaps within bounds, count <= limit, total + overflow = n."""
    times, overflow = plan_schedule(
        now_utc=case["now"],
        tz=case["zone"],
        weekdays=case["weekdays"],
        window_start_minute=case["start"],
        window_end_minute=case["end"],
        gap_min=case["gmin"],
        gap_max=case["gmax"],
        daily_limit=case["limit"],
        n_leads=case["n"],
        rng=random.Random(case["seed"]),
    )
    check_schedule(
        times,
        overflow,
        now=case["now"],
        zone=case["zone"],
        weekdays=case["weekdays"],
        start=case["start"],
        end=case["end"],
        gmin=case["gmin"],
        gmax=case["gmax"],
        limit=case["limit"],
        n=case["n"],
    )


@hsettings(max_examples=150, deadline=None)
@given(
    st.sampled_from(DST_DAYS),
    st.sampled_from(["America/Sao_Paulo", "Europe/Berlin", "America/New_York"]),
    st.integers(0, 1439),
    st.integers(1, 1440),
)
def test_window_bounds_only_instants_inside_the_local_window(day, tz, start, end):
    """E-21: the window's instants all show a local time inside [start, end) on that day, bounds included."""
    assume(start < end)
    zone = ZoneInfo(tz)
    b = window_bounds(day, zone, start, end)
    if b is None:
        return
    lo, hi = b
    assert lo < hi
    for t in (lo, lo + (hi - lo) / 3, lo + (hi - lo) / 2, hi - dt.timedelta(microseconds=1)):
        d, minutes = _wall_minutes(t, zone)
        assert d == day and start <= minutes < end, (t.astimezone(zone), start, end)


def test_schedule_grid_around_dst_changes():
    """E-21 exhaustively: windows every 15 min around each change, planned from the local day's start."""
    for tz, day, hot in DST_CASES:
        zone = ZoneInfo(tz)
        day_bounds = window_bounds(day, zone, 0, 1440)
        assert day_bounds is not None
        day_start = day_bounds[0]
        for start in range(max(0, hot - 90), min(1439, hot + 90) + 1, 15):
            for end in range(start + 15, min(1440, start + 240) + 1, 15):
                times, overflow = plan_schedule(
                    now_utc=day_start,
                    tz=zone,
                    weekdays=range(7),
                    window_start_minute=start,
                    window_end_minute=end,
                    gap_min=45,
                    gap_max=75,
                    daily_limit=1000,
                    n_leads=1000,
                    rng=random.Random(start),
                )
                check_schedule(
                    times,
                    overflow,
                    now=day_start,
                    zone=zone,
                    weekdays=set(range(7)),
                    start=start,
                    end=end,
                    gmin=45,
                    gmax=75,
                    limit=1000,
                    n=1000,
                )


def _plan(now, tz, start, end, gmin=60.0, gmax=60.0, limit=10_000, n=10_000, weekdays=range(7), seed=1):
    times, overflow = plan_schedule(
        now_utc=now,
        tz=tz,
        weekdays=weekdays,
        window_start_minute=start,
        window_end_minute=end,
        gap_min=gmin,
        gap_max=gmax,
        daily_limit=limit,
        n_leads=n,
        rng=random.Random(seed),
    )
    check_schedule(
        times,
        overflow,
        now=now,
        zone=ZoneInfo(tz),
        weekdays=set(weekdays),
        start=start,
        end=end,
        gmin=gmin,
        gmax=gmax,
        limit=limit,
        n=n,
    )
    return times, overflow


@pytest.mark.parametrize(
    "tz, day, start, end, hours",
    [
        ("Europe/Berlin", dt.date(2026, 3, 29), 60, 240, 2),  # 02:00-03:00 does not exist
        ("Europe/Berlin", dt.date(2026, 10, 25), 60, 240, 4),  # 02:00-03:00 happens twice
        ("America/New_York", dt.date(2026, 3, 8), 60, 240, 2),
        ("America/New_York", dt.date(2026, 11, 1), 0, 180, 4),
        ("America/Sao_Paulo", dt.date(2018, 11, 4), 0, 1440, 23),  # midnight did not exist
        ("America/Sao_Paulo", dt.date(2019, 2, 16), 0, 1440, 25),  # 23:00-24:00 twice
        ("America/Sao_Paulo", dt.date(2019, 2, 16), 540, 1080, 9),  # a normal window that day
    ],
)
def test_dst_day_window_length(tz, day, start, end, hours):
    """E-21: the window has its real elapsed length on DST days and the schedule fills exactly that."""
    bounds = window_bounds(day, tz, start, end)
    assert bounds is not None
    lo, hi = bounds
    assert hi - lo == dt.timedelta(hours=hours)
    times, overflow = _plan(lo, tz, start, end, gmin=60, gmax=60)
    assert abs(len(times) - hours * 60) <= 1
    assert overflow == 10_000 - len(times)


def test_window_inside_the_spring_forward_gap_never_opens():
    """02:00-03:00 Berlin on 2026-03-29 never shows on a clock: nothing scheduled, all overflow."""
    assert window_bounds(dt.date(2026, 3, 29), "Europe/Berlin", 120, 180) is None
    times, overflow = _plan(dt.datetime(2026, 3, 28, 23, 0, tzinfo=UTC), "Europe/Berlin", 120, 180, n=5)
    assert times == [] and overflow == 5


def test_window_half_past_starts_now():
    """A run planned mid-window starts from now, never in the past."""
    now = dt.datetime(2026, 6, 10, 15, 0, tzinfo=UTC)  # 12:00 in São Paulo
    times, overflow = _plan(now, "America/Sao_Paulo", 9 * 60, 18 * 60, gmin=60, gmax=180, n=50)
    assert times[0] >= now and times[0] - now <= dt.timedelta(seconds=180)
    assert len(times) == 50 and overflow == 0


@pytest.mark.parametrize(
    "now, weekdays",
    [
        (dt.datetime(2026, 6, 10, 22, 0, tzinfo=UTC), range(7)),  # 19:00 local: window over
        (dt.datetime(2026, 6, 10, 15, 0, tzinfo=UTC), [0, 1, 3, 4]),  # a Wednesday, not allowed
    ],
)
def test_empty_windows(now, weekdays):
    times, overflow = _plan(now, "America/Sao_Paulo", 9 * 60, 18 * 60, n=7, weekdays=weekdays)
    assert times == [] and overflow == 7


def test_daily_limit_and_fractional_gaps():
    now = dt.datetime(2026, 6, 10, 9, 0, tzinfo=UTC)
    times, overflow = _plan(now, "UTC", 0, 1440, gmin=0.05, gmax=0.2, limit=300, n=1000)
    assert len(times) == 300 and overflow == 700


# --------------------------------------------------------------------------------------------
# database fixtures and helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_sql():
    """Every SQL statement run through ``db.execute_sql`` inside the block."""
    real = db.obj.execute_sql
    seen: list[str] = []

    def spy(sql, params=None, *a, **kw):
        seen.append(sql)
        return real(sql, params, *a, **kw)

    db.obj.execute_sql = spy
    try:
        yield seen
    finally:
        del db.obj.execute_sql


def bulk_leads(ws, column, n: int, start: int = 0) -> None:
    """``n`` leads with valid, distinct phones in one statement."""
    db.execute_sql(
        """INSERT INTO leads (workspace_id, column_id, name, phone)
                      SELECT %s, %s, 'Lead ' || g, '+5521' || (900000000 + g)::text
                        FROM generate_series(%s, %s) g""",
        (ws.id, column.id, start + 1, start + n),
    )


@pytest.fixture
def world(clean_db):
    ws, cols = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="first-touch")
    return ws, cols, ibx, cfg


NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday


def messages_of(run_id: int) -> list[CampaignMessage]:
    return list(CampaignMessage.select().where(CampaignMessage.run == run_id).order_by(CampaignMessage.scheduled_at))


# --------------------------------------------------------------------------------------------
# planning on PostgreSQL
# --------------------------------------------------------------------------------------------


def test_plan_100_leads_with_one_lead_query(world):
    """R-PLAN-2/4: eligible leads in ONE query, messages bulk-inserted, counters and status in one go."""
    ws, cols, ibx, cfg = world
    bulk_leads(ws, cols["New"], 100)
    other_ws, other_cols = f.workspace("other")
    bulk_leads(other_ws, other_cols["New"], 5, start=1000)  # another workspace
    f.lead(ws, cols["New"], phone="12345")  # invalid phone (E-18)
    f.lead(ws, cols["New"], opted_out=True)  # opted out
    f.lead(ws, cols["Contacted"])  # another column
    with recorded_sql() as seen:
        run = planner.plan_run(cfg.id, now=NOON, rng=random.Random(3))
    lead_queries = [s for s in seen if "FROM leads" in s]
    assert len(lead_queries) == 1, lead_queries
    assert len(seen) <= 10, seen  # a constant number of statements, whatever the number of leads
    assert run.status == "running" and run.leads_total == 100 and run.leads_overflow == 0
    assert run.started_at is not None
    msgs = messages_of(run.id)
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
    bulk_leads(ws, cols["New"], 50)
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
    bulk_leads(ws, cols["New"], 100_000)
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
    bulk_leads(ws, cols["New"], 20)
    run = planner.plan_run(cfg.id, now=NOON)
    assert 4 <= run.leads_total <= 5
    assert run.leads_total + run.leads_overflow == 20
    msgs = messages_of(run.id)
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
    bulk_leads(ws, cols["New"], 10)
    run_a = planner.plan_run(cfg_a.id, now=NOON)
    run_b = planner.plan_run(cfg_b.id, now=NOON)
    assert run_a.leads_total == run_b.leads_total == 10
    # next day, config A's first run still active (paused): none of its leads is planned again
    runs.pause_run(run_a.id)
    bulk_leads(ws, cols["New"], 3, start=100)
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
    assert [m.lead_id for m in messages_of(run.id)] == [fresh.id]


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
    bulk_leads(ws, cols["New"], 5)
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
    bulk_leads(ws, cols["New"], 500)
    run = planner.plan_run(cfg.id, now=dt.datetime(2026, 3, 28, 23, 30, tzinfo=UTC))  # 00:30 CET
    zone = ZoneInfo("Europe/Berlin")
    msgs = messages_of(run.id)
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


# --------------------------------------------------------------------------------------------
# operator transitions
# --------------------------------------------------------------------------------------------


def _office_hours(cfg, gmin=60, gmax=120):
    cfg.window_start_minute, cfg.window_end_minute = 9 * 60, 18 * 60
    cfg.gap_min_seconds, cfg.gap_max_seconds = gmin, gmax
    cfg.save()


def test_pause_then_resume_replans_without_burst(world):
    """E-22: paused at 09:10, resumed at 12:00 -> the rest re-planned from now, gaps >= min, nothing past."""
    ws, cols, _, cfg = world
    _office_hours(cfg)
    bulk_leads(ws, cols["New"], 200)
    t9 = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=t9, rng=random.Random(5))
    msgs = messages_of(run.id)
    # the first 3 were dispatched before the pause (one still in flight)
    s = get_settings()
    for m in msgs[:2]:
        outcomes.finish_message(m.id, "sent", s, from_statuses=("pending",))
    CampaignMessage.update(status="sending").where(CampaignMessage.id == msgs[2].id).execute()
    runs.pause_run(run.id)
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is paused \(manual\), cannot pause"):
        runs.pause_run(run.id)
    resume_at = NOON
    result = runs.resume_run(run.id, now=resume_at, rng=random.Random(6))
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "running" and run.pause_reason is None
    pending = [m for m in messages_of(run.id) if m.status == "pending"]
    assert result["replanned"] == len(pending) > 0
    times = [m.scheduled_at for m in pending]
    assert min(times) >= resume_at
    assert min(times) >= msgs[2].scheduled_at + dt.timedelta(seconds=60)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert min(gaps) >= 60 - 1e-6 and max(gaps) <= 120 + 1e-6
    end = NOON.replace(hour=18)
    assert max(times) < end
    # 6 h at >= 60 s per message cannot hold 197: the rest were skipped window_closed, counted
    skipped = (
        CampaignMessage.select()
        .where(CampaignMessage.run == run.id, CampaignMessage.skip_reason == "window_closed")
        .count()
    )
    assert skipped == result["skipped"] and skipped + len(pending) == 197
    assert run.leads_skipped == skipped
    assert verify() == []


def test_resume_after_window_closed_skips_everything_and_completes(world):
    ws, cols, _, cfg = world
    _office_hours(cfg)
    bulk_leads(ws, cols["New"], 10)
    run = planner.plan_run(cfg.id, now=NOON.replace(hour=9))
    runs.pause_run(run.id)
    result = runs.resume_run(run.id, now=NOON.replace(hour=19))
    run = CampaignRun.get_by_id(run.id)
    assert result == {"replanned": 0, "skipped": 10}
    assert run.status == "completed" and run.leads_skipped == 10
    assert verify() == []


def test_resume_with_nothing_overdue_keeps_the_schedule(world):
    ws, cols, _, cfg = world
    _office_hours(cfg)
    bulk_leads(ws, cols["New"], 10)
    run = planner.plan_run(cfg.id, now=NOON.replace(hour=9))
    before = [m.scheduled_at for m in messages_of(run.id)]
    runs.pause_run(run.id)
    assert runs.resume_run(run.id, now=NOON.replace(hour=8)) == {"replanned": 0, "skipped": 0}
    assert [m.scheduled_at for m in messages_of(run.id)] == before


def test_cancel_skips_pending_and_leaves_in_flight(world):
    """R-OPS-3: cancel -> pending skipped 'cancelled', run cancelled, in-flight ones finish afterwards."""
    ws, cols, _, cfg = world
    bulk_leads(ws, cols["New"], 6)
    run = planner.plan_run(cfg.id, now=NOON)
    msgs = messages_of(run.id)
    CampaignMessage.update(status="sending").where(CampaignMessage.id == msgs[0].id).execute()
    assert runs.cancel_run(run.id) == 5
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "cancelled" and run.leads_skipped == 5 and run.finished_at is not None
    assert CampaignMessage.get_by_id(msgs[0].id).status == "sending"
    outcomes.finish_message(msgs[0].id, "sent", get_settings(), from_statuses=("sending",))
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "cancelled" and run.leads_sent == 1 and run.leads_processed == 6
    assert verify() == []
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is cancelled, cannot resume"):
        runs.resume_run(run.id)
    with pytest.raises(planner.RunStateError, match=r"run 999999999 does not exist"):
        runs.cancel_run(999_999_999)


def test_state_errors_are_clear(world):
    ws, cols, _, cfg = world
    bulk_leads(ws, cols["New"], 1)
    run = planner.plan_run(cfg.id, now=NOON)
    outcomes.skip_pending_where("m.run_id = %s", (run.id,), "test")
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is completed, cannot pause"):
        runs.pause_run(run.id)
    with pytest.raises(planner.RunStateError, match="cannot cancel"):
        runs.cancel_run(run.id)


# --------------------------------------------------------------------------------------------
# the window's end closes paused runs too (R-DISP-4, E-26)
# --------------------------------------------------------------------------------------------


def _pause_automatically(reason: str):
    """Pause a run the way the engine does for ``reason`` (every automatic pause is runs.pause_runs)."""

    def pause(run, cfg):
        if reason in ("provider_auth", "provider_credits"):  # OpenRouter: every run of the engine
            assert runs.pause_runs("true", (), reason) == [run.id]
        else:  # the inbox's runs
            assert runs.pause_runs(
                "r.config_id IN (SELECT id FROM campaign_configs WHERE inbox_id = %s)", (cfg.inbox_id,), reason
            ) == [run.id]

    return pause


def _pause_by_failures(run, cfg):
    """error_threshold: failures past the ratio pause the run in their own terminal statement."""
    s = dataclasses.replace(get_settings(), error_threshold_min_processed=2, error_threshold_ratio=0.1)
    for m in messages_of(run.id)[:2]:
        outcomes.finish_message(m.id, "failed", s, from_statuses=("pending",), error_class="test")


PAUSE_FAMILIES = {
    "manual": lambda run, cfg: runs.pause_run(run.id),
    "provider_auth": _pause_automatically("provider_auth"),
    "provider_credits": _pause_automatically("provider_credits"),
    "inbox_disconnected": _pause_automatically("inbox_disconnected"),
    "inbox_disabled": _pause_automatically("inbox_disabled"),
    "error_threshold": _pause_by_failures,
}


def _nine_to_ten(cfg):
    cfg.window_start_minute, cfg.window_end_minute = 9 * 60, 10 * 60
    cfg.gap_min_seconds, cfg.gap_max_seconds = 60, 120
    cfg.save()


@pytest.mark.parametrize("reason", list(PAUSE_FAMILIES))
def test_e26_paused_run_closes_at_window_end_and_its_leads_come_back_tomorrow(world, reason):
    """E-26 / R-DISP-4: a run still paused (any reason) when its window ends is completed, its pending
    messages skipped window_closed, the reason stays in the report, and tomorrow's run plans its leads."""
    from campaign.ops import report

    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    bulk_leads(ws, cols["New"], 10)
    nine = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=nine, rng=random.Random(1))
    assert run.leads_total == 10
    if reason != "error_threshold":
        for m in messages_of(run.id)[:2]:  # two went out before the pause
            outcomes.finish_message(m.id, "sent", get_settings(), from_statuses=("pending",))
    PAUSE_FAMILIES[reason](run, cfg)
    assert (CampaignRun.get_by_id(run.id).status, CampaignRun.get_by_id(run.id).pause_reason) == ("paused", reason)

    assert runs.close_windows(now=nine + dt.timedelta(minutes=59))["runs"] == []  # still open
    result = runs.close_windows(now=nine + dt.timedelta(hours=1))
    assert result["runs"] == [run.id] and result["skipped"] == 8 and result["completed"] == [run.id]
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "completed" and run.finished_at is not None and run.leads_skipped == 8
    assert (
        CampaignMessage.select()
        .where(CampaignMessage.run == run.id, CampaignMessage.skip_reason == "window_closed")
        .count()
        == 8
    )
    assert verify() == []
    # the reason is still there for the report (the row's pause_reason belongs to 'paused' only)
    assert runs.closed_while_paused(run.id) == reason
    rep = report.build_report(run.id)
    assert rep.status_text == f"completed (closed at its window's end while paused: {reason})"
    assert rep.status_text in report.render_text(rep)

    # tomorrow: every lead of this run still in the source column is planned again
    waiting = {lead.id for lead in Lead.select().where(Lead.column == cols["New"])}
    assert len(waiting) == (10 if reason == "error_threshold" else 8)  # failed ones stay there too
    tomorrow = planner.plan_run(cfg.id, now=nine + dt.timedelta(days=1), rng=random.Random(2))
    assert tomorrow.leads_total == len(waiting)
    assert {m.lead_id for m in messages_of(tomorrow.id)} == waiting


def test_e26_paused_run_with_a_message_mid_parts_stays_open_until_it_settles(world):
    """E-26 / R-DISP-4: the window's end skips what has not started; a message whose first part went
    out (and one the pause sends back to wait) keep the paused run open until they settle. The
    reason is noted once, however often the guard comes back."""
    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    bulk_leads(ws, cols["New"], 6)
    nine = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=nine, rng=random.Random(1))
    started, queued, *rest = messages_of(run.id)
    CampaignMessage.update(status="sending", generated_text="Hello there, how are you today?").where(
        CampaignMessage.id == started.id
    ).execute()
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sent_at)
                      VALUES (%s, %s, 0, 'Hello there,', 'sent', now()),
                             (%s, %s, 1, 'how are you?', 'pending', NULL)""",
        (started.id, cfg.inbox_id, started.id, cfg.inbox_id),
    )
    CampaignMessage.update(status="queued").where(CampaignMessage.id == queued.id).execute()
    runs.pause_runs("r.id = %s", (run.id,), "inbox_disconnected")

    ten = nine + dt.timedelta(hours=1)
    result = runs.close_windows(now=ten)
    assert result["runs"] == [run.id] and result["skipped"] == 4 and result["completed"] == []
    run_row = CampaignRun.get_by_id(run.id)
    assert (run_row.status, run_row.pause_reason) == ("paused", "inbox_disconnected")
    assert CampaignMessage.get_by_id(started.id).status == "sending"  # not counted, not skipped
    # the queued one's actor finds the run paused and puts it back to wait: the next guard skips it
    assert pipeline._back_to_wait(queued.id, "queued")
    assert runs.close_windows(now=ten + dt.timedelta(seconds=15))["skipped"] == 1
    assert CampaignMessage.get_by_id(queued.id).skip_reason == "window_closed"
    assert CampaignRun.get_by_id(run.id).status == "paused"
    # the started message's last part goes out: its statement completes the run
    attempt = uuid.uuid4()
    (part_id,) = db.execute_sql(
        """UPDATE message_parts SET status = 'sending', attempt_id = %s, sending_at = now()
                                 WHERE message_id = %s AND idx = 1 RETURNING id""",
        (str(attempt), started.id),
    ).fetchone()
    outcomes.finish_message(
        started.id, "sent", get_settings(), from_statuses=("sending",), last_part=(part_id, attempt, "key-2")
    )
    run_row = CampaignRun.get_by_id(run.id)
    assert run_row.status == "completed" and (run_row.leads_sent, run_row.leads_skipped) == (1, 5)
    assert verify() == []
    notes = db.execute_sql(
        "SELECT count(*) FROM campaign_events WHERE run_id = %s AND step = %s", (run.id, runs.WINDOW_STEP)
    ).fetchone()[0]
    assert notes == 1 and runs.closed_while_paused(run.id) == "inbox_disconnected"


def test_run_still_planning_at_window_end_is_closed(world):
    """R-DISP-4 (any non-final status): a run stuck in 'planning' never dispatches; its day's end closes it
    and frees its leads."""
    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    nine = NOON.replace(hour=9)
    run = f.run(cfg, run_date=nine.date(), status="planning", leads_total=3)
    for _ in range(3):
        f.message(run, f.lead(ws, cols["New"]), scheduled_at=nine)
    result = runs.close_windows(now=nine + dt.timedelta(hours=1))
    assert result["runs"] == [run.id] and result["skipped"] == 3 and result["completed"] == [run.id]
    assert CampaignRun.get_by_id(run.id).status == "completed"
    assert verify() == []
    assert planner.plan_run(cfg.id, now=nine + dt.timedelta(days=1)).leads_total == 3


# --------------------------------------------------------------------------------------------
# an operator's pause sticks (issue 12, "also settle"; E-07)
# --------------------------------------------------------------------------------------------


class _Gateway:
    """The one Evolution call of the inbox health check: every instance reports ``state``."""

    def __init__(self, state: str = "open") -> None:
        self.state = state
        self.asked: list[str] = []

    def connection_state(self, instance: str) -> str:
        self.asked.append(instance)
        return self.state


def test_operator_pause_of_a_run_paused_inbox_disconnected_sticks_when_the_inbox_comes_back(world):
    """E-07 resumes runs paused inbox_disconnected once the inbox is open again, but not one the operator
    paused meanwhile: `pause` turns the automatic pause into a manual one; only `resume` ends it."""
    ws, cols, ibx, cfg = world
    bulk_leads(ws, cols["New"], 4)
    run = planner.plan_run(cfg.id)
    other = planner.plan_run(f.config(ws, ibx, cols["New"], cols["Replied"], name="second").id)
    assert runs.pause_runs(
        "r.config_id IN (SELECT id FROM campaign_configs WHERE inbox_id = %s)", (ibx.id,), "inbox_disconnected"
    ) == [run.id, other.id]
    db.execute_sql("UPDATE inboxes SET connection_state = 'close', disconnected_since = now() WHERE id = %s", (ibx.id,))

    assert runs.pause_run(run.id) == "inbox_disconnected"
    r = CampaignRun.get_by_id(run.id)
    assert (r.status, r.pause_reason) == ("paused", "manual")
    text, details = db.execute_sql(
        "SELECT text, details FROM campaign_events WHERE run_id = %s AND step = 'operator' ORDER BY id DESC LIMIT 1",
        (run.id,),
    ).fetchone()
    assert details == {"reason": "manual", "was": "inbox_disconnected"} and "replaces the automatic one" in text
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is paused \(manual\), cannot pause"):
        runs.pause_run(run.id)

    gateway = _Gateway("open")
    result = recovery.check_inboxes(get_settings(), gateway)
    assert gateway.asked == [ibx.instance_name] and result["states"] == {ibx.id: "open"}
    assert result["resumed"] == [other.id]  # the automatic pause ends by itself...
    r = CampaignRun.get_by_id(run.id)
    assert (r.status, r.pause_reason) == ("paused", "manual")  # ...the operator's does not
    assert recovery.check_inboxes(get_settings(), gateway)["resumed"] == []
    runs.resume_run(run.id)
    assert CampaignRun.get_by_id(run.id).status == "running"


@pytest.mark.parametrize("reason", ["provider_auth", "provider_credits", "inbox_disabled", "error_threshold"])
def test_operator_pause_takes_over_every_automatic_pause(world, reason):
    ws, cols, _, cfg = world
    bulk_leads(ws, cols["New"], 2)
    run = planner.plan_run(cfg.id)
    runs.pause_runs("r.id = %s", (run.id,), reason)
    assert runs.pause_run(run.id) == reason
    assert CampaignRun.get_by_id(run.id).pause_reason == "manual"
    assert runs.resume_paused_run(run.id, reason) is False  # the automatic resume of that reason
    assert CampaignRun.get_by_id(run.id).status == "paused"


def test_resume_for_a_reason_leaves_other_pauses_alone(world):
    ws, cols, _, cfg = world
    bulk_leads(ws, cols["New"], 2)
    run = planner.plan_run(cfg.id)
    runs.pause_run(run.id)
    with pytest.raises(
        planner.RunStateError,
        match=r"is paused \(manual\), cannot resume \(only a paused "
        r"\(inbox_disconnected\) run can\)",
    ):
        runs.resume_run(run.id, reason="inbox_disconnected")
    runs.resume_run(run.id, reason="manual")
    assert CampaignRun.get_by_id(run.id).status == "running"
