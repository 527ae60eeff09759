"""T-PERF-1 orchestration overhead: pipeline messages/s against a bare Dramatiq 4-hop chain.

    .venv/bin/python bench/bench_pipeline.py [--messages 2000] [--quick] [--rounds 1]

Zero-latency sandbox, real RabbitMQ + PostgreSQL (this run's own database and vhost), real
``dramatiq`` workers: 2 processes x 8 threads for both. The reference (bench/bare_chain.py: 4
actors, 6 single-row commits and 3 HTTP posts per message) runs first in the same script on the
same services; then the engine's pipeline (generate -> split -> send part x2) on N due messages
of 2 parts each, spread over many inboxes with min gap 0 and part gap 0 and the per-key LLM
budget lifted, so pacing is not the bound. Time = from the dispatch of the N messages (the
scheduler's own dispatch_due loop) to the run completed, on the database clock.

DB round trips are counted in the workers by bench/dbcount.py (a counting psycopg2 cursor,
loaded as an extra dramatiq module: no server setting changes), per actor and per statement.
Target (SPEC §7): pipeline msg/s >= 1.0 x the bare chain's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import dbcount
from bench.common import (
    BenchServices,
    Counts,
    Workers,
    add_leads,
    add_messages,
    cpu_between,
    cpu_snapshot,
    create_config,
    create_run,
    create_world,
    db_now,
    dispatch_all,
    engine_env,
    header,
    median,
    parts_per_message,
    print_counts,
    q,
    q1,
    read_counts,
    result_line,
    row,
    runs_done,
    status_counts,
    verdict,
    wait_progress,
)
from devtools.services import purge_queues, wait_until

TARGET_RATIO = 1.0


def run_bare(sb, n: int, warmup: int, processes: int, threads: int, timeout: float, logdir: Path) -> dict:
    """The reference: N rows through the bare 4-hop chain; msg/s on the database clock."""
    from bench.bare_chain import TABLE_SQL, bare_generate

    q(TABLE_SQL)
    q("TRUNCATE bench_bare")
    counters = Path(tempfile.mkdtemp(prefix="bench-bare-counts-"))
    env = {
        "BENCH_SANDBOX_URL": sb.url,
        "BENCH_CHAT_KEY": sb.chat_key,
        "BENCH_EVOLUTION_KEY": sb.evolution_key,
        "BENCH_DBCOUNT_DIR": str(counters),
    }
    with Workers(
        ["bench.bare_chain", "bench.dbcount"],
        processes=processes,
        threads=threads,
        env=env,
        log_path=logdir / "bare-worker.log",
    ) as workers:

        def batch(count: int) -> tuple[float, list[int]]:
            ids = [
                r[0]
                for r in q(
                    "INSERT INTO bench_bare (phone) SELECT '5511' || (900000000 + i) "
                    "FROM generate_series(1, %s) i RETURNING id",
                    (count,),
                )
            ]
            t0 = db_now()
            for i in ids:
                bare_generate.send(i)
            wait_progress(
                lambda: q1("SELECT count(*) FROM bench_bare WHERE id = ANY(%s) AND status = 'done'", (ids,)),
                count,
                timeout=timeout,
                what="the bare chain",
                on_timeout=lambda: "\n" + workers.log_tail(),
            )
            t_end = q1("SELECT max(done_at) FROM bench_bare WHERE id = ANY(%s)", (ids,))
            return (t_end - t0).total_seconds(), ids

        if warmup:
            batch(warmup)
        time.sleep(0.6)
        before = read_counts(counters)
        cpu_before = cpu_snapshot()
        seconds, _ = batch(n)
        cpu = cpu_between(cpu_before, cpu_snapshot())
        time.sleep(0.6)
        counts = read_counts(counters)
        counts.add(before, -1)
    return {"seconds": seconds, "rate": n / seconds, "round_trips": counts.statements / n, "cpu": cpu}


def abandon(settings) -> None:
    """Leftovers of an abandoned round must not eat the next one's capacity: cancel, purge."""
    q("UPDATE campaign_runs SET status = 'cancelled', pause_reason = NULL WHERE status IN ('running', 'paused')")
    if q1("SELECT to_regclass('bench_bare') IS NOT NULL"):
        q("UPDATE bench_bare SET status = 'abandoned' WHERE status <> 'done'")
    purge_queues(
        settings.rabbitmq_url,
        [f"bench.bare.{h}" for h in ("generate", "split", "send", "finalize")]
        + ["campaign.generate", "campaign.split", "campaign.send"],
    )


