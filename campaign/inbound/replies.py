"""A contact wrote to an inbox: record it, stop the lead's sequence, honour an opt-out (R-IN-2..4).

Everything a reply does happens in ONE transaction with recording it (DESIGN #7), so a reply and
the next send can never both win:

* the gate row ``inbound_events (inbox, provider id)`` is inserted first: a duplicate, a
  redelivery, or the same event arriving over the webhook and RabbitMQ finds it and changes
  nothing (E-30); two copies racing wait on the unique index, and the loser does nothing;
* the lead is found by phone in the inbox's workspace (LID chats by ``remoteJidAlt``, E-29); an
  unknown sender is recorded and nothing else happens (E-32);
* the reply is written to ``conversation_messages`` and the lead's ``last_reply_at`` is set;
* every not-started message of the lead, in every campaign of the workspace, is skipped
  (``replied`` / ``opted_out``); a message mid-parts sends no further part: its unsent parts are
  ``skipped`` and it ends ``sent`` (E-27); a part in flight finishes (its send was committed
  before the reply: R-PIPE-3), and nothing after it goes out (``stop_reason``, E-31);
* the lead moves to the campaign's ``reply_column``, only from that campaign's source or target
  column (a lead a person moved elsewhere stays there);
* an opt-out (R-IN-4) sets ``opted_out`` with when and why; nothing but an operator undoes it.

Lock order is the send path's (parts, then the message, then the run), so a reply racing a send
never deadlocks with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from campaign.db import db
from campaign.events import log_event
from campaign.inbound.envelopes import InboundMessage, phone_candidates
from campaign.optout import is_opt_out, phrase_set
from campaign.outcomes import finish_message
from campaign.settings import Settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = ["NOT_STARTED", "MessageResult", "apply_message", "stop_lead"]

#: message statuses a reply skips outright (nothing of them went out)
NOT_STARTED = ("pending", "queued", "generating", "splitting")
_OPEN = (*NOT_STARTED, "sending")


@dataclass
class MessageResult:
    """What one inbound message did."""

    result: str  # reply | opt_out | duplicate | unknown_sender | unknown_instance
    lead_id: int | None = None
    inbox_id: int | None = None
    skipped: list[int] = field(default_factory=list)  # messages skipped outright
    ended: list[int] = field(default_factory=list)  # messages mid-parts ended `sent`
    in_flight: list[int] = field(default_factory=list)  # messages with a part in flight: stop after it
    moved_to: int | None = None  # the reply column the lead moved to

    def as_json(self) -> dict[str, object]:
        """The webhook's answer (no empty fields)."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, [])}


def _mask(digits: str) -> str:
    return f"+{digits[:4]}…{digits[-2:]}" if len(digits) > 6 else "+…"


def stop_lead(lead_id: int, reason: str, settings: Settings) -> MessageResult:
    """Stop every open campaign message of the lead (R-IN-3); the caller holds the transaction."""
    out = MessageResult("stopped", lead_id=lead_id)
    ids = [
        mid
        for (mid,) in _all(
            "SELECT id FROM campaign_messages WHERE lead_id = %s AND status = ANY(%s)", (lead_id, list(_OPEN))
        )
    ]
    if not ids:
        return out
    # parts first, then the messages: the send path's lock order
    _all(
        """UPDATE message_parts SET status = 'skipped', error_message = %s
            WHERE message_id = ANY(%s) AND status IN ('pending', 'failed') RETURNING id""",
        (f"stopped: {reason}", ids),
    )
    rows = _all(
        """UPDATE campaign_messages m SET stop_reason = coalesce(m.stop_reason, %s)
            WHERE m.id = ANY(%s) AND m.status = ANY(%s)
        RETURNING m.id, m.status,
            (SELECT count(*) FROM message_parts p WHERE p.message_id = m.id AND p.status = 'sent'),
            (SELECT count(*) FROM message_parts p WHERE p.message_id = m.id AND p.status IN ('sending', 'in_doubt'))""",
        (reason, ids, list(_OPEN)),
    )
    for message_id, status, n_sent, n_flight in sorted(rows):
        if status in NOT_STARTED or (status == "sending" and not n_sent and not n_flight):
            if finish_message(message_id, "skipped", settings, from_statuses=(status,), skip_reason=reason):
                out.skipped.append(message_id)
        elif n_flight:
            out.in_flight.append(message_id)  # its part in flight finishes; the send step ends it
        elif finish_message(message_id, "sent", settings, from_statuses=("sending",)):
            out.ended.append(message_id)
    return out


_INBOX_SQL = """
SELECT i.id, i.workspace_id, w.opt_out_phrases FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
 WHERE i.instance_name = %s"""

# The campaign whose message the lead answers: the latest that wrote to it (or is writing).
_CAMPAIGN_SQL = """
SELECT c.reply_column_id, c.source_column_id, c.target_column_id
  FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
 WHERE m.lead_id = %s AND (m.status IN ('sent', 'sending', 'in_doubt') OR m.id = ANY(%s))
 ORDER BY (m.status IN ('sent', 'sending')) DESC, m.id DESC LIMIT 1"""


