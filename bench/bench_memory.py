"""T-PERF-5 memory: worker RSS over 50,000 messages.

    .venv/bin/python bench/bench_memory.py [--messages 50000] [--warm 5000] [--quick]
                                           [--trace] [--arena-max N]

Real workers (2 processes x 8 threads, the engine's actors only: nothing of the benchmark is
loaded into them) process ``--messages`` two-part messages through the zero-latency sandbox.
The benchmark feeds them like the scheduler would, keeping at most ``--window`` messages in
flight, and samples VmRSS (/proc/<pid>/status) of every worker process every ``--every``
seconds. Reference = the summed RSS at the warm-up point (after ``--warm`` messages: imports,
pools, httpx clients and caches are in place); growth = end / reference - 1.
Target (SPEC §7): growth <= 10 %.

``--trace`` loads bench/memtrace.py into the workers (tracemalloc, glibc heap figures, gc object
counts; snapshots at the warm-up point and at the end, compared by traceback) to tell a real leak
(the Python heap grows with the messages) from allocator behaviour (heap flat, RSS creeps). It slows
the workers and adds tracemalloc's own memory, so the PASS/MISS figure is taken without it.
``--arena-max N`` sets MALLOC_ARENA_MAX=N in the workers' environment (glibc; 0 = leave unset);
``--malloc-env`` passes any other ``NAME=VALUE`` (e.g. MALLOC_TRIM_THRESHOLD_=131072, or
BENCH_MEMTRACE_TRIM_EVERY=30 with --trace: a malloc_trim(0) every 30 s in each worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BenchServices,
    Workers,
    add_leads,
    add_messages,
    create_config,
    create_run,
    create_world,
    engine_env,
    header,
    q1,
    result_line,
    row,
    status_counts,
    verdict,
)
from campaign import dispatch, recovery

TARGET_GROWTH = 0.10


PRODUCTION_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # as set in the Dockerfile and compose


def _parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--warm", type=int, default=None, help="warm-up point (default min(5000, messages/10))")
    p.add_argument("--window", type=int, default=400, help="messages in flight at most")
    p.add_argument("--inboxes", type=int, default=200)
    p.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="5,000 messages, warm-up point 1,000")
    p.add_argument("--logdir", type=Path, default=None)
    p.add_argument("--trace", action="store_true", help="load bench/memtrace.py into the workers (diagnosis)")
    p.add_argument(
        "--trace-light",
        action="store_true",
        help="with --trace: no tracemalloc (near full speed): RSS, glibc heap, gc object counts only",
    )
    p.add_argument("--arena-max", type=int, default=0, help="MALLOC_ARENA_MAX for the workers (0: unset)")
    p.add_argument(
        "--malloc-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the workers (repeatable)",
    )
    p.add_argument(
        "--no-production-malloc",
        action="store_true",
        help="run the workers without the production MALLOC_MMAP_THRESHOLD_=65536",
    )
    return p


def _worker_env(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, str]:
    """The workers' malloc settings: the production one unless told otherwise, plus any asked for."""
    worker_env: dict[str, str] = {} if args.no_production_malloc else dict(PRODUCTION_MALLOC_ENV)
    if args.arena_max:
        worker_env["MALLOC_ARENA_MAX"] = str(args.arena_max)
    for item in args.malloc_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--malloc-env expects NAME=VALUE, got {item!r}")
        worker_env[name] = value
    return worker_env


def _trace_setup(args: argparse.Namespace, logdir: Path, worker_env: dict[str, str]) -> tuple[list[str], Path]:
    """The modules the workers load (bench/memtrace.py with --trace) and where traces go."""
    modules = ["actors"]
    trace_dir = logdir / "memtrace"
    if args.trace:
        import shutil

        shutil.rmtree(trace_dir, ignore_errors=True)
        trace_dir.mkdir(parents=True)
        modules.append("bench.memtrace")
        worker_env["BENCH_MEMTRACE_DIR"] = str(trace_dir)
        if args.trace_light:
            worker_env["BENCH_MEMTRACE_FRAMES"] = "0"
    return modules, trace_dir


