"""Evolution API event envelopes, validated (SPEC §5, R-IN-1/2/7).

The same JSON arrives over the webhook and over Evolution's RabbitMQ integration::

    {"event": "messages.upsert", "instance": "acme-sales-1", "data": {...},
     "server_url": "...", "date_time": "2026-11-29T10:00:00.000Z", "sender": "...", "apikey": "..."}

:func:`parse_envelope` turns a decoded body into one of :class:`DeliveryUpdate` (``messages.update``),
:class:`InboundMessage` (``messages.upsert``), :class:`ConnectionChange` (``connection.update``), or
a reason string when the event is acknowledged and ignored (another event, a status with no
progress, a message the number itself sent). A malformed body raises :class:`EnvelopeError` naming
the field, never quoting its value (it may be huge or hostile).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from campaign.errors import EnvelopeError

__all__ = [
    "ConnectionChange",
    "DeliveryUpdate",
    "EnvelopeError",
    "ERROR_STATUS",
    "IGNORED_STATUSES",
    "InboundMessage",
    "STATUS_MAP",
    "parse_envelope",
    "phone_candidates",
]

#: Evolution status -> our delivery status (DELIVERY_STATUSES is in rank order)
STATUS_MAP = {"SERVER_ACK": "server_ack", "DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read"}
ERROR_STATUS = "ERROR"
#: real Evolution statuses that carry no delivery progress: acknowledged, nothing changes
IGNORED_STATUSES = frozenset({"PENDING", "DELETED"})
DELIVERY_EVENT = "messages.update"
MESSAGE_EVENT = "messages.upsert"
CONNECTION_EVENT = "connection.update"
HANDLED_EVENTS = (DELIVERY_EVENT, MESSAGE_EVENT, CONNECTION_EVENT)
MAX_KEY_ID_LENGTH = 256
MAX_EVENT_LENGTH = 64  # Evolution's longest event name is about 25
MAX_INSTANCE_LENGTH = 200  # as inboxes.instance_name (schema CHECK, `apply`)
MAX_JID_LENGTH = 256  # a JID is ~30-60 characters
MAX_TEXT_LENGTH = 65_536  # WhatsApp caps a text at 65,536 characters
CONNECTION_STATES = ("open", "close", "connecting")

#: message types that carry no text of their own -> the placeholder recorded for them (R-IN-2)
_MEDIA = re.compile(r"^(?P<kind>[a-z]+?)(?:with[a-z]+)?message$")


@dataclass(frozen=True)
class DeliveryUpdate:
    """One validated ``messages.update`` status change."""

    key_id: str
    status: str  # Evolution's status, upper case (SERVER_ACK, ..., ERROR)
    instance: str  # the Evolution instance that sent the part: with key_id, what identifies it
    remote_jid: str | None
    from_me: bool | None


@dataclass(frozen=True)
class InboundMessage:
    """One message a contact sent to an inbox (``messages.upsert``, ``fromMe`` false, not a group)."""

    instance: str
    key_id: str
    remote_jid: str
    phone_digits: str  # the sender's number (LID chats: from remoteJidAlt), digits only
    text: str  # the text, or a placeholder such as "[audio]" for other types
    is_text: bool
    at: dt.datetime | None  # messageTimestamp (or the envelope's date_time)


@dataclass(frozen=True)
class ConnectionChange:
    """An inbox's connection state as Evolution observed it at ``at`` (``connection.update``)."""

    instance: str
    state: str  # open | close | connecting
    reason: str | None  # statusReason, when given
    at: dt.datetime | None  # the envelope's date_time: the newer observation wins (R-IN-8)


def normalise_event(value: str) -> str:
    """Evolution spells it "messages.update" in the body, "MESSAGES_UPDATE" in its settings and
    "messages-update" in per-event URLs."""
    return value.strip().lower().replace("_", ".").replace("-", ".")


