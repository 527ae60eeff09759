"""Planning runs and keeping them inside their window (SPEC §4.1 R-PLAN, R-DISP-3/4, R-OPS-3, E-05/19/21/22).

Two layers:

* pure time arithmetic — :func:`window_bounds` and :func:`plan_schedule` — with no database,
  property-tested with hypothesis (DST included);
* database operations — :func:`plan_run`, :func:`plan_due_runs`, :func:`skip_too_late`,
  :func:`close_windows`, :func:`pause_run`, :func:`resume_run`, :func:`cancel_run` — each one
  transaction, every state change a conditional UPDATE.

How a window maps to instants (DST, E-21)
-----------------------------------------
A config's window is local wall-clock minutes ``[start, end)`` on one local date. The instants
whose local wall time (on that date) lies in that range are computed segment by segment between
the zone's UTC-offset transitions, so a nonexistent wall time (spring forward) or an ambiguous one
(fall back) still maps to instants that really show a time inside the window. On the rare day
where that set is not one contiguous interval (a bound inside a repeated hour), the longest
interval is the window (ties: the earliest), so every scheduled instant is inside the window AND
every gap honours the configured bounds.

How a schedule is drawn
-----------------------
From ``start = max(window open, now)``: the first message at ``start + U(0, min(gap_max, window))``
(so a day's first message is not always at 09:00:00 sharp), then each next one after a gap drawn
uniformly in ``[gap_min, gap_max]`` (microsecond resolution, never below ``gap_min``), while the
time is before the window end and the count below ``min(daily_limit, n_leads)``.
``len(times) + overflow == n_leads`` always: overflow counts eligible leads NOT scheduled (daily
limit or window too short, E-05); they stay in the source column for the next run.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from db import db
from errors import ConfigError
from models import CampaignRun
from settings import Settings

log = logging.getLogger(__name__)

__all__ = ["PlanError", "RunStateError", "window_bounds", "plan_schedule", "spread_times",
           "plan_run", "plan_due_runs", "skip_too_late", "close_windows", "due_window_closed_runs",
           "pause_run", "resume_run", "cancel_run", "replan_pending", "find_config", "window_close_at", "E164_SQL_REGEX",
           "PLAN_AHEAD_SECONDS", "OPEN_RUN_STATUSES", "closed_while_paused"]

UTC = dt.timezone.utc

#: PostgreSQL regex of a valid E.164 phone (R-PLAN-2, E-18): '+', no leading 0, 7..15 digits
E164_SQL_REGEX = r"^\+[1-9][0-9]{6,14}$"
#: a due config is planned this long before its window opens, so its first message is ready on time
PLAN_AHEAD_SECONDS = 60
#: transaction advisory-lock namespace serialising the planning of one config (E-19)
PLAN_LOCK_NAMESPACE = 0x706C616E  # "plan"

_SAMPLE = dt.timedelta(minutes=30)  # zone offsets are sampled this often, changes bisected to the second


class PlanError(ConfigError):
    """A run cannot be planned (unknown config, window closed, already planned today...)."""


class RunStateError(ConfigError):
    """An operator transition found the run in another state (e.g. pause of a completed run)."""


# --------------------------------------------------------------------------------------------
# pure time arithmetic
# --------------------------------------------------------------------------------------------

def _zone(tz: dt.tzinfo | str) -> dt.tzinfo:
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise PlanError(f"unknown timezone {tz!r}") from exc
    return tz


def _offset(tz: dt.tzinfo, t: dt.datetime) -> dt.timedelta:
    off = t.astimezone(tz).utcoffset()
    return off if off is not None else dt.timedelta(0)


def _segments(tz: dt.tzinfo, lo: dt.datetime, hi: dt.datetime) -> list[tuple[dt.datetime, dt.datetime, dt.timedelta]]:
    """Constant-offset segments ``(a, b, offset)`` covering ``[lo, hi)`` (UTC instants)."""
    out: list[tuple[dt.datetime, dt.datetime, dt.timedelta]] = []
    seg_start, seg_off = lo, _offset(tz, lo)
    t = lo
    while t < hi:
        nxt = min(t + _SAMPLE, hi)
        off = _offset(tz, nxt)
        if off != seg_off:
            # bisect the transition between t (seg_off) and nxt (off), to the second
            a, b = t, nxt
            while b - a > dt.timedelta(seconds=1):
                mid = a + (b - a) / 2
                mid = mid.replace(microsecond=0) if mid.microsecond else mid
                if mid <= a:
                    break
                if _offset(tz, mid) == seg_off:
                    a = mid
                else:
                    b = mid
            out.append((seg_start, b, seg_off))
            seg_start, seg_off = b, _offset(tz, b)
        t = nxt
    out.append((seg_start, hi, seg_off))
    return out


@functools.lru_cache(maxsize=4096)
def _window_bounds_cached(tz: dt.tzinfo, day: dt.date, start_minute: int,
                          end_minute: int) -> tuple[dt.datetime, dt.datetime] | None:
    midnight = dt.datetime.combine(day, dt.time(0))  # naive local wall clock
    wall_lo = midnight + dt.timedelta(minutes=start_minute)
    wall_hi = midnight + dt.timedelta(minutes=end_minute)
    margin = dt.timedelta(hours=27)  # offsets span -12h..+14h: this covers every candidate instant
    lo = (wall_lo - margin).replace(tzinfo=UTC)
    hi = (wall_hi + margin).replace(tzinfo=UTC)
    intervals: list[list[dt.datetime]] = []
    for a, b, off in _segments(tz, lo, hi):
        # inside this segment the wall clock is t + off: wall_lo <= t + off < wall_hi
        ia = max(a, (wall_lo - off).replace(tzinfo=UTC))
        ib = min(b, (wall_hi - off).replace(tzinfo=UTC))
        if ia < ib:
            if intervals and intervals[-1][1] == ia:
                intervals[-1][1] = ib
            else:
                intervals.append([ia, ib])
    if not intervals:
        return None
    best = max(intervals, key=lambda iv: (iv[1] - iv[0], -iv[0].timestamp()))
    return best[0], best[1]


def window_bounds(day: dt.date, tz: dt.tzinfo | str, start_minute: int,
                  end_minute: int) -> tuple[dt.datetime, dt.datetime] | None:
    """UTC ``(open, close)`` of the local window ``[start, end)`` minutes on ``day``; None if it never exists."""
    if not 0 <= start_minute < end_minute <= 1440:
        raise PlanError(f"window {start_minute}..{end_minute} minutes is not 0 <= start < end <= 1440")
    return _window_bounds_cached(_zone(tz), day, start_minute, end_minute)


def _gap_us(gap_min: float, gap_max: float) -> tuple[int, int]:
    if gap_min < 0 or gap_max < gap_min:
        raise PlanError(f"gap bounds {gap_min}..{gap_max} s are not 0 <= min <= max")
    lo = math.ceil(round(gap_min * 1_000_000, 3))
    hi = max(lo, math.floor(round(gap_max * 1_000_000, 3)))
    return lo, hi


def spread_times(start: dt.datetime, end: dt.datetime, *, gap_min: float, gap_max: float, count: int,
                 rng: random.Random, first_offset_max: float | None = None) -> list[dt.datetime]:
    """Up to ``count`` instants in ``[start, end)``: first at start + U(0, first_offset_max), then gaps in [min, max]."""
    lo_us, hi_us = _gap_us(gap_min, gap_max)
    span_us = (end - start) // dt.timedelta(microseconds=1)
    if count <= 0 or span_us <= 0:
        return []
    first_max_us = hi_us if first_offset_max is None else max(0, round(first_offset_max * 1_000_000))
    x = rng.randint(0, min(first_max_us, span_us - 1))
    times: list[dt.datetime] = []
    while x < span_us and len(times) < count:
        times.append(start + dt.timedelta(microseconds=x))
        x += rng.randint(lo_us, hi_us)
    return times


def plan_schedule(*, now_utc: dt.datetime, tz: dt.tzinfo | str, weekdays: Iterable[int], window_start_minute: int,
                  window_end_minute: int, gap_min: float, gap_max: float, daily_limit: int, n_leads: int,
                  rng: random.Random) -> tuple[list[dt.datetime], int]:
    """Today's send times (UTC, ascending) for ``n_leads`` leads and the overflow (leads not scheduled)."""
    if now_utc.tzinfo is None:
        raise PlanError("now_utc must be timezone-aware")
    zone = _zone(tz)
    today = now_utc.astimezone(zone).date()
    if today.weekday() not in set(weekdays):
        return [], n_leads
    bounds = window_bounds(today, zone, window_start_minute, window_end_minute)
    if bounds is None:
        return [], n_leads
    start, end = max(bounds[0], now_utc.astimezone(UTC)), bounds[1]
    times = spread_times(start, end, gap_min=gap_min, gap_max=gap_max,
                         count=min(daily_limit, n_leads), rng=rng)
    return times, n_leads - len(times)


