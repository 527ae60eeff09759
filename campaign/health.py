"""Number health (SPEC §4.6c R-HEALTH-2, R-HEALTH-3, E-35): ``healthy`` -> ``throttled`` -> ``restricted``.

WhatsApp limits or bans a number that keeps sending through a wave of delivery errors. The engine
watches what each number experiences in a sliding hour — delivery ``ERROR`` receipts
(``message_parts.delivery_error_at``) and sends the number itself refused (``inbox_refusals``:
401/403/404 of the instance, "Connection Closed" while it says open; never gateway trouble) — and
slows it down by itself:

============  =====================================================  ===================================
state         entered when (sliding hour, both conditions)             effect
============  =====================================================  ===================================
healthy       the cool-down ended with no new problem, or             none
              ``cli.py inbox enable``
throttled     >= HEALTH_THROTTLE_ERRORS problems and >= HEALTH_          caps halved, minimum gap doubled
              THROTTLE_RATIO of the hour's attempts                    (``campaign.capacity``)
restricted    >= HEALTH_RESTRICT_ERRORS and >= HEALTH_RESTRICT_RATIO   no send starts: runs pause
                                                                       ``inbox_restricted`` (or fail over),
                                                                       alert ``inbox_restricted``
============  =====================================================  ===================================

The cool-down (``HEALTH_COOLDOWN_HOURS``) runs from the LAST problem: every new one pushes its end
(``health_until``) further. ``disabled`` (R-FAIL-6) stays a separate flag and wins over all of these.

:func:`decide` is the whole state machine: pure, table-driven (:data:`TRANSITIONS`), unit-tested.
:func:`evaluate` is its database glue: one inbox, one transaction (the inbox row locked first, then
its runs: the order of ``inbox enable|disable``), a ``campaign_events`` row with the evidence on
every change. Where it runs:

* right after a delivery ``ERROR`` receipt commits (:func:`after_receipts`, called by the RabbitMQ
  consumer and the webhook OUTSIDE the receipts' transaction, which must never take run rows) and
  right after a send refusal (the send step): a state changes within the event that caused it;
* in the scheduler's inbox health job (:func:`sweep`, every ``INBOX_HEALTH_INTERVAL_SECONDS``):
  the cool-down ends by time alone, and an evaluation lost to a crash between commit and
  evaluation is caught up there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import peewee
import psycopg2

from campaign import failover, runs
from campaign.db import db
from campaign.settings import Settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_named as _named
from campaign.sql import fetch_one as _one

log = logging.getLogger(__name__)

__all__ = [
    "STATES",
    "WINDOW",
    "REPLY_WINDOW",
    "TRANSITIONS",
    "Thresholds",
    "Evidence",
    "Decision",
    "Transition",
    "ReplyRatio",
    "decide",
    "evaluate",
    "after_receipts",
    "record_refusal",
    "sweep",
    "reset",
    "resume_unrestricted_runs",
    "reply_ratios",
    "can_send",
]

UTC = dt.UTC
STATES = ("healthy", "throttled", "restricted")
#: the sliding window the evidence is counted in
WINDOW = dt.timedelta(hours=1)
#: R-HEALTH-3: the reply ratio's window
REPLY_WINDOW = dt.timedelta(days=7)
#: the pause reason of runs whose inbox is restricted
PAUSE_REASON = "inbox_restricted"


@dataclass(frozen=True)
class Thresholds:
    """The settings of R-HEALTH-2."""

    throttle_errors: int = 5
    throttle_ratio: float = 0.05
    restrict_errors: int = 15
    restrict_ratio: float = 0.15
    cooldown: dt.timedelta = dt.timedelta(hours=24)

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        """The thresholds ``settings`` carries (HEALTH_* variables)."""
        return cls(
            settings.health_throttle_errors,
            settings.health_throttle_ratio,
            settings.health_restrict_errors,
            settings.health_restrict_ratio,
            dt.timedelta(hours=settings.health_cooldown_hours),
        )


@dataclass(frozen=True)
class Evidence:
    """What an inbox experienced in ``[start, end]``: delivery errors, refused sends, sends."""

    errors: int
    refusals: int
    sends: int
    start: dt.datetime
    end: dt.datetime
    last_problem_at: dt.datetime | None = None

    @property
    def problems(self) -> int:
        """Delivery errors + refused sends."""
        return self.errors + self.refusals

    @property
    def attempts(self) -> int:
        """The hour's sends and refusals (never fewer than the problems: a receipt may trail its send's hour)."""
        return max(self.sends + self.refusals, self.problems)

    @property
    def ratio(self) -> float:
        """Problems ÷ attempts (0 when nothing happened)."""
        return self.problems / self.attempts if self.attempts else 0.0

    def details(self) -> dict[str, Any]:
        """The evidence as the ``campaign_events`` row keeps it."""
        return {
            "errors": self.errors,
            "refusals": self.refusals,
            "sends": self.sends,
            "problems": self.problems,
            "ratio": round(self.ratio, 4),
            "window_start": self.start.isoformat(),
            "window_end": self.end.isoformat(),
            "last_problem_at": self.last_problem_at.isoformat() if self.last_problem_at else None,
        }


def _over(evidence: Evidence, errors: int, ratio: float) -> bool:
    return evidence.problems >= errors and evidence.ratio >= ratio


def _restrict(ev: Evidence, now: dt.datetime, until: dt.datetime | None, th: Thresholds) -> bool:
    return _over(ev, th.restrict_errors, th.restrict_ratio)


def _throttle(ev: Evidence, now: dt.datetime, until: dt.datetime | None, th: Thresholds) -> bool:
    return _over(ev, th.throttle_errors, th.throttle_ratio)


def _cooled(ev: Evidence, now: dt.datetime, until: dt.datetime | None, th: Thresholds) -> bool:
    quiet = ev.last_problem_at is None or ev.last_problem_at + th.cooldown <= now
    return (until is None or until <= now) and quiet


Check = Callable[[Evidence, dt.datetime, "dt.datetime | None", Thresholds], bool]

#: the state machine: (from, check, to); the first row of the current state whose check holds wins
TRANSITIONS: tuple[tuple[str, str, str], ...] = (
    ("healthy", "restrict", "restricted"),
    ("healthy", "throttle", "throttled"),
    ("throttled", "restrict", "restricted"),
    ("throttled", "cooled", "healthy"),
    ("restricted", "cooled", "healthy"),
)
CHECKS: dict[str, Check] = {"restrict": _restrict, "throttle": _throttle, "cooled": _cooled}


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` says: the state, its cool-down end, why; ``changed``: a transition."""

    state: str
    until: dt.datetime | None
    reason: str | None
    changed: bool
    check: str | None = None


