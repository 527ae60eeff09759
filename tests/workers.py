"""Waiting in integration tests, and the E-16 fault (worker processes: devtools.services)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], object], timeout: float = 30, interval: float = 0.1, message: str = "condition"
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


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
