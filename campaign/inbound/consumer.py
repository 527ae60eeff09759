"""The Evolution events consumer: ``python inbound.py`` (SPEC R-IN-1, E-38, T-PERF-6).

Evolution API in RabbitMQ global mode publishes every event to a durable topic exchange
(``EVOLUTION_EVENTS_EXCHANGE``) with the event name as routing key, into one durable quorum queue
per event, ``{EVOLUTION_EVENTS_PREFIX}.{event}``. This consumer declares the same exchange, queues
and bindings with the same arguments (whichever side starts first, neither fails with
PRECONDITION_FAILED) and consumes ``messages.upsert``, ``messages.update`` and
``connection.update``.

Delivery is at least once and nothing is acked before it is committed:

* what the broker has delivered is applied in as few database transactions as the send path's
  lock order allows, and acked as they commit (``basic_ack(multiple=True)`` up to the committed
  prefix): every receipt of a batch in one transaction and one statement, then the batch's
  replies together (``apply_messages``: one transaction whose statements each do one step for
  all of them, parts before messages before runs before leads, the send path's order; a lead
  replying twice in the batch gets a second transaction), then each connection change on its
  own. A burst costs a few commits, not one per event, while a lone reply is applied the moment
  it arrives. A transaction that has stopped messages holds run rows, the send path's LAST lock:
  nothing in it may wait on a part or a message after that, or a send holding one while it waits
  for the run row would deadlock with it;
* a poison event (not JSON, not an envelope, a field out of bounds) is recorded in
  ``campaign_events`` (never its body: it carries Evolution's apikey) and acked with its batch:
  never redelivered forever;
* a database error rolls the transaction back and nothing of it is acked; its events are applied
  again one by one, and an event that keeps failing on its own (3 times, the database answering)
  is recorded as poison; while the database is unreachable the consumer waits with backoff,
  holding them;
* a lost broker connection (a restart, a network cut) is re-opened with backoff; the unacked
  events are redelivered by RabbitMQ and applied again harmlessly: every effect is idempotent on
  (inbox, provider message id) (E-30, E-38).

The prefetch (``INBOUND_PREFETCH``) bounds what the consumer holds unacked.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee
import pika
import pika.exceptions
import psycopg2

from campaign import health
from campaign.db import db
from campaign.errors import ConfigError, EnvelopeError
from campaign.events import log_event
from campaign.inbound import (
    ConnectionChange,
    DeliveryUpdate,
    Event,
    InboundMessage,
    apply_event,
    apply_messages,
    parse_envelope,
)
from campaign.inbound.envelopes import ERROR_STATUS
from campaign.inbound.receipts import apply_updates
from campaign.settings import Settings, amqp_parameters, redact_url

log = logging.getLogger(__name__)

__all__ = ["EVENTS", "InboundConsumer", "Stats", "declare_topology", "queue_name"]

#: the events the engine consumes (Evolution also publishes send.message and others)
EVENTS = ("messages.upsert", "messages.update", "connection.update")
#: Evolution's own queue arguments: the same here, or RabbitMQ refuses the second declaration
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
POISON_AFTER = 3  # failed applications of one event, alone, with the database answering
_DB_DOWN = (peewee.OperationalError, peewee.InterfaceError, psycopg2.OperationalError, psycopg2.InterfaceError)
_AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


def queue_name(prefix: str, event: str) -> str:
    """``{prefix}.{event}``, as Evolution names its global queues."""
    return f"{prefix}.{event}"


def declare_topology(channel: Any, exchange: str, prefix: str, events: tuple[str, ...] = EVENTS) -> list[str]:
    """Declare the exchange, the queues and their bindings exactly as Evolution does; return the queues."""
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True, auto_delete=False)
    queues = []
    for event in events:
        name = queue_name(prefix, event)
        channel.queue_declare(queue=name, durable=True, auto_delete=False, arguments=dict(QUEUE_ARGUMENTS))
        channel.queue_bind(queue=name, exchange=exchange, routing_key=event)
        queues.append(name)
    return queues


@dataclass
class Stats:
    """What the consumer did since it started (logged every minute, read by tests and the bench)."""

    applied: int = 0
    ignored: int = 0
    poison: int = 0
    batches: int = 0  # transactions committed
    reconnects: int = 0
    by_result: dict[str, int] = field(default_factory=dict)


@dataclass
class _Delivery:
    tag: int
    queue: str  # the routing key Evolution published with: the event name (messages.upsert, ...)
    body: bytes
    redelivered: bool


@dataclass
class _Parsed:
    delivery: _Delivery
    doc: Any
    event: Event | None = None
    poison: str | None = None  # why the event is unusable
    ignored: str | None = None  # why a valid event changes nothing

    @property
    def takes_runs(self) -> bool:
        """A reply (it may stop messages: run counters) or a connection change (it pauses or
        resumes runs) takes run rows, the send path's last lock: never in the receipts' transaction,
        where a later statement could wait on a part or a message a send holds while that send
        waits for the run row (a deadlock)."""
        return isinstance(self.event, (InboundMessage, ConnectionChange))


def _groups(parsed: list[_Parsed]) -> list[list[_Parsed]]:
    """The batch cut into groups: every receipt, poison and ignored event of it (one transaction,
    the receipts in one statement), then its replies (:func:`apply_messages`: together, in as many
    transactions as a lead replying twice needs), then each connection change on its own. The
    queues are independent (Evolution orders nothing across them): the order within each queue is
    kept, which is all that matters."""
    shared = [p for p in parsed if not p.takes_runs]
    replies = [p for p in parsed if isinstance(p.event, InboundMessage)]
    changes = [[p] for p in parsed if isinstance(p.event, ConnectionChange)]
    return [g for g in (shared, replies) if g] + changes


def _label(delivery: _Delivery, result: str) -> str:
    return f"{delivery.queue}:{result}"  # the routing key Evolution published with: the event's name


class _Acks:
    """Acks a batch as its transactions commit: one ``basic_ack(multiple=True)`` up to the longest
    committed prefix of its delivery tags, so no delivery is acked before it is committed."""

    def __init__(self, channel: Any, batch: list[_Delivery]) -> None:
        self.channel = channel
        self.order = sorted(d.tag for d in batch)
        self.done: set[int] = set()
        self.next = 0

    def committed(self, deliveries: list[_Delivery]) -> None:
        self.done.update(d.tag for d in deliveries)
        upto = None
        while self.next < len(self.order) and self.order[self.next] in self.done:
            upto = self.order[self.next]
            self.next += 1
        if upto is not None:
            self.channel.basic_ack(delivery_tag=upto, multiple=True)


class InboundConsumer:
    """Consumes Evolution's event queues until :meth:`stop`; safe to run several side by side."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        batch_max: int = 100,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.url = url or settings.evolution_events_rabbitmq_url
        if not self.url:
            raise ConfigError(
                "EVOLUTION_EVENTS_RABBITMQ_URL is empty: set it to the RabbitMQ that Evolution API publishes "
                "its events to (RABBITMQ_ENABLED=true, RABBITMQ_GLOBAL_ENABLED=true on the Evolution side)"
            )
        self.exchange = settings.evolution_events_exchange
        self.prefix = settings.evolution_events_prefix
        self.prefetch = settings.inbound_prefetch
        self.batch_max = max(1, min(batch_max, self.prefetch))
        self.stats = Stats()
        self.ready = threading.Event()  # set once consuming (tests and the demo wait on it)
        self._stop = threading.Event()
        self._on_batch = on_batch
        self._connection: pika.BlockingConnection | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch and close (unacked events go back to the queues)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff after any broker trouble."""
        backoff = 0.5
        last_report = time.monotonic()
        while not self._stop.is_set():
            try:
                self._consume()
                backoff = 0.5
            except _AMQP_ERRORS as exc:
                self.ready.clear()
                if self._stop.is_set():
                    break
                self.stats.reconnects += 1
                wait = backoff * (0.5 + random.random())
                log.warning(
                    "inbound: broker %s lost (%s: %s); reconnecting in %.1fs",
                    redact_url(self.url),
                    type(exc).__name__,
                    exc,
                    wait,
                )
                self._stop.wait(wait)
                backoff = min(backoff * 2, 30.0)
            finally:
                self._close()
            if time.monotonic() - last_report > 60:
                log.info("inbound: %s", self.stats)
                last_report = time.monotonic()
        log.info("inbound: stopped (%s)", self.stats)

    def _close(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except _AMQP_ERRORS:
                pass

    # -- consuming ---------------------------------------------------------------------------

    def _consume(self) -> None:
        # every node of EVOLUTION_EVENTS_RABBITMQ_URL, tried in order: a reconnect after the node
        # died lands on a live one (R-SCALE-2)
        params = amqp_parameters(
            self.url,
            heartbeat=30,
            blocked_connection_timeout=60,
            client_properties={"connection_name": "campaign-engine inbound"},
        )
        self._connection = conn = pika.BlockingConnection(params)
        channel = conn.channel()
        queues = declare_topology(channel, self.exchange, self.prefix)
        channel.basic_qos(prefetch_count=self.prefetch)
        pending: list[_Delivery] = []

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            pending.append(_Delivery(method.delivery_tag, method.routing_key, body, bool(method.redelivered)))

        for queue in queues:
            channel.basic_consume(queue=queue, on_message_callback=on_message, auto_ack=False)
        log.info(
            "inbound: consuming %s on %s (exchange %s, prefetch %s)",
            ", ".join(queues),
            redact_url(self.url),
            self.exchange,
            self.prefetch,
        )
        self.ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.2)
            if not pending:
                continue
            # take what else has already arrived (a burst becomes one transaction)
            while len(pending) < self.batch_max:
                before = len(pending)
                conn.process_data_events(time_limit=0)
                if len(pending) == before:
                    break
            batch, pending[:] = pending[: self.batch_max], pending[self.batch_max :]
            self._apply_batch(channel, batch)

    # -- applying ----------------------------------------------------------------------------

    def _apply_batch(self, channel: Any, batch: list[_Delivery]) -> None:
        """Apply ``batch`` in as few transactions as the send path's lock order allows (see
        :func:`_groups`), acking what each commits; a group is applied one by one after a
        database error."""
        acks = _Acks(channel, batch)
        for group in _groups([self._parse(d) for d in batch]):
            try:
                with db.connection_context():
                    if isinstance(group[0].event, InboundMessage):
                        results = self._apply_replies(group)  # its own transactions
                    else:
                        with db.atomic():
                            results = self._apply_group(group)
            except (peewee.PeeweeException, psycopg2.Error):
                log.warning("inbound: %s event(s) rolled back by a database error; applying one by one", len(group))
                for parsed in group:
                    self._apply_alone(parsed.delivery)
                    acks.committed([parsed.delivery])
                continue
            acks.committed([p.delivery for p in group])
            self._count(results)
            self._after_errors(group)

    def _after_errors(self, group: list[_Parsed]) -> None:
        """Delivery ``ERROR`` receipts committed: evaluate their inboxes' health (R-HEALTH-2), in
        transactions of their own (they may pause runs: never in the receipts' transaction)."""
        instances = [
            p.event.instance for p in group if isinstance(p.event, DeliveryUpdate) and p.event.status == ERROR_STATUS
        ]
        if instances:
            try:
                with db.connection_context():
                    health.after_receipts(instances, self.settings)
            except (peewee.PeeweeException, psycopg2.Error) as exc:  # recorded: the health sweep catches up
                log.warning("inbound: health of %s not evaluated (%s)", sorted(set(instances)), type(exc).__name__)

    def _apply_replies(self, group: list[_Parsed]) -> list[str]:
        """A batch's replies, together (:func:`apply_messages` commits them); the result names."""
        msgs = [p.event for p in group if isinstance(p.event, InboundMessage)]
        assert len(msgs) == len(group)
        return [_label(p.delivery, r.result) for p, r in zip(group, apply_messages(msgs, self.settings))]

    def _apply_group(self, group: list[_Parsed]) -> list[str]:
        """Apply a group inside the caller's transaction (its receipts in one statement); the result names."""
        out = [self._apply_parsed(p) if not isinstance(p.event, DeliveryUpdate) else "" for p in group]
        receipts = [(i, p.event) for i, p in enumerate(group) if isinstance(p.event, DeliveryUpdate)]
        if receipts:
            for (i, _), result in zip(receipts, apply_updates([u for _, u in receipts])):
                out[i] = _label(group[i].delivery, result.result)
        return out

    def _apply_alone(self, delivery: _Delivery) -> None:
        """Apply one event in its own transaction (the caller acks it): retried while the database
        is away, recorded as poison when the database keeps refusing it."""
        failures = 0
        backoff = 0.2
        while True:
            try:
                with db.connection_context(), db.atomic():
                    result = self._apply_one(delivery)
                self._count([result])
                self._after_errors([self._parse(delivery)])
                return
            except _DB_DOWN as exc:
                # the database is away: hold the event (unacked) and wait for it
                log.warning("inbound: database unavailable (%s); retrying in %.1fs", type(exc).__name__, backoff)
                if self._stop.wait(backoff):
                    raise pika.exceptions.ConnectionWrongStateError("stopping with unapplied events") from exc
                backoff = min(backoff * 2, 10.0)
            except (peewee.PeeweeException, psycopg2.Error) as exc:
                failures += 1
                if failures >= POISON_AFTER:
                    with db.connection_context():
                        self._poison(delivery, f"database refused it {failures} times: {type(exc).__name__}")
                    self.stats.poison += 1
                    return

    def _apply_one(self, delivery: _Delivery) -> str:
        """Apply one event inside the caller's transaction; the result name."""
        return self._apply_parsed(self._parse(delivery))

    @staticmethod
    def _parse(delivery: _Delivery) -> _Parsed:
        """Decode and validate a delivery (no database): the event, or why it is poison / ignored."""
        try:
            doc = json.loads(delivery.body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _Parsed(delivery, None, poison=f"body is not valid JSON ({type(exc).__name__})")
        try:
            event = parse_envelope(doc)
        except EnvelopeError as exc:
            return _Parsed(delivery, doc, poison=str(exc))
        if isinstance(event, str):
            return _Parsed(delivery, doc, ignored=event)
        return _Parsed(delivery, doc, event=event)

    def _apply_parsed(self, parsed: _Parsed) -> str:
        """Apply one parsed event inside the caller's transaction; the result name."""
        delivery = parsed.delivery
        if parsed.poison is not None:
            self._poison(delivery, parsed.poison, parsed.doc)
            return "poison"
        if parsed.event is None:
            log.debug("inbound: %s ignored: %s", delivery.queue, parsed.ignored)
            return "ignored"
        # No savepoint per event (two round trips each): parsing raised before any statement, and
        # a database error rolls the whole group back to be applied again one by one.
        return _label(delivery, apply_event(parsed.event, self.settings).result)

    def _poison(self, delivery: _Delivery, reason: str, doc: Any = None) -> None:
        """Record an unusable event (reason, queue, size: never the body, it carries the apikey)."""
        event = doc.get("event") if isinstance(doc, dict) else None
        instance = doc.get("instance") if isinstance(doc, dict) else None
        log_event(
            "inbound",
            f"unusable Evolution event on {delivery.queue}: {reason}",
            level="error",
            details={
                "queue": delivery.queue,
                "reason": reason[:500],
                "bytes": len(delivery.body),
                "event": event[:64] if isinstance(event, str) else None,
                "instance": instance[:200] if isinstance(instance, str) else None,
                "redelivered": delivery.redelivered,
            },
        )
        log.error("inbound: unusable event on %s (%s bytes): %s", delivery.queue, len(delivery.body), reason)

    def _count(self, results: list[str]) -> None:
        self.stats.batches += 1
        for r in results:
            if r == "poison":
                self.stats.poison += 1
            elif r == "ignored":
                self.stats.ignored += 1
            else:
                self.stats.applied += 1
            self.stats.by_result[r] = self.stats.by_result.get(r, 0) + 1
        if self._on_batch:
            self._on_batch(len(results))
