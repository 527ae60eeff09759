"""Operator read models: ``status`` snapshot, ``verify`` (counters vs rows) and alerts (R-OPS-1, R-OPS-4).

Everything here only reads (no state changes), so ``status --watch`` can poll it freely. Queue
depths come from RabbitMQ with a passive ``queue_declare`` per queue (a queue that does not exist
yet shows 0); RabbitMQ being unreachable is shown, never fatal: PostgreSQL is the truth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field

from campaign import capacity, failover, health, steps
from campaign.db import db
from campaign.health import ReplyRatio
from campaign.inboxes import InboxRow, list_inboxes
from campaign.ops import triage_view
from campaign.settings import Settings, amqp_parameters, redact_url

log = logging.getLogger(__name__)

__all__ = [
    "RunStatus",
    "MemberStatus",
    "pool_members",
    "MessageLine",
    "Alert",
    "Mismatch",
    "Inconsistency",
    "Finding",
    "StatusSnapshot",
    "Listening",
    "listening",
    "status_snapshot",
    "queue_depths",
    "queue_names",
    "verify",
    "alerts",
    "log_alerts",
    "STUCK_AFTER",
    "HEARTBEAT_STALE_AFTER",
    "INBOX_DOWN_AFTER",
    "ALERT_FAILURE_RATIO",
    "SCHEDULER_HEARTBEAT_NAME",
]

UTC = dt.UTC
STUCK_AFTER = dt.timedelta(hours=2)  # R-OPS-4: messages stuck > 2 h
HEARTBEAT_STALE_AFTER = dt.timedelta(minutes=2)  # R-OPS-4: scheduler heartbeat older than 2 min
INBOX_DOWN_AFTER = dt.timedelta(minutes=30)  # R-OPS-4: inbox disconnected > 30 min
ALERT_FAILURE_RATIO = 0.10  # R-OPS-4: run failure ratio > 10 %
ALERT_MIN_PROCESSED = 10  # ... once a run has processed this many (1 of 1 is noise)
SCHEDULER_HEARTBEAT_NAME = "scheduler"
SYSTEM_QUEUE = "campaign.system"
LIST_LIMIT = 50  # in-doubt / failed lines shown by status
LISTENING_RECENT = dt.timedelta(hours=24)  # the "last 24 h" column of the listening section
IN_FLIGHT = ("queued", "generating", "splitting", "sending")


@dataclass(frozen=True)
class RunStatus:
    """One active (running/paused) run with its counters."""

    id: int
    campaign: str  # workspace/campaign
    run_date: dt.date
    status: str
    pause_reason: str | None
    manual: bool
    total: int
    processed: int
    sent: int
    failed: int
    skipped: int
    in_doubt: int
    overflow: int
    pending: int
    in_flight: int
    next_at: dt.datetime | None
    started_at: dt.datetime | None
    #: leads of the source column left out when the run was planned (R-SEQ): too recent, replied,
    #: opted out (campaign.sequence.EXCLUSION_RULES)
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Processed / total (1.0 for an empty run)."""
        return self.processed / self.total if self.total else 1.0


@dataclass(frozen=True)
class MessageLine:
    """A message the operator must look at (in doubt, failed)."""

    id: int
    run_id: int
    campaign: str
    lead_id: int | None
    phone: str | None
    status: str
    error: str | None
    at: dt.datetime | None


@dataclass(frozen=True)
class Alert:
    """An R-OPS-4 alert: ``kind`` is stable (stuck_messages, failure_ratio, scheduler_heartbeat,
    inbox_disconnected, inbox_restricted (R-HEALTH-2), dead_letters); ``text`` is for humans."""

    kind: str
    text: str


@dataclass(frozen=True)
class Mismatch:
    """A run counter that disagrees with the message rows."""

    run_id: int
    field: str
    counter: int | str
    actual: int | str

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.field} = {self.counter} but the rows say {self.actual}"


@dataclass(frozen=True)
class Inconsistency:
    """Rows a correct engine never leaves: a message and its parts that disagree, a finished run left open."""

    run_id: int
    message_id: int | None
    problem: str

    def __str__(self) -> str:
        where = f"run {self.run_id}" + (f" message {self.message_id}" if self.message_id is not None else "")
        return f"{where}: {self.problem}"


#: what ``verify`` reports
Finding = Mismatch | Inconsistency


