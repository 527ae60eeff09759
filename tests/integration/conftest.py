"""Test harness on the REAL services (DESIGN #7).

Each pytest session gets its own PostgreSQL database and its own RabbitMQ vhost, created here
and dropped at the end, so concurrent runs and leftovers never see each other; under pytest-xdist
(make test) each worker process is a session of its own, with its own database, vhost and sandbox. A missing
service is an error, never a skip: in CI it must fail the run.

Where the services are: TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
and TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/); the vhost is made with
``rabbitmqctl`` (RABBITMQCTL to override the command). devtools.services does the work.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from campaign.errors import ServicesError
from devtools.services import Throwaway

RUN = Throwaway("ce_test")


@pytest.fixture(scope="session", autouse=True)
def services() -> Iterator[dict[str, str]]:
    """Create this run's database and vhost, point the settings at them, drop them afterwards."""
    with RUN:
        _refuse_a_broker_built_before(RUN)
        import actors  # noqa: F401  (the engine's broker, on this run's vhost, as the entry points build it)

        yield RUN.env


def _refuse_a_broker_built_before(run: Throwaway) -> None:
    """The engine's broker is built once per process, when ``actors`` is first imported: built before
    this run's vhost existed, it would publish elsewhere and every worker test would wait in vain."""
    actors = sys.modules.get("actors")
    params = getattr(getattr(actors, "broker", None), "parameters", None)
    if actors is not None and getattr(params, "virtual_host", run.name) != run.name:
        raise ServicesError(
            f"the engine's broker was built before the test vhost existed (it publishes to vhost "
            f"{params.virtual_host!r}, not {run.name!r}): a test module imports ``actors`` at collection; "
            "import it inside the test instead"
        )


@pytest.fixture
def fresh_database(services) -> Iterator[str]:
    """An empty extra database (no schema) for migration tests; dropped afterwards."""
    url = RUN.extra_database()
    try:
        yield url
    finally:
        RUN.drop_extra(url)


@pytest.fixture
def clean_db(services) -> Iterator[None]:
    """The run's database with every domain table emptied before the test."""
    from campaign.db import db

    tables = (
        "campaign_events",
        "message_parts",
        "campaign_messages",
        "campaign_runs",
        "campaign_configs",
        "conversations",
        "leads",
        "inboxes",
        "columns",
        "workspaces",
        "dead_letters",
        "rate_limits",
        "scheduler_heartbeats",
    )
    with db.connection_context():
        # DELETE, children first, not TRUNCATE ... CASCADE: the same rows go (every table that
        # references these, as CASCADE would), but in a few milliseconds where TRUNCATE takes
        # ~0.15 s (new files for 20 tables and their indexes), once per test. Sequences go on, as
        # without RESTART IDENTITY: a stale broker message of an earlier test never meets a reused id.
        with db.atomic():
            for table in _delete_order(db, tables):
                db.execute_sql(f"DELETE FROM {table}")
    # this process's view of the emptied budgets goes with them: the requests of a per-minute
    # block it kept, the holds (Retry-After) it saw
    from campaign import ratelimit

    with ratelimit._blocks_lock:
        ratelimit._blocks.clear()
        ratelimit._holds.clear()
    with db.connection_context():
        yield


_DELETE_ORDERS: dict[tuple[str, ...], list[str]] = {}


def _delete_order(db, tables: tuple[str, ...]) -> list[str]:
    """``tables`` and every table that references them (transitively), referencing tables first."""
    if tables not in _DELETE_ORDERS:
        edges = db.execute_sql(
            """SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint
                WHERE contype = 'f' AND conrelid <> confrelid"""
        ).fetchall()
        wanted = set(tables)
        while True:  # what TRUNCATE ... CASCADE would empty too
            more = {child for child, parent in edges if parent in wanted} - wanted
            if not more:
                break
            wanted |= more
        order: list[str] = []
        left = set(wanted)
        while left:  # a table goes once nothing left still references it
            ready = sorted(t for t in left if not any(p == t and c in left for c, p in edges))
            assert ready, f"foreign keys in a cycle among {sorted(left)}: clean_db cannot order its DELETEs"
            order += ready
            left -= set(ready)
        _DELETE_ORDERS[tables] = order
    return _DELETE_ORDERS[tables]


@pytest.fixture(scope="session")
def sandbox(services):
    """One sandbox server (a real HTTP process) for the session; faults reset by ``sb``."""
    from sandbox.testing import SandboxProcess

    with SandboxProcess(seed=7) as sb:
        yield sb


@pytest.fixture
def sb(sandbox):
    """The session's sandbox with a clean ledger and default faults."""
    sandbox.reset()
    yield sandbox
    sandbox.reset()


@pytest.fixture
def llm(sb):
    """A real OpenRouter client pointed at the sandbox."""
    from clients.openrouter import OpenRouterClient

    with OpenRouterClient(sb.openrouter_url, sb.chat_key) as client:
        yield client


@pytest.fixture
def evo(sb):
    """A real Evolution API client pointed at the sandbox (short read timeout for hang faults)."""
    import httpx

    from clients.evolution import EvolutionClient

    with EvolutionClient(
        sb.evolution_url, sb.evolution_key, timeout=httpx.Timeout(connect=2.0, read=2.0, write=2.0, pool=2.0)
    ) as client:
        yield client
