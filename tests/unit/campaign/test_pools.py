"""campaign.pools without a database (SPEC §4.6b R-POOL-1/2): assignment sticky / balanced / within caps,
per-inbox pacing, with hypothesis. Pools on PostgreSQL: tests/integration/campaign/test_pools.py."""

from __future__ import annotations

import datetime as dt
import random

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.pools import Member, assign, share

UTC = dt.UTC
START = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)


@st.composite
def pools(draw):
    n_members = draw(st.integers(1, 5))
    members = [Member(100 + i, i, draw(st.one_of(st.none(), st.integers(-3, 25)))) for i in range(n_members)]
    n_leads = draw(st.integers(0, 80))
    leads = list(range(1, n_leads + 1))
    sticky = {
        lead: draw(st.sampled_from([m.inbox_id for m in members]))
        for lead in leads
        if draw(st.booleans()) and draw(st.booleans())
    }
    return members, leads, sticky


def _per_inbox(out):
    times: dict[int, list[dt.datetime]] = {}
    for inbox, t in zip(out.inbox_ids, out.times, strict=True):
        times.setdefault(inbox, []).append(t)
    return times


@hsettings(max_examples=300, deadline=None)
@given(
    pool=pools(),
    window_s=st.integers(1, 4 * 3600),
    gap_min=st.floats(0, 600),
    gap_extra=st.floats(0, 600),
    daily_limit=st.integers(1, 100),
    seed=st.integers(0, 2**32),
)
def test_assignment_is_sticky_capped_and_paced_per_inbox(pool, window_s, gap_min, gap_extra, daily_limit, seed):
    """R-POOL-2: sticky leads keep their inbox, no member goes over its room, each member's own gaps hold."""
    members, leads, sticky = pool
    end = START + dt.timedelta(seconds=window_s)
    out = assign(
        leads,
        sticky,
        members,
        start=START,
        end=end,
        gap_min=gap_min,
        gap_max=gap_min + gap_extra,
        daily_limit=daily_limit,
        rng=random.Random(seed),
    )
    assert len(out.lead_ids) + out.overflow == len(leads)
    assert len(out.lead_ids) <= daily_limit
    assert len(set(out.lead_ids)) == len(out.lead_ids)
    assert out.lead_ids == sorted(out.lead_ids)  # planning order kept
    room = {m.inbox_id: m.remaining for m in members}
    for lead, inbox in zip(out.lead_ids, out.inbox_ids, strict=True):
        assert inbox in room
        if lead in sticky:
            assert inbox == sticky[lead], f"sticky lead {lead} moved from {sticky[lead]} to {inbox}"
    for inbox, times in _per_inbox(out).items():
        if room[inbox] is not None:
            assert len(times) <= max(0, room[inbox]), f"inbox {inbox} over its cap"
        assert times == sorted(times)
        assert all(START <= t < end for t in times)
        for a, b in zip(times, times[1:], strict=False):
            assert (b - a).total_seconds() >= gap_min - 1e-6, f"inbox {inbox}: gap {b - a} under {gap_min}"
    assert out.sticky_waiting <= out.overflow


@hsettings(max_examples=300, deadline=None)
@given(pool=pools(), daily_limit=st.integers(1, 100), seed=st.integers(0, 2**32))
def test_assignment_balances_by_remaining_capacity(pool, daily_limit, seed):
    """R-POOL-2: leads without a conversation go to the member with the most room left, so rooms end level."""
    members, leads, _ = pool
    out = assign(
        leads,
        {},
        members,
        start=START,
        end=START + dt.timedelta(days=1),  # the window never limits here: only caps and the daily limit
        gap_min=0,
        gap_max=1,
        daily_limit=daily_limit,
        rng=random.Random(seed),
    )
    counts = out.by_inbox()
    uncapped = [m for m in members if m.remaining is None]
    if uncapped:
        assert all(counts.get(m.inbox_id, 0) == 0 for m in members if m.remaining is not None)
        got = [counts.get(m.inbox_id, 0) for m in uncapped]
        assert max(got) - min(got) <= 1, got  # round-robin
    else:
        left = {m.inbox_id: max(0, m.remaining or 0) - counts.get(m.inbox_id, 0) for m in members}
        for a in counts:
            assert all(left[b] <= left[a] + 1 for b in left), left
    if out.overflow and len(out.lead_ids) < daily_limit:
        assert not uncapped and all(counts.get(m.inbox_id, 0) == max(0, m.remaining or 0) for m in members), (
            "a lead overflowed while a member still had room"
        )


@given(
    count=st.integers(0, 300),
    rooms=st.lists(st.integers(0, 120), min_size=1, max_size=6),
)
def test_share_never_passes_a_room_and_fills_most_room_first(count, rooms):
    """R-POOL-3 failover's split: never past a member's room; what fits is all placed; the members end
    with rooms left as equal as the counts allow (most room first)."""
    members = [(100 + k, room, k) for k, room in enumerate(rooms)]
    got = share(count, members)
    assert all(0 <= got[i] <= room for i, room, _ in members)
    assert sum(got.values()) == min(count, sum(rooms))
    left = [room - got[i] for i, room, _ in members]
    taken = [i for i, _, _ in members if got[i]]
    if taken:  # whoever got one had at least as much room left before its last as anyone has now
        assert min(left[k] for k, (i, _, _) in enumerate(members) if got[i]) + 1 >= max(left)


def test_share_ties_go_to_the_pool_order():
    """Equal rooms: one each in the pool's order, round and round."""
    assert share(5, [(7, 10, 0), (3, 10, 1)]) == {7: 3, 3: 2}
    assert share(3, [(7, 0, 0), (3, 2, 1)]) == {7: 0, 3: 2}
