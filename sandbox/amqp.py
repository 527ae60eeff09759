"""The RabbitMQ sink: publishes events the way Evolution API's RabbitMQ integration does in global mode.

Evolution (``src/api/integrations/event/rabbitmq/rabbitmq.controller.ts``, ``RABBITMQ_GLOBAL_ENABLED=true``):

* a topic exchange ``RABBITMQ_EXCHANGE_NAME``, durable, not auto-deleted;
* per enabled event a queue ``{RABBITMQ_PREFIX_KEY}.{event}`` (just ``{event}`` with no prefix), durable,
  not auto-deleted, ``x-queue-type: quorum``, bound with routing key = the event (``messages.upsert``).
  At start-up Evolution also binds each queue with its settings' spelling of the event
  (``MESSAGES_UPSERT``): a binding nothing publishes to, reproduced here so the topology is identical;
* each event published with routing key = the event, body = the JSON envelope (no content type).

The sandbox declares the same topology when it connects (and before the first publish of an event
that was switched on later), publishes with publisher confirms and ``mandatory`` (an unroutable event
is a counted failure, not a silent loss) and marks messages persistent. A quorum queue confirms a
message once it is on disk, so one publisher waiting for each confirm manages a few hundred events/s;
the sink runs ``publishers`` of them (default 4), each a thread owning its own pika connection (pika
is not thread-safe) and draining its own bounded queue in order. All events of one chat (instance and
remote JID; an instance's connection changes count as one chat) go through the same publisher, so
they reach the broker in the order they were published. When the
broker goes away a publisher reconnects with backoff (0.2 s doubling to 2 s) and retries the event in
hand; an event still unpublished ``retry_seconds`` after it was queued is logged and counted
``failed`` and the next one is tried. The sandbox keeps serving HTTP whatever the broker does.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

__all__ = ["AmqpSink", "QUEUE_ARGUMENTS", "queue_name"]

logger = logging.getLogger(__name__)

#: the arguments Evolution declares its queues with; a consumer must declare them identically
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}

_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 2.0


def queue_name(prefix: str, event: str) -> str:
    """``{prefix}.{event}``, or just the event when the prefix is empty (as Evolution names them)."""
    return f"{prefix}.{event}" if prefix else event


def _masked(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _chat_of(envelope: dict[str, Any]) -> str:
    """instance + the chat's JID (what must stay in order); just the instance for connection.update."""
    data: dict[str, Any] = envelope.get("data") or {}
    key = data.get("key")
    jid = key.get("remoteJid") if isinstance(key, dict) else data.get("remoteJid")
    return f"{envelope['instance']}|{jid or ''}"