def _reason(check: str, ev: Evidence, th: Thresholds) -> str:
    counted = f"{ev.errors} delivery error(s) + {ev.refusals} refused send(s) of {ev.attempts} attempt(s)"
    if check == "cooled":
        return f"cool-down of {th.cooldown.total_seconds() / 3600:g} h ended with no new error"
    limit = (th.restrict_errors, th.restrict_ratio) if check == "restrict" else (th.throttle_errors, th.throttle_ratio)
    return f"{counted} in the last hour ({ev.ratio:.0%}; limit {limit[0]} and {limit[1]:.0%})"


def decide(state: str, until: dt.datetime | None, evidence: Evidence, now: dt.datetime, th: Thresholds) -> Decision:
    """The next health state of an inbox in ``state`` (cool-down ending ``until``) given ``evidence``.

    Pure. A transition to ``throttled``/``restricted`` starts a cool-down ending ``th.cooldown``
    after the last problem; staying throttled/restricted pushes that end with every new problem.
    """
    if state not in STATES:
        raise ValueError(f"unknown health state {state!r} (known: {', '.join(STATES)})")
    for frm, check, to in TRANSITIONS:
        if frm == state and CHECKS[check](evidence, now, until, th):
            if to == "healthy":
                return Decision(to, None, _reason(check, evidence, th), True, check)
            last = evidence.last_problem_at or now
            return Decision(to, max(now, last) + th.cooldown, _reason(check, evidence, th), True, check)
    if state != "healthy" and evidence.last_problem_at is not None:
        pushed = evidence.last_problem_at + th.cooldown
        if until is None or pushed > until:
            return Decision(state, pushed, None, False)
    return Decision(state, until, None, False)