# --------------------------------------------------------------------------------------------
# database: planning
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    id: int
    workspace_id: int
    workspace: str
    name: str
    inbox_id: int
    source_column_id: int
    target_column_id: int | None
    weekdays: tuple[int, ...]
    window_start_minute: int
    window_end_minute: int
    timezone: str
    daily_limit: int
    gap_min: float
    gap_max: float
    active: bool
    broken: str | None  # why a run of this config cannot start (R-PLAN-5), None when fine

    @property
    def label(self) -> str:
        return f"{self.workspace}/{self.name}"


_CONFIG_SQL = """
    SELECT c.id, c.workspace_id, w.name, c.name, c.inbox_id, c.source_column_id, c.target_column_id,
           c.weekdays, c.window_start_minute, c.window_end_minute, c.timezone, c.daily_limit,
           c.gap_min_seconds, c.gap_max_seconds, c.active,
           i.id IS NOT NULL, i.workspace_id = c.workspace_id,
           sc.id IS NOT NULL, sc.workspace_id = c.workspace_id,
           tc.id IS NOT NULL, tc.workspace_id = c.workspace_id
      FROM campaign_configs c
      JOIN workspaces w ON w.id = c.workspace_id
      LEFT JOIN inboxes i ON i.id = c.inbox_id
      LEFT JOIN columns sc ON sc.id = c.source_column_id
      LEFT JOIN columns tc ON tc.id = c.target_column_id"""


