"""Engine middleware. Hooks are no-ops unless overridden (dramatiq's Middleware base); each class
declares the actor options it reads.

Order matters (see broker.middleware_list): ``before_*`` hooks run in list order, ``after_*``
hooks in reverse. DbConnection comes first (its connection is there for everyone else and is
released last); DeadLetters sits before Retries so that its after-hook runs once Retries has
decided whether the message failed for good; RateLimits runs last before the actor.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage

from actors.steplog import StepLog
from campaign import outcomes, ratelimit
from campaign.db import db, init_db
from campaign.inbound import triage
from campaign.settings import Settings
from campaign.steps import MAX_BROKER_DELAY_SECONDS  # longer waits live in PostgreSQL (R-DISP-2)

log = logging.getLogger(__name__)

#: a wait this short is spent in the worker thread (campaign.ratelimit: one definition)
IN_THREAD_WAIT_SECONDS = ratelimit.IN_THREAD_WAIT_SECONDS


class DbConnection(Middleware):
    """Bind the database once per process; check a pooled connection out per message.

    The pool replaces a connection that broke (``pg_terminate_backend``, server restart), so
    a worker heals after E-16 instead of failing every later message on a dead socket.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        init_db(self.settings)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        init_db(self.settings)
        db.connect(reuse_if_open=True)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        self._release()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._release()

    @staticmethod
    def _release() -> None:
        if db.obj is None or db.is_closed():
            return
        try:
            if db.in_transaction():  # an actor left a transaction open: never leak it to the pool
                db.rollback()
        except Exception:  # the connection is broken: the pool discards it on close
            log.debug("rollback on release failed", exc_info=True)
        try:
            db.close()
        except Exception:
            log.debug("close on release failed", exc_info=True)