def processed(run_id: int) -> int:
    """Messages of the run already terminal (the run's own counter)."""
    return q1("SELECT leads_processed FROM campaign_runs WHERE id = %s", (run_id,))


def run_pipeline(
    sb,
    settings,
    n: int,
    warmup: int,
    inboxes: int,
    processes: int,
    threads: int,
    timeout: float,
    logdir: Path,
    round_no: int,
    parts: int = 2,
) -> dict:
    """N messages of ``parts`` parts (1: split off) through the engine's workers; msg/s from
    dispatch to run completed."""
    world = create_world(f"bench{round_no}", inboxes, min_gap=0.0)
    warm_cfg, timed_cfg = (
        create_config(world, name, world.inbox_ids[0], split=parts > 1, max_parts=max(parts, 1), part_gap=(0, 0))
        for name in ("warmup", "timed")
    )
    warm_leads = add_leads(world, warmup)
    timed_leads = add_leads(world, n)
    counters = Path(tempfile.mkdtemp(prefix="bench-pipeline-counts-"))
    env = engine_env(sb, BENCH_DBCOUNT_DIR=str(counters))
    with Workers(
        ["actors", "bench.dbcount"],
        processes=processes,
        threads=threads,
        env=env,
        log_path=logdir / "pipeline-worker.log",
    ) as workers:
        tail = lambda: "\n" + workers.log_tail()  # noqa: E731
        if warmup:
            warm_run = create_run(warm_cfg)
            add_messages(warm_run, warm_leads, world.inbox_ids)
            dispatch_all(settings)
            wait_progress(lambda: processed(warm_run), warmup, timeout=timeout, what="the warm-up run", on_timeout=tail)
        time.sleep(0.6)
        before = read_counts(counters)
        run_id = create_run(timed_cfg)
        add_messages(run_id, timed_leads, world.inbox_ids)
        dispatcher_before = Counts(**{k: v for k, v in dbcount.snapshot().items() if k != "pid"})
        cpu_before = cpu_snapshot()
        t0 = db_now()
        dbcount.set_actor("dispatcher")
        try:
            dispatch_all(settings)
        finally:
            dbcount.set_actor(None)
        dispatched_at = db_now()
        wait_progress(lambda: processed(run_id), n, timeout=timeout, what="the timed run", on_timeout=tail)
        wait_until(lambda: runs_done([run_id]), timeout=30, what="the timed run to complete", on_timeout=tail)
        t_end = q1("SELECT finished_at FROM campaign_runs WHERE id = %s", (run_id,))
        cpu = cpu_between(cpu_before, cpu_snapshot())
        time.sleep(0.6)
        counts = read_counts(counters)
        counts.add(before, -1)
        dispatcher = Counts(**{k: v for k, v in dbcount.snapshot().items() if k != "pid"})
        dispatcher.add(dispatcher_before, -1)
        dispatcher.stmts = {k: v for k, v in dispatcher.stmts.items() if k.startswith("dispatcher |")}
        counts.add(dispatcher)
        statuses = status_counts([run_id])
        ppm = parts_per_message([run_id])
        errors = workers.log_tail(200_000).count("ERROR")
    seconds = (t_end - t0).total_seconds()
    return {
        "seconds": seconds,
        "rate": n / seconds,
        "dispatch_seconds": (dispatched_at - t0).total_seconds(),
        "statuses": statuses,
        "parts_per_message": ppm,
        "round_trips": counts.statements / n,
        "db_ms_per_message": 1000 * counts.db_seconds / n,
        "counts": counts,
        "worker_log_errors": errors,
        "cpu": cpu,
    }