def _config_from_row(row: Sequence) -> _Config:
    (cid, ws_id, ws, name, inbox_id, src, tgt, weekdays, ws_min, we_min, tz, limit, gmin, gmax, active,
     inbox_ok, inbox_same, src_ok, src_same, tgt_ok, tgt_same) = row
    broken = None
    if not inbox_ok:
        broken = "inbox does not exist"
    elif not inbox_same:
        broken = "inbox belongs to another workspace"
    elif not src_ok:
        broken = "source column does not exist"
    elif not src_same:
        broken = "source column belongs to another workspace"
    elif not tgt_ok:
        broken = "target column does not exist (deleted?)"
    elif not tgt_same:
        broken = "target column belongs to another workspace"
    else:
        try:
            _zone(tz)
        except PlanError as exc:
            broken = str(exc)
    return _Config(cid, ws_id, ws, name, inbox_id, src, tgt, tuple(weekdays or ()), ws_min, we_min, tz, limit,
                   float(gmin), float(gmax), active, broken)


def _load_config(config_id: int) -> _Config:
    row = db.execute_sql(_CONFIG_SQL + " WHERE c.id = %s", (config_id,)).fetchone()
    if row is None:
        raise PlanError(f"campaign config {config_id} does not exist")
    return _config_from_row(row)


def find_config(label: str) -> int:
    """Id of the config named ``workspace/campaign``; PlanError when there is none."""
    ws, sep, name = label.partition("/")
    if not sep or not ws or not name:
        raise PlanError(f"campaign {label!r} must be named WORKSPACE/CAMPAIGN (e.g. acme/first-touch)")
    row = db.execute_sql("""SELECT c.id FROM campaign_configs c JOIN workspaces w ON w.id = c.workspace_id
                             WHERE w.name = %s AND c.name = %s""", (ws, name)).fetchone()
    if row is None:
        raise PlanError(f"campaign {label!r} does not exist (workspace {ws!r}, campaign {name!r})")
    return int(row[0])