class DeadLetters(Middleware):
    """When a pipeline message dies (retries exhausted / final failure), record it in PostgreSQL
    and settle its campaign message as ``failed`` — RabbitMQ's ``.XQ`` copy expires after 7
    days; the ``dead_letters`` row does not (R-FAIL-3, R-OPS-2)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def actor_options(self) -> set[str]:
        return {"campaign_step", "triage_job"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or not message.failed:
            return
        try:
            actor = broker.get_actor(message.actor_name)
        except Exception:
            actor = None
        if actor is None or not (actor.options.get("campaign_step") or actor.options.get("triage_job")):
            return
        triage_job = bool(actor.options.get("triage_job"))
        first = message.args[0] if message.args else None
        # a triage message carries a reply_triage id: never a campaign message's
        message_id = None if triage_job else first
        error = f"{type(exception).__name__}: {exception}"
        try:
            with db.atomic():
                finished = (
                    outcomes.fail_exhausted(int(message_id), error, self.settings, message.actor_name)
                    if isinstance(message_id, int)
                    else None
                )
                run_id = finished.run_id if finished else None
                if triage_job and isinstance(first, int):
                    # E-37: the keyword rules decide a reply whose triage died (no-op when settled)
                    triage.settle_dead(first, error, self.settings)
                    found = db.execute_sql("SELECT run_id FROM reply_triage WHERE id = %s", (first,)).fetchone()
                    run_id = found[0] if found else None
                db.execute_sql(
                    """INSERT INTO dead_letters (queue, actor, dramatiq_message_id, campaign_message_id, run_id,
                                                 payload, error_class, error_message)
                       VALUES (%s, %s, %s, (SELECT id FROM campaign_messages WHERE id = %s),
                               coalesce(%s, (SELECT run_id FROM campaign_messages WHERE id = %s)), %s, %s, %s)
                       ON CONFLICT (dramatiq_message_id) DO UPDATE SET status = 'dead',
                           error_class = EXCLUDED.error_class, error_message = EXCLUDED.error_message,
                           resolved_at = NULL""",
                    (
                        message.queue_name,
                        message.actor_name,
                        message.message_id,
                        message_id,
                        run_id,
                        message_id,
                        json.dumps(message.asdict(), default=str),
                        type(exception).__name__,
                        str(exception)[:2000],
                    ),
                )
            log.error(
                "dead letter: %s message=%s dramatiq_id=%s: %s",
                message.actor_name,
                message_id,
                message.message_id,
                error,
            )
        except Exception:
            log.exception(
                "could not record dead letter %s (it is still in %s.XQ)", message.message_id, message.queue_name
            )


def _back_to_pending(message_id: int, delay: float) -> bool:
    """A ``sending`` message with no part out yet back to ``pending``, due in ``delay`` seconds."""
    row = db.execute_sql(
        """UPDATE campaign_messages m SET status = 'pending', status_changed_at = now(), wake_at = NULL,
                  scheduled_at = greatest(m.scheduled_at, now() + make_interval(secs => %s))
            WHERE m.id = %s AND m.status = 'sending'
              AND NOT EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id
                                 AND p.status IN ('sent', 'sending', 'in_doubt'))
            RETURNING m.id""",
        (delay, message_id),
    ).fetchone()
    return row is not None


class RateLimitUnavailable(MiddlewareError):
    """The shared pacing state could not be read or the delayed copy not published: do not run."""


class RateLimits(Middleware):
    """Shared per-inbox and per-OpenRouter-key pacing of the actors that declare it (R-RATE-1..3).

    ``rate_limit="openrouter"`` (the triage job): one request of the key's per-minute budget is
    taken before the actor runs (generate and split take theirs in their claim statement,
    pipeline._claim). ``rate_limit="inbox"``: the send step takes its inbox's slot itself, in the
    statement that claims the part (one round trip, T-PERF-7), and calls :meth:`slot_refused`
    when the slot is not free. Either way, a message that may not run yet is re-enqueued with a
    delay and skipped: it is never dropped and never spends a retry (raising RateLimitExceeded
    would).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    @property
    def actor_options(self) -> set[str]:
        return {"rate_limit"}

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # dramatiq only propagates MiddlewareError from before-hooks; anything else would be
        # logged and the actor would run unpaced. Fail closed: the message is retried instead.
        try:
            self._acquire(broker, message)
        except (SkipMessage, MiddlewareError):
            raise
        except Exception as exc:
            raise RateLimitUnavailable(f"rate limit check failed: {type(exc).__name__}: {exc}") from exc

    def _acquire(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._local.delivery = None
        actor = broker.get_actor(message.actor_name)
        kind = actor.options.get("rate_limit")
        if kind is None:
            return
        if kind not in ("inbox", "openrouter"):
            raise ValueError(f"unknown rate_limit option {kind!r} on actor {message.actor_name}")
        deadline = time.monotonic() + IN_THREAD_WAIT_SECONDS
        if kind == "inbox":
            # the step asks for its slot; this delivery is what slot_refused defers
            self._local.delivery = (broker, message, deadline)
            return
        while True:
            grant = ratelimit.acquire_minute(
                ratelimit.openrouter_key(self.settings.openrouter_api_key),
                self.settings.openrouter_requests_per_minute,
            )
            if grant.granted or time.monotonic() + grant.wait > deadline:
                break
            time.sleep(grant.wait)
        if not grant.granted:
            self._defer(broker, message, grant.wait, inbox=False)

    def slot_refused(self, wait: float) -> None:
        """The send step's inbox slot is not free for ``wait`` seconds: a short wait is spent in
        this thread (returns: the step tries again); a longer one defers the delivery (raises
        SkipMessage). Outside a paced delivery (no ``before_process_message``), it only sleeps."""
        delivery = getattr(self._local, "delivery", None)
        if delivery is None:
            time.sleep(min(wait, IN_THREAD_WAIT_SECONDS))
            return
        broker, message, deadline = delivery
        if time.monotonic() + wait <= deadline:
            time.sleep(wait)
            return
        self._defer(broker, message, wait, inbox=True)

    def _defer(self, broker: dramatiq.Broker, message: MessageProxy, delay: float, *, inbox: bool) -> None:
        """Re-enqueue a copy of ``message`` ``delay`` seconds later (or park it in PostgreSQL) and skip it."""
        actor = broker.get_actor(message.actor_name)
        if inbox and delay > self.settings.dispatch_horizon_seconds and message.args:
            # A cap (hourly, daily, warm-up) holds the inbox longer than the dispatch horizon and
            # this message has not started: it goes back to PostgreSQL, `pending` and due when the
            # inbox has room (R-DISP-2, issue 22), its text and parts kept for then.
            if _back_to_pending(int(message.args[0]), delay):
                raise SkipMessage(f"inbox capped for {delay:.0f}s: back to pending until then")
        parked = delay > MAX_BROKER_DELAY_SECONDS
        log.debug("rate limited %s args=%s: retry in %.2fs", message.actor_name, message.args, delay)
        if message.args:
            # A message waiting its turn is alive, not stuck: its hand-off deadline moves past
            # this wait, so the recovery sweep does not copy it (R-FAIL-8). Behind a busy inbox
            # one message is deferred many times in a row, and each copy the sweep made would
            # join the queue of pollers. The row is written only when the deadline would pass
            # before this delivery comes back. A wait longer than RabbitMQ should hold a message
            # (R-DISP-2: a daily cap, a long Retry-After) parks it in PostgreSQL instead: the
            # sweep re-publishes it at its due time.
            wake_in = delay if parked else delay + self.settings.handoff_grace_seconds
            # the row whose hand-off deadline moves: the campaign message of a chain step, the
            # reply_triage row of a triage job
            table, live = (
                ("reply_triage", "status = 'pending'")
                if actor.options.get("triage_job")
                else ("campaign_messages", "status IN ('queued', 'generating', 'splitting', 'sending')")
            )
            db.execute_sql(
                f"""UPDATE {table} SET wake_at = now() + make_interval(secs => %s)
                              WHERE id = %s AND {live}
                                AND (wake_at IS NULL OR wake_at < now() + make_interval(secs => %s))""",
                (wake_in, int(message.args[0]), delay),
            )
        if parked and message.args:
            raise SkipMessage(f"rate limited for {delay:.0f}s: parked in PostgreSQL until then")
        broker.enqueue(message.copy(), delay=int(min(delay, MAX_BROKER_DELAY_SECONDS) * 1000) + 1)
        raise SkipMessage(f"rate limited for {delay:.2f}s")

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        self._local.delivery = None

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._local.delivery = None


def engine_middleware(settings: Settings) -> tuple[list[Middleware], list[Middleware]]:
    """The engine's own middleware: (before dramatiq's defaults, after them)."""

    # StepLog first: its context is bound before anything else logs, its line written last
    return [StepLog(settings), DbConnection(settings), DeadLetters(settings)], [RateLimits(settings)]


def current_rate_limits(broker: dramatiq.Broker) -> RateLimits | None:
    """The broker's RateLimits middleware (the send step asks it to wait for its inbox's slot)."""
    for m in broker.middleware:
        if isinstance(m, RateLimits):
            return m
    return None
