"""AI reply triage (queue ``campaign.triage``): one LLM call per recorded reply (R-IN-5, E-37).

Same client, per-key rate limit, retry policy, error classes and dead letters as generation; the
step itself is ``campaign.inbound.triage.triage_step``.
"""

from __future__ import annotations

import dramatiq

from actors.common import as_dramatiq_retry, openrouter, step_options
from campaign import steps
from campaign.inbound.triage import triage_step
from campaign.settings import get_settings

_settings = get_settings()


def _options() -> dict:
    options = step_options(_settings, steps.TRIAGE_REPLY.queue, time_limit_s=150)
    # not a chain step: DeadLetters records its dead letter and settles its reply_triage row
    # (never a campaign message of the same id)
    del options["campaign_step"]
    return {**options, "triage_job": True}


@dramatiq.actor(actor_name=steps.TRIAGE_REPLY.actor, rate_limit="openrouter", **_options())
@as_dramatiq_retry
def triage_reply(triage_id: int) -> None:
    """Classify the reply of ``reply_triage`` row ``triage_id`` and move its lead accordingly."""
    triage_step(triage_id, _settings, openrouter())
