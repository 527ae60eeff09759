"""Pool failover (SPEC R-POOL-3, E-33; DESIGN principle 8 "work moves only before it starts").

When a member of a running run's sender pool hands over — it is disabled (or ``restricted``,
R-HEALTH: the seam is :func:`campaign.sql.inbox_hands_over`), or disconnected for at least
``POOL_FAILOVER_SECONDS`` — its **not-started** messages of that run move to the members that
can send (:data:`campaign.sql.INBOX_CAN_SEND`), re-planned inside the run's window within each
receiving member's own pacing.

Not started, exactly: a message in ``pending`` (waiting in PostgreSQL) or ``queued`` (claimed by
the dispatcher, no step has taken it yet) none of whose parts is ``sent``, ``sending`` or
``in_doubt``. A message a worker holds (``generating``, ``splitting``, ``sending`` before its first
part) never moves under the worker's feet: its send step finds the inbox down and puts it back to
``pending``, and the next pass moves it. A message whose first part went out never moves: it
finishes on its own inbox when it comes back, or ends in doubt (R-FAIL-4). The statement that
moves a message re-checks all of this on the row it updates (a conditional UPDATE), so a worker
claiming it at the same instant wins or loses cleanly, and two passes at once (the scheduler's
job and a ``connection.update``) never move a message twice (an advisory lock per run, and
``SKIP LOCKED`` against the dispatcher).

Sticky leads wait: a lead whose conversation with the failed member already has messages
(R-POOL-2: a person expects the same number to write again) keeps its message there; it goes out
when the member comes back (re-planned from then, :func:`member_back`) or is skipped
``window_closed`` at the window's end.

How many each member takes: what fits in its pacing before the window closes (its own pending
messages of the run come first) and in its room of the day (``max_per_day`` minus what every
campaign planned on it today: the planner's own ``_pool``), shared by most room first
(:func:`campaign.pools.share`). What fits nowhere stays on the failed member. Each receiving
member's pending messages of the run (its own and the moved ones, in their planned order) are
re-paced with the planner's pacing from its next free slot (:func:`campaign.runs.pace`).

A member that comes back takes new work again: at once its own waiting messages (sticky ones and
those that did not fit elsewhere), re-paced from now; and at the next planning its share of new
leads. Messages already moved stay where they went: they are planned within that member's pacing,
and moving them back would only churn the schedule.

Every pass that moves something writes one ``campaign_events`` row per (run, failed member), step
``failover``, with the counts (moved, to whom, sticky waiting, no room): ``report`` and ``status``
read the "moved away" of each member from these rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from campaign import planner, pools, runs
from campaign.db import db
from campaign.settings import Settings
from campaign.sql import INBOX_CAN_SEND, inbox_hands_over
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = [
    "Failover",
    "fail_over",
    "member_back",
    "moved_away",
    "failover_events",
    "member_state",
    "FAILOVER_STEP",
    "NOT_STARTED_STATUSES",
]

UTC = dt.UTC
#: the campaign_events step of a failover row
FAILOVER_STEP = "failover"
#: the message statuses a failover may move (with no part sent, sending or in doubt)
NOT_STARTED_STATUSES = ("pending", "queued")
#: transaction advisory-lock namespace: one failover pass (or re-plan, runs.replan_pending) per run at a time
FAILOVER_LOCK_NAMESPACE = runs.SCHEDULE_LOCK_NAMESPACE

# A message of the failed member in the run that may move: not started (status AND parts), and
# not a sticky lead's (a conversation with the failed member that already has messages).
_NOT_STARTED = """m.status IN ('pending', 'queued')
    AND NOT EXISTS (SELECT 1 FROM message_parts pt
                     WHERE pt.message_id = m.id AND pt.status IN ('sent', 'sending', 'in_doubt'))"""
_STICKY = """EXISTS (SELECT 1 FROM conversations cv JOIN conversation_messages cm ON cm.conversation_id = cv.id
                 WHERE cv.lead_id = m.lead_id AND cv.inbox_id = m.inbox_id)"""


@dataclass
class Failover:
    """What one pass did for one (run, failed member)."""

    run_id: int
    from_inbox: int
    reason: str
    moved: dict[int, int] = field(default_factory=dict)  # receiving inbox -> messages
    sticky_waiting: int = 0
    no_room: int = 0

    @property
    def total(self) -> int:
        """Messages moved away in this pass."""
        return sum(self.moved.values())


def _candidates(settings: Settings, inbox_ids: Sequence[int] | None) -> list[tuple[int, int]]:
    """(run, member) pairs to look at: a running run, a member that hands over with messages not
    started on it, and another member of the pool that can send."""
    rows = _all(
        f"""SELECT r.id, i.id FROM campaign_runs r
              JOIN campaign_config_inboxes p ON p.config_id = r.config_id
              JOIN inboxes i ON i.id = p.inbox_id
             WHERE r.status = 'running' AND {inbox_hands_over(settings.pool_failover_seconds)}
               AND (%s::bigint[] IS NULL OR i.id = ANY(%s::bigint[]))
               AND EXISTS (SELECT 1 FROM campaign_messages m
                            WHERE m.run_id = r.id AND m.inbox_id = i.id AND m.status IN ('pending', 'queued'))
               AND EXISTS (SELECT 1 FROM campaign_config_inboxes o JOIN inboxes i ON i.id = o.inbox_id
                            WHERE o.config_id = r.config_id AND {INBOX_CAN_SEND})
             ORDER BY r.id, i.id""",
        (_ids(inbox_ids), _ids(inbox_ids)),
    )
    return [(int(r), int(i)) for r, i in rows]


def _ids(ids: Sequence[int] | None) -> list[int] | None:
    return None if ids is None else [int(i) for i in ids]


def fail_over(
    settings: Settings,
    *,
    inbox_ids: Sequence[int] | None = None,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> list[Failover]:
    """Move the not-started messages of every member that hands over to its pool's members that can
    send (R-POOL-3); ``inbox_ids``: only those members. Idempotent: a second pass finds nothing to move."""
    now = now or dt.datetime.now(UTC)
    rng = rng or random.Random()
    done: list[Failover] = []
    for run_id, inbox_id in _candidates(settings, inbox_ids):
        try:
            result = _fail_over_one(run_id, inbox_id, settings, now, rng)
        except Exception:  # one run's trouble must not keep the others' work stuck
            log.exception("failover of run %s inbox %s failed (the next pass tries again)", run_id, inbox_id)
            continue
        if result is not None and (result.total or result.sticky_waiting or result.no_room):
            done.append(result)
    return done


def _reason(settings: Settings, inbox_id: int) -> str | None:
    """Why the member hands over now (None: it no longer does)."""
    row = _one(
        f"""SELECT i.disabled, i.disabled_reason, i.connection_state,
                   extract(epoch FROM now() - i.disconnected_since)::float
              FROM inboxes i WHERE i.id = %s AND {inbox_hands_over(settings.pool_failover_seconds)}""",
        (inbox_id,),
    )
    if row is None:
        return None
    disabled, why, state, down_for = row
    if disabled:
        return f"disabled ({why})"
    return f"{state} for {down_for or 0:.0f} s (POOL_FAILOVER_SECONDS={settings.pool_failover_seconds:g})"


def _fail_over_one(
    run_id: int, failed: int, settings: Settings, now: dt.datetime, rng: random.Random
) -> Failover | None:
    """One run, one failed member, one transaction."""
    with db.atomic():
        db.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)", (FAILOVER_LOCK_NAMESPACE, run_id))
        run = _one("SELECT config_id, status FROM campaign_runs WHERE id = %s", (run_id,))
        reason = _reason(settings, failed)
        if run is None or run[1] != "running" or reason is None:
            return None
        config_id = int(run[0])
        bounds, gmin, gmax = runs.run_pacing(run_id)
        result = Failover(run_id, failed, reason)
        # SKIP LOCKED: a message the dispatcher or a worker holds right now is left for the next pass
        movable = _all(
            f"""SELECT m.id, m.scheduled_at, {_STICKY} AS sticky FROM campaign_messages m
                 WHERE m.run_id = %s AND m.inbox_id = %s AND {_NOT_STARTED}
                 ORDER BY m.scheduled_at, m.id FOR UPDATE OF m SKIP LOCKED""",
            (run_id, failed),
        )
        result.sticky_waiting = sum(1 for _, _, sticky in movable if sticky)
        movable = [(int(mid), at) for mid, at, sticky in movable if not sticky]
        if not movable or bounds is None or now >= bounds[1]:
            result.no_room = len(movable)
            return result
        targets = _targets(config_id, run_id)
        if not targets:
            result.no_room = len(movable)
            return result
        # each receiving member: its pending messages of the run, and the times its pacing has left
        plans: dict[int, tuple[list[tuple[int, dt.datetime]], list[dt.datetime]]] = {}
        rooms: list[tuple[int, int, int]] = []
        for inbox_id, position, day_room in targets:
            own = [
                (int(mid), at)
                for mid, at in _all(
                    """SELECT id, scheduled_at FROM campaign_messages
                        WHERE run_id = %s AND inbox_id = %s AND status = 'pending'
                        ORDER BY scheduled_at, id FOR UPDATE SKIP LOCKED""",
                    (run_id, inbox_id),
                )
            ]
            start = runs.pace_start(run_id, inbox_id, now, bounds[0], gmin)
            times = runs.pace(start, bounds[1], gmin, gmax, len(own) + len(movable), rng)
            room = max(0, len(times) - len(own))
            if day_room is not None:
                room = min(room, max(0, day_room))
            plans[inbox_id] = (own, times)
            rooms.append((inbox_id, room, position))
        shares = pools.share(len(movable), rooms)
        moved_ids: list[int] = []
        moved_to: list[int] = []
        new_ids: list[int] = []
        new_times: list[dt.datetime] = []
        cursor = 0
        for inbox_id, k in shares.items():
            if k <= 0:
                continue
            taken = movable[cursor : cursor + k]
            cursor += k
            moved_ids += [mid for mid, _ in taken]
            moved_to += [inbox_id] * len(taken)
            own, times = plans[inbox_id]
            # the member's own and its new messages, in their planned order, on its next free slots
            together = sorted(own + taken, key=lambda x: (x[1], x[0]))
            new_ids += [mid for mid, _ in together]
            new_times += times[: len(together)]
            result.moved[inbox_id] = len(taken)
        result.no_room = len(movable) - len(moved_ids)
        if moved_ids:
            _move(failed, moved_ids, moved_to)
            db.execute_sql(
                """UPDATE campaign_messages m SET scheduled_at = t.at
                     FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(id, at)
                    WHERE m.id = t.id AND m.status = 'pending'""",
                (new_ids, new_times),
            )
            _record(result)
    if result.total:
        log.warning(
            "run %s: inbox %s %s: %s not-started message(s) moved %s; %s sticky wait, %s found no room",
            run_id,
            failed,
            reason,
            result.total,
            result.moved,
            result.sticky_waiting,
            result.no_room,
        )
    return result


def _targets(config_id: int, run_id: int) -> list[tuple[int, int, int | None]]:
    """The pool's members that can send now: (inbox, position, room of the day or None: uncapped)."""
    can = {
        int(i)
        for (i,) in _all(
            f"""SELECT i.id FROM campaign_config_inboxes p JOIN inboxes i ON i.id = p.inbox_id
                 WHERE p.config_id = %s AND {INBOX_CAN_SEND}""",
            (config_id,),
        )
    }
    day = _one(
        """SELECT r.run_date, c.timezone FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
            WHERE r.id = %s""",
        (run_id,),
    )
    whole_day = planner.window_bounds(day[0], day[1], 0, 1440) if day else None
    if not can or whole_day is None:
        return []
    # the planner's own reading of each member's room of the day (its caps, every campaign's plan)
    members = planner.pool_members(config_id, *whole_day)
    return [(m.inbox_id, m.position, m.remaining) for m in members if m.inbox_id in can]


