"""The chain, and only the chain: claim -> preflight -> generate / split / send part -> finish.

Every step is a conditional transition (DESIGN #2): ``UPDATE … WHERE id = %s AND status = …``;
zero rows means another worker or an earlier delivery got there first and the step returns
quietly, which is what makes RabbitMQ's at-least-once delivery safe (R-PIPE-5).

    pending ─dispatch─▶ queued ─generate─▶ generating ─▶ splitting ─split─▶ sending ─send×N─▶ sent
       ▲                  │                    │              │               │      └▶ failed | in_doubt
       └── back to wait ──┴────────────────────┴──────────────┴───────────────┘ (run paused, inbox down)
    any non-terminal ─▶ skipped (reason) | failed (error)

A step that finds its work already done (a message put back to wait and dispatched again)
moves straight on: generate keeps an existing text, split keeps existing parts, send starts
at the first unsent part (R-FAIL-5). A part is committed ``sending`` with a fresh attempt id
BEFORE the HTTP call (DESIGN #3); a part found ``sending`` by anyone else is ``in_doubt``
and is never resent automatically (R-FAIL-4).

Every terminal outcome is ONE SQL statement (``campaign.outcomes``); the last part's ``sent`` is
in that same statement: finalize needs no hop of its own; nor does split, which runs in the
generate delivery on the text record's word that nothing changed (``generate_then_split``).
Dispatching is ``campaign.dispatch``, the sweep ``campaign.recovery``, the texts
``campaign.text``, the repairs ``campaign.ops.repairs``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import peewee

from campaign import failover, health, logs, ratelimit, runs
from campaign.db import db
from campaign.errors import (
    AmbiguousSend,
    AuthError,
    CreditsExhausted,
    Deferred,
    EngineError,
    InvalidNumber,
    PermanentError,
    ProviderError,
    RetryLater,
    StepFailed,
    TransientError,
    UnknownInstance,
)
from campaign.events import log_event
from campaign.inboxes import mark_disconnected, store_state
from campaign.outcomes import OUT_LOG_CTES, finish_message, mark_in_doubt, out_log_ctes
from campaign.planner import window_close_at
from campaign.providers import LLM, Messenger
from campaign.retry import backoff_seconds
from campaign.sequence import HISTORY_COLUMN
from campaign.settings import Settings
from campaign.sql import async_commit, prepared
from campaign.sql import fetch_named as _named
from campaign.sql import fetch_one as _one
from campaign.steps import MAX_BROKER_DELAY_SECONDS
from campaign.text import (
    LLM_MAX_TOKENS,
    SPLIT_BELOW_CHARS,
    SPLIT_SYSTEM_PROMPT,
    build_prompt,
    local_split,
    parse_split_answer,
    render_fallback,
    validate_text,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# small helpers


#: tries of a claim statement in one delivery before it is deferred (slot or budget contention, races)
_CLAIM_TRIES = 50


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _back_to_wait(message_id: int, from_status: str) -> bool:
    """Return an in-flight message to ``pending``: it waits (in PostgreSQL) for its run to run again."""
    row = _one(
        """UPDATE campaign_messages SET status = 'pending', status_changed_at = now(), wake_at = NULL
                  WHERE id = %s AND status = %s RETURNING id""",
        (message_id, from_status),
    )
    return row is not None


# --------------------------------------------------------------------------------------------
# dispatch (scheduler side)


def prepared_async(sql: str, label: str) -> str:
    """A hot statement of the chain committed asynchronously (see campaign.sql.ASYNC_COMMIT for
    when that is allowed), run prepared (campaign.db.prepared) under ``label``."""
    return prepared(async_commit(sql), label)


# --------------------------------------------------------------------------------------------
# step context


@dataclasses.dataclass
class Context:
    """Everything a step needs about one message, loaded in one query."""

    message_id: int
    status: str
    run_id: int
    run_status: str
    lead_id: int | None
    lead_name: str | None
    lead_phone: str | None
    lead_fields: dict
    lead_column_id: int | None
    lead_opted_out: bool
    inbox_id: int
    instance: str
    inbox_disabled: bool
    source_column_id: int
    model: str
    system_prompt: str
    fallback_template: str | None
    split_enabled: bool
    max_parts: int
    part_gap: tuple[float, float]
    generated_text: str | None
    attempts: int
    workspace_id: int
    run_date: Any = None
    timezone: str = "UTC"
    window: tuple[int, int] = (0, 1440)
    inbox_failures: int = 0  # the inbox's consecutive send failures (loaded by the send step only)
    gateway_failures: int = 0  # the inbox's consecutive gateway troubles: 429/5xx/timeouts (send step only)
    connection_state: str = "unknown"  # the inbox's last known connection state (send step only)
    state_age: float | None = None  # seconds since that state was observed; None: never (send step only)
    parts_count: int = 0  # parts the message already has (loaded by the split step only)
    # the conversation so far on the message's inbox, oldest first, for a follow-up with
    # history = K (loaded by the generate step and load_context; None when K is 0, R-SEQ-2)
    history: list[dict[str, Any]] | None = None
    # replied / opted_out: the lead answered after this message was planned (R-IN-3); nothing new
    # of it starts, and a started one sends no further part
    stop_reason: str | None = None
    inbox_health: str = "healthy"  # healthy | throttled | restricted (R-HEALTH-2)
    # (tokens, generation ms) of a text written in this delivery and not yet recorded: the split
    # in the same delivery records it with the parts, in one statement (generate_then_split)
    unrecorded: tuple[int | None, int] | None = None
    resplit: bool = False  # that record found something changed: the text alone was recorded
    # the generate delivery sends the first part itself until then (time.monotonic()): the record
    # of the text and parts claims it `sending` too when the inbox can send now (generate_then_split)
    claim_first_until: float | None = None
    first_send: FirstSend | None = None  # what that record claimed


# The step context, composed from named fragments (DESIGN: never str.replace on another
# statement). Every column is aliased to the Context field (or the helper value) it fills, and rows
# are read by name.
_CONTEXT_COLUMNS = """
    m.id AS message_id, m.status, m.run_id, r.status AS run_status, m.lead_id, l.name AS lead_name,
    l.phone AS lead_phone, l.custom_fields AS lead_fields, l.column_id AS lead_column_id,
    coalesce(l.opted_out, false) AS lead_opted_out, m.inbox_id, i.instance_name AS instance,
    i.disabled AS inbox_disabled, i.health_state AS inbox_health, c.source_column_id, c.model, c.system_prompt,
    c.fallback_template, c.split_enabled, c.max_parts, c.part_gap_min_seconds, c.part_gap_max_seconds, m.generated_text,
    m.attempts, c.workspace_id, r.run_date, c.timezone, c.window_start_minute, c.window_end_minute,
    m.stop_reason, coalesce(l.last_reply_at >= m.created_at, false) AS replied_since"""

_CONTEXT_FROM = """
FROM campaign_messages m
JOIN campaign_runs r ON r.id = m.run_id
JOIN campaign_configs c ON c.id = r.config_id
JOIN inboxes i ON i.id = m.inbox_id
LEFT JOIN leads l ON l.id = m.lead_id"""

#: the split step: how many parts the message already has
_PARTS_COUNT_COLUMN = "(SELECT count(*) FROM message_parts WHERE message_id = m.id) AS parts_count"

#: the send step: the inbox's failure streaks and known connection state, and the first unsent part
_SEND_COLUMNS = """
    i.consecutive_failures AS inbox_failures, i.gateway_failures, i.connection_state,
    extract(epoch FROM now() - i.state_checked_at)::float AS state_age, np.id AS part_id, np.idx AS part_idx,
    np.text AS part_text, np.status AS part_status,
    (SELECT max(idx) FROM message_parts WHERE message_id = m.id AND status <> 'skipped') AS last_idx,
    np.attempt_id AS part_attempt, np.provider_message_id AS part_key"""


def _next_part_join(also: str = "") -> str:
    """The first part of the message not sent or skipped (``also``: a further condition on it)."""
    return f"""
