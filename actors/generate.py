"""Step 1: write the personal message with the LLM (queue ``campaign.generate``)."""

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
    **step_options(_settings, steps.GENERATE.queue, time_limit_s=150),
)
@as_dramatiq_retry
def generate(message_id: int) -> None:
    """Generate the text of campaign message ``message_id``, then enqueue its split."""
    # paced: its LLM request counts against the per-minute budget, in the claim statement (R-RATE-1)
    if pipeline.generate_step(message_id, _settings, openrouter(), paced=True):
        enqueue(steps.SPLIT, steps.SPLIT.args(message_id))
