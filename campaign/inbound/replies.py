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
never deadlocks with it. The RabbitMQ consumer applies a batch's replies together
(:func:`apply_messages`): one statement per step for all of them, every part before any message,
every message before any run; the webhook's single reply is the same code with one message.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field

from campaign import steps
from campaign.db import db
from campaign.enqueue import enqueue_after_commit
from campaign.events import log_event, log_line
from campaign.inbound.envelopes import InboundMessage, phone_candidates
from campaign.optout import is_opt_out, phrase_set
from campaign.outcomes import finish_message, stop_open_messages
from campaign.settings import Settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = ["NOT_STARTED", "MessageResult", "apply_message", "apply_messages", "stop_lead"]

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
    triage_id: int | None = None  # its reply_triage row, when its campaign has triage on (R-IN-5)

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
    skipped their unsent parts in this transaction.
    """
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
    return _stop({lead_id: (reason, ids)}, settings)[lead_id]


def _stop(leads: dict[int, tuple[str, list[int]]], settings: Settings) -> dict[int, MessageResult]:
    """Stop the open messages of several leads (lead -> (reason, its open messages, parts already
    skipped)): one statement stops them all and skips the not-started ones (messages locked before
    the runs: the send path's order); a message mid-parts ends after the parts already sent, or
    after the part in flight (the send step ends it)."""
    out = {lead: MessageResult("stopped", lead_id=lead) for lead in leads}
    reasons = {mid: reason for reason, ids in leads.values() for mid in ids}
    owner = {mid: lead for lead, (_, ids) in leads.items() for mid in ids}
    if not reasons:
        return out
    for message_id, status, n_sent, n_flight in stop_open_messages(reasons, NOT_STARTED, _OPEN, settings):
        result, reason = out[owner[message_id]], reasons[message_id]
        if status == "skipped":
            result.skipped.append(message_id)
        elif not n_sent and not n_flight:  # `sending`, nothing of it out yet
            if finish_message(message_id, "skipped", settings, from_statuses=("sending",), skip_reason=reason):
                result.skipped.append(message_id)
        elif n_flight:
            result.in_flight.append(message_id)  # its part in flight finishes; the send step ends it
        elif finish_message(message_id, "sent", settings, from_statuses=("sending",)):
            result.ended.append(message_id)
    return out


# For each message: the inbox, the lead (by phone, in the inbox's workspace), and whether it is
# applied in this round: when no earlier message of the list has its lead or its gate key (a
# lead's messages, and the copies of one event, apply one after the other, in order). For the
# round's leads the lead x inbox conversation is created here, on its own before the round's
# transaction (committed at once): the send path reads it without a lock, so a first reply and a
# first send never wait on each other's insert.
_LOOKUP_SQL = """
WITH ev AS (
    SELECT * FROM unnest(%(i)s::int[], %(instance)s::text[], %(phone)s::text[], %(alt)s::text[], %(key)s::text[])
           AS t(i, instance, phone, alt, key)
), inbox AS (
    SELECT ev.i, i.id, i.workspace_id, w.opt_out_phrases
      FROM ev JOIN inboxes i ON i.instance_name = ev.instance JOIN workspaces w ON w.id = i.workspace_id
), lead AS (
    SELECT DISTINCT ON (ev.i) ev.i, l.id, l.opted_out
      FROM ev JOIN inbox ON inbox.i = ev.i
      JOIN leads l ON l.workspace_id = inbox.workspace_id AND l.phone IN (ev.phone, ev.alt)
     ORDER BY ev.i, l.phone = ev.phone DESC, l.id
), found AS (
    SELECT ev.i, inbox.id AS inbox_id, inbox.workspace_id, inbox.opt_out_phrases, lead.id AS lead_id, lead.opted_out,
           (lead.id IS NULL OR ev.i = min(ev.i) OVER (PARTITION BY lead.id))
           AND ev.i = min(ev.i) OVER (PARTITION BY inbox.id, ev.key) AS now
      FROM ev LEFT JOIN inbox ON inbox.i = ev.i LEFT JOIN lead ON lead.i = ev.i
), conv AS (
    INSERT INTO conversations (workspace_id, lead_id, inbox_id)
    SELECT DISTINCT workspace_id, lead_id, inbox_id FROM found WHERE now AND lead_id IS NOT NULL
     ORDER BY lead_id, inbox_id
    ON CONFLICT (lead_id, inbox_id) DO NOTHING RETURNING id
)
SELECT i, inbox_id, workspace_id, opt_out_phrases, lead_id, opted_out, now, (SELECT count(*) FROM conv)
  FROM found ORDER BY i"""

# The gate rows first (a duplicate, a redelivery or the same event on the other path finds its row
# and does nothing; two copies racing wait on the unique index); then, for the new ones only, the
# lead's open messages and their unsent parts skipped (parts first: the send path's lock order;
# the messages are stopped in a statement of their own, on a fresh snapshot, so their part counts
# see a send that committed meanwhile). At most one message per lead and per gate key.
_GATE_SQL = """
WITH ev AS (
    SELECT * FROM unnest(%(i)s::int[], %(inbox)s::bigint[], %(key)s::text[], %(lead)s::bigint[], %(why)s::text[])
           AS t(i, inbox, key, lead, why)
), gate AS (
    INSERT INTO inbound_events (inbox_id, provider_message_id, outcome)
    SELECT inbox, key, 'received' FROM ev ORDER BY i
    ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id, inbox_id, provider_message_id
), won AS (
    SELECT ev.i, ev.lead, ev.why, gate.id
      FROM ev JOIN gate ON gate.inbox_id = ev.inbox AND gate.provider_message_id = ev.key
), open AS (
    SELECT won.i, m.id, won.why FROM won JOIN campaign_messages m ON m.lead_id = won.lead AND m.status = ANY(%(open)s)
), parts AS (
    UPDATE message_parts p SET status = 'skipped', error_message = open.why
      FROM open WHERE p.message_id = open.id AND p.status IN ('pending', 'failed') RETURNING p.id
)
SELECT won.i, won.id, ARRAY(SELECT open.id FROM open WHERE open.i = won.i ORDER BY open.id),
       (SELECT count(*) FROM parts)
  FROM won ORDER BY won.i"""

# Everything else the replies do, in one statement: per reply, the campaign whose message the
# lead answers (the latest that wrote to it, or is writing), the lead (last reply, opt-out, the
# campaign's reply column: only from that campaign's source or target column), the inbound
# conversation row, the gate's outcome, and the operator's event line when something stopped.
_RECORD_SQL = """
WITH ev AS (
    SELECT * FROM unnest(%(lead)s::bigint[], %(inbox)s::bigint[], %(key)s::text[], %(text)s::text[],
                         %(at)s::timestamptz[], %(action)s::text[], %(outcome)s::text[], %(gate)s::bigint[],
                         %(opt)s::boolean[], %(skipped)s::text[], %(ev_text)s::text[], %(ev_level)s::text[],
                         %(ev_details)s::text[])
           AS t(lead, inbox, key, text, at, action, outcome, gate, opt, skipped, ev_text, ev_level, ev_details)
), camp AS (
    SELECT ev.lead, c.reply_column_id, c.source_column_id, c.target_column_id, c.config_id, c.run_id,
           c.triage_enabled
      FROM ev CROSS JOIN LATERAL (
        SELECT c.reply_column_id, c.source_column_id, c.target_column_id, c.id AS config_id, m.run_id,
               c.triage_enabled
          FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
          JOIN campaign_configs c ON c.id = r.config_id
         WHERE m.lead_id = ev.lead
           AND (m.status IN ('sent', 'sending', 'in_doubt') OR m.id = ANY(ev.skipped::bigint[]))
         ORDER BY (m.status IN ('sent', 'sending')) DESC, m.id DESC LIMIT 1) c
), lead AS (
    UPDATE leads l SET last_reply_at = greatest(l.last_reply_at, now()), last_activity_at = now(),
        opted_out = l.opted_out OR ev.opt,
        opted_out_at = CASE WHEN ev.opt AND NOT l.opted_out THEN now() ELSE l.opted_out_at END,
        opted_out_reason = CASE WHEN ev.opt AND NOT l.opted_out THEN left(ev.text, 500) ELSE l.opted_out_reason END,
        column_id = CASE WHEN camp.reply_column_id IS NOT NULL AND NOT camp.triage_enabled
                              AND l.column_id IN (camp.source_column_id, camp.target_column_id)
                         THEN camp.reply_column_id ELSE l.column_id END
      FROM ev LEFT JOIN camp ON camp.lead = ev.lead
     WHERE l.id = ev.lead
    RETURNING l.id, l.column_id
), moved AS (
    SELECT lead.id AS lead, camp.reply_column_id AS col FROM lead JOIN camp ON camp.lead = lead.id
     WHERE lead.column_id = camp.reply_column_id
), cm AS (
    INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id, text, at, action)
    SELECT c.id, ev.inbox, 'in', ev.key, ev.text, coalesce(ev.at, now()), ev.action
      FROM ev JOIN conversations c ON c.lead_id = ev.lead AND c.inbox_id = ev.inbox
    ON CONFLICT (inbox_id, provider_message_id) DO NOTHING RETURNING id, inbox_id, provider_message_id
), tri AS (
    -- with triage on (R-IN-5) the column move is triage's: its row is written here, in the reply's
    -- own transaction, so the sweep can always finish it (campaign.inbound.triage)
    INSERT INTO reply_triage (conversation_message_id, lead_id, config_id, run_id, wake_at)
    SELECT cm.id, ev.lead, camp.config_id, camp.run_id, now() + make_interval(secs => %(grace)s)
      FROM cm JOIN ev ON ev.inbox = cm.inbox_id AND ev.key = cm.provider_message_id
      JOIN camp ON camp.lead = ev.lead
     WHERE camp.triage_enabled
    RETURNING id, lead_id
), gate AS (
    UPDATE inbound_events g SET outcome = ev.outcome, lead_id = ev.lead FROM ev WHERE g.id = ev.gate RETURNING g.id
), note AS (
    INSERT INTO campaign_events (lead_id, step, level, text, details)
    SELECT ev.lead, 'inbound', ev.ev_level, ev.ev_text,
           ev.ev_details::jsonb || coalesce((SELECT jsonb_build_object('moved_to', col) FROM moved
                                              WHERE moved.lead = ev.lead), '{}'::jsonb)
      FROM ev WHERE ev.ev_text IS NOT NULL
    RETURNING id
)
SELECT ev.lead, moved.col, (SELECT count(*) FROM cm), (SELECT count(*) FROM gate), (SELECT count(*) FROM note),
       (SELECT tri.id FROM tri WHERE tri.lead_id = ev.lead)
  FROM ev LEFT JOIN moved ON moved.lead = ev.lead"""


@dataclass
class _Reply:
    """One inbound message on its way through :func:`apply_messages`."""

    i: int
    msg: InboundMessage
    inbox_id: int
    phrases: list[str] | None
    lead_id: int | None
    already_out: bool
    opt_out: bool = False
    reason: str = "replied"


def apply_message(msg: InboundMessage, settings: Settings) -> MessageResult:
    """Apply one inbound message in one transaction; safe to call any number of times."""
    return apply_messages([msg], settings)[0]


def apply_messages(msgs: list[InboundMessage], settings: Settings) -> list[MessageResult]:
    """Apply inbound messages, in order, as applying them one by one would; one result each.

    The messages of different leads are applied together: one lookup, then ONE transaction whose
    statements each do the step for all of them (gates and parts, messages and runs, then the
    leads and the records: the send path's lock order, all parts before any message, all messages
    before any run). A lead's second message (or a second copy of one gate key) waits for the
    next round, after the first committed. Called inside a transaction, give it one message: a
    transaction may stop messages once (a run row taken, nothing may wait after it).
    """
    results: list[MessageResult | None] = [None] * len(msgs)
    todo = list(range(len(msgs)))
    while todo:
        todo = _round(msgs, todo, results, settings)
    out = [r for r in results if r is not None]
    assert len(out) == len(msgs)
    return out


def _lookup(msgs: list[InboundMessage], todo: list[int]) -> dict[int, tuple]:
    cands = {i: phone_candidates(msgs[i].phone_digits) for i in todo}
    rows = _all(
        _LOOKUP_SQL,
        {
            "i": todo,
            "instance": [msgs[i].instance for i in todo],
            "phone": [cands[i][0] for i in todo],
            "alt": [cands[i][1] if len(cands[i]) > 1 else None for i in todo],
            "key": [msgs[i].key_id for i in todo],
        },
    )
    return {row[0]: row[1:7] for row in rows}


def _round(
    msgs: list[InboundMessage], todo: list[int], results: list[MessageResult | None], settings: Settings
) -> list[int]:
    """Apply the messages of ``todo`` that no earlier one waits for (see _LOOKUP_SQL); the rest,
    left for the next round."""
    found = _lookup(msgs, todo)
    now: list[_Reply] = []
    later: list[int] = []
    for i in todo:
        inbox_id, _, phrases, lead_id, already_out, in_round = found[i]
        msg = msgs[i]
        if inbox_id is None:
            log.warning("inbound %s: instance %r is no inbox of this engine; ignored", msg.key_id, msg.instance)
            results[i] = MessageResult("unknown_instance")
            continue
        if not in_round:
            later.append(i)
            continue
        reply = _Reply(i, msg, inbox_id, phrases, lead_id, bool(already_out))
        reply.opt_out = not reply.already_out and msg.is_text and is_opt_out(msg.text, _phrases(phrases))
        reply.reason = "opted_out" if reply.opt_out or reply.already_out else "replied"
        now.append(reply)
    if now:
        outer = db.in_transaction()
        with db.atomic() if not outer else contextlib.nullcontext():
            _apply_round(now, results, settings)
        if not outer:  # committed: hand the replies to triage now (the sweep does it otherwise)
            triage = [(r.triage_id,) for r in (results[x.i] for x in now) if r is not None and r.triage_id]
            if triage:
                enqueue_after_commit(steps.TRIAGE_REPLY, triage)
        for reply in now:
            result = results[reply.i]
            assert result is not None
            log.info(
                "inbound %s inbox=%s lead=%s: %s (skipped %s, ended %s, in flight %s)",
                reply.msg.key_id,
                reply.inbox_id,
                reply.lead_id,
                result.result,
                result.skipped,
                result.ended,
                result.in_flight,
            )
    return later


def _apply_round(now: list[_Reply], results: list[MessageResult | None], settings: Settings) -> None:
    """The round's statements, inside its transaction (see :func:`apply_messages`)."""
    gates = {
        i: (gate_id, list(open_ids))
        for i, gate_id, open_ids, _ in _all(
            _GATE_SQL,
            {
                "i": [r.i for r in now],
                "inbox": [r.inbox_id for r in now],
                "key": [r.msg.key_id for r in now],
                "lead": [r.lead_id for r in now],
                "why": [f"stopped: {r.reason}" for r in now],
                "open": list(_OPEN),
            },
        )
    }
    replies = []
    for r in now:
        if r.i not in gates:
            results[r.i] = MessageResult("duplicate", inbox_id=r.inbox_id)
        elif r.lead_id is None:
            _one("UPDATE inbound_events SET outcome = 'unknown_sender' WHERE id = %s RETURNING id", (gates[r.i][0],))
            log_event(
                "inbound",
                "message from a number that is no lead of the workspace: recorded, nothing else done",
                details={"inbox_id": r.inbox_id, "key_id": r.msg.key_id, "from": _mask(r.msg.phone_digits)},
            )
            results[r.i] = MessageResult("unknown_sender", inbox_id=r.inbox_id)
        else:
            replies.append(r)
    if not replies:
        return
    stopped = _stop({r.lead_id: (r.reason, gates[r.i][1]) for r in replies if r.lead_id is not None}, settings)
    rows: dict[str, list] = {k: [] for k in _RECORD_KEYS}
    for r in replies:
        assert r.lead_id is not None
        result = stopped[r.lead_id]
        result.result, result.inbox_id = ("opt_out" if r.opt_out else "reply"), r.inbox_id
        results[r.i] = result
        ev_text = ev_level = None
        if r.opt_out or result.skipped or result.ended or result.in_flight:
            ev_text = (
                f"lead {'opted out' if r.opt_out else 'replied'}: {len(result.skipped)} message(s) skipped, "
                f"{len(result.ended)} ended after the parts already sent, {len(result.in_flight)} stop after "
                "the part in flight"
            )
            ev_level = "warning" if r.opt_out else "info"
        for k, v in (
            ("lead", r.lead_id),
            ("inbox", r.inbox_id),
            ("key", r.msg.key_id),
            ("text", r.msg.text),
            ("at", r.msg.at),
            ("action", _action(result)),
            ("outcome", result.result),
            ("gate", gates[r.i][0]),
            ("opt", r.opt_out),
            ("skipped", "{" + ",".join(str(m) for m in result.skipped) + "}"),
            ("ev_text", ev_text),
            ("ev_level", ev_level),
            ("ev_details", json.dumps({"inbox_id": r.inbox_id, "key_id": r.msg.key_id, **result.as_json()})),
        ):
            rows[k].append(v)
    for lead_id, moved_to, _, _, _, triage_id in _all(_RECORD_SQL, {**rows, "grace": settings.handoff_grace_seconds}):
        if moved_to is not None:
            stopped[lead_id].moved_to = moved_to
        stopped[lead_id].triage_id = triage_id
    for r, ev_text, ev_level in zip(replies, rows["ev_text"], rows["ev_level"]):
        if ev_text is not None and ev_level is not None:
            log_line("inbound", ev_text, lead_id=r.lead_id, level=ev_level)


_RECORD_KEYS = (
    "lead",
    "inbox",
    "key",
    "text",
    "at",
    "action",
    "outcome",
    "gate",
    "opt",
    "skipped",
    "ev_text",
    "ev_level",
    "ev_details",
)


def _phrases(configured: list[str] | None) -> frozenset[str] | None:
    return None if configured is None else phrase_set(configured)


def _action(result: MessageResult) -> str:
    done = [
        f"{label} {len(ids)}"
        for label, ids in (("skipped", result.skipped), ("ended", result.ended), ("in_flight", result.in_flight))
        if ids
    ]
    return (result.result + (": " + ", ".join(done) if done else "")) if result.result else "recorded"
