"""Reading one run's report from PostgreSQL: the ``RunReport`` dataclasses and ``build_report``."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from campaign import planner, runs
from campaign.db import db
from campaign.errors import (
    ConfigError,
    RunNotFound,
)
from campaign.ops import triage_view
from campaign.ops.triage_view import TriageSummary

log = logging.getLogger(__name__)

UTC = dt.UTC
IN_FLIGHT = ("queued", "generating", "splitting", "sending")


@dataclass(frozen=True)
class Dist:
    """A distribution: how many values, p50 / p95 / p99 (linear interpolation) and max; None when empty."""

    n: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class InboxReport:
    """One inbox's share of the run, and how its sends were spaced."""

    id: int
    name: str
    instance_name: str
    min_gap_seconds: float  # configured pacing
    disabled: bool
    messages: int  # messages of this run assigned to the inbox
    messages_sent: int
    parts_sent: int
    failed: int
    in_doubt: int
    gap_min_s: float | None  # between consecutive part sends (sent_at) of this inbox in this run
    gap_median_s: float | None
    messaged: int = 0  # messages whose first part went out
    replied: int = 0  # ... whose lead wrote on this inbox after it (R-IN-2)
    opted_out: int = 0  # ... whose lead opted out after it (R-IN-4)
    #: the AI triage of the replies to this run's messages (R-IN-5): intents, tokens and cost
    triage: TriageSummary = field(default_factory=TriageSummary)


@dataclass(frozen=True)
class InboxSeries:
    """What the picture draws for one inbox: planned times (with the first part's send) and every part send."""

    inbox_id: int
    name: str
    planned: list[tuple[dt.datetime, dt.datetime | None]]  # (scheduled_at, first part sent_at), by scheduled_at
    part_sends: list[dt.datetime]  # every sent part's sent_at, ascending
    #: (the lead's first reply after the message, the message's first part sent_at), by reply time
    replies: list[tuple[dt.datetime, dt.datetime]] = field(default_factory=list)
    #: (the lead's opted_out_at, the message's first part sent_at), by opt-out time
    opt_outs: list[tuple[dt.datetime, dt.datetime]] = field(default_factory=list)


@dataclass
class RunReport:
    """Everything ``report RUN`` shows about one run (times are aware datetimes in UTC)."""

    run_id: int
    workspace: str
    campaign: str
    status: str
    pause_reason: str | None
    failure_reason: str | None
    manual: bool
    run_date: dt.date  # the campaign's local date
    timezone: str
    window_start_minute: int
    window_end_minute: int
    window_open: dt.datetime | None
    window_close: dt.datetime | None
    planned_start: dt.datetime | None
    planned_end: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    generated_at: dt.datetime
    # counters of campaign_runs (the truth the pipeline keeps)
    total: int
    processed: int
    sent: int
    failed: int
    skipped: int
    in_doubt: int
    overflow: int
    # rows right now
    waiting: int  # messages still `pending`
    in_flight: int  # queued / generating / splitting / sending
    failed_by_reason: dict[str, int]
    skipped_by_reason: dict[str, int]
    in_doubt_ids: list[int]
    failed_ids: list[int]
    row_mismatches: list[str]  # counters that disagree with the rows (empty when all is well)
    # timings
    generation_ms: Dist
    split_ms: Dist
    send_ms: Dist
    lateness_s: Dist  # first part sent_at - scheduled_at, seconds
    tokens_total: int
    tokens_messages: int  # messages with a token count (LLM-generated)
    invalid_phones: int | None  # leads of the source column not planned for a bad phone (plan event)
    inboxes: list[InboxReport] = field(default_factory=list)
    series: list[InboxSeries] = field(default_factory=list)
    #: the pause reason of a run its window's end closed while paused (E-26): its counters say
    #: `completed`, this says why most of it was skipped ``window_closed``
    closed_while_paused: str | None = None
    messaged: int = 0  # messages whose first part went out
    replied: int = 0  # ... whose lead replied after it (R-IN-2)
    opted_out: int = 0  # ... whose lead opted out after it (R-IN-4)
    #: the AI triage of the replies to this run's messages (R-IN-5): intents, tokens and cost
    triage: TriageSummary = field(default_factory=TriageSummary)
    #: leads of the source column the run left out when it was planned, by rule (R-SEQ-1, R-IN-3/4)
    excluded: dict[str, int] = field(default_factory=dict)
    min_days_in_column: int = 0

    @property
    def excluded_text(self) -> str | None:
        """``excluded from the source column: too recent N · replied N · opted out N`` for a follow-up
        (a wait in days, or any lead left out); None for a first touch that left nobody out."""
        if not self.min_days_in_column and not any(self.excluded.values()):
            return None
        return excluded_text(self.excluded)

    @property
    def label(self) -> str:
        """``workspace/campaign``."""
        return f"{self.workspace}/{self.campaign}"

    @property
    def status_text(self) -> str:
        """The status with its pause reason, also after a paused run was closed at its window's end."""
        if self.pause_reason:
            text = f"{self.status} ({self.pause_reason})"
            return text + (" · window closed" if self.closed_while_paused else "")
        if self.closed_while_paused:
            return f"{self.status} (closed at its window's end while paused: {self.closed_while_paused})"
        return self.status

    @property
    def pending(self) -> int:
        """Messages not processed yet (waiting + in flight), from the counters."""
        return self.total - self.processed

    @property
    def tokens_mean(self) -> float | None:
        """Mean tokens per LLM-generated message."""
        return self.tokens_total / self.tokens_messages if self.tokens_messages else None

    @property
    def duration(self) -> dt.timedelta | None:
        """Start to finish, or to the report's time for a run still going."""
        if self.started_at is None:
            return None
        return (self.finished_at or self.generated_at) - self.started_at

    @property
    def active(self) -> bool:
        """True while the run can still change."""
        return self.status in ("planning", "running", "paused")

    @property
    def zone(self) -> dt.tzinfo:
        """The campaign's timezone (UTC when the stored name is unknown to this machine)."""
        return _zone(self.timezone)