def text_field(value: Any, name: str, *, required: bool, max_len: int) -> str | None:
    """A string field PostgreSQL can store (UTF-8, no NUL, at most ``max_len`` characters), or None
    when absent and optional. The value never goes into the error: it may be huge or hostile."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise EnvelopeError(
            f"field {name!r} is missing or not a non-empty string" if required else f"field {name!r} must be a string"
        )
    if len(value) > max_len:
        raise EnvelopeError(f"field {name!r} is longer than {max_len} characters")
    if "\x00" in value:
        raise EnvelopeError(f"field {name!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EnvelopeError(f"field {name!r} is not valid Unicode text (lone surrogate)") from None
    return value


def _instance(doc: dict[str, Any], why: str) -> str:
    instance = text_field(doc.get("instance"), "instance", required=False, max_len=MAX_INSTANCE_LENGTH)
    if instance is None or not instance.strip():
        raise EnvelopeError(f"field 'instance' is missing or not a non-empty string ({why})")
    return instance


def _when(value: Any, name: str) -> dt.datetime | None:
    """An ISO 8601 time (Evolution's ``date_time``) or epoch seconds/milliseconds; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise EnvelopeError(f"field {name!r} must be a time")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        seconds = float(value)
        if seconds > 1e11:  # milliseconds
            seconds /= 1000.0
        if not 0 <= seconds < 1e10:
            raise EnvelopeError(f"field {name!r} is not a plausible time")
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    if isinstance(value, dict) and isinstance(value.get("low"), int):  # protobuf Long from Baileys
        return _when(value["low"] & 0xFFFFFFFF, name)
    text = text_field(value, name, required=True, max_len=64)
    assert text is not None
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise EnvelopeError(f"field {name!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _delivery(doc: dict[str, Any], data: dict[str, Any]) -> DeliveryUpdate | str:
    key_id = text_field(data.get("keyId"), "data.keyId", required=True, max_len=MAX_KEY_ID_LENGTH)
    assert key_id is not None
    status = data.get("status")
    if not isinstance(status, str) or not status.strip():
        raise EnvelopeError("field 'data.status' is missing or not a string")
    status = status.strip().upper()
    known = (*STATUS_MAP, ERROR_STATUS, *sorted(IGNORED_STATUSES))
    if status not in known:
        raise EnvelopeError(f"field 'data.status' must be one of {', '.join(known)}, got {ascii(status[:32])[:40]}")
    remote_jid = text_field(data.get("remoteJid"), "data.remoteJid", required=False, max_len=MAX_JID_LENGTH)
    from_me = data.get("fromMe")
    if from_me is not None and not isinstance(from_me, bool):
        raise EnvelopeError("field 'data.fromMe' must be a boolean")
    if status in IGNORED_STATUSES:
        return f"status {status} carries no delivery progress"
    if from_me is False:
        return "update of a message the contact sent (fromMe false)"
    instance = _instance(doc, "a key id is only meaningful with the instance that sent it")
    return DeliveryUpdate(
        key_id=key_id.strip(), status=status, instance=instance, remote_jid=remote_jid, from_me=from_me
    )


def _message_text(message: Any, message_type: Any) -> tuple[str, bool]:
    """The text of a WhatsApp message, or a placeholder naming its type ("[audio]")."""
    if isinstance(message, dict):
        for name, value in (
            ("data.message.conversation", message.get("conversation")),
            (
                "data.message.extendedTextMessage.text",
                message.get("extendedTextMessage", {}).get("text")
                if isinstance(message.get("extendedTextMessage"), dict)
                else None,
            ),
        ):
            text = text_field(value, name, required=False, max_len=MAX_TEXT_LENGTH)
            if text and text.strip():
                return text, True
        kinds = [k for k in message if k != "messageContextInfo"]
    else:
        kinds = []
    if isinstance(message_type, str) and message_type and message_type not in ("conversation", "extendedTextMessage"):
        kinds.insert(0, message_type)
    for kind in kinds:
        match = _MEDIA.match(kind.lower()) if isinstance(kind, str) else None
        if match:
            return f"[{match.group('kind')}]", False
    return "[message]", False


def _inbound(doc: dict[str, Any], data: dict[str, Any]) -> InboundMessage | str:
    key = data.get("key")
    if not isinstance(key, dict):
        raise EnvelopeError("field 'data.key' is missing or not an object")
    key_id = text_field(key.get("id"), "data.key.id", required=True, max_len=MAX_KEY_ID_LENGTH)
    remote_jid = text_field(key.get("remoteJid"), "data.key.remoteJid", required=True, max_len=MAX_JID_LENGTH)
    assert key_id is not None and remote_jid is not None
    from_me = key.get("fromMe")
    if not isinstance(from_me, bool):
        raise EnvelopeError("field 'data.key.fromMe' is missing or not a boolean")
    instance = _instance(doc, "a message is only meaningful with the number it was sent to")
    if from_me:
        return "a message the number itself sent (fromMe true)"
    jid = remote_jid.strip().lower()
    if jid.endswith("@g.us"):
        return "a group message"
    if jid == "status@broadcast" or jid.endswith("@broadcast") or jid.endswith("@newsletter"):
        return "a status/broadcast message"
    addressing = key.get("addressingMode")
    sender = jid
    if addressing == "lid" or jid.endswith("@lid"):
        # WhatsApp's LID addressing: remoteJid is an opaque id; the phone is in remoteJidAlt (E-29)
        alt = text_field(key.get("remoteJidAlt"), "data.key.remoteJidAlt", required=False, max_len=MAX_JID_LENGTH)
        if not alt or not alt.strip():
            return "a LID-addressed message without remoteJidAlt: the sender's phone is unknown"
        sender = alt.strip().lower()
    digits = sender.split("@", 1)[0].split(":", 1)[0]
    if not digits.isdigit() or not 8 <= len(digits) <= 15:
        return "the sender is not a phone number"
    text, is_text = _message_text(data.get("message"), data.get("messageType"))
    at = _when(data.get("messageTimestamp"), "data.messageTimestamp") or _when(doc.get("date_time"), "date_time")
    return InboundMessage(
        instance=instance,
        key_id=key_id.strip(),
        remote_jid=remote_jid,
        phone_digits=digits,
        text=text,
        is_text=is_text,
        at=at,
    )


def _connection(doc: dict[str, Any], data: dict[str, Any]) -> ConnectionChange | str:
    state = data.get("state")
    if not isinstance(state, str) or not state.strip():
        raise EnvelopeError("field 'data.state' is missing or not a string")
    state = state.strip().lower()
    if state not in CONNECTION_STATES:
        allowed = ", ".join(CONNECTION_STATES)
        raise EnvelopeError(f"field 'data.state' must be one of {allowed}, got {ascii(state[:32])[:40]}")
    instance = _instance(doc, "a connection state belongs to an instance")
    reason = data.get("statusReason")
    return ConnectionChange(
        instance=instance,
        state=state,
        reason=str(reason)[:64] if isinstance(reason, (int, str)) and not isinstance(reason, bool) else None,
        at=_when(doc.get("date_time"), "date_time"),
    )


def parse_envelope(doc: Any) -> DeliveryUpdate | InboundMessage | ConnectionChange | str:
    """Validate a decoded body; return the event, or a reason string when it is ignored.

    Raises EnvelopeError naming the offending field when the body is malformed.
    """
    if not isinstance(doc, dict):
        raise EnvelopeError(f"body must be a JSON object, got {type(doc).__name__}")
    event = text_field(doc.get("event"), "event", required=True, max_len=MAX_EVENT_LENGTH)
    assert event is not None
    name = normalise_event(event)
    if name not in HANDLED_EVENTS:
        return f"event {event!r} is not handled"
    data = doc.get("data")
    if not isinstance(data, dict):
        raise EnvelopeError("field 'data' is missing or not an object")
    if name == DELIVERY_EVENT:
        return _delivery(doc, data)
    if name == MESSAGE_EVENT:
        return _inbound(doc, data)
    return _connection(doc, data)


def phone_candidates(digits: str) -> list[str]:
    """E.164 forms a WhatsApp number may be stored under (R-IN-2).

    Brazil's mobile numbers gained a ninth digit in 2012-2016, but WhatsApp accounts created
    before keep the eight-digit JID (55 + area + 8 digits): a lead imported as +55 11 9xxxx-xxxx
    replies from 5511xxxxxxxx. Both forms are tried, so such a reply still finds its lead.
    """
    out = ["+" + digits]
    if digits.startswith("55") and len(digits) == 12 and digits[4] in "6789":
        out.append(f"+{digits[:4]}9{digits[4:]}")
    elif digits.startswith("55") and len(digits) == 13 and digits[4] == "9":
        out.append(f"+{digits[:4]}{digits[5:]}")
    return out