def _local_date(cfg: _Config, now: dt.datetime) -> dt.date:
    try:
        return now.astimezone(_zone(cfg.timezone)).date()
    except PlanError:
        return now.astimezone(UTC).date()


def _event(run_id: int | None, step: str, text: str, details: dict, level: str = "info") -> None:
    db.execute_sql("INSERT INTO campaign_events (run_id, step, level, text, details) VALUES (%s, %s, %s, %s, %s)",
                   (run_id, step, level, text, json.dumps(details)))


# One query (R-PLAN-2, no N+1): every lead of the source column with a flag for its phone, minus the
# leads this config already holds in an active run (E-19: never in two active runs of one config)
# or already messaged today (local day start).
_LEADS_SQL = f"""
    SELECT l.id, l.phone ~ '{E164_SQL_REGEX}' AS phone_ok
      FROM leads l
     WHERE l.workspace_id = %s AND l.column_id = %s AND NOT l.opted_out
       AND NOT EXISTS (
           SELECT 1 FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
            WHERE m.lead_id = l.id AND r.config_id = %s AND r.id <> %s
              AND (r.status IN ('planning', 'running', 'paused')
                   OR (m.sent_at IS NOT NULL AND m.sent_at >= %s)))
     ORDER BY l.id"""


def _insert_run(cfg: _Config, day: dt.date, status: str, manual: bool, failure: str | None = None) -> int | None:
    row = db.execute_sql(
        """INSERT INTO campaign_runs (config_id, run_date, status, manual, failure_reason, started_at, finished_at)
           VALUES (%s, %s, %s, %s, %s, now(), CASE WHEN %s = 'failed' THEN now() END)
           ON CONFLICT (config_id, run_date) DO NOTHING RETURNING id""",
        (cfg.id, day, status, manual, failure, status)).fetchone()
    return int(row[0]) if row else None


def _check_window_open(cfg: _Config, day: dt.date, now: dt.datetime) -> None:
    """Refuse a manual run whose window is closed for the rest of today (it would block the date)."""
    if day.weekday() not in cfg.weekdays:
        raise PlanError(f"campaign {cfg.label} does not run on {day:%A}s (weekdays in its config)")
    bounds = window_bounds(day, cfg.timezone, cfg.window_start_minute, cfg.window_end_minute)
    if bounds is None or now >= bounds[1]:
        raise PlanError(f"the window of campaign {cfg.label} is closed for the rest of {day} "
                        f"({cfg.window_start_minute // 60:02d}:{cfg.window_start_minute % 60:02d}-"
                        f"{cfg.window_end_minute // 60:02d}:{cfg.window_end_minute % 60:02d} {cfg.timezone})")


def _ts_array(times: Sequence[dt.datetime]) -> str:
    return "{" + ",".join(t.isoformat() for t in times) + "}"


