"""Run report (SPEC R-OPS-1 ``report RUN``): what one run did, as text and as a picture.

``build_report`` reads everything in six queries inside one REPEATABLE READ, READ ONLY
transaction, so a run still being worked on gives a self-consistent snapshot (the counters,
the rows and the sends are of the same instant). ``render_text`` is for a terminal,
``render_picture`` writes a PNG or SVG: sends over time per inbox against the planned times,
the leads' replies and opt-outs on the same axis, and the outcome breakdown.

A lead "replied" to this run when it wrote on the message's inbox at or after the message's
first part went out (``conversation_messages`` direction ``in``); it "opted out" when its
``opted_out_at`` is at or after that send (R-IN-2..4). Both come with the message rows, in the
same query: no query per message.

Matplotlib is only imported by ``render_picture`` and only through its object-oriented
``Figure`` API (no pyplot): no global backend is selected, nothing is shared with other code,
and the text report stays fast and dependency-light.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from campaign import planner, runs
from campaign.db import db
from campaign.errors import (
    ConfigError,
    RunNotFound,
)

if TYPE_CHECKING:  # matplotlib is imported by render_picture only (see above)
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

__all__ = [
    "RunReport",
    "Dist",
    "InboxReport",
    "InboxSeries",
    "RunNotFound",
    "build_report",
    "render_text",
    "render_picture",
    "PICTURE_SUFFIXES",
]

UTC = dt.UTC
PICTURE_SUFFIXES = (".png", ".svg")
IN_FLIGHT = ("queued", "generating", "splitting", "sending")
#: planned times drawn as hollow markers up to this many per inbox (beyond, the step line says it all)
MARKERS_UP_TO = 40


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


# --------------------------------------------------------------------------------------------
# reading

_RUN_SQL = """
    SELECT r.id, w.name, c.name, r.status, r.pause_reason, r.failure_reason, r.manual, r.run_date, c.timezone,
           c.window_start_minute, c.window_end_minute, coalesce(r.started_at, r.created_at), r.finished_at,
           r.leads_total, r.leads_processed, r.leads_sent, r.leads_failed, r.leads_skipped, r.leads_in_doubt,
           r.leads_overflow, c.inbox_id
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
        inbox_ids = sorted({int(m.inbox_id) for m in messages} | {int(r[0]) for r in parts} | {int(run[20])})
        inbox_rows = db.execute_sql(_INBOXES_SQL, (inbox_ids,)).fetchall()
        plan = db.execute_sql(_PLAN_EVENT_SQL, (run_id,)).fetchone()
        closed_paused = runs.closed_while_paused(run_id)
    rep = _assemble(run, timings, messages, parts, inbox_rows, plan, now)
    rep.closed_while_paused = closed_paused
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
        _cfg_inbox,
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
    )


# --------------------------------------------------------------------------------------------
# text


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if v < 1000 else f"{v / 1000:.2f} s"


def _fmt_s(v: float | None) -> str:
    """Seconds for humans: 0.8 s, 45.3 s, 12m05s, 3h02m; negative values keep their sign (early)."""
    if v is None:
        return "-"
    sign, a = ("-" if v < 0 else ""), abs(v)
    if a < 60:
        return f"{sign}{a:.1f} s"
    if a < 3600:
        return f"{sign}{int(a // 60)}m{int(a % 60):02d}s"
    return f"{sign}{int(a // 3600)}h{int(a % 3600 // 60):02d}m"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ", left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` ones left-aligned (text), the others right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    out = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _local(rep: RunReport, t: dt.datetime | None, fmt: str = "%H:%M:%S") -> str:
    if t is None:
        return "-"
    local = t.astimezone(rep.zone)
    day = "" if local.date() == rep.run_date else f"{local:%m-%d} "
    return f"{day}{local:{fmt}}"


def _ids(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" … (+{len(ids) - limit} more)" if len(ids) > limit else "")