LEFT JOIN LATERAL (SELECT id, idx, text, status, attempt_id, provider_message_id FROM message_parts
                   WHERE message_id = m.id AND status NOT IN ('sent', 'skipped'){also}
                   ORDER BY idx LIMIT 1) np ON true"""


_NEXT_PART_JOIN = _next_part_join()


def _context_sql(where: str, *, extra_columns: str = "", extra_joins: str = "") -> str:
    """SELECT the step context (plus ``extra_columns``) of the message matching ``where``."""
    columns = _CONTEXT_COLUMNS + (f",{extra_columns}" if extra_columns else "")
    return f"SELECT {columns}{_CONTEXT_FROM}{extra_joins}\nWHERE {where}"


# The send step's statement (T-PERF-7: one round trip takes the inbox's slot, claims the part and
# reads the context). ``ready``: every check the step makes before a send would say yes — the
# message is `sending` with a pending/failed next part; a message not started (next part 0) has
# its run running and its lead in the source column; the lead exists, is not opted out and did
# not answer; and (unless %(checked)s: the step has just made these checks itself, and a started
# message goes on through a disabled inbox) the inbox is not disabled or restricted, no
# Retry-After can be pending (attempts 0) and the inbox's known state is fresh and open. The slot
# is taken whenever it is free (%(pace)s: a worker's delivery paces; a direct call does not), as
# the pacing middleware did before the step: a part found
# `sending` is judged only while no send of its inbox is in flight. Only a ready message has its
# part committed `sending`; otherwise the step settles it from the context with the checks in
# _before_claim (rare: the paths that pause, skip or doubt) and claims again with %(checked)s.
# The local window is checked right after the claim (its DST arithmetic lives in Python):
# closed, the part goes back before any HTTP call.
_SEND_READY = """(m.status = 'sending' AND np.status IN ('pending', 'failed')
        AND l.id IS NOT NULL AND NOT coalesce(l.opted_out, false) AND m.stop_reason IS NULL
        AND NOT coalesce(l.last_reply_at >= m.created_at, false)
        AND (np.idx > 0 OR (r.status = 'running' AND l.column_id = c.source_column_id))
        AND (%(checked)s OR (NOT i.disabled AND i.health_state <> 'restricted'
             AND m.attempts = 0 AND i.connection_state NOT IN ('close', 'connecting')
             AND i.state_checked_at > now() - make_interval(secs => %(max_age)s))))"""

_SEND_CONTEXT_SQL = _context_sql(
    "m.id = %(id)s", extra_columns=f"{_SEND_COLUMNS}, {_SEND_READY} AS ready", extra_joins=_NEXT_PART_JOIN
)

# hot: prepared once per connection (campaign.db.prepared: no parse or plan per send)
_SEND_CLAIM_SQL = f"""
WITH ctx AS (
    {_SEND_CONTEXT_SQL}
), slot AS (
    UPDATE rate_limits rl SET {ratelimit.TAKE_SLOT}
      FROM ctx, inboxes i
     WHERE %(pace)s AND i.id = ctx.inbox_id AND rl.key = 'inbox:' || ctx.inbox_id
       AND (rl.lease_token = %(token)s OR {ratelimit.SLOT_FREE})
    RETURNING rl.key
), part AS (
    UPDATE message_parts p SET status = 'sending', attempt_id = %(attempt)s, sending_at = now()
      FROM ctx
     WHERE ctx.ready AND p.id = ctx.part_id AND p.status IN ('pending', 'failed')
       AND (NOT %(pace)s OR EXISTS (SELECT 1 FROM slot))
    RETURNING p.id, p.inbox_id
), first AS (
    -- the inbox's first send ever starts its warm-up ramp (R-HEALTH-1); once set, the row is
    -- only read (its WHERE is false), never locked
    UPDATE inboxes SET first_send_at = now()
     WHERE id = (SELECT inbox_id FROM part) AND first_send_at IS NULL RETURNING id
)
SELECT ctx.*, EXISTS (SELECT 1 FROM slot) AS slot_taken, EXISTS (SELECT 1 FROM part) AS claimed FROM ctx"""
prepared(_SEND_CLAIM_SQL, "send_claim")  # chaos/services.py finds sends in flight by this name


@functools.cache
def _claim_sql(to_status: str, count_parts: bool, with_history: bool, llm_budget: str | None) -> str:
    """The claim statement of one variant (built once per process, then run prepared)."""
    extra = [c for c, wanted in ((_PARTS_COUNT_COLUMN, count_parts), (HISTORY_COLUMN, with_history)) if wanted]
    needs = llm_budget or "false"
    extra.append(f"({needs}) AS llm_needed")
    context_sql = _context_sql("m.id = (SELECT id FROM claimed)", extra_columns=",".join(extra))
    gate = f"""EXISTS (SELECT 1 FROM claimed JOIN campaign_messages m ON m.id = claimed.id
                       JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
                      WHERE {needs})"""
    # async commit: a lost claim only repeats the step, which has no outside effect before it
    # calls the LLM again (campaign.sql.ASYNC_COMMIT)
    return prepared(
        async_commit(f"""
        WITH claimed AS (
            UPDATE campaign_messages SET status = %(to)s, status_changed_at = now(),
                wake_at = now() + make_interval(secs => %(lease)s)
            WHERE id = %(id)s AND status = ANY(%(from)s) RETURNING id
        ), {ratelimit.minute_ctes(gate)}
        SELECT * FROM ({context_sql}) ctx, LATERAL (SELECT {ratelimit.MINUTE_COLUMNS}) budget"""),
        f"claim_{to_status}",
    )


def _claim(
    message_id: int,
    to_status: str,
    from_statuses: tuple[str, ...],
    settings: Settings,
    *,
    count_parts: bool = False,
    with_history: bool = False,
    llm_budget: str | None = None,
) -> Context | None:
    """Move the message to ``to_status`` if it is in ``from_statuses``, and load its context.

    Attempts are kept: they survive every re-dispatch and are reset only by a step's success
    (R-FAIL-2). The step now owns the message until ``wake_at`` (the lease): a worker that dies
    mid-step has its delivery redelivered by RabbitMQ, the sweep is only the safety net.
    ``count_parts``: ``ctx.parts_count`` is the number of parts the message already has (same statement).
    ``with_history``: ``ctx.history`` is the conversation a follow-up's prompt carries (same statement).
    ``llm_budget``: SQL (over ``m``, ``c``) saying whether the step will call the LLM; the request
    is then counted against the OpenRouter key's per-minute budget (R-RATE-1) — from this
    process's block, or a new block taken in this same statement (T-PERF-7: no round trip of its
    own). A budget spent for the minute makes the message wait (short: in the thread; else
    deferred, no attempt spent) and returns None. None: no budget is counted (a direct call).
    The count commits with the claim, asynchronously: a PostgreSQL crash can lose the last few
    hundred milliseconds of counted requests, and that minute can then overspend by as many — the
    provider's 429 and its Retry-After (held for the whole key, R-FAIL-2) cover it.
    """
    key = ratelimit.openrouter_key(settings.openrouter_api_key)
    sql = _claim_sql(to_status, count_parts, with_history, llm_budget)
    waited = 0.0
    for _ in range(_CLAIM_TRIES):
        took_local = llm_budget is not None and ratelimit.take_local(key)
        params = {
            "to": to_status,
            "lease": settings.lease_seconds,
            "id": message_id,
            "from": list(from_statuses),
            **ratelimit.minute_params(
                key, settings.openrouter_requests_per_minute, take=llm_budget is not None and not took_local
            ),
        }
        asked_at = time.monotonic()
        row = _named(sql, params)
        if row is None:
            if took_local:
                ratelimit.give_back_local(key)
            return None
        ctx = _context_from_row(row)
        ctx.status = to_status
        if count_parts:
            ctx.parts_count = row["parts_count"]
        if llm_budget is None or took_local or not row["llm_needed"]:
            if took_local and not row["llm_needed"]:
                ratelimit.give_back_local(key)
            return ctx
        grant = ratelimit.minute_outcome(key, row, asked_at)
        if grant is None:
            ratelimit.ensure_minute_row(key)  # the key's first request ever
            continue
        if grant.granted:
            return ctx
        if waited + grant.wait <= ratelimit.IN_THREAD_WAIT_SECONDS:
            waited += grant.wait
            time.sleep(grant.wait)
            continue
        # the minute's budget is spent: the message waits for the next one, no attempt spent
        # (R-RATE-2); in the delay queue (raises Deferred) or, longer, parked in PostgreSQL
        _wait(ctx, grant.wait, settings, "OpenRouter per-minute budget spent")
        return None
    raise Deferred(0.1, "the OpenRouter budget stayed contended")


def _context_from_row(row: dict[str, Any]) -> Context:
    """The Context of a row of :func:`_context_sql` (read by column name)."""
    logs.annotate(run=row["run_id"], inbox=row["inbox_id"])  # the step's log lines carry the run (R-OPS-6)
    direct = {f.name for f in dataclasses.fields(Context)} & row.keys()
    ctx = Context(
        **{name: row[name] for name in direct},
        part_gap=(row["part_gap_min_seconds"], row["part_gap_max_seconds"]),
        window=(row["window_start_minute"], row["window_end_minute"]),
    )
    ctx.lead_fields = ctx.lead_fields or {}
    ctx.stop_reason = ctx.stop_reason or ("replied" if row["replied_since"] else None)
    return ctx


def load_context(message_id: int) -> Context | None:
    """The step context of a message as it is now (no transition): prompts, tests, tools."""
    row = _named(_context_sql("m.id = %s", extra_columns=HISTORY_COLUMN), (message_id,))
    return _context_from_row(row) if row is not None else None


def _window_closed(ctx: Context) -> bool:
    """Whether the run's local sending window has closed (R-DISP-4: nothing new starts after it)."""
    try:
        close = window_close_at(ctx.run_date, ctx.timezone, *ctx.window)
    except EngineError:
        return False  # an unusable timezone is the planner's to report; do not strand the message
    return close is None or dt.datetime.now(dt.UTC) >= close


def _preflight(ctx: Context, settings: Settings, *, started: bool = False) -> bool:
    """The checks before each step (R-PIPE-1). False: the message was settled or put back to wait.

    ``started``: a part of this message already went out, so it finishes whatever the run's
    state (a person does not stop mid-sentence, R-DISP-4).
    """
    if not started:
        if ctx.run_status == "cancelled":
            finish_message(ctx.message_id, "skipped", settings, skip_reason="cancelled")
            return False
        if ctx.run_status in ("completed", "failed"):
            finish_message(ctx.message_id, "skipped", settings, skip_reason="run_closed")
            return False
        if ctx.run_status != "running":  # paused / planning: wait in PostgreSQL
            _back_to_wait(ctx.message_id, ctx.status)
            return False
        if ctx.lead_id is None:
            finish_message(ctx.message_id, "skipped", settings, skip_reason="lead_deleted")
            return False
        if ctx.lead_column_id != ctx.source_column_id:
            finish_message(ctx.message_id, "skipped", settings, skip_reason="lead_moved")
            return False
        if ctx.lead_opted_out or ctx.stop_reason:
            reason = "opted_out" if ctx.lead_opted_out else ctx.stop_reason
            finish_message(ctx.message_id, "skipped", settings, skip_reason=reason)
            return False
        if _window_closed(ctx):
            finish_message(ctx.message_id, "skipped", settings, skip_reason="window_closed")
            return False
    elif ctx.lead_id is None:
        # Mid-message, the lead was deleted: no number left to send the rest to; the message
        # fails with why.
        with db.atomic():
            if (
                finish_message(
                    ctx.message_id,
                    "failed",
                    settings,
                    from_statuses=("sending",),
                    error_class="lead_deleted",
                    error_message="lead_deleted after part(s) went out: the rest is not sent",
                )
                is not None
            ):
                _one(
                    """UPDATE message_parts SET status = 'failed', error_message = 'lead_deleted'
                        WHERE message_id = %s AND status = 'pending' RETURNING id""",
                    (ctx.message_id,),
                )
        return False
    elif ctx.lead_opted_out or ctx.stop_reason:
        # Mid-message, the lead answered or asked to stop: no further part (R-IN-3, E-27); what
        # went out went out, so the message ends `sent` with the rest `skipped`.
        _stop_rest(ctx, settings, "opted_out" if ctx.lead_opted_out else ctx.stop_reason or "replied")
        return False
    if ctx.inbox_disabled or ctx.inbox_health == "restricted":
        # restricted (R-HEALTH-2): nothing new starts on it; like a disabled inbox, a started message
        # finishes (DESIGN principle 8); only a pool with no member left pauses (R-POOL-3)
        runs.pause_inbox_runs(ctx.inbox_id, "inbox_disabled" if ctx.inbox_disabled else health.PAUSE_REASON)
        if not started:
            _back_to_wait(ctx.message_id, ctx.status)
            failover.fail_over(settings, inbox_ids=[ctx.inbox_id])  # the pool's others take it over
            return False
    return True