def main() -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="timed messages per side (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed messages first, per side")
    p.add_argument("--inboxes", type=int, default=200, help="inboxes the messages are spread over")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="alternate reference/pipeline this many times; medians")
    p.add_argument("--retries", type=int, default=2, help="rounds measured again after a stall (broker restart)")
    p.add_argument("--quick", action="store_true", help="300 messages, 50 warm-up")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for one side (default from N)")
    p.add_argument("--logdir", type=Path, default=None, help="keep worker logs here")
    p.add_argument(
        "--parts",
        default="1,2,3",
        help="also measure round trips and commits for messages of these part counts (comma list; "
        "the timed comparison is always 2 parts); '' for none",
    )
    args = p.parse_args()
    if args.quick:
        args.messages, args.warmup = min(args.messages, 300), min(args.warmup, 50)
    if args.messages < 1 or args.rounds < 1:
        p.error("--messages and --rounds must be >= 1")
    timeout = args.timeout or max(180.0, args.messages / 2.0)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    logdir.mkdir(parents=True, exist_ok=True)

    header(
        "T-PERF-1 orchestration overhead: pipeline vs a bare Dramatiq 4-hop chain",
        f"{args.messages} messages (+{args.warmup} warm-up) per side, {args.processes} worker processes x "
        f"{args.threads} threads, zero-latency sandbox, {args.inboxes} inboxes (min gap 0, part gap 0), "
        f"2 parts/message, {args.rounds} round(s); worker logs in {logdir}",
    )
    from sandbox.testing import SandboxProcess

    try:
        part_counts = sorted({int(x) for x in args.parts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--parts {args.parts!r} must be a comma list of part counts (e.g. 1,2,3)")
    if any(not 1 <= k <= 10 for k in part_counts):
        p.error(f"--parts {args.parts!r}: each part count must be 1..10")
    bare_runs: list[dict] = []
    pipe_runs: list[dict] = []
    by_parts: dict[int, dict] = {}
    with BenchServices("pipeline") as svc, SandboxProcess(seed=1) as sb:
        svc.set_env(engine_env(sb))
        from campaign.db import db
        from campaign.settings import get_settings

        settings = get_settings()
        db.connect(reuse_if_open=True)
        attempt = 0
        for r in range(args.rounds):
            while True:
                attempt += 1
                try:
                    bare = run_bare(sb, args.messages, args.warmup, args.processes, args.threads, timeout, logdir)
                    pipe = run_pipeline(
                        sb,
                        settings,
                        args.messages,
                        args.warmup,
                        args.inboxes,
                        args.processes,
                        args.threads,
                        timeout,
                        logdir,
                        attempt,
                    )
                    break
                except TimeoutError as exc:
                    # another job on this shared machine restarting RabbitMQ mid-measurement
                    # loses the reference chain's in-flight messages: that round means nothing
                    if attempt >= args.rounds + args.retries:
                        raise
                    print(f"   round {r + 1} abandoned, measuring it again: {str(exc).splitlines()[0]}", flush=True)
                    abandon(settings)
            bare_runs.append(bare)
            pipe_runs.append(pipe)
            row(
                f"round {r + 1}: reference bare 4-hop chain",
                f"{bare['rate']:7.1f} msg/s  "
                f"({args.messages} in {bare['seconds']:.2f} s, {bare['round_trips']:.2f} DB round trips/msg)",
            )
            row(
                f"round {r + 1}: pipeline",
                f"{pipe['rate']:7.1f} msg/s  ({args.messages} in {pipe['seconds']:.2f} s, "
                f"dispatch {pipe['dispatch_seconds']:.2f} s, {pipe['round_trips']:.2f} DB round trips/msg)",
            )
        # T-PERF-7 / R-SCALE-3: round trips and write commits per message and per step, by part count
        counted = min(args.messages, 300)
        for k in part_counts:
            if k == 2:
                by_parts[k] = pipe_runs[-1]
                continue
            attempt += 1
            by_parts[k] = run_pipeline(
                sb, settings, counted, min(args.warmup, 50), args.inboxes, args.processes, args.threads,
                timeout, logdir, attempt, parts=k,
            )  # fmt: skip
        db.close()
    bare_rate = median([b["rate"] for b in bare_runs])
    pipe_rate = median([p_["rate"] for p_ in pipe_runs])
    ratio = pipe_rate / bare_rate
    last = pipe_runs[-1]
    print()
    row("reference: bare 4-hop chain (6 commits, 3 posts)", f"{bare_rate:7.1f} msg/s")
    row("pipeline (generate, split, send x2)", f"{pipe_rate:7.1f} msg/s")
    row("ratio pipeline / reference", f"{ratio:7.2f}   target >= {TARGET_RATIO:.1f}   {verdict(ratio >= TARGET_RATIO)}")
    row(
        "DB round trips per message: pipeline",
        f"{last['round_trips']:7.2f}  ({last['db_ms_per_message']:.1f} ms of DB wait per message, summed over threads)",
    )
    row("DB round trips per message: reference", f"{median([b['round_trips'] for b in bare_runs]):7.2f}")
    for label, runs in (("pipeline", pipe_runs), ("reference", bare_runs)):
        groups = {g: median([r_["cpu"][g] for r_ in runs]) * 1000 / args.messages for g in runs[0]["cpu"]}
        row(
            f"CPU ms per message: {label}",
            f"{sum(groups.values()):6.2f}  ("
            + ", ".join(f"{g} {ms:.2f}" for g, ms in groups.items())
            + "; medians of the timed windows, this machine's processes by group)",
        )
    row(
        "pipeline outcome",
        f"{last['statuses']}, {last['parts_per_message']:.2f} parts/message, "
        f"{last['worker_log_errors']} ERROR lines in the worker log",
    )
    print("   where the pipeline's round trips go (last round):")
    print_counts(last["counts"], args.messages)
    per_part_count: dict[int, dict[str, float]] = {}
    if by_parts:
        print("   per message, by part count (T-PERF-7: <= 8 round trips for 2 parts; R-SCALE-3's commits):")
        for k, res in sorted(by_parts.items()):
            n = args.messages if k == 2 else min(args.messages, 300)
            c = res["counts"]
            per_part_count[k] = {
                "round_trips": round(c.statements / n, 2),
                "write_commits": round(c.write_commits / n, 2),
                "flushed_commits": round(c.flushed_commits / n, 2),
            }
            steps = "  ".join(
                f"{actor} {stmts / n:.2f}/{c.commits.get(actor, 0) / n:.2f}/"
                f"{(c.commits.get(actor, 0) - c.async_commits.get(actor, 0)) / n:.2f}"
                for actor, (stmts, _s) in c.by_actor().items()
            )
            row(
                f"  {k} part(s) ({res['parts_per_message']:.2f} observed)",
                f"{c.statements / n:6.2f} round trips  {c.write_commits / n:5.2f} write commits "
                f"({c.flushed_commits / n:.2f} flushed)   [step round trips/commits/flushed: {steps}]",
            )
    ok = ratio >= TARGET_RATIO and last["statuses"] == {"sent": args.messages}
    result_line(
        "T-PERF-1",
        {
            "bare_msg_s": round(bare_rate, 2),
            "pipeline_msg_s": round(pipe_rate, 2),
            "ratio": round(ratio, 3),
            "round_trips_per_msg": round(last["round_trips"], 2),
            "write_commits_per_msg": round(last["counts"].write_commits / args.messages, 2),
            "flushed_commits_per_msg": round(last["counts"].flushed_commits / args.messages, 2),
            "by_parts": per_part_count,
            "parts_per_message": round(last["parts_per_message"], 2),
            "messages": args.messages,
            "rounds": args.rounds,
            "pass": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