def render_text(rep: RunReport) -> str:
    """A compact plain-text summary of the report for a terminal (aligned columns, no colour codes)."""
    status = rep.status_text
    lines = [
        f"run {rep.run_id} · {rep.label} · {rep.run_date:%Y-%m-%d (%a)} · {status}"
        + (" · manual" if rep.manual else "")
    ]
    if rep.failure_reason:
        lines.append(f"  failure: {rep.failure_reason}")
    wstart, wend = rep.window_start_minute, rep.window_end_minute
    window = f"{wstart // 60:02d}:{wstart % 60:02d}–{wend // 60:02d}:{wend % 60:02d}"
    utc = ""
    if rep.window_open and rep.window_close:
        same_day = rep.window_open.date() == rep.window_close.date()
        fmt = "%H:%M" if same_day else "%m-%d %H:%M"
        utc = f" ({rep.window_open.astimezone(UTC):{fmt}}–{rep.window_close.astimezone(UTC):{fmt}} UTC)"
    lines.append(f"  timezone {rep.timezone} · window {window} local{utc}")
    lines.append(
        f"  planned {_local(rep, rep.planned_start)} → {_local(rep, rep.planned_end)} · "
        f"started {_local(rep, rep.started_at)} · "
        f"{'finished ' + _local(rep, rep.finished_at) if rep.finished_at else 'not finished'} · "
        f"duration {_fmt_s(rep.duration.total_seconds()) if rep.duration else '-'}"
        + (" so far" if rep.duration and not rep.finished_at else "")
    )
    extra = [f"overflow {rep.overflow} (eligible leads not planned today)"]
    if rep.invalid_phones:
        extra.append(f"{rep.invalid_phones} lead(s) with an invalid phone not planned")
    lines.append("  " + " · ".join(extra))
    lines.append(f"  report taken {rep.generated_at.astimezone(rep.zone):%Y-%m-%d %H:%M:%S} ({rep.timezone})")

    def pct(n: int) -> str:
        return f"{n / rep.total:.1%}" if rep.total else "-"

    lines += ["", "counters"]
    lines += _table(
        ["", "messages", "share"],
        [
            ["total", str(rep.total), ""],
            ["processed", str(rep.processed), pct(rep.processed)],
            ["  sent", str(rep.sent), pct(rep.sent)],
            ["  failed", str(rep.failed), pct(rep.failed)],
            ["  skipped", str(rep.skipped), pct(rep.skipped)],
            ["  in doubt", str(rep.in_doubt), pct(rep.in_doubt)],
            ["not yet processed", str(rep.pending), pct(rep.pending)],
            ["  waiting (pending)", str(rep.waiting), ""],
            ["  in flight", str(rep.in_flight), ""],
        ],
    )
    if rep.row_mismatches:
        lines.append(
            "  WARNING counters disagree with the message rows (run `verify`): " + "; ".join(rep.row_mismatches)
        )

    reasons = [["failed", r, str(n)] for r, n in rep.failed_by_reason.items()] + [
        ["skipped", r, str(n)] for r, n in rep.skipped_by_reason.items()
    ]
    if reasons or rep.in_doubt_ids:
        lines += ["", "outcomes by reason"]
        if reasons:
            lines += _table(["outcome", "reason", "messages"], reasons, left=2)
        if rep.failed_ids:
            lines.append(f"  failed message ids: {_ids(rep.failed_ids)}")
        if rep.in_doubt_ids:
            lines.append(
                f"  in doubt message ids (resolve each with `resolve ID --sent|--resend`): {_ids(rep.in_doubt_ids)}"
            )

    lines += ["", "replies (leads who wrote after their message's first part went out)"]

    def of_messaged(n: int) -> str:
        return f"{n / rep.messaged:.1%}" if rep.messaged else "-"

    lines += _table(
        ["", "leads", "of messaged"],
        [
            ["messaged (first part sent)", str(rep.messaged), ""],
            ["replied", str(rep.replied), of_messaged(rep.replied)],
            ["opted out", str(rep.opted_out), of_messaged(rep.opted_out)],
        ],
    )

    lines += ["", "timings"]

    def trow(name: str, d: Any, f: Any) -> list[str]:
        return [name, str(d.n), f(d.p50), f(d.p95), f(d.p99), f(d.max)]

    lines += _table(
        ["", "n", "p50", "p95", "p99", "max"],
        [
            trow("generation", rep.generation_ms, _fmt_ms),
            trow("split", rep.split_ms, _fmt_ms),
            trow("send", rep.send_ms, _fmt_ms),
            trow("lateness (1st part sent - planned)", rep.lateness_s, _fmt_s),
        ],
    )
    mean = f"{rep.tokens_mean:.1f}" if rep.tokens_mean is not None else "-"
    lines.append(
        f"  tokens: {rep.tokens_total:,} total · {mean} per generated message "
        f"({rep.tokens_messages} with a token count)"
    )

    lines += ["", "inboxes"]
    if rep.inboxes:
        lines += _table(
            [
                "inbox",
                "messages",
                "sent",
                "parts sent",
                "failed",
                "in doubt",
                "min gap",
                "median gap",
                "configured gap",
                "replied",
                "opted out",
            ],
            [
                [
                    i.name + (" (disabled)" if i.disabled else ""),
                    str(i.messages),
                    str(i.messages_sent),
                    str(i.parts_sent),
                    str(i.failed),
                    str(i.in_doubt),
                    _fmt_s(i.gap_min_s),
                    _fmt_s(i.gap_median_s),
                    _fmt_s(i.min_gap_seconds),
                    str(i.replied),
                    str(i.opted_out),
                ]
                for i in rep.inboxes
            ],
        )
        lines.append(
            "  gaps: between this run's consecutive part sends (sent_at) per inbox; pacing spaces send "
            "starts, so HTTP latency can shave a little off"
        )
        lines.append(
            "  replied / opted out: this run's leads who wrote to that inbox / opted out after their "
            "message's first part went out"
        )
    else:
        lines.append("  (no inbox: nothing planned)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# picture

_OUTCOME_COLOURS = {
    "sent": "#2e7d32",
    "failed": "#c62828",
    "skipped": "#ef8f00",
    "in doubt": "#8e24aa",
    "not yet processed": "#9e9e9e",
}


def _outcomes(rep: RunReport) -> list[tuple[str, int, str]]:
    """(label, count, colour) of every non-empty outcome; the counts sum to the run's total."""
    rows = [("sent", rep.sent, _OUTCOME_COLOURS["sent"])]
    rows += [(f"failed: {_short(r)}", n, _OUTCOME_COLOURS["failed"]) for r, n in rep.failed_by_reason.items()]
    rows += [(f"skipped: {_short(r)}", n, _OUTCOME_COLOURS["skipped"]) for r, n in rep.skipped_by_reason.items()]
    rows += [
        ("in doubt", rep.in_doubt, _OUTCOME_COLOURS["in doubt"]),
        ("not yet processed", rep.pending, _OUTCOME_COLOURS["not yet processed"]),
    ]
    return [r for r in rows if r[1] > 0]


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _time_range(rep: RunReport) -> tuple[dt.datetime, dt.datetime] | None:
    times = [t for s in rep.series for p in s.planned for t in p if t is not None]
    times += [t for s in rep.series for t in s.part_sends]
    times += [t for s in rep.series for t, _ in (*s.replies, *s.opt_outs)]
    if not times:
        return None
    lo, hi = min(times), max(times)
    near = max(hi - lo, dt.timedelta(minutes=10))
    if rep.active and lo - near <= rep.generated_at <= hi + near:
        # show "now" when it is near the run (a run days stale would squash the plan into a sliver)
        lo, hi = min(lo, rep.generated_at), max(hi, rep.generated_at)
    pad = max((hi - lo) * 0.03, dt.timedelta(seconds=20))
    return lo - pad, hi + pad


def _draw_sends(ax: Axes, rep: RunReport) -> None:
    from matplotlib import dates as mdates
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    zone = rep.zone
    ax.set_title("sends over time per inbox against the planned times", loc="left", fontsize=11)
    span = _time_range(rep)
    if span is None:
        ax.text(
            0.5,
            0.5,
            "no messages planned in this run" + (f"\n(overflow {rep.overflow})" if rep.overflow else ""),
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=12,
            color="#555555",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    lo, hi = span
    colours = _palette(len(rep.series))
    ymax = 1
    for s, colour in zip(rep.series, colours):
        planned = sorted(t for t, _ in s.planned)
        firsts = sorted(f for _, f in s.planned if f is not None)
        ymax = max(ymax, len(planned))
        if planned:
            # cumulative planned: a step up at each scheduled time, from 0 at the start of the axis
            ax.step(
                [lo, *planned, hi],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                [*range(len(planned) + 1), len(planned)],
                where="post",
                color=colour,
                linestyle="--",
                linewidth=1.2,
                alpha=0.85,
            )
            if len(planned) <= MARKERS_UP_TO:
                ax.plot(
                    planned,  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                    range(1, len(planned) + 1),
                    linestyle="none",
                    marker="o",
                    markersize=5,
                    markerfacecolor="none",
                    markeredgecolor=colour,
                    alpha=0.85,
                )
        if firsts:
            end = hi if rep.active else max(firsts[-1], s.part_sends[-1] if s.part_sends else firsts[-1])
            ax.step(
                [lo, *firsts, end],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                [0, *range(1, len(firsts) + 1), len(firsts)],
                where="post",
                color=colour,
                linewidth=2.2,
            )
        if s.part_sends:
            # each part sits at the height of the messages started by then: bubbles of one message line up
            ys = [_count_le(firsts, t) for t in s.part_sends]
            ax.plot(s.part_sends, ys, linestyle="none", marker="o", markersize=3.2, color=colour, alpha=0.9)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
        _draw_listening(ax, s, firsts, colour)
    shaded = False
    if rep.window_open and rep.window_close:
        a, b = max(rep.window_open, lo), min(rep.window_close, hi)
        if a < b:
            ax.axvspan(a, b, color="#4caf50", alpha=0.06, zorder=0)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            shaded = True
        for edge, what in ((rep.window_open, "window opens"), (rep.window_close, "window closes")):
            if lo <= edge <= hi:
                ax.axvline(edge, color="#4caf50", linewidth=1, linestyle=":")  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                ax.text(
                    edge,  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                    1.0,
                    f" {what}",
                    transform=ax.get_xaxis_transform(),
                    fontsize=8,
                    color="#2e7d32",
                    va="top",
                )
    if rep.active and lo <= rep.generated_at <= hi:
        ax.axvline(rep.generated_at, color="#555555", linewidth=1)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
        ax.text(rep.generated_at, 0.02, " now", transform=ax.get_xaxis_transform(), fontsize=8, color="#555555")  # type: ignore[arg-type]  # datetime x: matplotlib#27140
    if not any(s.part_sends for s in rep.series):
        ax.text(
            0.98, 0.96, "no part sent yet", transform=ax.transAxes, fontsize=10, color="#555555", va="top", ha="right"
        )

    ax.set_xlim(lo, hi)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
    ax.set_ylim(0, ymax * 1.08 + 0.5)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=zone, minticks=4, maxticks=9))
    length = hi - lo
    fmt = (
        "%H:%M:%S"
        if length <= dt.timedelta(minutes=10)
        else "%H:%M"
        if length <= dt.timedelta(hours=30)
        else "%m-%d %H:%M"
    )
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=zone))
    first_day, last_day = lo.astimezone(zone).date(), hi.astimezone(zone).date()
    days = f"{first_day:%Y-%m-%d}" + (f" to {last_day:%Y-%m-%d}" if last_day != first_day else "")
    ax.set_xlabel(f"local time, {rep.timezone} ({days})")
    ax.set_ylabel("messages (cumulative)")
    y_locator = ax.yaxis.get_major_locator()
    if isinstance(y_locator, MaxNLocator):  # the default AutoLocator is one
        y_locator.set_params(integer=True)
    ax.grid(True, color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)

    handles: list[Artist] = [Line2D([], [], color=c, linewidth=2.2, label=s.name) for s, c in zip(rep.series, colours)]
    handles += [
        Line2D(
            [], [], color="#444444", linestyle="--", marker="o", markerfacecolor="none", label="planned (scheduled_at)"
        ),
        Line2D([], [], color="#444444", linewidth=2.2, label="sent (first part)"),
        Line2D([], [], color="#444444", linestyle="none", marker="o", markersize=3.2, label="each part sent"),
    ]
    if any(s.replies for s in rep.series):
        handles.append(
            Line2D([], [], linestyle="none", markerfacecolor="#bdbdbd", label="lead replied", **_REPLY_MARKER)
        )
    if any(s.opt_outs for s in rep.series):
        handles.append(Line2D([], [], linestyle="none", label="lead opted out", **_OPT_OUT_MARKER))
    if shaded:
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#4caf50", alpha=0.15, label="send window"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.14),
        ncol=min(4, len(handles)),
        fontsize=8.5,
        frameon=False,
    )


