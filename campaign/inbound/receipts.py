"""Delivery receipts: Evolution's ``messages.update`` moves a sent part's delivery status (R-OPS-5, R-IN-7).

    SERVER_ACK -> server_ack    DELIVERY_ACK -> delivered    READ, PLAYED -> read

Rank order is ``server_ack < delivered < read`` and a status only ever goes up: the change is ONE
conditional UPDATE that compares ranks in its WHERE clause, so a late DELIVERY_ACK after READ, a
duplicate delivery, or two copies of one event racing on two threads (or on the webhook and the
RabbitMQ consumer) all end on the highest status. ERROR never touches ``delivery_status``; the
first one sets ``delivery_error_at`` and writes a ``campaign_events`` warning in the same
statement. The pair (instance, keyId) identifies a part: an event naming another workspace's
instance never touches it (T-SEC-1). A receipt racing ahead of the worker's "sent" commit finds
no part and is reported ``unknown`` (R-IN-8: the part's own send records it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from campaign.db import db
from campaign.inbound.envelopes import ERROR_STATUS, STATUS_MAP, DeliveryUpdate
from models import DELIVERY_STATUSES

__all__ = ["UpdateResult", "apply_update", "apply_updates"]

_RANKS = list(DELIVERY_STATUSES)

# Never downgrade: the WHERE compares ranks, so the row is only touched on a real upgrade, and a
# concurrent duplicate that waited on the row lock is re-checked against the committed status.
_UPGRADE_SQL = """
UPDATE message_parts p
   SET delivery_status = %(status)s, delivery_updated_at = now()
  FROM campaign_messages m, inboxes i
 WHERE p.provider_message_id = %(key_id)s
   AND i.id = p.inbox_id AND i.instance_name = %(instance)s
   AND m.id = p.message_id
   AND coalesce(array_position(%(ranks)s::text[], p.delivery_status), 0)
       < array_position(%(ranks)s::text[], %(status)s)
RETURNING p.id, p.message_id, m.run_id, p.delivery_status"""

# ERROR: recorded once, beside the status (never replacing it), with an event for the operator.
_ERROR_SQL = """
WITH hit AS (
    UPDATE message_parts p SET delivery_error_at = now()
      FROM campaign_messages m, inboxes i
     WHERE p.provider_message_id = %(key_id)s AND i.id = p.inbox_id AND i.instance_name = %(instance)s
       AND m.id = p.message_id AND p.delivery_error_at IS NULL
    RETURNING p.id, p.idx, p.message_id, p.delivery_status, m.run_id, m.lead_id)
INSERT INTO campaign_events (run_id, message_id, lead_id, step, level, text, details)
SELECT run_id, message_id, lead_id, 'delivery', 'warning',
       'Evolution reported a delivery ERROR for part ' || idx,
       jsonb_build_object('part_id', id, 'key_id', %(key_id)s::text, 'instance', %(instance)s::text,
                          'delivery_status', delivery_status)
  FROM hit
RETURNING (details->>'part_id')::bigint, message_id, run_id, details->>'delivery_status'"""

_LOOKUP_SQL = """
SELECT p.id, p.message_id, m.run_id, p.delivery_status
  FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id JOIN inboxes i ON i.id = p.inbox_id
 WHERE p.provider_message_id = %(key_id)s AND i.instance_name = %(instance)s"""


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: ``updated``, ``unchanged``, ``unknown`` or ``ignored``, and to which part."""

    result: str
    delivery_status: str | None = None
    part_id: int | None = None
    message_id: int | None = None
    run_id: int | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The response body (no None fields)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def apply_update(update: DeliveryUpdate) -> UpdateResult:
    """Record one status change on its part (never downgrading); the caller holds a connection."""
    ident = {"key_id": update.key_id, "instance": update.instance}
    if update.status == ERROR_STATUS:
        row = db.execute_sql(_ERROR_SQL, ident).fetchone()
        if row is not None:
            return UpdateResult(
                "updated",
                delivery_status=row[3],
                part_id=row[0],
                message_id=row[1],
                run_id=row[2],
                reason="delivery error recorded",
            )
    else:
        status = STATUS_MAP[update.status]
        row = db.execute_sql(_UPGRADE_SQL, {**ident, "status": status, "ranks": _RANKS}).fetchone()
        if row is not None:
            return UpdateResult("updated", delivery_status=row[3], part_id=row[0], message_id=row[1], run_id=row[2])
    # nothing changed: tell a duplicate / late update apart from an id that is not ours
    row = db.execute_sql(_LOOKUP_SQL, ident).fetchone()
    if row is None:
        return UpdateResult("unknown", reason="no message part of this instance has this keyId")
    return UpdateResult(
        "unchanged",
        delivery_status=row[3],
        part_id=row[0],
        message_id=row[1],
        run_id=row[2],
        reason="already recorded" if update.status == ERROR_STATUS else "already at or above",
    )