@dataclass(frozen=True)
class Listening:
    """What the engine heard (R-IN): inbound messages by outcome, last 24 h and in total.

    ``replies`` counts every message a lead wrote (opt-outs included); ``unknown`` the messages from
    numbers that are no lead of the inbox's workspace (R-IN-2, E-32); ``unusable`` the events the
    consumer could not use and recorded as poison (R-IN-1); ``last_at`` the newest inbound message
    event (a listener that went quiet shows here first).
    """

    replies_24h: int
    replies_total: int
    opt_outs_24h: int
    opt_outs_total: int
    unknown_24h: int
    unknown_total: int
    unusable_24h: int
    unusable_total: int
    last_at: dt.datetime | None


@dataclass(frozen=True)
class MemberStatus:
    """One inbox of the sender pool of a run in progress (R-POOL-4)."""

    run_id: int
    inbox_id: int
    inbox: str  # workspace/name
    assigned: int  # the run's messages on it now (moved-in included, moved-away not)
    sent: int
    failed: int
    moved_away: int  # not-started messages pool failovers handed to the other members (R-POOL-3)
    state: str  # failover.member_state


# Every member of the pools of the given runs with its share, one aggregate over their messages
# (grouped once, not a count per member), in the pool's order.
_MEMBERS_SQL = """
    WITH mm AS (SELECT run_id, inbox_id, count(*) AS assigned, count(*) FILTER (WHERE status = 'sent') AS sent,
                       count(*) FILTER (WHERE status = 'failed') AS failed
                  FROM campaign_messages WHERE run_id = ANY(%(runs)s) GROUP BY run_id, inbox_id)
    SELECT r.id, i.id, w.name || '/' || i.name, coalesce(mm.assigned, 0), coalesce(mm.sent, 0),
           coalesce(mm.failed, 0), i.disabled, i.connection_state
      FROM campaign_runs r
      JOIN campaign_config_inboxes p ON p.config_id = r.config_id
      JOIN inboxes i ON i.id = p.inbox_id
      JOIN workspaces w ON w.id = i.workspace_id
      LEFT JOIN mm ON mm.run_id = r.id AND mm.inbox_id = i.id
     WHERE r.id = ANY(%(runs)s)
     ORDER BY r.id, p.position"""


def pool_members(run_ids: list[int]) -> list[MemberStatus]:
    """Per run and member of its pool: assigned, sent, failed, moved away, state (R-POOL-4)."""
    if not run_ids:
        return []
    moved = failover.moved_away(run_ids)
    return [
        MemberStatus(
            run_id=int(r),
            inbox_id=int(i),
            inbox=label,
            assigned=int(assigned),
            sent=int(sent),
            failed=int(failed),
            moved_away=moved.get((int(r), int(i)), 0),
            state=failover.member_state(bool(disabled), conn),
        )
        for r, i, label, assigned, sent, failed, disabled, conn in db.execute_sql(
            _MEMBERS_SQL, {"runs": [int(x) for x in run_ids]}
        ).fetchall()
    ]


@dataclass
class StatusSnapshot:
    """Everything ``status`` shows."""

    taken_at: dt.datetime
    runs: list[RunStatus]
    queues: dict[str, int | None]
    queue_error: str | None
    in_doubt: list[MessageLine]
    failed: list[MessageLine]
    alerts: list[Alert] = field(default_factory=list)
    listening: Listening | None = None
    members: list[MemberStatus] = field(default_factory=list)  # the pools of the runs in progress (R-POOL-4)
    capacity_days: list[capacity.InboxDay] = field(default_factory=list)  # each inbox's day (issue 22, R-HEALTH-1)
    #: reply triage (R-IN-5): (last 24 h, total); None when no reply was ever triaged
    triage: tuple[triage_view.TriageSummary, triage_view.TriageSummary] | None = None
    #: every inbox with its state and caps (R-HEALTH-4) and its 7-day reply ratio (R-HEALTH-3)
    inboxes: list[InboxRow] = field(default_factory=list)
    reply_ratios: dict[int, ReplyRatio] = field(default_factory=dict)