def excluded_text(excluded: dict[str, int]) -> str:
    """One line of the leads a run left out by rule (shared by ``report`` and ``status``)."""
    return (
        f"excluded from the source column: too recent {excluded.get('too_recent', 0)} · "
        f"replied {excluded.get('replied', 0)} · opted out {excluded.get('opted_out', 0)}"
    )


# --------------------------------------------------------------------------------------------
# reading

_RUN_SQL = """
    SELECT r.id, w.name, c.name, r.status, r.pause_reason, r.failure_reason, r.manual, r.run_date, c.timezone,
           c.window_start_minute, c.window_end_minute, coalesce(r.started_at, r.created_at), r.finished_at,
           r.leads_total, r.leads_processed, r.leads_sent, r.leads_failed, r.leads_skipped, r.leads_in_doubt,
           r.leads_overflow,
           (SELECT array_agg(p.inbox_id ORDER BY p.position) FROM campaign_config_inboxes p WHERE p.config_id = c.id),
           r.excluded_too_recent, r.excluded_replied, r.excluded_opted_out, c.min_days_in_column
      FROM campaign_runs r
      JOIN campaign_configs c ON c.id = r.config_id
      JOIN workspaces w ON w.id = c.workspace_id
     WHERE r.id = %s"""

# Percentiles by PostgreSQL (percentile_cont ignores NULLs: a step not reached is not a 0).
_TIMINGS_SQL = """
    WITH m AS (SELECT id, scheduled_at, tokens_used, generation_ms, split_ms, send_ms
                 FROM campaign_messages WHERE run_id = %(run)s),
         f AS (SELECT p.message_id, min(p.sent_at) AS first_sent
                 FROM message_parts p JOIN m ON m.id = p.message_id
                WHERE p.status = 'sent' GROUP BY p.message_id),
         x AS (SELECT m.*, extract(epoch FROM f.first_sent - m.scheduled_at)::float8 AS late
                 FROM m LEFT JOIN f ON f.message_id = m.id)
    SELECT count(tokens_used), coalesce(sum(tokens_used), 0),
           count(generation_ms), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY generation_ms),
           max(generation_ms),
           count(split_ms), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY split_ms), max(split_ms),
           count(send_ms), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY send_ms), max(send_ms),
           count(late), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY late), max(late)
      FROM x"""


class _Msg(NamedTuple):
    """One message of the run as ``_MESSAGES_SQL`` reads it."""

    id: int
    inbox_id: int
    status: str
    scheduled_at: dt.datetime
    skip_reason: str | None
    error_class: str | None
    first_sent: dt.datetime | None  # its first part's sent_at
    first_reply: dt.datetime | None  # the lead's first message on this inbox since then
    opted_out_at: dt.datetime | None  # the lead's opt-out, when it came since then


