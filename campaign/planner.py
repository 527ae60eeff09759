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

Within every cap (issue 22, R-HEALTH-1)
---------------------------------------
Each inbox of the pool gets only what its caps allow (:mod:`campaign.capacity`): its effective
daily cap today (warm-up ramp included) minus the sends every campaign already planned on it for
the day, in messages of :func:`~campaign.capacity.expected_parts` sends; and a gap floor from its
hourly cap, so no hour of its schedule holds more sends than the cap. What does not fit is
overflow, like a window too short.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import itertools
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from campaign import capacity
from campaign.db import db
from campaign.errors import PlanError, RunStateError
from campaign.pools import Assignment, Member, assign, capped_member, gap_us, paced_times
from campaign.sequence import EXCLUSION_RULES, REPLIED_SQL
from campaign.settings import Settings, get_settings
from campaign.sql import inbox_hands_over
from models import CampaignRun

log = logging.getLogger(__name__)

__all__ = [
    "PlanError",
    "RunStateError",
    "window_bounds",
    "plan_schedule",
    "spread_times",
    "plan_run",
    "plan_due_runs",
    "find_config",
    "window_close_at",
    "entered_before",
    "E164_SQL_REGEX",
    "PLAN_AHEAD_SECONDS",
]

UTC = dt.UTC

#: PostgreSQL regex of a valid E.164 phone (R-PLAN-2, E-18): '+', no leading 0, 7..15 digits
E164_SQL_REGEX = r"^\+[1-9][0-9]{6,14}$"
#: a due config is planned this long before its window opens, so its first message is ready on time
PLAN_AHEAD_SECONDS = 60
#: transaction advisory-lock namespace serialising the planning of one config (E-19)
PLAN_LOCK_NAMESPACE = 0x706C616E  # "plan"

_SAMPLE = dt.timedelta(minutes=30)  # zone offsets are sampled this often, changes bisected to the second


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
def _window_bounds_cached(
    tz: dt.tzinfo, day: dt.date, start_minute: int, end_minute: int
) -> tuple[dt.datetime, dt.datetime] | None:
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


def window_bounds(
    day: dt.date, tz: dt.tzinfo | str, start_minute: int, end_minute: int
) -> tuple[dt.datetime, dt.datetime] | None:
    """UTC ``(open, close)`` of the local window ``[start, end)`` minutes on ``day``; None if it never exists."""
    if not 0 <= start_minute < end_minute <= 1440:
        raise PlanError(f"window {start_minute}..{end_minute} minutes is not 0 <= start < end <= 1440")
    return _window_bounds_cached(_zone(tz), day, start_minute, end_minute)


def spread_times(
    start: dt.datetime,
    end: dt.datetime,
    *,
    gap_min: float,
    gap_max: float,
    count: int,
    rng: random.Random,
    first_offset_max: float | None = None,
) -> list[dt.datetime]:
    """Up to ``count`` instants in ``[start, end)``: the first at start + U(0, first_offset_max), then
    gaps in [min, max]."""
    if count <= 0:
        gap_us(gap_min, gap_max)
        return []
    times = paced_times(start, end, gap_min=gap_min, gap_max=gap_max, rng=rng, first_offset_max=first_offset_max)
    return list(itertools.islice(times, count))


def plan_schedule(
    *,
    now_utc: dt.datetime,
    tz: dt.tzinfo | str,
    weekdays: Iterable[int],
    window_start_minute: int,
    window_end_minute: int,
    gap_min: float,
    gap_max: float,
    daily_limit: int,
    n_leads: int,
    rng: random.Random,
) -> tuple[list[dt.datetime], int]:
    """Today's send times (UTC, ascending) for ``n_leads`` leads and the overflow (leads not scheduled)."""
    span = _span_today(now_utc, tz, weekdays, window_start_minute, window_end_minute)
    if span is None:
        return [], n_leads
    times = spread_times(span[0], span[1], gap_min=gap_min, gap_max=gap_max, count=min(daily_limit, n_leads), rng=rng)
    return times, n_leads - len(times)