def _stop_rest(ctx: Context, settings: Settings, reason: str) -> None:
    """A started message the lead stopped: its unsent parts skipped and the message ends ``sent``
    (it has a part out), or ``skipped`` (nothing went out), in one transaction."""
    with db.atomic():
        row = _one(
            """WITH s AS (UPDATE message_parts SET status = 'skipped', error_message = %s
                          WHERE message_id = %s AND status IN ('pending', 'failed') RETURNING id)
               SELECT count(*) FILTER (WHERE status = 'sent'),
                      count(*) FILTER (WHERE status IN ('sending', 'in_doubt')), (SELECT count(*) FROM s)
                 FROM message_parts WHERE message_id = %s""",
            (f"stopped: {reason}", ctx.message_id, ctx.message_id),
        )
        n_sent, n_flight = (row[0], row[1]) if row else (0, 0)
        if n_flight:
            return  # a part is in flight: its send step ends the message
        if n_sent:
            finish_message(ctx.message_id, "sent", settings, from_statuses=("sending",))
        else:
            finish_message(ctx.message_id, "skipped", settings, from_statuses=("sending",), skip_reason=reason)


def _record_attempt(ctx: Context, exc: BaseException, settings: Settings, wake_in: float) -> int | None:
    """Persist one failed attempt of the current step on the row; return the attempt number.

    ``wake_in``: seconds until the retry is due (the sweep re-publishes it if it never comes).
    None: the message left this step meanwhile (a duplicate delivery won): nothing to retry.
    """
    # status_changed_at moves too: a message waiting out its backoff is alive, not stuck (R-FAIL-8)
    row = _one(
        """UPDATE campaign_messages SET attempts = attempts + 1, error_class = %s, error_message = %s,
                      status_changed_at = now(), wake_at = now() + make_interval(secs => %s)
                  WHERE id = %s AND status = %s RETURNING attempts""",
        (getattr(exc, "code", None) or type(exc).__name__, str(exc)[:2000], wake_in, ctx.message_id, ctx.status),
    )
    return row[0] if row else None


def _wait(ctx: Context, delay: float, settings: Settings, why: str) -> None:
    """Let the message wait ``delay`` seconds without spending an attempt, wherever it belongs.

    Up to MAX_BROKER_DELAY_SECONDS in RabbitMQ (raises Deferred); longer it is parked in
    PostgreSQL: ``wake_at`` is its due time and the recovery sweep re-publishes it then
    (R-DISP-2: a delayed message waits unacked in a worker, and RabbitMQ's consumer timeout
    redelivers it). The message keeps its status: a started one stays started.
    """
    parked = delay > MAX_BROKER_DELAY_SECONDS
    _one(
        """UPDATE campaign_messages SET wake_at = now() + make_interval(secs => %s)
            WHERE id = %s AND status = %s RETURNING id""",
        (delay if parked else delay + settings.handoff_grace_seconds, ctx.message_id, ctx.status),
    )
    if parked:
        log.info("message=%s parked in PostgreSQL for %.0fs: %s", ctx.message_id, delay, why)
        return
    raise Deferred(delay, why)


def _transient(ctx: Context, exc: TransientError | BaseException, settings: Settings, step: str) -> None:
    """Count a transient failure; retry after backoff, or give up (message failed, dead letter)."""
    retry_after = getattr(exc, "retry_after", None)
    expected = backoff_seconds(ctx.attempts + 1, settings, retry_after)
    attempt = _record_attempt(ctx, exc, settings, expected + settings.handoff_grace_seconds)
    if attempt is None:
        log.info(
            "%s message=%s: moved on meanwhile (a duplicate delivery won); dropping this attempt", step, ctx.message_id
        )
        return
    if attempt >= settings.max_attempts:
        raise StepFailed(f"{step}: {attempt} attempts failed, last: {exc}") from exc
    delay = expected if attempt == ctx.attempts + 1 else backoff_seconds(attempt, settings, retry_after)
    if retry_after is not None:
        # a duplicate delivery of this message (broker redelivery, a killed worker's message)
        # must honour it too, not only the delayed retry below (E-10)
        ratelimit.hold(ratelimit.retry_after_key(ctx.message_id), retry_after + 0.05)
    if delay > MAX_BROKER_DELAY_SECONDS:
        _wait(ctx, delay, settings, f"{step} retry after {getattr(exc, 'code', type(exc).__name__)}")
        return
    log.info(
        "%s message=%s attempt %s failed (%s); retry in %.2fs",
        step,
        ctx.message_id,
        attempt,
        getattr(exc, "code", type(exc).__name__),
        delay,
    )
    raise RetryLater(delay, exc) from exc


def _retry_after_pending(ctx: Context, settings: Settings) -> bool:
    """Wait while an earlier attempt's Retry-After is pending (E-10, any delivery), spending no attempt.

    Raises Deferred for a short wait; True: the message was parked in PostgreSQL (stop the step).
    """
    if not ctx.attempts:
        return False  # no failed attempt since the last success: nothing can be pending (no query)
    wait = ratelimit.hold_remaining(ratelimit.retry_after_key(ctx.message_id))
    if wait <= 0:
        return False
    log.info("message=%s: Retry-After of an earlier attempt pending for %.2fs; waiting", ctx.message_id, wait)
    _wait(ctx, wait + 0.01, settings, f"Retry-After pending for {wait:.2f}s")
    return True


def _hold_openrouter(exc: ProviderError, settings: Settings) -> None:
    """An OpenRouter Retry-After holds the whole key, not just this message (R-FAIL-2, E-10)."""
    if exc.retry_after is not None:
        ratelimit.block_scope(ratelimit.openrouter_key(settings.openrouter_api_key), exc.retry_after + 0.05)


def _provider_pause(ctx: Context, exc: ProviderError) -> None:
    """401/402: pause every run using that key or inbox, and put this message back to wait."""
    reason = exc.pause_reason or "provider_auth"
    if exc.provider == "openrouter":
        # One OpenRouter key serves every run of this engine: pause them all.
        runs.pause_runs("true", (), reason)
    else:
        runs.pause_inbox_runs(ctx.inbox_id, reason)
    _back_to_wait(ctx.message_id, ctx.status)


# --------------------------------------------------------------------------------------------
# generate (R-PIPE-1)

# Imported here, beside their only users, so this section merges independently of the rest.


#: the generate step calls the LLM (its request counts against the per-minute budget, R-RATE-1)
_GENERATE_NEEDS_LLM = "m.generated_text IS NULL"
#: the split step calls the LLM: a text long enough, split on, no parts yet (split_step's test, in SQL)
_SPLIT_NEEDS_LLM = f"""m.generated_text IS NOT NULL AND c.split_enabled AND c.max_parts > 1
    AND char_length(m.generated_text) > {int(SPLIT_BELOW_CHARS)}
    AND NOT EXISTS (SELECT 1 FROM message_parts WHERE message_id = m.id)"""

# the claim variants a worker runs (paced), built now: a connection prepares them with its first
# hot statement (campaign.db), not on a rare path's first use
_claim_sql("generating", False, True, _GENERATE_NEEDS_LLM)
_claim_sql("splitting", True, False, _SPLIT_NEEDS_LLM)


def generate_step(message_id: int, settings: Settings, llm: LLM, *, paced: bool = False) -> bool:
    """queued -> generating -> splitting: write the message text. True when split should follow.

    ``paced``: the LLM request counts against the OpenRouter key's per-minute budget, taken in
    the claim statement (a worker's delivery; a direct call is not paced)."""
    return _generate(message_id, settings, llm, paced=paced, inline=False) is not None


def generate_then_split(
    message_id: int, settings: Settings, llm: LLM, *, paced: bool = False, claim_first_until: float | None = None
) -> int | FirstSend | None:
    """The generate actor's delivery: write the text, then split it in the same delivery (T-PERF-1:
    no hop through RabbitMQ, no claim statement of the split's own, and one statement records the
    text, the parts and the move to `sending` — it checks in the same rows that nothing the
    split's preflight checks changed while the LLM wrote). Returns the inbox id when sending
    should follow, like :func:`split_step`.

    Redelivered (a worker died, a retry, a deferral of the split's LLM budget), the message may be
    ``splitting`` already: the split then runs from its own claim, as the split actor would.

    ``claim_first_until`` (a time.monotonic() deadline; the generate actor's): until then, the same
    record also claims the first part `sending` and takes the inbox's slot when every check of the
    send step's claim passes and the slot is free — returned as a :class:`FirstSend` for
    :func:`send_claimed` (T-PERF-7: the send step's claim statement saved).
    """
    handoff = _generate(message_id, settings, llm, paced=paced, inline=True)
    if isinstance(handoff, Context):
        handoff.claim_first_until = claim_first_until
        inbox_id = _split(handoff, settings, llm)
        if handoff.first_send is not None:
            return handoff.first_send
        if not handoff.resplit:
            return inbox_id
    # not claimed for generating (already `splitting`: a redelivery; or finished, or elsewhere),
    # or something changed while the LLM wrote: the split's own claim (conditional on
    # `splitting`, so nothing when the message is anywhere else) and preflight settle it
    return split_step(message_id, settings, llm, paced=paced)


#: the text and parts of a split in the same delivery are recorded only when every check the
#: split's preflight makes would still pass (run running, lead in the source column and not
#: stopped, inbox usable; the window is checked in Python, before the split)
_SPLIT_READY = """r.status = 'running' AND l.id IS NOT NULL AND l.column_id = c.source_column_id
        AND NOT coalesce(l.opted_out, false) AND cm.stop_reason IS NULL
        AND NOT coalesce(l.last_reply_at >= cm.created_at, false)
        AND NOT i.disabled AND i.health_state <> 'restricted'"""


def _generate(message_id: int, settings: Settings, llm: LLM, *, paced: bool, inline: bool) -> Context | bool | None:
    """The generate step. None: nothing follows; True: the text is recorded and the split follows
    (its own claim); a Context (``inline`` only): the text, not recorded yet (``ctx.unrecorded``),
    is split in this delivery without a claim, the message still `generating` under the step's
    lease, and the split's LLM request (if any) already counted (``paced``)."""
    key = ratelimit.openrouter_key(settings.openrouter_api_key)
    # the split's request, taken from this process's block right after the claim: its block's deadline
    reserved: list[float | None] = [None]
    try:
        return _generate_text(message_id, settings, llm, paced=paced, inline=inline, key=key, reserved=reserved)
    finally:
        if reserved[0] is not None and ratelimit.still_usable(key, reserved[0]):
            ratelimit.give_back_local(key)  # not used: the split needs no LLM, or the step ended before it


