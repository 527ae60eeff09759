"""Step 3: send the next part through Evolution API, finalize after the last (queue ``campaign.send``)."""

from __future__ import annotations

import time

import dramatiq

import pipeline
from actors.common import as_dramatiq_retry, evolution, step_options
from actors.middleware import current_rate_limits
from campaign import steps
from campaign.enqueue import enqueue
from campaign.settings import get_settings

_settings = get_settings()

#: a part whose gap is zero is sent in the same delivery as the one before it when that one
#: went out within this long of the delivery's start (else it is enqueued, as a longer gap is)
CONTINUE_WITHIN_SECONDS = 1.0


@dramatiq.actor(
    actor_name=steps.SEND_PART.actor,
    rate_limit="inbox",
    **step_options(_settings, steps.SEND_PART.queue, time_limit_s=int(_settings.send_lease_seconds) - 10),
)
@as_dramatiq_retry
def send_part(message_id: int, inbox_id: int) -> None:
    """Send the first unsent part of ``message_id`` (paced per ``inbox_id``); chain the next part."""
    limiter = current_rate_limits(dramatiq.get_broker())
    # the step takes the inbox's slot in the statement claiming the part and gives it back on
    # every path; when the slot is not free, the limiter waits or defers this delivery
    pace = limiter.slot_refused if limiter else None
    messenger = evolution()
    started = time.monotonic()
    while True:
        outcome = pipeline.send_step(message_id, _settings, messenger, pace=pace)
        # A zero part gap: the next part goes now, in this delivery (T-PERF-1: no hop through
        # RabbitMQ) — only right after a quick send, so the time limit still covers a whole step.
        if not outcome.sent or outcome.next_delay != 0 or time.monotonic() - started > CONTINUE_WITHIN_SECONDS:
            break
    if outcome.next_delay is not None:
        # a zero gap goes straight onto the queue (a delay would hop through the delay queue)
        enqueue(steps.SEND_PART, steps.SEND_PART.args(message_id, inbox_id), delay_s=outcome.next_delay)
