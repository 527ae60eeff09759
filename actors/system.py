"""Diagnostic actor: proves a worker is alive and reaches the database (``cli.py ping-workers``)."""

from __future__ import annotations

import logging

import dramatiq

from campaign.db import db

log = logging.getLogger(__name__)

SYSTEM_QUEUE = "campaign.system"


@dramatiq.actor(queue_name=SYSTEM_QUEUE, max_retries=3, min_backoff=500, max_backoff=5000, time_limit=30_000)
def ping(token: str) -> None:
    """Record a ``ping`` event carrying ``token`` (read back by whoever sent it)."""
    db.execute_sql(
        "INSERT INTO campaign_events (step, text, details) VALUES ('ping', %s, %s)", (token, '{"source": "worker"}')
    )
    log.info("ping %s", token)
