"""``conversation LEAD``: one lead and everything said between it and the engine (R-IN-6, R-OPS-1).

What a salesperson opening the lead needs: who it is, where it sits, whether it opted out (when,
and the words it used) and when it last replied; then every message of its conversations, on
every inbox, in time order: the parts the engine sent (which campaign and run, which part, how far
delivery got) and what the lead wrote (the intent triage gave it, what the engine did about it).

LEAD is a lead id or a phone. A phone is normalised as ``import-leads`` does (E.164, numbers
without ``+`` in ``region``), so it can be typed the way it is written anywhere; digits alone are
tried as an id first, then as a phone, and when both find a (different) lead the error says how
to choose (``id:N`` or a ``+`` phone). A phone present in several workspaces needs ``--workspace``.

Everything printed that came from outside (names, replies, reasons) is plain text with control
characters shown escaped: a reply carrying terminal escape codes cannot repaint the operator's screen.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass

import phonenumbers

from campaign.db import db
from campaign.errors import (
    ConfigError,
    LeadNotFound,
)
from campaign.ops.leads_import import DEFAULT_REGION, normalise_phone

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "LeadNotFound",
    "LeadInfo",
    "Entry",
    "Conversation",
    "find_lead",
    "load_conversation",
    "render_text",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
_MAX_ID = 2**63 - 1  # bigserial
_DIGITS = re.compile(r"[0-9]+")
_ID_PREFIX = re.compile(r"id:\s*([0-9]+)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 / C1 controls but tab and newline


@dataclass(frozen=True)
class LeadInfo:
    """The lead as the header shows it."""

    id: int
    workspace: str
    name: str
    phone: str
    column: str | None
    opted_out: bool
    opted_out_at: dt.datetime | None
    opted_out_reason: str | None
    last_reply_at: dt.datetime | None


@dataclass(frozen=True)
class Entry:
    """One message of the conversation: a part the engine sent (``out``) or what the lead wrote (``in``)."""

    at: dt.datetime
    direction: str  # 'out' | 'in'
    inbox: str
    text: str
    provider_message_id: str
    # out: the part and the campaign it belongs to (None when the part row is gone)
    part_idx: int | None = None
    parts: int | None = None
    campaign: str | None = None
    run_id: int | None = None
    delivery_status: str | None = None  # server_ack < delivered < read; None: not confirmed yet
    delivery_error: bool = False  # Evolution reported an ERROR for the part (R-OPS-5)
    # in: what triage made of it and what the engine did
    intent: str | None = None
    action: str | None = None


@dataclass(frozen=True)
class Conversation:
    """The lead, its latest ``len(entries)`` messages in time order, and how many there are in all."""

    lead: LeadInfo
    entries: list[Entry]
    total: int
    inboxes: list[str]  # every inbox the lead has a conversation with


_LEAD_COLUMNS = """
    SELECT l.id, w.name, l.name, l.phone, c.name, l.opted_out, l.opted_out_at, l.opted_out_reason, l.last_reply_at
      FROM leads l JOIN workspaces w ON w.id = l.workspace_id LEFT JOIN columns c ON c.id = l.column_id"""

_BY_ID_SQL = _LEAD_COLUMNS + " WHERE l.id = %s"
_BY_PHONE_SQL = _LEAD_COLUMNS + " WHERE l.phone = %s AND (%s::bigint IS NULL OR l.workspace_id = %s) ORDER BY w.name"

# The latest ``limit`` messages of every conversation of the lead (newest first: the caller
# reverses them), each with its part and campaign; the total before the LIMIT by a window count.
# A reply's time is WhatsApp's messageTimestamp, in whole seconds, a sent part's is the database's
# clock: within one second the order they were recorded in (the id) decides, so an answer never
# shows above the part it answers.
_ENTRIES_SQL = """
    SELECT cm.at, cm.direction, i.name, cm.text, cm.provider_message_id,
           p.idx, (SELECT count(*) FROM message_parts q WHERE q.message_id = p.message_id),
           cfg.name, m.run_id, p.delivery_status, p.delivery_error_at IS NOT NULL,
           cm.intent, cm.action, count(*) OVER ()
      FROM conversations c
      JOIN conversation_messages cm ON cm.conversation_id = c.id
      JOIN inboxes i ON i.id = cm.inbox_id
      LEFT JOIN message_parts p ON p.id = cm.part_id
      LEFT JOIN campaign_messages m ON m.id = p.message_id
      LEFT JOIN campaign_runs r ON r.id = m.run_id
      LEFT JOIN campaign_configs cfg ON cfg.id = r.config_id
     WHERE c.lead_id = %s
     ORDER BY date_trunc('second', cm.at) DESC, cm.id DESC
     LIMIT %s"""

_INBOXES_SQL = """
    SELECT i.name FROM conversations c JOIN inboxes i ON i.id = c.inbox_id WHERE c.lead_id = %s ORDER BY i.name"""


def _workspace_id(name: str) -> int:
    row = db.execute_sql("SELECT id FROM workspaces WHERE name = %s", (name,)).fetchone()
    if row is None:
        names = [r[0] for r in db.execute_sql("SELECT name FROM workspaces ORDER BY name").fetchall()]
        raise LeadNotFound(f"workspace {name!r} does not exist (workspaces: {', '.join(names) or 'none'})")
    return int(row[0])


def _by_id(lead_id: int) -> LeadInfo | None:
    row = db.execute_sql(_BY_ID_SQL, (lead_id,)).fetchone() if lead_id <= _MAX_ID else None
    return None if row is None else LeadInfo(*row)


def _by_phone(phone: str, workspace_id: int | None) -> list[LeadInfo]:
    return [LeadInfo(*r) for r in db.execute_sql(_BY_PHONE_SQL, (phone, workspace_id, workspace_id)).fetchall()]


def _choices(leads: list[LeadInfo]) -> str:
    return "; ".join(f"workspace {ld.workspace!r}: lead {ld.id} ({_printable(ld.name)})" for ld in leads)


def _in_workspace(lead: LeadInfo | None, workspace: str | None) -> LeadInfo | None:
    return lead if lead is None or workspace is None or lead.workspace == workspace else None


def _id_not_found(lead_id: str, elsewhere: LeadInfo | None, workspace: str | None) -> LeadNotFound:
    if elsewhere is not None:
        return LeadNotFound(f"lead {lead_id} is in workspace {elsewhere.workspace!r}, not {workspace!r}")
    return LeadNotFound(f"no lead with id {lead_id}")


def find_lead(ref: str, *, workspace: str | None = None, region: str = DEFAULT_REGION) -> LeadInfo:
    """The lead ``ref`` names: ``id:N``, digits (an id, else a phone) or a phone in any format.

    Raises :class:`LeadNotFound` naming what is wrong: no such lead, a workspace that does not
    exist, a phone that is no valid number, or several leads (listed) when the choice is the caller's.
    """
    text = ref.strip()
    if not text:
        raise LeadNotFound("LEAD is empty: give a lead id (e.g. 42) or a phone (e.g. +55 11 98765-4321)")
    region = region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(f"--region {region!r} is not a phone region (two letters, e.g. BR, US, PT)")
    workspace_id = _workspace_id(workspace) if workspace is not None else None
    forced = _ID_PREFIX.fullmatch(text)
    if forced:
        any_ws = _by_id(int(forced.group(1)))
        lead = _in_workspace(any_ws, workspace)
        if lead is None:
            raise _id_not_found(forced.group(1), any_ws, workspace)
        return lead
    any_ws = _by_id(int(text)) if _DIGITS.fullmatch(text) else None
    by_id = _in_workspace(any_ws, workspace)
    try:
        phone = normalise_phone(text, region)
    except ValueError as exc:
        if by_id is not None:
            return by_id
        if _DIGITS.fullmatch(text):
            raise LeadNotFound(
                f"{_id_not_found(text, any_ws, workspace)}, and {text!r} is no phone either ({exc})"
            ) from None
        raise LeadNotFound(f"LEAD {text!r} is neither a lead id nor a valid phone: {exc}") from None
    found = _by_phone(phone, workspace_id)
    if by_id is not None and any(ld.id != by_id.id for ld in found):
        raise LeadNotFound(
            f"{text!r} is lead {by_id.id} by id and the phone {phone} of {_choices(found)}: "
            f"write id:{by_id.id} for the id, or {phone} for the phone"
        )
    if by_id is not None:
        return by_id
    if len(found) == 1:
        return found[0]
    where = f" in workspace {workspace!r}" if workspace else ""
    if not found:
        spelled = "" if phone == text else f" (normalised from {text!r})"
        also = f"; {_id_not_found(text, any_ws, workspace)}" if any_ws is not None else ""
        raise LeadNotFound(f"no lead with phone {phone}{spelled}{where}{also}")
    raise LeadNotFound(
        f"the phone {phone} is a lead in {len(found)} workspaces ({_choices(found)}): give --workspace NAME"
    )


def load_conversation(lead: LeadInfo, *, limit: int = DEFAULT_LIMIT) -> Conversation:
    """The lead's latest ``limit`` conversation messages, oldest first (two queries)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"--limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
    rows = db.execute_sql(_ENTRIES_SQL, (lead.id, limit)).fetchall()
    total = int(rows[0][-1]) if rows else 0
    entries = [
        Entry(
            at=r[0],
            direction=r[1],
            inbox=r[2],
            text=r[3],
            provider_message_id=r[4],
            part_idx=r[5],
            parts=int(r[6]) if r[5] is not None else None,
            campaign=r[7],
            run_id=r[8],
            delivery_status=r[9],
            delivery_error=bool(r[10]),
            intent=r[11],
            action=r[12],
        )
        for r in reversed(rows)
    ]
    inboxes = [r[0] for r in db.execute_sql(_INBOXES_SQL, (lead.id,)).fetchall()]
    log.debug("conversation lead=%s: %s of %s message(s)", lead.id, len(entries), total)
    return Conversation(lead, entries, total, inboxes)