class AmqpSink:
    """Publishes envelopes to RabbitMQ (global mode); outcomes via ``on_outcome(event, outcome)``.

    Outcomes: ``sent`` (confirmed by the broker), ``retried`` (an attempt failed, the event is tried
    again), ``failed`` (unroutable, or not published within ``retry_seconds``), ``dropped`` (queue full).
    """

    name = "amqp"

    def __init__(
        self,
        *,
        url: str,
        exchange: str,
        prefix: str,
        events: Callable[[], list[str]],
        on_outcome: Callable[[str, str], None],
        retry_seconds: float = 30.0,
        publishers: int = 4,
        max_queue: int = 100_000,
    ) -> None:
        if not exchange:
            raise ValueError("the events exchange name is empty")
        if not 1 <= publishers <= 64:
            raise ValueError(f"events AMQP publishers: {publishers} is not between 1 and 64")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"events AMQP URL {_masked(url)!r} is not amqp://user:pass@host:port/vhost")
        self.url = url
        self.exchange = exchange
        self.prefix = prefix
        self.retry_seconds = retry_seconds
        self.connection_name = f"sandbox-events-{os.getpid()}-{id(self):x}"
        self._publishers = [
            _Publisher(self, f"{self.connection_name}-{i}", events, on_outcome, max(1, max_queue // publishers))
            for i in range(publishers)
        ]
        self._on_outcome = on_outcome

    def accepts(self, event: str, cfg: dict[str, Any]) -> bool:
        """The event is switched on for RabbitMQ (``amqp_events``)."""
        return event in cfg["amqp_events"]

    def submit(self, envelope: dict[str, Any], cfg: dict[str, Any]) -> None:
        """Queue one envelope on its chat's publisher (dropped and counted if that queue is full)."""
        body = json.dumps(envelope, ensure_ascii=False).encode()
        publisher = self._publishers[zlib.crc32(_chat_of(envelope).encode()) % len(self._publishers)]
        try:
            publisher.queue.put_nowait((envelope["event"], body, time.monotonic()))
        except queue.Full:
            self._on_outcome(envelope["event"], "dropped")

    def view(self) -> dict[str, Any]:
        """Connection state, topology and queue depth for the control API (password masked).

        ``connected``: every publisher is connected; ``connects``: connections opened so far, all
        publishers together.
        """
        declared = set.intersection(*(p.declared for p in self._publishers))
        errors = [p.last_error for p in self._publishers if p.last_error]
        return {
            "url": _masked(self.url),
            "exchange": self.exchange,
            "prefix": self.prefix,
            "queues": {event: queue_name(self.prefix, event) for event in sorted(declared)},
            "connected": all(p.conn is not None for p in self._publishers),
            "publishers": len(self._publishers),
            "connects": sum(p.connects for p in self._publishers),
            "connection_name": self.connection_name,
            "queued": sum(p.queue.qsize() for p in self._publishers),
            "last_error": errors[-1] if errors else None,
        }

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the publishers; each closes its connection."""
        for publisher in self._publishers:
            publisher.stop.set()
            try:
                publisher.queue.put_nowait(None)
            except queue.Full:
                pass
        for publisher in self._publishers:
            publisher.thread.join(timeout / len(self._publishers))


class _Publisher:
    """One publisher thread with its own connection, channel (confirm mode) and queue."""

    def __init__(
        self,
        sink: AmqpSink,
        connection_name: str,
        events: Callable[[], list[str]],
        on_outcome: Callable[[str, str], None],
        max_queue: int,
    ) -> None:
        self.exchange = sink.exchange
        self.prefix = sink.prefix
        self.retry_seconds = sink.retry_seconds
        self.url = sink.url
        self._events = events
        self._on_outcome = on_outcome
        self._params = pika.URLParameters(sink.url)
        self._params.connection_attempts = 1
        self._params.socket_timeout = 3.0
        self._params.blocked_connection_timeout = 10.0
        self._params.client_properties = {"connection_name": connection_name}
        self.queue: queue.Queue[tuple[str, bytes, float] | None] = queue.Queue(maxsize=max_queue)
        self.stop = threading.Event()
        self.conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self.declared: set[str] = set()
        self._next_connect = 0.0
        self._backoff = _BACKOFF_FIRST_S
        self.connects = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name=connection_name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        item: tuple[str, bytes, float] | None = None
        while not self.stop.is_set():
            if self.conn is None and time.monotonic() >= self._next_connect:
                self._connect()
            if item is None:
                try:
                    item = self.queue.get(timeout=0.5)
                except queue.Empty:
                    self._idle()
                    continue
                if item is None:
                    break
            event, body, queued_at = item
            if self.conn is None:
                if time.monotonic() - queued_at > self.retry_seconds:
                    self._give_up(event, "no connection to the broker")
                    item = None
                else:
                    self.stop.wait(max(0.01, min(0.2, self._next_connect - time.monotonic())))
                continue
            if self._publish(event, body):
                item = None
            elif time.monotonic() - queued_at > self.retry_seconds:
                self._give_up(event, self.last_error or "publish failed")
                item = None
        self._disconnect()

    def _give_up(self, event: str, why: str) -> None:
        self._on_outcome(event, "failed")
        logger.error("event %s not published to RabbitMQ within %.1f s: %s", event, self.retry_seconds, why)

    def _idle(self) -> None:
        """Serve heartbeats and notice a lost connection while nothing is published."""
        if self.conn is None:
            return
        try:
            self.conn.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(exc)

    def _connect(self) -> None:
        conn = None
        try:
            conn = pika.BlockingConnection(self._params)
            channel = conn.channel()
            channel.confirm_delivery()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True, auto_delete=False)
            self._channel = channel
            self.declared = set()
            for event in self._events():
                self._declare(event)
            # connected (the control API's view) only once every queue is declared
            self.conn = conn
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.conn = self.conn or conn  # closed by _lost
            self._lost(exc)
            return
        self.connects += 1
        self._backoff = _BACKOFF_FIRST_S
        logger.info(
            "events: connected to RabbitMQ %s, exchange %r, queues %s",
            _masked(self.url),
            self.exchange,
            sorted(queue_name(self.prefix, e) for e in self.declared),
        )

    def _declare(self, event: str) -> None:
        """Evolution's queue for ``event``: durable quorum queue bound with routing key = the event."""
        name = queue_name(self.prefix, event)
        try:
            self._channel.queue_declare(
                name, durable=True, exclusive=False, auto_delete=False, arguments=dict(QUEUE_ARGUMENTS)
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:
                raise pika.exceptions.AMQPChannelError(
                    f"queue {name!r} exists with other arguments than {QUEUE_ARGUMENTS} (PRECONDITION_FAILED: "
                    f"{exc.reply_text}); delete it or declare it as Evolution does"
                ) from exc
            raise
        self._channel.queue_bind(name, self.exchange, routing_key=event)
        # Evolution's start-up declaration binds with the settings' spelling too (MESSAGES_UPSERT)
        self._channel.queue_bind(name, self.exchange, routing_key=event.replace(".", "_").upper())
        self.declared.add(event)

    def _publish(self, event: str, body: bytes) -> bool:
        try:
            if event not in self.declared:
                self._declare(event)
            self._channel.basic_publish(
                self.exchange,
                routing_key=event,
                body=body,
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            self.last_error = f"{event}: unroutable (no queue bound to routing key {event!r})"
            logger.error("event %s returned by RabbitMQ: no queue is bound to it", event)
            self._on_outcome(event, "failed")
            return True  # retrying cannot route it
        except pika.exceptions.NackError as exc:
            self.last_error = f"{event}: nacked by the broker ({exc})"
            self._on_outcome(event, "retried")
            return False
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._on_outcome(event, "retried")
            self._lost(exc)
            return False
        self._on_outcome(event, "sent")
        return True

    def _lost(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "events: RabbitMQ connection lost or refused (%s); reconnecting in %.1f s", self.last_error, self._backoff
        )
        self._disconnect()
        self._next_connect = time.monotonic() + self._backoff
        self._backoff = min(_BACKOFF_MAX_S, self._backoff * 2)

    def _disconnect(self) -> None:
        conn, self.conn, self._channel = self.conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except (pika.exceptions.AMQPError, OSError):
                pass
