"""The opt-out confirmation (R-IN-4): a workspace's ``opt_out_reply``, sent once to a lead who opted out.

The reply handler only records the opt-out; the recovery sweep finds leads opted out in the last
day whose workspace has a confirmation text and who have not had it, and enqueues the
``opt_out_reply`` job (campaign.notify). The job claims the lead first (``opt_out_reply_at``, a
conditional UPDATE that commits before the HTTP call): a second delivery, a second sweep or a
crash after the claim never sends it twice — at most once, by construction. It is sent through
the inbox the opt-out arrived on, outside the pacing caps (it is an answer, not outreach), and
logged in the conversation.
"""

from __future__ import annotations

import logging

from campaign.errors import ProviderError
from campaign.events import log_event
from campaign.providers import Messenger
from campaign.settings import Settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = ["due_confirmations", "send_opt_out_reply"]

#: how far back the sweep looks for opt-outs still to confirm (older ones are left alone)
LOOKBACK_SECONDS = 86_400


def due_confirmations(settings: Settings, *, limit: int = 500) -> list[int]:
    """Leads opted out a little while ago (past the hand-off grace) still waiting for their confirmation."""
    rows = _all(
        """SELECT l.id FROM leads l JOIN workspaces w ON w.id = l.workspace_id
            WHERE l.opted_out AND l.opt_out_reply_at IS NULL AND w.opt_out_reply IS NOT NULL
              AND l.opted_out_at > now() - make_interval(secs => %s)
              AND l.opted_out_at < now() - make_interval(secs => %s)
            ORDER BY l.opted_out_at LIMIT %s""",
        (LOOKBACK_SECONDS, min(settings.handoff_grace_seconds, 5.0), limit),
    )
    return [lead_id for (lead_id,) in rows]


# Claim the lead (committed before the call: at most once) and find the inbox the opt-out came in on.
_CLAIM_SQL = """
WITH claimed AS (
    UPDATE leads l SET opt_out_reply_at = now()
      FROM workspaces w
     WHERE l.id = %s AND w.id = l.workspace_id AND l.opted_out AND l.opt_out_reply_at IS NULL
       AND w.opt_out_reply IS NOT NULL
    RETURNING l.id, l.phone, w.opt_out_reply)
SELECT c.id, c.phone, c.opt_out_reply, i.id, i.instance_name
  FROM claimed c
  JOIN LATERAL (SELECT e.inbox_id FROM inbound_events e WHERE e.lead_id = c.id AND e.outcome = 'opt_out'
                 ORDER BY e.id DESC LIMIT 1) e ON true
  JOIN inboxes i ON i.id = e.inbox_id"""


def send_opt_out_reply(lead_id: int, settings: Settings, evolution: Messenger) -> str:
    """Send the confirmation if it is still due; returns what happened (sent / not_due / failed)."""
    row = _one(_CLAIM_SQL, (lead_id,))
    if row is None:
        return "not_due"  # sent before, not opted out, no text, or no inbox to answer from
    _, phone, text, inbox_id, instance = row
    try:
        result = evolution.send_text(instance, phone, text)
    except ProviderError as exc:
        # never retried: a second attempt could be a second message (the claim stays)
        log_event(
            "inbound",
            f"opt-out confirmation not sent ({exc.code}); it is not retried",
            lead_id=lead_id,
            level="warning",
            details={"inbox_id": inbox_id},
        )
        return "failed"
    _one(
        """WITH conv AS (
               INSERT INTO conversations (workspace_id, lead_id, inbox_id)
               SELECT workspace_id, %(lead)s, %(inbox)s FROM inboxes WHERE id = %(inbox)s
               ON CONFLICT (lead_id, inbox_id) DO UPDATE SET updated_at = now() RETURNING id)
           INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id, text, action)
           SELECT conv.id, %(inbox)s, 'out', %(key)s, %(text)s, 'opt_out_reply' FROM conv
           ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id""",
        {"lead": lead_id, "inbox": inbox_id, "key": result.key_id, "text": text},
    )
    log.info("lead %s: opt-out confirmation sent through inbox %s", lead_id, inbox_id)
    return "sent"
