"""What the benchmarks share: their own database and RabbitMQ vhost, the sandbox, real ``dramatiq``
worker processes, bulk campaign data, round-trip counters and the PASS/MISS lines.

Every benchmark makes its own PostgreSQL database and RabbitMQ vhost (devtools.services, as the
tests do) and drops them at the end, so it can run beside the test suite and other benchmarks. Where
the services are: TEST_POSTGRES_URL, TEST_RABBITMQ_URL, RABBITMQCTL: the same names ``make test`` uses.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaign import dispatch
from campaign.errors import ServicesError
from campaign.text import SPLIT_BELOW_CHARS, build_prompt
from devtools import services
from devtools.services import Throwaway, sandbox_env

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench")

UTC = dt.UTC
SYSTEM_PROMPT = "You write short, friendly first-contact WhatsApp messages in Portuguese."
#: lead fields that make the sandbox LLM write sentences long enough to be split
LEAD_FIELDS = {"city": "Recife", "company": "Comercial Atlântico de Alimentos e Bebidas do Nordeste"}
TERMINAL = ("sent", "failed", "skipped", "in_doubt")


# --------------------------------------------------------------------------------------------
# output


def verdict(ok: bool) -> str:
    """The word a benchmark prints against its SPEC target."""
    return "PASS" if ok else "MISS"


def header(title: str, detail: str = "") -> None:
    """Print a benchmark's title line with the machine's state (the machine is shared: say so)."""
    load = os.getloadavg()
    print(f"== {title}")
    if detail:
        print(f"   {detail}")
    print(
        f"   machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(shared with other jobs: absolute figures are noisy, ratios are the claim)"
    )


def row(label: str, value: str) -> None:
    """One aligned figure line."""
    print(f"   {label:<46} {value}")


def result_line(name: str, figures: dict[str, Any]) -> None:
    """One machine-readable line with every figure (for collecting results across runs)."""
    print(f"RESULT {name} {json.dumps(figures, default=str, sort_keys=True)}")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    """Median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# own database + vhost, the sandbox's settings, worker processes: devtools.services


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class BenchServices(Throwaway):
    """This benchmark's own database (schema migrated) and vhost; the process environment points at
    them for the duration of the block, and both are dropped afterwards (also on Ctrl-C/SIGTERM)."""

    def __init__(self, tag: str) -> None:
        # another job on this shared machine may have RabbitMQ stopped for a moment: retry the vhost 2 min
        super().__init__(f"ce_bench_{tag}", vhost_attempts=60)

    def __enter__(self) -> BenchServices:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            super().__enter__()
        except ServicesError as exc:
            raise SystemExit(f"error: {exc}") from exc
        return self