def main() -> int:
    """Run the benchmark and print the figures."""
    p = _parser()
    args = p.parse_args()
    if args.quick:
        args.messages = min(args.messages, 5000)
    warm = args.warm if args.warm is not None else min(5000, args.messages // 10)
    if args.messages < 10 or not 0 < warm < args.messages:
        p.error("--messages must be >= 10 and 0 < --warm < --messages")
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    logdir.mkdir(parents=True, exist_ok=True)
    header(
        "T-PERF-5 memory: worker RSS over many messages",
        f"{args.messages} two-part messages, warm-up point {warm}, {args.processes} x {args.threads} workers, "
        f"zero-latency sandbox, <= {args.window} in flight; worker log in {logdir}",
    )
    from sandbox.testing import SandboxProcess

    samples: list[tuple[float, int, int, dict[int, int]]] = []  # (t, done, total KiB, per pid)
    # the production setting (Dockerfile, docker-compose.yml): glibc hands freed blocks of 64 KiB and up
    # straight back instead of keeping them in per-thread heaps (the RSS creep); --no-production-malloc
    # measures without it
    worker_env = _worker_env(args, p)
    modules, trace_dir = _trace_setup(args, logdir, worker_env)
    if worker_env:
        row("worker environment", " ".join(f"{k}={v}" for k, v in sorted(worker_env.items())))
    with BenchServices("memory") as svc, SandboxProcess(seed=5) as sb:
        env = engine_env(sb)
        svc.set_env(env)
        from dramatiq.errors import BrokerConnectionError

        import actors  # noqa: F401  (the engine's broker, as scheduler.py sets it up)
        from campaign.db import db
        from campaign.settings import get_settings

        settings = get_settings()
        # the scheduler's recovery sweep, with a short lease: a message lost in flight (another
        # job restarting RabbitMQ on this shared machine) comes back instead of stalling the run
        sweep_settings = dataclasses.replace(settings, lease_seconds=30, max_backoff_seconds=30.0)
        db.connect(reuse_if_open=True)
        world = create_world("memory", args.inboxes, min_gap=0.0)
        cfg = create_config(world, "mem", world.inbox_ids[0], split=True, max_parts=2, part_gap=(0, 0))
        run_id = create_run(cfg)
        t = time.perf_counter()
        for start in range(0, args.messages, 5000):
            leads = add_leads(world, min(5000, args.messages - start))
            add_messages(run_id, leads, world.inbox_ids)
        row("data loaded", f"{time.perf_counter() - t:.1f} s")
        with Workers(
            modules,
            processes=args.processes,
            threads=args.threads,
            env={**env, **worker_env},
            log_path=logdir / "worker.log",
        ) as workers:
            t0 = time.monotonic()
            next_sample = 0.0
            next_reset = 10_000
            next_sweep = 30.0
            traced_warm = False
            while True:
                done = q1("SELECT leads_processed FROM campaign_runs WHERE id = %s", (run_id,))
                in_flight = q1(
                    "SELECT count(*) FROM campaign_messages WHERE run_id = %s AND status IN "
                    "('queued', 'generating', 'splitting', 'sending')",
                    (run_id,),
                )
                if in_flight < args.window // 2:
                    try:
                        dispatch.dispatch_due(settings, limit=args.window - in_flight)
                    except BrokerConnectionError as exc:
                        # another job on this shared machine restarted RabbitMQ: the claimed messages
                        # went back to pending; the next round dispatches them again
                        print(f"   (dispatch failed, RabbitMQ unreachable: {exc}; retrying)", flush=True)
                now = time.monotonic() - t0
                if args.trace and done >= warm and not traced_warm:
                    from bench import memtrace

                    memtrace.request_snapshot(trace_dir, "warm", workers.worker_pids())
                    traced_warm = True
                if now >= next_sample or done >= args.messages:
                    per = workers.rss_kb()
                    samples.append((now, done, sum(per.values()), per))
                    next_sample = now + args.every
                    if len(samples) % 30 == 1:
                        print(
                            f"   t={now:6.0f}s done={done:6d} rss={sum(per.values()) / 1024:7.1f} MiB "
                            f"{[round(v / 1024, 1) for v in per.values()]}",
                            flush=True,
                        )
                if now >= next_sweep:
                    try:
                        recovery.recovery_sweep(sweep_settings)
                    except BrokerConnectionError as exc:
                        print(f"   (recovery sweep failed, RabbitMQ unreachable: {exc}; next round)", flush=True)
                    next_sweep = now + 30
                if done >= next_reset:
                    sb.reset(keep_faults=True)  # the sandbox's ledger would grow for the whole run
                    next_reset += 10_000
                if done >= args.messages:
                    break
                if now > 600 + args.messages / 2:
                    raise SystemExit(
                        f"error: only {done} of {args.messages} done after {now:.0f} s\n{workers.log_tail()}"
                    )
                time.sleep(0.25)
            elapsed = time.monotonic() - t0
            if args.trace:
                from bench import memtrace

                memtrace.request_snapshot(trace_dir, "end", workers.worker_pids())
                # last: does RSS fall back when glibc hands its free arena memory to the OS?
                memtrace.request_snapshot(trace_dir, "trim", workers.worker_pids())
                trimmed = workers.rss_kb()
            errors = workers.log_tail(10_000_000).count("ERROR")
        statuses = status_counts([run_id])
        db.close()
    warm_sample = next(s for s in samples if s[1] >= warm)
    end_sample = samples[-1]
    peak = max(s[2] for s in samples)
    growth = end_sample[2] / warm_sample[2] - 1
    print()
    row(
        "messages",
        f"{statuses} in {elapsed:.0f} s ({args.messages / elapsed:.1f} msg/s), {errors} ERROR lines in the worker log",
    )
    row(
        f"reference: RSS at the warm-up point ({warm_sample[1]} done)",
        f"{warm_sample[2] / 1024:8.1f} MiB  (per process {[round(v / 1024, 1) for v in warm_sample[3].values()]})",
    )
    row(
        f"RSS at the end ({end_sample[1]} done)",
        f"{end_sample[2] / 1024:8.1f} MiB  (per process {[round(v / 1024, 1) for v in end_sample[3].values()]})",
    )
    row("peak RSS", f"{peak / 1024:8.1f} MiB")
    row(
        "growth warm-up -> end",
        f"{100 * growth:7.1f} %   target <= {100 * TARGET_GROWTH:.0f} %   {verdict(growth <= TARGET_GROWTH)}",
    )
    print("   RSS by progress (MiB):")
    for frac in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        s = next((x for x in samples if x[1] >= frac * args.messages), samples[-1])
        print(f"     {s[1]:7d} done  {s[2] / 1024:8.1f}")
    if args.trace:
        from bench import memtrace

        print("   memtrace (per worker process; py_heap = tracemalloc's traced Python heap):")
        memtrace.print_series(trace_dir)
        memtrace.compare(trace_dir, "warm", "end")
        memtrace.print_trim(trace_dir)
        row(
            "RSS after malloc_trim(0) in every worker",
            f"{sum(trimmed.values()) / 1024:8.1f} MiB (vs {warm_sample[2] / 1024:.1f} MiB at the warm-up point)",
        )
    ok = growth <= TARGET_GROWTH and statuses == {"sent": args.messages}
    result_line(
        "T-PERF-5",
        {
            "rss_warm_mib": round(warm_sample[2] / 1024, 1),
            "rss_end_mib": round(end_sample[2] / 1024, 1),
            "growth": round(growth, 4),
            "messages": args.messages,
            "warm": warm,
            "pass": ok,
            "trace": args.trace,
            "worker_env": worker_env,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