def _span_today(
    now_utc: dt.datetime, tz: dt.tzinfo | str, weekdays: Iterable[int], start_minute: int, end_minute: int
) -> tuple[dt.datetime, dt.datetime] | None:
    """``(max(window open, now), window close)`` of today's window (UTC); None when there is none left today."""
    if now_utc.tzinfo is None:
        raise PlanError("now_utc must be timezone-aware")
    zone = _zone(tz)
    today = now_utc.astimezone(zone).date()
    if today.weekday() not in set(weekdays):
        return None
    bounds = window_bounds(today, zone, start_minute, end_minute)
    if bounds is None:
        return None
    return max(bounds[0], now_utc.astimezone(UTC)), bounds[1]


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
    skip_if_replied: bool = True  # R-IN-3
    min_days_in_column: int = 0  # R-SEQ-1
    parts: int = 1  # sends one message is planned to take (capacity.expected_parts)

    @property
    def label(self) -> str:
        return f"{self.workspace}/{self.name}"


_CONFIG_SQL = f"""
    SELECT c.id, c.workspace_id, w.name, c.name, c.inbox_id, c.source_column_id, c.target_column_id,
           c.weekdays, c.window_start_minute, c.window_end_minute, c.timezone, c.daily_limit,
           c.gap_min_seconds, c.gap_max_seconds, c.active,
           {capacity.expected_parts_sql("c")},
           i.id IS NOT NULL, i.workspace_id = c.workspace_id,
           sc.id IS NOT NULL, sc.workspace_id = c.workspace_id,
           tc.id IS NOT NULL, tc.workspace_id = c.workspace_id,
           c.skip_if_replied, c.min_days_in_column
      FROM campaign_configs c
      JOIN workspaces w ON w.id = c.workspace_id
      LEFT JOIN inboxes i ON i.id = c.inbox_id
      LEFT JOIN columns sc ON sc.id = c.source_column_id
      LEFT JOIN columns tc ON tc.id = c.target_column_id"""


def _config_from_row(row: Sequence) -> _Config:
    (
        cid,
        ws_id,
        ws,
        name,
        inbox_id,
        src,
        tgt,
        weekdays,
        ws_min,
        we_min,
        tz,
        limit,
        gmin,
        gmax,
        active,
        parts,
        inbox_ok,
        inbox_same,
        src_ok,
        src_same,
        tgt_ok,
        tgt_same,
        skip_if_replied,
        min_days,
    ) = row
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
    return _Config(
        cid,
        ws_id,
        ws,
        name,
        inbox_id,
        src,
        tgt,
        tuple(weekdays or ()),
        ws_min,
        we_min,
        tz,
        limit,
        float(gmin),
        float(gmax),
        active,
        broken,
        bool(skip_if_replied),
        int(min_days),
        int(parts),
    )


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
    row = db.execute_sql(
        """SELECT c.id FROM campaign_configs c JOIN workspaces w ON w.id = c.workspace_id
                             WHERE w.name = %s AND c.name = %s""",
        (ws, name),
    ).fetchone()
    if row is None:
        raise PlanError(f"campaign {label!r} does not exist (workspace {ws!r}, campaign {name!r})")
    return int(row[0])


def _local_date(cfg: _Config, now: dt.datetime) -> dt.date:
    try:
        return now.astimezone(_zone(cfg.timezone)).date()
    except PlanError:
        return now.astimezone(UTC).date()


def _event(run_id: int | None, step: str, text: str, details: dict, level: str = "info") -> None:
    db.execute_sql(
        "INSERT INTO campaign_events (run_id, step, level, text, details) VALUES (%s, %s, %s, %s, %s)",
        (run_id, step, level, text, json.dumps(details)),
    )


def entered_before(day: dt.date, tz: dt.tzinfo | str, min_days: int) -> dt.datetime | None:
    """The instant before which a lead must have entered its column to be eligible on ``day`` for a
    campaign with ``min_days_in_column = min_days`` (R-SEQ-1); None when it is 0 (no wait).

    Days are the campaign's LOCAL calendar days, not periods of 24 h: a lead that entered "Contacted"
    on Monday at 17:00 is 3 days in it on Thursday from the local midnight on, so Thursday's 09:00 run
    of a 3-day follow-up writes to it, as an operator expects (with 72 h it would wait for Friday).
    So the bound is the local midnight that starts day ``day - min_days + 1``: entered before it means
    entered on day ``day - min_days`` or earlier. DST changes no count (midnights are local)."""
    if min_days <= 0:
        return None
    zone = _zone(tz)
    first_too_recent = day - dt.timedelta(days=min_days - 1)
    bounds = window_bounds(first_too_recent, zone, 0, 1440)
    if bounds is None:  # a local date the zone skipped (Samoa, 2011-12-30): its next day's start
        bounds = window_bounds(first_too_recent + dt.timedelta(days=1), zone, 0, 1440)
    return bounds[0] if bounds else dt.datetime.combine(first_too_recent, dt.time(0), tzinfo=zone)


