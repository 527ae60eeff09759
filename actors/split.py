"""Step 2 on its own: split the text into 1..N parts (queue ``campaign.split``).

A fresh text is split in the generate delivery (actors/generate.py); this actor carries the
splits that start on their own: a hand-off after a wait or a resume, the recovery sweep, a
requeued dead letter.
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
    actor_name=steps.SPLIT.actor,
    **step_options(_settings, steps.SPLIT.queue, time_limit_s=150),
)
@as_dramatiq_retry
def split(message_id: int) -> None:
    """Split the text of campaign message ``message_id`` into parts, then enqueue its first send."""
    # paced: an LLM split counts against the per-minute budget, in the claim statement (R-RATE-1)
    inbox_id = pipeline.split_step(message_id, _settings, openrouter(), paced=True)
    if inbox_id:
        enqueue(steps.SEND_PART, steps.SEND_PART.args(message_id, inbox_id))
