"""Terminal transitions of campaign messages: status, lead move, run counters and run completion in
ONE statement each (E-04), so a crash can never separate them.

Every transition is conditional on the status it expects (DESIGN #2): run twice, it changes
nothing the second time (R-PIPE-5).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from campaign import ratelimit
from campaign.db import db
from campaign.events import log_event
from campaign.settings import Settings
from campaign.sql import ASYNC_COMMIT, prepared
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one
from campaign.steps import BY_NAME, IN_FLIGHT

log = logging.getLogger(__name__)


_RUN_COUNTERS_SET = """
    leads_sent = r.leads_sent + (%(st)s = 'sent')::int * %(n)s,
    leads_failed = r.leads_failed + (%(st)s = 'failed')::int * %(n)s,
    leads_skipped = r.leads_skipped + (%(st)s = 'skipped')::int * %(n)s,
    leads_in_doubt = r.leads_in_doubt + (%(st)s = 'in_doubt')::int * %(n)s,
    leads_processed = r.leads_processed + %(n)s,
    status = CASE
        WHEN r.status IN ('running', 'paused') AND r.leads_processed + %(n)s >= r.leads_total THEN 'completed'
        WHEN r.status = 'running' AND %(st)s = 'failed' AND r.leads_processed + %(n)s >= %(min_n)s
             AND (r.leads_failed + %(n)s)::float / (r.leads_processed + %(n)s) > %(ratio)s THEN 'paused'
        ELSE r.status END,
    pause_reason = CASE
        WHEN r.status IN ('running', 'paused') AND r.leads_processed + %(n)s >= r.leads_total THEN NULL
        WHEN r.status = 'running' AND %(st)s = 'failed' AND r.leads_processed + %(n)s >= %(min_n)s
             AND (r.leads_failed + %(n)s)::float / (r.leads_processed + %(n)s) > %(ratio)s THEN 'error_threshold'
        ELSE r.pause_reason END,
    finished_at = CASE
        WHEN r.status IN ('running', 'paused') AND r.leads_processed + %(n)s >= r.leads_total THEN now()
        ELSE r.finished_at END"""


# The outbound conversation log (R-IN-6), written by the statement that records a part `sent`
# (no round trip of its own, T-PERF-7). Needs a CTE ``part`` (or another name: out_log_ctes) returning
# the sent part's (id, message_id, text, provider_message_id). The conversation normally exists (the split step
# creates it): it is read, never locked, so a reply handled at the same moment cannot deadlock
# with the send; only a message split before it existed inserts it here.
def out_log_ctes(source: str = "part") -> str:
    """The outbound log CTEs (R-IN-6) over the CTE ``source`` returning the sent part's (id,
    message_id, text, provider_message_id)."""
    return f"""
