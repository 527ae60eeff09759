"""Dramatiq actors of the engine. ``dramatiq actors`` starts a worker on them.

Importing this package builds the broker from the environment (RabbitMQ with publisher
confirms unless CAMPAIGN_BROKER=stub) and declares every actor on it.
"""

from __future__ import annotations

import dramatiq

from actors.broker import setup_broker
from campaign.settings import get_settings

broker: dramatiq.Broker = setup_broker(get_settings())

from actors import generate, notify, send, split, system, triage  # noqa: E402  (declared after the broker is set)

__all__ = ["broker", "generate", "notify", "split", "send", "system", "triage"]