def apply_message(msg: InboundMessage, settings: Settings) -> MessageResult:
    """Apply one inbound message in one transaction; safe to call any number of times."""
    inbox = _one(_INBOX_SQL, (msg.instance,))
    if inbox is None:
        log.warning("inbound %s: instance %r is no inbox of this engine; ignored", msg.key_id, msg.instance)
        return MessageResult("unknown_instance")
    inbox_id, workspace_id, phrases = inbox
    candidates = phone_candidates(msg.phone_digits)
    lead = _one(
        """SELECT id, opted_out FROM leads WHERE workspace_id = %s AND phone = ANY(%s)
            ORDER BY phone = %s DESC, id LIMIT 1""",
        (workspace_id, candidates, candidates[0]),
    )
    if lead is not None:
        # The lead x inbox conversation exists before the transaction below: the send path reads it
        # without a lock, so a first reply and a first send never wait on each other's insert.
        _one(
            """INSERT INTO conversations (workspace_id, lead_id, inbox_id) VALUES (%s, %s, %s)
               ON CONFLICT (lead_id, inbox_id) DO NOTHING RETURNING id""",
            (workspace_id, lead[0], inbox_id),
        )
    with db.atomic():
        gate = _one(
            """INSERT INTO inbound_events (inbox_id, provider_message_id, outcome) VALUES (%s, %s, 'received')
               ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id""",
            (inbox_id, msg.key_id),
        )
        if gate is None:
            return MessageResult("duplicate", inbox_id=inbox_id)
        if lead is None:
            _one("UPDATE inbound_events SET outcome = 'unknown_sender' WHERE id = %s RETURNING id", gate)
            log_event(
                "inbound",
                "message from a number that is no lead of the workspace: recorded, nothing else done",
                details={"inbox_id": inbox_id, "key_id": msg.key_id, "from": _mask(msg.phone_digits)},
            )
            return MessageResult("unknown_sender", inbox_id=inbox_id)
        lead_id, already_out = lead
        opt_out = not already_out and msg.is_text and is_opt_out(msg.text, _phrases(phrases))
        reason = "opted_out" if opt_out or already_out else "replied"
        result = stop_lead(lead_id, reason, settings)
        result.result, result.inbox_id = ("opt_out" if opt_out else "reply"), inbox_id
        campaign = _one(_CAMPAIGN_SQL, (lead_id, result.skipped))
        row = _one(
            """
            WITH lead AS (
                UPDATE leads SET last_reply_at = greatest(last_reply_at, now()), last_activity_at = now(),
                    opted_out = opted_out OR %(opt)s,
                    opted_out_at = CASE WHEN %(opt)s AND NOT opted_out THEN now() ELSE opted_out_at END,
                    opted_out_reason = CASE WHEN %(opt)s AND NOT opted_out THEN left(%(text)s, 500)
                                            ELSE opted_out_reason END,
                    column_id = CASE WHEN %(reply_col)s::bigint IS NOT NULL AND column_id IN (%(src)s, %(tgt)s)
                                     THEN %(reply_col)s ELSE column_id END
                WHERE id = %(lead)s RETURNING column_id
            ), conv AS (
                SELECT id FROM conversations WHERE lead_id = %(lead)s AND inbox_id = %(inbox)s
            ), cm AS (
                INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id,
                                                   text, at, action)
                SELECT conv.id, %(inbox)s, 'in', %(key)s, %(text)s, coalesce(%(at)s, now()), %(action)s FROM conv
                ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id
            ), gate AS (
                UPDATE inbound_events SET outcome = %(outcome)s, lead_id = %(lead)s WHERE id = %(gate)s RETURNING id
            )
            SELECT (SELECT column_id FROM lead), (SELECT count(*) FROM cm), (SELECT count(*) FROM gate)""",
            {
                "opt": opt_out,
                "text": msg.text,
                "reply_col": campaign[0] if campaign else None,
                "src": campaign[1] if campaign else None,
                "tgt": campaign[2] if campaign else None,
                "lead": lead_id,
                "ws": workspace_id,
                "inbox": inbox_id,
                "key": msg.key_id,
                "at": msg.at,
                "action": _action(result),
                "outcome": result.result,
                "gate": gate[0],
            },
        )
        if campaign and campaign[0] is not None and row is not None and row[0] == campaign[0]:
            result.moved_to = campaign[0]
        if opt_out or result.skipped or result.ended or result.in_flight:
            log_event(
                "inbound",
                f"lead {'opted out' if opt_out else 'replied'}: {len(result.skipped)} message(s) skipped, "
                f"{len(result.ended)} ended after the parts already sent, {len(result.in_flight)} stop after "
                "the part in flight",
                lead_id=lead_id,
                level="warning" if opt_out else "info",
                details={"inbox_id": inbox_id, "key_id": msg.key_id, **result.as_json()},
            )
    log.info(
        "inbound %s inbox=%s lead=%s: %s (skipped %s, ended %s, in flight %s)",
        msg.key_id,
        inbox_id,
        lead_id,
        result.result,
        result.skipped,
        result.ended,
        result.in_flight,
    )
    return result


def _phrases(configured: list[str] | None) -> frozenset[str] | None:
    return None if configured is None else phrase_set(configured)


def _action(result: MessageResult) -> str:
    done = [
        f"{label} {len(ids)}"
        for label, ids in (("skipped", result.skipped), ("ended", result.ended), ("in_flight", result.in_flight))
        if ids
    ]
    return (result.result + (": " + ", ".join(done) if done else "")) if result.result else "recorded"