def can_send(disabled: bool, state: str) -> bool:
    """Whether the number may send at all (not disabled, not restricted): :data:`campaign.sql.INBOX_CAN_SEND`
    adds the connection state."""
    return not disabled and state != "restricted"


# ------------------------------------------------------------------------------------------------
# database glue
# ------------------------------------------------------------------------------------------------

_INBOX_SQL = """
    SELECT i.id, w.name || '/' || i.name AS label, i.health_state, i.health_until, i.health_counted_from,
           coalesce(%(now)s::timestamptz, now()) AS now
      FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
     WHERE i.id = %(id)s
       FOR UPDATE OF i"""

# One statement, three index ranges: errors (partial index V10), refusals (V10), sends (V3).
_EVIDENCE_SQL = """
    SELECT (SELECT count(*) FROM message_parts p WHERE p.inbox_id = %(id)s AND p.delivery_error_at IS NOT NULL
              AND p.delivery_error_at > %(start)s AND p.delivery_error_at <= %(end)s) AS errors,
           (SELECT max(p.delivery_error_at) FROM message_parts p WHERE p.inbox_id = %(id)s
              AND p.delivery_error_at IS NOT NULL AND p.delivery_error_at <= %(end)s) AS last_error,
           (SELECT count(*) FROM inbox_refusals r WHERE r.inbox_id = %(id)s
              AND r.at > %(start)s AND r.at <= %(end)s) AS refusals,
           (SELECT max(r.at) FROM inbox_refusals r WHERE r.inbox_id = %(id)s AND r.at <= %(end)s) AS last_refusal,
           (SELECT count(*) FROM message_parts p WHERE p.inbox_id = %(id)s
              AND p.status IN ('sent', 'in_doubt', 'sending')
              AND p.sending_at > %(start)s AND p.sending_at <= %(end)s) AS sends"""


def _evidence(inbox_id: int, now: dt.datetime, counted_from: dt.datetime | None) -> Evidence:
    start = now - WINDOW if counted_from is None else max(now - WINDOW, counted_from)
    row = _named(_EVIDENCE_SQL, {"id": inbox_id, "start": start, "end": now})
    assert row is not None
    lasts = [t for t in (row["last_error"], row["last_refusal"]) if t is not None]
    if counted_from is not None:
        lasts = [t for t in lasts if t > counted_from]
    return Evidence(
        int(row["errors"]), int(row["refusals"]), int(row["sends"]), start, now, max(lasts) if lasts else None
    )


@dataclass(frozen=True)
class Transition:
    """A health change of one inbox, as recorded."""

    inbox_id: int
    label: str
    old: str
    new: str
    until: dt.datetime | None
    reason: str
    evidence: Evidence
    paused: list[int]
    resumed: list[int]


def evaluate(inbox_id: int, settings: Settings, *, now: dt.datetime | None = None) -> Transition | None:
    """Decide the inbox's health from its evidence and record a change (one transaction); None: no change.

    ``now`` (default: the database's clock) lets a test advance time past a cool-down.
    """
    th = Thresholds.of(settings)
    with db.atomic():
        row = _named(_INBOX_SQL, {"id": inbox_id, "now": now})
        if row is None:
            return None
        at: dt.datetime = row["now"]
        evidence = _evidence(inbox_id, at, row["health_counted_from"])
        decision = decide(row["health_state"], row["health_until"], evidence, at, th)
        if not decision.changed:
            if decision.until != row["health_until"]:
                _one("UPDATE inboxes SET health_until = %s WHERE id = %s RETURNING id", (decision.until, inbox_id))
            return None
        return _record(row["id"], row["label"], row["health_state"], decision, evidence, at)


