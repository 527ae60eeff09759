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
from campaign.sql import INBOX_CAN_SEND
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

#: runs (alias r) with a member of their pool that can send (R-POOL-3: such a run never pauses for an inbox)
POOL_CAN_SEND = f"""EXISTS (SELECT 1 FROM campaign_config_inboxes o JOIN inboxes i ON i.id = o.inbox_id
                            WHERE o.config_id = r.config_id AND {INBOX_CAN_SEND})"""

#: the pauses that end by themselves once a member of the run's pool can send again (R-FAIL-6, R-POOL-3)
POOL_DOWN_REASONS = ("inbox_disconnected", "inbox_disabled", "inbox_restricted")


def pause_inbox_runs(inbox_id: int, reason: str) -> list[int]:
    """Pause the running runs of every campaign whose pool holds ``inbox_id`` and has no OTHER member
    that can send (R-POOL-3): a pool of one pauses as before (E-07); a pool with a working member
    goes on, and the down member's messages wait for it or move to the others (campaign.failover).
    """
    condition = f"""{POOL_HOLDS_INBOX} AND NOT EXISTS (
        SELECT 1 FROM campaign_config_inboxes o JOIN inboxes i ON i.id = o.inbox_id
         WHERE o.config_id = r.config_id AND o.inbox_id <> %s AND {INBOX_CAN_SEND})"""
    return pause_runs(condition, (inbox_id, inbox_id), reason)


def pause_runs_that_cannot_send() -> list[int]:
    """Pause every running run no member of whose pool can send (a state stored by the health check
    or an event, not seen by a send): ``inbox_disabled`` when all are disabled, else
    ``inbox_disconnected``. The scheduler's failover job calls it; a no-op when all is well."""
    all_disabled = """NOT EXISTS (SELECT 1 FROM campaign_config_inboxes o JOIN inboxes i ON i.id = o.inbox_id
                                   WHERE o.config_id = r.config_id AND NOT i.disabled)"""
    paused = pause_runs(all_disabled, (), "inbox_disabled")
    return paused + pause_runs(f"NOT {POOL_CAN_SEND}", (), "inbox_disconnected")


def resume_runs_that_can_send(inbox_ids: Sequence[int] | None = None) -> list[int]:
    """Resume the runs paused for a down inbox (POOL_DOWN_REASONS) once a member of their pool can
    send again (R-POOL-3: "resumes when one comes back"); ``inbox_ids``: only the pools holding one
    of them. Each is resumed as an operator's resume is (overdue messages re-planned, E-22).

    The runs are locked first: an operator's pause of one of them lands either before (the run is
    no longer paused for an inbox and is left alone) or after the resume; it is never undone.
    """
    with db.atomic():
        rows = _all(
            f"""SELECT r.id, r.pause_reason FROM campaign_runs r
                 WHERE r.status = 'paused' AND r.pause_reason = ANY(%s) AND {POOL_CAN_SEND}
                   AND (%s::bigint[] IS NULL OR r.config_id IN (
                        SELECT p.config_id FROM campaign_config_inboxes p WHERE p.inbox_id = ANY(%s::bigint[])))
                 ORDER BY r.id
                   FOR UPDATE OF r""",
            (list(POOL_DOWN_REASONS), _ids(inbox_ids), _ids(inbox_ids)),
        )
        return [run_id for run_id, reason in rows if resume_paused_run(run_id, reason)]


def _ids(ids: Sequence[int] | None) -> list[int] | None:
    return None if ids is None else [int(i) for i in ids]


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
    # a message held for its pool member that cannot send (a sticky lead waiting for its number,
    # R-POOL-3) is not late: it is re-planned when the member comes back, or closed with the window
    n = outcomes.skip_pending_where(
        f"""r.status = 'running' AND m.scheduled_at < %s
            AND EXISTS (SELECT 1 FROM inboxes i WHERE i.id = m.inbox_id AND {INBOX_CAN_SEND})""",
        (cutoff,),
        "too_late",
    )
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


#: transaction advisory-lock namespace: one change of a run's schedule at a time (replan, failover)
SCHEDULE_LOCK_NAMESPACE = 0x706F6F6C  # "pool"


def pace_start(run_id: int, inbox_id: int, now: dt.datetime, window_open: dt.datetime, gap_min: float) -> dt.datetime:
    """When an inbox's next message of a run may go at the earliest: from now (inside the window),
    at least ``gap_min`` after the latest message of the run already dispatched on that inbox."""
    row = db.execute_sql(
        """SELECT max(scheduled_at) FROM campaign_messages
            WHERE run_id = %s AND inbox_id = %s AND status <> 'pending'""",
        (run_id, inbox_id),
    ).fetchone()
    start = max(now, window_open)
    if row and row[0] is not None:
        start = max(start, row[0] + dt.timedelta(seconds=gap_min))
    return start


