"""Real ``dramatiq`` worker processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRAMATIQ = str(Path(sys.executable).with_name("dramatiq"))


def start_worker(
    *,
    processes: int = 1,
    threads: int = 4,
    queues: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen:
    """Start ``dramatiq actors`` with the current environment (the test run's database and vhost)."""
    cmd = [DRAMATIQ, "actors", "--processes", str(processes), "--threads", str(threads)]
    if queues:
        cmd += ["--queues", *queues]
    # dramatiq_worker_timeout: how often a consumer wakes to release due delayed messages (ms);
    # dramatiq's 1 s default would make every pacing delay up to a second late.
    env = {**os.environ, "dramatiq_worker_timeout": "100", **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a worker gracefully (SIGTERM to its process group), killing it if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextmanager
def worker(**kwargs) -> Iterator[subprocess.Popen]:
    """A worker process for the duration of the block."""
    proc = start_worker(**kwargs)
    try:
        yield proc
    finally:
        stop_worker(proc)


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


def purge_queues(url: str, queues: tuple[str, ...]) -> None:
    """Empty every given queue and its .DQ/.XQ twins on a fresh connection (missing ones are fine)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for name in queues:
            for q in (name, f"{name}.DQ", f"{name}.XQ"):
                ch = conn.channel()
                try:
                    ch.queue_purge(q)
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # not declared yet
    finally:
        conn.close()


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
