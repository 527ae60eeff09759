"""``connection.update``: an inbox's state, applied at once (R-IN-7, R-IN-8, E-07).

``close`` / ``connecting`` pauses the runs on the inbox (``inbox_disconnected``) whose pool has no
other member that can send: messages not started wait in PostgreSQL, a started one parks at its
next part (E-24); in a pool with a member that can send the run goes on, and the inbox's messages
move to the others once it has been down POOL_FAILOVER_SECONDS (R-POOL-3, campaign.failover).
``open`` resumes exactly those runs, re-plans the inbox's waiting messages and wakes the parked
ones. Seconds, not the next health poll.

Order is not guaranteed (R-IN-8): the state carries the time Evolution observed it (the envelope's
``date_time``) and is stored only when it is newer than what the inbox already holds (a health
poll or an earlier event), so a late ``open`` cannot undo a newer ``close``. An event without a
time, or with a time more than CLOCK_TRUST_SECONDS away from this clock (Evolution writes its
server's local time with a "Z"), counts as observed now.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from campaign import failover, runs
from campaign.db import db
from campaign.events import log_event
from campaign.inbound.envelopes import ConnectionChange
from campaign.inboxes import resume_reconnected, store_state
from campaign.settings import get_settings
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = ["ConnectionResult", "apply_connection"]

#: an event time further than this from our clock is not trusted for ordering (Evolution stamps
#: ``date_time`` with its server's LOCAL time and a "Z": off by hours unless it runs in UTC)
CLOCK_TRUST_SECONDS = 120.0


def _observed_at(at: dt.datetime | None) -> dt.datetime | None:
    """The event's time when it is plausible, else None (= observed now)."""
    if at is None:
        return None
    skew = abs((dt.datetime.now(dt.UTC) - at).total_seconds())
    if skew > CLOCK_TRUST_SECONDS:
        log.warning("connection.update date_time %s is %.0fs off this clock: counted as observed now", at, skew)
        return None
    return at


@dataclass
class ConnectionResult:
    """What one connection event did."""

    result: str  # updated | stale | unknown_instance
    inbox_id: int | None = None
    state: str | None = None
    paused: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    moved: int = 0  # not-started messages a pool failover moved (R-POOL-3)

    def as_json(self) -> dict[str, object]:
        """The webhook's answer (no empty fields)."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], 0)}


def apply_connection(change: ConnectionChange) -> ConnectionResult:
    """Store the state when it is the newest observation; pause or resume the inbox's runs."""
    row = _one("SELECT id, connection_state FROM inboxes WHERE instance_name = %s", (change.instance,))
    if row is None:
        log.warning("connection.update: instance %r is no inbox of this engine; ignored", change.instance)
        return ConnectionResult("unknown_instance")
    inbox_id, before = row
    with db.atomic():
        if not store_state(inbox_id, change.state, observed_at=_observed_at(change.at)):
            return ConnectionResult("stale", inbox_id=inbox_id, state=change.state)
        result = ConnectionResult("updated", inbox_id=inbox_id, state=change.state)
        if change.state == "open":
            result.resumed = resume_reconnected(inbox_id, was_down=before in ("close", "connecting"))
        else:
            # only the runs whose pool has no other member that can send (R-POOL-3)
            result.paused = runs.pause_inbox_runs(inbox_id, "inbox_disconnected")
            log_event(
                "inbox",
                f"inbox {inbox_id} is {change.state} (connection.update"
                + (f", reason {change.reason}" if change.reason else "")
                + f"): {len(result.paused)} run(s) paused",
                level="warning",
                details={"inbox_id": inbox_id, "state": change.state, "paused_runs": result.paused},
            )
    # Pool failover at once, not at the next poll (R-POOL-3): a member down for POOL_FAILOVER_SECONDS
    # already (a repeated close) hands its work over; a member back lets the runs it resumed hand
    # over the work of their other members that are still down.
    moved = failover.fail_over(get_settings(), inbox_ids=None if change.state == "open" else [inbox_id])
    result.moved = sum(m.total for m in moved)
    log.info(
        "inbox %s: connection %s (paused %s, resumed %s, moved %s)",
        inbox_id,
        change.state,
        result.paused,
        result.resumed,
        result.moved,
    )
    return result
