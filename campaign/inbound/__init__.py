"""Listening (SPEC §4.6a): Evolution's events applied to the engine's rows, one handler per event.

The webhook receiver (``webhook.py``) and the RabbitMQ consumer (``inbound.py``) both call
:func:`apply_event`; every effect is idempotent on (inbox, provider message id), so the same event
on both paths, a duplicate or a redelivery changes nothing twice (R-IN-1).
"""

from __future__ import annotations

from typing import Any

from campaign.inbound.connection import ConnectionResult, apply_connection
from campaign.inbound.envelopes import (
    ConnectionChange,
    DeliveryUpdate,
    EnvelopeError,
    InboundMessage,
    parse_envelope,
)
from campaign.inbound.receipts import UpdateResult, apply_update
from campaign.inbound.replies import MessageResult, apply_message, apply_messages, stop_lead
from campaign.settings import Settings

__all__ = [
    "ConnectionChange",
    "ConnectionResult",
    "DeliveryUpdate",
    "EnvelopeError",
    "Event",
    "InboundMessage",
    "MessageResult",
    "UpdateResult",
    "apply_connection",
    "apply_event",
    "apply_message",
    "apply_messages",
    "apply_update",
    "handle",
    "parse_envelope",
    "stop_lead",
]

Event = DeliveryUpdate | InboundMessage | ConnectionChange
Result = UpdateResult | MessageResult | ConnectionResult


def apply_event(event: Event, settings: Settings) -> Result:
    """Apply one parsed event (the caller holds a database connection)."""
    if isinstance(event, DeliveryUpdate):
        return apply_update(event)
    if isinstance(event, InboundMessage):
        return apply_message(event, settings)
    return apply_connection(event)


def handle(doc: Any, settings: Settings) -> Result | str:
    """Parse and apply a decoded envelope; a reason string when it is ignored.

    Raises EnvelopeError (naming the field) when the envelope is malformed.
    """
    event = parse_envelope(doc)
    if isinstance(event, str):
        return event
    return apply_event(event, settings)
