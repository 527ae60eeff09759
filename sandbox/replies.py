"""Scripted inbound messages: the ``messages.upsert`` a lead's phone makes Evolution publish.

Two ways in:

* the control API, ``POST /__sandbox/inbound`` with an :func:`parse_inbound` document (or a JSON list
  of them, validated all before any is published)::

      {"instance": "acme-1",          # required
       "number": "+55 11 98765-4321", # the lead's phone (digits are kept); required
       "text": "PARE",                # or "message_type" (below) with an optional caption/text
       "message_type": "conversation",
       "message": {...},              # optional raw data.message (any WhatsApp type), overrides the built one
       "lid": true | "123456789012345",   # LID-addressed chat: remoteJid "<lid>@lid", remoteJidAlt the phone
       "addressing_mode": "lid",      # or "pn": remoteJid the phone, remoteJidAlt the LID (needs lid)
       "from_me": false,              # true: a message the number's owner typed on the phone
       "group": false | true | "120363...@g.us",   # a group message from this participant
       "broadcast": false,            # a status@broadcast post of this number
       "delay_ms": 0,                 # publish this much later
       "id": "ABC...",                # the message id (default: a stable made-up one)
       "push_name": "Ana"}

* automatic replies, the fault document's ``replies`` (see :mod:`sandbox.config`): a lead (an
  ``(instance, number)`` pair) replies once after it received its ``after_part``-th accepted send,
  with probability ``rate``, after ``delay_ms``, one of ``texts`` (weighted). Every draw comes from a
  random stream seeded by (sandbox seed, instance, number), so the same seed makes the same leads
  answer the same thing whatever the timing.

Message types: ``conversation`` (text; what Evolution 2.3 makes of every text), ``extendedTextMessage``
(the shape older Evolution versions pass on), ``audioMessage``, ``imageMessage``, ``videoMessage``,
``documentMessage``, ``stickerMessage``, ``locationMessage``, ``contactMessage``.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox.config import MAX_DELAY_MS, FaultError
from sandbox.events import MESSAGE_TYPES, group_jid, instance_id, lid_for, message_content

__all__ = ["Inbound", "draw_reply", "message_id", "parse_inbound", "upsert_data"]


@dataclass
class Inbound:
    """One scripted inbound message, validated."""

    instance: str
    number: str
    text: str | None = None
    message_type: str = "conversation"
    message: dict[str, Any] | None = None
    lid: str | None = None
    addressing_mode: str | None = None
    from_me: bool = False
    group: str | None = None
    broadcast: bool = False
    delay_ms: float = 0.0
    id: str | None = None
    push_name: str | None = None
    origin: str = "control"
    trigger: dict[str, Any] = field(default_factory=dict)


def _digits(value: Any) -> str:
    return "".join(ch for ch in str(value) if ch.isascii() and ch.isdigit())


def _str(doc: dict[str, Any], key: str, *, required: bool = False, max_len: int = 4096) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise FaultError(f"{key}: required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise FaultError(f"{key}: expected a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise FaultError(f"{key}: longer than {max_len} characters")
    return value


def _bool(doc: dict[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise FaultError(f"{key}: expected true or false, got {value!r}")
    return value


def _number(path: str, value: Any, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
        raise FaultError(f"{path}: expected a number in [0, {hi}], got {value!r}")
    return float(value)


_INBOUND_KEYS = {
    "instance",
    "number",
    "text",
    "message_type",
    "message",
    "lid",
    "addressing_mode",
    "from_me",
    "group",
    "broadcast",
    "delay_ms",
    "id",
    "push_name",
}


def parse_inbound(doc: Any) -> Inbound:
    """Validate a control-API inbound document; FaultError names what is wrong."""
    if not isinstance(doc, dict):
        raise FaultError("an inbound message must be a JSON object")
    unknown = sorted(set(doc) - _INBOUND_KEYS)
    if unknown:
        raise FaultError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_INBOUND_KEYS))})")
    instance = _str(doc, "instance", required=True, max_len=200)
    number = _digits(_str(doc, "number", required=True, max_len=64))
    if not 8 <= len(number) <= 15:
        raise FaultError(f"number: {doc['number']!r} is not a phone number (8 to 15 digits)")
    text = _str(doc, "text")
    message_type = _str(doc, "message_type", max_len=64) or "conversation"
    message = doc.get("message")
    if message is not None and (not isinstance(message, dict) or not message):
        raise FaultError("message: expected a non-empty JSON object (WhatsApp's data.message)")
    if message is None and message_type not in MESSAGE_TYPES:
        raise FaultError(f"message_type: {message_type!r} unknown (known: {', '.join(MESSAGE_TYPES)}; or give message)")
    if message is None and message_type in ("conversation", "extendedTextMessage") and not text:
        raise FaultError("text: required for a text message")
    lid_raw = doc.get("lid")
    lid: str | None
    if lid_raw is None or lid_raw is False:
        lid = None
    elif lid_raw is True:
        lid = lid_for(number)
    elif isinstance(lid_raw, str) and _digits(lid_raw.removesuffix("@lid")) == lid_raw.removesuffix("@lid"):
        lid = lid_raw.removesuffix("@lid")
        if not lid:
            raise FaultError("lid: empty")
    else:
        raise FaultError(f"lid: expected true or the LID's digits, got {lid_raw!r}")
    addressing_mode = _str(doc, "addressing_mode", max_len=8)
    if addressing_mode is not None:
        if addressing_mode not in ("lid", "pn"):
            raise FaultError("addressing_mode: 'lid' or 'pn'")
        if lid is None:
            raise FaultError("addressing_mode: needs lid")
    group_raw = doc.get("group", False)
    group: str | None
    if group_raw is False or group_raw is None:
        group = None
    elif group_raw is True:
        group = group_jid(instance or "", number)
    elif isinstance(group_raw, str) and group_raw:
        group = group_raw if group_raw.endswith("@g.us") else f"{_digits(group_raw)}@g.us"
    else:
        raise FaultError(f"group: expected true or a group JID, got {group_raw!r}")
    broadcast = _bool(doc, "broadcast")
    if broadcast and group:
        raise FaultError("broadcast: a message is either a group message or a status broadcast, not both")
    delay_ms = _number("delay_ms", doc.get("delay_ms", 0), MAX_DELAY_MS)
    return Inbound(
        instance=instance or "",
        number=number,
        text=text,
        message_type=message_type,
        message=message,
        lid=lid,
        addressing_mode=addressing_mode,
        from_me=_bool(doc, "from_me"),
        group=group,
        broadcast=broadcast,
        delay_ms=delay_ms,
        id=_str(doc, "id", max_len=128),
        push_name=_str(doc, "push_name", max_len=200),
    )


def draw_reply(
    replies: dict[str, Any] | None, seed: int, instance: str, number: str, part: int, key_id: str
) -> Inbound | None:
    """The automatic reply this send triggers, if any (deterministic in seed, instance and number)."""
    if not replies or part != replies["after_part"] or not replies["rate"]:
        return None
    if replies["instances"] is not None and instance not in replies["instances"]:
        return None
    digest = hashlib.sha256(f"{seed}|reply|{instance}|{number}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    # every draw is made whatever the outcome, in a fixed order, so one option never shifts another
    answers = rng.random() < replies["rate"]
    delay = replies["delay_ms"]
    delay_ms = rng.uniform(delay[0], delay[1]) if isinstance(delay, list) else float(delay)
    choices = [t if isinstance(t, dict) else {"text": t} for t in replies["texts"]]
    choice = rng.choices(choices, weights=[float(c.get("weight", 1)) for c in choices])[0]
    lid = rng.random() < replies["lid_rate"]
    if not answers:
        return None
    return Inbound(
        instance=instance,
        number=number,
        text=choice.get("text"),
        message_type=choice.get("message_type", "conversation"),
        lid=lid_for(number) if lid else None,
        delay_ms=delay_ms,
        origin="auto",
        trigger={"key_id": key_id, "part": part},
    )


def _jid(number: str) -> str:
    return f"{number}@s.whatsapp.net"


def message_id(seed: int, spec: Inbound, n: int | str) -> str:
    """A made-up WhatsApp message id: 32 upper-case hex digits, as an Android phone's ids look."""
    return hashlib.sha256(f"{seed}|inbound|{spec.instance}|{spec.number}|{n}".encode()).hexdigest()[:32].upper()