# Many updates in one statement (the RabbitMQ consumer's batches, T-PERF-6): per part, the highest
# status among them, applied with the same rank comparison as _UPGRADE_SQL; ranks never go down,
# so the part ends exactly where applying them one after the other would leave it. Each update
# also finds its part (or none: unknown) for its result.
_UPGRADE_MANY_SQL = """
WITH ev AS (
    SELECT t.i, t.key_id, t.instance, t.status, array_position(%(ranks)s::text[], t.status) AS rank
      FROM unnest(%(keys)s::text[], %(instances)s::text[], %(statuses)s::text[]) WITH ORDINALITY
           AS t(key_id, instance, status, i)
), best AS (
    SELECT DISTINCT ON (key_id, instance) key_id, instance, status, rank FROM ev ORDER BY key_id, instance, rank DESC
), part AS (
    -- the parts locked in id order: two consumers side by side never take them crosswise
    SELECT p.id, p.message_id, m.run_id, p.delivery_status, best.key_id, best.instance, best.status, best.rank
      FROM best JOIN message_parts p ON p.provider_message_id = best.key_id
      JOIN inboxes i ON i.id = p.inbox_id AND i.instance_name = best.instance
      JOIN campaign_messages m ON m.id = p.message_id
     ORDER BY p.id FOR UPDATE OF p
), up AS (
    UPDATE message_parts p SET delivery_status = part.status, delivery_updated_at = now()
      FROM part
     WHERE p.id = part.id AND coalesce(array_position(%(ranks)s::text[], p.delivery_status), 0) < part.rank
    RETURNING p.id, p.delivery_status
)
SELECT ev.i, part.id, part.message_id, part.run_id, coalesce(up.delivery_status, part.delivery_status),
       up.id IS NOT NULL AND up.delivery_status = ev.status
  FROM ev LEFT JOIN part ON part.key_id = ev.key_id AND part.instance = ev.instance
  LEFT JOIN up ON up.id = part.id
 ORDER BY ev.i"""


def apply_updates(updates: list[DeliveryUpdate]) -> list[UpdateResult]:
    """Record many status changes (the caller holds a transaction); one result per update, in order.

    The delivery statuses end exactly as :func:`apply_update` one by one would leave them, in one
    statement; ``ERROR`` (rare) goes through :func:`apply_update`. Of several updates of one part
    to the same status, each reports ``updated``; a lower one superseded in the same call reports
    ``unchanged``.
    """
    out: list[UpdateResult | None] = [None] * len(updates)
    ranked = [(i, u) for i, u in enumerate(updates) if u.status != ERROR_STATUS]
    for i, u in enumerate(updates):
        if u.status == ERROR_STATUS:
            out[i] = apply_update(u)
    if ranked:
        rows = db.execute_sql(
            _UPGRADE_MANY_SQL,
            {
                "ranks": _RANKS,
                "keys": [u.key_id for _, u in ranked],
                "instances": [u.instance for _, u in ranked],
                "statuses": [STATUS_MAP[u.status] for _, u in ranked],
            },
        ).fetchall()
        for n, part_id, message_id, run_id, status, upgraded in rows:
            i = ranked[n - 1][0]
            if part_id is None:
                out[i] = UpdateResult("unknown", reason="no message part of this instance has this keyId")
            elif upgraded:
                out[i] = UpdateResult(
                    "updated", delivery_status=status, part_id=part_id, message_id=message_id, run_id=run_id
                )
            else:
                out[i] = UpdateResult(
                    "unchanged",
                    delivery_status=status,
                    part_id=part_id,
                    message_id=message_id,
                    run_id=run_id,
                    reason="already at or above",
                )
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]