def _record(inbox_id: int, label: str, old: str, decision: Decision, evidence: Evidence, at: dt.datetime) -> Transition:
    """Store a transition, pause or resume the inbox's runs, and write the event row (caller's transaction)."""
    reason = decision.reason or ""
    _one(
        """UPDATE inboxes SET health_state = %s, health_since = %s, health_until = %s,
                  health_reason = %s WHERE id = %s RETURNING id""",
        (decision.state, at, decision.until, None if decision.state == "healthy" else reason, inbox_id),
    )
    paused: list[int] = []
    resumed: list[int] = []
    if decision.state == "restricted":
        # a pool with a member that can send goes on: the scheduler's failover job moves this one's
        # not-started messages (R-POOL-3); a pool with none left pauses
        paused = runs.pause_inbox_runs(inbox_id, PAUSE_REASON)
    elif old == "restricted":
        resumed = resume_unrestricted_runs(inbox_id)
        failover.member_back(inbox_id)  # its messages that waited for it take their place again
    level = {"restricted": "error", "throttled": "warning"}.get(decision.state, "info")
    text = f"inbox {label} {old} -> {decision.state}: {reason}"
    details = {
        "inbox_id": inbox_id,
        "inbox": label,
        "action": "health",
        "from": old,
        "to": decision.state,
        "check": decision.check,
        "until": decision.until.isoformat() if decision.until else None,
        "evidence": evidence.details(),
        "paused_runs": paused,
        "resumed_runs": resumed,
    }
    db.execute_sql(
        "INSERT INTO campaign_events (step, level, text, details) VALUES ('health', %s, %s, %s)",
        (level, text, json.dumps(details)),
    )
    getattr(log, {"error": "error", "warning": "warning"}.get(level, "info"))(
        "inbox %s (id %s) %s -> %s: %s; paused runs %s, resumed runs %s",
        label,
        inbox_id,
        old,
        decision.state,
        reason,
        paused,
        resumed,
    )
    return Transition(inbox_id, label, old, decision.state, decision.until, reason, evidence, paused, resumed)


def resume_unrestricted_runs(inbox_id: int | None = None) -> list[int]:
    """Resume runs paused for a down inbox (``inbox_restricted`` among them) whose pool can send again
    (of the pools holding ``inbox_id``; None: every one): :func:`campaign.runs.resume_runs_that_can_send`."""
    return runs.resume_runs_that_can_send(None if inbox_id is None else [inbox_id])


def record_refusal(inbox_id: int, code: str, settings: Settings) -> Transition | None:
    """A send this number refused (R-FAIL-6's real failures): keep it as evidence, then evaluate."""
    _one("INSERT INTO inbox_refusals (inbox_id, code) VALUES (%s, %s) RETURNING id", (inbox_id, code[:100]))
    return evaluate(inbox_id, settings)


_DB_ERRORS = (peewee.PeeweeException, psycopg2.Error)


def after_receipts(instances: Iterable[str], settings: Settings) -> list[Transition]:
    """Evaluate the inboxes of ``instances`` after their delivery ``ERROR`` receipts committed.

    Never raises a database error: the receipts are recorded; the scheduler's :func:`sweep`
    catches up what this could not do.
    """
    names = sorted(set(instances))
    if not names:
        return []
    out: list[Transition] = []
    try:
        for (inbox_id,) in _all("SELECT id FROM inboxes WHERE instance_name = ANY(%s) ORDER BY id", (names,)):
            change = evaluate(inbox_id, settings)
            if change is not None:
                out.append(change)
    except _DB_ERRORS as exc:
        log.warning("health of %s not evaluated after their receipts (%s): the sweep will", names, type(exc).__name__)
    return out


# Inboxes worth a look: not healthy (a cool-down may have ended), or with a problem in the window.
_SWEEP_SQL = """
    SELECT i.id FROM inboxes i
     WHERE i.health_state <> 'healthy'
        OR EXISTS (SELECT 1 FROM message_parts p WHERE p.inbox_id = i.id AND p.delivery_error_at IS NOT NULL
                     AND p.delivery_error_at > %(start)s)
        OR EXISTS (SELECT 1 FROM inbox_refusals r WHERE r.inbox_id = i.id AND r.at > %(start)s)
     ORDER BY i.id"""