def plan_run(config_id: int, *, now: dt.datetime | None = None, manual: bool = False,
             rng: random.Random | None = None) -> CampaignRun | None:
    """Plan today's run of a config in one transaction; None when today already has one (R-PLAN-1..6)."""
    now = now or dt.datetime.now(UTC)
    rng = rng or random.Random()
    with db.atomic():
        # Serialise planners of one config (two schedulers, a run-now racing the scheduler): the
        # unique (config, date) key already forbids two runs; the lock also keeps two runs of
        # different dates of one config from both taking a lead (E-19).
        db.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)", (PLAN_LOCK_NAMESPACE, config_id))
        cfg = _load_config(config_id)
        day = _local_date(cfg, now)
        if cfg.broken:
            run_id = _insert_run(cfg, day, "failed", manual, f"cannot start: {cfg.broken}")
            if run_id is None:
                return None
            _event(run_id, "plan", f"run of {cfg.label} failed: {cfg.broken}", {"config_id": cfg.id}, "error")
            log.error("run %s of %s (config %s) failed: %s", run_id, cfg.label, cfg.id, cfg.broken)
            return CampaignRun.get_by_id(run_id)
        if not cfg.active and not manual:
            return None
        if manual:
            _check_window_open(cfg, day, now)
        run_id = _insert_run(cfg, day, "running", manual)
        if run_id is None:
            return None
        zone = _zone(cfg.timezone)
        day_start = window_bounds(day, zone, 0, 1440)
        rows = db.execute_sql(_LEADS_SQL, (cfg.workspace_id, cfg.source_column_id, cfg.id, run_id,
                                           day_start[0] if day_start else now)).fetchall()
        lead_ids = [r[0] for r in rows if r[1]]
        bad_phones = len(rows) - len(lead_ids)
        times, overflow = plan_schedule(
            now_utc=now, tz=zone, weekdays=cfg.weekdays, window_start_minute=cfg.window_start_minute,
            window_end_minute=cfg.window_end_minute, gap_min=cfg.gap_min, gap_max=cfg.gap_max,
            daily_limit=cfg.daily_limit, n_leads=len(lead_ids), rng=rng)
        if times:
            db.execute_sql(
                """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
                   SELECT %s, t.lead_id, %s, t.at
                     FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(lead_id, at)""",
                (run_id, cfg.inbox_id, "{" + ",".join(map(str, lead_ids[:len(times)])) + "}", _ts_array(times)))
        db.execute_sql(
            """UPDATE campaign_runs SET leads_total = %s, leads_overflow = %s,
                      status = CASE WHEN %s = 0 THEN 'completed' ELSE status END,
                      finished_at = CASE WHEN %s = 0 THEN now() END
                WHERE id = %s""", (len(times), overflow, len(times), len(times), run_id))
        details = {"config_id": cfg.id, "leads_total": len(times),
                   "leads_overflow": overflow, "invalid_phones": bad_phones, "manual": manual,
                   "first_at": times[0].isoformat() if times else None,
                   "last_at": times[-1].isoformat() if times else None}
        _event(run_id, "plan", f"planned {len(times)} messages of {cfg.label} for {day}", details)
        if bad_phones:
            _event(run_id, "plan", f"{bad_phones} leads of {cfg.label} have an invalid phone and were not planned",
                   {"invalid_phones": bad_phones}, "warning")
    log.info("run %s of %s planned for %s: %s messages, overflow %s, invalid phones %s",
             run_id, cfg.label, day, len(times), overflow, bad_phones)
    return CampaignRun.get_by_id(run_id)


def plan_due_runs(settings: Settings, *, now: dt.datetime | None = None) -> list[int]:
    """Plan today's run of every active config whose window is open (or opens within a minute)."""
    now = now or dt.datetime.now(UTC)
    rows = db.execute_sql(_CONFIG_SQL + " WHERE c.active").fetchall()
    configs = [_config_from_row(r) for r in rows]
    if not configs:
        return []
    existing = {(int(c), d) for c, d in db.execute_sql(
        "SELECT config_id, run_date FROM campaign_runs WHERE run_date BETWEEN %s AND %s",
        (now.date() - dt.timedelta(days=2), now.date() + dt.timedelta(days=2))).fetchall()}
    planned: list[int] = []
    for cfg in configs:
        day = _local_date(cfg, now)
        if (cfg.id, day) in existing:
            continue
        if not cfg.broken:
            if day.weekday() not in cfg.weekdays:
                continue
            bounds = window_bounds(day, cfg.timezone, cfg.window_start_minute, cfg.window_end_minute)
            if bounds is None or now >= bounds[1] or now < bounds[0] - dt.timedelta(seconds=PLAN_AHEAD_SECONDS):
                continue
        try:
            run = plan_run(cfg.id, now=now)
        except Exception:  # one broken config must not stop the others
            log.exception("planning config %s (%s) failed", cfg.id, cfg.label)
            continue
        if run is not None:
            planned.append(run.id)
    return planned


# --------------------------------------------------------------------------------------------
# database: keeping runs inside their window (R-DISP-3, R-DISP-4, E-06)
# --------------------------------------------------------------------------------------------

