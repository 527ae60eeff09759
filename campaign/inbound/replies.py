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

import contextlib
import json
import logging
from dataclasses import dataclass, field

from campaign.db import db
from campaign.events import log_event, log_line
from campaign.inbound.envelopes import InboundMessage, phone_candidates
from campaign.optout import is_opt_out, phrase_set
from campaign.outcomes import finish_message, stop_open_messages
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


# Parts first, then the messages: the send path's lock order.
_STOP_PARTS_SQL = """
UPDATE message_parts SET status = 'skipped', error_message = %(why)s
 WHERE message_id = ANY(%(ids)s) AND status IN ('pending', 'failed') RETURNING id"""


def stop_lead(
    lead_id: int, reason: str, settings: Settings, *, parts_stopped: list[int] | None = None
) -> MessageResult:
    """Stop every open campaign message of the lead (R-IN-3); the caller holds the transaction.

    ``parts_stopped``: the lead's open messages, when the caller has already read them and
    skipped their unsent parts in this transaction (:func:`apply_message` does it in the
    statement of its gate row: two round trips less).
    """
    out = MessageResult("stopped", lead_id=lead_id)
    ids = parts_stopped
    if ids is None:
        ids = [
            mid
            for (mid,) in _all(
                "SELECT id FROM campaign_messages WHERE lead_id = %s AND status = ANY(%s)", (lead_id, list(_OPEN))
            )
        ]
        if ids:
            _all(_STOP_PARTS_SQL, {"why": f"stopped: {reason}", "ids": ids})
    if not ids:
        return out
    # every open message stopped and the not-started ones skipped in one statement (messages
    # locked before the runs: the send path's order)
    for message_id, status, n_sent, n_flight in sorted(stop_open_messages(ids, reason, NOT_STARTED, _OPEN, settings)):
        if status == "skipped":
            out.skipped.append(message_id)
        elif not n_sent and not n_flight:  # `sending`, nothing of it out yet
            if finish_message(message_id, "skipped", settings, from_statuses=("sending",), skip_reason=reason):
                out.skipped.append(message_id)
        elif n_flight:
            out.in_flight.append(message_id)  # its part in flight finishes; the send step ends it
        elif finish_message(message_id, "sent", settings, from_statuses=("sending",)):
            out.ended.append(message_id)
    return out


# The inbox, the lead (by phone, in the inbox's workspace) and the lead x inbox conversation, in
# one round trip. The conversation exists before the reply's transaction (the webhook runs this
# statement on its own): the send path reads it without a lock, so a first reply and a first send
# never wait on each other's insert.
_LOOKUP_SQL = """
WITH inbox AS (
    SELECT i.id, i.workspace_id, w.opt_out_phrases FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
     WHERE i.instance_name = %(instance)s
), lead AS (
    SELECT l.id, l.opted_out FROM leads l, inbox
     WHERE l.workspace_id = inbox.workspace_id AND l.phone = ANY(%(phones)s)
     ORDER BY l.phone = %(phone)s DESC, l.id LIMIT 1
), conv AS (
    INSERT INTO conversations (workspace_id, lead_id, inbox_id)
    SELECT inbox.workspace_id, lead.id, inbox.id FROM inbox, lead
    ON CONFLICT (lead_id, inbox_id) DO NOTHING RETURNING id
)
SELECT inbox.id, inbox.workspace_id, inbox.opt_out_phrases, lead.id, lead.opted_out, (SELECT count(*) FROM conv)
  FROM inbox LEFT JOIN lead ON true"""

# The gate row first (a duplicate, a redelivery or the same event on the other path finds it and
# does nothing; two copies racing wait on the unique index); then, only when the gate is new, the
# lead's open messages and their unsent parts skipped (parts first: the send path's lock order;
# stop_lead then stops the messages in a statement of its own, on a fresh snapshot).
_GATE_SQL = """
WITH gate AS (
    INSERT INTO inbound_events (inbox_id, provider_message_id, outcome) VALUES (%(inbox)s, %(key)s, 'received')
    ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id
), open AS (
    SELECT id FROM campaign_messages
     WHERE lead_id = %(lead)s AND status = ANY(%(open)s) AND EXISTS (SELECT 1 FROM gate)
), parts AS (
    UPDATE message_parts SET status = 'skipped', error_message = %(why)s
     WHERE message_id IN (SELECT id FROM open) AND status IN ('pending', 'failed') RETURNING id
)
SELECT gate.id, ARRAY(SELECT id FROM open ORDER BY id), (SELECT count(*) FROM parts) FROM gate"""