# One query (R-PLAN-2, no N+1): every lead of the source column with a flag for its phone and the
# rule that excludes it, if any (counted on the run, R-SEQ), minus the leads this config already
# holds in an active run (E-19: never in two active runs of one config) or already messaged today
# (local day start). The rules are campaign.sequence's, in its order: opted out (R-IN-4), replied
# since it entered the column (skip_if_replied, R-IN-3), entered too recently (min_days_in_column,
# R-SEQ-1). Both times are columns of the row, so the rules cost nothing per lead (T-PERF-4).
#
# Each lead comes with the pool inbox it already talks to (R-POOL-2 sticky: its latest conversation
# with a member of this config's pool), found by one join, not a lookup per lead.
_LEADS_SQL = f"""
    SELECT l.id, l.phone ~ '{E164_SQL_REGEX}' AS phone_ok, s.inbox_id AS sticky_inbox,
           CASE WHEN l.opted_out THEN 'opted_out'
                WHEN %(skip_if_replied)s AND {REPLIED_SQL} THEN 'replied'
                WHEN l.column_changed_at >= %(entered_before)s THEN 'too_recent'
           END AS excluded
      FROM leads l
      LEFT JOIN (SELECT DISTINCT ON (cv.lead_id) cv.lead_id, cv.inbox_id
                   FROM conversations cv
                   JOIN campaign_config_inboxes p ON p.inbox_id = cv.inbox_id AND p.config_id = %(config)s
                  ORDER BY cv.lead_id, cv.updated_at DESC, cv.id DESC) s ON s.lead_id = l.id
     WHERE l.workspace_id = %(workspace)s AND l.column_id = %(column)s
       AND NOT EXISTS (
           SELECT 1 FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
            WHERE m.lead_id = l.id AND r.config_id = %(config)s AND r.id <> %(run)s
              AND (r.status IN ('planning', 'running', 'paused')
                   OR (m.sent_at IS NOT NULL AND m.sent_at >= %(day_start)s)
                   -- a message in doubt may have reached the lead: nothing new is written to it
                   -- until the operator resolves it (R-FAIL-4; resolve --sent moves the lead on)
                   OR m.status = 'in_doubt'))
     ORDER BY l.id"""

# The pool of a config with each member's caps at the planning instant (R-POOL-2, R-HEALTH-1):
# its effective daily cap (warm-up ramp, health) and hourly cap, and the sends every campaign
# already planned on it for the day: a message not started counts its campaign's expected parts,
# a started or finished one the parts it sent or still has to send (skipped ones sent nothing);
# and whether it hands its work over (R-POOL-3).
_POOL_SQL = f"""
    SELECT p.inbox_id, p.position, {capacity.daily_cap_sql("i", "%(at)s")} AS day_cap,
           {capacity.hourly_cap_sql("i")} AS hour_cap,
           (SELECT coalesce(sum(CASE WHEN m.status IN ('pending', 'queued', 'generating', 'splitting')
                                     THEN {capacity.expected_parts_sql("c2")}
                                     ELSE (SELECT count(*) FROM message_parts mp
                                            WHERE mp.message_id = m.id
                                              AND (mp.status IN ('sent', 'sending', 'in_doubt')
                                                   OR (mp.status = 'pending' AND m.status = 'sending'))) END), 0)
              FROM campaign_messages m
              JOIN campaign_runs r2 ON r2.id = m.run_id
              JOIN campaign_configs c2 ON c2.id = r2.config_id
             WHERE m.inbox_id = p.inbox_id AND m.scheduled_at >= %(day_start)s AND m.scheduled_at < %(day_end)s
               AND m.status <> 'skipped') AS planned_sends,
           {{hands_over}} AS down
      FROM campaign_config_inboxes p JOIN inboxes i ON i.id = p.inbox_id
     WHERE p.config_id = %(config)s
     ORDER BY p.position"""