def _generate_text(
    message_id: int,
    settings: Settings,
    llm: LLM,
    *,
    paced: bool,
    inline: bool,
    key: str,
    reserved: list[float | None],
) -> Context | bool | None:
    ctx = _claim(
        message_id,
        "generating",
        ("queued", "generating"),
        settings,
        with_history=True,
        llm_budget=_GENERATE_NEEDS_LLM if paced else None,
    )
    if ctx is None:
        log.debug("generate message=%s: not queued/generating any more, nothing to do", message_id)
        return None
    if inline and paced and ctx.split_enabled and ctx.max_parts > 1 and not ctx.generated_text:
        # the split in this delivery will likely ask the LLM too: its request is taken now, while
        # the block the claim may just have taken is fresh (a block drained by other threads
        # meanwhile would send the split through its own claim: three statements more)
        reserved[0] = ratelimit.reserve_local(key)
    if not _preflight(ctx, settings):
        return None
    if ctx.generated_text:  # resumed after a wait: the text is already there
        return True if _advance(ctx, "splitting", settings) else None
    if _retry_after_pending(ctx, settings):
        return None
    started = time.perf_counter()
    tokens = None
    try:
        completion = llm.chat(ctx.model, build_prompt(ctx), max_tokens=LLM_MAX_TOKENS)
        text = validate_text(completion.text)
        tokens = completion.total_tokens
    except (AuthError, CreditsExhausted) as exc:
        log.error("generate message=%s: %s", message_id, exc)
        _provider_pause(ctx, exc)
        return None
    except PermanentError as exc:
        if not ctx.fallback_template:
            finish_message(message_id, "failed", settings, from_statuses=("generating",), error=exc)
            return None
        text = render_fallback(ctx.fallback_template, ctx)
        log_event(
            "generate",
            f"LLM failed permanently ({exc.code}); fallback template used",
            run_id=ctx.run_id,
            message_id=message_id,
            lead_id=ctx.lead_id,
            level="warning",
        )
        if len(text) < 1:
            finish_message(message_id, "failed", settings, from_statuses=("generating",), error=exc)
            return None
    except TransientError as exc:
        _hold_openrouter(exc, settings)
        _transient(ctx, exc, settings, "generate")
        return None
    # the split in this delivery: its LLM request (if it makes one) comes from this process's
    # block of the per-minute budget; none left, the split takes it in its own claim
    needs_llm = _split_calls_llm(ctx, text)
    if reserved[0] is not None and not ratelimit.still_usable(key, reserved[0]):
        # its minute ended while the LLM wrote, or a hold of the key started: never spent now
        reserved[0] = None
    budget_taken = inline and paced and needs_llm and (reserved[0] is not None or ratelimit.take_local(key))
    if budget_taken:
        reserved[0] = None  # the split's now (given back below if it does not run here)
    if inline and (budget_taken or not (paced and needs_llm)) and not _window_closed(ctx):
        # nothing recorded yet: the split records the text with its parts (one statement, which
        # checks that nothing changed while the LLM wrote). The message stays the step's,
        # `generating`, until the claim's lease ends; a crash before that record costs the text
        # only (written again, nothing sent).
        ctx.generated_text, ctx.unrecorded = text, (tokens, _ms(started))
        return ctx
    if budget_taken:
        ratelimit.give_back_local(key)
    return _record_text(message_id, text, tokens, _ms(started), settings)


_TEXT_RECORD_SQL = prepared_async(
    """UPDATE campaign_messages SET generated_text = %(text)s, tokens_used = %(tokens)s,
              generation_ms = %(ms)s, status = 'splitting', status_changed_at = now(), attempts = 0,
              error_class = NULL, error_message = NULL, wake_at = now() + make_interval(secs => %(wake)s)
          WHERE id = %(id)s AND status = 'generating' RETURNING id""",
    "generate_record",
)


def _record_text(message_id: int, text: str, tokens: int | None, ms: int, settings: Settings) -> bool | None:
    """generating -> splitting with the text; the split actor takes over (True), or None when the
    message is no longer the step's. Async commit: a lost text is generated again (tokens spent
    twice, nothing sent); the message is the split's after the short hand-off grace."""
    row = _one(
        _TEXT_RECORD_SQL,
        {"text": text, "tokens": tokens, "ms": ms, "wake": settings.handoff_grace_seconds, "id": message_id},
    )
    return None if row is None else True


def _split_calls_llm(ctx: Context, text: str) -> bool:
    """Whether splitting ``text`` asks the LLM (R-PIPE-2; _SPLIT_NEEDS_LLM says the same in SQL)."""
    return ctx.split_enabled and ctx.max_parts > 1 and len(text) > SPLIT_BELOW_CHARS


def _advance(ctx: Context, to_status: str, settings: Settings) -> bool:
    """Hand a resumed message straight to the next step (its work is done; attempts are kept)."""
    row = _one(
        """UPDATE campaign_messages SET status = %s, status_changed_at = now(),
                      wake_at = now() + make_interval(secs => %s)
                  WHERE id = %s AND status = %s RETURNING id""",
        (to_status, settings.handoff_grace_seconds, ctx.message_id, ctx.status),
    )
    return row is not None


# --------------------------------------------------------------------------------------------
# split (R-PIPE-2)


def split_step(message_id: int, settings: Settings, llm: LLM, *, paced: bool = False) -> int | None:
    """splitting -> sending: store the parts. Returns the inbox id when sending should follow.

    ``paced``: as in :func:`generate_step` (only a split that calls the LLM counts a request)."""
    ctx = _claim(
        message_id,
        "splitting",
        ("splitting",),
        settings,
        count_parts=True,
        llm_budget=_SPLIT_NEEDS_LLM if paced else None,
    )
    if ctx is None:
        return None
    if not _preflight(ctx, settings):
        return None
    return _split(ctx, settings, llm)


def _split(ctx: Context, settings: Settings, llm: LLM) -> int | None:
    """The split of a message the step owns (``splitting``, checked: by the split's claim and
    preflight, or by the text's record in the same delivery): parts stored, the message ``sending``."""
    message_id = ctx.message_id
    existing = ctx.parts_count
    started = time.perf_counter()
    if existing:
        parts = None
    else:
        text = ctx.generated_text or ""
        parts = [text]
        if _split_calls_llm(ctx, text):
            parts = None
            try:
                completion = llm.chat(
                    ctx.model,
                    [
                        {"role": "system", "content": SPLIT_SYSTEM_PROMPT.format(n=ctx.max_parts)},
                        {"role": "user", "content": text},
                    ],
                    max_tokens=LLM_MAX_TOKENS * 2,
                    temperature=0.0,
                    json_mode=True,
                )
                parts = parse_split_answer(completion.text, text, ctx.max_parts)
                if parts is None:
                    log.info("split message=%s: LLM answer unusable, splitting locally", message_id)
            except ProviderError as exc:
                # The split is a nicety: any LLM trouble here falls back to the local split.
                log.info("split message=%s: LLM failed (%s), splitting locally", message_id, exc.code)
                _hold_openrouter(exc, settings)
            if parts is None:
                parts = local_split(text, ctx.max_parts)
    if ctx.unrecorded is not None:
        return _record_text_and_parts(ctx, list(parts or []), _ms(started), settings)
    # One statement: the transition and the parts. The parts hang off the transition's row, so
    # of two racing deliveries only the winner writes parts (the loser's UPDATE waits on the row
    # lock, then finds 'sending' and returns nothing): a loser's different split never adds a
    # part (R-PIPE-5). Parts already there (a resumed message) are kept as they are.
    # async commit: a lost split is split again; its parts vanish with it, none was sent yet
    row = _one(
        _SPLIT_RECORD_SQL,
        {
            "ms": _ms(started),
            "id": message_id,
            "parts": list(parts or []),
            "fresh": not existing,
            "grace": settings.handoff_grace_seconds,
        },
    )
    return ctx.inbox_id if row is not None else None


#: the parts of the message updated in the CTE ``m`` (id, lead_id, inbox_id), and the lead x
#: inbox conversation they will be logged in (R-IN-6); parts already there are kept as they are
_PARTS_CTES = """conv AS (
            INSERT INTO conversations (workspace_id, lead_id, inbox_id)
            SELECT i.workspace_id, m.lead_id, m.inbox_id FROM m JOIN inboxes i ON i.id = m.inbox_id
             WHERE m.lead_id IS NOT NULL
            ON CONFLICT (lead_id, inbox_id) DO NOTHING RETURNING id
        ), ins AS (
            INSERT INTO message_parts (message_id, inbox_id, idx, text)
            SELECT m.id, m.inbox_id, u.i - 1, u.t FROM m, unnest(%(parts)s::text[]) WITH ORDINALITY AS u(t, i)
            WHERE NOT EXISTS (SELECT 1 FROM message_parts WHERE message_id = %(id)s)
            RETURNING id
        )"""

_SPLIT_RECORD_SQL = prepared_async(
    f"""
        WITH m AS (
            UPDATE campaign_messages SET status = 'sending', status_changed_at = now(),
                attempts = CASE WHEN %(fresh)s THEN 0 ELSE attempts END,
                wake_at = now() + make_interval(secs => %(grace)s),
                split_ms = coalesce(split_ms, %(ms)s)
            WHERE id = %(id)s AND status = 'splitting' RETURNING id, lead_id, inbox_id
        ), {_PARTS_CTES}
        SELECT m.id, (SELECT count(*) FROM ins) FROM m""",
    "split_record",
)


#: the message, checked for the split (``chk``: _SPLIT_READY over ``cm``) and, for the claim
#: variant, for the first send (``sendable``: as the send step's claim, _SEND_READY)
_RECORD_CHK = f"""chk AS (
            SELECT coalesce(({_SPLIT_READY}), false) AS ready,
                   (NOT i.disabled AND i.health_state <> 'restricted'
                    AND i.connection_state NOT IN ('close', 'connecting')
                    AND i.state_checked_at > now() - make_interval(secs => %(max_age)s)) AS sendable,
                   cm.inbox_id, i.consecutive_failures AS inbox_failures, i.gateway_failures, i.connection_state,
                   extract(epoch FROM now() - i.state_checked_at)::float AS state_age
              FROM campaign_messages cm JOIN campaign_runs r ON r.id = cm.run_id
              JOIN campaign_configs c ON c.id = r.config_id JOIN inboxes i ON i.id = cm.inbox_id
              LEFT JOIN leads l ON l.id = cm.lead_id
             WHERE cm.id = %(id)s AND cm.status = 'generating'
        ), m AS (
            UPDATE campaign_messages SET generated_text = %(text)s, tokens_used = %(tokens)s,
                generation_ms = %(gen_ms)s, split_ms = %(split_ms)s, status = 'sending',
                status_changed_at = now(), attempts = 0, error_class = NULL, error_message = NULL,
                wake_at = now() + make_interval(secs => %(grace)s)
            WHERE id = %(id)s AND status = 'generating' AND (SELECT ready FROM chk)
            RETURNING id, lead_id, inbox_id
        )"""