def sweep(settings: Settings, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The scheduler's pass: evaluate every inbox that is not healthy or had a problem in the window;
    resume runs paused ``inbox_restricted`` whose pool has nothing restricted left (a pause that
    raced a recovery)."""
    start = (now or dt.datetime.now(UTC)) - WINDOW
    changes = [evaluate(inbox_id, settings, now=now) for (inbox_id,) in _all(_SWEEP_SQL, {"start": start})]
    resumed = resume_unrestricted_runs()
    # refusals older than any cool-down can still need (the longest setting is 30 days) are no evidence
    purged = _all(
        "DELETE FROM inbox_refusals WHERE at < now() - make_interval(secs => %s) RETURNING id",
        ((settings.health_cooldown_hours + 24) * 3600,),
    )
    done = [c for c in changes if c is not None]
    return {
        "health_changes": [f"{c.label}: {c.old} -> {c.new}" for c in done],
        "resumed_unrestricted": resumed,
        "refusals_purged": len(purged),
    }


def reset(inbox_id: int) -> str | None:
    """An operator's ``inbox enable``: back to healthy at once, the problems so far forgiven (the
    caller's transaction holds the inbox row); returns the state it left, None when healthy."""
    row = _one("SELECT health_state FROM inboxes WHERE id = %s", (inbox_id,))
    if row is None or row[0] == "healthy":
        return None
    _one(
        """UPDATE inboxes SET health_state = 'healthy', health_since = now(), health_until = NULL,
                  health_reason = NULL, health_counted_from = now() WHERE id = %s RETURNING id""",
        (inbox_id,),
    )
    return str(row[0])


# ------------------------------------------------------------------------------------------------
# R-HEALTH-3: reply ratio
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyRatio:
    """Of the leads an inbox messaged in the window, how many replied on it."""

    messaged: int
    replied: int

    @property
    def ratio(self) -> float | None:
        """Replied ÷ messaged (None when it messaged nobody)."""
        return self.replied / self.messaged if self.messaged else None

    def text(self) -> str:
        """``12 % (3/25)`` or ``-``."""
        return "-" if self.ratio is None else f"{self.ratio:.0%} ({self.replied}/{self.messaged})"


# Per inbox: the distinct leads it sent a part to in the window, and those of them who wrote to it
# (a reply or an opt-out) in the window. The sends come from the (inbox_id, sending_at) index.
_REPLY_SQL = """
    SELECT i.id, count(s.lead_id) AS messaged,
           count(s.lead_id) FILTER (WHERE EXISTS (
               SELECT 1 FROM inbound_events e WHERE e.inbox_id = i.id AND e.lead_id = s.lead_id
                  AND e.outcome IN ('reply', 'opt_out') AND e.created_at > %(since)s)) AS replied
      FROM inboxes i
      LEFT JOIN LATERAL (
          SELECT DISTINCT m.lead_id FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
           WHERE p.inbox_id = i.id AND p.status = 'sent' AND p.sending_at > %(since)s
             AND m.lead_id IS NOT NULL) s ON true
     WHERE %(ids)s::bigint[] IS NULL OR i.id = ANY(%(ids)s::bigint[])
     GROUP BY i.id"""


def reply_ratios(inbox_ids: Iterable[int] | None = None, *, now: dt.datetime | None = None) -> dict[int, ReplyRatio]:
    """R-HEALTH-3: per inbox (all, or ``inbox_ids``), replies ÷ leads messaged in the last 7 days."""
    since = (now or dt.datetime.now(UTC)) - REPLY_WINDOW
    ids = None if inbox_ids is None else list(inbox_ids)
    rows = _all(_REPLY_SQL, {"since": since, "ids": ids})
    return {int(i): ReplyRatio(int(m), int(r)) for i, m, r in rows}
