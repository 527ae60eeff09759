"""Publish a pipeline step by NAME through the current Dramatiq broker (as polar does).

Nothing outside ``actors/`` imports an actor to enqueue it: the chain, the scheduler, the
recovery sweep and the operator tools name the step (``campaign.steps``) and this module builds
the message. The broker is the one ``actors`` set up (publisher confirms on, queues declared
on first use), so whoever calls this must have imported ``actors`` (the entry points do).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed, wait

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


#: confirmed publishes in flight at once for ``enqueue_many(..., parallel=True)`` (the dispatcher)
PUBLISH_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _publishers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="publish")
        return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # the parent's threads do not exist in the child


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def enqueue_many(step: Step | Job, args_list: Iterable[tuple], *, parallel: bool = False) -> int:
    """Publish one message per argument tuple (each confirmed by RabbitMQ); return how many.

    ``parallel``: PUBLISH_THREADS publishes in flight at once, each thread on its own channel (as
    Dramatiq's worker threads publish). A publisher confirm is a round trip, so one after the
    other the single active scheduler's dispatch was bound by RabbitMQ's latency — 2,000 due
    messages took ~1 s on an idle machine and 3-5 s beside busy workers (~0.6 s with 4 in
    flight, idle). The first failure stops the batch, as it did one after the other: publishes
    not started are not made, the ones in flight are waited for, then it is raised (the caller
    knows part of the batch may be out)."""
    items = list(args_list)
    if not parallel or len(items) < 2:
        for args in items:
            enqueue(step, args)
        return len(items)
    futures = [_publishers().submit(enqueue, step, args) for args in items]
    error: BaseException | None = None
    for future in as_completed(futures):
        error = future.exception()
        if error is not None:
            for other in futures:
                other.cancel()  # those not started yet; the ones in flight end on their own
            wait(futures)
            raise error
    return len(items)


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