# async commit: see _record_text_and_parts
_RECORD_SQL = prepared_async(
    f"""
        WITH {_RECORD_CHK}, {_PARTS_CTES}
        SELECT (SELECT ready FROM chk) AS ready, (SELECT id FROM m) AS recorded""",
    "text_and_parts_record",
)

# The same, and the first part claimed `sending` with the inbox's slot taken when the send step's
# claim would (every check of _SEND_READY for a message not started; the slot free): the part is
# inserted `sending` under %(attempt)s. A synchronous commit: the `sending` mark before the HTTP
# call (campaign.sql.ASYNC_COMMIT).
_RECORD_AND_CLAIM_SQL = prepared(
    f"""
        WITH {_RECORD_CHK}, slot AS (
            UPDATE rate_limits rl SET {ratelimit.TAKE_SLOT}
              FROM chk, inboxes i
             WHERE chk.ready AND chk.sendable AND EXISTS (SELECT 1 FROM m)
               AND NOT EXISTS (SELECT 1 FROM message_parts WHERE message_id = %(id)s)
               AND i.id = chk.inbox_id AND rl.key = 'inbox:' || chk.inbox_id AND {ratelimit.SLOT_FREE}
            RETURNING rl.key
        ), conv AS (
            INSERT INTO conversations (workspace_id, lead_id, inbox_id)
            SELECT i.workspace_id, m.lead_id, m.inbox_id FROM m JOIN inboxes i ON i.id = m.inbox_id
             WHERE m.lead_id IS NOT NULL
            ON CONFLICT (lead_id, inbox_id) DO NOTHING RETURNING id
        ), ins AS (
            INSERT INTO message_parts (message_id, inbox_id, idx, text, status, attempt_id, sending_at)
            SELECT m.id, m.inbox_id, u.i - 1, u.t,
                   CASE WHEN u.i = 1 AND EXISTS (SELECT 1 FROM slot) THEN 'sending' ELSE 'pending' END,
                   CASE WHEN u.i = 1 AND EXISTS (SELECT 1 FROM slot) THEN %(attempt)s::uuid END,
                   CASE WHEN u.i = 1 AND EXISTS (SELECT 1 FROM slot) THEN now() END
              FROM m, unnest(%(parts)s::text[]) WITH ORDINALITY AS u(t, i)
             WHERE NOT EXISTS (SELECT 1 FROM message_parts WHERE message_id = %(id)s)
            RETURNING id, idx
        ), first AS (
            -- the inbox's first send ever starts its warm-up ramp (R-HEALTH-1), as in the send claim
            UPDATE inboxes SET first_send_at = now()
             WHERE id = (SELECT inbox_id FROM chk) AND EXISTS (SELECT 1 FROM slot) AND first_send_at IS NULL
            RETURNING id
        )
        SELECT chk.ready, (SELECT id FROM m) AS recorded,
               EXISTS (SELECT 1 FROM slot) AND EXISTS (SELECT 1 FROM ins WHERE idx = 0) AS claimed,
               (SELECT id FROM ins WHERE idx = 0) AS part_id, (SELECT max(idx) FROM ins) AS last_idx,
               -- run again on a fresh connection after its commit's answer was lost (E-16): this
               -- record's own claim, recognised by its attempt id (not someone else's send in doubt)
               (SELECT p.id FROM message_parts p WHERE p.message_id = %(id)s AND p.idx = 0
                   AND p.status = 'sending' AND p.attempt_id = %(attempt)s::uuid) AS own_part_id,
               (SELECT max(p.idx) FROM message_parts p WHERE p.message_id = %(id)s) AS own_last_idx,
               i.consecutive_failures AS inbox_failures, i.gateway_failures, i.connection_state,
               extract(epoch FROM now() - i.state_checked_at)::float AS state_age
          FROM (SELECT 1) one LEFT JOIN chk ON true
          LEFT JOIN campaign_messages cm ON cm.id = %(id)s LEFT JOIN inboxes i ON i.id = cm.inbox_id""",
    "text_parts_and_claim",  # chaos/services.py finds sends in flight by this name too
)


def _record_text_and_parts(ctx: Context, parts: list[str], split_ms: int, settings: Settings) -> int | None:
    """generating -> sending: the text written in this delivery, its parts and the move, in one
    statement (T-PERF-7) — only when, in the same rows, every check of the split's preflight
    still passes (something may have changed while the LLM wrote: a cancel, a pause, the lead
    moved, opted out or answered, the inbox disabled). Not ready, the text alone is recorded and
    the split's own claim and preflight settle the message (its parts are split again then).
    Async commit: lost, the message is `generating` again under the step's lease, and is written
    and split again (tokens spent twice, nothing sent; the parts vanish with it).

    With ``ctx.claim_first_until`` not past, the statement also claims the first part `sending`
    and takes the inbox's slot — when the send step's claim would (its checks: the inbox usable
    and known connected, the slot free: ``ratelimit.SLOT_FREE``) — and then commits
    synchronously, as every `sending` mark before an HTTP call does (``ctx.first_send``)."""
    assert ctx.unrecorded is not None
    tokens, generation_ms = ctx.unrecorded
    claim = ctx.claim_first_until is not None and time.monotonic() <= ctx.claim_first_until
    attempt, token = uuid.uuid4(), str(uuid.uuid4())
    row = _named(
        _RECORD_AND_CLAIM_SQL if claim else _RECORD_SQL,
        {
            "id": ctx.message_id,
            "text": ctx.generated_text,
            "tokens": tokens,
            "gen_ms": generation_ms,
            "split_ms": split_ms,
            "parts": parts,
            "grace": settings.handoff_grace_seconds,
            "max_age": settings.connection_state_max_age_seconds,
            "token": token,
            "lease": settings.send_lease_seconds,
            "attempt": str(attempt),
        },
    )
    ctx.unrecorded = None
    own = claim and row is not None and row["recorded"] is None and row["own_part_id"] is not None
    if row is not None and claim and ((row["recorded"] is not None and row["claimed"]) or own):
        ctx.status = "sending"
        ctx.attempts = 0
        for name in ("inbox_failures", "gateway_failures", "connection_state", "state_age"):
            setattr(ctx, name, row[name])
        part_id, last_idx = (row["own_part_id"], row["own_last_idx"]) if own else (row["part_id"], row["last_idx"])
        ctx.first_send = FirstSend(ctx.inbox_id, ctx, part_id, parts[0], last_idx, attempt, token)
        return ctx.inbox_id
    if row is not None and row["recorded"] is not None:
        return ctx.inbox_id
    if row is None or row["ready"] is not False:
        return None  # no longer `generating`: another delivery took it over, nothing to record
    # something changed while the LLM wrote: the text is kept, and the split's own claim and
    # preflight settle the rest (generate_then_split)
    ctx.resplit = _record_text(ctx.message_id, ctx.generated_text or "", tokens, generation_ms, settings) is not None
    return None


# --------------------------------------------------------------------------------------------
# send part (R-PIPE-3, R-PIPE-4, R-FAIL-4/5)


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """What the send step did: ``next_delay`` seconds until the next part, or None when done.
    ``unrecorded``: the part went out and its record waits for the next part's claim (``defer_record``)."""

    sent: bool
    next_delay: float | None
    unrecorded: PendingSent | None = None


@dataclasses.dataclass(frozen=True)
class PendingSent:
    """A middle part Evolution accepted, not recorded yet: the claim statement of the next part
    records it (``send_step(prev=...)``, T-PERF-7: one round trip for both), or :func:`record_sent`
    does. Its inbox's slot is still held under ``token``."""

    message_id: int
    inbox_id: int
    part_id: int
    attempt: uuid.UUID
    key_id: str
    send_ms: int
    token: str


def record_sent(pending: PendingSent, settings: Settings) -> None:
    """Record a part whose record was left for a next claim that is not coming (the slot given back).
    Failing, the provider's key stays on the part (its redelivery records it) and the slot goes back."""
    grant = ratelimit.Grant(ratelimit.inbox_key(pending.inbox_id), pending.token)
    try:
        _record_sent_part(
            pending.part_id,
            pending.attempt,
            pending.key_id,
            message_id=pending.message_id,
            send_ms=pending.send_ms,
            lease=grant,
            wake_in=settings.handoff_grace_seconds,
        )
    except peewee.DatabaseError:
        _keep_key(pending.part_id, pending.attempt, pending.key_id)
        try:
            ratelimit.release_inbox(grant, sent=True)
        except Exception:  # the lease expires by itself (settings.send_lease_seconds)
            log.warning("send message=%s: could not release its inbox slot", pending.message_id, exc_info=True)
        raise


#: How a worker's delivery waits for its inbox's slot (actors.middleware.RateLimits.slot_refused):
#: called with the seconds to wait, it sleeps a short wait (the step then tries again) or defers
#: the delivery (raises; the message waits in the delay queue or PostgreSQL, R-RATE-1..3).
Pace = Callable[[float], None]


def send_step(
    message_id: int,
    settings: Settings,
    evolution: Messenger,
    *,
    rng: random.Random | None = None,
    on_http: Callable[[], None] | None = None,
    pace: Pace | None = None,
    prev: PendingSent | None = None,
    defer_record: bool = False,
) -> SendOutcome:
    """Send the first unsent part of a ``sending`` message; finalize after the last one.

    ``pace``: the delivery is paced per inbox (R-RATE-1): the step takes the inbox's send slot in
    the statement that claims the part, gives it back on every path (in the statement recording
    the part sent, when there is one: no round trip of its own), and calls ``pace`` with the wait
    when the slot is not free. None: no slot is taken (a direct call: tools, tests).
    ``prev``: the part before, sent by this delivery and not recorded yet: the claim records it
    (and keeps its slot for this part when the inbox's gap is zero). ``defer_record``: a middle
    part sent with a zero gap after it is not recorded here but returned (``unrecorded``) for the
    next part's claim; the caller passes it on or calls :func:`record_sent`.
    """
    state = _LeaseState(None)
    try:
        return _send_step(
            message_id,
            settings,
            evolution,
            rng=rng,
            on_http=on_http,
            lease=state,
            pace=pace,
            prev=prev,
            defer_record=defer_record,
        )
    finally:
        if state.grant is not None and not state.released:
            try:
                ratelimit.release_inbox(state.grant, sent=state.http)
            except Exception:  # the lease expires by itself (settings.send_lease_seconds)
                log.warning(
                    "send message=%s: could not release %s; its lease will expire",
                    message_id,
                    state.grant.key,
                    exc_info=True,
                )


