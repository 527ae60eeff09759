"""Run transitions: pause, resume (re-planned into the window, E-22), cancel, completion, and the
window guard that closes runs at the end of their day (R-OPS-3, R-DISP-4, E-26)."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Sequence
from typing import Any

from campaign import events, outcomes
from campaign.db import db
from campaign.errors import PlanError, RunStateError
from campaign.events import log_event
from campaign.planner import UTC, _event, _ts_array, spread_times, window_bounds, window_close_at
from campaign.settings import Settings
from campaign.sql import fetch_all as _all

log = logging.getLogger(__name__)


def complete_runs_if_done(run_ids: list[int] | None = None) -> list[int]:
    """Complete running/paused runs whose every message is processed; return their ids."""
    rows = _all(
        """UPDATE campaign_runs SET status = 'completed', pause_reason = NULL, finished_at = now()
                   WHERE status IN ('running', 'paused') AND leads_processed >= leads_total
                     AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[]))
                   RETURNING id""",
        (run_ids, run_ids),
    )
    done = [r[0] for r in rows]
    for run_id in done:
        log_event("run", "run completed", run_id=run_id)
    return done


def pause_runs(condition_sql: str, params: Sequence[Any], reason: str) -> list[int]:
    """Pause running runs matching ``condition_sql`` (alias r) with ``reason``; return their ids."""
    rows = _all(
        f"""UPDATE campaign_runs r SET status = 'paused', pause_reason = %s
                    WHERE r.status = 'running' AND ({condition_sql}) RETURNING r.id""",
        (reason, *params),
    )
    paused = [r[0] for r in rows]
    for run_id in paused:
        log_event("run", f"run paused: {reason}", run_id=run_id, level="warning")
    return paused


#: runs (alias r) of every campaign whose sender pool holds the inbox ``%s`` (R-POOL-1)
POOL_HOLDS_INBOX = "r.config_id IN (SELECT p.config_id FROM campaign_config_inboxes p WHERE p.inbox_id = %s)"


def pause_inbox_runs(inbox_id: int, reason: str) -> list[int]:
    """Pause the running runs of every campaign whose pool holds ``inbox_id`` with ``reason``.

    Until pool failover (R-POOL-3) moves a down member's messages to the others, a run pauses when
    any member of its pool goes down, as a one-inbox run does.
    """
    return pause_runs(POOL_HOLDS_INBOX, (inbox_id,), reason)


def resume_paused_run(run_id: int, reason: str) -> bool:
    """Resume a run still paused for ``reason`` (its overdue messages re-planned, E-22); False when it
    is not (an operator took the pause over, another scheduler resumed it)."""
    try:
        resume_run(run_id, reason=reason)
    except RunStateError as exc:  # changed meanwhile (an operator, another scheduler)
        log.info("run %s not resumed: %s", run_id, exc)
        return False
    log_event("run", f"run resumed ({reason} cleared)", run_id=run_id)
    return True


def skip_too_late(settings: Settings, now: dt.datetime | None = None) -> int:
    """Skip ('too_late') every pending message of a running run more than max_lateness late: one statement."""
    now = now or dt.datetime.now(UTC)
    cutoff = now - dt.timedelta(seconds=settings.max_lateness_seconds)
    n = outcomes.skip_pending_where("r.status = 'running' AND m.scheduled_at < %s", (cutoff,), "too_late")
    if n:
        log.warning("skipped %s pending messages more than %ss late", n, settings.max_lateness_seconds)
    return n


#: every status a run can still change in: the window guard closes all of them at day end (R-DISP-4, E-26)
OPEN_RUN_STATUSES = ("planning", "running", "paused")


#: the campaign_events step of the note that a run was closed at its window's end while paused
WINDOW_STEP = "window"


def due_window_closed_runs(now: dt.datetime | None = None, statuses: Sequence[str] = OPEN_RUN_STATUSES) -> list[int]:
    """Ids of runs (in ``statuses``) whose local window has closed by ``now``."""
    now = now or dt.datetime.now(UTC)
    rows = db.execute_sql(
        """SELECT r.id, r.run_date, c.timezone, c.window_start_minute, c.window_end_minute
             FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
            WHERE r.status = ANY(%s)""",
        (list(statuses),),
    ).fetchall()
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
    run_ids = due_window_closed_runs(now)
    if not run_ids:
        return {"runs": [], "skipped": 0, "completed": []}
    with db.atomic():
        # no run lock up front: skip_pending_where locks messages then runs, the order every
        # terminal statement of the chain uses, so the guard never deadlocks with a worker
        noted = db.execute_sql(_CLOSED_WHILE_PAUSED_SQL, (run_ids,)).fetchall()
        skipped = outcomes.skip_pending_where("r.id = ANY(%s)", (run_ids,), "window_closed")
        complete_runs_if_done(run_ids)
        # complete_runs_if_done knows running and paused runs; a stuck 'planning' one is closed here
        for (run_id,) in db.execute_sql(
            """UPDATE campaign_runs SET status = 'completed', finished_at = now()
                    WHERE id = ANY(%s) AND status = 'planning' AND leads_processed >= leads_total
                    RETURNING id""",
            (run_ids,),
        ).fetchall():
            events.log_event(
                "run", "run completed (closed at its window's end while still planning)", run_id=run_id, level="warning"
            )
        # the skip's own statement completes most of them: report every one that is closed now
        completed = [
            int(r[0])
            for r in db.execute_sql(
                "SELECT id FROM campaign_runs WHERE id = ANY(%s) AND status = 'completed' ORDER BY id", (run_ids,)
            ).fetchall()
        ]
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
             ORDER BY id DESC LIMIT 1""",
        (run_id,),
    ).fetchone()
    return row[0] if row else None


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
        row = db.execute_sql(
            "SELECT status, pause_reason FROM campaign_runs WHERE id = %s FOR UPDATE", (run_id,)
        ).fetchone()
        status, was = row if row else (None, None)
        takeover = reason == "manual" and status == "paused" and was != "manual"
        if status != "running" and not takeover:
            raise _state_error(run_id, "pause", "running or automatically paused")
        db.execute_sql("UPDATE campaign_runs SET status = 'paused', pause_reason = %s WHERE id = %s", (reason, run_id))
        if takeover:
            _event(
                run_id,
                "operator",
                f"run paused ({reason}): the operator's pause replaces the automatic one "
                f"({was}); only `resume` resumes it",
                {"reason": reason, "was": was},
            )
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
    now = now or dt.datetime.now(UTC)
    rng = rng or random.Random()
    cfg_row = db.execute_sql(
        """SELECT r.run_date, c.timezone, c.window_start_minute, c.window_end_minute, c.gap_min_seconds,
                  c.gap_max_seconds
             FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id WHERE r.id = %s""",
        (run_id,),
    ).fetchone()
    if cfg_row is None:
        raise RunStateError(f"run {run_id} does not exist")
    day, tz, ws_min, we_min, gmin, gmax = cfg_row
    pending = db.execute_sql(
        """SELECT id, scheduled_at FROM campaign_messages WHERE run_id = %s AND status = 'pending'
            ORDER BY scheduled_at, id FOR UPDATE""",
        (run_id,),
    ).fetchall()
    if not pending or pending[0][1] >= now:
        return {"replanned": 0, "skipped": 0}
    last_row = db.execute_sql(
        "SELECT max(scheduled_at) FROM campaign_messages WHERE run_id = %s AND status <> 'pending'", (run_id,)
    ).fetchone()
    try:
        bounds = window_bounds(day, tz, ws_min, we_min)
    except PlanError:
        bounds = None
    times: list[dt.datetime] = []
    if bounds is not None:
        start = max(now, bounds[0])
        if last_row[0] is not None:
            start = max(start, last_row[0] + dt.timedelta(seconds=float(gmin)))
        times = spread_times(
            start,
            bounds[1],
            gap_min=float(gmin),
            gap_max=float(gmax),
            count=len(pending),
            rng=rng,
            first_offset_max=float(gmax) - float(gmin),
        )
    ids = [int(p[0]) for p in pending]
    if times:
        db.execute_sql(
            """UPDATE campaign_messages m SET scheduled_at = t.at
                 FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(id, at)
                WHERE m.id = t.id AND m.status = 'pending'""",
            ("{" + ",".join(map(str, ids[: len(times)])) + "}", _ts_array(times)),
        )
    rest = ids[len(times) :]
    skipped = outcomes.skip_pending_where("m.id = ANY(%s)", (rest,), "window_closed") if rest else 0
    log.info("run %s re-planned: %s pending messages moved, %s skipped window_closed", run_id, len(times), skipped)
    return {"replanned": len(times), "skipped": skipped}


