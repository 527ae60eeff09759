"""Dead letters of the pipeline: list, requeue, purge (SPEC R-OPS-2, R-FAIL-3).

A pipeline step whose retries are exhausted leaves two traces: the Dramatiq message in its
queue's ``.XQ`` (RabbitMQ drops it after 7 days) and a ``dead_letters`` row in PostgreSQL
(written by ``actors.middleware.DeadLetters``, kept forever). This module joins the two by
Dramatiq message id, so a dead letter whose XQ copy expired is still listed and requeueable.

The XQs are browsed without losing anything: every message is fetched with ``basic_get`` and
NOT acknowledged (RabbitMQ hides it from other consumers meanwhile); only the copies of dead
letters that were requeued or purged are acknowledged, everything else goes back to its queue
(``basic_nack(requeue=True)``) when the browser closes, also on a crash (closing a channel
requeues what it holds).

``--requeue``, per dead letter, in this order:

1. ONE transaction: the campaign message goes back to the step that failed
   (``repairs.requeue_dead_step``: status, parts, attempts, run counters, run reopened or
   resumed) and the row becomes ``requeued``; or, if the message moved on since, nothing
   changes and the row becomes ``resolved`` with a note;
2. after the commit, the step's actor message is published (publisher confirms);
3. then the XQ copy is acknowledged (removed).

A crash between 1 and 2 leaves the message in an in-flight status with no Dramatiq message:
the scheduler's recovery sweep re-enqueues it after ``LEASE_SECONDS`` (it covers queued,
splitting and sending alike). A crash between 2 and 3 leaves a stale XQ copy: the next run
sees its row is no longer ``dead`` and just removes it. So running ``--requeue`` twice sends
nothing twice.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import peewee

from campaign import events, steps
from campaign.db import db, init_db
from campaign.enqueue import enqueue
from campaign.errors import (
    ConfigError,
    DeadLetterUsageError,
)
from campaign.logs import TextSink, configure_logging
from campaign.ops import repairs
from campaign.ops.repairs import REQUEUE_TARGETS, Repair
from campaign.settings import Settings, get_settings, redact_url
from campaign.steps import QUEUES as PIPELINE_QUEUES

log = logging.getLogger(__name__)

__all__ = [
    "DeadLetterUsageError",
    "XqMessage",
    "Item",
    "XqBrowser",
    "add_arguments",
    "parse_duration",
    "collect",
    "select",
    "requeue",
    "purge",
    "run",
    "KNOWN_ACTORS",
]

UTC = dt.UTC
KNOWN_ACTORS = tuple(REQUEUE_TARGETS)  # generate, split, send_part
#: a browse never holds more than this many messages per XQ (the rest stays untouched, and is said so)
BROWSE_LIMIT = 50_000
EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2

Publisher = Callable[[str, tuple], None]


class _DryRunRollback(Exception):
    """Raised at the end of a dry run to roll back everything it simulated."""


# --------------------------------------------------------------------------------------------
# arguments

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """'30m', '2h', '7d', '1h30m', '45s', '2w' -> timedelta; anything else is an argparse error."""
    raw = text.strip().lower()
    pos, seconds = 0, 0.0
    for m in _DURATION_PART.finditer(raw):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not raw or pos != len(raw):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit s/m/h/d/w, e.g. 30m, 2h, 7d, 1h30m"
        )
    return dt.timedelta(seconds=seconds)


def _queue_arg(text: str) -> str:
    name = text.strip()
    if name.endswith(".XQ"):
        name = name[:-3]
    if name in PIPELINE_QUEUES:
        return name
    short = {q.rsplit(".", 1)[-1]: q for q in PIPELINE_QUEUES}
    if name in short:
        return short[name]
    raise argparse.ArgumentTypeError(
        f"unknown queue {text!r}: one of {', '.join(PIPELINE_QUEUES)} (with or without .XQ)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the dead-letter command (shared by the script and ``cli.py dead-letters``)."""
    p.add_argument(
        "--queue",
        type=_queue_arg,
        action="append",
        help=f"only this pipeline queue ({', '.join(PIPELINE_QUEUES)}); repeatable",
    )
    p.add_argument("--actor", choices=KNOWN_ACTORS, action="append", help="only this actor; repeatable")
    p.add_argument("--run", type=int, action="append", help="only dead letters of this run id; repeatable")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead for at least this long (30m, 2h, 7d)",
    )
    p.add_argument(
        "--newer-than", type=parse_duration, metavar="DURATION", help="only those dead for less than this long"
    )
    p.add_argument(
        "--id",
        action="append",
        metavar="ID",
        help="a dead letter id, a Dramatiq message id, or the raw-... key of an undecodable XQ message; repeatable",
    )
    p.add_argument(
        "--all", action="store_true", help="also list dead letters already requeued, purged or resolved (history)"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--requeue",
        action="store_true",
        help="put each selected campaign message back at the step that failed and re-publish it",
    )
    action.add_argument(
        "--purge",
        action="store_true",
        help="drop the XQ copies and mark the rows purged (campaign messages stay failed)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="with --requeue/--purge: print exactly what would change, change nothing"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


# --------------------------------------------------------------------------------------------
# the two sources


@dataclasses.dataclass
class XqMessage:
    """One message fetched (unacknowledged) from a pipeline ``.XQ``."""

    queue: str  # the pipeline queue (without .XQ)
    delivery_tag: int
    key: str  # the Dramatiq message id, or raw-<sha1> for an undecodable body
    body: bytes
    actor: str | None = None
    args: list | None = None
    campaign_message_id: int | None = None
    dead_at: dt.datetime | None = None
    last_error: str | None = None  # the traceback's last line of the previous attempt, if any
    problem: str | None = None  # why it cannot be requeued (malformed, unknown actor)


def decode_xq(queue: str, delivery_tag: int, properties: Any, body: bytes) -> XqMessage:
    """Whatever the body is, an XqMessage (with ``problem`` set when it is not a usable step message)."""
    msg = XqMessage(queue, delivery_tag, "raw-" + hashlib.sha1(body).hexdigest()[:16], body)
    msg.dead_at = _x_death_time(properties)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        msg.problem = "malformed: not JSON"
        return msg
    if not isinstance(data, dict):
        msg.problem = "malformed: JSON but not a Dramatiq message"
        return msg
    if isinstance(data.get("message_id"), str) and data["message_id"]:
        msg.key = data["message_id"]
    msg.actor = data.get("actor_name") if isinstance(data.get("actor_name"), str) else None
    raw_options = data.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    if isinstance(options.get("traceback"), str) and options["traceback"].strip():
        msg.last_error = options["traceback"].strip().splitlines()[-1][:300]
    if msg.dead_at is None and isinstance(data.get("message_timestamp"), (int, float)):
        msg.dead_at = dt.datetime.fromtimestamp(data["message_timestamp"] / 1000, UTC)
    args = data.get("args")
    msg.args = args if isinstance(args, list) else None
    if not args or not isinstance(args, list):
        msg.problem = "malformed: no args"
    elif msg.actor not in KNOWN_ACTORS:
        msg.problem = f"unknown actor {msg.actor!r}"
    elif isinstance(args[0], bool) or not isinstance(args[0], int):
        msg.problem = f"malformed: first arg {args[0]!r} is not a campaign message id"
    else:
        msg.campaign_message_id = args[0]
    return msg


def _x_death_time(properties: Any) -> dt.datetime | None:
    """When RabbitMQ dead-lettered the message (its x-death header), as an aware UTC datetime."""
    headers = getattr(properties, "headers", None) or {}
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, dt.datetime):
            return when.replace(tzinfo=UTC) if when.tzinfo is None else when
    return None


