"""The PostgreSQL side of the dead letters: ``dead_letters`` rows, joined with the XQ copies into items, filtered."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from collections.abc import Sequence

from campaign.db import db
from campaign.ops.dead_letters.xq import UTC, XqMessage


@dataclasses.dataclass
class Row:
    """One ``dead_letters`` row, with its campaign message's current status."""

    id: int
    queue: str
    actor: str
    dramatiq_message_id: str
    campaign_message_id: int | None
    run_id: int | None
    error_class: str | None
    error_message: str | None
    status: str
    created_at: dt.datetime
    resolved_at: dt.datetime | None
    note: str | None
    message_status: str | None


_ROWS_SQL = """
    SELECT d.id, d.queue, d.actor, d.dramatiq_message_id,
           -- a triage_reply's argument is a reply_triage id, never a campaign message's (R-IN-5)
           coalesce(d.campaign_message_id, CASE WHEN jsonb_typeof(d.payload->'args'->0) = 'number'
                                                     AND d.actor <> 'triage_reply'
                                                THEN (d.payload->'args'->>0)::bigint END),
           coalesce(d.run_id, m.run_id), d.error_class, d.error_message, d.status, d.created_at, d.resolved_at,
           d.note, m.status
    FROM dead_letters d LEFT JOIN campaign_messages m ON m.id = d.campaign_message_id
    WHERE d.status = 'dead' OR %s OR d.dramatiq_message_id = ANY(%s) OR d.id::text = ANY(%s)
    ORDER BY d.created_at, d.id"""


def load_rows(include_resolved: bool, dramatiq_ids: Sequence[str], wanted: Sequence[str] = ()) -> list[Row]:
    """Open dead_letters rows, plus those of the given Dramatiq ids / --id values (all with history)."""
    keys = list(dramatiq_ids) + list(wanted)
    return [Row(*r) for r in db.execute_sql(_ROWS_SQL, (include_resolved, keys, list(wanted))).fetchall()]


@dataclasses.dataclass
class Item:
    """One dead letter as the operator sees it: its row and/or its XQ copies."""

    key: str
    row: Row | None
    xq: list[XqMessage]
    run_id: int | None = None
    message_status: str | None = None

    @property
    def where(self) -> str:
        """'both', 'DB' (the XQ copy expired or was removed) or 'XQ' (no row)."""
        return "both" if self.row and self.xq else "DB" if self.row else "XQ"

    @property
    def queue(self) -> str:
        """The pipeline queue it died in (without .XQ)."""
        return self.row.queue if self.row else self.xq[0].queue

    @property
    def actor(self) -> str | None:
        """The Dramatiq actor (None for an undecodable XQ message)."""
        return self.row.actor if self.row else self.xq[0].actor

    @property
    def campaign_message_id(self) -> int | None:
        """The campaign message it carried, if known."""
        return self.row.campaign_message_id if self.row else self.xq[0].campaign_message_id

    @property
    def dead_at(self) -> dt.datetime | None:
        """When it died: the row's time, else RabbitMQ's x-death time, else the message's own timestamp."""
        return self.row.created_at if self.row else self.xq[0].dead_at

    @property
    def problem(self) -> str | None:
        """Why this cannot be requeued as it is (None: it can be considered)."""
        if self.row is not None:
            return None
        return self.xq[0].problem or "no dead_letters row (the worker could not record it)"

    @property
    def error(self) -> str:
        """The recorded error, or for an XQ-only message what is wrong with it and its last retried error."""
        if self.row is not None:
            return f"{self.row.error_class or '?'}: {self.row.error_message or ''}".strip()
        x = self.xq[0]
        return (
            x.problem + (f"; last retried error: {x.last_error}" if x.last_error else "")
            if x.problem
            else f"no dead_letters row; last retried error: {x.last_error or 'unknown'}"
        )

    @property
    def label(self) -> str:
        """What --id accepts for it: the row id, else the XQ key."""
        return str(self.row.id) if self.row else self.key


def collect(xq_messages: list[XqMessage], include_resolved: bool = False, wanted: Sequence[str] = ()) -> list[Item]:
    """Join XQ copies and dead_letters rows by Dramatiq message id (one query each side)."""
    rows = load_rows(include_resolved, [m.key for m in xq_messages], wanted)
    by_key: dict[str, Item] = {}
    for row in rows:
        by_key[row.dramatiq_message_id] = Item(row.dramatiq_message_id, row, [], row.run_id, row.message_status)
    for msg in xq_messages:
        item = by_key.get(msg.key)
        if item is None:
            item = by_key[msg.key] = Item(msg.key, None, [])
        item.xq.append(msg)  # a copy dead-lettered twice: both are handled together
    orphans = [i for i in by_key.values() if i.row is None and i.campaign_message_id is not None]
    if orphans:
        found = dict(
            (r[0], (r[1], r[2]))
            for r in db.execute_sql(
                "SELECT id, run_id, status FROM campaign_messages WHERE id = ANY(%s)",
                ([i.campaign_message_id for i in orphans],),
            ).fetchall()
        )
        for i in orphans:
            i.run_id, i.message_status = found.get(i.campaign_message_id, (None, None))
    items = list(by_key.values())
    items.sort(key=lambda i: (i.dead_at or dt.datetime.max.replace(tzinfo=UTC), i.key))
    return items


def select(items: list[Item], args: argparse.Namespace, now: dt.datetime) -> tuple[list[Item], list[str]]:
    """Apply the filters; also return the --id values that matched nothing."""
    out = []
    ids = set(args.id or [])
    matched: set[str] = set()
    for item in items:
        if args.queue and item.queue not in args.queue:
            continue
        if args.actor and item.actor not in args.actor:
            continue
        if args.run and item.run_id not in args.run:
            continue
        age = (now - item.dead_at) if item.dead_at else None
        if args.older_than is not None and (age is None or age < args.older_than):
            continue
        if args.newer_than is not None and (age is None or age >= args.newer_than):
            continue
        if ids:
            names = {item.key, item.label} | ({str(item.row.id)} if item.row else set())
            hit = ids & names
            if not hit:
                continue
            matched |= hit
        out.append(item)
    return out, sorted(ids - matched)
