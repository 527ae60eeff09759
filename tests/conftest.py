"""Test harness on the REAL services (DESIGN #7).

Each pytest session gets its own PostgreSQL database and its own RabbitMQ vhost, created here
and dropped at the end, so concurrent runs and leftovers never see each other. A missing
service is an error, never a skip: in CI it must fail the run.

Where the services are: TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
and TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/); the vhost is made with
``rabbitmqctl`` (RABBITMQCTL to override the command).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
import pytest

ADMIN_PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_BASE_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBITMQCTL = shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))

RUN_ID = f"ce_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + path, parts.query, parts.fragment))


def _admin_pg():
    try:
        conn = psycopg2.connect(ADMIN_PG_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {ADMIN_PG_URL}: {exc}".strip()) from exc
    conn.autocommit = True
    return conn


def _rabbitmqctl(*args: str) -> None:
    try:
        subprocess.run([*RABBITMQCTL, *args], check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{RABBITMQCTL[0]} not found: the tests need it to create their vhost") from exc
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {exc.stderr.strip()}") from exc


@pytest.fixture(scope="session", autouse=True)
def services() -> Iterator[dict[str, str]]:
    """Create this run's database and vhost, point the settings at them, drop them afterwards."""
    admin = _admin_pg()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{RUN_ID}"')
    _rabbitmqctl("add_vhost", RUN_ID)
    _rabbitmqctl("set_permissions", "-p", RUN_ID, urlsplit(RABBIT_BASE_URL).username or "guest", ".*", ".*", ".*")
    env = {
        "DATABASE_URL": _with_path(ADMIN_PG_URL, RUN_ID),
        "RABBITMQ_URL": _with_path(RABBIT_BASE_URL, quote(RUN_ID, safe="")),
        "CAMPAIGN_BROKER": "rabbitmq",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from campaign.settings import get_settings, reset_settings

    reset_settings()
    from campaign.db import close_db, db, init_db
    from models.schema import migrate

    init_db(get_settings())
    with db.connection_context():
        migrate(db)
    try:
        yield env
    finally:
        close_db()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{RUN_ID}" WITH (FORCE)')
        admin.close()
        _rabbitmqctl("delete_vhost", RUN_ID)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty extra database (no schema) for migration tests; dropped afterwards."""
    name = f"{RUN_ID}_{uuid.uuid4().hex[:6]}"
    admin = _admin_pg()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_path(ADMIN_PG_URL, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


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
        # no RESTART IDENTITY: a stale broker message of an earlier test must never meet a reused id
        db.execute_sql(f"TRUNCATE {', '.join(tables)} CASCADE")
    with db.connection_context():
        yield


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