# One aggregate joined by hash, not a sub-select per message (3,000 messages: 0.55 s -> 0.02 s);
# the replies likewise: the run's conversations joined once, the first reply per message.
# A reply's time is WhatsApp's messageTimestamp, in whole seconds: it is compared with the send
# truncated to the second, so an answer in the same second as the part still counts.
_MESSAGES_SQL = """
    WITH f AS (SELECT p.message_id, min(p.sent_at) AS first_sent
                 FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
                WHERE m.run_id = %(run)s AND p.status = 'sent' GROUP BY p.message_id),
         r AS (SELECT m.id AS message_id, min(cm.at) AS first_reply
                 FROM campaign_messages m JOIN f ON f.message_id = m.id
                 JOIN conversations c ON c.lead_id = m.lead_id AND c.inbox_id = m.inbox_id
                 JOIN conversation_messages cm ON cm.conversation_id = c.id
                WHERE m.run_id = %(run)s AND cm.direction = 'in'
                  AND cm.at >= date_trunc('second', f.first_sent)
                GROUP BY m.id)
    SELECT m.id, m.inbox_id, m.status, m.scheduled_at, m.skip_reason, m.error_class, f.first_sent, r.first_reply,
           CASE WHEN l.opted_out_at >= date_trunc('second', f.first_sent) THEN l.opted_out_at END
      FROM campaign_messages m LEFT JOIN f ON f.message_id = m.id
      LEFT JOIN r ON r.message_id = m.id
      LEFT JOIN leads l ON l.id = m.lead_id
     WHERE m.run_id = %(run)s
     ORDER BY m.scheduled_at, m.id"""

_PARTS_SQL = """
    SELECT p.inbox_id, p.sent_at
      FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
     WHERE m.run_id = %s AND p.status = 'sent'
     ORDER BY p.inbox_id, p.sent_at, p.id"""

_INBOXES_SQL = """
    SELECT id, name, instance_name, min_gap_seconds, disabled FROM inboxes WHERE id = ANY(%s) ORDER BY id"""

_PLAN_EVENT_SQL = """
    SELECT details FROM campaign_events WHERE run_id = %s AND step = 'plan' AND details ? 'invalid_phones'
     ORDER BY id LIMIT 1"""


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _zone(name: str) -> dt.tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _dist(n: int, pcts: list[float] | None, mx: float | None) -> Dist:
    if not n or pcts is None or mx is None:
        return Dist(0, None, None, None, None)
    return Dist(int(n), float(pcts[0]), float(pcts[1]), float(pcts[2]), float(mx))


def _window(run_date: dt.date, tz: str, start: int, end: int) -> tuple[dt.datetime | None, dt.datetime | None]:
    """UTC bounds of the campaign's local window on the run's date (same rule as the planner)."""

    try:
        bounds = planner.window_bounds(run_date, tz, start, end)
    except ConfigError:  # unknown zone or a bad window stored: the report still renders
        return None, None
    return bounds if bounds else (None, None)


def build_report(run_id: int, *, now: dt.datetime | None = None) -> RunReport:
    """Read one run's report from PostgreSQL (seven queries, one consistent snapshot); RunNotFound if unknown."""

    if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id <= 0:
        raise ConfigError(f"run id must be a positive integer, got {run_id!r}")
    now = now or dt.datetime.now(UTC)
    opened = db.connection_context() if db.is_closed() else contextlib.nullcontext()
    with opened, db.atomic(isolation_level="REPEATABLE READ"):
        if db.transaction_depth() == 1:  # our own transaction (not a caller's savepoint): read only
            db.execute_sql("SET TRANSACTION READ ONLY")
        run = db.execute_sql(_RUN_SQL, (run_id,)).fetchone()
        if run is None:
            raise RunNotFound(f"run {run_id} not found (`python cli.py status` lists the runs in progress)")
        timings = db.execute_sql(_TIMINGS_SQL, {"run": run_id}).fetchone()
        messages = [_Msg(*r) for r in db.execute_sql(_MESSAGES_SQL, {"run": run_id}).fetchall()]
        parts = db.execute_sql(_PARTS_SQL, (run_id,)).fetchall()
        inbox_ids = sorted(
            {int(m.inbox_id) for m in messages} | {int(r[0]) for r in parts} | {int(i) for i in run[20] or ()}
        )
        inbox_rows = db.execute_sql(_INBOXES_SQL, (inbox_ids,)).fetchall()
        plan = db.execute_sql(_PLAN_EVENT_SQL, (run_id,)).fetchone()
        closed_paused = runs.closed_while_paused(run_id)
        triage = triage_view.for_run(run_id)
    rep = _assemble(run, timings, messages, parts, inbox_rows, plan, now)
    rep.closed_while_paused = closed_paused
    rep.triage = triage
    log.debug(
        "report run=%s: %s messages, %s parts sent, %s inboxes", run_id, len(messages), len(parts), len(inbox_rows)
    )
    return rep