def resume_run(
    run_id: int, now: dt.datetime | None = None, rng: random.Random | None = None, *, reason: str | None = None
) -> dict[str, int]:
    """Resume a paused run, re-planning overdue pending messages into the remaining window (E-22).

    ``reason``: resume only a run paused for that reason (an automatic resume must never end a
    pause the operator took over meanwhile); RunStateError otherwise.
    """
    with db.atomic():
        row = db.execute_sql(
            """UPDATE campaign_runs SET status = 'running', pause_reason = NULL
                WHERE id = %s AND status = 'paused' AND (%s::text IS NULL OR pause_reason = %s)
                RETURNING id""",
            (run_id, reason, reason),
        ).fetchone()
        if row is None:
            raise _state_error(run_id, "resume", f"paused ({reason})" if reason else "paused")
        result = replan_pending(run_id, now=now, rng=rng)
        complete_runs_if_done([run_id])
        _event(run_id, "operator", "run resumed", result)
    log.info("run %s resumed: %s", run_id, result)
    return result


def cancel_run(run_id: int) -> int:
    """Cancel a running or paused run: pending messages skipped 'cancelled', in-flight ones finish."""
    with db.atomic():
        row = db.execute_sql(
            """UPDATE campaign_runs SET status = 'cancelled', pause_reason = NULL, finished_at = now()
                WHERE id = %s AND status IN ('planning', 'running', 'paused') RETURNING id""",
            (run_id,),
        ).fetchone()
        if row is None:
            raise _state_error(run_id, "cancel", "running or paused")
        skipped = outcomes.skip_pending_where("m.run_id = %s", (run_id,), "cancelled")
        _event(run_id, "operator", "run cancelled", {"skipped": skipped})
    log.info("run %s cancelled: %s pending messages skipped", run_id, skipped)
    return skipped
