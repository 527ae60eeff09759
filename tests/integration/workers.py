"""Waiting in integration tests, and the E-16 fault (worker processes: devtools.services)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from devtools.services import wait_until


def wait_for(
    predicate: Callable[[], object], timeout: float = 30, interval: float = 0.1, message: str = "condition"
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    return wait_until(predicate, timeout=timeout, interval=interval, what=message, error=AssertionError)


def terminate_backend(pid: int) -> None:
    """``pg_terminate_backend(pid)`` from a separate admin connection (the E-16 fault); asserts it hit."""
    import psycopg2

    from campaign.settings import get_settings

    admin = psycopg2.connect(get_settings().database_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert cur.fetchone()[0]
    finally:
        admin.close()


def terminate_own_connection() -> None:
    """pg_terminate_backend of this thread's pooled connection, from a separate admin connection."""
    from campaign.db import db

    terminate_backend(db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])


@contextlib.contextmanager
def quorum_engine_on(
    url: str, sb: Any, log: Path, monkeypatch: Any, *, processes: int = 1, threads: int = 4, **env: str
) -> Iterator[Any]:
    """This process's broker (publisher of the dispatcher and the sweep) and real worker processes,
    all on ``url`` (one or several nodes) with RABBITMQ_QUEUE_TYPE=quorum, providers at the
    sandbox ``sb``, test-speed backoffs (``env`` adds or overrides settings); the broker and the
    environment are put back afterwards. Yields the broker."""
    import dramatiq

    from actors.broker import setup_broker
    from campaign.settings import get_settings, reset_settings
    from devtools.services import sandbox_env, start_worker, stop_worker

    monkeypatch.setenv("RABBITMQ_URL", url)
    monkeypatch.setenv("RABBITMQ_QUEUE_TYPE", "quorum")
    reset_settings()
    previous = dramatiq.get_broker()
    broker = setup_broker(get_settings())
    settings = {
        **sandbox_env(sb),
        "MIN_BACKOFF_SECONDS": "0.05",
        "MAX_BACKOFF_SECONDS": "1",
        "LEASE_SECONDS": "5",
        "SEND_TIMEOUT_SECONDS": "2",
        **env,
    }
    proc = start_worker(processes=processes, threads=threads, extra_env=settings, log_path=log)
    try:
        yield broker
    finally:
        stop_worker(proc)
        broker.close()
        dramatiq.set_broker(previous)
        monkeypatch.undo()
        reset_settings()
