"""Operator commands on inboxes (SPEC R-FAIL-6): ``inbox enable|disable NAME`` and the ``inboxes`` listing.

A disabled inbox comes back only by an operator: ``apply`` never touches ``disabled`` (configfile
updates an inbox's instance and pacing only). Every change is one transaction and one
``campaign_events`` row saying who (the OS user) and why:

* disable: ``disabled = true`` with the reason; its running runs pause ``inbox_disabled``.
* enable: ``disabled = false``, reason cleared, ``consecutive_failures = 0``; every run paused
  ``inbox_disabled`` on it resumes (overdue messages re-planned into the window, E-22). A run the
  operator paused (``manual``) stays paused.

A worker that read the inbox as disabled just before an enable can still pause a run
``inbox_disabled`` just after it; :func:`resume_runs_of_usable_inboxes` (the scheduler's inbox
health job) resumes such a run, so none waits for an inbox that is no longer disabled.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from campaign import failover, health, runs
from campaign.capacity import daily_cap_sql
from campaign.db import db
from campaign.errors import (
    InboxCommandError,
)
from campaign.settings import get_settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = [
    "InboxCommandError",
    "InboxRow",
    "InboxChange",
    "find_inbox",
    "disable_inbox",
    "enable_inbox",
    "list_inboxes",
    "resume_runs_of_usable_inboxes",
    "operator_name",
]

#: how many known inboxes an "unknown inbox" error lists
LIST_IN_ERRORS = 20


@dataclass(frozen=True)
class InboxRow:
    """One inbox as the operator sees it."""

    id: int
    workspace: str
    name: str
    instance_name: str
    connection_state: str
    disconnected_since: object
    disabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    health_state: str = "healthy"
    health_since: dt.datetime | None = None
    health_until: dt.datetime | None = None
    health_reason: str | None = None
    max_per_hour: int | None = None
    max_per_day: int | None = None
    effective_per_day: int | None = None  # today's daily cap: throttled halves it (R-HEALTH-2)
    sent_today: int = 0  # parts sent in the last 24 h (the window of the send-time daily cap)

    @property
    def state(self) -> str:
        """``disabled`` (it wins), else the health state."""
        return "disabled" if self.disabled else self.health_state

    @property
    def reason(self) -> str | None:
        """Why it is disabled, throttled or restricted (None when healthy)."""
        if self.disabled:
            return self.disabled_reason
        if self.health_state != "healthy":
            until = f" (until {self.health_until.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC)" if self.health_until else ""
            return f"{self.health_reason or self.health_state}{until}"
        return None

    @property
    def label(self) -> str:
        """``workspace/name``."""
        return f"{self.workspace}/{self.name}"


@dataclass
class InboxChange:
    """What an enable/disable did; ``changed`` False: nothing (``note`` says why)."""

    inbox: InboxRow
    changed: bool
    by: str
    reason: str | None
    note: str | None = None
    paused: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    health_was: str | None = None  # throttled / restricted before an enable (R-HEALTH-2)
    moved: int = 0  # not-started messages its pools' other members took over (R-POOL-3)


_INBOX_SQL = f"""
    SELECT i.id, w.name, i.name, i.instance_name, i.connection_state, i.disconnected_since, i.disabled,
           i.disabled_reason, i.consecutive_failures, i.health_state, i.health_since, i.health_until,
           i.health_reason, i.max_per_hour, i.max_per_day, {daily_cap_sql("i")},
           (SELECT count(*) FROM message_parts p WHERE p.inbox_id = i.id AND p.status IN ('sent', 'in_doubt', 'sending')
               AND p.sending_at > now() - interval '1 day')
      FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id"""


def operator_name() -> str:
    """Who runs the command (the OS user), for the event row."""
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


def _known(where: str = "", params: tuple = ()) -> str:
    rows = db.execute_sql(
        f"SELECT w.name || '/' || i.name FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id"
        f" {where} ORDER BY 1 LIMIT %s",
        (*params, LIST_IN_ERRORS + 1),
    ).fetchall()
    names = [r[0] for r in rows]
    more = " …" if len(names) > LIST_IN_ERRORS else ""
    return ", ".join(names[:LIST_IN_ERRORS]) + more if names else "none"


def find_inbox(name: str, workspace: str | None = None, *, lock: bool = False) -> InboxRow:
    """The inbox called ``name`` (``[workspaces.W.inboxes.NAME]``), ``W/NAME`` accepted; clear errors."""
    name = name.strip()
    if not name:
        raise InboxCommandError("an inbox name is needed (see `python cli.py inboxes`)")
    candidates: list[tuple[str, str]] = []
    if workspace is not None:
        prefix = f"{workspace}/"
        candidates.append((workspace, name))
        if name.startswith(prefix):
            candidates.append((workspace, name[len(prefix) :]))
    elif "/" in name:
        ws, _, rest = name.partition("/")
        candidates.append((ws, rest))
    suffix = " FOR UPDATE OF i" if lock else ""
    for ws, inbox in candidates:
        row = db.execute_sql(_INBOX_SQL + " WHERE w.name = %s AND i.name = %s" + suffix, (ws, inbox)).fetchone()
        if row is not None:
            return InboxRow(*row)
    if workspace is not None:
        if db.execute_sql("SELECT 1 FROM workspaces WHERE name = %s", (workspace,)).fetchone() is None:
            raise InboxCommandError(f"workspace {workspace!r} does not exist")
        raise InboxCommandError(
            f"inbox {name!r} is not an inbox of workspace {workspace!r} (its inboxes: "
            f"{_known('WHERE w.name = %s', (workspace,))})"
        )
    rows = db.execute_sql(_INBOX_SQL + " WHERE i.name = %s ORDER BY w.name" + suffix, (name,)).fetchall()
    if len(rows) == 1:
        return InboxRow(*rows[0])
    if len(rows) > 1:
        spaces = ", ".join(r[1] for r in rows)
        raise InboxCommandError(
            f"inbox {name!r} exists in {len(rows)} workspaces ({spaces}): name one with --workspace W or as W/{name}"
        )
    raise InboxCommandError(f"inbox {name!r} does not exist (inboxes: {_known()})")


def _event(inbox: InboxRow, text: str, details: dict, level: str) -> None:
    db.execute_sql(
        "INSERT INTO campaign_events (step, level, text, details) VALUES ('inbox', %s, %s, %s)",
        (level, text, json.dumps({"inbox_id": inbox.id, "inbox": inbox.label, **details})),
    )


def disable_inbox(name: str, *, workspace: str | None = None, reason: str, by: str | None = None) -> InboxChange:
    """Disable an inbox with the operator's reason and pause its running runs ``inbox_disabled``."""
    reason = (reason or "").strip()
    if not reason:
        raise InboxCommandError("disabling an inbox needs --reason TEXT (it is kept on the inbox and in the log)")
    by = by or operator_name()
    with db.atomic():
        inbox = find_inbox(name, workspace, lock=True)
        if inbox.disabled:
            return InboxChange(
                inbox, False, by, reason, note=f"already disabled ({inbox.disabled_reason}); nothing changed"
            )
        db.execute_sql("UPDATE inboxes SET disabled = true, disabled_reason = %s WHERE id = %s", (reason, inbox.id))
        # a pool with another member that can send goes on without it (R-POOL-3): only the runs
        # left with no member that can send pause; the failover below moves its not-started work
        paused = runs.pause_inbox_runs(inbox.id, "inbox_disabled")
        _event(
            inbox,
            f"inbox {inbox.label} disabled by {by}: {reason}",
            {"action": "disable", "by": by, "reason": reason, "paused_runs": paused},
            "warning",
        )
    log.warning("inbox %s (id %s) disabled by %s: %s; paused runs %s", inbox.label, inbox.id, by, reason, paused)
    moved = failover.fail_over(get_settings(), inbox_ids=[inbox.id])
    return InboxChange(inbox, True, by, reason, paused=paused, moved=sum(m.total for m in moved))