_RUNS_SQL = """
    SELECT r.id, w.name || '/' || c.name, r.run_date, r.status, r.pause_reason, r.manual, r.leads_total,
           r.leads_processed, r.leads_sent, r.leads_failed, r.leads_skipped, r.leads_in_doubt, r.leads_overflow,
           coalesce(m.pending, 0), coalesce(m.in_flight, 0), m.next_at, r.started_at,
           r.excluded_too_recent, r.excluded_replied, r.excluded_opted_out
      FROM campaign_runs r
      JOIN campaign_configs c ON c.id = r.config_id
      JOIN workspaces w ON w.id = c.workspace_id
      LEFT JOIN LATERAL (
          SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                 count(*) FILTER (WHERE status IN ('queued', 'generating', 'splitting', 'sending')) AS in_flight,
                 min(scheduled_at) FILTER (WHERE status = 'pending') AS next_at
            FROM campaign_messages WHERE run_id = r.id) m ON true
     WHERE r.status IN ('planning', 'running', 'paused')
     ORDER BY r.id"""

_MESSAGES_SQL = """
    SELECT m.id, m.run_id, w.name || '/' || c.name, m.lead_id, l.phone, m.status,
           coalesce(m.error_class || ': ', '') || coalesce(m.error_message, ''), m.finished_at
      FROM campaign_messages m
      JOIN campaign_runs r ON r.id = m.run_id
      JOIN campaign_configs c ON c.id = r.config_id
      JOIN workspaces w ON w.id = c.workspace_id
      LEFT JOIN leads l ON l.id = m.lead_id
     WHERE m.status = %s {extra}
     ORDER BY m.finished_at DESC NULLS LAST, m.id DESC
     LIMIT %s"""


def _lines(status: str, extra: str = "") -> list[MessageLine]:
    rows = db.execute_sql(_MESSAGES_SQL.format(extra=extra), (status, LIST_LIMIT)).fetchall()
    return [
        MessageLine(
            id=r[0], run_id=r[1], campaign=r[2], lead_id=r[3], phone=r[4], status=r[5], error=r[6] or None, at=r[7]
        )
        for r in rows
    ]


def queue_names() -> list[str]:
    """Every pipeline queue (campaign.*) and its .DQ / .XQ twins."""
    names: list[str] = []
    for q in (*steps.QUEUES, *steps.JOB_QUEUES, SYSTEM_QUEUE):
        names += [q, f"{q}.DQ", f"{q}.XQ"]
    return names


def queue_depths(
    settings: Settings, names: list[str] | None = None, timeout: float = 3.0
) -> tuple[dict[str, int | None], str | None]:
    """Ready-message count per queue (0 when the queue does not exist); (all None, error) if unreachable."""
    names = names or queue_names()
    depths: dict[str, int | None] = {n: None for n in names}
    # pika logs every 404 of a passive declare as a WARNING and a refused connection as a page of
    # ERRORs; both are reported here in one line (a missing queue is simply 0)
    channel_log = logging.getLogger("pika")
    saved_level = channel_log.level
    channel_log.setLevel(logging.CRITICAL)
    try:
        return _read_depths(settings, names, depths, timeout)
    finally:
        channel_log.setLevel(saved_level)


def _read_depths(
    settings: Settings, names: list[str], depths: dict[str, int | None], timeout: float
) -> tuple[dict[str, int | None], str | None]:
    import pika
    from pika.exceptions import AMQPError, ChannelClosedByBroker

    try:
        params = amqp_parameters(  # every node of RABBITMQ_URL, tried in order (R-SCALE-2)
            settings.rabbitmq_url,
            socket_timeout=timeout,
            blocked_connection_timeout=timeout,
            connection_attempts=1,
            stack_timeout=timeout,
        )
        conn = pika.BlockingConnection(params)
    except (AMQPError, OSError) as exc:
        return depths, f"RabbitMQ unreachable at {redact_url(settings.rabbitmq_url)}: {type(exc).__name__}"
    try:
        channel = conn.channel()
        for name in names:
            try:
                depths[name] = channel.queue_declare(queue=name, passive=True).method.message_count
            except ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                depths[name] = 0  # not declared yet: nothing in it
                channel = conn.channel()
    except AMQPError as exc:
        return depths, f"RabbitMQ error while reading queue depths: {type(exc).__name__}"
    finally:
        try:
            conn.close()
        except AMQPError:
            pass
    return depths, None


