"""The append-only ``campaign_events`` log (and the process log beside it)."""

from __future__ import annotations

import json
import logging

from campaign.db import db

log = logging.getLogger(__name__)


def log_event(
    step: str,
    text: str,
    *,
    run_id: int | None = None,
    message_id: int | None = None,
    lead_id: int | None = None,
    level: str = "info",
    details: dict | None = None,
) -> None:
    """Append a line to ``campaign_events`` (and the process log)."""
    log_line(step, text, run_id=run_id, message_id=message_id, lead_id=lead_id, level=level)
    db.execute_sql(
        "INSERT INTO campaign_events (run_id, message_id, lead_id, step, level, text, details) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (run_id, message_id, lead_id, step, level, text, json.dumps(details or {})),
    )


def log_line(
    step: str,
    text: str,
    *,
    run_id: int | None = None,
    message_id: int | None = None,
    lead_id: int | None = None,
    level: str = "info",
) -> None:
    """The process-log half of :func:`log_event`, for a caller that writes the row in a statement of its own."""
    getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(
        "%s run=%s message=%s lead=%s: %s", step, run_id, message_id, lead_id, text
    )