def _move(failed: int, message_ids: list[int], to_inboxes: list[int]) -> None:
    """The move itself: conditional on the row (still on the failed member, still not started)."""
    rows = _all(
        f"""UPDATE campaign_messages m SET inbox_id = t.inbox_id, status = 'pending', wake_at = NULL,
                   status_changed_at = now()
              FROM unnest(%s::bigint[], %s::bigint[]) AS t(id, inbox_id)
             WHERE m.id = t.id AND m.inbox_id = %s AND {_NOT_STARTED}
            RETURNING m.id""",
        (message_ids, to_inboxes, failed),
    )
    if len(rows) != len(message_ids):  # locked FOR UPDATE above: cannot happen; never silently
        raise RuntimeError(f"failover: {len(message_ids) - len(rows)} message(s) changed under the run's lock")
    # a message split before its inbox went down already has its parts: they go with it
    db.execute_sql(
        """UPDATE message_parts p SET inbox_id = m.inbox_id FROM campaign_messages m
            WHERE m.id = p.message_id AND p.message_id = ANY(%s) AND p.status IN ('pending', 'failed', 'skipped')""",
        (message_ids,),
    )


def _record(result: Failover) -> None:
    details = {
        "failover": True,
        "from_inbox": result.from_inbox,
        "reason": result.reason,
        "moved": result.total,
        "to": {str(k): v for k, v in sorted(result.moved.items())},
        "sticky_waiting": result.sticky_waiting,
        "no_room": result.no_room,
    }
    db.execute_sql(
        "INSERT INTO campaign_events (run_id, step, level, text, details) VALUES (%s, %s, 'warning', %s, %s)",
        (
            result.run_id,
            FAILOVER_STEP,
            f"inbox {result.from_inbox} {result.reason}: {result.total} not-started message(s) moved to "
            + ", ".join(f"inbox {k} ({v})" for k, v in sorted(result.moved.items()))
            + f"; {result.sticky_waiting} sticky lead(s) wait for it, {result.no_room} found no room",
            json.dumps(details),
        ),
    )