conv_old AS (
    SELECT c.id, c.inbox_id FROM {source} JOIN campaign_messages mm ON mm.id = {source}.message_id
      JOIN conversations c ON c.lead_id = mm.lead_id AND c.inbox_id = mm.inbox_id
), conv_new AS (
    INSERT INTO conversations (workspace_id, lead_id, inbox_id)
    SELECT i.workspace_id, mm.lead_id, mm.inbox_id
      FROM {source} JOIN campaign_messages mm ON mm.id = {source}.message_id
      JOIN inboxes i ON i.id = mm.inbox_id
     WHERE mm.lead_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM conv_old)
    ON CONFLICT (lead_id, inbox_id) DO NOTHING
    RETURNING id, inbox_id
), out_log AS (
    INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id, text, part_id)
    SELECT c.id, c.inbox_id, 'out', {source}.provider_message_id, {source}.text, {source}.id
      FROM {source}, (SELECT id, inbox_id FROM conv_old UNION ALL SELECT id, inbox_id FROM conv_new) c
    ON CONFLICT (inbox_id, provider_message_id) DO NOTHING
    RETURNING conversation_id
)"""


OUT_LOG_CTES = out_log_ctes("part")


# The pieces of the terminal transition; the counters' %(n)s is 1 here: one message per statement.
_PART_CTE = """part AS (
    UPDATE message_parts SET status = 'sent', provider_message_id = %(key_id)s, sent_at = now()
    WHERE id = %(part_id)s AND attempt_id = %(attempt)s AND status = 'sending'
    RETURNING id, message_id, text, provider_message_id
)"""

_M_CTE = """m AS (
    UPDATE campaign_messages SET status = %(st)s, skip_reason = %(skip)s, error_class = %(err_class)s,
        error_message = %(err_msg)s, finished_at = now(), status_changed_at = now(),
        sent_at = CASE WHEN %(st)s = 'sent' THEN now() ELSE sent_at END,
        send_ms = CASE WHEN %(send_ms)s::int IS NULL THEN send_ms ELSE coalesce(send_ms, 0) + %(send_ms)s END,
        conversation_id = coalesce(conversation_id, (
            SELECT c.id FROM conversations c
             WHERE c.lead_id = campaign_messages.lead_id AND c.inbox_id = campaign_messages.inbox_id))
    WHERE id = %(id)s AND status = ANY(%(from)s){part_guard}
    RETURNING id, run_id, lead_id
)"""

_CTX_CTE = """ctx AS (
    SELECT m.run_id, m.lead_id, c.source_column_id AS src, c.target_column_id AS tgt, l.column_id AS old_col
    FROM m JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
    LEFT JOIN leads l ON l.id = m.lead_id
)"""

_LEAD_UPD_CTE = """lead_upd AS (
    UPDATE leads l SET last_activity_at = now(),
        column_id = CASE WHEN l.column_id = ctx.src AND ctx.tgt IS NOT NULL THEN ctx.tgt ELSE l.column_id END
    FROM ctx WHERE %(st)s = 'sent' AND l.id = ctx.lead_id
    RETURNING l.id
)"""

_RUN_UPD_CTE = (
    """run_upd AS (
    UPDATE campaign_runs r SET """
    + _RUN_COUNTERS_SET
    + """
    FROM m WHERE r.id = m.run_id
    RETURNING r.id, r.status, r.pause_reason
)"""
)

_LEASE_CTE = """lease AS (
    -- the send step's inbox slot, given back in the statement that records the send (T-PERF-1)
    UPDATE rate_limits SET lease_token = NULL, lease_until = NULL, updated_at = now(), last_at = now()
    WHERE %(lease_key)s::text IS NOT NULL AND key = %(lease_key)s AND lease_token = %(lease_token)s
    RETURNING key
)"""

_FINISH_SQL = (
    "WITH "
    + ", ".join(
        (
            _PART_CTE,
            OUT_LOG_CTES.strip(),
            _M_CTE.format(part_guard="\n      AND (%(part_id)s::bigint IS NULL OR EXISTS (SELECT 1 FROM part))"),
            _CTX_CTE,
            _LEAD_UPD_CTE,
            _RUN_UPD_CTE,
            _LEASE_CTE,
        )
    )
    + """
SELECT ctx.run_id, ctx.lead_id, ctx.src, ctx.tgt, ctx.old_col, run_upd.status, run_upd.pause_reason,
       (SELECT count(*) FROM part), (SELECT count(*) FROM lead_upd)
FROM ctx LEFT JOIN run_upd ON run_upd.id = ctx.run_id
"""
)

# The same transition when no part is recorded, no send slot is given back and the message does not
# end `sent` (a skip, a failure, in_doubt): the part, conversation-log, lead-move and lease CTEs
# would all be no-ops, so they are left out; PostgreSQL plans half a statement (a reply stopping a
# lead's follow-up takes this path: T-PERF-6).
_FINISH_BARE_SQL = (
    "WITH "
    + ", ".join((_M_CTE.format(part_guard=""), _CTX_CTE, _RUN_UPD_CTE))
    + """