def pace(
    start: dt.datetime, end: dt.datetime, gap_min: float, gap_max: float, count: int, rng: random.Random
) -> list[dt.datetime]:
    """Up to ``count`` times of one inbox from ``start`` (already ``gap_min`` after its last message)
    to ``end``: the planner's pacing (pools.paced_times), the first within ``gap_max - gap_min``."""
    return spread_times(
        start, end, gap_min=gap_min, gap_max=gap_max, count=count, rng=rng, first_offset_max=gap_max - gap_min
    )


def run_pacing(run_id: int) -> tuple[tuple[dt.datetime, dt.datetime] | None, float, float]:
    """A run's window ``(open, close)`` (UTC; None: none that day) and its gaps (min, max), seconds."""
    cfg_row = db.execute_sql(
        """SELECT r.run_date, c.timezone, c.window_start_minute, c.window_end_minute, c.gap_min_seconds,
                  c.gap_max_seconds
             FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id WHERE r.id = %s""",
        (run_id,),
    ).fetchone()
    if cfg_row is None:
        raise RunStateError(f"run {run_id} does not exist")
    day, tz, ws_min, we_min, gmin, gmax = cfg_row
    try:
        bounds = window_bounds(day, tz, ws_min, we_min)
    except PlanError:
        bounds = None
    return bounds, float(gmin), float(gmax)


def replan_pending(
    run_id: int, *, now: dt.datetime | None = None, rng: random.Random | None = None, inbox_id: int | None = None
) -> dict[str, int]:
    """Re-plan a run's overdue pending messages from now into its remaining window (E-22), inbox by
    inbox (the pacing of a pool is per inbox, R-POOL-2); skip what no longer fits.

    An inbox whose first pending message is not overdue is left alone. Otherwise every pending
    message of that inbox (in its planned order) gets a new time: the first at least ``gap_min``
    after the latest message of the run already dispatched on it, the next ones ``[gap_min,
    gap_max]`` apart, never a burst of overdue ones. Messages that no longer fit before the window
    closes are skipped ``window_closed``. ``inbox_id``: that inbox only (a member back, R-POOL-3).
    Call inside the transaction that resumes the run.
    """
    now = now or dt.datetime.now(UTC)
    rng = rng or random.Random()
    # one schedule change of a run at a time: a resume, a member back and a pool failover (R-POOL-3)
    # re-pace the same inboxes' messages; interleaved, two schedules could crowd one inbox
    db.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)", (SCHEDULE_LOCK_NAMESPACE, run_id))
    bounds, gmin, gmax = run_pacing(run_id)
    pending = db.execute_sql(
        """SELECT id, inbox_id, scheduled_at FROM campaign_messages
            WHERE run_id = %s AND status = 'pending' AND (%s::bigint IS NULL OR inbox_id = %s)
            ORDER BY scheduled_at, id FOR UPDATE""",
        (run_id, inbox_id, inbox_id),
    ).fetchall()
    by_inbox: dict[int, list[tuple[int, dt.datetime]]] = {}
    for mid, iid, at in pending:
        by_inbox.setdefault(int(iid), []).append((int(mid), at))
    moved_ids: list[int] = []
    moved_times: list[dt.datetime] = []
    rest: list[int] = []
    for iid, rows in sorted(by_inbox.items()):
        if rows[0][1] >= now:
            continue
        times: list[dt.datetime] = []
        if bounds is not None:
            start = pace_start(run_id, iid, now, bounds[0], gmin)
            times = pace(start, bounds[1], gmin, gmax, len(rows), rng)
        moved_ids += [mid for mid, _ in rows[: len(times)]]
        moved_times += times
        rest += [mid for mid, _ in rows[len(times) :]]
    if moved_ids:
        db.execute_sql(
            """UPDATE campaign_messages m SET scheduled_at = t.at
                 FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(id, at)
                WHERE m.id = t.id AND m.status = 'pending'""",
            ("{" + ",".join(map(str, moved_ids)) + "}", _ts_array(moved_times)),
        )
    skipped = outcomes.skip_pending_where("m.id = ANY(%s)", (rest,), "window_closed") if rest else 0
    if moved_ids or skipped:
        log.info(
            "run %s re-planned: %s pending messages moved, %s skipped window_closed", run_id, len(moved_ids), skipped
        )
    return {"replanned": len(moved_ids), "skipped": skipped}


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