#: a reply: a star in the inbox's colour; an opt-out: a red cross drawn over it (distinct in grey print too)
_REPLY_MARKER: dict[str, Any] = {"marker": "*", "markersize": 11, "markeredgecolor": "#212121", "markeredgewidth": 0.6}
_OPT_OUT_MARKER: dict[str, Any] = {
    "marker": "X",
    "markersize": 9,
    "color": "#c62828",
    "markeredgecolor": "#212121",
    "markeredgewidth": 0.6,
}


def _draw_listening(ax: Axes, s: InboxSeries, firsts: list[dt.datetime], colour: Any) -> None:
    """The leads' replies and opt-outs on the inbox's time axis, at the height of the message they answer.

    Each group carries an SVG id (``replies-<inbox id>``, ``opt-outs-<inbox id>``): one marker per lead.
    A reply's time has whole seconds (WhatsApp's timestamp): one from the second of the send is
    drawn at the send, never before the message it answers.
    """
    if s.replies:
        ax.plot(
            [max(t, sent) for t, sent in s.replies],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            [_count_le(firsts, sent) for _, sent in s.replies],
            linestyle="none",
            markerfacecolor=colour,
            zorder=4,
            gid=f"replies-{s.inbox_id}",
            **_REPLY_MARKER,
        )
    if s.opt_outs:
        ax.plot(
            [max(t, sent) for t, sent in s.opt_outs],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            [_count_le(firsts, sent) for _, sent in s.opt_outs],
            linestyle="none",
            zorder=5,
            gid=f"opt-outs-{s.inbox_id}",
            **_OPT_OUT_MARKER,
        )


