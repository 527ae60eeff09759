"""The scheduler process: ``python scheduler.py`` (SPEC §2, R-DISP, R-FAIL-6..8, R-OPS-4).

Exactly one scheduler is active: it holds a session-level PostgreSQL advisory lock on a
dedicated connection. Any other instance is a standby that retries the lock every
``STANDBY_RETRY_SECONDS``; when the active process dies (even ``kill -9``) its connection drops,
PostgreSQL releases the lock and a standby takes over within seconds. The active process checks
its lock connection every ``LOCK_CHECK_SECONDS``; if it is lost (server restart,
``pg_terminate_backend``, network) the jobs stop and the process goes back to standby. Every job
also refuses to run unless the lock is held.

Jobs are data (``job_specs``) with stable ids, ``max_instances=1`` and ``coalesce=True`` (a
slow job is never run twice at once, missed runs are merged). Each job only does a bounded
amount of work and every one of them is safe to run twice (planning is idempotent per
config/date, dispatch claims with SKIP LOCKED), so a short overlap during a failover is harmless.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2

from campaign import dispatch, metrics, recovery, runs
from campaign.db import close_db, connect_kwargs, db, init_db
from campaign.errors import EngineError
from campaign.logs import configure_logging
from campaign.process import serve_metrics, stop_on_signals
from campaign.settings import Settings, get_settings, redact_url

log = logging.getLogger("scheduler")

__all__ = [
    "JobSpec",
    "job_specs",
    "LeaderLock",
    "SchedulerProcess",
    "beat",
    "main",
    "LOCK_NAMESPACE",
    "STANDBY_RETRY_SECONDS",
    "LOCK_CHECK_SECONDS",
    "HEARTBEAT_NAME",
]

UTC = dt.UTC
LOCK_NAMESPACE = 0x73636864  # "schd": advisory lock (LOCK_NAMESPACE, LOCK_ID) = the active scheduler
LOCK_ID = 1
STANDBY_RETRY_SECONDS = 2.0  # a standby retries the lock this often (takeover well within 15 s)
LOCK_CHECK_SECONDS = 2.0  # the active one checks its lock connection this often
MAX_DISPATCH_ROUNDS = 50  # full batches dispatched back to back in one tick, at most
HEARTBEAT_NAME = "scheduler"
METRICS_REFRESH_SECONDS = 15.0  # the database gauges (R-OBS-1) are this fresh; a scrape never queries

JobFunc = Callable[[Settings, Callable[[], bool]], object]


@dataclass(frozen=True)
class JobSpec:
    """One periodic job: stable id, function ``(settings, still_active) -> result``, interval."""

    id: str
    func: JobFunc
    seconds: float
    run_at_start: bool = True


# --------------------------------------------------------------------------------------------
# the jobs (each runs inside a pooled connection, only while the lock is held)
# --------------------------------------------------------------------------------------------


def beat(settings: Settings, holder: str, started_at: dt.datetime) -> None:
    """UPSERT this process's heartbeat row (R-OPS-4 alerts when it is older than 2 min)."""
    db.execute_sql(
        """INSERT INTO scheduler_heartbeats (name, holder, started_at, beat_at) VALUES (%s, %s, %s, now())
           ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, started_at = EXCLUDED.started_at,
                                            beat_at = now()""",
        (HEARTBEAT_NAME, holder, started_at),
    )


def _plan(settings: Settings, active: Callable[[], bool]) -> object:
    from campaign import planner

    return planner.plan_due_runs(settings)


def _dispatch(settings: Settings, active: Callable[[], bool]) -> int:
    total = 0
    for _ in range(MAX_DISPATCH_ROUNDS):
        n = dispatch.dispatch_due(settings)
        total += n
        if n < settings.dispatch_batch_size or not active():
            break
    return total


def _window_guard(settings: Settings, active: Callable[[], bool]) -> object:

    too_late = runs.skip_too_late(settings)
    closed = runs.close_windows()
    return {"too_late": too_late, **closed}


def _recovery(settings: Settings, active: Callable[[], bool]) -> object:
    return recovery.recovery_sweep(settings)