def member_back(inbox_id: int, *, now: dt.datetime | None = None, rng: random.Random | None = None) -> int:
    """A member can send again: its waiting messages in running runs (sticky leads, those that found no
    room elsewhere, those held during a short disconnect) are re-planned from now within its pacing.
    Returns how many were re-planned (the runs paused for it are resumed by the caller)."""
    rows = _all(
        f"""SELECT DISTINCT m.run_id FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
             WHERE m.inbox_id = %s AND m.status = 'pending' AND r.status = 'running'
               AND EXISTS (SELECT 1 FROM inboxes i WHERE i.id = %s AND {INBOX_CAN_SEND})""",
        (inbox_id, inbox_id),
    )
    total = 0
    for (run_id,) in rows:
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)", (FAILOVER_LOCK_NAMESPACE, run_id))
            total += runs.replan_pending(int(run_id), now=now, rng=rng, inbox_id=inbox_id)["replanned"]
    return total


def moved_away(run_ids: Sequence[int]) -> dict[tuple[int, int], int]:
    """(run, member) -> messages moved away from that member by failovers (R-POOL-4)."""
    if not run_ids:
        return {}
    rows = _all(
        f"""SELECT run_id, (details ->> 'from_inbox')::bigint, sum((details ->> 'moved')::int)
              FROM campaign_events
             WHERE run_id = ANY(%s) AND step = '{FAILOVER_STEP}' AND details ? 'from_inbox'
             GROUP BY 1, 2""",
        ([int(r) for r in run_ids],),
    )
    return {(int(r), int(i)): int(n) for r, i, n in rows}


def failover_events(run_id: int) -> list[tuple[dt.datetime, int, int, str]]:
    """The failovers of a run, oldest first: (when, from inbox, messages moved, why)."""
    rows = _all(
        f"""SELECT created_at, (details ->> 'from_inbox')::bigint, (details ->> 'moved')::int, details ->> 'reason'
              FROM campaign_events
             WHERE run_id = %s AND step = '{FAILOVER_STEP}' AND details ? 'from_inbox'
             ORDER BY id""",
        (run_id,),
    )
    return [(at, int(i), int(n), str(why or "")) for at, i, n, why in rows]


def member_state(disabled: bool, connection_state: str | None) -> str:
    """A pool member's state as ``status``, ``report`` and ``inboxes`` show it (R-POOL-4): ``disabled``,
    ``disconnected`` (close), ``connecting``, else ``ok``. (R-HEALTH's ``restricted`` /
    ``throttled`` belong here when they land.)"""
    if disabled:
        return "disabled"
    if connection_state == "close":
        return "disconnected"
    if connection_state == "connecting":
        return "connecting"
    return "ok"
