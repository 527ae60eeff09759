"""Orchestration of one suite run: ``python scripts/fault_suite.py [--ci] [--seed N] [--keep] [--report FILE]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg2

from chaos import checks, faults, services, world
from devtools.services import Proc, dramatiq_command, sandbox_env

log = logging.getLogger("chaos")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Profile:
    """The size of a run and the faults it injects."""

    messages: int
    campaigns: int
    inboxes: int
    workers: int
    threads: int
    schedule_seconds: float  # the span over which each campaign's messages are planned
    fault_counts: dict[str, int]
    progress_window: tuple[float, float]
    fault_spacing: float
    timeout_seconds: float  # from the first dispatch to quiescence, at most
    hang_rate: float = 0.01  # sends accepted then never answered (read timeout)
    #: T-REL-2: how long the gateway outage and the inbox disconnect last (seconds)
    durations: dict[str, float] = dataclasses.field(default_factory=dict)


FULL = Profile(
    messages=2000,
    campaigns=6,
    inboxes=5,
    workers=3,
    threads=8,
    schedule_seconds=150,
    fault_counts={
        faults.KILL_MID_SEND: 1,
        faults.KILL: 2,
        faults.RABBIT_RESTART: 1,
        faults.PG_TERMINATE: 2,
        faults.GATEWAY_OUTAGE: 1,
        faults.DISCONNECT: 1,
    },
    progress_window=(0.08, 0.85),
    fault_spacing=0.1,
    timeout_seconds=900,
    durations={faults.GATEWAY_OUTAGE: 60.0, faults.DISCONNECT: 30.0},
)
CI = Profile(
    messages=320,
    campaigns=5,
    inboxes=5,
    workers=2,
    threads=6,
    schedule_seconds=35,
    fault_counts={
        faults.KILL_MID_SEND: 1,
        faults.RABBIT_RESTART: 1,
        faults.PG_TERMINATE: 1,
        faults.GATEWAY_OUTAGE: 1,
        faults.DISCONNECT: 1,
    },
    progress_window=(0.15, 0.7),
    fault_spacing=0.12,
    timeout_seconds=200,
    durations={faults.GATEWAY_OUTAGE: 8.0, faults.DISCONNECT: 6.0},
    # ~430 parts: at 1 % one run in ~70 would see no hang at all and prove nothing about
    # read timeouts (E-14); at 2 % that is one in ~5,000
    hang_rate=0.02,
)

#: provider faults all along (T-REL-1): 10 % 429 with Retry-After, 5 % 500, 1 % accepted-then-hang
#: on sends; some 429/500 on the LLM routes. Latencies make sends take real time (a kill can hit one).
SANDBOX_FAULTS: dict[str, Any] = {
    "send": {"rate_429": 0.10, "rate_500": 0.05, "rate_accept_then_hang": 0.01, "latency_ms": [15, 60]},
    "chat": {"rate_429": 0.04, "rate_500": 0.02, "latency_ms": [5, 40]},
    "split": {"rate_429": 0.04, "rate_500": 0.02, "latency_ms": [5, 40]},
    "retry_after": 1.0,
    "hang_seconds": 4.0,  # longer than SEND_TIMEOUT_SECONDS: the client's read times out
}

#: the engine's settings for the run (test speed; every one is a documented environment variable)
ENGINE_ENV = {
    "CAMPAIGN_BROKER": "rabbitmq",
    "MIN_BACKOFF_SECONDS": "0.2",
    "MAX_BACKOFF_SECONDS": "2",
    "MAX_ATTEMPTS": "5",
    "LEASE_SECONDS": "15",
    "SEND_TIMEOUT_SECONDS": "2",
    "LLM_TIMEOUT_SECONDS": "10",
    "OPENROUTER_REQUESTS_PER_MINUTE": "100000",
    # INBOX_FAILURE_LIMIT keeps its default (5): 429s, 5xx, timeouts and the outage are gateway
    # trouble and must never disable an inbox (R-FAIL-6, E-23, T-REL-2)
    "DISPATCH_INTERVAL_SECONDS": "0.5",
    "RECOVERY_INTERVAL_SECONDS": "3",
    "INBOX_HEALTH_INTERVAL_SECONDS": "5",
    "DB_MAX_CONNECTIONS": "16",
    "LOG_LEVEL": "INFO",
    "dramatiq_worker_timeout": "100",
    "PYTHONUNBUFFERED": "1",
}
INBOX_MIN_GAP = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="scripts/fault_suite.py", description="Fault-injection suite (SPEC T-REL-1).")
    p.add_argument("--ci", action="store_true", help="the small CI variant (>= 300 messages, one fault of each kind)")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random, printed)")
    p.add_argument("--messages", type=int, default=None, help="override the profile's message count")
    p.add_argument("--schedule-seconds", type=float, default=None, help="override the planned span per campaign")
    p.add_argument("--timeout", type=float, default=None, help="override the quiescence timeout (s)")
    p.add_argument("--keep", action="store_true", help="keep the database and vhost when a check fails (forensics)")
    p.add_argument("--report", type=Path, default=None, help="write the verdict as JSON here")
    p.add_argument("--log-dir", type=Path, default=None, help="worker/scheduler/sandbox logs (default: a temp dir)")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on a local 3-node RabbitMQ cluster with quorum queues (devtools.rabbit_cluster; needs root); "
        "the RabbitMQ fault kills -9 the node every process is connected to (T-REL-3)",
    )
    args = p.parse_args(argv)
    if args.messages is not None and args.messages < 1:
        p.error("--messages must be >= 1")
    return args


class Probe:
    """The suite's own connection to the run's database (thread-safe, reconnects after a failure)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None  # a psycopg2 connection (psycopg2 ships no type hints)
        self._lock = threading.Lock()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one read query; retried once on a fresh connection."""
        with self._lock:
            for attempt in range(2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg2.connect(self.url, connect_timeout=5, application_name="campaign-chaos")
                        self._conn.autocommit = True
                    with self._conn.cursor() as cur:
                        cur.execute(sql, params)
                        return cur.fetchall()
                except psycopg2.Error:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def cursor_run(self, fn: Callable[[Any], T]) -> T:
        """Call ``fn(cursor)`` on the probe connection."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg2.connect(self.url, connect_timeout=5, application_name="campaign-chaos")
                self._conn.autocommit = True
            with self._conn.cursor() as cur:
                return fn(cur)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def replay_command(args: argparse.Namespace, seed: int) -> str:
    """The exact command that replays this run."""
    parts = [sys.executable, "scripts/fault_suite.py", "--seed", str(seed)]
    if args.ci:
        parts.append("--ci")
    if args.messages is not None:
        parts += ["--messages", str(args.messages)]
    if args.schedule_seconds is not None:
        parts += ["--schedule-seconds", str(args.schedule_seconds)]
    if args.timeout is not None:
        parts += ["--timeout", str(args.timeout)]
    if args.keep:
        parts.append("--keep")
    if args.cluster:
        parts.append("--cluster")
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit status 0 only when every check passed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = CI if args.ci else FULL
    profile = dataclasses.replace(
        profile,
        messages=args.messages or profile.messages,
        schedule_seconds=args.schedule_seconds or profile.schedule_seconds,
        timeout_seconds=args.timeout or profile.timeout_seconds,
    )
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(
        f"chaos: seed {seed} ({'CI' if args.ci else 'full'} profile: {profile.messages} messages, "
        f"{profile.campaigns} campaigns, {profile.inboxes} inboxes, {profile.workers} workers x "
        f"{profile.threads} threads)\nreplay: {replay_command(args, seed)}",
        flush=True,
    )
    started = time.monotonic()
    name = f"chaos_{seed}_{uuid.uuid4().hex[:6]}"
    cluster = _start_cluster() if args.cluster else None
    svc = services.ClusterServices(name, cluster) if cluster else services.Services(name)
    engine_env = {**ENGINE_ENV, **({"RABBITMQ_QUEUE_TYPE": "quorum"} if cluster else {})}
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"{name}_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"chaos: database and vhost {name!r}; logs in {log_dir} (kept when a check fails or --log-dir is given)",
        flush=True,
    )
    ok = False
    result: dict[str, Any] = {"seed": seed, "replay": replay_command(args, seed), "name": name, "log_dir": str(log_dir)}
    try:
        svc.create()
        ok, result = _run(svc, profile, seed, log_dir, result, engine_env)
    except Exception as exc:
        log.exception("chaos run aborted")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["duration_s"] = round(time.monotonic() - started, 1)
        if args.report:
            args.report.write_text(json.dumps(result, indent=2, default=str))
        if ok and args.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # logs of a passing run in a temp dir: not worth keeping
        if ok or not args.keep:
            svc.drop()
            print(f"chaos: dropped database and vhost {name!r}", flush=True)
        else:
            print(
                f"chaos: KEPT database {svc.database_url} and vhost {name!r} for forensics "
                f"(drop: psql -c 'DROP DATABASE \"{name}\"'; rabbitmqctl delete_vhost {name})",
                flush=True,
            )
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)
    print(
        f"chaos: {'PASS' if ok else 'FAIL'} in {result['duration_s']:.0f} s (seed {seed}; replay: {result['replay']})",
        flush=True,
    )
    return 0 if ok else 1