def _pool(cfg: _Config, now: dt.datetime, day_start: dt.datetime, day_end: dt.datetime) -> list[Member]:
    """The pool's members within their caps of the day (issue 22, R-HEALTH-1). A member that hands
    its work over (disabled, restricted, or disconnected for POOL_FAILOVER_SECONDS, R-POOL-3) gets
    no room while another member could take it: its sticky leads wait for it, the rest go to the
    others (a pool of members all down plans as before, and its run pauses)."""
    sql = _POOL_SQL.format(hands_over=inbox_hands_over(get_settings().pool_failover_seconds))
    rows = db.execute_sql(sql, {"at": now, "day_start": day_start, "day_end": day_end, "config": cfg.id}).fetchall()
    usable = any(not down for *_, down in rows)
    members = []
    for i, pos, day_cap, hour_cap, planned, down in rows:
        member = capped_member(int(i), int(pos), day_cap, hour_cap, int(planned), cfg.parts)
        members.append(dataclasses.replace(member, remaining=0) if down and usable else member)
    return members


def pool_members(config_id: int, day_start: dt.datetime, day_end: dt.datetime) -> list[Member]:
    """A config's pool with each member's room of the day, as planning sees it now: what failover
    uses (R-POOL-3)."""
    return _pool(_load_config(config_id), dt.datetime.now(UTC), day_start, day_end)


def _insert_run(cfg: _Config, day: dt.date, status: str, manual: bool, failure: str | None = None) -> int | None:
    row = db.execute_sql(
        """INSERT INTO campaign_runs (config_id, run_date, status, manual, failure_reason, started_at, finished_at)
           VALUES (%s, %s, %s, %s, %s, now(), CASE WHEN %s = 'failed' THEN now() END)
           ON CONFLICT (config_id, run_date) DO NOTHING RETURNING id""",
        (cfg.id, day, status, manual, failure, status),
    ).fetchone()
    return int(row[0]) if row else None


def _check_window_open(cfg: _Config, day: dt.date, now: dt.datetime) -> None:
    """Refuse a manual run whose window is closed for the rest of today (it would block the date)."""
    if day.weekday() not in cfg.weekdays:
        raise PlanError(f"campaign {cfg.label} does not run on {day:%A}s (weekdays in its config)")
    bounds = window_bounds(day, cfg.timezone, cfg.window_start_minute, cfg.window_end_minute)
    if bounds is None or now >= bounds[1]:
        raise PlanError(
            f"the window of campaign {cfg.label} is closed for the rest of {day} "
            f"({cfg.window_start_minute // 60:02d}:{cfg.window_start_minute % 60:02d}-"
            f"{cfg.window_end_minute // 60:02d}:{cfg.window_end_minute % 60:02d} {cfg.timezone})"
        )


def _ts_array(times: Sequence[dt.datetime]) -> str:
    return "{" + ",".join(t.isoformat() for t in times) + "}"


