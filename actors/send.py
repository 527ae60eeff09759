"""Step 3: send the next part through Evolution API, finalize after the last (queue ``campaign.send``).

A message's first part usually goes out from the generate delivery itself, right after its split
(:func:`send_now`, T-PERF-1: no hop through RabbitMQ); this actor carries every send that waits —
an inbox slot in use or a gap to keep, a part with a gap before it, a retry after trouble.
"""

from __future__ import annotations

import threading
import time

import dramatiq
from dramatiq.middleware import TimeLimit

import pipeline
from actors.common import as_dramatiq_retry, evolution, step_options
from actors.middleware import current_rate_limits
from campaign import steps
from campaign.enqueue import enqueue
from campaign.errors import PipelineSignal
from campaign.settings import get_settings

_settings = get_settings()

#: a part whose gap is zero is sent in the same delivery as the one before it when that one
#: went out within this long of the delivery's start (else it is enqueued, as a longer gap is)
CONTINUE_WITHIN_SECONDS = 1.0

#: the send actor's time limit: one send step (a connectionState probe, then the send) and no more
TIME_LIMIT_SECONDS = int(_settings.send_lease_seconds) - 10


@dramatiq.actor(
    actor_name=steps.SEND_PART.actor,
    rate_limit="inbox",
    **step_options(_settings, steps.SEND_PART.queue, time_limit_s=TIME_LIMIT_SECONDS),
)
@as_dramatiq_retry
def send_part(message_id: int, inbox_id: int) -> None:
    """Send the first unsent part of ``message_id`` (paced per ``inbox_id``); chain the next part."""
    limiter = current_rate_limits(dramatiq.get_broker())
    # the step takes the inbox's slot in the statement claiming the part and gives it back on
    # every path; when the slot is not free, the limiter waits or defers this delivery
    _send_parts(message_id, inbox_id, limiter.slot_refused if limiter else None)


def _send_parts(
    message_id: int, inbox_id: int, pace: pipeline.Pace | None, first: pipeline.FirstSend | None = None
) -> None:
    """Send the first unsent part (``first``: already claimed); a zero part gap sends the next one in
    the same delivery (T-PERF-1: no hop through RabbitMQ), only right after a quick send, so the
    time limit still covers a whole step; a part with a gap is enqueued with it."""
    messenger = evolution()
    started = time.monotonic()
    pending: pipeline.PendingSent | None = None  # a part sent, its record left for the next claim
    try:
        while True:
            if first is not None:
                outcome, first = pipeline.send_claimed(first, _settings, messenger, defer_record=True), None
            else:
                prev, pending = pending, None  # recorded by this claim (or its key kept), whatever happens
                outcome = pipeline.send_step(message_id, _settings, messenger, pace=pace, prev=prev, defer_record=True)
            pending = outcome.unrecorded
            if not outcome.sent or outcome.next_delay != 0 or time.monotonic() - started > CONTINUE_WITHIN_SECONDS:
                break
    finally:
        if pending is not None:  # no next claim in this delivery: the part is recorded now
            pipeline.record_sent(pending, _settings)
    if outcome.next_delay is not None:
        # a zero gap goes straight onto the queue (a delay would hop through the delay queue)
        enqueue(steps.SEND_PART, steps.SEND_PART.args(message_id, inbox_id), delay_s=outcome.next_delay)


class _SlotInUse(Exception):
    """The inbox's send slot is not free now: the send actor waits for it."""


def _refuse(wait: float) -> None:
    raise _SlotInUse(wait)


def send_now(message_id: int, inbox_id: int, first: pipeline.FirstSend | None = None) -> None:
    """The first send of a message just split, from the generate delivery (T-PERF-1: one hop through
    RabbitMQ fewer per message). The step is the send actor's own (the slot taken in its claim, the
    same checks, zero-gap parts after it); whatever keeps it from sending now — the inbox's slot in
    use or its gap not over, a retry after trouble, a wait — hands the message to the send actor,
    which waits, retries or gives up as it always does (with MAX_ATTEMPTS=1, a first send that
    failed for a passing reason is tried once more there). A failure of the worker or the database
    mid-send leaves what a send delivery's would: the part `sending`, settled by the send step
    (recorded from the provider's key, or in doubt) when the sweep hands the message on.
    ``first``: the first part was claimed by the record of the text and parts (its slot taken)."""
    args = steps.SEND_PART.args(message_id, inbox_id)
    _bound_this_delivery(TIME_LIMIT_SECONDS)
    try:
        _send_parts(message_id, inbox_id, _refuse, first)
    except _SlotInUse:
        enqueue(steps.SEND_PART, args)
    except PipelineSignal as exc:  # RetryLater, Deferred (their delay), StepFailed (the actor decides)
        enqueue(steps.SEND_PART, args, delay_s=getattr(exc, "delay", _settings.min_backoff_seconds))


def _bound_this_delivery(seconds: float) -> None:
    """From now on, this delivery lives at most ``seconds`` — the send actor's own time limit, so a
    send made in the generate delivery is cut off, like one of the send actor's, before the
    inbox's slot lease ends (settings.send_lease_seconds: a live holder never outlives its lease,
    R-RATE-1). Re-arms Dramatiq's TimeLimit timeout for this thread (a no-op outside a worker)."""
    for middleware in dramatiq.get_broker().middleware:
        if isinstance(middleware, TimeLimit):
            middleware.manager.add_timeout(threading.get_ident(), seconds * 1000)
