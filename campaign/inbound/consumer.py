"""The Evolution events consumer: ``python inbound.py`` (SPEC R-IN-1, E-38, T-PERF-6).

Evolution API in RabbitMQ global mode publishes every event to a durable topic exchange
(``EVOLUTION_EVENTS_EXCHANGE``) with the event name as routing key, into one durable quorum queue
per event, ``{EVOLUTION_EVENTS_PREFIX}.{event}``. This consumer declares the same exchange, queues
and bindings with the same arguments (whichever side starts first, neither fails with
PRECONDITION_FAILED) and consumes ``messages.upsert``, ``messages.update`` and
``connection.update``.

Delivery is at least once and nothing is acked before it is committed:

* what the broker has delivered is applied in ONE database transaction per batch (each event in
  its own savepoint), then acked with one ``basic_ack(multiple=True)``: a burst costs one commit
  and one ack, not one per event, while a lone reply is applied the moment it arrives;
* a poison event (not JSON, not an envelope, a field out of bounds) is recorded in
  ``campaign_events`` (never its body: it carries Evolution's apikey) and acked with its batch:
  never redelivered forever;
* a database error rolls the batch back and nothing is acked; the events are applied again one by
  one, and an event that keeps failing on its own (3 times, the database answering) is recorded
  as poison; while the database is unreachable the consumer waits with backoff, holding them;
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

from campaign.db import db
from campaign.errors import ConfigError, EnvelopeError
from campaign.events import log_event
from campaign.inbound import handle
from campaign.settings import Settings, redact_url

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
    batches: int = 0
    reconnects: int = 0
    by_result: dict[str, int] = field(default_factory=dict)


@dataclass
class _Delivery:
    tag: int
    queue: str
    body: bytes
    redelivered: bool


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
        params = pika.URLParameters(self.url)
        params.heartbeat = 30
        params.blocked_connection_timeout = 60
        params.client_properties = {"connection_name": "campaign-engine inbound"}
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
        """Apply ``batch`` in one transaction and ack it; one by one after a database error."""
        try:
            with db.connection_context(), db.atomic():
                results = [self._apply_one(d) for d in batch]
        except (peewee.PeeweeException, psycopg2.Error):
            log.warning("inbound: batch of %s rolled back by a database error; applying one by one", len(batch))
            for delivery in batch:
                self._apply_alone(channel, delivery)
            return
        channel.basic_ack(delivery_tag=max(d.tag for d in batch), multiple=True)
        self._count(results)

    def _apply_alone(self, channel: Any, delivery: _Delivery) -> None:
        failures = 0
        backoff = 0.2
        while True:
            try:
                with db.connection_context(), db.atomic():
                    result = self._apply_one(delivery)
                channel.basic_ack(delivery_tag=delivery.tag)
                self._count([result])
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
                    channel.basic_ack(delivery_tag=delivery.tag)
                    self.stats.poison += 1
                    return

    def _apply_one(self, delivery: _Delivery) -> str:
        """Apply one event inside the caller's transaction (its own savepoint); the result name."""
        try:
            doc = json.loads(delivery.body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._poison(delivery, f"body is not valid JSON ({type(exc).__name__})")
            return "poison"
        try:
            with db.atomic():
                result = handle(doc, self.settings)
        except EnvelopeError as exc:
            self._poison(delivery, str(exc), doc)
            return "poison"
        if isinstance(result, str):
            log.debug("inbound: %s ignored: %s", delivery.queue, result)
            return "ignored"
        return f"{delivery.queue.rsplit('.', 1)[0]}:{result.result}"

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
