"""T-PERF-4 scale: planning a run of 100,000 eligible leads; one dispatcher claim of 500 due
messages with 1,000,000 historical message rows, with its EXPLAIN (ANALYZE, BUFFERS).

    .venv/bin/python bench/bench_scale.py [--leads 100000] [--history 1000000] [--quick]

Data (bulk SQL, in this run's own database): one workspace, one inbox, one config; ``--leads``
leads in its source column; ``--history`` sent messages in completed runs of earlier days (the
same config, so the planner's "not already messaged" check meets all of them). Then
``planner.plan_run`` plans today's run (timed; every lead eligible, none overflowing), and
``dispatch.dispatch_due`` claims the 500 first due messages (timed, repeated, publish left out:
the claim is the statement under test). The claim's search (the due messages, ``FOR UPDATE SKIP
LOCKED``; the just-in-time capacity check and the UPDATE by id follow it) is captured as the engine
runs it and explained (in a transaction rolled back); the plan must use an index on campaign_messages.

References measured in the same run: a bare ``INSERT ... SELECT`` of as many message rows (the
floor under planning) and a single-row UPDATE by primary key (the floor under one claim).
Targets (SPEC §7): planning <= 5 s; claim <= 20 ms; an index scan in the claim's plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time

from bench import dbcount
from bench.common import (
    UTC,
    BenchServices,
    Counts,
    create_config,
    create_world,
    header,
    median,
    print_counts,
    q,
    q1,
    result_line,
    row,
    verdict,
)
from campaign import dispatch

PLAN_TARGET_S = 5.0
CLAIM_TARGET_MS = 20.0
CLAIM = 500


def load_history(world, config_id: int, leads: int, history: int) -> None:
    """``leads`` leads and ``history`` sent messages in completed runs of earlier days."""
    q(
        """INSERT INTO leads (workspace_id, column_id, name, phone, custom_fields)
         SELECT %s, %s, 'Lead ' || i, '+55119' || lpad(i::text, 8, '0'), '{"city": "Recife"}'::jsonb
         FROM generate_series(1, %s) i""",
        (world.ws_id, world.src_col, leads),
    )
    per_run = leads
    runs = (history + per_run - 1) // per_run
    today = dt.datetime.now(UTC).date()
    left = history
    for d in range(1, runs + 1):
        n = min(per_run, left)
        left -= n
        run_id = q1(
            """INSERT INTO campaign_runs (config_id, run_date, status, leads_total, leads_processed,
                           leads_sent, started_at, finished_at)
                       VALUES (%s, %s, 'completed', %s, %s, %s, %s, %s) RETURNING id""",
            (
                config_id,
                today - dt.timedelta(days=d),
                n,
                n,
                n,
                dt.datetime.combine(today - dt.timedelta(days=d), dt.time(9), UTC),
                dt.datetime.combine(today - dt.timedelta(days=d), dt.time(18), UTC),
            ),
        )
        q(
            """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, status, scheduled_at, status_changed_at,
                 sent_at, finished_at, generated_text, tokens_used)
             SELECT %s, l.id, %s, 'sent', t.at, t.at, t.at + interval '3 seconds', t.at + interval '3 seconds',
                    'Olá! Tudo bem? Mensagem de um dia anterior.', 42
             FROM (SELECT id FROM leads WHERE workspace_id = %s ORDER BY id LIMIT %s) l,
                  LATERAL (SELECT %s::timestamptz + (l.id %% 32400) * interval '1 second' AS at) t""",
            (
                run_id,
                world.inbox_ids[0],
                world.ws_id,
                n,
                dt.datetime.combine(today - dt.timedelta(days=d), dt.time(9), UTC),
            ),
        )
        print(f"   ... history: run of {today - dt.timedelta(days=d)} with {n} sent messages", flush=True)
    q("VACUUM ANALYZE leads")
    q("VACUUM ANALYZE campaign_messages")
    q("VACUUM ANALYZE campaign_runs")


def main() -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leads", type=int, default=100_000)
    p.add_argument("--history", type=int, default=1_000_000, help="historical message rows")
    p.add_argument("--repeat", type=int, default=9, help="timed claims (median reported)")
    p.add_argument("--quick", action="store_true", help="20,000 leads, 200,000 historical rows")
    p.add_argument(
        "--pool", type=int, default=10, help="inboxes in the campaign's sender pool (R-POOL; issue 15 plans with 10)"
    )
    args = p.parse_args()
    if args.quick:
        args.leads, args.history = min(args.leads, 20_000), min(args.history, 200_000)
    if args.leads < CLAIM or args.history < 0 or args.repeat < 1 or not 1 <= args.pool <= 100:
        p.error(f"--leads must be >= {CLAIM}, --history >= 0, --repeat >= 1, --pool 1..100")
    header(
        "T-PERF-4 scale: planning and one dispatcher claim",
        f"{args.leads} eligible leads, a sender pool of {args.pool} inbox(es), {args.history} historical "
        f"message rows, claim of {CLAIM}",
    )
    with BenchServices("scale"):
        from campaign import planner
        from campaign.db import db
        from campaign.settings import get_settings

        settings = get_settings()
        db.connect(reuse_if_open=True)
        world = create_world("scale", args.pool, min_gap=0.0)
        # Today's schedule must fit the whole list: gaps of 0..20 ms from 00:00:30 UTC (about
        # 17 minutes for 100,000 leads), inside an always-open window.
        config_id = create_config(
            world,
            "big",
            world.inbox_ids[0],
            split=False,
            max_parts=1,
            gap=(0.0, 0.02),
            daily_limit=args.leads,
            active=True,
        )
        for position, inbox_id in enumerate(world.inbox_ids[1:], start=1):  # the pool (R-POOL-1)
            q(
                """INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position)
                   VALUES (%s, %s, %s, %s)""",
                (config_id, inbox_id, world.ws_id, position),
            )
        t = time.perf_counter()
        load_history(world, config_id, args.leads, args.history)
        row(
            "data loaded",
            f"{time.perf_counter() - t:.1f} s ({q1('SELECT count(*) FROM campaign_messages')} message rows)",
        )

        # reference: the bare insert of as many message rows (then removed again)
        ref_run = q1(
            """INSERT INTO campaign_runs (config_id, run_date, status) VALUES (%s, '2000-01-01', 'completed')
                        RETURNING id""",
            (config_id,),
        )
        t = time.perf_counter()
        q(
            """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
             SELECT %s, id, %s, now() FROM leads WHERE workspace_id = %s""",
            (ref_run, world.inbox_ids[0], world.ws_id),
        )
        ref_insert_s = time.perf_counter() - t
        q("DELETE FROM campaign_messages WHERE run_id = %s", (ref_run,))
        q("DELETE FROM campaign_runs WHERE id = %s", (ref_run,))
        q("VACUUM ANALYZE campaign_messages")

        # planning (timed)
        now = dt.datetime.combine(dt.datetime.now(UTC).date(), dt.time(0, 0, 30), UTC)
        before = Counts(**{k: v for k, v in dbcount.snapshot().items() if k != "pid"})
        dbcount.set_actor("plan_run")
        t = time.perf_counter()
        try:
            run = planner.plan_run(config_id, now=now, rng=random.Random(4))
        finally:
            dbcount.set_actor(None)
        plan_s = time.perf_counter() - t
        if run is None:
            raise SystemExit(f"error: planner.plan_run planned no run for config {config_id}: nothing to measure")
        plan_counts = Counts(**{k: v for k, v in dbcount.snapshot().items() if k != "pid"})
        plan_counts.add(before, -1)
        plan_counts.stmts = {k: v for k, v in plan_counts.stmts.items() if k.startswith("plan_run |") and v[0]}
        planned_ok = run.leads_total == args.leads and run.leads_overflow == 0
        q("VACUUM ANALYZE campaign_messages")

        # one claim of 500 due messages (timed, repeated)
        due_at = q1(
            "SELECT scheduled_at FROM campaign_messages WHERE run_id = %s ORDER BY scheduled_at OFFSET %s LIMIT 1",
            (run.id, CLAIM - 1),
        )
        claim_ms: list[float] = []
        claimed: list[int] = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            n = dispatch.dispatch_due(settings, now=due_at, limit=CLAIM, publish=lambda queue, ids: None)
            claim_ms.append(1000 * (time.perf_counter() - t))
            claimed.append(n)
            q("UPDATE campaign_messages SET status = 'pending' WHERE run_id = %s AND status = 'queued'", (run.id,))
        # the floor: one single-row UPDATE by primary key, same connection
        ref_ms: list[float] = []
        some_id = q1("SELECT id FROM campaign_messages WHERE run_id = %s LIMIT 1", (run.id,))
        for _ in range(args.repeat):
            t = time.perf_counter()
            q("UPDATE campaign_messages SET attempts = 0 WHERE id = %s RETURNING id", (some_id,))
            ref_ms.append(1000 * (time.perf_counter() - t))

        # EXPLAIN of the claim as the engine runs it
        dbcount.start_capture()
        try:
            dispatch.dispatch_due(settings, now=due_at, limit=CLAIM, publish=lambda queue, ids: None)
        finally:
            statements = dbcount.stop_capture()
        q("UPDATE campaign_messages SET status = 'pending' WHERE run_id = %s AND status = 'queued'", (run.id,))
        # the claim's search: the due messages, locked (SKIP LOCKED); the UPDATE that follows is by id
        claim_sql = next((s for s in statements if "SKIP LOCKED" in str(s[0])), None)
        if claim_sql is None:
            raise SystemExit("error: the claim statement was not seen: did dispatch_due change?")
        conn = db.connection()
        with conn.cursor() as cur:
            text = cur.mogrify(*claim_sql).decode()
            cur.execute("BEGIN")
            try:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + text)
                plan_lines = [r[0] for r in cur.fetchall()]
            finally:
                cur.execute("ROLLBACK")
        db.close()

    plan = "\n".join(plan_lines)
    index_lines = [ln for ln in plan_lines if "campaign_messages" in ln and "Index" in ln and "Scan" in ln]
    seq_scan = any("Seq Scan on campaign_messages" in ln for ln in plan_lines)
    index_ok = bool(index_lines) and not seq_scan
    claim_med = median(claim_ms)
    print()
    row("reference: bare INSERT...SELECT of the rows", f"{ref_insert_s:7.2f} s  ({args.leads} rows)")
    row(
        "planning (planner.plan_run)",
        f"{plan_s:7.2f} s  = {plan_s / ref_insert_s:.1f} x reference   "
        f"target <= {PLAN_TARGET_S:.0f} s   {verdict(plan_s <= PLAN_TARGET_S and planned_ok)}",
    )
    row(
        "  planned",
        f"leads_total {run.leads_total}, overflow {run.leads_overflow} "
        f"({'as expected' if planned_ok else 'NOT every lead planned'})",
    )
    print("   where the planning time goes:")
    print_counts(plan_counts, 1, top=10)
    row("  python (planning time minus DB wait)", f"{plan_s - plan_counts.db_seconds:7.2f} s")
    row("reference: single-row UPDATE by primary key", f"{median(ref_ms):7.2f} ms (median of {len(ref_ms)})")
    row(
        f"claim of {CLAIM} due messages (dispatch_due)",
        f"{claim_med:7.2f} ms median, min {min(claim_ms):.2f}, max {max(claim_ms):.2f} ({args.repeat} runs; "
        f"claimed {sorted(set(claimed))})   target <= {CLAIM_TARGET_MS:.0f} ms   "
        f"{verdict(claim_med <= CLAIM_TARGET_MS and set(claimed) == {CLAIM})}",
    )
    row(
        "index scan in the claim's plan",
        f"{verdict(index_ok)}  "
        f"({'; '.join(ln.strip() for ln in index_lines) or 'none'}"
        f"{'; SEQ SCAN on campaign_messages' if seq_scan else ''})",
    )
    print("   EXPLAIN (ANALYZE, BUFFERS) of the claim:")
    for ln in plan.splitlines():
        print("     " + ln)
    ok = (
        plan_s <= PLAN_TARGET_S and planned_ok and claim_med <= CLAIM_TARGET_MS and set(claimed) == {CLAIM} and index_ok
    )
    result_line(
        "T-PERF-4",
        {
            "plan_s": round(plan_s, 3),
            "ref_insert_s": round(ref_insert_s, 3),
            "claim_ms_median": round(claim_med, 2),
            "claim_ms_min": round(min(claim_ms), 2),
            "ref_update_ms": round(median(ref_ms), 3),
            "index_scan": index_ok,
            "leads": args.leads,
            "history": args.history,
            "pass": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
