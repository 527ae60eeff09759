"""Publish a pipeline step by NAME through the current Dramatiq broker (as polar does).

Nothing outside ``actors/`` imports an actor to enqueue it: the chain, the scheduler, the
recovery sweep and the operator tools name the step (``campaign.steps``) and this module builds
the message. The broker is the one ``actors`` set up (publisher confirms on, queues declared
on first use), so whoever calls this must have imported ``actors`` (the entry points do).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import dramatiq

from campaign.errors import BrokerNotSetUp
from campaign.steps import Job, Step

log = logging.getLogger(__name__)


def engine_broker() -> dramatiq.Broker:
    """The broker ``actors`` set up; refuses dramatiq's implicit default (a RabbitMQ on localhost,
    vhost "/", no publisher confirms), which would lose every message silently."""
    broker = dramatiq.get_broker()
    if not getattr(broker, "campaign_engine", False):
        raise BrokerNotSetUp(
            "the engine's broker is not set up in this process: import actors first (the entry points do)"
        )
    return broker


def enqueue(step: Step | Job, args: tuple, *, delay_s: float | None = None) -> dramatiq.Message:
    """Publish one message for ``step`` (or a job) with ``args``; ``delay_s`` through its delay queue."""
    broker = engine_broker()
    message: dramatiq.Message = dramatiq.Message(
        queue_name=step.queue, actor_name=step.actor, args=tuple(args), kwargs={}, options={}
    )
    delay = None if delay_s is None or delay_s <= 0 else max(1, int(delay_s * 1000))
    return broker.enqueue(message, delay=delay)


def enqueue_many(step: Step | Job, args_list: Iterable[tuple]) -> int:
    """Publish one message per argument tuple (each confirmed by RabbitMQ); return how many."""
    n = 0
    for args in args_list:
        enqueue(step, args)
        n += 1
    return n


def enqueue_after_commit(job: Step | Job, args_list: list[tuple]) -> int:
    """Publish right after a commit, best effort: work whose row is already committed with a
    hand-off deadline (``wake_at``) is published again by the recovery sweep if this fails or if
    this process has no engine broker (the webhook receiver); returns how many were published."""
    try:
        return enqueue_many(job, args_list)
    except BrokerNotSetUp:
        log.debug("%s: no engine broker in this process; the recovery sweep publishes %s", job.name, args_list)
    except Exception as exc:  # the broker away: the rows wait for the sweep, nothing is lost
        log.warning("%s: publish failed (%s); the recovery sweep publishes %s", job.name, exc, args_list)
    return 0
