"""Steps 1 and 2: write the personal message with the LLM, then split it (queue ``campaign.generate``).

The split runs in the same delivery (pipeline.generate_then_split: one hop through RabbitMQ
fewer per message, T-PERF-1); the split actor (queue ``campaign.split``) carries the splits that
start on their own: a hand-off after a wait or a resume, the recovery sweep, a dead letter requeued.
"""

from __future__ import annotations

import dramatiq

import pipeline
from actors.common import as_dramatiq_retry, openrouter, step_options
from campaign import steps
from campaign.enqueue import enqueue
from campaign.settings import get_settings

_settings = get_settings()


@dramatiq.actor(
    actor_name=steps.GENERATE.actor,
    # two LLM calls in one delivery, each bounded by LLM_TIMEOUT_SECONDS (+ connect, write, pool)
    **step_options(
        _settings, steps.GENERATE.queue, time_limit_s=max(300, int(2 * (_settings.llm_timeout_seconds + 20) + 30))
    ),
)
@as_dramatiq_retry
def generate(message_id: int) -> None:
    """Generate and split the text of campaign message ``message_id``, then enqueue its first send."""
    # paced: its LLM requests count against the per-minute budget (R-RATE-1)
    inbox_id = pipeline.generate_then_split(message_id, _settings, openrouter(), paced=True)
    if inbox_id:
        enqueue(steps.SEND_PART, steps.SEND_PART.args(message_id, inbox_id))