def enable_inbox(
    name: str, *, workspace: str | None = None, reason: str | None = None, by: str | None = None
) -> InboxChange:
    """Enable an inbox (failure count reset) and resume exactly its runs paused ``inbox_disabled``."""
    reason = (reason or "").strip() or None
    by = by or operator_name()
    with db.atomic():
        inbox = find_inbox(name, workspace, lock=True)
        if inbox.disabled or inbox.consecutive_failures:
            db.execute_sql(
                """UPDATE inboxes SET disabled = false, disabled_reason = NULL, consecutive_failures = 0
                               WHERE id = %s""",
                (inbox.id,),
            )
        # R-HEALTH-2: throttled / restricted end too, the problems so far forgiven
        was_health = health.reset(inbox.id)
        resumed = runs.resume_runs_that_can_send([inbox.id])
        if inbox.disabled or was_health == "restricted":
            failover.member_back(inbox.id)  # its messages that waited for it in running runs (R-POOL-3)
        wake_parked([inbox.id])  # its started messages waiting for it go on now (E-24)
        if not inbox.disabled and not inbox.consecutive_failures and not resumed and was_health is None:
            return InboxChange(inbox, False, by, reason, note="not disabled, throttled or restricted; nothing changed")
        why = reason or "no reason given"
        _event(
            inbox,
            f"inbox {inbox.label} enabled by {by}: {why}",
            {
                "action": "enable",
                "by": by,
                "reason": reason,
                "was_disabled": inbox.disabled,
                "disabled_reason": inbox.disabled_reason,
                "failures_reset": inbox.consecutive_failures,
                "health_was": was_health or "healthy",
                "health_reason": inbox.health_reason,
                "resumed_runs": resumed,
            },
            "info",
        )
    log.info("inbox %s (id %s) enabled by %s (%s); resumed runs %s", inbox.label, inbox.id, by, why, resumed)
    return InboxChange(inbox, True, by, reason, resumed=resumed, health_was=was_health)