# --------------------------------------------------------------------------------------------
# text


def _printable(text: str) -> str:
    """Control characters (terminal escapes, carriage returns, ...) shown escaped, never obeyed."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _utc(t: dt.datetime | None) -> str:
    return "-" if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(lead: LeadInfo) -> list[str]:
    lines = [
        f"lead {lead.id} · {_printable(lead.name) or '(no name)'} · {lead.phone} · workspace {lead.workspace} · "
        f"column {_printable(lead.column) if lead.column else '(none)'}"
    ]
    if lead.opted_out:
        when = _utc(lead.opted_out_at) if lead.opted_out_at else "(when not recorded)"
        why = f' saying "{_printable(lead.opted_out_reason)}"' if lead.opted_out_reason else ""
        lines.append(f"  opted out {when}{why}")
    else:
        lines.append("  not opted out")
    lines.append(f"  last reply {_utc(lead.last_reply_at) if lead.last_reply_at else 'never'}")
    return lines


def _meta(e: Entry) -> str:
    if e.direction == "out":
        if e.part_idx is None:
            return "sent by the engine (its part is no longer on record)"
        bits = [
            f"{_printable(e.campaign or '?')} run {e.run_id}",
            f"part {e.part_idx + 1}/{e.parts}",
            f"delivery {e.delivery_status or 'not confirmed yet'}",
        ]
        if e.delivery_error:
            bits.append("delivery ERROR reported")
        return " · ".join(bits)
    bits = []
    if e.intent:
        bits.append(f"intent {_printable(e.intent)}")
    bits.append(_printable(e.action or "recorded"))
    return " · ".join(bits)


def render_text(conv: Conversation) -> str:
    """The lead and its conversation as plain text (UTC times, → sent by the engine, ← written by the lead)."""
    lines = _header(conv.lead)
    if not conv.total:
        lines.append("no conversation yet: the engine has not written to this lead and it has not written in")
        return "\n".join(lines) + "\n"
    shown = len(conv.entries)
    lines.append(
        f"conversation: {conv.total} message(s) on {len(conv.inboxes)} inbox(es) "
        f"({_printable(', '.join(conv.inboxes))})"
        + (f"; the latest {shown} shown (--limit)" if shown < conv.total else "")
    )
    for e in conv.entries:
        arrow = "→" if e.direction == "out" else "←"
        lines.append(f"{_utc(e.at)}  {arrow}  {_printable(e.inbox)}  {_meta(e)}")
        lines += [f"    {line}" for line in _printable(e.text).split("\n")]
    return "\n".join(lines) + "\n"