# One statement, one round trip. The last 24 h come from the created_at index (a range of it);
# the totals have to count every inbound event (about 0.15 s per million rows: they are what an
# operator asks "how many so far"); the unusable events come from a partial index holding only
# them (schema V8), never a scan of the whole event log.
_LISTENING_SQL = """
    SELECT d.replies, t.replies, d.opt_outs, t.opt_outs, d.unknown, t.unknown, p.recent, p.total,
           (SELECT max(created_at) FROM inbound_events)
      FROM (SELECT count(*) FILTER (WHERE outcome IN ('reply', 'opt_out')) AS replies,
                   count(*) FILTER (WHERE outcome = 'opt_out') AS opt_outs,
                   count(*) FILTER (WHERE outcome = 'unknown_sender') AS unknown
              FROM inbound_events WHERE created_at >= %(since)s) d,
           (SELECT count(*) FILTER (WHERE outcome IN ('reply', 'opt_out')) AS replies,
                   count(*) FILTER (WHERE outcome = 'opt_out') AS opt_outs,
                   count(*) FILTER (WHERE outcome = 'unknown_sender') AS unknown
              FROM inbound_events) t,
           (SELECT count(*) FILTER (WHERE created_at >= %(since)s) AS recent, count(*) AS total
              FROM campaign_events WHERE step = 'inbound' AND level = 'error') p"""


def listening(*, now: dt.datetime | None = None) -> Listening:
    """Replies, opt-outs, unknown senders and unusable events: last 24 h and total (one query)."""
    now = now or dt.datetime.now(UTC)
    row = db.execute_sql(_LISTENING_SQL, {"since": now - LISTENING_RECENT}).fetchone()
    counts = [int(v) for v in row[:8]]
    return Listening(
        replies_24h=counts[0],
        replies_total=counts[1],
        opt_outs_24h=counts[2],
        opt_outs_total=counts[3],
        unknown_24h=counts[4],
        unknown_total=counts[5],
        unusable_24h=counts[6],
        unusable_total=counts[7],
        last_at=row[8],
    )


def status_snapshot(settings: Settings, *, with_queues: bool = True, now: dt.datetime | None = None) -> StatusSnapshot:
    """Runs in progress, queue depths, in-doubt and failed messages, what was heard, alerts."""
    now = now or dt.datetime.now(UTC)
    runs = [
        dataclasses.replace(RunStatus(*r[:-3]), excluded={"too_recent": r[-3], "replied": r[-2], "opted_out": r[-1]})
        for r in db.execute_sql(_RUNS_SQL).fetchall()
    ]
    active = [r.id for r in runs]
    # in doubt: every unresolved one (the operator must decide); failed: those of active runs
    in_doubt = _lines("in_doubt")
    failed = _lines("failed", "AND r.status IN ('planning', 'running', 'paused')") if active else []
    queues, queue_error = queue_depths(settings) if with_queues else ({}, None)
    snap = StatusSnapshot(now, runs, queues, queue_error, in_doubt, failed)
    snap.members = pool_members(active)
    snap.listening = listening(now=now)
    snap.capacity_days = capacity.inbox_days()
    recent, total = triage_view.since(now - LISTENING_RECENT), triage_view.since(None)
    snap.triage = None if total.empty else (recent, total)
    snap.inboxes = list_inboxes()
    snap.reply_ratios = health.reply_ratios(now=now)
    snap.alerts = alerts(settings, now=now)
    return snap


_VERIFY_SQL = """
    SELECT r.id, r.status, r.leads_total, r.leads_processed, r.leads_sent, r.leads_failed, r.leads_skipped,
           r.leads_in_doubt,
           count(m.id),
           count(m.id) FILTER (WHERE m.status IN ('sent', 'failed', 'skipped', 'in_doubt')),
           count(m.id) FILTER (WHERE m.status = 'sent'),
           count(m.id) FILTER (WHERE m.status = 'failed'),
           count(m.id) FILTER (WHERE m.status = 'skipped'),
           count(m.id) FILTER (WHERE m.status = 'in_doubt')
      FROM campaign_runs r LEFT JOIN campaign_messages m ON m.run_id = r.id
     GROUP BY r.id
     ORDER BY r.id"""