def resume_runs_of_usable_inboxes() -> list[int]:
    """Resume runs paused for a down inbox with a member of their pool that can send (a pause that
    raced an enable or a reconnect, R-POOL-3)."""
    resumed = runs.resume_runs_that_can_send()
    if resumed:
        log.warning("resumed runs %s: paused for an inbox, but a member of their pool can send", resumed)
    return resumed


def list_inboxes(workspace: str | None = None) -> list[InboxRow]:
    """Every inbox (of ``workspace``), by workspace and name."""
    if (
        workspace is not None
        and db.execute_sql("SELECT 1 FROM workspaces WHERE name = %s", (workspace,)).fetchone() is None
    ):
        raise InboxCommandError(f"workspace {workspace!r} does not exist")
    where, params = (" WHERE w.name = %s", (workspace,)) if workspace is not None else ("", ())
    return [InboxRow(*r) for r in db.execute_sql(_INBOX_SQL + where + " ORDER BY w.name, i.name", params).fetchall()]


# -- connection state (the send step, the health check, connection.update) ----------------------


def store_state(inbox_id: int, state: str, *, observed_at: dt.datetime | None = None) -> bool:
    """Record an observed connection state (anything but open/close/connecting is 'error').

    ``observed_at`` (default now): when it was observed; an observation older than the one the
    inbox holds is ignored (R-IN-8: a late event never undoes a newer poll). True when stored.
    """
    state = state if state in ("open", "close", "connecting") else "error"
    row = _one(
        """UPDATE inboxes SET connection_state = %(state)s, state_checked_at = coalesce(%(at)s, now()),
                disconnected_since = CASE WHEN %(state)s = 'open' THEN NULL
                                          ELSE coalesce(disconnected_since, coalesce(%(at)s, now())) END
            WHERE id = %(id)s AND (state_checked_at IS NULL OR state_checked_at <= coalesce(%(at)s, now()))
            RETURNING id""",
        {"state": state, "at": observed_at, "id": inbox_id},
    )
    return row is not None


def resume_reconnected(inbox_id: int, *, wake: bool = True, was_down: bool = True) -> list[int]:
    """The inbox is open again: resume the runs of its pools paused for a down inbox now that a member
    can send (E-07, R-POOL-3), re-plan its messages that waited for it in running runs (``was_down``:
    only when it really was down; an open inbox polled open again keeps its schedule), and wake its
    parked started messages (E-24; ``wake=False``: the caller wakes many inboxes at once). Returns
    the resumed runs."""
    resumed = runs.resume_runs_that_can_send([inbox_id])
    if was_down:
        failover.member_back(inbox_id)
    if wake:
        wake_parked([inbox_id])
    return resumed


def mark_disconnected(inbox_id: int) -> None:
    """A send found the inbox disconnected: note since when (the health check confirms the state)."""
    _one(
        """UPDATE inboxes SET disconnected_since = coalesce(disconnected_since, now()),
                connection_state = CASE WHEN connection_state = 'open' THEN 'close' ELSE connection_state END
            WHERE id = %s RETURNING id""",
        (inbox_id,),
    )


def wake_parked(inbox_ids: Sequence[int]) -> int:
    """Inboxes usable again: their parked started messages are due now (the next sweep re-publishes
    them, E-24), in one statement; returns how many."""
    if not inbox_ids:
        return 0
    rows = _all(
        """UPDATE campaign_messages SET wake_at = now()
                   WHERE inbox_id = ANY(%s) AND status = 'sending' AND wake_at > now() RETURNING id""",
        (list(inbox_ids),),
    )
    if rows:
        log.info("inboxes %s usable again: %s parked message(s) woken", list(inbox_ids), len(rows))
    return len(rows)
