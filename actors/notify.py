"""Jobs outside the chain (queue ``campaign.notify``): the opt-out confirmation (R-IN-4)."""

from __future__ import annotations

import dramatiq

from actors.common import evolution
from campaign import steps
from campaign.inbound.notify import send_opt_out_reply
from campaign.settings import get_settings

_settings = get_settings()


# max_retries=0: a retry could send the confirmation twice; the claim makes it at most once anyway
@dramatiq.actor(
    actor_name=steps.OPT_OUT_REPLY.actor,
    queue_name=steps.OPT_OUT_REPLY.queue,
    max_retries=0,
    time_limit=int(_settings.send_lease_seconds) * 1000,
)
def opt_out_reply(lead_id: int) -> None:
    """Send the workspace's opt-out confirmation to ``lead_id`` if it is still due (at most once)."""
    send_opt_out_reply(lead_id, _settings, evolution())