def engine_env(sb: Any, **extra: str) -> dict[str, str]:
    """Environment of engine processes wired to the sandbox ``sb``; the per-key LLM budget is lifted
    so the benchmark measures the pipeline, not OpenRouter's pacing (each bench says which limits it keeps)."""
    return {**sandbox_env(sb), "OPENROUTER_REQUESTS_PER_MINUTE": "1000000", **extra}


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant process of ``pid`` (by /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def rss_kb(pid: int) -> int:
    """Resident set size of one process in KiB (VmRSS of /proc/<pid>/status; 0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CPU_GROUPS = ("workers", "postgres", "rabbitmq", "sandbox", "other")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_group(pid: int) -> str | None:
    """Which process group a process belongs to, by its command line (None: not ours to count)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return None
    if b"postgres" in cmd:
        return "postgres"
    if b"beam.smp" in cmd or b"rabbit" in cmd:
        return "rabbitmq"
    if b"dramatiq" in cmd:
        return "workers"
    if b" -m sandbox" in cmd:
        return "sandbox"
    if b"python" in cmd:
        return "other"
    return None


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process of the machine that belongs to a group."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = _cpu_group(pid)
        if group is not None:
            out[pid] = (group, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per group spent between two snapshots (processes that ended in between are lost:
    the measured processes live through the window)."""
    out = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, secs) in after.items():
        out[group] += secs - before.get(pid, (group, 0.0))[1]
    return out


class Workers(services.Workers):
    """Real ``dramatiq`` worker processes (devtools.services.Workers: ready before ``with`` enters),
    plus what the memory benchmark reads of them."""

    def __init__(
        self,
        modules: Sequence[str],
        *,
        processes: int,
        threads: int,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        log_path = log_path or Path(tempfile.mkstemp(prefix="bench-worker-", suffix=".log")[1])
        super().__init__(modules, processes=processes, threads=threads, env=env, log_path=log_path)

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the dramatiq supervisor)."""
        if not self.alive:
            return []
        return [p for p in descendants(self.pid) if _ppid(p) == self.pid]

    def rss_kb(self) -> dict[int, int]:
        """VmRSS (KiB) of every worker process."""
        return {pid: rss_kb(pid) for pid in self.worker_pids()}


# --------------------------------------------------------------------------------------------
# campaign data, in bulk (one statement per table, not row by row)


@dataclass
class World:
    """A workspace with its columns and inboxes (ids)."""

    ws_id: int
    name: str
    src_col: int
    tgt_col: int
    inbox_ids: list[int]
    instances: list[str]
    next_phone: int = 0
    configs: list[int] = field(default_factory=list)


def q(sql: str, params: Sequence[Any] | dict = ()) -> list[tuple]:
    """Run one statement on the engine's pool and return its rows (none for a statement without)."""
    from campaign.db import db

    cur = db.execute_sql(sql, params)
    return cur.fetchall() if cur.description else []


def q1(sql: str, params: Sequence[Any] | dict = ()) -> Any:
    """The first column of the first row."""
    rows = q(sql, params)
    return rows[0][0] if rows else None


def create_world(
    name: str, n_inboxes: int, *, min_gap: float = 0.0, max_per_hour: int | None = None, max_per_day: int | None = None
) -> World:
    """A workspace ``name`` with columns New/Contacted and ``n_inboxes`` inboxes paced as given."""
    ws_id = q1("INSERT INTO workspaces (name) VALUES (%s) RETURNING id", (name,))
    cols = dict(
        q(
            """INSERT INTO columns (workspace_id, name, position)
                     VALUES (%s, 'New', 0), (%s, 'Contacted', 1) RETURNING name, id""",
            (ws_id, ws_id),
        )
    )
    # connected, as the scheduler's inbox_health job (every INBOX_HEALTH_INTERVAL_SECONDS) and
    # Evolution's connection.update events keep a live inbox: a send polls connectionState only
    # when that knowledge is older than CONNECTION_STATE_MAX_AGE_SECONDS (R-PIPE-3)
    rows = q(
        """INSERT INTO inboxes (workspace_id, name, instance_name, min_gap_seconds, max_per_hour, max_per_day,
                               connection_state, state_checked_at)
                SELECT %s, 'inbox-' || i, %s || '-inbox-' || i, %s, %s, %s, 'open', now()
                  FROM generate_series(1, %s) i
                ORDER BY i RETURNING id, instance_name""",
        (ws_id, name, min_gap, max_per_hour, max_per_day, n_inboxes),
    )
    return World(ws_id, name, cols["New"], cols["Contacted"], [r[0] for r in rows], [r[1] for r in rows])


def create_config(
    world: World,
    name: str,
    inbox_id: int,
    *,
    split: bool = True,
    max_parts: int = 2,
    part_gap: tuple[float, float] = (0.0, 0.0),
    gap: tuple[float, float] = (0.0, 0.0),
    daily_limit: int = 1_000_000,
    active: bool = False,
    timezone: str = "UTC",
) -> int:
    """A campaign config of ``world`` (always-open window, every day)."""
    cid = q1(
        """INSERT INTO campaign_configs (workspace_id, name, inbox_id, source_column_id, target_column_id,
                    timezone, daily_limit, gap_min_seconds, gap_max_seconds, part_gap_min_seconds,
                    part_gap_max_seconds, model, system_prompt, split_enabled, max_parts, active)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'bench/model', %s, %s, %s, %s) RETURNING id""",
        (
            world.ws_id,
            name,
            inbox_id,
            world.src_col,
            world.tgt_col,
            timezone,
            daily_limit,
            gap[0],
            gap[1],
            part_gap[0],
            part_gap[1],
            SYSTEM_PROMPT,
            split,
            max_parts,
            active,
        ),
    )
    world.configs.append(cid)
    return cid


def create_run(config_id: int, *, status: str = "running", run_date: dt.date | None = None) -> int:
    """A run of ``config_id`` (its leads_total grows with :func:`add_messages`)."""
    return q1(
        """INSERT INTO campaign_runs (config_id, run_date, status, started_at) VALUES (%s, %s, %s, now())
                 RETURNING id""",
        (config_id, run_date or dt.datetime.now(UTC).date(), status),
    )


def two_part_name(i: int, fields: dict[str, str] = LEAD_FIELDS, system_prompt: str = SYSTEM_PROMPT) -> str:
    """A lead name for which the sandbox LLM writes a text the engine splits in two parts.

    The sandbox's text is a function of the prompt (1-4 sentences); a name is searched whose text is
    longer than the engine's no-split threshold and has at least two sentences.
    """
    from sandbox.llm import generate_text, split_sentences

    for k in range(500):
        name = f"Ana {i}-{k}"
        ctx = types.SimpleNamespace(lead_name=name, lead_fields=fields, system_prompt=system_prompt, history=None)
        text = generate_text(build_prompt(ctx))
        if len(text) > SPLIT_BELOW_CHARS and len(split_sentences(text)) >= 2:
            return name
    raise RuntimeError(f"no two-part lead name found for lead {i}")


def add_leads(world: World, n: int, *, two_parts: bool = True, column_id: int | None = None) -> list[int]:
    """``n`` leads in the source column with valid, unique phones; returns their ids in order."""
    start = world.next_phone
    world.next_phone += n
    names = [two_part_name(start + i) if two_parts else f"Lead {start + i}" for i in range(n)]
    phones = [f"+55119{start + i:08d}" for i in range(n)]
    rows = q(
        """INSERT INTO leads (workspace_id, column_id, name, phone, custom_fields)
                SELECT %s, %s, t.name, t.phone, %s::jsonb FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY
                       AS t(name, phone, i) ORDER BY t.i RETURNING id""",
        (world.ws_id, column_id or world.src_col, json.dumps(LEAD_FIELDS), names, phones),
    )
    return [r[0] for r in rows]


def add_messages(
    run_id: int,
    lead_ids: Sequence[int],
    inbox_ids: Sequence[int],
    scheduled_at: dt.datetime | Sequence[dt.datetime] | None = None,
) -> int:
    """Pending messages of ``run_id`` for ``lead_ids`` (inboxes round-robin), due at ``scheduled_at``
    (one time or one per lead; default now); the run's leads_total grows to match."""
    n = len(lead_ids)
    if scheduled_at is None or isinstance(scheduled_at, dt.datetime):
        times = [scheduled_at or dt.datetime.now(UTC)] * n
    else:
        times = list(scheduled_at)
    inboxes = [inbox_ids[i % len(inbox_ids)] for i in range(n)]
    q(
        """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
         SELECT %s, t.lead, t.inbox, t.at
         FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[]) AS t(lead, inbox, at)""",
        (run_id, list(lead_ids), inboxes, times),
    )
    q("UPDATE campaign_runs SET leads_total = leads_total + %s WHERE id = %s", (n, run_id))
    return n


def status_counts(run_ids: Sequence[int]) -> dict[str, int]:
    """Messages of the runs by status."""
    return dict(
        q(
            "SELECT status, count(*) FROM campaign_messages WHERE run_id = ANY(%s) GROUP BY 1 ORDER BY 1",
            (list(run_ids),),
        )
    )


def parts_per_message(run_ids: Sequence[int]) -> float:
    """Average number of parts of the runs' sent messages."""
    v = q1(
        """SELECT count(p.id)::float / nullif(count(DISTINCT m.id), 0) FROM campaign_messages m
              JOIN message_parts p ON p.message_id = m.id WHERE m.run_id = ANY(%s) AND m.status = 'sent'""",
        (list(run_ids),),
    )
    return float(v or 0.0)


def db_now() -> dt.datetime:
    """The database's clock (every timestamp the benchmarks compare is taken on this clock)."""
    return q1("SELECT clock_timestamp()")


def dispatch_all(settings: Any, *, until_empty: bool = True) -> int:
    """Dispatch due messages as the scheduler's dispatch job does (batches until one is short)."""
    import actors  # noqa: F401  (the engine's broker, as scheduler.py sets it up)

    total = 0
    while True:
        n = dispatch.dispatch_due(settings)
        total += n
        if n < settings.dispatch_batch_size or not until_empty:
            return total


def wait_progress(
    count: Callable[[], int],
    total: int,
    *,
    timeout: float,
    stall: float = 60.0,
    what: str = "work",
    on_timeout: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> None:
    """Wait until ``count()`` reaches ``total``; fail early when it stops moving for ``stall`` seconds
    (another job restarting RabbitMQ mid-measurement makes the figure worthless anyway: rerun)."""
    deadline = time.monotonic() + timeout
    last, moved = -1, time.monotonic()
    while True:
        n = count()
        if n >= total:
            return
        now = time.monotonic()
        if n != last:
            last, moved = n, now
        if now - moved > stall or now > deadline:
            extra = on_timeout() if on_timeout else ""
            raise TimeoutError(
                f"{what}: {n} of {total} after {timeout - (deadline - now):.0f}s, no progress for "
                f"{now - moved:.0f}s (was RabbitMQ restarted by another job? rerun){extra}"
            )
        time.sleep(interval)


def runs_done(run_ids: Sequence[int]) -> bool:
    """Whether every run is completed (its last message terminal)."""
    return q1("SELECT count(*) FROM campaign_runs WHERE id = ANY(%s) AND status <> 'completed'", (list(run_ids),)) == 0


# --------------------------------------------------------------------------------------------
# round-trip counters (bench/dbcount.py writes them, one JSON file per worker process)


@dataclass
class Counts:
    """DB statements (count, seconds) and broker publishes, by key ``actor | statement``."""

    stmts: dict[str, list[float]] = field(default_factory=dict)
    publishes: dict[str, int] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    commits: dict[str, int] = field(default_factory=dict)  # write transactions committed, per actor
    async_commits: dict[str, int] = field(default_factory=dict)  # of those, synchronous_commit off

    def add(self, other: Counts, sign: int = 1) -> None:
        """Add (or subtract) another snapshot."""
        for k, (n, s) in other.stmts.items():
            cur = self.stmts.setdefault(k, [0, 0.0])
            cur[0] += sign * n
            cur[1] += sign * s
        for k, n in other.publishes.items():
            self.publishes[k] = self.publishes.get(k, 0) + sign * n
        for k, n in other.processed.items():
            self.processed[k] = self.processed.get(k, 0) + sign * n
        for k, n in other.commits.items():
            self.commits[k] = self.commits.get(k, 0) + sign * n
        for k, n in other.async_commits.items():
            self.async_commits[k] = self.async_commits.get(k, 0) + sign * n

    @property
    def statements(self) -> int:
        """Total DB round trips."""
        return int(sum(n for n, _ in self.stmts.values()))

    @property
    def write_commits(self) -> int:
        """Write transactions committed."""
        return int(sum(self.commits.values()))

    @property
    def flushed_commits(self) -> int:
        """Write transactions whose commit waited for the WAL flush (synchronous_commit on)."""
        return self.write_commits - int(sum(self.async_commits.values()))

    @property
    def db_seconds(self) -> float:
        """Total time spent waiting for the database."""
        return sum(s for _, s in self.stmts.values())

    def by_actor(self) -> dict[str, tuple[int, float]]:
        """(statements, seconds) per actor."""
        out: dict[str, list[float]] = {}
        for k, (n, s) in self.stmts.items():
            a = out.setdefault(k.split(" | ", 1)[0], [0, 0.0])
            a[0] += n
            a[1] += s
        return {k: (int(v[0]), v[1]) for k, v in sorted(out.items())}


def read_counts(directory: Path) -> Counts:
    """Sum every process's counter file in ``directory``."""
    total = Counts()
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: the next snapshot has it
        total.add(
            Counts(
                doc.get("stmts", {}),
                doc.get("publishes", {}),
                doc.get("processed", {}),
                doc.get("commits", {}),
                doc.get("async_commits", {}),
            )
        )
    return total


def print_counts(c: Counts, per: int, *, top: int = 40) -> None:
    """Round trips per message by actor and the most frequent statements."""
    for actor, (n, s) in c.by_actor().items():
        row(
            f"  {actor}",
            f"{n / per:6.2f} round trips/msg  {c.commits.get(actor, 0) / per:5.2f} write commits/msg "
            f"({(c.commits.get(actor, 0) - c.async_commits.get(actor, 0)) / per:.2f} flushed)  "
            f"{1000 * s / per:7.2f} ms DB/msg ({c.processed.get(actor, 0) / per:.2f} deliveries/msg)",
        )
    row(
        "  all actors",
        f"{c.statements / per:6.2f} round trips/msg  {c.write_commits / per:5.2f} write commits/msg "
        f"({c.flushed_commits / per:.2f} flushed)",
    )
    print("   most frequent statements (per message, then mean ms):")
    for k, (count, secs) in sorted(c.stmts.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"     {count / per:5.2f}  {1000 * secs / max(count, 1):6.2f} ms  {k}")
    if c.publishes:
        print("   broker publishes per message (from -> to):")
        for k, n in sorted(c.publishes.items(), key=lambda kv: -kv[1]):
            print(f"     {n / per:5.2f}  {k}")