def _int_array(values: Sequence[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _assign(
    cfg: _Config,
    now: dt.datetime,
    zone: dt.tzinfo,
    lead_ids: list[int],
    sticky: dict[int, int],
    members: list[Member],
    rng: random.Random,
) -> Assignment:
    """Today's plan of a config: each lead an inbox of its pool and a time in today's window (R-POOL-2)."""
    span = _span_today(now, zone, cfg.weekdays, cfg.window_start_minute, cfg.window_end_minute)
    if span is None:
        return Assignment(overflow=len(lead_ids))
    return assign(
        lead_ids,
        sticky,
        members,
        start=span[0],
        end=span[1],
        gap_min=cfg.gap_min,
        gap_max=cfg.gap_max,
        daily_limit=cfg.daily_limit,
        rng=rng,
    )


def plan_run(
    config_id: int, *, now: dt.datetime | None = None, manual: bool = False, rng: random.Random | None = None
) -> CampaignRun | None:
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
        whole_day = window_bounds(day, zone, 0, 1440) or (now, now + dt.timedelta(days=1))
        rows = db.execute_sql(
            _LEADS_SQL,
            {
                "config": cfg.id,
                "workspace": cfg.workspace_id,
                "column": cfg.source_column_id,
                "run": run_id,
                "day_start": whole_day[0],
                "skip_if_replied": cfg.skip_if_replied,
                # no wait (min_days_in_column = 0): a bound no lead reaches
                "entered_before": entered_before(day, zone, cfg.min_days_in_column) or "infinity",
            },
        ).fetchall()
        excluded = dict.fromkeys(EXCLUSION_RULES, 0)
        for r in rows:
            if r[3] is not None:
                excluded[r[3]] += 1
        lead_ids = [r[0] for r in rows if r[1] and r[3] is None]
        sticky = {r[0]: r[2] for r in rows if r[1] and r[3] is None and r[2] is not None}
        bad_phones = sum(1 for r in rows if not r[1] and r[3] is None)
        plan = _assign(cfg, now, zone, lead_ids, sticky, _pool(cfg, now, *whole_day), rng)
        times = plan.times
        overflow = plan.overflow
        if times:
            db.execute_sql(
                """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
                   SELECT %s, t.lead_id, t.inbox_id, t.at
                     FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[]) AS t(lead_id, inbox_id, at)""",
                (run_id, _int_array(plan.lead_ids), _int_array(plan.inbox_ids), _ts_array(times)),
            )
        db.execute_sql(
            """UPDATE campaign_runs SET leads_total = %s, leads_overflow = %s,
                      excluded_too_recent = %s, excluded_replied = %s, excluded_opted_out = %s,
                      status = CASE WHEN %s = 0 THEN 'completed' ELSE status END,
                      finished_at = CASE WHEN %s = 0 THEN now() END
                WHERE id = %s""",
            (
                len(times),
                overflow,
                excluded["too_recent"],
                excluded["replied"],
                excluded["opted_out"],
                len(times),
                len(times),
                run_id,
            ),
        )
        details = {
            "config_id": cfg.id,
            "leads_total": len(times),
            "leads_overflow": overflow,
            "invalid_phones": bad_phones,
            "excluded": excluded,
            "manual": manual,
            "first_at": min(times).isoformat() if times else None,
            "last_at": max(times).isoformat() if times else None,
            "by_inbox": {str(k): v for k, v in sorted(plan.by_inbox().items())},
            "sticky_waiting": plan.sticky_waiting,
        }
        _event(run_id, "plan", f"planned {len(times)} messages of {cfg.label} for {day}", details)
        if bad_phones:
            _event(
                run_id,
                "plan",
                f"{bad_phones} leads of {cfg.label} have an invalid phone and were not planned",
                {"invalid_phones": bad_phones},
                "warning",
            )
    log.info(
        "run %s of %s planned for %s: %s messages, overflow %s, invalid phones %s",
        run_id,
        cfg.label,
        day,
        len(times),
        overflow,
        bad_phones,
    )
    return CampaignRun.get_by_id(run_id)


def plan_due_runs(settings: Settings, *, now: dt.datetime | None = None) -> list[int]:
    """Plan today's run of every active config whose window is open (or opens within a minute)."""
    now = now or dt.datetime.now(UTC)
    rows = db.execute_sql(_CONFIG_SQL + " WHERE c.active").fetchall()
    configs = [_config_from_row(r) for r in rows]
    if not configs:
        return []
    existing = {
        (int(c), d)
        for c, d in db.execute_sql(
            "SELECT config_id, run_date FROM campaign_runs WHERE run_date BETWEEN %s AND %s",
            (now.date() - dt.timedelta(days=2), now.date() + dt.timedelta(days=2)),
        ).fetchall()
    }
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


def window_close_at(day: dt.date, timezone: str, start_minute: int, end_minute: int) -> dt.datetime | None:
    """When the window of a run dated ``day`` closes, UTC (None: it never opens that day)."""
    bounds = window_bounds(day, timezone, start_minute, end_minute)
    return bounds[1] if bounds else None


# --------------------------------------------------------------------------------------------
# database: operator transitions (R-OPS-3, E-22)
# --------------------------------------------------------------------------------------------
