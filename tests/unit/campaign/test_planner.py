"""Planning maths without a database (SPEC §4.1 R-PLAN-3, E-21): the schedule's invariants with hypothesis,
DST days included, the local window's bounds, limits and fractional gaps. Planning on PostgreSQL:
tests/integration/campaign/test_planner.py."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.planner import plan_schedule, window_bounds

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
# min_days_in_column: local days (R-SEQ-1)


def test_entered_before_is_the_local_midnight_min_days_minus_one_days_back():
    """R-SEQ-1: eligible on ``day`` = entered on local day ``day - N`` or earlier, so the bound is the
    local midnight starting ``day - N + 1``; N = 0 is no bound."""
    from campaign.planner import entered_before

    assert entered_before(dt.date(2026, 6, 11), "America/Sao_Paulo", 0) is None
    assert entered_before(dt.date(2026, 6, 11), "America/Sao_Paulo", 1) == dt.datetime(2026, 6, 11, 3, tzinfo=dt.UTC)
    assert entered_before(dt.date(2026, 6, 11), "America/Sao_Paulo", 3) == dt.datetime(2026, 6, 9, 3, tzinfo=dt.UTC)
    assert entered_before(dt.date(2026, 6, 11), "Asia/Tokyo", 1) == dt.datetime(2026, 6, 10, 15, tzinfo=dt.UTC)


def test_entered_before_counts_days_across_dst_by_local_midnights():
    """R-SEQ-1 over a DST change: New York springs forward on 2026-03-08; a 1-day follow-up on the
    9th counts from its local midnight (04:00 UTC, EDT), on the 8th from the 8th's (05:00 UTC, EST):
    the day of the change is 23 h long and still one day."""
    from campaign.planner import entered_before

    assert entered_before(dt.date(2026, 3, 9), "America/New_York", 1) == dt.datetime(2026, 3, 9, 4, tzinfo=dt.UTC)
    assert entered_before(dt.date(2026, 3, 9), "America/New_York", 2) == dt.datetime(2026, 3, 8, 5, tzinfo=dt.UTC)