def _inbox_health(settings: Settings, active: Callable[[], bool]) -> dict[str, Any]:
    from campaign import inboxes
    from clients import get_evolution

    # a run paused inbox_disabled by a worker that raced the operator's `inbox enable` (R-FAIL-6)
    resumed_enabled = inboxes.resume_runs_of_usable_inboxes()
    evolution = get_evolution(settings.evolution_api_url, settings.evolution_api_key, timeout=10.0)
    return {**recovery.check_inboxes(settings, evolution), "resumed_enabled": resumed_enabled}


def _alerts(settings: Settings, active: Callable[[], bool]) -> object:
    from campaign.ops import monitor

    return monitor.log_alerts(settings)


def _metrics(settings: Settings, active: Callable[[], bool]) -> object:
    from campaign.ops import monitor

    # queue depths and alerts come from the same code as `status` (one passive declare per queue,
    # the R-OPS-4 checks); the rest is five statements in campaign.metrics
    depths, error = monitor.queue_depths(settings)
    if error:
        log.warning("metrics: queue depths unavailable: %s", error)
    kinds = [a.kind for a in monitor.alerts(settings)]
    snap = metrics.refresh(queue_depths=depths, alerts=kinds)
    return {"message_groups": len(snap.messages), "inboxes": len(snap.inboxes)}


def job_specs(settings: Settings) -> list[JobSpec]:
    """The scheduler's jobs (the heartbeat is added by the process: it needs the holder name)."""
    extra = [JobSpec("metrics", _metrics, METRICS_REFRESH_SECONDS)] if settings.metrics_port is not None else []
    return [
        JobSpec("plan_due_runs", _plan, 60),
        JobSpec("dispatch_due", _dispatch, settings.dispatch_interval_seconds),
        JobSpec("window_guard", _window_guard, 15),  # too-late skips (R-DISP-3) + window close (R-DISP-4)
        JobSpec("recovery_sweep", _recovery, settings.recovery_interval_seconds),  # R-FAIL-8
        JobSpec("inbox_health", _inbox_health, settings.inbox_health_interval_seconds),  # R-FAIL-6
        JobSpec("alerts", _alerts, 60),  # R-OPS-4, logged at ERROR
        *extra,  # R-OBS-1: the database gauges, only when /metrics is served
    ]


# --------------------------------------------------------------------------------------------
# the leader lock
# --------------------------------------------------------------------------------------------