def skip_too_late(settings: Settings, now: dt.datetime | None = None) -> int:
    """Skip ('too_late') every pending message of a running run more than max_lateness late: one statement."""
    import pipeline

    now = now or dt.datetime.now(UTC)
    cutoff = now - dt.timedelta(seconds=settings.max_lateness_seconds)
    n = pipeline.skip_pending_where("r.status = 'running' AND m.scheduled_at < %s", (cutoff,), "too_late")
    if n:
        log.warning("skipped %s pending messages more than %ss late", n, settings.max_lateness_seconds)
    return n


def window_close_at(day: dt.date, timezone: str, start_minute: int, end_minute: int) -> dt.datetime | None:
    """When the window of a run dated ``day`` closes, UTC (None: it never opens that day)."""
    bounds = window_bounds(day, timezone, start_minute, end_minute)
    return bounds[1] if bounds else None


#: every status a run can still change in: the window guard closes all of them at day end (R-DISP-4, E-26)
OPEN_RUN_STATUSES = ("planning", "running", "paused")
#: the campaign_events step of the note that a run was closed at its window's end while paused
WINDOW_STEP = "window"


def due_window_closed_runs(now: dt.datetime | None = None,
                           statuses: Sequence[str] = OPEN_RUN_STATUSES) -> list[int]:
    """Ids of runs (in ``statuses``) whose local window has closed by ``now``."""
    now = now or dt.datetime.now(UTC)
    rows = db.execute_sql(
        """SELECT r.id, r.run_date, c.timezone, c.window_start_minute, c.window_end_minute
             FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
            WHERE r.status = ANY(%s)""", (list(statuses),)).fetchall()
    closed: list[int] = []
    for run_id, day, tz, ws_min, we_min in rows:
        try:
            close = window_close_at(day, tz, ws_min, we_min)
        except PlanError:
            close = None  # unknown timezone: its window can never be honoured
        if close is None or now >= close:
            closed.append(int(run_id))
    return closed


# Once per run (the guard comes back every 15 s to a run that a message mid-parts keeps open):
# a paused run's reason, written before its completion clears ``campaign_runs.pause_reason``
# (the schema ties pause_reason to status 'paused'), so the report still says why (E-26).
_CLOSED_WHILE_PAUSED_SQL = f"""
    INSERT INTO campaign_events (run_id, step, level, text, details)
    SELECT r.id, '{WINDOW_STEP}', 'warning',
           'window closed while the run was paused (' || r.pause_reason || '): not-started messages skipped '
           || 'window_closed; once its messages in flight settle it completes and its leads are free again',
           jsonb_build_object('closed_while_paused', true, 'pause_reason', r.pause_reason)
      FROM campaign_runs r
     WHERE r.id = ANY(%s) AND r.status = 'paused'
       AND NOT EXISTS (SELECT 1 FROM campaign_events e
                        WHERE e.run_id = r.id AND e.step = '{WINDOW_STEP}' AND e.details ? 'closed_while_paused')
    RETURNING run_id, details ->> 'pause_reason'"""


def close_windows(now: dt.datetime | None = None) -> dict[str, object]:
    """Close every open run whose window closed: pending messages skipped 'window_closed', run completed.

    Any non-final status (R-DISP-4, E-26): a run ``paused`` for any reason closes too (its reason
    is kept in a ``campaign_events`` row the report shows), so its leads are eligible again for
    the next run of its config. A run also ``planning`` at its window's end is closed: the
    planner writes a run and its messages in one transaction, so such a run is stuck, and
    nothing would ever dispatch it. Messages in flight (mid-parts, a part ``sending``) are not
    processed yet: they keep their run open until they settle, and their last statement
    completes it.
    """
    import pipeline

    run_ids = due_window_closed_runs(now)
    if not run_ids:
        return {"runs": [], "skipped": 0, "completed": []}
    with db.atomic():
        # no run lock up front: skip_pending_where locks messages then runs, the order every
        # terminal statement of the chain uses, so the guard never deadlocks with a worker
        noted = db.execute_sql(_CLOSED_WHILE_PAUSED_SQL, (run_ids,)).fetchall()
        skipped = pipeline.skip_pending_where("r.id = ANY(%s)", (run_ids,), "window_closed")
        pipeline.complete_runs_if_done(run_ids)
        # complete_runs_if_done knows running and paused runs; a stuck 'planning' one is closed here
        for (run_id,) in db.execute_sql(
                """UPDATE campaign_runs SET status = 'completed', finished_at = now()
                    WHERE id = ANY(%s) AND status = 'planning' AND leads_processed >= leads_total
                    RETURNING id""", (run_ids,)).fetchall():
            pipeline.log_event("run", "run completed (closed at its window's end while still planning)",
                               run_id=run_id, level="warning")
        # the skip's own statement completes most of them: report every one that is closed now
        completed = [int(r[0]) for r in db.execute_sql(
            "SELECT id FROM campaign_runs WHERE id = ANY(%s) AND status = 'completed' ORDER BY id",
            (run_ids,)).fetchall()]
    for run_id, reason in noted:
        log.warning("run %s: window closed while paused (%s); not-started messages skipped", run_id, reason)
    if skipped:
        log.info("window closed on runs %s: %s pending messages skipped", run_ids, skipped)
    return {"runs": run_ids, "skipped": skipped, "completed": completed}