# Message <-> part combinations no transition of pipeline.py (nor resolve / requeue) ever commits,
# one row per offending part (one join, not a query per message):
# - a part `sending` is a send in flight: its message is `sending` (every step that moves a
#   message elsewhere settles the part first, R-PIPE-3 / E-25);
# - a part `in_doubt` makes its message `in_doubt` in the same transaction, and only `resolve`
#   turns both back (R-FAIL-4);
# - a part `sent` means the message started: it is `sending` or terminal, never back in
#   `pending`..`splitting` (R-IN-3 calls those "not started") and never `skipped` (R-DISP-4:
#   a started message finishes; a reply ends it `sent`);
# - a `sent` message has no part left to send (`skipped` parts: a reply stopped the rest, R-IN-3).
# Legitimate and NOT reported: `failed` with parts sent (lead opted out mid-message, a permanent
# error at part 2), `in_doubt` with parts sent or pending, any status with pending/failed parts.
_PART_PROBLEMS_SQL = """
    SELECT m.run_id, m.id, m.status, p.idx, p.status
      FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
     WHERE (p.status = 'sending' AND m.status <> 'sending')
        OR (p.status = 'in_doubt' AND m.status <> 'in_doubt')
        OR (p.status = 'sent' AND m.status IN ('pending', 'queued', 'generating', 'splitting', 'skipped'))
        OR (m.status = 'sent' AND p.status NOT IN ('sent', 'skipped'))
     ORDER BY m.run_id, m.id, p.idx"""

# An in-doubt message is one whose part's outcome is unknown: without such a part there is
# nothing for `resolve` to settle.
_IN_DOUBT_WITHOUT_PART_SQL = """
    SELECT m.run_id, m.id FROM campaign_messages m
     WHERE m.status = 'in_doubt'
       AND NOT EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id AND p.status = 'in_doubt')
     ORDER BY m.run_id, m.id"""


def _part_problem(message_status: str, part: int, part_status: str) -> str:
    what = f"part #{part + 1} is '{part_status}'"
    if part_status == "sending":
        return f"{what} (a send in flight) but the message is '{message_status}', not 'sending'"
    if part_status == "in_doubt":
        return f"{what} but the message is '{message_status}', not 'in_doubt' (only `resolve` settles it)"
    if part_status == "sent":
        return f"{what}: the message started, yet it is '{message_status}'"
    return f"the message is 'sent' but {what}, not sent"


def verify() -> list[Finding]:
    """Everything that does not add up, every run, in three set-based queries (R-OPS-1); [] = all is well.

    Counters vs row counts (:class:`Mismatch`); messages whose parts contradict their status, and
    runs whose counters say done but that are not closed (:class:`Inconsistency`).
    """
    out: list[Finding] = []
    for row in db.execute_sql(_VERIFY_SQL).fetchall():
        run_id, status = row[0], row[1]
        counters = dict(
            zip(
                ("leads_total", "leads_processed", "leads_sent", "leads_failed", "leads_skipped", "leads_in_doubt"),
                row[2:8],
            )
        )
        actual = dict(zip(counters, row[8:14]))
        for name, value in counters.items():
            if value != actual[name]:
                out.append(Mismatch(run_id, name, value, actual[name]))
        if status == "completed" and counters["leads_processed"] != counters["leads_total"]:
            out.append(
                Mismatch(
                    run_id,
                    "status",
                    "completed",
                    f"{counters['leads_processed']} of {counters['leads_total']} processed",
                )
            )
        if (
            status not in ("completed", "cancelled", "failed")
            and counters["leads_processed"] >= counters["leads_total"]
        ):
            out.append(
                Inconsistency(
                    run_id,
                    None,
                    f"status is '{status}' but leads_processed = "
                    f"{counters['leads_processed']} of leads_total = "
                    f"{counters['leads_total']}: it should be completed",
                )
            )
    by_message: dict[tuple[int, int], list[str]] = {}
    for run_id, message_id, m_status, idx, p_status in db.execute_sql(_PART_PROBLEMS_SQL).fetchall():
        by_message.setdefault((run_id, message_id), []).append(_part_problem(m_status, idx, p_status))
    for run_id, message_id in db.execute_sql(_IN_DOUBT_WITHOUT_PART_SQL).fetchall():
        by_message.setdefault((run_id, message_id), []).append(
            "the message is 'in_doubt' but none of its parts is: nothing for `resolve` to settle"
        )
    out += [
        Inconsistency(run_id, message_id, "; ".join(problems))
        for (run_id, message_id), problems in sorted(by_message.items())
    ]
    return out