# Everything else the reply does, in one statement: the campaign whose message the lead answers
# (the latest that wrote to it, or is writing), the lead (last reply, opt-out, the campaign's
# reply column: only from that campaign's source or target column), the inbound conversation
# row, the gate's outcome, and the operator's event line when something stopped.
_RECORD_SQL = """
WITH camp AS (
    SELECT c.reply_column_id, c.source_column_id, c.target_column_id
      FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
     WHERE m.lead_id = %(lead)s AND (m.status IN ('sent', 'sending', 'in_doubt') OR m.id = ANY(%(skipped)s))
     ORDER BY (m.status IN ('sent', 'sending')) DESC, m.id DESC LIMIT 1
), lead AS (
    UPDATE leads SET last_reply_at = greatest(last_reply_at, now()), last_activity_at = now(),
        opted_out = opted_out OR %(opt)s,
        opted_out_at = CASE WHEN %(opt)s AND NOT opted_out THEN now() ELSE opted_out_at END,
        opted_out_reason = CASE WHEN %(opt)s AND NOT opted_out THEN left(%(text)s, 500) ELSE opted_out_reason END,
        column_id = CASE WHEN (SELECT reply_column_id FROM camp) IS NOT NULL
                              AND column_id IN ((SELECT source_column_id FROM camp),
                                                (SELECT target_column_id FROM camp))
                         THEN (SELECT reply_column_id FROM camp) ELSE column_id END
    WHERE id = %(lead)s RETURNING column_id
), moved AS (
    SELECT (SELECT reply_column_id FROM camp) AS col
     WHERE (SELECT column_id FROM lead) = (SELECT reply_column_id FROM camp)
), conv AS (
    SELECT id FROM conversations WHERE lead_id = %(lead)s AND inbox_id = %(inbox)s
), cm AS (
    INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id, text, at, action)
    SELECT conv.id, %(inbox)s, 'in', %(key)s, %(text)s, coalesce(%(at)s, now()), %(action)s FROM conv
    ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id
), gate AS (
    UPDATE inbound_events SET outcome = %(outcome)s, lead_id = %(lead)s WHERE id = %(gate)s RETURNING id
), ev AS (
    INSERT INTO campaign_events (lead_id, step, level, text, details)
    SELECT %(lead)s, 'inbound', %(ev_level)s, %(ev_text)s,
           %(ev_details)s::jsonb || coalesce((SELECT jsonb_build_object('moved_to', col) FROM moved), '{}'::jsonb)
     WHERE %(ev_text)s::text IS NOT NULL
    RETURNING id
)
SELECT (SELECT col FROM moved), (SELECT count(*) FROM cm), (SELECT count(*) FROM gate), (SELECT count(*) FROM ev)"""


def apply_message(msg: InboundMessage, settings: Settings) -> MessageResult:
    """Apply one inbound message in one transaction; safe to call any number of times."""
    candidates = phone_candidates(msg.phone_digits)
    found = _one(_LOOKUP_SQL, {"instance": msg.instance, "phones": candidates, "phone": candidates[0]})
    if found is None:
        log.warning("inbound %s: instance %r is no inbox of this engine; ignored", msg.key_id, msg.instance)
        return MessageResult("unknown_instance")
    inbox_id, workspace_id, phrases, lead_id, already_out, _ = found
    # its own transaction when called outside one (the webhook); inside the consumer's batch a savepoint
    # would only cost two round trips: a database error rolls the whole batch back anyway
    with db.atomic() if not db.in_transaction() else contextlib.nullcontext():
        opt_out = not already_out and msg.is_text and is_opt_out(msg.text, _phrases(phrases))
        reason = "opted_out" if opt_out or already_out else "replied"
        gate = _one(
            _GATE_SQL,
            {"inbox": inbox_id, "key": msg.key_id, "lead": lead_id, "open": list(_OPEN), "why": f"stopped: {reason}"},
        )
        if gate is None:
            return MessageResult("duplicate", inbox_id=inbox_id)
        gate_id, open_ids, _ = gate
        if lead_id is None:
            _one("UPDATE inbound_events SET outcome = 'unknown_sender' WHERE id = %s RETURNING id", (gate_id,))
            log_event(
                "inbound",
                "message from a number that is no lead of the workspace: recorded, nothing else done",
                details={"inbox_id": inbox_id, "key_id": msg.key_id, "from": _mask(msg.phone_digits)},
            )
            return MessageResult("unknown_sender", inbox_id=inbox_id)
        result = stop_lead(lead_id, reason, settings, parts_stopped=list(open_ids))
        result.result, result.inbox_id = ("opt_out" if opt_out else "reply"), inbox_id
        event = opt_out or result.skipped or result.ended or result.in_flight
        ev_text = ev_level = None
        if event:
            ev_text = (
                f"lead {'opted out' if opt_out else 'replied'}: {len(result.skipped)} message(s) skipped, "
                f"{len(result.ended)} ended after the parts already sent, {len(result.in_flight)} stop after "
                "the part in flight"
            )
            ev_level = "warning" if opt_out else "info"
        row = _one(
            _RECORD_SQL,
            {
                "opt": opt_out,
                "text": msg.text,
                "lead": lead_id,
                "skipped": result.skipped,
                "inbox": inbox_id,
                "key": msg.key_id,
                "at": msg.at,
                "action": _action(result),
                "outcome": result.result,
                "gate": gate_id,
                "ev_text": ev_text,
                "ev_level": ev_level,
                "ev_details": json.dumps({"inbox_id": inbox_id, "key_id": msg.key_id, **result.as_json()}),
            },
        )
        if row is not None and row[0] is not None:
            result.moved_to = row[0]
        if ev_text is not None and ev_level is not None:
            log_line("inbound", ev_text, lead_id=lead_id, level=ev_level)
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