def closed_while_paused(run_id: int) -> str | None:
    """The pause reason of a run closed at its window's end while paused (E-26), else None."""
    row = db.execute_sql(
        f"""SELECT details ->> 'pause_reason' FROM campaign_events
             WHERE run_id = %s AND step = '{WINDOW_STEP}' AND details ? 'closed_while_paused'
             ORDER BY id DESC LIMIT 1""", (run_id,)).fetchone()
    return row[0] if row else None


# --------------------------------------------------------------------------------------------
# database: operator transitions (R-OPS-3, E-22)
# --------------------------------------------------------------------------------------------

def _state_error(run_id: int, action: str, allowed: str) -> RunStateError:
    row = db.execute_sql("SELECT status, pause_reason FROM campaign_runs WHERE id = %s", (run_id,)).fetchone()
    if row is None:
        return RunStateError(f"run {run_id} does not exist")
    status, reason = row
    what = f"{status} ({reason})" if reason else status
    return RunStateError(f"run {run_id} is {what}, cannot {action} (only a {allowed} run can)")


def pause_run(run_id: int, reason: str = "manual") -> str | None:
    """Pause a running run: nothing new is dispatched; in-flight messages finish (R-OPS-3).

    The operator's pause (``manual``) of a run the engine paused by itself (``inbox_disconnected``,
    ``inbox_disabled``, ``provider_auth``, ``error_threshold``…) takes it over: the reason becomes
    ``manual``, so no automatic resume (inbox back, inbox enabled, dead letter requeued) ends it,
    only the operator's ``resume``. Returns the automatic reason taken over, None for a running run.
    """
    with db.atomic():
        row = db.execute_sql("SELECT status, pause_reason FROM campaign_runs WHERE id = %s FOR UPDATE",
                             (run_id,)).fetchone()
        status, was = row if row else (None, None)
        takeover = reason == "manual" and status == "paused" and was != "manual"
        if status != "running" and not takeover:
            raise _state_error(run_id, "pause", "running or automatically paused")
        db.execute_sql("UPDATE campaign_runs SET status = 'paused', pause_reason = %s WHERE id = %s",
                       (reason, run_id))
        if takeover:
            _event(run_id, "operator", f"run paused ({reason}): the operator's pause replaces the automatic one "
                                       f"({was}); only `resume` resumes it", {"reason": reason, "was": was})
        else:
            _event(run_id, "operator", f"run paused ({reason})", {"reason": reason})
    log.info("run %s paused (%s)%s", run_id, reason, f", taking over its automatic pause ({was})" if takeover else "")
    return was if takeover else None


