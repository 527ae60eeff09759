"""Step 2: split the text into 1..N parts (queue ``campaign.split``)."""
from __future__ import annotations

import dramatiq

import pipeline
from actors.common import as_dramatiq_retry, openrouter, step_options
from settings import get_settings

_settings = get_settings()


@dramatiq.actor(rate_limit="openrouter", **step_options(_settings, pipeline.QUEUE_SPLIT, time_limit_s=150))
@as_dramatiq_retry
def split(message_id: int) -> None:
    """Split the text of campaign message ``message_id`` into parts, then enqueue its first send."""
    ctx_inbox = pipeline.split_step(message_id, _settings, openrouter())
    if ctx_inbox:
        from actors.send import send_part

        send_part.send(message_id, ctx_inbox)