SELECT ctx.run_id, ctx.lead_id, ctx.src, ctx.tgt, ctx.old_col, run_upd.status, run_upd.pause_reason, 0, 0
FROM ctx LEFT JOIN run_upd ON run_upd.id = ctx.run_id
"""
)


@dataclasses.dataclass(frozen=True)
class Finished:
    """What a terminal transition did (None of it happened when the transition lost a race)."""

    run_id: int
    lead_id: int | None
    run_status: str
    pause_reason: str | None
    lead_note: str | None  # why the lead was not moved, when it was not


def finish_message(
    message_id: int,
    status: str,
    settings: Settings,
    *,
    from_statuses: Iterable[str] = IN_FLIGHT,
    skip_reason: str | None = None,
    error: BaseException | None = None,
    error_class: str | None = None,
    error_message: str | None = None,
    last_part: tuple[int, uuid.UUID, str] | None = None,
    send_ms: int | None = None,
    lease: ratelimit.Grant | None = None,
    async_commit: bool = False,
) -> Finished | None:
    """Move one message to a terminal status with lead move, counters and run completion, atomically.

    ``last_part`` = (part id, attempt id, provider key id): that part becomes ``sent`` in the
    same statement, and nothing happens unless it was still ``sending`` with that attempt.
    ``lease``: an inbox send slot released (a send happened: the gap counts from now) in the
    same statement, whether or not the transition applies.
    ``async_commit``: the send step's record of its last part commits without waiting for the
    WAL flush (campaign.sql.ASYNC_COMMIT: lost, the part is back to ``sending`` and ends in
    doubt). Never inside a transaction holding other writes.
    """
    assert status in ("sent", "failed", "skipped", "in_doubt"), status
    if error is not None:
        error_class = error_class or getattr(error, "code", None) or type(error).__name__
        error_message = error_message or str(error)
    params = {
        "id": message_id,
        "st": status,
        "from": list(from_statuses),
        "skip": skip_reason,
        "err_class": error_class,
        "err_msg": (error_message or None) and error_message[:2000],
        "part_id": last_part[0] if last_part else None,
        "attempt": str(last_part[1]) if last_part else None,
        "key_id": last_part[2] if last_part else None,
        "send_ms": send_ms,
        "n": 1,
        "min_n": settings.error_threshold_min_processed,
        "ratio": settings.error_threshold_ratio,
        "lease_key": lease.key if lease and lease.granted else None,
        "lease_token": lease.token if lease and lease.granted else None,
    }
    bare = last_part is None and params["lease_key"] is None and status != "sent"
    sql = _FINISH_BARE_SQL if bare else _FINISH_SQL
    # a hot statement (every message ends here): prepared once per connection (campaign.db.prepared)
    row = _one(prepared(ASYNC_COMMIT + sql if async_commit else sql, "finish"), params)
    if row is None:
        return None
    run_id, lead_id, src, tgt, old_col, run_status, pause_reason, _, _ = row
    note = None
    if status == "sent":
        if lead_id is None:
            note = "lead deleted: nothing to move"
        elif tgt is None:
            note = "target column gone: move skipped"
            log_event("finalize", note, run_id=run_id, message_id=message_id, lead_id=lead_id, level="warning")
        elif old_col == tgt:
            note = "lead already in the target column"
        elif old_col != src:
            note = "lead moved by hand meanwhile: left where it is"
            log_event(
                "finalize",
                note,
                run_id=run_id,
                message_id=message_id,
                lead_id=lead_id,
                level="warning",
                details={"column_id": old_col},
            )
    elif status in ("failed", "in_doubt"):
        log_event(
            "finalize",
            f"message {status}: {error_class}: {error_message}",
            run_id=run_id,
            message_id=message_id,
            lead_id=lead_id,
            level="warning" if status == "in_doubt" else "error",
        )
    if run_status == "paused" and pause_reason == "error_threshold":
        log_event("run", "run paused: failure ratio above the threshold", run_id=run_id, level="error")
    log.info("message %s %s run=%s lead=%s%s", message_id, status, run_id, lead_id, f" ({note})" if note else "")
    return Finished(run_id, lead_id, run_status, pause_reason, note)


# The open messages of leads that replied (R-IN-3), in ONE statement: ``stop_reason`` on all of
# them (the send path reads it before each part), and the not-started ones skipped exactly as
# finish_message skips one (same columns, same counter expressions, run completion), the counters
# once per run. Every message is locked before any run row (the send path's order), and the runs
# in id order (two replies' transactions never take them crosswise).
_STOP_OPEN_SQL = (
    """
WITH why AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS t(id, reason)
), m AS (
    UPDATE campaign_messages m SET stop_reason = coalesce(m.stop_reason, why.reason),
        status = CASE WHEN m.status = ANY(%(not_started)s) THEN 'skipped' ELSE m.status END,
        skip_reason = CASE WHEN m.status = ANY(%(not_started)s) THEN why.reason ELSE m.skip_reason END,
        error_class = CASE WHEN m.status = ANY(%(not_started)s) THEN NULL ELSE m.error_class END,
        error_message = CASE WHEN m.status = ANY(%(not_started)s) THEN NULL ELSE m.error_message END,
        finished_at = CASE WHEN m.status = ANY(%(not_started)s) THEN now() ELSE m.finished_at END,
        status_changed_at = CASE WHEN m.status = ANY(%(not_started)s) THEN now() ELSE m.status_changed_at END,
        conversation_id = CASE WHEN m.status = ANY(%(not_started)s) THEN coalesce(m.conversation_id, (
            SELECT c.id FROM conversations c WHERE c.lead_id = m.lead_id AND c.inbox_id = m.inbox_id))
            ELSE m.conversation_id END
      FROM why
     WHERE m.id = why.id AND m.status = ANY(%(open)s)
    RETURNING m.id, m.run_id, m.status,
        (SELECT count(*) FROM message_parts p WHERE p.message_id = m.id AND p.status = 'sent') AS n_sent,
        (SELECT count(*) FROM message_parts p
          WHERE p.message_id = m.id AND p.status IN ('sending', 'in_doubt')) AS n_flight
), agg AS (
    SELECT run_id, count(*)::int AS n FROM m WHERE status = 'skipped' GROUP BY run_id
), runs AS (
    SELECT r.id FROM campaign_runs r WHERE r.id IN (SELECT run_id FROM agg) ORDER BY r.id FOR UPDATE
), run_upd AS (
    UPDATE campaign_runs r SET """
    + _RUN_COUNTERS_SET.replace("%(n)s", "agg.n").replace("%(st)s", "'skipped'")
    + """
    FROM agg JOIN runs ON runs.id = agg.run_id WHERE r.id = agg.run_id
    RETURNING r.id
)
SELECT m.id, m.status, m.n_sent, m.n_flight, (SELECT count(*) FROM run_upd) FROM m"""
)


def stop_open_messages(
    reasons: dict[int, str], not_started: Sequence[str], open_statuses: Sequence[str], settings: Settings
) -> list[tuple[int, str, int, int]]:
    """Stop the open messages named in ``reasons`` (message id -> reason, R-IN-3): each gets its
    ``stop_reason``; those in ``not_started`` are skipped with it, their runs' counters in the same
    statement. Returns (message id, status now, parts sent, parts in flight) of every message that
    was open, by id. No process-log line per skipped message: the caller's line names them all (a
    reply's "inbound KEY inbox=.. lead=..: reply (skipped [ids] ...)")."""
    ids = sorted(reasons)
    rows = _all(
        _STOP_OPEN_SQL,
        {
            "ids": ids,
            "reasons": [reasons[i] for i in ids],
            "not_started": list(not_started),
            "open": list(open_statuses),
            "min_n": settings.error_threshold_min_processed,
            "ratio": settings.error_threshold_ratio,
        },
    )
    return sorted((message_id, status, n_sent, n_flight) for message_id, status, n_sent, n_flight, _ in rows)