def _start_cluster() -> Any:
    """Three local RabbitMQ nodes, clustered (devtools.rabbit_cluster), for ``--cluster``."""
    from devtools.rabbit_cluster import Cluster, free_port_block

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="ce-chaos-cluster-")), free_port_block())
    print(f"chaos: starting a 3-node RabbitMQ cluster under {cluster.base} ...", flush=True)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)
        raise
    print(f"chaos: cluster up: {cluster.url()}", flush=True)
    return cluster


def _run(
    svc: services.Services,
    profile: Profile,
    seed: int,
    log_dir: Path,
    result: dict[str, Any],
    engine_env: dict[str, str],
) -> tuple[bool, dict[str, Any]]:
    from campaign.db import close_db, db, init_db
    from campaign.settings import Settings, reset_settings
    from models.schema import migrate
    from sandbox.testing import SandboxProcess

    rng = random.Random(seed)
    env = {**os.environ, **engine_env, "DATABASE_URL": svc.database_url, "RABBITMQ_URL": svc.rabbitmq_url}
    sandbox_faults = json.loads(json.dumps(SANDBOX_FAULTS))
    sandbox_faults["send"]["rate_accept_then_hang"] = profile.hang_rate
    sandbox = SandboxProcess(seed=seed, faults=sandbox_faults)
    supervisor: services.Supervisor | None = None
    injector: faults.Injector | None = None
    probe = Probe(svc.database_url)
    try:
        sandbox.start()
        env.update(sandbox_env(sandbox))
        os.environ.update(
            {k: env[k] for k in ("DATABASE_URL", "RABBITMQ_URL", "CAMPAIGN_BROKER", "RABBITMQ_QUEUE_TYPE") if k in env}
        )
        reset_settings()
        settings = Settings.from_env(env)
        init_db(settings, application_name=f"campaign-chaos:{os.getpid()}")
        per_campaign = profile.messages / profile.campaigns
        mean_gap = profile.schedule_seconds / per_campaign
        plan = world.plan_world(
            rng,
            messages=profile.messages,
            campaigns=profile.campaigns,
            inboxes=profile.inboxes,
            gap=(round(mean_gap * 0.5, 3), round(mean_gap * 1.5, 3)),
            part_gap=(0.1, 0.4),
            inbox_min_gap=INBOX_MIN_GAP,
            tag=str(seed % 10000),
        )
        with db.connection_context():
            migrate(db)
            world.build_world(plan, rng)
        fault_plan = faults.plan_faults(
            rng,
            profile.fault_counts,
            lo=profile.progress_window[0],
            hi=profile.progress_window[1],
            min_spacing=profile.fault_spacing,
            durations=profile.durations,
        )
        print(
            "chaos: fault plan (at progress = share of messages terminal): "
            + ", ".join(
                f"{f.kind}@{f.at_progress:.0%}" + (f"(down {f.outage_s}s)" if f.outage_s else "") for f in fault_plan
            ),
            flush=True,
        )
        workers = [
            Proc(f"worker-{i}", dramatiq_command(threads=profile.threads), env, log_dir / f"worker-{i}.log")
            for i in range(profile.workers)
        ]
        scheduler = Proc("scheduler", [sys.executable, "scheduler.py"], env, log_dir / "scheduler.log")
        supervisor = services.Supervisor([*workers, scheduler])
        t0 = time.time()
        supervisor.start()
        _wait_planned(probe, profile, plan.total_leads)
        total = plan.total_leads

        def progress() -> float:
            done = probe.query(
                "SELECT count(*) FROM campaign_messages WHERE status IN ('sent', 'failed', 'skipped', 'in_doubt')"
            )[0][0]
            return done / total

        def sending_parts() -> list[tuple[int, float]]:
            return [
                (r[0], r[1])
                for r in probe.query(
                    "SELECT id, extract(epoch FROM sending_at)::float FROM message_parts WHERE status = 'sending'"
                )
            ]

        def mid_parts_instance() -> str | None:
            rows = probe.query("""SELECT i.instance_name FROM campaign_messages m JOIN inboxes i ON i.id = m.inbox_id
                                  WHERE m.status = 'sending'
                                    AND EXISTS (SELECT 1 FROM message_parts p
                                                WHERE p.message_id = m.id AND p.status = 'sent')
                                    AND EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id
                                                AND p.status = 'pending')
                                  LIMIT 1""")
            return rows[0][0] if rows else None

        instances = [r[0] for r in probe.query("SELECT instance_name FROM inboxes ORDER BY id")]
        injector = faults.Injector(
            fault_plan,
            services=svc,
            supervisor=supervisor,
            workers=workers,
            progress=progress,
            sending_parts=sending_parts,
            sandbox=sandbox,
            instances=instances,
            mid_parts_instance=mid_parts_instance,
        )
        injector.start()
        quiescent, quiescence_s = _wait_quiescent(probe, injector, t0, profile.timeout_seconds)
        injector.stop()
        injector.join(30)
        # collect before stopping anything: a late duplicate would show up in the ledger
        time.sleep(1.0)
        ledger = sandbox.ledger()
        db_facts = probe.cursor_run(checks.collect_db)
        from campaign.ops import monitor

        with db.connection_context():
            mismatches = monitor.verify()
        verdict = checks.judge(
            db_facts=db_facts,
            ledger=ledger,
            events=injector.events,
            expected_faults=profile.fault_counts,
            expected_messages=profile.messages,
            mismatches=mismatches,
            min_gap=INBOX_MIN_GAP,
            send_reach_s=settings.send_timeout_seconds + 5,
            t0=t0,
            quiescent=quiescent,
            quiescence_s=quiescence_s,
            injector_error=repr(injector.error) if injector.error else None,
        )
        verdict.facts["restarts"] = [(n, round(t - t0, 1)) for n, t in supervisor.restarts]
        verdict.facts["run_seconds"] = round(quiescence_s or (time.time() - t0), 1)
        print(checks.render(verdict), flush=True)
        _print_facts(verdict)
        if verdict.problems:
            print("problems:\n  " + "\n  ".join(verdict.problems[:20]), flush=True)
        result.update(verdict.as_dict())
        return verdict.ok, result
    finally:
        if injector is not None:
            injector.stop()
        if supervisor is not None:
            supervisor.stop()
        sandbox.stop()
        probe.close()
        close_db()