def replan_pending(run_id: int, *, now: dt.datetime | None = None, rng: random.Random | None = None) -> dict[str, int]:
    """Re-plan a run's pending messages from now into its remaining window (E-22); skip what no longer fits.

    Nothing changes when no pending message is overdue. Otherwise every pending message (in its
    planned order) gets a new time: the first at least ``gap_min`` after the latest message already
    dispatched, the next ones ``[gap_min, gap_max]`` apart, never a burst of overdue ones. Messages
    that no longer fit before the window closes are skipped ``window_closed``. Call inside the
    transaction that resumes the run.
    """
    import pipeline

    now = now or dt.datetime.now(UTC)
    rng = rng or random.Random()
    cfg_row = db.execute_sql(
        """SELECT r.run_date, c.timezone, c.window_start_minute, c.window_end_minute, c.gap_min_seconds,
                  c.gap_max_seconds
             FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id WHERE r.id = %s""",
        (run_id,)).fetchone()
    if cfg_row is None:
        raise RunStateError(f"run {run_id} does not exist")
    day, tz, ws_min, we_min, gmin, gmax = cfg_row
    pending = db.execute_sql(
        """SELECT id, scheduled_at FROM campaign_messages WHERE run_id = %s AND status = 'pending'
            ORDER BY scheduled_at, id FOR UPDATE""", (run_id,)).fetchall()
    if not pending or pending[0][1] >= now:
        return {"replanned": 0, "skipped": 0}
    last_row = db.execute_sql(
        "SELECT max(scheduled_at) FROM campaign_messages WHERE run_id = %s AND status <> 'pending'",
        (run_id,)).fetchone()
    try:
        bounds = window_bounds(day, tz, ws_min, we_min)
    except PlanError:
        bounds = None
    times: list[dt.datetime] = []
    if bounds is not None:
        start = max(now, bounds[0])
        if last_row[0] is not None:
            start = max(start, last_row[0] + dt.timedelta(seconds=float(gmin)))
        times = spread_times(start, bounds[1], gap_min=float(gmin), gap_max=float(gmax), count=len(pending),
                             rng=rng, first_offset_max=float(gmax) - float(gmin))
    ids = [int(p[0]) for p in pending]
    if times:
        db.execute_sql(
            """UPDATE campaign_messages m SET scheduled_at = t.at
                 FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(id, at)
                WHERE m.id = t.id AND m.status = 'pending'""",
            ("{" + ",".join(map(str, ids[:len(times)])) + "}", _ts_array(times)))
    rest = ids[len(times):]
    skipped = pipeline.skip_pending_where("m.id = ANY(%s)", (rest,), "window_closed") if rest else 0
    log.info("run %s re-planned: %s pending messages moved, %s skipped window_closed", run_id, len(times), skipped)
    return {"replanned": len(times), "skipped": skipped}


def resume_run(run_id: int, now: dt.datetime | None = None, rng: random.Random | None = None, *,
               reason: str | None = None) -> dict[str, int]:
    """Resume a paused run, re-planning overdue pending messages into the remaining window (E-22).

    ``reason``: resume only a run paused for that reason (an automatic resume must never end a
    pause the operator took over meanwhile); RunStateError otherwise.
    """
    import pipeline

    with db.atomic():
        row = db.execute_sql(
            """UPDATE campaign_runs SET status = 'running', pause_reason = NULL
                WHERE id = %s AND status = 'paused' AND (%s::text IS NULL OR pause_reason = %s)
                RETURNING id""", (run_id, reason, reason)).fetchone()
        if row is None:
            raise _state_error(run_id, "resume", f"paused ({reason})" if reason else "paused")
        result = replan_pending(run_id, now=now, rng=rng)
        pipeline.complete_runs_if_done([run_id])
        _event(run_id, "operator", "run resumed", result)
    log.info("run %s resumed: %s", run_id, result)
    return result


def cancel_run(run_id: int) -> int:
    """Cancel a running or paused run: pending messages skipped 'cancelled', in-flight ones finish."""
    import pipeline

    with db.atomic():
        row = db.execute_sql(
            """UPDATE campaign_runs SET status = 'cancelled', pause_reason = NULL, finished_at = now()
                WHERE id = %s AND status IN ('planning', 'running', 'paused') RETURNING id""",
            (run_id,)).fetchone()
        if row is None:
            raise _state_error(run_id, "cancel", "running or paused")
        skipped = pipeline.skip_pending_where("m.run_id = %s", (run_id,), "cancelled")
        _event(run_id, "operator", "run cancelled", {"skipped": skipped})
    log.info("run %s cancelled: %s pending messages skipped", run_id, skipped)
    return skipped