class LeaderLock:
    """A session-level advisory lock on a dedicated connection (not from the pool)."""

    def __init__(self, settings: Settings, holder: str) -> None:
        self.settings = settings
        self.holder = holder
        self._conn: psycopg2.extensions.connection | None = None

    def _connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(
            **connect_kwargs(self.settings.database_url),
            connect_timeout=5,
            application_name=f"campaign-scheduler-lock:{self.holder}"[:63],
            # a dead peer is noticed by the kernel within ~25 s even without traffic; the
            # check every LOCK_CHECK_SECONDS notices much sooner
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            options="-c statement_timeout=5000",
        )
        conn.autocommit = True
        return conn

    def try_acquire(self) -> bool:
        """Take the lock if free; False when another process holds it or PostgreSQL is unreachable."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_ID))
                return bool(cur.fetchone()[0])
        except psycopg2.Error as exc:
            log.warning(
                "scheduler lock: PostgreSQL unreachable (%s): %s",
                redact_url(self.settings.database_url),
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
            self._drop()
            return False

    def held(self) -> bool:
        """Whether the lock connection is alive and still holds the lock."""
        if self._conn is None or self._conn.closed:
            return False
        try:
            with self._conn.cursor() as cur:
                cur.execute(
                    """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                                  AND pid = pg_backend_pid() AND classid = %s::oid AND objid = %s::oid
                                  AND objsubid = 2""",
                    (LOCK_NAMESPACE, LOCK_ID),
                )
                return cur.fetchone()[0] > 0
        except psycopg2.Error:
            self._drop()
            return False

    def release(self) -> None:
        """Unlock and close the lock connection (closing alone would release it too)."""
        if self._conn is not None and not self._conn.closed:
            try:
                with self._conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, LOCK_ID))
            except psycopg2.Error:
                pass
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
        self._conn = None


# --------------------------------------------------------------------------------------------
# the process
# --------------------------------------------------------------------------------------------


class SchedulerProcess:
    """Standby until the lock is ours, then run the jobs until it is lost or we are told to stop."""

    def __init__(self, settings: Settings, *, holder: str | None = None, jobs: list[JobSpec] | None = None) -> None:
        self.settings = settings
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs = jobs if jobs is not None else job_specs(settings)
        self.lock = LeaderLock(settings, self.holder)
        self._stop = threading.Event()
        self._active = threading.Event()
        self._active_since = dt.datetime.now(UTC)

    def stop(self) -> None:
        """Ask the process to stop (signal-handler safe)."""
        self._stop.set()

    @property
    def active(self) -> bool:
        """Whether this process holds the lock and runs the jobs."""
        return self._active.is_set() and not self._stop.is_set()

    def _run_job(self, spec: JobSpec) -> None:
        if not self.active:
            return  # never work without the lock
        try:
            with db.connection_context():
                result = spec.func(self.settings, lambda: self.active)
            if result:
                log.debug("job %s: %s", spec.id, result)
        except Exception:
            log.exception("job %s failed (it runs again at its next tick)", spec.id)

    def _heartbeat(self, settings: Settings, active: Callable[[], bool]) -> None:
        beat(settings, self.holder, self._active_since)

    def _start_jobs(self):
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        specs = [JobSpec("heartbeat", self._heartbeat, 10), *self.jobs]
        sched = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=len(specs))},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30},
        )
        now = dt.datetime.now(UTC)
        for spec in specs:
            sched.add_job(
                self._run_job,
                "interval",
                args=(spec,),
                id=spec.id,
                name=spec.id,
                seconds=spec.seconds,
                next_run_time=now if spec.run_at_start else None,
                replace_existing=True,
            )
        sched.start()
        return sched

    def run(self) -> None:
        """Block until :meth:`stop`: standby, then active while the lock holds, then standby again."""
        announced_standby = False
        while not self._stop.is_set():
            if not self.lock.try_acquire():
                if not announced_standby:
                    log.info(
                        "standby (%s): another scheduler holds the lock; retrying every %ss",
                        self.holder,
                        STANDBY_RETRY_SECONDS,
                    )
                    announced_standby = True
                self._stop.wait(STANDBY_RETRY_SECONDS)
                continue
            announced_standby = False
            self._active_since = dt.datetime.now(UTC)
            self._active.set()
            metrics.SCHEDULER_LEADER.set(1)
            log.info("active (%s): scheduler lock acquired, starting %s jobs", self.holder, len(self.jobs) + 1)
            sched = self._start_jobs()
            try:
                while not self._stop.wait(LOCK_CHECK_SECONDS):
                    if not self.lock.held():
                        log.error("scheduler lock lost (%s): stopping jobs, back to standby", self.holder)
                        break
            finally:
                self._active.clear()
                sched.shutdown(wait=True)
                metrics.SCHEDULER_LEADER.set(0)
                metrics.clear()  # a standby exports no database gauge: sums never count twice
                log.info("jobs stopped (%s)", self.holder)
        self.lock.release()
        log.info("scheduler %s stopped", self.holder)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python scheduler.py``; SIGTERM/SIGINT stop it cleanly."""
    try:
        settings = get_settings()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # structured lines, secrets masked; also quiets APScheduler, which logs every job run at INFO
    configure_logging(settings)
    # the engine's broker (publisher confirms, the steps' queues): the dispatcher and the sweep
    # publish through it by step name (campaign.enqueue refuses dramatiq's implicit default)
    import actors
    from actors.broker import EngineRabbitmqBroker, QueueTypeMismatch

    if isinstance(actors.broker, EngineRabbitmqBroker):
        try:  # a queue of the other RABBITMQ_QUEUE_TYPE is a start-up error (R-SCALE-1)
            actors.broker.ensure_queues()
        except QueueTypeMismatch as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # broker down: the jobs publish (and retry) later
            log.warning("broker: queues not checked at start (%s: %s)", type(exc).__name__, exc)

    proc = SchedulerProcess(settings)
    init_db(settings, max_connections=len(proc.jobs) + 3, application_name=f"campaign-scheduler:{os.getpid()}")
    if not serve_metrics(settings):
        return 2
    stop_on_signals(proc.stop)
    try:
        proc.run()
    finally:
        close_db()
    return 0


if __name__ == "__main__":
    sys.exit(main())
