"""Sender pools (SPEC §4.6b R-POOL-1/2): which inbox of a campaign's pool sends each message, and when.

A campaign sends through a pool of inboxes of its own workspace (``campaign_config_inboxes``;
``campaign_configs.inbox_id`` is always one of them, a pool of one for a one-inbox campaign).

Assignment (R-POOL-2) takes the leads in planning order:

* sticky first: a lead that already has a conversation with an inbox of the pool stays on it (a
  person expects the same number to write again); when that inbox has no room left today (its
  daily cap, or its window is full) the lead waits for a later run rather than hear a new number;
* every other lead goes to the member with the most remaining capacity of the day (its
  ``max_per_day`` minus what every campaign already planned on it that day; an uncapped member has
  unbounded room), ties to the member with fewer messages so far, then to the pool's order; so an
  uncapped pool is filled round-robin and capped members end the day with equal room left.

Each member draws its own schedule with the campaign's gaps (:func:`paced_times`): the pacing is
per inbox, so a pool of N numbers sends about N times as many messages in one window, each number
at a human pace. A member whose hourly cap allows fewer messages than the campaign's gaps would
send paces at its own floor instead (``Member.gap_floor``, :func:`campaign.capacity.gap_floor_seconds`):
both gap bounds are raised to it, so its plan never asks an hour for more sends than its cap
(issue 22); its ``remaining`` room already counts its daily (warm-up) cap in messages. The
campaign's ``daily_limit`` caps the total. Times are drawn lazily, only for messages that get
planned, and the choice of member is a heap: O(n log m) for n leads, m members.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from campaign import capacity
from campaign.errors import PlanError

__all__ = ["Member", "Assignment", "assign", "capped_member", "paced_times", "gap_us", "share"]

#: the room of an uncapped member: more than any day can hold
_UNBOUNDED = 1 << 62


def gap_us(gap_min: float, gap_max: float) -> tuple[int, int]:
    """Gap bounds in whole microseconds, never below ``gap_min``; PlanError when they are not 0 <= min <= max."""
    if gap_min < 0 or gap_max < gap_min:
        raise PlanError(f"gap bounds {gap_min}..{gap_max} s are not 0 <= min <= max")
    lo = math.ceil(round(gap_min * 1_000_000, 3))
    hi = max(lo, math.floor(round(gap_max * 1_000_000, 3)))
    return lo, hi


def paced_times(
    start: dt.datetime,
    end: dt.datetime,
    *,
    gap_min: float,
    gap_max: float,
    rng: random.Random,
    first_offset_max: float | None = None,
) -> Iterator[dt.datetime]:
    """Instants in ``[start, end)``: the first at start + U(0, first_offset_max or gap_max), then gaps in [min, max]."""
    lo_us, hi_us = gap_us(gap_min, gap_max)
    span_us = (end - start) // dt.timedelta(microseconds=1)
    if span_us <= 0:
        return
    first_max_us = hi_us if first_offset_max is None else max(0, round(first_offset_max * 1_000_000))
    x = rng.randint(0, min(first_max_us, span_us - 1))
    while x < span_us:
        yield start + dt.timedelta(microseconds=x)
        x += rng.randint(lo_us, hi_us)


@dataclass(frozen=True)
class Member:
    """One inbox of the pool as planning sees it: ``remaining`` messages it may still take today (None: uncapped)."""

    inbox_id: int
    position: int
    remaining: int | None
    gap_floor: float = 0.0  # least gap between two of its messages (its hourly cap), seconds

    def gaps(self, gap_min: float, gap_max: float) -> tuple[float, float]:
        """The campaign's gap bounds on this member: both raised to its floor."""
        return max(gap_min, self.gap_floor), max(gap_max, self.gap_floor)


def capped_member(
    inbox_id: int, position: int, day_cap: int | None, hour_cap: int | None, planned_sends: int, parts: int
) -> Member:
    """A pool member within its caps, for a campaign whose messages take ``parts`` sends (issue 22).

    Its room: the effective daily cap minus the sends already planned on it that day, in whole
    messages; its gap floor: what its hourly cap allows. A cap that cannot take even one message
    leaves it no room.
    """
    parts = max(1, parts)
    remaining = None if day_cap is None else max(0, day_cap - planned_sends) // parts
    floor = capacity.gap_floor_seconds(hour_cap, parts)
    if floor is None:
        return Member(inbox_id, position, 0)
    return Member(inbox_id, position, remaining, floor)


@dataclass
class Assignment:
    """The plan of one run: parallel lists (lead, inbox, time) and what did not fit."""

    lead_ids: list[int] = field(default_factory=list)
    inbox_ids: list[int] = field(default_factory=list)
    times: list[dt.datetime] = field(default_factory=list)
    overflow: int = 0  # leads not planned (daily limit, caps, window, sticky leads waiting)
    sticky_waiting: int = 0  # of those, sticky leads whose own inbox had no room left

    def by_inbox(self) -> dict[int, int]:
        """Messages planned per inbox."""
        out: dict[int, int] = {}
        for i in self.inbox_ids:
            out[i] = out.get(i, 0) + 1
        return out


