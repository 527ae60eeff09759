"""Steps 1 and 2: write the personal message with the LLM, then split it (queue ``campaign.generate``),
and send its first part.

The split runs in the same delivery (pipeline.generate_then_split), and so does the first send
(actors.send.send_now) when the inbox can send now: two hops through RabbitMQ fewer per message
(T-PERF-1). The split actor (queue ``campaign.split``) carries the splits that start on their own:
a hand-off after a wait or a resume, the recovery sweep, a dead letter requeued; the send actor
every send that waits.
"""

from __future__ import annotations

import time

import dramatiq

import pipeline
from actors.common import as_dramatiq_retry, openrouter, step_options
from actors.send import TIME_LIMIT_SECONDS as SEND_TIME_LIMIT_SECONDS
from actors.send import send_now
from campaign import steps
from campaign.enqueue import enqueue
from campaign.settings import get_settings

_settings = get_settings()

#: two LLM calls, each bounded by LLM_TIMEOUT_SECONDS (+ connect, write, pool); the first send
#: starts in the delivery only while a whole send step (the send actor's time limit) still fits
LLM_SECONDS = max(300, int(2 * (_settings.llm_timeout_seconds + 20) + 30))


@dramatiq.actor(
    actor_name=steps.GENERATE.actor,
    **step_options(_settings, steps.GENERATE.queue, time_limit_s=LLM_SECONDS + SEND_TIME_LIMIT_SECONDS),
)
@as_dramatiq_retry
def generate(message_id: int) -> None:
    """Generate and split the text of campaign message ``message_id``, then send its first part
    (or enqueue it)."""
    started = time.monotonic()
    # paced: its LLM requests count against the per-minute budget (R-RATE-1); the record of the
    # text and parts claims the first send too while a whole send step still fits the time limit
    out = pipeline.generate_then_split(
        message_id, _settings, openrouter(), paced=True, claim_first_until=started + LLM_SECONDS
    )
    if isinstance(out, pipeline.FirstSend):
        send_now(message_id, out.inbox_id, out)
    elif not out:
        return
    elif time.monotonic() - started <= LLM_SECONDS:
        send_now(message_id, out)
    else:
        enqueue(steps.SEND_PART, steps.SEND_PART.args(message_id, out))