def skip_pending_where(condition_sql: str, params: Sequence[Any], reason: str) -> int:
    """Skip every pending message matching ``condition_sql`` (aliases m, r, c) in one statement."""
    sql = f"""
    WITH s AS (
        UPDATE campaign_messages m SET status = 'skipped', skip_reason = %s, finished_at = now(),
            status_changed_at = now()
        FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
        WHERE m.run_id = r.id AND m.status = 'pending' AND ({condition_sql})
        RETURNING m.run_id
    ), agg AS (SELECT run_id, count(*)::int AS n FROM s GROUP BY run_id)
    UPDATE campaign_runs r SET
        leads_skipped = r.leads_skipped + agg.n,
        leads_processed = r.leads_processed + agg.n,
        status = CASE WHEN r.status IN ('running', 'paused') AND r.leads_processed + agg.n >= r.leads_total
                      THEN 'completed' ELSE r.status END,
        pause_reason = CASE WHEN r.status IN ('running', 'paused') AND r.leads_processed + agg.n >= r.leads_total
                            THEN NULL ELSE r.pause_reason END,
        finished_at = CASE WHEN r.status IN ('running', 'paused') AND r.leads_processed + agg.n >= r.leads_total
                           THEN now() ELSE r.finished_at END
    FROM agg WHERE r.id = agg.run_id
    RETURNING r.id, agg.n
    """
    rows = _all(sql, (reason, *params))
    total = sum(n for _, n in rows)
    for run_id, n in rows:
        log_event("skip", f"{n} pending message(s) skipped: {reason}", run_id=run_id, details={"count": n})
    return total


def mark_in_doubt(
    message_id: int, part_id: int, reason: str, settings: Settings, *, attempt: uuid.UUID | str | None = None
) -> None:
    """A part whose send may have gone out (R-FAIL-4): the part and its message become ``in_doubt``,
    one transaction; nothing happens when the send recorded its outcome meanwhile."""
    with db.atomic():
        marked = _one(
            """UPDATE message_parts SET status = 'in_doubt', error_message = %s
                         WHERE id = %s AND status IN ('sending', 'in_doubt')
                           AND (%s::uuid IS NULL OR attempt_id = %s::uuid) RETURNING id""",
            (reason[:2000], part_id, attempt and str(attempt), attempt and str(attempt)),
        )
        if marked is None:
            return  # the send recorded its outcome meanwhile: nothing is in doubt
        finish_message(
            message_id,
            "in_doubt",
            settings,
            from_statuses=("sending",),
            error_class="ambiguous_send",
            error_message=reason,
        )


def fail_exhausted(message_id: int, error: str, settings: Settings, step: str | None = None) -> Finished | None:
    """A step's Dramatiq message died (retries exhausted): the campaign message fails, counters follow.

    Only while the message is still in a status that step's delivery carries (generate's: its
    split's too, pipeline.generate_then_split): a dead duplicate of an earlier step must not fail
    a message another delivery has carried on (R-PIPE-5).
    """
    statuses = BY_NAME[step].carried if step in BY_NAME else IN_FLIGHT
    with db.atomic():
        finished = finish_message(
            message_id, "failed", settings, from_statuses=statuses, error_class="retries_exhausted", error_message=error
        )
        if finished is not None:
            _one(
                """UPDATE message_parts SET status = 'failed', error_message = %s
                    WHERE message_id = %s AND status = 'pending' RETURNING id""",
                (error[:2000], message_id),
            )
        return finished