class _Slots:
    """The members' remaining room and their lazily drawn schedules."""

    def __init__(
        self,
        members: Sequence[Member],
        start: dt.datetime,
        end: dt.datetime,
        gaps: tuple[float, float],
        rng: random.Random,
    ) -> None:
        self.left = {m.inbox_id: (_UNBOUNDED if m.remaining is None else max(0, m.remaining)) for m in members}
        self.count = dict.fromkeys(self.left, 0)
        self.position = {m.inbox_id: m.position for m in members}
        self.times: dict[int, Iterator[dt.datetime]] = {}
        for m in members:
            lo, hi = m.gaps(*gaps)
            self.times[m.inbox_id] = paced_times(start, end, gap_min=lo, gap_max=hi, rng=rng)
        self.full: set[int] = set()

    def key(self, inbox_id: int) -> tuple[int, int, int, int]:
        return (-self.left[inbox_id], self.count[inbox_id], self.position[inbox_id], inbox_id)

    def take(self, inbox_id: int) -> dt.datetime | None:
        """The member's next send time, or None when it has no room left today (cap or window)."""
        if inbox_id in self.full or inbox_id not in self.left:
            return None
        if self.left[inbox_id] <= 0:
            self.full.add(inbox_id)
            return None
        t = next(self.times[inbox_id], None)
        if t is None:
            self.full.add(inbox_id)
            return None
        self.left[inbox_id] -= 1
        self.count[inbox_id] += 1
        return t


def assign(
    lead_ids: Sequence[int],
    sticky: Mapping[int, int],
    members: Sequence[Member],
    *,
    start: dt.datetime,
    end: dt.datetime,
    gap_min: float,
    gap_max: float,
    daily_limit: int,
    rng: random.Random,
) -> Assignment:
    """Assign each lead (in order) an inbox of the pool and a send time in ``[start, end)`` (R-POOL-2).

    ``sticky`` maps a lead to the pool inbox it already talks to. ``len(lead_ids) == planned + overflow``.
    """
    gap_us(gap_min, gap_max)  # bad bounds fail here, even with no lead to plan
    if len(members) == 1:
        return _assign_one(lead_ids, members[0], start, end, gap_min, gap_max, daily_limit, rng)
    out = Assignment()
    slots = _Slots(members, start, end, (gap_min, gap_max), rng)
    heap = [slots.key(m.inbox_id) for m in members]
    heapq.heapify(heap)
    for lead_id in lead_ids:
        if len(out.times) >= daily_limit:
            break
        own = sticky.get(lead_id)
        if own is not None and own in slots.left:
            t = slots.take(own)
            if t is None:
                out.sticky_waiting += 1
                continue
            heapq.heappush(heap, slots.key(own))  # its room changed: the older heap entry is stale
            chosen = own
        else:
            t, chosen = None, -1
            while heap and t is None:
                entry = heap[0]
                chosen = entry[3]
                if chosen in slots.full or entry != slots.key(chosen):
                    heapq.heappop(heap)  # stale: a newer entry of this member is in the heap, or it is full
                    continue
                t = slots.take(chosen)
                if t is None:
                    heapq.heappop(heap)
                else:
                    heapq.heapreplace(heap, slots.key(chosen))
            if t is None:
                continue  # no member has room: this lead overflows (a later sticky one may still fit)
        out.lead_ids.append(lead_id)
        out.inbox_ids.append(chosen)
        out.times.append(t)
    out.overflow = len(lead_ids) - len(out.times)
    return out


def _assign_one(
    lead_ids: Sequence[int],
    member: Member,
    start: dt.datetime,
    end: dt.datetime,
    gap_min: float,
    gap_max: float,
    daily_limit: int,
    rng: random.Random,
) -> Assignment:
    """A pool of one: every lead (sticky or not) on that inbox, within its room, the window and the limit."""
    room = _UNBOUNDED if member.remaining is None else max(0, member.remaining)
    count = min(len(lead_ids), daily_limit, room)
    lo, hi = member.gaps(gap_min, gap_max)
    times = list(itertools.islice(paced_times(start, end, gap_min=lo, gap_max=hi, rng=rng), count))
    planned = list(lead_ids[: len(times)])
    return Assignment(planned, [member.inbox_id] * len(times), times, len(lead_ids) - len(times), 0)


def share(count: int, rooms: Sequence[tuple[int, int, int]]) -> dict[int, int]:
    """Share ``count`` messages among members ``(inbox, room, position)`` as :func:`assign` does: each
    to the member with the most room left, ties to the one with fewer so far, then to the pool's
    order; never past a member's room (what does not fit is ``count - sum(result)``). Failover's
    split of a failed member's work (R-POOL-3)."""
    left = {inbox: max(0, room) for inbox, room, _ in rooms}
    got = dict.fromkeys(left, 0)
    heap = [(-left[inbox], 0, position, inbox) for inbox, _, position in rooms if left[inbox] > 0]
    heapq.heapify(heap)
    for _ in range(max(0, count)):
        if not heap:
            break
        neg_room, n, position, inbox = heapq.heappop(heap)
        got[inbox] = n + 1
        left[inbox] = -neg_room - 1
        if left[inbox] > 0:
            heapq.heappush(heap, (-left[inbox], n + 1, position, inbox))
    return got