@dataclasses.dataclass
class _LeaseState:
    """The send step's inbox slot: whether the HTTP call happened and whether it was given back."""

    grant: ratelimit.Grant | None
    http: bool = False
    released: bool = False

    @property
    def to_release(self) -> ratelimit.Grant | None:
        return self.grant if self.grant is not None and self.grant.granted else None


def _send_step(
    message_id: int,
    settings: Settings,
    evolution: Messenger,
    *,
    rng: random.Random | None,
    on_http: Callable[[], None] | None,
    lease: _LeaseState,
    pace: Pace | None,
    prev: PendingSent | None,
    defer_record: bool,
) -> SendOutcome:
    attempt = uuid.uuid4()
    token = str(uuid.uuid4())
    checked = False
    carry_ms = 0
    for _ in range(_CLAIM_TRIES):
        params = {
            "id": message_id,
            "checked": checked,
            "max_age": settings.connection_state_max_age_seconds,
            "pace": pace is not None,
            "token": token,
            "lease": settings.send_lease_seconds,
            "attempt": str(attempt),
        }
        after_prev = prev is not None
        if prev is not None:
            row = _claim_after(prev, params, settings)
            if row is not None and row["claimed"]:
                carry_ms = prev.send_ms  # its send_ms goes into this part's record
            prev = None
        else:
            row = _named(_SEND_CLAIM_SQL, params)
        if row is None:
            return SendOutcome(False, None)
        ctx = _context_from_row(row)  # the inbox's streaks and connection state included (same names)
        _note_slot(lease, row["slot_taken"], ratelimit.inbox_key(ctx.inbox_id), token, paced=pace is not None)
        if row["claimed"] or (row["part_status"] == "sending" and str(row["part_attempt"]) == str(attempt)):
            # (the second: this delivery's own claim, committed before its connection was lost and
            # the statement ran again on a fresh one, E-16: not someone else's send in doubt; the
            # slot was taken under this claim's token by that first run)
            if not row["claimed"] and pace is not None:
                lease.grant = ratelimit.Grant(ratelimit.inbox_key(ctx.inbox_id), token)
            break
        if pace is not None and lease.grant is None:
            refused = ratelimit.inbox_wait(ctx.inbox_id)
            if refused is None:
                return SendOutcome(False, None)
            pace(refused.wait)  # sleeps (try again), or defers this delivery (raises)
            continue
        if after_prev:
            # the claim that recorded the part before claimed nothing: claim again, on fresh rows (a
            # reply may have skipped the rest while that statement ran: the checks then end it)
            continue
        if row["ready"]:  # ready, yet its part was claimed meanwhile: another delivery got there first
            return SendOutcome(False, None)  # (a slot taken is released by send_step, not counted)
        settled = _before_claim(ctx, row, settings, evolution, lease, rng)
        if settled is not None:
            return settled
        checked = True  # the checks passed: claim without them (the state they read is fresh)
    else:
        raise Deferred(0.1, "the inbox's send slot stayed contended")
    return _send_claimed(
        ctx,
        settings,
        evolution,
        part_id=row["part_id"],
        idx=row["part_idx"],
        text=row["part_text"],
        last_idx=row["last_idx"],
        attempt=attempt,
        checked=checked,
        lease=lease,
        rng=rng,
        on_http=on_http,
        carry_ms=carry_ms,
        defer_record=defer_record,
    )


# The claim of the next part that records the part before it (sent by the same delivery a moment
# ago, zero gap): that part `sent` with its outbound log (R-IN-6), and the inbox's slot — still
# held by the delivery — kept for this part when ratelimit.SLOT_KEEP says the gap is zero and no
# cap is reached, else given back (the gap counting from now). The next part is claimed `sending`
# only with the slot kept and every check of _SEND_READY passing; otherwise the message row gets
# the part's record as part_sent would write it, and the step goes on with its usual claim.
# Synchronous commit: the `sending` mark before an HTTP call (and the part before, recorded).
_SEND_NEXT_CONTEXT_SQL = _context_sql(
    "m.id = %(id)s",
    extra_columns=f"{_SEND_COLUMNS}, {_SEND_READY} AS ready",
    extra_joins=_next_part_join(" AND id <> %(prev_id)s"),  # the part before is `sent` in this statement
)
_SEND_NEXT_SQL = prepared(
    f"""
WITH prev AS (
    UPDATE message_parts SET status = 'sent', provider_message_id = %(prev_key)s, sent_at = now()
     WHERE id = %(prev_id)s AND attempt_id = %(prev_attempt)s AND status = 'sending'
    RETURNING id, message_id, text, provider_message_id
), {out_log_ctes("prev").strip()}, ctx AS (
    {_SEND_NEXT_CONTEXT_SQL}
), keep AS (
    SELECT (EXISTS (SELECT 1 FROM prev) AND ctx.ready AND ctx.part_status IN ('pending', 'failed')
            AND {ratelimit.SLOT_KEEP}) AS keep
      FROM ctx JOIN inboxes i ON i.id = ctx.inbox_id JOIN rate_limits rl ON rl.key = 'inbox:' || ctx.inbox_id
), slot AS (
    UPDATE rate_limits rl SET
        lease_token = CASE WHEN k.keep THEN %(token)s::uuid END,
        lease_until = CASE WHEN k.keep THEN now() + make_interval(secs => %(lease)s) END,
        last_at = now(), updated_at = now()
      FROM ctx, keep k
     WHERE rl.key = 'inbox:' || ctx.inbox_id AND rl.lease_token = %(prev_token)s::uuid
    RETURNING k.keep
), part AS (
    UPDATE message_parts p SET status = 'sending', attempt_id = %(attempt)s, sending_at = now()
      FROM ctx
     WHERE p.id = ctx.part_id AND p.status IN ('pending', 'failed') AND coalesce((SELECT keep FROM slot), false)
    RETURNING p.id
), msg AS (
    UPDATE campaign_messages SET send_ms = coalesce(send_ms, 0) + %(prev_ms)s, attempts = 0,
        status_changed_at = now(), wake_at = now() + make_interval(secs => %(wake)s)
     WHERE id = (SELECT message_id FROM prev) AND NOT EXISTS (SELECT 1 FROM part)
    RETURNING id
)
SELECT ctx.*, EXISTS (SELECT 1 FROM prev) AS prev_recorded, coalesce((SELECT keep FROM slot), false) AS slot_taken,
       EXISTS (SELECT 1 FROM part) AS claimed FROM ctx""",
    "send_next_claim",  # chaos/services.py finds sends in flight by this name too
)


