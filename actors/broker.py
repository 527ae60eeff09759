"""Broker factory: RabbitMQ with publisher confirms in production, StubBroker for unit tests/demo.

The middleware list is explicit so an operator can read, in one place, everything that runs
around each actor call (and in which order).
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.middleware.prometheus import Prometheus

from actors.middleware import engine_middleware
from campaign.settings import Settings, redact_url

log = logging.getLogger(__name__)

__all__ = ["build_broker", "setup_broker", "middleware_list", "WorkerPrometheus"]


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
    return RabbitmqBroker(url=settings.rabbitmq_url, confirm_delivery=True, middleware=middleware)


def setup_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker and make it dramatiq's global one (actors declared after this use it)."""
    broker = build_broker(settings)
    broker.campaign_engine = True  # type: ignore[attr-defined]  # campaign.enqueue publishes only through this one
    dramatiq.set_broker(broker)
    return broker
