"""Broker factory: RabbitMQ with publisher confirms in production, StubBroker for unit tests/demo.

The middleware list is explicit so an operator can read, in one place, everything that runs
around each actor call (and in which order).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import pika.exceptions
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    MiddlewareError,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.middleware.prometheus import Prometheus

from actors.middleware import engine_middleware
from campaign.errors import ConfigError
from campaign.settings import Settings, amqp_urls, redact_url

log = logging.getLogger(__name__)

__all__ = [
    "WorkerPrometheus",
    "build_broker",
    "setup_broker",
    "middleware_list",
    "EngineRabbitmqBroker",
    "QueueTypeMismatch",
    "QueuePreflight",
    "DELIVERY_LIMIT",
    "XQ_DELIVERY_LIMIT",
    "PUBLISH_RETRY_SECONDS",
]

#: A quorum queue dead-letters a message (to its .XQ, at least once) once it was handed to a
#: consumer this many times without an ack: a message that kills its worker every time stops
#: looping. Set explicitly: RabbitMQ 3.x has no limit by default, 4.x defaults to 20.
DELIVERY_LIMIT = 20
#: The .XQ's own limit: the dead-letter tool browses an XQ by fetching and returning every
#: message, and an XQ has nowhere to dead-letter to, so its limit must never be reached (on 4.x
#: leaving it out would mean 20 browses and the copy is gone). Never -1: on 3.10 that drops a
#: message on its first return.
XQ_DELIVERY_LIMIT = 1_000_000
#: How long a publish keeps being retried (with backoff, on a new connection each time) before
#: it fails. Dramatiq itself makes 6 immediate attempts; a quorum queue refuses (nacks) publishes
#: for the few seconds its leader election takes after a node dies, and a node restart takes
#: longer than 6 attempts. A duplicate publish is harmless (every step is a conditional
#: transition); what the retries still cannot place, the recovery sweep re-publishes from
#: PostgreSQL (R-FAIL-8).
PUBLISH_RETRY_SECONDS = 30.0


class QueueTypeMismatch(ConfigError, BrokerConnectionError):
    """An engine queue exists with other arguments (almost always: the other queue type).

    Also a dramatiq ``ConnectionError`` so that ``dramatiq actors`` stops the worker process at
    boot (exit code 3) instead of retrying forever.
    """

    def __init__(self, message: str) -> None:
        ConfigError.__init__(self, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class EngineRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with the queue type of RABBITMQ_QUEUE_TYPE (R-SCALE-1).

    ``classic`` declares exactly what dramatiq declares. ``quorum`` declares every queue (the
    step/job queue, its .DQ and its .XQ) as a replicated quorum queue:

    - queue and .DQ: ``x-dead-letter-strategy=at-least-once`` (RabbitMQ 3.10+; needs
      ``x-overflow=reject-publish``): a dead-lettered message leaves the source queue only once
      its .XQ has confirmed it, so a node dying mid dead-letter loses nothing. No length limit is
      set, so reject-publish never rejects anything. ``x-delivery-limit`` = :data:`DELIVERY_LIMIT`.
    - .XQ: dramatiq's TTL (7 days, ``dramatiq_dead_message_ttl``) as for classic queues, the
      ``dead_letters`` row in PostgreSQL outlives it; ``x-delivery-limit`` =
      :data:`XQ_DELIVERY_LIMIT`.
    """

    def __init__(
        self, *, queue_type: str = "classic", publish_retry_seconds: float = PUBLISH_RETRY_SECONDS, **kwargs: Any
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ConfigError(f"RABBITMQ_QUEUE_TYPE={queue_type!r} must be one of classic, quorum")
        super().__init__(**kwargs)
        self.queue_type = queue_type
        self.publish_retry_seconds = publish_retry_seconds
        self.vhost = _vhost(self.parameters)

    # -- publishing -----------------------------------------------------------------------

    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        """Dramatiq's enqueue (publisher confirms), retried with backoff for up to
        :data:`PUBLISH_RETRY_SECONDS` when the broker refuses or the connection drops."""
        deadline = time.monotonic() + self.publish_retry_seconds
        pause = 0.2
        while True:
            try:
                return super().enqueue(message, delay=delay)
            except ConnectionClosed as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "publish of %s to %s refused or connection lost (%s); retrying in %.1f s",
                    message.message_id,
                    message.queue_name,
                    exc,
                    pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    # -- what each queue is declared with --------------------------------------------------

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        if self.queue_type == "quorum":
            arguments.update(
                {
                    "x-queue-type": "quorum",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-delivery-limit": DELIVERY_LIMIT,
                }
            )
        return arguments

    def xq_arguments(self) -> dict[str, Any]:
        """The arguments of every .XQ (dramatiq's TTL; quorum adds the type and its limit)."""
        arguments: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL}
        if self.queue_type == "quorum":
            arguments.update({"x-queue-type": "quorum", "x-delivery-limit": XQ_DELIVERY_LIMIT})
        return arguments

    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, self._build_queue_arguments(queue_name))

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare(dq_name(queue_name), self._build_queue_arguments(queue_name))

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self._declare(xq_name(queue_name), self.xq_arguments())

    def _declare(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return self.channel.queue_declare(queue=name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: inequivalent arguments
                raise
            del self.channel  # closed by the broker: the next caller opens a new one
            raise QueueTypeMismatch(self._mismatch_text(name, exc.reply_text)) from None

    def _mismatch_text(self, name: str, reply: str) -> str:
        other = "classic" if self.queue_type == "quorum" else "quorum"
        return (
            f"RabbitMQ queue {name!r} in vhost {self.vhost!r} exists with other arguments than "
            f"RABBITMQ_QUEUE_TYPE={self.queue_type} declares (RabbitMQ says: {reply}); it is most likely a "
            f"{other} queue. A queue's type cannot change in place: either set RABBITMQ_QUEUE_TYPE={other}, "
            f"or migrate (README 'Quorum queues'): stop workers and scheduler, let the queues drain, delete the "
            f"engine's queues (rabbitmqctl delete_queue -p {self.vhost} {name}, and the others of "
            f"`rabbitmqctl list_queues -p {self.vhost} name type`), then start with the new type"
        )

    # -- start-up check ------------------------------------------------------------------

    def ensure_queues(self) -> list[str]:
        """Declare every queue of every declared actor now (a type mismatch is a start-up error,
        not a worker retrying forever); return the queue names."""
        names = sorted(self.get_declared_queues())
        for name in names:
            self.declare_queue(name, ensure=True)
        return names


def _vhost(parameters: Any) -> str:
    first = parameters[0] if isinstance(parameters, list) else parameters
    return str(getattr(first, "virtual_host", "/"))


class QueuePreflightFailed(MiddlewareError, BrokerConnectionError):
    """Raised at worker boot: a MiddlewareError so dramatiq does not swallow it, a broker
    ConnectionError so ``dramatiq actors`` logs it and exits with code 3 (RET_CONNECT)."""

    def __str__(self) -> str:
        return str(self.message)


class QueuePreflight(Middleware):
    """Declares the engine's queues before a worker starts consuming (R-SCALE-1): a queue of the
    other type stops ``dramatiq actors`` (exit code 3) with the :class:`QueueTypeMismatch` text
    instead of every consumer retrying forever."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not isinstance(broker, EngineRabbitmqBroker):
            return
        try:
            broker.ensure_queues()
        except QueueTypeMismatch as exc:
            log.critical("%s", exc)
            raise QueuePreflightFailed(str(exc)) from exc


class WorkerPrometheus(Prometheus):
    """Dramatiq's Prometheus middleware, inert until a worker process boots.

    The scheduler and the CLI publish through the same broker but never boot a worker: Dramatiq's
    ``after_enqueue`` would touch counters that only ``after_process_boot`` creates.
    """

    booted = False

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        super().after_process_boot(broker)
        self.booted = True

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None) -> None:
        if self.booted:
            super().after_enqueue(broker, message, delay)


def middleware_list(settings: Settings) -> list[Middleware]:
    """The middleware every broker of the engine runs, in order."""

    head, tail = engine_middleware(settings)
    # R-OBS-1: actor metrics (messages, errors, retries, dead letters, durations = step latencies)
    # from Dramatiq's own middleware, multiprocess-safe: every worker process writes under env
    # dramatiq_prom_db and the worker's master serves the sum on env dramatiq_prom_port (9191).
    # Only when the deployment turns metrics on (METRICS_PORT): the exposition server binds a port.
    observe: list[Middleware] = (
        [Prometheus()] if settings.metrics_port is not None and settings.broker != "stub" else []
    )
    return [
        *head,  # StepLog (ids in every line), DbConnection (first in, last out),
        # DeadLetters (its after-hook runs after Retries')
        AgeLimit(),  # honours an actor's max_age (unused by default)
        TimeLimit(),  # kills an actor stuck past its time_limit (set per actor)
        ShutdownNotifications(),  # lets long actors notice a worker shutdown
        Callbacks(),  # on_success / on_failure hooks
        Pipelines(),  # dramatiq pipelines (unused by the chain: each step enqueues the next)
        Retries(),  # backoff policy per actor (max_retries, min/max_backoff, retry_when)
        CurrentMessage(),  # lets a step see its own Dramatiq message (id, retries)
        *tail,  # RateLimits: per-inbox / per-LLM-key pacing, right before the actor
        *observe,  # Prometheus: last, so its duration is the actor's (after RateLimits' wait)
    ]


def build_broker(settings: Settings) -> dramatiq.Broker:
    """A new broker for ``settings.broker``: RabbitMQ (confirms on) or the in-memory StubBroker."""
    middleware = middleware_list(settings)
    if settings.broker == "stub":
        log.info("broker: in-memory StubBroker (unit tests / embedded demo only)")
        return StubBroker(middleware=middleware)
    log.info("broker: RabbitMQ at %s, publisher confirms on", redact_url(settings.rabbitmq_url))
    # confirm_delivery: a publish returns only once RabbitMQ has the message (DESIGN #6);
    # Dramatiq's default is fire-and-forget.
    # Connection tuning (heartbeat, connection_attempts, ...) goes in RABBITMQ_URL's query string:
    # dramatiq refuses url= together with pika parameters.
    # Several nodes (RABBITMQ_URL "amqp://h1/v;amqp://h2/v"): each new connection tries them in
    # order, so a worker or the scheduler whose node died reconnects to a live one (R-SCALE-2).
    log.info("broker: queue type %s, %d node(s)", settings.rabbitmq_queue_type, len(amqp_urls(settings.rabbitmq_url)))
    return EngineRabbitmqBroker(
        url=amqp_urls(settings.rabbitmq_url),
        queue_type=settings.rabbitmq_queue_type,
        confirm_delivery=True,
        middleware=[*middleware, QueuePreflight()],
    )


def setup_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker and make it dramatiq's global one (actors declared after this use it)."""
    broker = build_broker(settings)
    broker.campaign_engine = True  # type: ignore[attr-defined]  # campaign.enqueue publishes only through this one
    dramatiq.set_broker(broker)
    return broker