def _key(spec: Inbound, key_id: str) -> dict[str, Any]:
    """data.key as Baileys gives it for this kind of chat."""
    pn, lid = _jid(spec.number), f"{spec.lid}@lid" if spec.lid else None
    mode = spec.addressing_mode or ("lid" if lid else None)
    if spec.group or spec.broadcast:
        key: dict[str, Any] = {"remoteJid": spec.group or "status@broadcast", "fromMe": spec.from_me, "id": key_id}
        if lid and mode == "lid":
            key.update(participant=lid, participantAlt=pn, addressingMode="lid")
        elif lid:
            key.update(participant=pn, participantAlt=lid, addressingMode="pn")
        else:
            key["participant"] = pn
        return key
    if lid and mode == "lid":
        return {"remoteJid": lid, "fromMe": spec.from_me, "id": key_id, "addressingMode": "lid", "remoteJidAlt": pn}
    if lid:
        return {"remoteJid": pn, "fromMe": spec.from_me, "id": key_id, "addressingMode": "pn", "remoteJidAlt": lid}
    return {"remoteJid": pn, "fromMe": spec.from_me, "id": key_id}


def upsert_data(spec: Inbound, key_id: str) -> dict[str, Any]:
    """``data`` of the ``messages.upsert`` Evolution publishes for this inbound message."""
    if spec.message is not None:
        message = dict(spec.message)
        message_type = spec.message_type if spec.message_type in message else next(iter(message))
    else:
        message = message_content(spec.message_type, spec.text, key_id)
        message_type = spec.message_type
    if not spec.from_me:
        # what a phone attaches to what it sends (Baileys passes it on; consumers ignore it)
        secret = hashlib.sha256(f"secret|{key_id}".encode()).hexdigest()[:44]
        message["messageContextInfo"] = {"messageSecret": secret}
    return {
        "key": _key(spec, key_id),
        "pushName": spec.push_name or ("Você" if spec.from_me else f"Lead {spec.number[-4:]}"),
        "status": "SERVER_ACK" if spec.from_me else "DELIVERY_ACK",
        "message": message,
        "messageType": message_type,
        "messageTimestamp": int(time.time()),
        "instanceId": instance_id(spec.instance),
        "source": "android",
    }