def alerts(settings: Settings, *, now: dt.datetime | None = None) -> list[Alert]:
    """R-OPS-4 alerts, computed from PostgreSQL."""
    now = now or dt.datetime.now(UTC)
    out: list[Alert] = []

    n, oldest, sample = db.execute_sql(
        """SELECT count(*), min(status_changed_at), (array_agg(id ORDER BY status_changed_at))[1:5]
             FROM campaign_messages WHERE status = ANY(%s) AND status_changed_at < %s""",
        (list(IN_FLIGHT), now - STUCK_AFTER),
    ).fetchone()
    if n:
        hours = (now - oldest).total_seconds() / 3600
        out.append(
            Alert(
                "stuck_messages",
                f"{n} message(s) stuck in flight for more than "
                f"{STUCK_AFTER.total_seconds() / 3600:g} h (oldest {hours:.1f} h; "
                f"e.g. ids {', '.join(map(str, sample))})",
            )
        )

    for run_id, label, failed, processed in db.execute_sql(
        """SELECT r.id, w.name || '/' || c.name, r.leads_failed, r.leads_processed
                 FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
                 JOIN workspaces w ON w.id = c.workspace_id
                WHERE (r.status IN ('running', 'paused') OR r.finished_at > %s)
                  AND r.leads_processed >= %s AND r.leads_failed::float / r.leads_processed > %s
                ORDER BY r.id""",
        (now - dt.timedelta(hours=24), ALERT_MIN_PROCESSED, ALERT_FAILURE_RATIO),
    ):
        out.append(
            Alert(
                "failure_ratio",
                f"run {run_id} ({label}): {failed} of {processed} processed failed "
                f"({failed / processed:.0%} > {ALERT_FAILURE_RATIO:.0%})",
            )
        )

    row = db.execute_sql(
        "SELECT holder, beat_at FROM scheduler_heartbeats WHERE name = %s", (SCHEDULER_HEARTBEAT_NAME,)
    ).fetchone()
    if row is None:
        out.append(Alert("scheduler_heartbeat", "no scheduler heartbeat recorded: is `python scheduler.py` running?"))
    elif now - row[1] > HEARTBEAT_STALE_AFTER:
        out.append(
            Alert(
                "scheduler_heartbeat",
                f"scheduler heartbeat is {(now - row[1]).total_seconds():.0f} s old "
                f"(last holder {row[0]}): no active scheduler",
            )
        )

    for inbox_id, label, since, state in db.execute_sql(
        """SELECT i.id, w.name || '/' || i.name, i.disconnected_since, i.connection_state
                 FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
                WHERE i.disconnected_since < %s ORDER BY i.id""",
        (now - INBOX_DOWN_AFTER,),
    ):
        out.append(
            Alert(
                "inbox_disconnected",
                f"inbox {label} (id {inbox_id}) is {state} for {(now - since).total_seconds() / 60:.0f} min",
            )
        )

    for inbox_id, label, since, until, reason in db.execute_sql(
        """SELECT i.id, w.name || '/' || i.name, i.health_since, i.health_until, i.health_reason
                 FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
                WHERE i.health_state = 'restricted' ORDER BY i.id"""
    ):
        out.append(
            Alert(
                "inbox_restricted",
                f"inbox {label} (id {inbox_id}) is restricted since {_utc(since)}: {reason}; "
                f"no send starts on it until {_utc(until)} (cool-down with no new error) "
                "or `cli.py inbox enable`",
            )
        )

    total, by_queue = db.execute_sql(
        """SELECT coalesce(sum(n), 0), string_agg(q || ': ' || n, ', ' ORDER BY q) FROM (
               SELECT queue AS q, count(*) AS n FROM dead_letters WHERE status = 'dead' GROUP BY queue) d"""
    ).fetchone()
    if total:
        out.append(
            Alert(
                "dead_letters",
                f"{total} dead letter(s) waiting ({by_queue}): scripts/reprocess_dead_letters.py lists them",
            )
        )
    return out


def _utc(at: dt.datetime | None) -> str:
    return "?" if at is None else f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def log_alerts(settings: Settings) -> list[Alert]:
    """Compute the alerts and log each at ERROR (the scheduler's alert job)."""
    found = alerts(settings)
    for a in found:
        log.error("ALERT %s: %s", a.kind, a.text)
    return found