def _assemble(
    run: tuple[Any, ...],
    timings: tuple[Any, ...],
    messages: list[_Msg],
    parts: list[tuple[Any, ...]],
    inbox_rows: list[tuple[Any, ...]],
    plan: tuple[Any, ...] | None,
    now: dt.datetime,
) -> RunReport:
    (
        rid,
        ws,
        camp,
        status,
        pause_reason,
        failure_reason,
        manual,
        run_date,
        tz,
        wstart,
        wend,
        started_at,
        finished_at,
        total,
        processed,
        sent,
        failed,
        skipped,
        in_doubt,
        overflow,
        _pool,
        too_recent,
        replied_excluded,
        opted_out_excluded,
        min_days,
    ) = run
    by_status = Counter(m.status for m in messages)
    failed_by = Counter(m.error_class or "unknown" for m in messages if m.status == "failed")
    skipped_by = Counter(m.skip_reason or "unknown" for m in messages if m.status == "skipped")
    mismatches = []
    for name, counter, actual in (
        ("leads_total", total, len(messages)),
        ("leads_sent", sent, by_status["sent"]),
        ("leads_failed", failed, by_status["failed"]),
        ("leads_skipped", skipped, by_status["skipped"]),
        ("leads_in_doubt", in_doubt, by_status["in_doubt"]),
    ):
        if counter != actual:
            mismatches.append(f"{name} = {counter} but the rows say {actual}")

    sends_by_inbox: dict[int, list[dt.datetime]] = {}
    for inbox_id, sent_at in parts:
        sends_by_inbox.setdefault(int(inbox_id), []).append(sent_at)
    planned_by_inbox: dict[int, list[tuple[dt.datetime, dt.datetime | None]]] = {}
    for m in messages:
        planned_by_inbox.setdefault(int(m.inbox_id), []).append((m.scheduled_at, m.first_sent))

    inboxes, series = [], []
    for iid, name, instance, min_gap, disabled in sorted(inbox_rows, key=lambda r: (_natural(r[1]), r[0])):
        mine = [m for m in messages if m.inbox_id == iid]
        sends = sends_by_inbox.get(iid, [])
        replies = sorted((m.first_reply, m.first_sent) for m in mine if m.first_reply and m.first_sent)
        opt_outs = sorted((m.opted_out_at, m.first_sent) for m in mine if m.opted_out_at and m.first_sent)
        gaps = [(b - a).total_seconds() for a, b in zip(sends, sends[1:])]
        inboxes.append(
            InboxReport(
                id=iid,
                name=name,
                instance_name=instance,
                min_gap_seconds=float(min_gap),
                disabled=bool(disabled),
                messages=len(mine),
                messages_sent=sum(m.status == "sent" for m in mine),
                parts_sent=len(sends),
                failed=sum(m.status == "failed" for m in mine),
                in_doubt=sum(m.status == "in_doubt" for m in mine),
                gap_min_s=min(gaps) if gaps else None,
                gap_median_s=statistics.median(gaps) if gaps else None,
                messaged=sum(m.first_sent is not None for m in mine),
                replied=len(replies),
                opted_out=len(opt_outs),
            )
        )
        if mine or sends:
            series.append(InboxSeries(iid, name, planned_by_inbox.get(iid, []), sends, replies, opt_outs))

    window_open, window_close = _window(run_date, tz, wstart, wend)
    details = plan[0] if plan else None
    return RunReport(
        run_id=int(rid),
        workspace=ws,
        campaign=camp,
        status=status,
        pause_reason=pause_reason,
        failure_reason=failure_reason,
        manual=bool(manual),
        run_date=run_date,
        timezone=tz,
        window_start_minute=wstart,
        window_end_minute=wend,
        window_open=window_open,
        window_close=window_close,
        planned_start=messages[0].scheduled_at if messages else None,
        planned_end=max(m.scheduled_at for m in messages) if messages else None,
        started_at=started_at,
        finished_at=finished_at,
        generated_at=now,
        total=total,
        processed=processed,
        sent=sent,
        failed=failed,
        skipped=skipped,
        in_doubt=in_doubt,
        overflow=overflow,
        waiting=by_status["pending"],
        in_flight=sum(by_status[s] for s in IN_FLIGHT),
        failed_by_reason=dict(failed_by.most_common()),
        skipped_by_reason=dict(skipped_by.most_common()),
        in_doubt_ids=sorted(int(m.id) for m in messages if m.status == "in_doubt"),
        failed_ids=sorted(int(m.id) for m in messages if m.status == "failed"),
        row_mismatches=mismatches,
        generation_ms=_dist(*timings[2:5]),
        split_ms=_dist(*timings[5:8]),
        send_ms=_dist(*timings[8:11]),
        lateness_s=_dist(*timings[11:14]),
        tokens_total=int(timings[1]),
        tokens_messages=int(timings[0]),
        invalid_phones=int(details["invalid_phones"]) if isinstance(details, dict) else None,
        inboxes=inboxes,
        series=series,
        messaged=sum(m.first_sent is not None for m in messages),
        replied=sum(m.first_reply is not None and m.first_sent is not None for m in messages),
        opted_out=sum(m.opted_out_at is not None and m.first_sent is not None for m in messages),
        excluded={"too_recent": too_recent, "replied": replied_excluded, "opted_out": opted_out_excluded},
        min_days_in_column=min_days,
    )