def _print_facts(verdict: checks.Verdict) -> None:
    f = verdict.facts
    print(
        f"facts: messages {f['messages_by_status']}; parts {f['parts']} (per message {f['parts_by_message']}); "
        f"sandbox sends {f['sandbox_sends']}, requests {f['sandbox_requests']}, faults {f['sandbox_faults']}; "
        f"dead letters {f['dead_letters']}; not sent because {f['failed_or_skipped_reasons']}; "
        f"process restarts {f['restarts']}; run {f['run_seconds']} s",
        flush=True,
    )


def _wait_planned(probe: Probe, profile: Profile, total: int, timeout: float = 90) -> None:
    """The scheduler plans every campaign's run at its start; wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        runs, planned = probe.query("SELECT count(*), coalesce(sum(leads_total), 0) FROM campaign_runs")[0]
        if runs >= profile.campaigns and planned >= total:
            log.info("scheduler planned %s runs, %s messages", runs, planned)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the scheduler planned {runs} runs / {planned} messages within {timeout}s "
                f"(expected {profile.campaigns} / {total}); see scheduler.log"
            )
        time.sleep(0.5)


def _wait_quiescent(probe: Probe, injector: faults.Injector, t0: float, timeout: float) -> tuple[bool, float | None]:
    """Every message terminal, no part `sending`, every run closed, every fault injected; or timeout."""
    deadline = t0 + timeout
    last_report = 0.0
    while True:
        counts = dict(probe.query("SELECT status, count(*) FROM campaign_messages GROUP BY status"))
        open_runs = probe.query("SELECT count(*) FROM campaign_runs WHERE status IN ('planning', 'running', 'paused')")[
            0
        ][0]
        sending = probe.query("SELECT count(*) FROM message_parts WHERE status = 'sending'")[0][0]
        busy = sum(n for s, n in counts.items() if s not in checks.TERMINAL)
        now = time.time()
        if now - last_report > 10:
            log.info(
                "progress %.0fs: %s; open runs %s; parts sending %s; faults injected %s/%s",
                now - t0,
                counts,
                open_runs,
                sending,
                len(injector.events),
                len(injector.plan),
            )
            last_report = now
        if busy == 0 and open_runs == 0 and sending == 0 and injector.done:
            return True, now - t0
        if now > deadline:
            log.error(
                "no quiescence after %.0fs: %s; open runs %s; parts sending %s", timeout, counts, open_runs, sending
            )
            return False, None
        time.sleep(0.5)
