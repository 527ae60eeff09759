"""Waiting in integration tests, and the E-16 fault (worker processes: devtools.services)."""

from __future__ import annotations

from collections.abc import Callable

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
