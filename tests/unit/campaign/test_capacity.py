"""campaign.capacity: the warm-up ramp at its edges (R-HEALTH-1), and plans that never pass a cap (issue 22)."""

from __future__ import annotations

import bisect
import datetime as dt
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign import capacity
from campaign.pools import assign, capped_member

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
W = capacity.Warmup(start_per_day=20, days=14)


def _cap_on(day: float, warmup: capacity.Warmup | None = W, max_per_day: int | None = 300) -> int | None:
    return capacity.daily_cap(max_per_day, warmup, T0, T0 + dt.timedelta(days=day))


def test_ramp_day_zero_is_the_start_cap():
    """R-HEALTH-1: day 0 (the first 24 h after the first send, and before any send) is start_per_day."""
    assert _cap_on(0) == 20
    assert _cap_on(0.99) == 20
    assert capacity.daily_cap(300, W, None, T0) == 20  # never sent: day 0
    assert capacity.daily_cap(300, W, T0, T0 - dt.timedelta(hours=1)) == 20  # clock before the first send


def test_ramp_grows_linearly_and_reaches_max_on_day_n():
    """R-HEALTH-1: a straight line 20 -> 300 over 14 days: +20 a day, 300 from day 14 on."""
    assert [_cap_on(d) for d in range(15)] == [20 + 20 * d for d in range(14)] + [300]
    assert _cap_on(3) == 80  # E-34's day 3


@pytest.mark.parametrize("day", [14, 15, 30, 365, 10_000])
def test_past_the_ramp_the_cap_is_max_per_day(day):
    """R-HEALTH-1: day N and every day past it: max_per_day."""
    assert _cap_on(day) == 300


def test_a_paused_week_keeps_counting_from_the_first_send():
    """R-HEALTH-1: days count from the first send: a week of silence after day 2 comes back on day 9."""
    assert capacity.warmup_day(T0, T0 + dt.timedelta(days=2, hours=5)) == 2
    assert capacity.warmup_day(T0, T0 + dt.timedelta(days=9, hours=5)) == 9
    assert _cap_on(9.2) == 200


def test_uneven_ramp_rounds_down_and_never_passes_max():
    w = capacity.Warmup(start_per_day=7, days=3)
    assert [capacity.ramp_cap(7, 10, 3, d) for d in range(5)] == [7, 8, 9, 10, 10]
    assert capacity.daily_cap(10, w, T0, T0 + dt.timedelta(days=1)) == 8
    assert capacity.ramp_cap(10, 10, 5, 2) == 10  # start == max: flat


def test_no_warmup_and_uncapped():
    assert capacity.daily_cap(300, None, None, T0) == 300
    assert capacity.daily_cap(None, None, None, T0) is None
    assert capacity.hourly_cap(None) is None


def test_multiplier_is_the_health_seam():
    """R-HEALTH-2 plugs in here: a throttled inbox's caps are halved (rounded down)."""
    assert capacity.daily_cap(300, W, T0, T0 + dt.timedelta(days=3), multiplier=0.5) == 40
    assert capacity.hourly_cap(25, multiplier=0.5) == 12
    assert capacity.scaled(None, 0.5) is None


def test_gap_floor_from_the_hourly_cap():
    """issue 22: 25 sends/hour, 1 part: 144 s apart; 3 parts: 8 messages/hour, 450 s apart; 2 < 3: none."""
    assert capacity.gap_floor_seconds(25, 1) == 144.0
    assert capacity.gap_floor_seconds(25, 3) == 450.0
    assert capacity.gap_floor_seconds(2, 3) is None
    assert capacity.gap_floor_seconds(None, 3) == 0.0
    assert capacity.expected_parts(True, 3) == 3
    assert capacity.expected_parts(False, 3) == 1


def _max_in_any_hour(times: list[dt.datetime]) -> int:
    """The most of ``times`` inside one sliding hour ``(t - 1 h, t]`` (the window RateLimits counts)."""
    ts = sorted(t.timestamp() for t in times)
    best = 0
    for i, t in enumerate(ts):
        lo = bisect.bisect_right(ts, t - 3600)
        best = max(best, i - lo + 1)
    return best


@settings(max_examples=150, deadline=None)
@given(
    n_members=st.integers(1, 3),
    hour_caps=st.lists(st.one_of(st.none(), st.integers(1, 400)), min_size=3, max_size=3),
    max_per_day=st.lists(st.one_of(st.none(), st.integers(1, 2000)), min_size=3, max_size=3),
    warm=st.lists(st.one_of(st.none(), st.tuples(st.integers(1, 50), st.integers(1, 30))), min_size=3, max_size=3),
    ramp_day=st.integers(0, 40),
    planned=st.lists(st.integers(0, 300), min_size=3, max_size=3),
    parts=st.integers(1, 4),
    gap_min=st.floats(0, 120),
    gap_extra=st.floats(0, 120),
    window_h=st.floats(0.1, 14),
    n_leads=st.integers(0, 1500),
    daily_limit=st.integers(1, 2000),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_plan_never_exceeds_an_hourly_daily_or_warmup_cap(
    n_members, hour_caps, max_per_day, warm, ramp_day, planned, parts, gap_min, gap_extra, window_h, n_leads,
    daily_limit, seed,
):  # fmt: skip
    """issue 22 / E-34: over random pools, caps, ramps and gaps, every inbox's plan fits its hourly
    cap (any sliding hour), its daily cap and its warm-up cap of the day, after what other campaigns
    already planned on it; every lead is planned or overflow."""
    at = T0 + dt.timedelta(days=ramp_day, hours=1)
    members, day_caps = [], {}
    for k in range(n_members):
        mpd = max_per_day[k]
        w = None
        if warm[k] is not None and mpd is not None:
            w = capacity.Warmup(min(warm[k][0], mpd), warm[k][1])
        day_caps[k] = capacity.daily_cap(mpd, w, T0, at)
        members.append(capped_member(k, k, day_caps[k], hour_caps[k], planned[k], parts))
    end = at + dt.timedelta(hours=window_h)
    plan = assign(
        list(range(n_leads)),
        {},
        members,
        start=at,
        end=end,
        gap_min=gap_min,
        gap_max=gap_min + gap_extra,
        daily_limit=daily_limit,
        rng=random.Random(seed),
    )
    assert len(plan.times) + plan.overflow == n_leads
    assert len(plan.times) <= daily_limit
    for k in range(n_members):
        times = [t for t, i in zip(plan.times, plan.inbox_ids, strict=True) if i == k]
        assert all(at <= t < end for t in times)
        if day_caps[k] is not None:
            assert len(times) * parts <= max(0, day_caps[k] - planned[k]), (k, len(times), day_caps[k])
        if hour_caps[k] is not None:
            assert _max_in_any_hour(times) * parts <= hour_caps[k], (k, hour_caps[k], parts)
