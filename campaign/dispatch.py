"""The dispatcher (scheduler side): claim due messages and hand them to the first step (R-DISP-1).

Just in time (R-DISP-2, issue 22): a due message is claimed for generation only when its inbox's
caps (hourly, daily with its warm-up ramp: :mod:`campaign.capacity`) let it send within
``DISPATCH_HORIZON_SECONDS``, counting the sends of the messages of that inbox already in flight
(each not yet split counts its campaign's expected parts). A message whose inbox has no room that
soon stays ``pending`` in PostgreSQL and its ``scheduled_at`` moves to when the inbox will have
room (when enough of its recent sends leave the hour or the day): no LLM tokens are spent on a
message that would then wait, and no Dramatiq message circles through ``.DQ`` meanwhile. When
that time is past the window's end, the window guard skips it ``window_closed`` — before anything
was generated — and its lead is eligible for the next run.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from campaign import capacity, enqueue, steps
from campaign.db import db
from campaign.settings import Settings
from campaign.sql import INBOX_CAN_SEND
from campaign.sql import fetch_all as _all

log = logging.getLogger(__name__)


Publisher = Callable[[str, list[int]], None]

# The claim reads the partial due index (campaign_messages_due_idx) in scheduled_at order and
# keeps the rows whose run is running (T-PERF-4). ``m.run_id + 0`` is no indexable column, so
# the planner cannot turn the run check into a scan of campaign_messages_run_status_idx (which it
# picked on smaller tables: every pending message of the running runs, then a sort).
# A message of an inbox that cannot send (disabled, disconnected, restricted: R-POOL-3,
# R-HEALTH-2) is not claimed: it waits in PostgreSQL for its inbox or for pool failover.
_DUE_SQL = f"""
    SELECT m.id, m.inbox_id, m.run_id FROM campaign_messages m
     WHERE m.status = 'pending' AND m.scheduled_at <= coalesce(%(now)s, now())
       AND EXISTS (SELECT 1 FROM campaign_runs r WHERE r.id = m.run_id + 0 AND r.status = 'running')
       AND EXISTS (SELECT 1 FROM inboxes i WHERE i.id = m.inbox_id AND {INBOX_CAN_SEND})
     ORDER BY m.scheduled_at LIMIT %(limit)s
       FOR UPDATE OF m SKIP LOCKED"""

# The common case in one statement (T-PERF-4): when no inbox of the due batch has a cap, the batch
# is claimed at once; otherwise nothing is claimed here (one row says so) and the batch goes
# through the capacity check in a transaction.
_CLAIM_UNCAPPED_SQL = f"""
    WITH due AS ({_DUE_SQL}),
    capped AS (SELECT 1 FROM due JOIN inboxes i ON i.id = due.inbox_id
                WHERE i.max_per_hour IS NOT NULL OR i.max_per_day IS NOT NULL LIMIT 1),
    claimed AS (
        UPDATE campaign_messages m SET status = 'queued', status_changed_at = now(),
            wake_at = now() + make_interval(secs => %(grace)s)
          FROM due WHERE m.id = due.id AND m.status = 'pending' AND NOT EXISTS (SELECT 1 FROM capped)
        RETURNING m.id)
    SELECT id FROM claimed UNION ALL SELECT NULL FROM capped"""

# The caps of the candidates' inboxes, and the sends each campaign's message is planned to take.
_CAPS_SQL = f"""
    SELECT i.id, {capacity.hourly_cap_sql("i")}, {capacity.daily_cap_sql("i")}
      FROM inboxes i WHERE i.id = ANY(%s)"""
_PARTS_SQL = f"""
    SELECT r.id, {capacity.expected_parts_sql("c")}
      FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id WHERE r.id = ANY(%s)"""

_SENDS = """(SELECT count(*) FROM message_parts p WHERE p.inbox_id = t.inbox_id
              AND p.status IN ('sent', 'in_doubt', 'sending')
              AND p.sending_at > now() + make_interval(secs => %(horizon)s) - interval '{w}')"""

# What a capped inbox has used of each cap as seen from ``now + horizon`` (its sends that will
# still be inside the hour / the day then), and the sends its in-flight messages will still make:
# parts not sent yet, or the campaign's expected parts for a message not split yet. The in-flight
# rows come from the partial in-flight index (``inbox_id + 0``: not the per-inbox history index).
_USED_SQL = f"""
    SELECT t.inbox_id, {_SENDS.format(w="1 hour")}, {_SENDS.format(w="1 day")},
           coalesce((SELECT sum(CASE WHEN m.status = 'sending'
                                     THEN (SELECT count(*) FROM message_parts mp
                                            WHERE mp.message_id = m.id AND mp.status = 'pending')
                                     ELSE {capacity.expected_parts_sql("c")} END)
                       FROM campaign_messages m
                       JOIN campaign_runs r ON r.id = m.run_id
                       JOIN campaign_configs c ON c.id = r.config_id
                      WHERE m.status IN ('queued', 'generating', 'splitting', 'sending')
                        AND m.inbox_id + 0 = t.inbox_id), 0)
      FROM unnest(%(inboxes)s::bigint[]) AS t(inbox_id)"""

# When the ``k``-th oldest send still inside the window at ``now + horizon`` leaves it: the
# inbox has room for ``k`` more sends from then on (minus the horizon: claimed then, sent by then).
_READY_SQL = """
    SELECT p.sending_at + interval '{w}' - make_interval(secs => %(horizon)s)
      FROM message_parts p
     WHERE p.inbox_id = %(inbox)s AND p.status IN ('sent', 'in_doubt', 'sending')
       AND p.sending_at > now() + make_interval(secs => %(horizon)s) - interval '{w}'
     ORDER BY p.sending_at OFFSET %(k)s - 1 LIMIT 1"""


@dataclass
class _Room:
    """Sends an inbox may still start within the horizon, per cap (None: uncapped)."""

    hour: int | None
    day: int | None

    def fits(self, parts: int) -> bool:
        return all(r is None or r >= parts for r in (self.hour, self.day))

    def take(self, parts: int) -> None:
        self.hour = None if self.hour is None else self.hour - parts
        self.day = None if self.day is None else self.day - parts


def dispatch_due(
    settings: Settings, *, now: Any = None, limit: int | None = None, publish: Publisher | None = None
) -> int:
    """Claim due pending messages of running runs whose inbox can send them soon, mark them
    queued, enqueue ``generate`` (R-DISP-1, R-DISP-2).

    ``FOR UPDATE SKIP LOCKED`` lets any number of dispatchers claim side by side, each message
    once. If publishing fails the claimed messages go back to pending at once (and the recovery
    sweep re-enqueues any left queued by a crash).
    """
    limit = limit or settings.dispatch_batch_size
    params = {"now": now, "limit": limit, "grace": settings.handoff_grace_seconds}
    rows = _all(_CLAIM_UNCAPPED_SQL, params)
    if any(r[0] is None for r in rows):
        ids = _claim_within_caps(settings, params)
    else:
        ids = [r[0] for r in rows]
    if not ids:
        return 0
    publish = publish or _publish_generate
    try:
        publish(steps.GENERATE.queue, ids)
    except Exception:
        log.exception("publishing %s claimed message(s) failed; returning them to pending", len(ids))
        _all(
            "UPDATE campaign_messages SET status = 'pending', status_changed_at = now(), wake_at = NULL "
            "WHERE id = ANY(%s) AND status = 'queued' RETURNING id",
            (ids,),
        )
        raise
    log.info("dispatched %s message(s)", len(ids))
    return len(ids)


def _claim_within_caps(settings: Settings, params: dict[str, Any]) -> list[int]:
    """Claim the due batch (some inbox of it has a cap) as far as the caps allow; defer the rest."""
    with db.atomic():
        due = _all(_DUE_SQL, params)
        if not due:
            return []
        claim, defer = _just_in_time(due, settings.dispatch_horizon_seconds)
        ids: list[int] = []
        if claim:
            ids = [
                r[0]
                for r in _all(
                    """UPDATE campaign_messages SET status = 'queued', status_changed_at = now(),
                           wake_at = now() + make_interval(secs => %s)
                        WHERE id = ANY(%s) AND status = 'pending' RETURNING id""",
                    (settings.handoff_grace_seconds, claim),
                )
            ]
        if defer:
            _all(
                """UPDATE campaign_messages m SET scheduled_at = greatest(m.scheduled_at, t.at)
                     FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(id, at)
                    WHERE m.id = t.id AND m.status = 'pending' RETURNING m.id""",
                ([d[0] for d in defer], [d[1] for d in defer]),
            )
    return ids


def _just_in_time(due: list[tuple], horizon: float) -> tuple[list[int], list[tuple[int, dt.datetime]]]:
    """Split due ``(id, inbox, run)`` rows into those to claim now and ``(id, new due time)`` to defer."""
    inbox_ids = sorted({int(r[1]) for r in due})
    caps = {int(i): (h, d) for i, h, d in _all(_CAPS_SQL, (inbox_ids,))}
    capped = [i for i in inbox_ids if any(c is not None for c in caps.get(i, (None, None)))]
    if not capped:
        return [int(r[0]) for r in due], []  # no inbox with a cap among them: every one goes now
    parts = {int(r): int(p) for r, p in _all(_PARTS_SQL, (sorted({int(r[2]) for r in due}),))}
    rooms: dict[int, _Room] = {}
    for inbox_id, sends_h, sends_d, in_flight in _all(_USED_SQL, {"inboxes": capped, "horizon": horizon}):
        hour_cap, day_cap = caps[int(inbox_id)]
        rooms[int(inbox_id)] = _Room(
            None if hour_cap is None else hour_cap - int(sends_h) - int(in_flight),
            None if day_cap is None else day_cap - int(sends_d) - int(in_flight),
        )
    claim: list[int] = []
    waiting: dict[int, list[int]] = {}  # inbox -> ids deferred, in due order
    first_need: dict[int, int] = {}  # inbox -> sends its first deferred message needs
    for message_id, inbox_id, run_id in due:
        room = rooms.get(int(inbox_id))
        need = parts.get(int(run_id), 1)
        if room is None or (int(inbox_id) not in waiting and room.fits(need)):
            if room is not None:
                room.take(need)
            claim.append(int(message_id))
        else:  # once one waits, the later ones of that inbox wait too: due order is kept
            waiting.setdefault(int(inbox_id), []).append(int(message_id))
            first_need.setdefault(int(inbox_id), need)
    defer: list[tuple[int, dt.datetime]] = []
    for inbox_id, ids in waiting.items():
        at = _ready_at(inbox_id, rooms[inbox_id], first_need[inbox_id], horizon)
        defer.extend((i, at) for i in ids)
        log.info(
            "inbox %s: %s due message(s) wait until %s for room under its caps (not generated yet)",
            inbox_id,
            len(ids),
            at.isoformat(timespec="seconds"),
        )
    return claim, defer


def _ready_at(inbox_id: int, room: _Room, need: int, horizon: float) -> dt.datetime:
    """When the inbox will have room for ``need`` more sends within the horizon (the later of its caps)."""
    now = db.execute_sql("SELECT now()").fetchone()[0]
    at = now + dt.timedelta(seconds=1)
    for left, window in ((room.hour, "1 hour"), (room.day, "1 day")):
        if left is None or left >= need:
            continue
        row = db.execute_sql(
            _READY_SQL.format(w=window), {"inbox": inbox_id, "horizon": horizon, "k": need - left}
        ).fetchone()
        if row is not None and row[0] is not None:
            at = max(at, row[0])
        else:  # the room is held by messages in flight, which may never use it (a reply): look again soon
            at = max(at, now + dt.timedelta(seconds=max(1.0, horizon / 2)))
    return at


def _publish_generate(queue: str, ids: list[int]) -> None:
    enqueue.enqueue_many(steps.BY_QUEUE[queue], ((message_id,) for message_id in ids), parallel=True)
