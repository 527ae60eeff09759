"""``make demo`` / ``python demo.py`` / ``python cli.py demo``: the whole engine end to end (issue 8).

One command shows a campaign day on a compressed clock: it starts the sandbox (a real HTTP fake of
OpenRouter and Evolution API, with a few faults), applies ``examples/demo.toml`` (workspace ``demo``:
2 inboxes, 2 campaigns, always-open windows, sub-second gaps), imports ``examples/demo_leads.csv``
(60 rows: one invalid phone, one number the sandbox says is not on WhatsApp, one lead who opts out
after planning), plans both runs (the ``run-now`` path), then runs the real pipeline — the
scheduler's own jobs (dispatcher, recovery sweep, window guard, inbox health) and Dramatiq workers —
with a progress bar per run, and ends with each run's report text and picture.

Where it runs (one line on start says which):

* ``services`` — ``DATABASE_URL`` and ``RABBITMQ_URL`` answer: the demo uses its OWN database
  ``campaign_demo`` on that PostgreSQL server and its OWN vhost ``campaign_demo`` on that RabbitMQ
  (both created when missing), never the configured ones, so an engine running there is not
  touched. Workers are in-process ``dramatiq.Worker`` threads on the RabbitMQ broker (publisher
  confirms, the same middleware as ``dramatiq actors``): the same code paths as worker processes,
  no stray processes left behind on Ctrl-C, and one driver for both modes.
* ``embedded`` — otherwise: PostgreSQL from the pip-installed ``pgserver`` (data under
  ``.demo/pgdata``, git-ignored; as root, pgserver runs the server as a system user ``pgserver``
  that it creates) and Dramatiq's ``StubBroker`` (``CAMPAIGN_BROKER=stub``) with in-process worker
  threads. Same engine code otherwise: no SQLite, no second implementation.

``--embedded`` / ``--services`` force a mode (``--services`` fails when a service does not answer).
Re-running is safe: the demo deletes and re-creates only its own workspace ``demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from campaign.errors import DemoError, EngineError, ServicesError
from devtools import demo_sequence, demo_triage
from devtools.demo_metrics import DemoMetrics
from devtools.services import ensure_database as create_database_if_missing
from devtools.services import ensure_vhost as create_vhost_if_missing
from devtools.services import (
    probe_postgres,
    probe_rabbitmq,
    sandbox_env,
    vhost_of,
    with_database,
)

log = logging.getLogger("demo")

__all__ = [
    "DemoError",
    "DemoResult",
    "Services",
    "add_arguments",
    "run_demo",
    "run_from_args",
    "main",
    "WORKSPACE",
    "NOT_ON_WHATSAPP",
    "OPTS_OUT",
    "OPTS_OUT_BY_REPLY",
    "INVALID_PHONE_RAW",
    "DEMO_FAULTS",
]

ROOT = Path(__file__).resolve().parent.parent  # the repository (examples/, demo-output/)
DEFAULT_CONFIG = ROOT / "examples" / "demo.toml"
DEFAULT_LEADS = ROOT / "examples" / "demo_leads.csv"
DEFAULT_DATA_DIR = ROOT / ".demo"
DEFAULT_OUTPUT_DIR = ROOT / "demo-output"

WORKSPACE = "demo"
DEMO_NAME = "campaign_demo"  # the demo's own database and vhost on real services
IMPORT_COLUMN = "New"  # every CSV row is imported here ...
SEGMENT_COLUMNS = {"returning": "Returning"}  # ... then leads of these segments are moved, as an operator would
NOT_ON_WHATSAPP = "+5561967176492"  # Wagner Pinto: the sandbox answers 400 exists:false (E-13)
OPTS_OUT = "+5519983787416"  # Otávio Rocha: replies STOP after planning (E-17)
INVALID_PHONE_RAW = "12345"  # "Telefone Errado": rejected at import (E-18)
OPTS_OUT_BY_REPLY = "+5581968576565"  # Carla Melo: answers "PARE 🛑" after her first part (R-IN-4, E-28)
#: the reply the demo sends from the first lead whose message is between its parts (E-27)
MIDWAY_REPLY = "Oi! Me conta mais?"
DEMO_WEBHOOK_SECRET = "demo-webhook-secret"  # the in-process receiver's (the demo's own sandbox posts to it)

#: sandbox faults that show the engine at work: a few 429s with Retry-After on the LLM (retried
#: with backoff, never early), one number that is not on WhatsApp, small provider latencies
DEMO_FAULTS: dict[str, Any] = {
    "chat": {"rate_429": 0.1, "latency_ms": [30, 120]},
    "split": {"rate_429": 0.05, "latency_ms": [20, 80]},
    "send": {"latency_ms": [20, 60]},
    "retry_after": 0.3,
    "invalid_numbers": [NOT_ON_WHATSAPP.lstrip("+")],
}

#: engine settings on the demo's compressed clock (each is an ordinary environment setting)
ENGINE_TUNING = {
    "MIN_BACKOFF_SECONDS": "0.2",
    "MAX_BACKOFF_SECONDS": "2",
    "LEASE_SECONDS": "60",
    "SEND_TIMEOUT_SECONDS": "5",
    "LLM_TIMEOUT_SECONDS": "10",
    "DISPATCH_INTERVAL_SECONDS": "0.2",
    # how often an in-process consumer releases due delayed messages (ms); the 1 s default would
    # make every pacing delay up to a second late
    "dramatiq_worker_timeout": "100",
}

#: the scheduler jobs the demo runs, at demo speed (seconds); planning is the explicit run-now
#: above, and alerts would only repeat what the demo prints
DEMO_JOB_SECONDS = {"dispatch_due": 0.2, "window_guard": 5.0, "recovery_sweep": 5.0, "inbox_health": 10.0}

TERMINAL_RUN = ("completed", "failed", "cancelled")


@dataclasses.dataclass(frozen=True)
class Services:
    """Where the demo's engine runs."""

    mode: str  # "embedded" | "services"
    database_url: str
    rabbitmq_url: str  # unused (but valid) with the StubBroker
    broker: str  # "stub" | "rabbitmq"
    line: str  # the one line that says so
    own_vhost: bool = False  # the vhost is the demo's own (its queues may be purged)


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced."""

    mode: str
    database_url: str
    rabbitmq_url: str
    sandbox_url: str
    workspace: str
    runs: list[dict[str, Any]]
    pictures: list[str]
    rejected_rows: list[str]
    opted_out: str | None
    sandbox_summary: dict[str, Any]
    listening: dict[str, Any]
    mismatches: list[str]
    elapsed_seconds: float
    report_missing: bool = False
    sequence: dict[str, Any] = dataclasses.field(default_factory=dict)  # the follow-up step (demo_sequence)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # the dashboard panel of the summary

    @property
    def ok(self) -> bool:
        """Every run completed and every counter matches its rows."""
        follow_up_ok = self.sequence.get("status", "completed") == "completed"
        return (
            bool(self.runs)
            and all(r["status"] == "completed" for r in self.runs)
            and not self.mismatches
            and follow_up_ok
        )


# --------------------------------------------------------------------------------------------
# finding the services
# --------------------------------------------------------------------------------------------


def _redact(url: str) -> str:
    from campaign.settings import redact_url

    return redact_url(url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ensure_database(url: str) -> None:
    """Create the database named by ``url`` on its server when it does not exist yet."""
    try:
        create_database_if_missing(url, application_name="campaign-demo")
    except ServicesError as exc:
        raise DemoError(f"{exc}; or run `python demo.py --embedded`") from None


def ensure_vhost(url: str, vhost: str) -> str:
    """The URL of ``vhost`` on the RabbitMQ of ``url``, creating the vhost when it is missing."""
    try:
        return create_vhost_if_missing(url, vhost)
    except ServicesError as exc:
        raise DemoError(f"{exc} or run `python demo.py --embedded`") from None


def start_embedded_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or join) the pgserver PostgreSQL under ``data_dir/pgdata``; (server handle, demo database URL)."""
    # platformdirs warns (on import) when XDG_RUNTIME_DIR is unset (containers, root shells): harmless
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver
    except ImportError:
        raise DemoError(
            "the embedded PostgreSQL needs the pgserver package: "
            ".venv/bin/python -m pip install -r requirements.txt (or `make venv`)"
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        # PostgreSQL refuses to run as root. As root, pgserver creates a system user `pgserver`
        # (useradd), hands it the data directory, adds g+rx/o+rx to every parent directory so that
        # user can reach it, and runs the server as that user. The server listens on a Unix socket
        # only and stops when the last process using it exits.
        server = pgserver.get_server(data_dir / "pgdata", cleanup_mode="stop")
    except Exception as exc:  # pgserver raises bare CalledProcessError / AssertionError
        raise DemoError(
            f"the embedded PostgreSQL did not start in {data_dir / 'pgdata'}: {_first_line(exc)} "
            f"(its log: {data_dir / 'pgdata' / 'log'})"
        ) from None
    # pgserver writes an empty password ("postgres:@"); without it the URL reads as what it is
    url = server.get_uri(DEMO_NAME).replace("://postgres:@", "://postgres@", 1)
    ensure_database(url)
    return server, url


def choose_services(requested: str, *, data_dir: Path, database: str, vhost: str, threads: int) -> tuple[Services, Any]:
    """Decide the mode (``auto`` | ``services`` | ``embedded``); (services, pgserver handle or None)."""
    from campaign.settings import get_settings

    configured = get_settings()
    pg_url, mq_url = configured.database_url, configured.rabbitmq_url
    why_not = ""
    if requested in ("auto", "services"):
        pg_err, mq_err = probe_postgres(pg_url), probe_rabbitmq(mq_url)
        problems = []
        if pg_err:
            problems.append(f"PostgreSQL at {_redact(pg_url)} does not answer: {pg_err}")
        if mq_err:
            problems.append(f"RabbitMQ at {_redact(mq_url)} does not answer: {mq_err}")
        if not problems:
            try:
                db_url = with_database(pg_url, database)
                ensure_database(db_url)
                vhost_url = ensure_vhost(mq_url, vhost)
            except DemoError as exc:
                if requested == "services":
                    raise
                why_not = str(exc)
            else:
                line = (
                    f"mode: services — PostgreSQL {_redact(db_url)}, RabbitMQ {_redact(vhost_url)}, "
                    f"{threads} in-process Dramatiq worker threads"
                )
                return Services("services", db_url, vhost_url, "rabbitmq", line, own_vhost=vhost == DEMO_NAME), None
        elif requested == "services":
            raise DemoError("--services: " + "; ".join(problems))
        else:
            why_not = "; ".join(problems)
    server, url = start_embedded_postgres(data_dir)
    reason = f"{why_not} — " if why_not else ""
    line = (
        f"mode: embedded — {reason}PostgreSQL from pgserver (data in {_display(data_dir / 'pgdata')}), "
        f"Dramatiq StubBroker, {threads} in-process worker threads"
    )
    return Services("embedded", url, mq_url, "stub", line), server


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# the sandbox
# --------------------------------------------------------------------------------------------


class AttachedSandbox:
    """Control API of a sandbox someone else started (``--sandbox-url``), default keys."""

    def __init__(self, url: str) -> None:
        import httpx

        from sandbox import DEFAULT_CHAT_KEY, DEFAULT_EVOLUTION_KEY

        self.url = url.rstrip("/")
        self.chat_key, self.evolution_key = DEFAULT_CHAT_KEY, DEFAULT_EVOLUTION_KEY
        self._http = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    @property
    def openrouter_url(self) -> str:
        """Base URL of the fake OpenRouter."""
        return f"{self.url}/api/v1"

    @property
    def evolution_url(self) -> str:
        """Base URL of the fake Evolution API."""
        return self.url

    def _control(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._http.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise DemoError(f"sandbox at {self.url}: {method} {path} answered {r.status_code} {r.text[:200]}")
        return r.json()

    def reset(self) -> None:
        """Clear the ledger."""
        self._control("POST", "/__sandbox/reset", json={"keep_faults": False})

    def set_faults(self, patch: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Merge-patch (or replace) the faults."""
        return self._control("POST", "/__sandbox/faults", params={"replace": "1"} if replace else None, json=patch)

    def summary(self) -> dict[str, Any]:
        """Ledger summary counters."""
        return self._control("GET", "/__sandbox/ledger", params={"entries": "0"})["summary"]

    def inbound(self, **fields: Any) -> dict[str, Any]:
        """Publish a scripted inbound message (a lead's reply) as Evolution would."""
        return self._control("POST", "/__sandbox/inbound", json=fields)

    def stop(self) -> None:
        """Close the control connection (the sandbox itself keeps running)."""
        self._http.close()


def start_sandbox(url: str | None, seed: int, events_amqp_url: str | None = None) -> Any:
    """Start the sandbox subprocess with the demo's faults, or attach to ``url`` and set them there.

    ``events_amqp_url``: the sandbox also publishes Evolution's events to that RabbitMQ (global mode),
    where ``inbound.py``'s consumer reads them (only a sandbox the demo starts).
    """
    if url:
        sb = AttachedSandbox(url)
        try:
            sb.reset()
            sb.set_faults(DEMO_FAULTS, replace=True)
        except Exception as exc:
            sb.stop()
            raise DemoError(f"--sandbox-url {url}: {_first_line(exc)}") from None
        return sb
    from sandbox.testing import SandboxProcess, SandboxStartError

    try:
        return SandboxProcess(faults=DEMO_FAULTS, seed=seed, events_amqp_url=events_amqp_url).start()
    except SandboxStartError as exc:
        raise DemoError(f"the sandbox did not start: {exc}") from None


# --------------------------------------------------------------------------------------------
# the engine, configured for the demo
# --------------------------------------------------------------------------------------------


def configure_engine(services: Services, sb: Any) -> Any:
    """Point the engine's settings (environment, read once) at the demo's services and sandbox."""
    from campaign.settings import get_settings, reset_settings

    env = {
        "DATABASE_URL": services.database_url,
        "RABBITMQ_URL": services.rabbitmq_url,
        "CAMPAIGN_BROKER": services.broker,
        **sandbox_env(sb),
        "WEBHOOK_SECRET": DEMO_WEBHOOK_SECRET,
        **ENGINE_TUNING,
    }
    actors_module = sys.modules.get("actors")
    if actors_module is not None:
        # the broker is built once per process when `actors` is imported: it must be the demo's
        current = type(actors_module.broker).__name__
        wanted = "StubBroker" if services.broker == "stub" else "RabbitmqBroker"
        if current != wanted or os.environ.get("RABBITMQ_URL") != services.rabbitmq_url:
            raise DemoError(
                "the engine's broker was already built in this process for other services; "
                "run the demo in its own process (python demo.py)"
            )
    os.environ.update(env)
    reset_settings()
    return get_settings()


def reset_workspace() -> int:
    """Delete the demo's workspace and everything hanging on it (runs, messages, leads...); 1 if it existed."""
    from campaign import ratelimit
    from campaign.db import db

    with db.atomic():
        inbox_ids = [
            r[0]
            for r in db.execute_sql(
                "SELECT i.id FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id WHERE w.name = %s", (WORKSPACE,)
            )
        ]
        # dead letters only lose their link on delete (they outlive RabbitMQ's copy): remove the demo's
        db.execute_sql(
            """DELETE FROM dead_letters WHERE run_id IN (
                              SELECT r.id FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
                                JOIN workspaces w ON w.id = c.workspace_id WHERE w.name = %s)""",
            (WORKSPACE,),
        )
        if inbox_ids:
            db.execute_sql(
                "DELETE FROM rate_limits WHERE key = ANY(%s)", ([ratelimit.inbox_key(i) for i in inbox_ids],)
            )
        # runs first: their messages reference the inboxes without a cascade, and a cascade does
        # not order itself (runs -> messages, parts, events go with them)
        db.execute_sql(
            """DELETE FROM campaign_runs WHERE config_id IN (
                              SELECT c.id FROM campaign_configs c JOIN workspaces w ON w.id = c.workspace_id
                               WHERE w.name = %s)""",
            (WORKSPACE,),
        )
        # ON DELETE CASCADE: columns, leads, conversations, inboxes, configs
        return len(db.execute_sql("DELETE FROM workspaces WHERE name = %s RETURNING id", (WORKSPACE,)).fetchall())


def _queues_of_vhost(url: str, purge: bool) -> None:
    """Refuse a vhost where something else consumes the pipeline queues; purge the demo's own."""
    import pika
    from pika.exceptions import ChannelClosedByBroker

    from campaign.ops import monitor

    pika_log = logging.getLogger("pika")
    saved = pika_log.level
    pika_log.setLevel(logging.CRITICAL)  # every passive declare of a queue not there yet logs a WARNING
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for name in monitor.queue_names():
            ch = conn.channel()
            try:
                q = ch.queue_declare(queue=name, passive=True).method
            except ChannelClosedByBroker:
                continue  # not declared yet
            if q.consumer_count and not name.endswith(".XQ"):
                raise DemoError(
                    f"{q.consumer_count} consumer(s) already read queue {name} in vhost "
                    f"{vhost_of(url)!r}: other workers would take the demo's messages; stop them, "
                    "use another --vhost, or run `python demo.py --embedded`"
                )
            if purge and q.message_count:
                ch.queue_purge(name)  # leftovers of an interrupted demo
            ch.close()
    finally:
        conn.close()
        pika_log.setLevel(saved)


def _start_scheduler(settings: Any) -> tuple[Any, threading.Thread]:
    from scheduler import SchedulerProcess, job_specs

    jobs = [
        dataclasses.replace(spec, seconds=DEMO_JOB_SECONDS[spec.id])
        for spec in job_specs(settings)
        if spec.id in DEMO_JOB_SECONDS
    ]
    if "dispatch_due" not in {j.id for j in jobs}:
        raise DemoError("the scheduler has no dispatch_due job")
    proc = SchedulerProcess(settings, holder=f"demo:{os.getpid()}", jobs=jobs)
    thread = threading.Thread(target=proc.run, name="demo-scheduler", daemon=True)
    thread.start()
    deadline = time.monotonic() + 6
    while not proc.active:
        if time.monotonic() > deadline:
            proc.stop()
            raise DemoError(
                "another scheduler holds the scheduler lock of this database, so the demo's cannot "
                "dispatch; the demo needs a database of its own (the default, campaign_demo)"
            )
        time.sleep(0.05)
    return proc, thread


_RUNS_SQL = """
    SELECT r.id, c.name, r.status, r.pause_reason, r.leads_total, r.leads_processed, r.leads_sent,
           r.leads_failed, r.leads_skipped, r.leads_in_doubt, r.leads_overflow
      FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
     WHERE r.id = ANY(%s) ORDER BY r.id"""
_RUN_KEYS = (
    "id",
    "campaign",
    "status",
    "pause_reason",
    "total",
    "processed",
    "sent",
    "failed",
    "skipped",
    "in_doubt",
    "overflow",
)


def _runs(run_ids: list[int]) -> list[dict[str, Any]]:
    from campaign.db import db

    with db.connection_context():
        return [dict(zip(_RUN_KEYS, row)) for row in db.execute_sql(_RUNS_SQL, (run_ids,)).fetchall()]


def _watch(console: Any, run_ids: list[int], timeout: float) -> list[dict[str, Any]]:
    """Progress bars per run until every run is finished (or ``timeout``); the runs' last state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runs = _runs(run_ids)
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn(
            "[green]sent {task.fields[sent]}[/] [red]failed {task.fields[failed]}[/] "
            "[yellow]skipped {task.fields[skipped]}[/] {task.fields[note]}"
        ),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout
    last_plain = 0.0
    with Progress(*columns, console=console, refresh_per_second=8) as progress:
        tasks = {
            r["id"]: progress.add_task(
                f"run {r['id']} {WORKSPACE}/{r['campaign']}",
                total=r["total"] or 1,
                sent=0,
                failed=0,
                skipped=0,
                note="",
            )
            for r in runs
        }
        while True:
            runs = _runs(run_ids)
            for r in runs:
                note = f"[magenta]in doubt {r['in_doubt']}[/]" if r["in_doubt"] else ""
                if r["status"] == "paused":
                    note += f" [bold yellow]paused ({r['pause_reason']})[/]"
                progress.update(
                    tasks[r["id"]],
                    completed=r["processed"],
                    sent=r["sent"],
                    failed=r["failed"],
                    skipped=r["skipped"],
                    note=note,
                )
            done = all(r["status"] in TERMINAL_RUN for r in runs)
            if not console.is_terminal and (done or time.monotonic() - last_plain >= 5):
                last_plain = time.monotonic()  # logs and pipes get a line now and then instead of a live bar
                for r in runs:
                    progress.console.print(
                        f"  run {r['id']} {r['campaign']}: {r['processed']}/{r['total']} "
                        f"processed (sent {r['sent']}, failed {r['failed']}, "
                        f"skipped {r['skipped']}) {r['status']}"
                    )
            if done or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (rich's live display swaps it while bars are shown)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _configure_logging(settings: Any, verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    try:
        from campaign.logs import configure_logging
    except ImportError:
        logging.basicConfig(
            level=level, stream=_CurrentStderr(), force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    else:
        configure_logging(settings, level=level, stream=_CurrentStderr())
    for noisy in ("pika", "apscheduler", "pgserver", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def run_demo(
    *,
    mode: str = "auto",
    config: Path = DEFAULT_CONFIG,
    leads: Path = DEFAULT_LEADS,
    data_dir: Path = DEFAULT_DATA_DIR,
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    database: str = DEMO_NAME,
    vhost: str = DEMO_NAME,
    threads: int = 8,
    timeout: float = 90.0,
    sandbox_url: str | None = None,
    seed: int = 8,
    verbose: bool = False,
    console: Any = None,
) -> DemoResult:
    """Run the whole demo; raise DemoError when it cannot start."""
    from rich.console import Console

    if console is None:
        # soft wrap: long lines (URLs, summaries) are left to the terminal instead of cut with newlines
        console = Console(highlight=False, soft_wrap=True)
        if not console.is_terminal:  # a pipe or a log file: the progress and report tables get room
            console = Console(highlight=False, soft_wrap=True, width=140)
    started = time.monotonic()
    for path, what in ((config, "config"), (leads, "leads CSV")):
        if not Path(path).is_file():
            raise DemoError(f"the demo's {what} {path} does not exist")
    if not 1 <= threads <= 64:
        raise DemoError(f"--threads {threads} must be between 1 and 64")

    services, pg_handle = choose_services(mode, data_dir=data_dir, database=database, vhost=vhost, threads=threads)
    console.print(services.line, style="bold")
    events_over_amqp = sandbox_url is None and services.broker == "rabbitmq"
    sb = start_sandbox(sandbox_url, seed, services.rabbitmq_url if events_over_amqp else None)
    try:
        settings = configure_engine(services, sb)
        _configure_logging(settings, verbose)
        console.print(
            f"[1/6] sandbox (fake OpenRouter + Evolution API) at {sb.url}: "
            f"{DEMO_FAULTS['chat']['rate_429']:.0%} of LLM calls answer 429 with Retry-After "
            f"{DEMO_FAULTS['retry_after']} s; {NOT_ON_WHATSAPP} is not on WhatsApp"
        )
        return _run_engine(
            console,
            services,
            settings,
            sb,
            config=config,
            leads=leads,
            output_dir=output_dir,
            threads=threads,
            timeout=timeout,
            started=started,
            pg_handle=pg_handle,
            events_over_amqp=events_over_amqp,
        )
    finally:
        sb.stop()


def _run_engine(
    console: Any,
    services: Services,
    settings: Any,
    sb: Any,
    *,
    config: Path,
    leads: Path,
    output_dir: Path,
    threads: int,
    timeout: float,
    started: float,
    pg_handle: Any,
    events_over_amqp: bool = False,
) -> DemoResult:
    import dramatiq

    from campaign import planner
    from campaign.db import db, init_db
    from campaign.ops.configfile import apply_file
    from campaign.ops.leads_import import import_file
    from models.schema import current_version, migrate

    init_db(settings, max_connections=threads + 12, application_name=f"campaign-demo:{os.getpid()}")
    with db.connection_context():
        migrate(db)
        version = current_version(db)
        existed = reset_workspace()
    console.print(
        f"[2/6] database {_redact(services.database_url)}: schema version {version}; "
        f"workspace {WORKSPACE!r} {'reset' if existed else 'new'}"
    )

    with db.connection_context():
        summary = apply_file(config)
    # markup=False wherever file or database text is printed: a name like "[bold]" is data (issue 23)
    console.print(f"[3/6] applied {_display(Path(config))}: " + "; ".join(summary.lines()), markup=False)

    with db.connection_context():
        rep = import_file(leads, workspace=WORKSPACE, column=IMPORT_COLUMN)
        ws_id = db.execute_sql("SELECT id FROM workspaces WHERE name = %s", (WORKSPACE,)).fetchone()[0]
        moved = []
        for segment, column in SEGMENT_COLUMNS.items():
            n = len(
                db.execute_sql(
                    """UPDATE leads l SET column_id = c.id, last_activity_at = now()
                     FROM columns c, columns src
                    WHERE c.workspace_id = l.workspace_id AND c.name = %s
                      AND src.id = l.column_id AND src.name = %s
                      AND l.workspace_id = %s AND l.custom_fields->>'segment' = %s
                RETURNING l.id""",
                    (column, IMPORT_COLUMN, ws_id, segment),
                ).fetchall()
            )
            moved.append(f"{n} '{segment}' lead(s) to column {column}")
    rejected = [str(e) for e in rep.errors]
    console.print(
        f"[4/6] imported {_display(Path(leads))} into {WORKSPACE}/{IMPORT_COLUMN}: {rep.imported} lead(s) "
        f"({rep.inserted} new), {len(rejected)} row(s) rejected; moved {', '.join(moved)} "
        "(as an operator drags cards)"
    )
    for line in rejected:
        console.print(f"      rejected {line}", style="yellow", markup=False)

    run_ids: list[int] = []
    with db.connection_context():
        configs = db.execute_sql(
            "SELECT id, name FROM campaign_configs WHERE workspace_id = %s ORDER BY id", (ws_id,)
        ).fetchall()
        for config_id, name in configs:
            if demo_sequence.plan_later(name):  # a follow-up: planned after the first touches (R-SEQ-3)
                continue
            run = planner.plan_run(config_id, manual=True)
            if run is None or run.status == "failed":
                raise DemoError(
                    f"run-now of {WORKSPACE}/{name} did not plan a run"
                    + (f": {run.failure_reason}" if run is not None else "")
                )
            first, last = db.execute_sql(
                "SELECT min(scheduled_at), max(scheduled_at) FROM campaign_messages WHERE run_id = %s", (run.id,)
            ).fetchone()
            span = f", due {first:%H:%M:%S}–{last:%H:%M:%S} UTC" if first else ""
            console.print(
                f"[5/6] run-now {WORKSPACE}/{name}: run {run.id}, {run.leads_total} message(s){span}, "
                f"overflow {run.leads_overflow}"
            )
            run_ids.append(run.id)
        opted = db.execute_sql(
            "UPDATE leads SET opted_out = true WHERE workspace_id = %s AND phone = %s RETURNING name", (ws_id, OPTS_OUT)
        ).fetchone()
    opted_name = opted[0] if opted else None
    if opted_name:
        console.print(
            f"      {opted_name} ({OPTS_OUT}) replied STOP after planning: opted out "
            "(leads.opted_out), so the pipeline skips that message",
            markup=False,
        )

    if services.broker == "rabbitmq":
        _queues_of_vhost(services.rabbitmq_url, purge=services.own_vhost)
    import actors  # builds the broker from the settings above and declares the actors on it

    listening = _Listening(settings, sb, run_ids[0], amqp_url=services.rabbitmq_url if events_over_amqp else None)
    listening.start(console)
    triage = demo_triage.TriageScene(sb, run_ids[1], skip_phones=(OPTS_OUT,))
    triage.start(console)
    observed = DemoMetrics()
    observed.start(console)
    worker = dramatiq.Worker(actors.broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    scheduler = thread = None
    sequence: dict[str, Any] = {}
    try:
        scheduler, thread = _start_scheduler(settings)
        console.print(
            f"[6/6] scheduler jobs (dispatch every {DEMO_JOB_SECONDS['dispatch_due']} s, recovery sweep, "
            f"window guard, inbox health) and {threads} worker threads on "
            f"{type(actors.broker).__name__}: running"
        )
        runs = _watch(console, run_ids, timeout)
        triage.wait_settled(20)
        sequence = demo_sequence.run(console, sb, ws_id, watch=_watch, timeout=timeout)
        run_ids += sequence.get("run_ids", [])  # its report and counters are shown and checked too
    finally:
        triage.stop()
        if scheduler is not None:
            scheduler.stop()
        if thread is not None:  # set together with scheduler
            thread.join(15)
        worker.stop(timeout=10_000)
        actors.broker.close()
        listening.stop()

    from campaign.ops import monitor

    with db.connection_context():
        mismatches = [str(m) for m in monitor.verify() if m.run_id in run_ids]
    unfinished = [r for r in runs if r["status"] != "completed"]
    if unfinished:
        console.print(
            f"NOT FINISHED within {timeout:.0f} s: "
            + ", ".join(
                f"run {r['id']} {r['status']}{' (' + r['pause_reason'] + ')' if r['pause_reason'] else ''} "
                f"{r['processed']}/{r['total']}"
                for r in unfinished
            ),
            style="bold red",
        )
    for m in mismatches:
        console.print(f"MISMATCH {m}", style="bold red")

    pictures, report_missing = _reports(console, run_ids, output_dir)
    ledger = sb.summary()
    _outcomes(console, run_ids, ledger, mismatches)
    heard = listening.summary(run_ids)
    heard["triage"] = triage.summary()
    _heard(console, heard)
    demo_triage.show(console, heard["triage"], ledger)
    panel, panel_mismatches = observed.summary(console, run_ids)
    mismatches += panel_mismatches
    result = DemoResult(
        mode=services.mode,
        database_url=_redact(services.database_url),
        rabbitmq_url=_redact(services.rabbitmq_url) if services.broker == "rabbitmq" else "",
        sandbox_url=sb.url,
        workspace=WORKSPACE,
        runs=runs,
        pictures=pictures,
        rejected_rows=rejected,
        opted_out=opted_name,
        sandbox_summary=ledger,
        listening=heard,
        metrics=panel,
        mismatches=mismatches,
        elapsed_seconds=round(time.monotonic() - started, 2),
        report_missing=report_missing,
        sequence=sequence,
    )
    console.print(
        f"demo {'finished' if result.ok else 'FAILED'} in {result.elapsed_seconds:.1f} s ({services.mode} mode)",
        style="bold green" if result.ok else "bold red",
    )
    return result


class _Listening:
    """The engine's ears in the demo, and two leads who answer.

    The webhook receiver (``webhook.py``'s server, in this process) gets Evolution's events from
    the sandbox; with a sandbox the demo started on real services, the RabbitMQ consumer
    (``inbound.py``'s, in a thread) gets the same events from the sandbox's global-mode queues too,
    and each one counts once (E-30). Two scripted replies: the first lead whose message is
    between its parts answers (its next part is never sent, E-27), and ``OPTS_OUT_BY_REPLY``
    answers "PARE 🛑" after its first part (opted out for good, the workspace's confirmation sent
    once, R-IN-4).
    """

    def __init__(self, settings: Any, sb: Any, welcome_run: int, *, amqp_url: str | None) -> None:
        self.settings, self.sb, self.welcome_run, self.amqp_url = settings, sb, welcome_run, amqp_url
        self.hook: Any = None
        self.consumer: Any = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.midway: str | None = None  # the phone that answered between parts
        self.opted: bool = False

    def start(self, console: Any) -> None:
        from campaign.inbound.consumer import InboundConsumer
        from webhook import make_server

        self.hook = make_server(self.settings, "127.0.0.1", 0)
        self.hook.start()
        self.sb.set_faults({"webhook_url": f"{self.hook.url}/webhook", "webhook_secret": self.settings.webhook_secret})
        paths = f"webhook receiver {self.hook.url}/webhook"
        if self.amqp_url:
            self.consumer = InboundConsumer(self.settings, url=self.amqp_url)
            t = threading.Thread(target=self.consumer.run, name="demo-inbound", daemon=True)
            t.start()
            self._threads.append(t)
            if not self.consumer.ready.wait(15):
                raise DemoError("the inbound consumer did not start (see the log)")
            paths += f" and RabbitMQ consumer of {self.settings.evolution_events_prefix}.* (both get every event)"
        t = threading.Thread(target=self._script, name="demo-replies", daemon=True)
        t.start()
        self._threads.append(t)
        console.print(f"      listening: {paths}; two leads will answer", markup=False)

    def _script(self) -> None:
        """Post the two replies as soon as their moment comes (polling the database)."""
        from campaign.db import db

        instance = "demo-sales-1"
        while not self._stop.wait(0.05) and not (self.midway and self.opted):
            try:
                with db.connection_context():
                    if self.midway is None:
                        row = db.execute_sql(
                            """SELECT l.phone FROM campaign_messages m JOIN leads l ON l.id = m.lead_id
                                JOIN message_parts p0 ON p0.message_id = m.id AND p0.idx = 0 AND p0.status = 'sent'
                                JOIN message_parts p1 ON p1.message_id = m.id AND p1.idx = 1 AND p1.status = 'pending'
                               WHERE m.run_id = %s AND m.status = 'sending' AND l.phone <> %s LIMIT 1""",
                            (self.welcome_run, OPTS_OUT_BY_REPLY),
                        ).fetchone()
                        if row is not None:
                            self.sb.inbound(instance=instance, number=row[0], text=MIDWAY_REPLY)
                            self.midway = row[0]
                    if not self.opted:
                        row = db.execute_sql(
                            """SELECT 1 FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
                                 JOIN leads l ON l.id = m.lead_id
                                WHERE m.run_id = %s AND l.phone = %s AND p.status = 'sent' LIMIT 1""",
                            (self.welcome_run, OPTS_OUT_BY_REPLY),
                        ).fetchone()
                        if row is not None:
                            self.sb.inbound(instance=instance, number=OPTS_OUT_BY_REPLY, text="PARE 🛑")
                            self.opted = True
            except Exception:  # the demo goes on; the summary says what did not happen
                log.warning("demo replies: could not post a scripted reply", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self.consumer is not None:
            self.consumer.stop()
        for t in self._threads:
            t.join(10)
        if self.hook is not None:
            self.hook.shutdown()

    def summary(self, run_ids: list[int]) -> dict[str, Any]:
        """What was heard and what it did (rows, not what the demo meant to do)."""
        from campaign.db import db

        with db.connection_context():
            replies, opt_outs = db.execute_sql(
                """SELECT count(*) FILTER (WHERE outcome IN ('reply', 'opt_out')),
                          count(*) FILTER (WHERE outcome = 'opt_out')
                     FROM inbound_events"""
            ).fetchone()
            stopped = db.execute_sql(
                """SELECT count(DISTINCT m.id) FROM campaign_messages m JOIN message_parts p ON p.message_id = m.id
                    WHERE m.run_id = ANY(%s) AND m.status = 'sent' AND p.status = 'skipped'""",
                (run_ids,),
            ).fetchone()[0]
            confirmed = db.execute_sql(
                "SELECT opt_out_reply_at IS NOT NULL FROM leads WHERE phone = %s AND opted_out", (OPTS_OUT_BY_REPLY,)
            ).fetchone()
            receipts = db.execute_sql(
                """SELECT count(*) FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
                    WHERE m.run_id = ANY(%s) AND p.delivery_status IS NOT NULL""",
                (run_ids,),
            ).fetchone()[0]
        out: dict[str, Any] = {
            "replies": replies,
            "opt_outs": opt_outs,
            "stopped_between_parts": stopped,
            "midway_phone": self.midway,
            "opted_out_by_reply": bool(confirmed),
            "opt_out_reply_sent": bool(confirmed and confirmed[0]),
            "parts_with_receipts": receipts,
        }
        if self.consumer is not None:
            by = self.consumer.stats.by_result
            out["amqp_applied"] = self.consumer.stats.applied
            out["amqp_replies"] = sum(n for k, n in by.items() if k.startswith("messages.upsert:"))
            out["amqp_duplicates"] = by.get("messages.upsert:duplicate", 0)
        return out


def _heard(console: Any, heard: dict[str, Any]) -> None:
    console.print(
        f"  listening: {heard['replies']} repl(ies), {heard['opt_outs']} opt-out(s); "
        f"{heard['stopped_between_parts']} message(s) stopped between their parts (E-27); "
        f"{heard['parts_with_receipts']} part(s) with delivery receipts",
        markup=False,
    )
    console.print(
        f"  opted out by reply {OPTS_OUT_BY_REPLY}: {'yes' if heard['opted_out_by_reply'] else 'NO'}; "
        f"confirmation {'sent once' if heard['opt_out_reply_sent'] else 'not sent yet (the sweep sends it)'}",
        markup=False,
    )
    if "amqp_applied" in heard:
        console.print(
            f"  RabbitMQ consumer: {heard['amqp_applied']} event(s) handled, {heard['amqp_replies']} of them "
            f"replies, {heard['amqp_duplicates']} of those already applied from the webhook: each counted once (E-30)",
            markup=False,
        )


def _reports(console: Any, run_ids: list[int], output_dir: Path) -> tuple[list[str], bool]:
    """Each run's report text, and its picture written under ``output_dir``."""
    from campaign.db import db

    try:
        from campaign.ops import report
    except ImportError:
        console.print("report.py is not available in this checkout: no report text or picture", style="bold red")
        return [], True
    output_dir.mkdir(parents=True, exist_ok=True)
    pictures = []
    for run_id in run_ids:
        with db.connection_context():
            rep = report.build_report(run_id)
        console.rule(f"report of run {run_id}")
        console.print(report.render_text(rep), end="", markup=False, highlight=False)
        written = report.render_picture(rep, output_dir / f"demo-run-{run_id}.png")
        pictures.append(str(written))
        console.print(f"picture: {_display(Path(written))}", style="bold")
    return pictures, False


def _outcomes(console: Any, run_ids: list[int], ledger: dict[str, Any], mismatches: list[str]) -> None:
    """What happened to the leads the demo planted, and what the sandbox saw."""
    from campaign.db import db

    with db.connection_context():
        rows = dict(
            db.execute_sql(
                """SELECT l.phone, m.status || coalesce(' (' || coalesce(m.skip_reason, m.error_class) || ')', '')
                 FROM campaign_messages m JOIN leads l ON l.id = m.lead_id
                WHERE m.run_id = ANY(%s) AND l.phone = ANY(%s)""",
                (run_ids, [NOT_ON_WHATSAPP, OPTS_OUT]),
            ).fetchall()
        )
    console.rule("what the demo shows")
    console.print(f"  not on WhatsApp  {NOT_ON_WHATSAPP}: {rows.get(NOT_ON_WHATSAPP, 'not planned')} — no retry (E-13)")
    console.print(f"  opted out        {OPTS_OUT}: {rows.get(OPTS_OUT, 'not planned')} — after planning (E-17)")
    console.print(f"  invalid phone    {INVALID_PHONE_RAW!r}: rejected at import, never planned (E-18)")
    by_route = ledger.get("by_route", {})
    llm_429 = sum(by_route.get(route, {}).get("429", 0) for route in ("chat", "split"))
    console.print(
        f"  sandbox ledger: {ledger.get('sends', 0)} part(s) accepted, {ledger.get('duplicate_sends', 0)} "
        f"duplicate(s); {llm_429} LLM answer(s) 429 retried after backoff, {ledger.get('early_retries', 0)} "
        "request(s) before their Retry-After"
    )
    console.print(f"  counters vs rows (verify): {'ok' if not mismatches else f'{len(mismatches)} mismatch(es)'}")


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python demo.py`` and ``python cli.py demo``)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--embedded",
        dest="mode",
        action="store_const",
        const="embedded",
        help="pgserver PostgreSQL + Dramatiq StubBroker, even if services answer",
    )
    which.add_argument(
        "--services",
        dest="mode",
        action="store_const",
        const="services",
        help="the PostgreSQL server of DATABASE_URL and the RabbitMQ of RABBITMQ_URL (the demo's "
        "own database and vhost there); fail if they do not answer",
    )
    p.set_defaults(mode="auto")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="workspace TOML (default examples/demo.toml)")
    p.add_argument("--leads", type=Path, default=DEFAULT_LEADS, help="leads CSV (default examples/demo_leads.csv)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="embedded PostgreSQL data lives in DIR/pgdata (default .demo)",
    )
    p.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the report pictures go (default demo-output)"
    )
    p.add_argument("--database", default=DEMO_NAME, help=f"services mode: the demo's database (default {DEMO_NAME})")
    p.add_argument("--vhost", default=DEMO_NAME, help=f"services mode: the demo's RabbitMQ vhost (default {DEMO_NAME})")
    p.add_argument("--threads", type=int, default=8, help="in-process worker threads (default 8)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds the runs may take (default 90)")
    p.add_argument(
        "--sandbox-url", default=None, help="use this running sandbox (default keys) instead of starting one"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the outcome as JSON here")


def run_from_args(args: argparse.Namespace, verbose: bool = False) -> int:
    """Run the demo for parsed arguments; 0 ok, 1 the runs did not finish cleanly, 2 could not start."""
    try:
        result = run_demo(
            mode=args.mode,
            config=args.config,
            leads=args.leads,
            data_dir=args.data_dir,
            output_dir=args.output_dir,
            database=args.database,
            vhost=args.vhost,
            threads=args.threads,
            timeout=args.timeout,
            sandbox_url=args.sandbox_url,
            verbose=verbose or getattr(args, "verbose", False),
        )
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo interrupted; run it again to start over", file=sys.stderr)
        return 130
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**dataclasses.asdict(result), "ok": result.ok}, indent=2, default=str))
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python demo.py [--embedded|--services] ...``."""
    p = argparse.ArgumentParser(
        prog="demo.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="engine logs at INFO (default WARNING)")
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except EngineError as exc:  # a bad setting in the environment, a broken demo file
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
