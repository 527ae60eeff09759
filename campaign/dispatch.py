"""The dispatcher (scheduler side): claim due messages and hand them to the first step (R-DISP-1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from campaign import enqueue, steps
from campaign.settings import Settings
from campaign.sql import INBOX_CAN_SEND
from campaign.sql import fetch_all as _all

log = logging.getLogger(__name__)


Publisher = Callable[[str, list[int]], None]


def dispatch_due(
    settings: Settings, *, now: Any = None, limit: int | None = None, publish: Publisher | None = None
) -> int:
    """Claim due pending messages of running runs, mark them queued, enqueue ``generate`` (R-DISP-1).

    ``FOR UPDATE SKIP LOCKED`` lets any number of dispatchers claim side by side, each message
    once. If publishing fails the claimed messages go back to pending at once (and the recovery
    sweep re-enqueues any left queued by a crash).
    """
    limit = limit or settings.dispatch_batch_size
    # The claim reads the partial due index (campaign_messages_due_idx) in scheduled_at order and
    # keeps the rows whose run is running (T-PERF-4). ``m.run_id + 0`` is no indexable column,
    # so the planner cannot turn the run check into a scan of campaign_messages_run_status_idx
    # (which it picked on smaller tables: every pending message of the running runs, then a sort).
    rows = _all(
        f"""
        UPDATE campaign_messages SET status = 'queued', status_changed_at = now(),
            wake_at = now() + make_interval(secs => %s)
        WHERE id IN (
            SELECT m.id FROM campaign_messages m
            WHERE m.status = 'pending' AND m.scheduled_at <= coalesce(%s, now())
              AND EXISTS (SELECT 1 FROM campaign_runs r WHERE r.id = m.run_id + 0 AND r.status = 'running')
              AND EXISTS (SELECT 1 FROM inboxes i WHERE i.id = m.inbox_id AND {INBOX_CAN_SEND})
            ORDER BY m.scheduled_at LIMIT %s
            FOR UPDATE OF m SKIP LOCKED)
        AND status = 'pending'
        RETURNING id""",
        (settings.handoff_grace_seconds, now, limit),
    )
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


def _publish_generate(queue: str, ids: list[int]) -> None:
    enqueue.enqueue_many(steps.BY_QUEUE[queue], ((message_id,) for message_id in ids))