def _count_le(sorted_times: list[dt.datetime], t: dt.datetime) -> int:
    import bisect

    return bisect.bisect_right(sorted_times, t)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _draw_outcomes(ax: Axes, rep: RunReport) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"outcomes of {rep.total} message{'s' if rep.total != 1 else ''}", loc="left", fontsize=11)
    rows = _outcomes(rep)
    if not rows:
        ax.text(0.5, 0.5, "nothing planned", ha="center", va="center", transform=ax.transAxes, color="#555555")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    labels = [r[0] for r in rows]
    counts = [r[1] for r in rows]
    ys = range(len(rows))
    ax.barh(ys, counts, color=[r[2] for r in rows], height=0.65)
    ax.set_yticks(list(ys), labels=labels, fontsize=9)
    ax.set_ylim(max(len(rows), 5) - 0.5, -0.5)  # top down, and one bar never fills the panel
    top = max(counts)
    for y, n in zip(ys, counts):
        ax.text(n + top * 0.02, y, f"{n}  ({n / rep.total:.0%})" if rep.total else str(n), va="center", fontsize=9)
    ax.set_xlim(0, top * 1.35)
    ax.set_xlabel("messages")
    x_locator = ax.xaxis.get_major_locator()
    if isinstance(x_locator, MaxNLocator):  # the default AutoLocator is one
        x_locator.set_params(integer=True)
    ax.grid(True, axis="x", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def render_picture(rep: RunReport, path: str | Path) -> Path:
    """Write the report's picture (PNG or SVG by the suffix of ``path``) and return its path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise ValueError(f"picture {str(path)!r}: unsupported suffix {suffix or '(none)'!r}; use .png or .svg")
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    fig = Figure(figsize=(14, 6.2), dpi=110, layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[2.4, 1])
    status = rep.status_text
    title = f"{rep.label} · run {rep.run_id} · {rep.run_date:%a %Y-%m-%d} · {status}"
    fig.suptitle(title, x=0.01, ha="left", fontsize=14, fontweight="bold")
    dur = rep.duration
    fig.text(
        0.01,
        0.925,
        (
            f"sent {rep.sent} · failed {rep.failed} · skipped {rep.skipped} · "
            f"in doubt {rep.in_doubt} · not yet processed {rep.pending} · of {rep.total} · "
            f"overflow {rep.overflow} · replied {rep.replied} · opted out {rep.opted_out}"
            + (f" · duration {_fmt_s(dur.total_seconds())}{'' if rep.finished_at else ' so far'}" if dur else "")
        ),
        fontsize=10,
        color="#444444",
        ha="left",
        va="top",
    )
    layout = fig.get_layout_engine()
    assert isinstance(layout, ConstrainedLayoutEngine)  # layout="constrained" above
    layout.set(rect=(0, 0, 1, 0.91))
    _draw_sends(fig.add_subplot(grid[0, 0]), rep)
    _draw_outcomes(fig.add_subplot(grid[0, 1]), rep)

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = (
        {"Title": title, "Description": f"campaign run report of run {rep.run_id}"}
        if suffix == ".svg"
        else {"Title": title, "Software": "campaign engine report.py"}
    )
    # Write next to the target and rename: a reader never sees half a picture.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=suffix[1:], metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for every operator
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("report run=%s: picture written to %s", rep.run_id, path)
    return path
