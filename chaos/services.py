"""Throw-away database + vhost per suite run, and the processes the suite starts, supervises and kills."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: application_name prefix of the worker processes' pooled connections (db.init_db's default)
WORKER_APP_PREFIX = "campaign-engine:"


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + path, parts.query, parts.fragment))


@dataclass
class Services:
    """This run's own PostgreSQL database and RabbitMQ vhost (same name), created and dropped here."""

    name: str
    admin_pg_url: str
    rabbit_base_url: str
    rabbitmqctl: list[str]
    created_db: bool = False
    created_vhost: bool = False
    _probe: psycopg2.extensions.connection | None = field(default=None, repr=False)

    @property
    def database_url(self) -> str:
        """DATABASE_URL of the run's database."""
        return _with_path(self.admin_pg_url, self.name)

    @property
    def rabbitmq_url(self) -> str:
        """RABBITMQ_URL of the run's vhost."""
        return _with_path(self.rabbit_base_url, quote(self.name, safe=""))

    def admin(self) -> psycopg2.extensions.connection:
        """A fresh autocommit connection to the admin database (never one of the engine's)."""
        conn = psycopg2.connect(self.admin_pg_url, connect_timeout=5, application_name="campaign-chaos-admin")
        conn.autocommit = True
        return conn

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run rabbitmqctl; raise RuntimeError naming the command on failure."""
        try:
            done = subprocess.run(
                [*self.rabbitmqctl, *args], check=True, capture_output=True, text=True, timeout=timeout
            )
        except FileNotFoundError as exc:
            raise RuntimeError(f"{self.rabbitmqctl[0]} not found (set RABBITMQCTL)") from exc
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {exc.stderr.strip()}") from exc
        return done.stdout

    def create(self) -> None:
        """Create the database (with the schema) and the vhost."""
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.name}"')
            self.created_db = True
        finally:
            conn.close()
        self.ctl("add_vhost", self.name)
        self.created_vhost = True
        self.ctl(
            "set_permissions", "-p", self.name, urlsplit(self.rabbit_base_url).username or "guest", ".*", ".*", ".*"
        )

    def drop(self) -> None:
        """Drop the database and delete the vhost (whatever of them was created)."""
        self.close()
        if self.created_db:
            conn = self.admin()
            try:
                with conn.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                conn.close()
            self.created_db = False
        if self.created_vhost:
            try:
                self.ctl("delete_vhost", self.name)
            except RuntimeError as exc:
                log.warning("vhost %s not deleted: %s", self.name, exc)
            self.created_vhost = False

    # -- faults on the services ---------------------------------------------------------------

    def restart_rabbitmq(self, outage_s: float) -> dict[str, float]:
        """``rabbitmqctl stop_app``, wait ``outage_s``, ``start_app``; returns the moments (epoch s)."""
        t0 = time.time()
        try:
            self.ctl("stop_app", timeout=30)
            stopped = time.time()
            time.sleep(outage_s)
        finally:
            # whatever happened, RabbitMQ must come back: other runs share it
            self.ctl("start_app", timeout=60)
        started = time.time()
        log.warning(
            "RabbitMQ restarted: stop_app at +0.0 s, down %.1f s, start_app done after %.1f s",
            started - stopped,
            started - t0,
        )
        return {"t": t0, "stopped": stopped, "started": started}

    def terminate_worker_backends(self) -> int:
        """``pg_terminate_backend`` every worker connection of THIS run's database (never our own)."""
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                               WHERE datname = %s AND pid <> pg_backend_pid() AND application_name LIKE %s""",
                    (self.name, WORKER_APP_PREFIX + "%"),
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def mid_send_worker_pids(self) -> set[int]:
        """Pids of worker processes whose connection last claimed a part ``sending`` (so: in the HTTP call).

        Polled every few ms by the injector: one kept connection, not a new one per call.
        """
        for attempt in range(2):
            try:
                if self._probe is None or self._probe.closed:
                    self._probe = self.admin()
                with self._probe.cursor() as cur:
                    cur.execute(
                        """SELECT application_name FROM pg_stat_activity
                                   WHERE datname = %s AND application_name LIKE %s AND state = 'idle'
                                     AND query ILIKE %s""",
                        (self.name, WORKER_APP_PREFIX + "%", "%UPDATE message_parts SET status = 'sending'%"),
                    )
                    rows = cur.fetchall()
                break
            except psycopg2.Error:
                if self._probe is not None:
                    self._probe.close()
                self._probe = None
                if attempt:
                    raise
        pids = set()
        for (app,) in rows:
            try:
                pids.add(int(app.split(":", 1)[1]))
            except (IndexError, ValueError):
                continue
        return pids

    def close(self) -> None:
        """Close the polling connection."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None


@dataclass
class Proc:
    """One supervised process (its own process group, so a kill takes its children too)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)
    expected_exit: bool = False

    def start(self) -> None:
        """Start (or restart) the process, appending to its log."""
        out = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        self.starts.append(time.time())
        self.expected_exit = False
        log.info("%s started (pid %s)", self.name, self.popen.pid)

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> set[int]:
        """The process and its children (dramatiq forks its worker processes)."""
        if not self.alive:
            return set()
        assert self.popen is not None  # alive
        pid = self.popen.pid
        out = {pid}
        try:
            children = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True, timeout=5).stdout
            out.update(int(p) for p in children.split())
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return out

    def kill9(self) -> None:
        """SIGKILL the whole process group (no shutdown hooks run: a crash)."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        log.warning("%s killed with SIGKILL (pid %s)", self.name, self.popen.pid)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the group, SIGKILL after ``timeout``."""
        self.expected_exit = True
        if not self.alive:
            return
        assert self.popen is not None  # alive
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        except ProcessLookupError:
            pass


class Supervisor:
    """Restarts any supervised process that died (what systemd/compose would do in production)."""

    def __init__(self, procs: list[Proc], restart_delay: float = 1.0) -> None:
        self.procs = procs
        self.restart_delay = restart_delay
        self.restarts: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="chaos-supervisor", daemon=True)

    def start(self) -> None:
        """Start every process and the watch loop."""
        for p in self.procs:
            p.start()
        self._thread.start()

    def _loop(self) -> None:
        dead_since: dict[str, float] = {}
        while not self._stop.wait(0.2):
            with self._lock:
                for p in self.procs:
                    if p.popen is None or p.alive or p.expected_exit:
                        continue
                    # restart after a short pause (as a process manager would), without holding
                    # the lock meanwhile: the injector may want to kill another one
                    if p.name not in dead_since:
                        dead_since[p.name] = time.time()
                        log.warning(
                            "%s exited (code %s): restarting in %.1f s", p.name, p.popen.returncode, self.restart_delay
                        )
                        continue
                    if time.time() - dead_since[p.name] < self.restart_delay:
                        continue
                    del dead_since[p.name]
                    p.start()
                    self.restarts.append((p.name, time.time()))

    def kill9(self, proc: Proc) -> None:
        """Kill a supervised process; the loop restarts it."""
        with self._lock:
            proc.kill9()

    def stop(self) -> None:
        """Stop the loop, then every process."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for p in self.procs:
                p.stop()


def dramatiq_cmd(threads: int) -> list[str]:
    """The worker command line (``dramatiq actors``), one process per group."""
    return [str(Path(sys.executable).with_name("dramatiq")), "actors", "--processes", "1", "--threads", str(threads)]


def default_rabbitmqctl() -> list[str]:
    """The rabbitmqctl command (env RABBITMQCTL, as the tests use)."""
    return shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))