class XqBrowser:
    """Holds the messages of the pipeline XQs unacknowledged; ack removes one, close returns the rest."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._conn: Any = None
        self._channel: Any = None
        self.truncated: list[str] = []

    def open(self) -> XqBrowser:
        """Connect (raises ConfigError naming the broker, without its password, when unreachable)."""
        import pika
        from pika.exceptions import AMQPError

        params = pika.URLParameters(self.settings.rabbitmq_url)
        params.socket_timeout = self.timeout
        params.blocked_connection_timeout = self.timeout
        params.stack_timeout = self.timeout
        params.connection_attempts = 1
        try:
            self._conn = pika.BlockingConnection(params)
            self._channel = self._conn.channel()
        except (AMQPError, OSError) as exc:
            raise ConfigError(
                f"RabbitMQ unreachable at {redact_url(self.settings.rabbitmq_url)}: {type(exc).__name__}"
            ) from exc
        return self

    def browse(self, queues: Iterable[str]) -> list[XqMessage]:
        """Fetch every message of each ``queue``'s XQ without acknowledging it (a missing XQ is empty)."""
        out: list[XqMessage] = []
        for queue in queues:
            xq = f"{queue}.XQ"
            depth = self._depth(xq)
            if depth is None:  # never declared (or deleted): nothing died there
                continue
            fetched = 0
            while fetched < BROWSE_LIMIT:
                method, properties, body = self._channel.basic_get(queue=xq, auto_ack=False)
                if method is None:
                    break
                fetched += 1
                out.append(decode_xq(queue, method.delivery_tag, properties, body))
            if fetched >= BROWSE_LIMIT and depth > fetched:
                self.truncated.append(f"{xq}: only the first {fetched} of {depth} messages were read")
        return out

    def _depth(self, xq: str) -> int | None:
        """Messages in ``xq``, None when it does not exist.

        Probed on a channel of its own: a 404 closes the channel it happens on, and closing the
        browsing channel would give back every copy held so far while its delivery tags restart
        at 1 on the next channel, so a later ack would remove a different dead letter.
        """
        from pika.exceptions import ChannelClosedByBroker

        probe = self._conn.channel()
        try:
            return probe.queue_declare(queue=xq, passive=True).method.message_count
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            return None
        finally:
            if probe.is_open:
                probe.close()

    def ack(self, msg: XqMessage) -> None:
        """Remove one XQ copy for good."""
        self._channel.basic_ack(delivery_tag=msg.delivery_tag)

    def close(self) -> None:
        """Give every message not acknowledged back to its XQ, then disconnect."""
        from pika.exceptions import AMQPError

        if self._conn is None:
            return
        try:
            if self._channel is not None and self._channel.is_open:
                self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                self._channel.close()
        except AMQPError:  # closing the connection requeues whatever is still unacknowledged
            log.debug("nack/close of the XQ channel failed", exc_info=True)
        finally:
            try:
                self._conn.close()
            except AMQPError:
                pass
            self._conn = self._channel = None

    def __enter__(self) -> XqBrowser:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


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
           coalesce(d.campaign_message_id, CASE WHEN jsonb_typeof(d.payload->'args'->0) = 'number'
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


# --------------------------------------------------------------------------------------------
# actions


@dataclasses.dataclass
class Outcome:
    """What happened (or, in a dry run, would happen) to one dead letter."""

    item: Item
    action: str  # requeued | resolved | purged | stale | skipped | error
    text: str
    ok: bool
    repair: Repair | None = None


def _publish_via_broker(queue: str, args: tuple) -> None:
    """Publish the step's actor message by name through the engine's broker (publisher confirms on)."""
    import actors  # noqa: F401  (builds the engine's broker: confirms on, the steps' queues declared)

    enqueue(steps.BY_QUEUE[queue], args)


def _lock_row(row_id: int) -> str | None:
    found = db.execute_sql("SELECT status FROM dead_letters WHERE id = %s FOR UPDATE", (row_id,)).fetchone()
    return found[0] if found else None


def _mark(row_id: int, status: str, note: str) -> None:
    db.execute_sql(
        "UPDATE dead_letters SET status = %s, resolved_at = now(), note = %s WHERE id = %s AND status = 'dead'",
        (status, note[:2000], row_id),
    )


def describe_repair(r: Repair) -> str:
    """One line: status from -> to, parts, counters, run changes, what gets published."""
    bits = [f"message {r.message_id}: {r.status_from} -> {r.status_to}"]
    if r.parts:
        bits.append("parts " + ", ".join(f"#{i + 1} {a}" + (f"->{b}" if b != a else " (kept)") for i, a, b in r.parts))
    if r.run_before and r.run_after:
        changes = [
            f"{k.removeprefix('leads_')} {r.run_before[k]}->{r.run_after[k]}"
            for k in repairs.RUN_SNAPSHOT_FIELDS
            if k.startswith("leads_") and r.run_before[k] != r.run_after[k]
        ]
        if r.run_before["status"] != r.run_after["status"]:
            changes.append(f"status {r.run_before['status']}->{r.run_after['status']}")
        bits.append(f"run {r.run_id}: " + (", ".join(changes) or "unchanged"))
    bits += r.notes
    if r.publish:
        queue, args = r.publish
        bits.append(f"publish {REQUEUE_ACTOR_OF[queue]}({', '.join(map(str, args))}) to {queue}")
    return "; ".join(bits)


REQUEUE_ACTOR_OF = {queue: actor for actor, (_, queue) in REQUEUE_TARGETS.items()}


def _stale(item: Item) -> Outcome:
    row = item.row
    assert row is not None
    when = f" at {row.resolved_at:%Y-%m-%d %H:%M:%S}" if row.resolved_at else ""
    if item.xq:
        return Outcome(item, "stale", f"already {row.status}{when}: stale XQ copy removed, nothing published", True)
    return Outcome(item, "stale", f"already {row.status}{when}: nothing to do", True)


def _requeue_one(item: Item, settings: Settings, dry_run: bool) -> Outcome:
    """The transactional part of one requeue (publish and ack come after, in ``requeue``)."""
    if item.row is None:
        return Outcome(item, "skipped", f"not requeued: {item.problem}; `--purge --id {item.key}` drops it", False)
    if item.row.status != "dead":
        return _stale(item)
    with db.atomic():
        current = _lock_row(item.row.id)
        if current != "dead":  # another operator got there first
            item.row.status = current or "deleted"
            return _stale(item)
        mid = item.row.campaign_message_id
        if mid is None:
            repair = Repair(0, False, note="its campaign message no longer exists (its run was deleted)")
        else:
            repair = repairs.requeue_dead_step(mid, item.row.actor, settings)
        if repair.changed:
            text = describe_repair(repair)
            _mark(item.row.id, "requeued", text)
            action = "requeued"
        else:
            text = (f"message {mid}: " if mid else "") + f"{repair.note}; nothing published"
            _mark(item.row.id, "resolved", text)
            action = "resolved"
        if not dry_run and repair.run_id is not None:  # the message and its run exist: an audit line
            events.log_event(
                "dead_letters",
                f"dead letter {item.row.id} {action}: {text}",
                run_id=repair.run_id,
                message_id=mid,
                details={"dead_letter": item.row.id, "dramatiq_id": item.key},
            )
    return Outcome(item, action, text, True, repair)


def _purge_one(item: Item) -> Outcome:
    if item.row is not None and item.row.status != "dead":
        return _stale(item)
    with db.atomic():
        if item.row is not None:
            if _lock_row(item.row.id) != "dead":
                return _stale(item)
            text = f"purged: message {item.campaign_message_id} stays {item.message_status or 'as it is'}"
            _mark(item.row.id, "purged", text)
        else:
            # keep a record of what was thrown away: a dead letter never vanishes silently
            x = item.xq[0]
            try:
                payload = json.loads(x.body.decode("utf-8"))
                if "\\u0000" in json.dumps(payload):
                    raise ValueError("NUL")  # jsonb cannot hold \u0000
            except (UnicodeDecodeError, ValueError):
                # the exact bytes, plus something a person can read
                payload = {
                    "raw_base64": base64.b64encode(x.body[:100_000]).decode("ascii"),
                    "preview": x.body[:500].decode("utf-8", "replace").replace("\x00", "\\0"),
                }
            text = f"purged from {x.queue}.XQ ({item.problem}); recorded here"
            db.execute_sql(
                """INSERT INTO dead_letters (queue, actor, dramatiq_message_id, campaign_message_id,
                                  payload, error_class, error_message, status, resolved_at, note)
                              VALUES (%s, %s, %s, (SELECT id FROM campaign_messages WHERE id = %s), %s, %s, %s,
                                      'purged', now(), %s)
                              ON CONFLICT (dramatiq_message_id) DO NOTHING""",
                (
                    x.queue,
                    x.actor or "(unknown)",
                    item.key,
                    item.campaign_message_id,
                    json.dumps(payload, default=str),
                    "unrecorded",
                    item.error[:2000],
                    text,
                ),
            )
    if item.xq:
        text += f"; {len(item.xq)} XQ cop{'y' if len(item.xq) == 1 else 'ies'} removed"
    return Outcome(item, "purged", text, True)


def _act(
    items: list[Item],
    settings: Settings,
    browser: XqBrowser | None,
    dry_run: bool,
    one: Callable[[Item], Outcome],
    publish: Publisher | None,
) -> list[Outcome]:
    if dry_run:
        outcomes: list[Outcome] = []
        # Everything runs for real inside one transaction that is rolled back: the dry run
        # shows exactly what the real run does, counters of several letters of one run included.
        # The simulation's own INFO log lines would read as if it happened: muted meanwhile.
        previous = logging.root.manager.disable
        logging.disable(logging.INFO)
        try:
            with db.atomic():
                for item in items:
                    try:
                        with db.atomic():
                            outcomes.append(one(item))
                    except Exception as exc:
                        outcomes.append(Outcome(item, "error", f"{type(exc).__name__}: {exc}", False))
                raise _DryRunRollback
        except _DryRunRollback:
            pass
        finally:
            logging.disable(previous)
        return outcomes
    outcomes = []
    for item in items:
        try:
            outcome = one(item)
        except Exception as exc:
            log.exception("dead letter %s: %s", item.label, exc)
            outcomes.append(Outcome(item, "error", f"nothing changed: {type(exc).__name__}: {exc}", False))
            continue
        if outcome.repair is not None and outcome.repair.publish is not None:
            queue, args = outcome.repair.publish
            try:
                (publish or _publish_via_broker)(queue, args)
            except Exception as exc:
                log.error(
                    "dead letter %s: message %s committed but publishing to %s failed: %s",
                    item.label,
                    outcome.repair.message_id,
                    queue,
                    exc,
                )
                outcome.ok = False
                outcome.action = "error"
                outcome.text += (
                    f"; PUBLISH FAILED ({type(exc).__name__}: {exc}): the recovery sweep re-enqueues "
                    f"message {outcome.repair.message_id} within LEASE_SECONDS "
                    f"({settings.lease_seconds} s); the XQ copy is kept"
                )
                outcomes.append(outcome)
                continue
        if outcome.ok and outcome.action != "skipped" and browser is not None:
            try:
                for copy in item.xq:
                    browser.ack(copy)
            except Exception as exc:
                outcome.text += f"; XQ copy not removed ({type(exc).__name__}); the next run removes it"
        log.info("dead letter %s %s: %s", item.label, outcome.action, outcome.text)
        outcomes.append(outcome)
    return outcomes


def requeue(
    items: list[Item],
    settings: Settings,
    browser: XqBrowser | None,
    *,
    dry_run: bool = False,
    publish: Publisher | None = None,
) -> list[Outcome]:
    """Requeue each item (see the module docstring for the order of commit, publish, ack)."""
    return _act(items, settings, browser, dry_run, lambda i: _requeue_one(i, settings, dry_run), publish)


def purge(items: list[Item], settings: Settings, browser: XqBrowser | None, *, dry_run: bool = False) -> list[Outcome]:
    """Drop each item's XQ copies and mark its row purged (the campaign message is not touched)."""
    return _act(items, settings, browser, dry_run, _purge_one, None)


# --------------------------------------------------------------------------------------------
# output


def format_age(delta: dt.timedelta | None) -> str:
    """Compact age: 45s, 12m, 3h05m, 2d04h."""
    if delta is None:
        return "?"
    s = max(0, int(delta.total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_COLUMNS = ("ID", "QUEUE", "ACTOR", "MESSAGE", "RUN", "AGE", "WHERE", "DL STATUS", "MSG STATUS", "ERROR / NOTE")


def _cells(item: Item, now: dt.datetime) -> list[str]:
    age = format_age(now - item.dead_at) if item.dead_at else "?"
    note = item.error if item.row is None or not item.row.note else f"{item.error} | {item.row.note}"
    return [
        item.label,
        item.queue,
        item.actor or "?",
        str(item.campaign_message_id or "-"),
        str(item.run_id or "-"),
        age,
        item.where,
        item.row.status if item.row else "-",
        item.message_status or "-",
        note,
    ]


def _as_json(item: Item, now: dt.datetime, outcome: Outcome | None = None) -> dict:
    d = {
        "id": item.row.id if item.row else None,
        "key": item.key,
        "queue": item.queue,
        "actor": item.actor,
        "campaign_message_id": item.campaign_message_id,
        "run_id": item.run_id,
        "age_seconds": round((now - item.dead_at).total_seconds(), 1) if item.dead_at else None,
        "where": item.where,
        "xq_copies": len(item.xq),
        "status": item.row.status if item.row else None,
        "message_status": item.message_status,
        "error": item.error,
        "problem": item.problem,
        "note": item.row.note if item.row else None,
    }
    if outcome is not None:
        d.update(action=outcome.action, ok=outcome.ok, result=outcome.text)
    return d


def print_table(items: list[Item], now: dt.datetime, out: TextSink, width: int = 200) -> None:
    """A plain fixed-width table (piped output stays greppable)."""
    rows = [_cells(i, now) for i in items]
    widths = [max([len(c)] + [len(r[n]) for r in rows]) for n, c in enumerate(_COLUMNS[:-1])]
    for cells in [list(_COLUMNS)] + rows:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
        out.write(line[:width].rstrip() + "\n")


# --------------------------------------------------------------------------------------------
# the command


def check_args(args: argparse.Namespace) -> None:
    """Cross-option checks argparse cannot express (DeadLetterUsageError -> exit 2)."""
    if args.dry_run and not (args.requeue or args.purge):
        raise DeadLetterUsageError("--dry-run goes with --requeue or --purge (listing never changes anything)")
    if args.older_than is not None and args.newer_than is not None and args.older_than >= args.newer_than:
        raise DeadLetterUsageError(
            f"--older-than {args.older_than} and --newer-than {args.newer_than} select nothing "
            "(older-than must be shorter than newer-than)"
        )
    if args.run and any(r <= 0 for r in args.run):
        raise DeadLetterUsageError("--run takes a positive run id")


def run(
    args: argparse.Namespace, settings: Settings, *, out: TextSink | None = None, publish: Publisher | None = None
) -> int:
    """List / requeue / purge as ``args`` say; returns the exit code (0 ok, 1 partial, 2 usage)."""
    out = out or sys.stdout
    check_args(args)
    acting = args.requeue or args.purge
    now = dt.datetime.now(UTC)
    opened = XqBrowser(settings)
    browser: XqBrowser | None = opened  # None once it turned out unusable: nothing to close
    warnings: list[str] = []
    try:
        try:
            opened.open()
            xq = opened.browse(PIPELINE_QUEUES)
            warnings += opened.truncated
        except ConfigError as exc:
            if acting and not args.dry_run:
                # never half-act: a requeue must publish, a purge must ack
                print(f"error: {exc}; nothing was changed", file=sys.stderr)
                return EXIT_PARTIAL
            warnings.append(f"{exc}: XQ copies not shown, only the PostgreSQL records")
            browser, xq = None, []
        with db.connection_context():
            items = collect(xq, include_resolved=args.all, wanted=args.id or ())
            selected, unmatched = select(items, args, now)
            outcomes: list[Outcome] | None = None
            if args.requeue:
                outcomes = requeue(selected, settings, browser, dry_run=args.dry_run, publish=publish)
            elif args.purge:
                outcomes = purge(selected, settings, browser, dry_run=args.dry_run)
        _report(selected, outcomes, args, now, out)
    finally:
        if browser is not None:
            browser.close()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for value in unmatched:
        print(
            f"error: --id {value}: no such dead letter (use --all to include requeued/purged/resolved ones)",
            file=sys.stderr,
        )
    failed = [o for o in outcomes or [] if not o.ok]
    return EXIT_PARTIAL if failed or unmatched or warnings else EXIT_OK


def _report(
    selected: list[Item], outcomes: list[Outcome] | None, args: argparse.Namespace, now: dt.datetime, out: TextSink
) -> None:
    if args.json:
        by_item = {id(o.item): o for o in outcomes or []}
        for item in selected:
            out.write(json.dumps(_as_json(item, now, by_item.get(id(item))), default=str) + "\n")
        return
    if not selected:
        out.write("no dead letters" + (" match the filters" if _filtered(args) else "") + "\n")
        return
    print_table(selected, now, out)
    if outcomes is None:
        out.write(
            f"{len(selected)} dead letter(s); where: XQ = only in RabbitMQ, DB = only in PostgreSQL "
            "(XQ copy expired or removed), both\n"
        )
        return
    verb = "would be " if args.dry_run else ""
    out.write("\nDRY RUN: nothing was changed, neither in PostgreSQL nor in RabbitMQ\n" if args.dry_run else "\n")
    for o in outcomes:
        action = (
            o.action
            if not args.dry_run
            else {
                "requeued": "would requeue",
                "resolved": "would resolve",
                "purged": "would purge",
                "stale": "would drop stale copy",
                "skipped": "would skip",
                "error": "error",
            }[o.action]
        )
        out.write(f"{o.item.label}: {action}: {o.text}\n")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.action] = counts.get(o.action, 0) + 1
    out.write(
        f"{len(outcomes)} dead letter(s) {verb}handled: "
        + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
        + "\n"
    )


def _filtered(args: argparse.Namespace) -> bool:
    return bool(args.queue or args.actor or args.run or args.id or args.older_than or args.newer_than)


def main(argv: Sequence[str] | None = None, *, prog: str = "reprocess_dead_letters.py") -> int:
    """Script entry point: parse, set up logging and the database, run; exit codes 0/1/2."""

    parser = argparse.ArgumentParser(
        prog=prog, description="List, requeue or purge the dead letters of the campaign pipeline (SPEC R-OPS-2)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        configure_logging(settings, level="DEBUG" if args.verbose else None)
        init_db(settings, max_connections=2, application_name="reprocess-dead-letters")
        return run(args, settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (peewee.OperationalError, peewee.InterfaceError) as exc:  # database down: nothing was changed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: database unavailable ({redact_url(get_settings().database_url)}): {first}", file=sys.stderr)
        return EXIT_PARTIAL


# --------------------------------------------------------------------------------------------
# in-doubt resolution (R-FAIL-4): `python cli.py resolve MESSAGE --sent | --resend`


def resolve(
    message_id: int, outcome: str, settings: Settings, *, out: TextSink | None = None, publish: Publisher | None = None
) -> int:
    """Settle one in_doubt message (repairs.resolve_in_doubt), then publish its next send if any.

    Raises RepairRefused (exit 2 in the CLI) when the message is not in_doubt.
    """
    out = out or sys.stdout
    with db.connection_context():
        repair = repairs.resolve_in_doubt(message_id, outcome, settings)
    out.write(f"resolved ({outcome}): {describe_repair(repair)}\n")
    log.info(
        "message %s resolved %s run=%s: %s -> %s",
        message_id,
        outcome,
        repair.run_id,
        repair.status_from,
        repair.status_to,
    )
    if repair.publish is None:
        return EXIT_OK
    queue, args = repair.publish
    try:
        (publish or _publish_via_broker)(queue, args)
    except Exception as exc:
        log.error("message %s resolved but publishing to %s failed: %s", message_id, queue, exc)
        print(
            f"error: message {message_id} is back to 'sending' but publishing to {queue} failed "
            f"({type(exc).__name__}: {exc}); the recovery sweep re-enqueues it within LEASE_SECONDS "
            f"({settings.lease_seconds} s)",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK
