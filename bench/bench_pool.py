"""R-POOL-2 pool speed-up: the same window-bound run through one inbox and through a pool of two.

    .venv/bin/python bench/bench_pool.py [--leads 200] [--gap 1.0 1.5] [--quick]

Two campaigns side by side, each with ``--leads`` leads and the same gaps between leads: ``solo``
sends through one inbox, ``pooled`` through a pool of two (``campaign_config_inboxes``). The
planner paces each inbox of a pool on its own (the campaign's gaps per inbox), so the pooled run's
schedule should span about half the solo one's. Both runs are planned by ``planner.plan_run``,
dispatched as the scheduler does and sent by real worker processes through the zero-latency sandbox
(one part per message; inbox minimum gap below the campaign's gaps, so the schedule, not the rate
limiter, is what bounds the run). Measured from the sandbox's ledger (what the provider saw): each
run's first send to its last send. Reference: 0.5 (two numbers, each at one number's pace);
target: the pooled run takes at most 0.6 of the solo run's time, and no inbox's sends are closer
than its minimum gap.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.bench_ontime import ledger_sends
from bench.common import (
    BenchServices,
    Workers,
    add_leads,
    create_config,
    create_world,
    dispatch_all,
    engine_env,
    header,
    q,
    q1,
    result_line,
    row,
    runs_done,
    status_counts,
    verdict,
)

REFERENCE_RATIO = 0.5
TARGET_RATIO = 0.6


def main() -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leads", type=int, default=200, help="leads per campaign")
    p.add_argument("--gap", type=float, nargs=2, default=(1.0, 1.5), metavar=("MIN", "MAX"))
    p.add_argument("--min-gap", type=float, default=0.2, help="each inbox's minimum gap between sends (s)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="40 leads per campaign, gaps 0.5-0.7 s")
    p.add_argument("--logdir", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.leads, args.gap = min(args.leads, 40), (0.5, 0.7)
    gap = (float(args.gap[0]), float(args.gap[1]))
    if args.leads < 4 or not 0 < gap[0] <= gap[1] or args.min_gap >= gap[0]:
        p.error("need --leads >= 4 and 0 < --min-gap < gap MIN <= gap MAX")
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-pool-"))
    header(
        "R-POOL-2 pool speed-up: one window-bound run through one inbox vs a pool of two",
        f"{args.leads} leads per campaign, gaps {gap[0]}-{gap[1]} s per inbox, inbox min gap {args.min_gap} s, "
        f"{args.processes} x {args.threads} workers; logs in {logdir}",
    )
    from sandbox.testing import SandboxProcess

    with BenchServices("pool") as svc, SandboxProcess(seed=5) as sb:
        env = engine_env(sb)
        svc.set_env(env)
        from campaign import planner
        from campaign.db import db
        from campaign.settings import get_settings

        settings = get_settings()
        db.connect(reuse_if_open=True)
        solo = create_world("solo", 1, min_gap=args.min_gap)
        pooled = create_world("pooled", 2, min_gap=args.min_gap)
        solo_cfg = create_config(solo, "solo", solo.inbox_ids[0], split=False, max_parts=1, gap=gap)
        pool_cfg = create_config(pooled, "pooled", pooled.inbox_ids[0], split=False, max_parts=1, gap=gap)
        q(
            """INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position)
               VALUES (%s, %s, %s, 1)""",
            (pool_cfg, pooled.inbox_ids[1], pooled.ws_id),
        )
        add_leads(solo, args.leads, two_parts=False)
        add_leads(pooled, args.leads, two_parts=False)
        instances = {solo_cfg: solo.instances, pool_cfg: pooled.instances}
        runs = {}
        for cid in (solo_cfg, pool_cfg):
            run = planner.plan_run(cid, manual=True)  # the run-now path: configs stay inactive
            assert run is not None and run.leads_total == args.leads, run
            runs[cid] = run.id
        planned = {
            cid: q1(
                "SELECT extract(epoch FROM max(scheduled_at) - min(scheduled_at))::float FROM campaign_messages "
                "WHERE run_id = %s",
                (run_id,),
            )
            for cid, run_id in runs.items()
        }
        db.close()
        with Workers(
            ["actors"], processes=args.processes, threads=args.threads, env=env, log_path=logdir / "worker.log"
        ) as workers:
            db.connect(reuse_if_open=True)
            deadline = time.monotonic() + planned[solo_cfg] + 300
            while not runs_done(list(runs.values())):
                if time.monotonic() > deadline:
                    print(status_counts(list(runs.values())), workers.log_tail())
                    return 1
                dispatch_all(settings)
                time.sleep(0.1)
            statuses = status_counts(list(runs.values()))
            db.close()
        sends = ledger_sends(sb)

    by_instance: dict[str, list[float]] = defaultdict(list)
    for s in sends:
        if s.get("outcome") == "ok":
            by_instance[s["instance"]].append(s["t"])
    spans, below = {}, 0
    for cid, names in instances.items():
        times = sorted(t for name in names for t in by_instance.get(name, []))
        spans[cid] = times[-1] - times[0] if len(times) > 1 else float("nan")
    for ts in by_instance.values():
        ts.sort()
        below += sum(1 for a, b in zip(ts, ts[1:]) if b - a < args.min_gap - 0.005)
    ratio = spans[pool_cfg] / spans[solo_cfg]
    planned_ratio = planned[pool_cfg] / planned[solo_cfg]
    print()
    row("messages", f"{statuses}; {len(sends)} sends in the ledger")
    row("one inbox: first send to last send", f"{spans[solo_cfg]:.1f} s (planned span {planned[solo_cfg]:.1f} s)")
    row("pool of two: first send to last send", f"{spans[pool_cfg]:.1f} s (planned span {planned[pool_cfg]:.1f} s)")
    ok = ratio <= TARGET_RATIO and below == 0 and statuses.get("sent", 0) == 2 * args.leads
    row(
        "pool / one inbox",
        f"{ratio:.2f} (planned {planned_ratio:.2f})   reference {REFERENCE_RATIO:.1f}, "
        f"target <= {TARGET_RATIO:.1f}   {verdict(ratio <= TARGET_RATIO)}",
    )
    row("sends closer than an inbox's minimum gap", f"{below}   {verdict(below == 0)}")
    result_line(
        "R-POOL-2",
        {
            "leads": args.leads,
            "gap": list(gap),
            "solo_s": round(spans[solo_cfg], 2),
            "pool_s": round(spans[pool_cfg], 2),
            "ratio": round(ratio, 3),
            "planned_ratio": round(planned_ratio, 3),
            "gaps_below_min": below,
            "pass": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
