"""Step 3: send the next part through Evolution API, finalize after the last (queue ``campaign.send``)."""
from __future__ import annotations

import dramatiq

import pipeline
from actors.common import as_dramatiq_retry, evolution, step_options
from actors.middleware import current_rate_limits
from settings import get_settings

_settings = get_settings()


@dramatiq.actor(rate_limit="inbox", **step_options(_settings, pipeline.QUEUE_SEND,
                                                  time_limit_s=int(_settings.send_lease_seconds) - 10))
@as_dramatiq_retry
def send_part(message_id: int, inbox_id: int) -> None:
    """Send the first unsent part of ``message_id`` (paced per ``inbox_id``); chain the next part."""
    limiter = current_rate_limits(dramatiq.get_broker())
    # send_step releases the inbox slot itself, on every path (the middleware then has none left)
    outcome = pipeline.send_step(message_id, _settings, evolution(),
                                 on_http=limiter.mark_sent if limiter else None,
                                 lease=limiter.take_grant() if limiter else None)
    if outcome.next_delay is not None:
        delay_ms = int(outcome.next_delay * 1000)
        if delay_ms > 0:
            send_part.send_with_options(args=(message_id, inbox_id), delay=delay_ms)
        else:
            # a zero gap: straight onto the queue; delay=0 would hop through the delay queue (two publishes)
            send_part.send(message_id, inbox_id)