def _claim_after(prev: PendingSent, params: dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """Run _SEND_NEXT_SQL for ``prev``; its part is recorded (or its provider key kept) whatever happens."""
    try:
        row = _named(
            _SEND_NEXT_SQL,
            {
                **params,
                "prev_id": prev.part_id,
                "prev_key": prev.key_id,
                "prev_attempt": str(prev.attempt),
                "prev_token": prev.token,
                "prev_ms": prev.send_ms,
                "wake": settings.handoff_grace_seconds,
            },
        )
    except peewee.DatabaseError:
        _keep_key(prev.part_id, prev.attempt, prev.key_id)
        try:  # as send_step gives a slot back when a part's record failed
            ratelimit.release_inbox(ratelimit.Grant(ratelimit.inbox_key(prev.inbox_id), prev.token), sent=True)
        except Exception:  # the lease expires by itself (settings.send_lease_seconds)
            log.warning("send message=%s: could not release its inbox slot", prev.message_id, exc_info=True)
        raise
    if row is None or not row["prev_recorded"]:
        # the part was moved meanwhile (an operator's resolve): keep the provider's id anyway; a
        # slot still held under its token is given back
        log.warning(
            "part %s: sent (key %s) but no longer 'sending' with attempt %s", prev.part_id, prev.key_id, prev.attempt
        )
        _one(
            "UPDATE message_parts SET provider_message_id = coalesce(provider_message_id, %s) WHERE id = %s "
            "RETURNING id",
            (prev.key_id, prev.part_id),
        )
        ratelimit.release_inbox(ratelimit.Grant(ratelimit.inbox_key(prev.inbox_id), prev.token), sent=True)
    return row


@dataclasses.dataclass(frozen=True)
class FirstSend:
    """A message whose first part the record of its text and parts also claimed `sending` (in the
    generate delivery, the inbox's slot taken under ``token``): :func:`send_claimed` sends it."""

    inbox_id: int
    ctx: Context
    part_id: int
    text: str
    last_idx: int
    attempt: uuid.UUID
    token: str


def send_claimed(
    first: FirstSend, settings: Settings, evolution: Messenger, *, defer_record: bool = False
) -> SendOutcome:
    """Send the part the generate delivery's record claimed (the send step after its claim: the
    window, the HTTP call, the outcome; the slot given back on every path; ``defer_record`` as in
    :func:`send_step`)."""
    state = _LeaseState(ratelimit.Grant(ratelimit.inbox_key(first.inbox_id), first.token))
    try:
        return _send_claimed(
            first.ctx,
            settings,
            evolution,
            part_id=first.part_id,
            idx=0,
            text=first.text,
            last_idx=first.last_idx,
            attempt=first.attempt,
            checked=False,
            lease=state,
            rng=None,
            on_http=None,
            defer_record=defer_record,
        )
    finally:
        if not state.released:
            try:
                ratelimit.release_inbox(state.grant, sent=state.http)  # type: ignore[arg-type]
            except Exception:  # the lease expires by itself (settings.send_lease_seconds)
                log.warning("send message=%s: could not release its inbox slot", first.ctx.message_id, exc_info=True)


def _send_claimed(
    ctx: Context,
    settings: Settings,
    evolution: Messenger,
    *,
    part_id: int,
    idx: int,
    text: str,
    last_idx: int,
    attempt: uuid.UUID,
    checked: bool,
    lease: _LeaseState,
    rng: random.Random | None,
    on_http: Callable[[], None] | None,
    carry_ms: int = 0,
    defer_record: bool = False,
) -> SendOutcome:
    """The send step once its part is committed `sending` under ``attempt`` (``carry_ms``: send
    time of the part before, whose record left it for this one's)."""
    message_id = ctx.message_id
    started_message = idx > 0
    # committed `sending` (autocommit): from here on, an interruption leaves evidence
    if not started_message and not checked and _window_closed(ctx):
        # the claim's one check not in SQL: nothing went out, so the part goes back and the
        # message is skipped (a crash right here leaves the part `sending`: in doubt, never resent)
        _unclaim_past_window(ctx, part_id, attempt, settings)
        return SendOutcome(False, None)
    lease.http = True
    if on_http:
        on_http()
    started = time.perf_counter()
    try:
        result = evolution.send_text(ctx.instance, ctx.lead_phone or "", text)
    except AmbiguousSend as exc:
        # The gateway's fault or the network's, not the number's: in doubt, never counted (R-FAIL-6).
        mark_in_doubt(ctx.message_id, part_id, str(exc), settings, attempt=attempt)
        return SendOutcome(False, None)
    except InvalidNumber as exc:
        _release_part(part_id, attempt, "failed", str(exc))
        finish_message(
            message_id, "failed", settings, from_statuses=("sending",), error=exc, error_class="invalid_number"
        )
        return SendOutcome(False, None)
    except (AuthError, UnknownInstance) as exc:
        # 401/404 of the instance: this number cannot send (a real failure, R-FAIL-6); its runs pause.
        _release_part(part_id, attempt, "pending", str(exc))
        _count_inbox_failure(ctx, settings, exc)
        reason = "provider_auth" if isinstance(exc, AuthError) else "inbox_unknown_instance"
        runs.pause_inbox_runs(ctx.inbox_id, reason)
        log.error("send message=%s inbox=%s: %s", message_id, ctx.inbox_id, exc)
        if not started_message:
            _back_to_wait(message_id, "sending")
        else:  # a started message waits for the inbox to be fixed, then continues (never fails)
            _park(ctx, settings.max_backoff_seconds, f"inbox refused ({reason}): waiting for it")
        return SendOutcome(False, None)
    except TransientError as exc:
        _release_part(part_id, attempt, "pending", str(exc))
        return _send_trouble(ctx, exc, settings, evolution, started_message)
    except PermanentError as exc:
        _release_part(part_id, attempt, "failed", str(exc))
        if getattr(exc, "code", None) == "forbidden":  # 403 of the instance: the number cannot send
            _count_inbox_failure(ctx, settings, exc)
        finish_message(message_id, "failed", settings, from_statuses=("sending",), error=exc)
        return SendOutcome(False, None)
    try:
        return _sent(
            ctx,
            settings,
            part_id,
            attempt,
            result.key_id,
            idx,
            last_idx,
            _ms(started) + carry_ms,
            lease,
            rng,
            defer_record=defer_record,
        )
    except peewee.DatabaseError:
        _keep_key(part_id, attempt, result.key_id)
        raise


def _keep_key(part_id: int, attempt: uuid.UUID, key_id: str) -> None:
    """The part went out but its record failed (a lock timeout, the connection lost mid-way): keep
    the provider's key on the part alone (no lock on the run), so the redelivery of this step
    records the known outcome instead of calling it in doubt."""
    _one(
        """UPDATE message_parts SET provider_message_id = coalesce(provider_message_id, %s)
            WHERE id = %s AND attempt_id = %s AND status = 'sending' RETURNING id""",
        (key_id, part_id, str(attempt)),
    )


def _note_slot(lease: _LeaseState, taken: bool, key: str, token: str, *, paced: bool) -> None:
    """What the claim statement said of the inbox's slot: held (under ``token``), or not held —
    never taken, or lost when its lease ended during a slow check: then it is not ours to release."""
    if taken:
        if lease.grant is not None and lease.grant.key != key:  # the message moved inbox meanwhile
            ratelimit.release_inbox(lease.grant, sent=False)
        lease.grant = ratelimit.Grant(key, token)
    elif paced:
        lease.grant = None


def _unclaim_past_window(ctx: Context, part_id: int, attempt: uuid.UUID, settings: Settings) -> None:
    """A part claimed after its run's window closed (E-06): it goes back, nothing went out, and the
    message is skipped ``window_closed``; an inbox that never sent does not start its warm-up ramp
    (R-HEALTH-1: the claim set its first send)."""
    _release_part(part_id, attempt, "pending", "window closed")
    _one(
        """UPDATE inboxes i SET first_send_at = NULL WHERE i.id = %s AND first_send_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM message_parts p WHERE p.inbox_id = i.id
                                AND p.status IN ('sent', 'sending', 'in_doubt')) RETURNING id""",
        (ctx.inbox_id,),
    )
    finish_message(ctx.message_id, "skipped", settings, skip_reason="window_closed")


def _before_claim(
    ctx: Context,
    row: dict[str, Any],
    settings: Settings,
    evolution: Messenger,
    lease: _LeaseState,
    rng: random.Random | None,
) -> SendOutcome | None:
    """The checks before a send, for a message the claim statement did not find ready (R-PIPE-3).

    Returns how the step ends when the message was settled or put back to wait; None when every
    check passed (the step claims again, without the checks).
    """
    if ctx.status != "sending":
        return SendOutcome(False, None)
    if row["part_id"] is None:
        # No part left to send: the rest was stopped by a reply (R-IN-3), or an operator's resolve
        # left every part sent. Finalize now: `sent` when a part went out, else skipped.
        _stop_rest(ctx, settings, ctx.stop_reason or "replied")
        return SendOutcome(False, None)
    part_id, idx, part_status = row["part_id"], row["part_idx"], row["part_status"]
    if part_status == "sending" and row["part_key"] is not None:
        # Evolution accepted this part (its key.id was kept) but recording it failed (a lock
        # timeout, a lost connection): a known outcome, never a doubt. Record it now.
        log.warning(
            "send message=%s: part %s was accepted (key %s) but not recorded; recording it",
            ctx.message_id,
            part_id,
            row["part_key"],
        )
        attempt = uuid.UUID(str(row["part_attempt"]))
        return _sent(ctx, settings, part_id, attempt, row["part_key"], idx, row["last_idx"], None, lease, rng)
    if part_status in ("sending", "in_doubt"):
        # Someone committed this part `sending` and never recorded an outcome (a crash, a lost
        # answer): it may have gone out. Never resend it automatically (R-FAIL-4), and settle it
        # BEFORE any other check: a cancel, a closed window, a moved or opted-out lead must not
        # turn a possibly-delivered message into `skipped` or `failed` (R-PIPE-3, E-25).
        mark_in_doubt(ctx.message_id, part_id, "part found in 'sending' without an outcome", settings)
        return SendOutcome(False, None)
    started_message = idx > 0
    if not _preflight(ctx, settings, started=started_message):
        return SendOutcome(False, None)
    if not _inbox_connected(ctx, settings, evolution):
        _inbox_went_down(ctx, settings, started_message)
        return SendOutcome(False, None)
    if _retry_after_pending(ctx, settings):
        return SendOutcome(False, None)
    return None


def _sent(
    ctx: Context,
    settings: Settings,
    part_id: int,
    attempt: uuid.UUID,
    key_id: str,
    idx: int,
    last_idx: int,
    send_ms: int | None,
    lease: _LeaseState,
    rng: random.Random | None,
    *,
    defer_record: bool = False,
) -> SendOutcome:
    """Record a part Evolution accepted; after the last one the message finishes in the same statement.
    ``defer_record``: a middle part with a zero gap after it is returned unrecorded, its slot still
    held, for the next part's claim to record (see send_step)."""
    if idx >= last_idx:
        done = finish_message(
            ctx.message_id,
            "sent",
            settings,
            from_statuses=("sending",),
            last_part=(part_id, attempt, key_id),
            send_ms=send_ms,
            lease=lease.to_release,
            async_commit=True,  # lost: the last part back to `sending`, an honest in_doubt (R-FAIL-4)
        )
        lease.released = True
        if done is None:
            _record_sent_part(part_id, attempt, key_id)
        _reset_inbox_failures(ctx)
        return SendOutcome(True, None)
    gap_min, gap_max = ctx.part_gap
    delay = (rng or random).uniform(gap_min, gap_max)
    grant = lease.to_release
    if defer_record and delay == 0 and grant is not None and grant.token is not None:
        lease.released = True  # the slot goes on with the record (record_sent, or the next claim)
        _reset_inbox_failures(ctx)
        pending = PendingSent(ctx.message_id, ctx.inbox_id, part_id, attempt, key_id, send_ms or 0, grant.token)
        return SendOutcome(True, 0.0, pending)
    _record_sent_part(
        part_id,
        attempt,
        key_id,
        message_id=ctx.message_id,
        send_ms=send_ms,
        lease=lease.to_release,
        wake_in=delay + settings.handoff_grace_seconds,
    )
    lease.released = True
    _reset_inbox_failures(ctx)
    return SendOutcome(True, delay)


def _send_trouble(
    ctx: Context, exc: TransientError, settings: Settings, evolution: Messenger, started_message: bool
) -> SendOutcome:
    """A send refused for a reason that may pass: a disconnected number, or the gateway's trouble.

    Disconnected (Evolution says so and ``connectionState`` agrees): the inbox's runs pause and
    the message waits, a started one at its next part (E-07, E-24). "Connection Closed" while
    ``connectionState`` says open is the number's own failure (R-FAIL-6). Anything else (429,
    5xx, timeouts before the request left) is the gateway's: never counted against the number;
    the whole instance is held for a backoff that grows with the inbox's streak (a Retry-After
    is a floor), and the message spends an attempt only on the first failure of a streak — in a
    gateway outage, waiting is not failing (E-23) — or once the trouble has lasted longer than
    GATEWAY_OUTAGE_TOLERANCE_SECONDS (a message the gateway never takes still ends, failed).
    """
    disconnected_code = getattr(exc, "code", None) == "instance_disconnected"
    state = _probe_state(ctx, evolution)
    if state is not None and state != "open":
        _inbox_went_down(ctx, settings, started_message)
        return SendOutcome(False, None)
    if disconnected_code and state == "open":
        _count_inbox_failure(ctx, settings, exc)  # "Connection Closed" on an open number: real
        _transient(ctx, exc, settings, "send")
        return SendOutcome(False, None)
    hold = backoff_seconds(ctx.gateway_failures + 1, settings, getattr(exc, "retry_after", None))
    streak, lasted = _gateway_trouble(ctx, hold)
    log.warning(
        "send message=%s inbox=%s: gateway trouble #%s for %.0fs (%s); inbox held %.1fs",
        ctx.message_id,
        ctx.inbox_id,
        streak,
        lasted,
        getattr(exc, "code", type(exc).__name__),
        hold,
    )
    if streak <= 1 or lasted >= settings.gateway_outage_tolerance_seconds:
        _transient(ctx, exc, settings, "send")  # maybe this message's own trouble: it counts
        return SendOutcome(False, None)
    _wait(ctx, hold, settings, f"gateway trouble on inbox {ctx.inbox_id} ({getattr(exc, 'code', '')})")
    return SendOutcome(False, None)


def _gateway_trouble(ctx: Context, hold: float) -> tuple[int, float]:
    """Count one gateway trouble on the inbox and hold its sends for ``hold`` s; return the
    streak and how long the trouble has lasted (seconds)."""
    row = _one(
        """WITH i AS (UPDATE inboxes SET gateway_failures = gateway_failures + 1,
                                 gateway_trouble_since = coalesce(gateway_trouble_since, now())
                             WHERE id = %(inbox)s
                             RETURNING gateway_failures,
                                 extract(epoch FROM now() - gateway_trouble_since)::float AS lasted),
                  h AS (INSERT INTO rate_limits (key, blocked_until)
                        VALUES (%(key)s, now() + make_interval(secs => %(hold)s))
                        ON CONFLICT (key) DO UPDATE SET updated_at = now(),
                            blocked_until = greatest(rate_limits.blocked_until, EXCLUDED.blocked_until)
                        RETURNING key)
                  SELECT i.gateway_failures, i.lasted, (SELECT count(*) FROM h) FROM i""",
        {"inbox": ctx.inbox_id, "key": ratelimit.inbox_key(ctx.inbox_id), "hold": hold},
    )
    return (int(row[0]), float(row[1] or 0)) if row else (1, 0.0)


def _inbox_connected(ctx: Context, settings: Settings, evolution: Messenger) -> bool:
    """Whether the inbox can send, from its known state (R-PIPE-3): ``connection.update`` events and
    the health check keep it fresh; ``connectionState`` is polled only when it is older than
    CONNECTION_STATE_MAX_AGE_SECONDS. A failed poll is no evidence: the send goes ahead."""
    if ctx.state_age is not None and ctx.state_age <= settings.connection_state_max_age_seconds:
        return ctx.connection_state not in ("close", "connecting")
    state = _probe_state(ctx, evolution)
    return state is None or state == "open"


def _inbox_went_down(ctx: Context, settings: Settings, started_message: bool) -> None:
    """The inbox is disconnected: its runs pause and this message waits (E-07, R-PIPE-3).

    A message not started goes back to ``pending`` (PostgreSQL); a started one stays ``sending``,
    parked, and goes on at its next part once the inbox is open again (E-24): it never fails
    because of a disconnect, and the inbox's failure count is untouched (R-FAIL-6).
    """
    runs.pause_inbox_runs(ctx.inbox_id, "inbox_disconnected")  # only a pool with no member left (R-POOL-3)
    mark_disconnected(ctx.inbox_id)
    if not started_message:
        _back_to_wait(ctx.message_id, "sending")
        # down long enough already (a straggler of an inbox its pool works around): hand it over
        failover.fail_over(settings, inbox_ids=[ctx.inbox_id])
        return
    _park(ctx, settings.connection_state_max_age_seconds, f"inbox {ctx.inbox_id} disconnected mid-message")


def _park(ctx: Context, seconds: float, why: str) -> None:
    """Keep a started message ``sending`` and let the recovery sweep wake it in ``seconds`` (or
    sooner: an inbox coming back wakes its parked messages)."""
    row = _one(
        """UPDATE campaign_messages SET wake_at = now() + make_interval(secs => %s)
                  WHERE id = %s AND status = 'sending' RETURNING run_id""",
        (seconds, ctx.message_id),
    )
    if row is not None:
        log_event(
            "send",
            f"started message waits: {why}",
            run_id=ctx.run_id,
            message_id=ctx.message_id,
            lead_id=ctx.lead_id,
            level="warning",
            details={"retry_in_s": seconds},
        )


# async commit: a lost `sent` record leaves the part `sending` (its mark was committed
# synchronously before the HTTP call): the sweep calls it in doubt, honestly (R-FAIL-4)
_PART_SENT_SQL = prepared_async(
    """WITH part AS (UPDATE message_parts SET status = 'sent', provider_message_id = %s, sent_at = now()
                             WHERE id = %s AND attempt_id = %s AND status = 'sending'
                             RETURNING id, message_id, text, provider_message_id),"""
    + OUT_LOG_CTES
    + """,
                  lease AS (UPDATE rate_limits SET lease_token = NULL, lease_until = NULL, updated_at = now(),
                                last_at = now()
                            WHERE %s::text IS NOT NULL AND key = %s AND lease_token = %s RETURNING key)
                  UPDATE campaign_messages SET send_ms = coalesce(send_ms, 0) + %s, attempts = 0,
                      status_changed_at = now(),
                      wake_at = CASE WHEN %s::float IS NULL THEN wake_at
                                     ELSE now() + make_interval(secs => %s::float) END
                  WHERE id = (SELECT message_id FROM part) RETURNING id""",
    "part_sent",
)


def _record_sent_part(
    part_id: int,
    attempt: uuid.UUID,
    key_id: str,
    *,
    message_id: int | None = None,
    send_ms: int | None = None,
    lease: ratelimit.Grant | None = None,
    wake_in: float | None = None,
) -> None:
    row = _one(
        _PART_SENT_SQL,
        (
            key_id,
            part_id,
            str(attempt),
            lease and lease.key,
            lease and lease.key,
            lease and lease.token,
            send_ms or 0,
            wake_in,
            wake_in,
        ),
    )
    if row is None:
        # The part was moved meanwhile (an operator resolve, the sweep): keep the provider's id anyway.
        log.warning("part %s: sent (key %s) but no longer 'sending' with attempt %s", part_id, key_id, attempt)
        _one(
            "UPDATE message_parts SET provider_message_id = coalesce(provider_message_id, %s) WHERE id = %s "
            "RETURNING id",
            (key_id, part_id),
        )


def _release_part(part_id: int, attempt: uuid.UUID, status: str, error: str) -> None:
    """A part whose send did not go out: back to ``status``; ``skipped`` instead of a retry when the
    lead stopped the message while it was in flight (R-IN-3: nothing after the reply goes out)."""
    _one(
        """UPDATE message_parts p SET error_message = %(err)s,
                  status = CASE WHEN %(status)s = 'pending' AND (
                               SELECT m.stop_reason FROM campaign_messages m WHERE m.id = p.message_id) IS NOT NULL
                           THEN 'skipped' ELSE %(status)s END
            WHERE id = %(id)s AND attempt_id = %(attempt)s AND status = 'sending' RETURNING id""",
        {"status": status, "err": error[:2000], "id": part_id, "attempt": str(attempt)},
    )


def _probe_state(ctx: Context, evolution: Messenger) -> str | None:
    """Ask Evolution for the inbox's connection state and store it; None when the probe failed
    (unknown: never pause on a failed health probe alone, R-FAIL-6)."""
    try:
        state = evolution.connection_state(ctx.instance)
    except ProviderError as exc:
        log.info("inbox %s: connectionState failed (%s)", ctx.inbox_id, exc.code)
        return None
    store_state(ctx.inbox_id, state)
    return state


def _count_inbox_failure(ctx: Context, settings: Settings, exc: BaseException) -> None:
    """A REAL send failure (this number cannot send: 401/403/404 of the instance, "Connection
    Closed" while it says open): N in a row disable the inbox and pause its runs (R-FAIL-6).
    Gateway trouble never comes here."""
    row = _one(
        """UPDATE inboxes SET consecutive_failures = consecutive_failures + 1,
                      disabled = disabled OR consecutive_failures + 1 >= %s,
                      disabled_reason = CASE WHEN disabled THEN disabled_reason
                          WHEN consecutive_failures + 1 >= %s THEN %s ELSE NULL END
                  WHERE id = %s RETURNING disabled, consecutive_failures""",
        (
            settings.inbox_failure_limit,
            settings.inbox_failure_limit,
            f"{settings.inbox_failure_limit} consecutive send failures, last: {getattr(exc, 'code', '')}",
            ctx.inbox_id,
        ),
    )
    # the number's own refusal is also R-HEALTH-2 evidence (a sliding hour, not only a streak)
    health.record_refusal(ctx.inbox_id, str(getattr(exc, "code", None) or type(exc).__name__), settings)
    if row and row[0] and row[1] == settings.inbox_failure_limit:
        log_event(
            "inbox",
            f"inbox {ctx.inbox_id} disabled after {row[1]} consecutive send failures",
            run_id=ctx.run_id,
            level="error",
        )
        runs.pause_inbox_runs(ctx.inbox_id, "inbox_disabled")
        failover.fail_over(settings, inbox_ids=[ctx.inbox_id])  # at once, not at the next poll (R-POOL-3)


def _reset_inbox_failures(ctx: Context) -> None:
    """A send went out: both streaks (real failures, gateway trouble) end."""
    if not ctx.inbox_failures and not ctx.gateway_failures:
        # No streak when this send started, and none can have begun since: the inbox's send
        # slot (one send in flight, R-RATE-1) is held by this step. Saves a round trip.
        return
    _one(
        """UPDATE inboxes SET consecutive_failures = 0, gateway_failures = 0, gateway_trouble_since = NULL
            WHERE id = %s AND (consecutive_failures > 0 OR gateway_failures > 0) RETURNING id""",
        (ctx.inbox_id,),
    )


# --------------------------------------------------------------------------------------------
# dead letters and operator resolution


# --------------------------------------------------------------------------------------------
# recovery sweep and inbox health (scheduler side)


# --------------------------------------------------------------------------------------------
# operator repairs: dead-letter requeue (R-OPS-2, R-FAIL-3) and in-doubt resolution (R-FAIL-4)
#
# Conditional transitions like every step above: a second invocation finds another status and
# changes nothing. Each runs in ONE transaction (message, parts, run counters, run reopen); the
# caller publishes the next step only once it committed. A publish lost after the commit is the
# recovery sweep's: it re-enqueues queued/generating/splitting/sending messages idle past the
# lease (R-FAIL-8), which is why every repair stamps status_changed_at.
