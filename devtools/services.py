"""The ONE throw-away services helper of the test suite, the benchmarks, the fault suite and the demo.

* :class:`Throwaway`: a PostgreSQL database and a RabbitMQ vhost of one unique name (guest gets
  every permission on it), the schema migrated, this process's environment and settings pointed at
  them, both dropped at the end, so runs on one machine never see each other;
* :func:`ensure_database` / :func:`ensure_vhost`: a long-lived one (the demo's ``campaign_demo``),
  created when missing; :func:`probe_postgres` / :func:`probe_rabbitmq` say whether a server answers;
* :func:`sandbox_env`: the settings that wire the engine to a running sandbox
  (``sandbox.testing.SandboxProcess`` starts and stops it);
* :class:`Proc`, :class:`Workers`, :func:`start_worker` / :func:`stop_worker`: real ``dramatiq``
  worker processes (or any engine process) in their own process group, stopped with SIGTERM and
  killed when they hang; :func:`purge_queues` empties queues between runs.

Where the services are: TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/); a vhost is made with ``rabbitmqctl``
(RABBITMQCTL to override the command). Every failure is a ServicesError (campaign.errors) naming the
service.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

from campaign.db import close_db, connect_kwargs, db, init_db
from campaign.errors import ServicesError
from campaign.settings import get_settings, redact_url, reset_settings
from models.schema import migrate

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository: worker processes run from here
ADMIN_PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_BASE_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
DRAMATIQ = str(Path(sys.executable).with_name("dramatiq"))
#: how often a worker's consumer wakes to release due delayed messages (ms); dramatiq's 1 s default
#: would make every pacing delay up to a second late
WORKER_TIMEOUT_MS = "100"
#: the line dramatiq logs once per worker process when it consumes
WORKER_READY = "Worker process is ready for action"
PROBE_TIMEOUT = 3.0


# --------------------------------------------------------------------------------------------
# URLs


def with_database(url: str, name: str) -> str:
    """``url`` with its path (the database name) replaced by ``name``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(name, safe=""), parts.query, parts.fragment))


def with_vhost(url: str, vhost: str) -> str:
    """``url`` with its path (the vhost) replaced by ``vhost``."""
    return with_database(url, vhost)  # the same path rule: one quoted segment


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# PostgreSQL


def admin_connect(
    url: str = ADMIN_PG_URL, *, timeout: float = 5, application_name: str | None = None
) -> psycopg2.extensions.connection:
    """An autocommit connection to ``url`` (a maintenance database, never one of the engine's)."""
    kwargs: dict[str, Any] = {"connect_timeout": max(1, int(timeout))}
    if application_name:
        kwargs["application_name"] = application_name
    try:
        conn = psycopg2.connect(**connect_kwargs(url), **kwargs)
    except psycopg2.Error as exc:
        raise ServicesError(f"PostgreSQL is not reachable at {redact_url(url)}: {exc}".strip()) from exc
    conn.autocommit = True
    return conn


def _admin_statement(admin_url: str, statement: str, name: str) -> None:
    """Run ``statement`` with ``{}`` as the quoted identifier ``name`` on an admin connection."""
    conn = admin_connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL(statement).format(sql.Identifier(name)))
    finally:
        conn.close()


def create_database(name: str, admin_url: str = ADMIN_PG_URL) -> str:
    """``CREATE DATABASE name`` on the server of ``admin_url``; its URL."""
    _admin_statement(admin_url, "CREATE DATABASE {}", name)
    return with_database(admin_url, name)


def drop_database(name: str, admin_url: str = ADMIN_PG_URL) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``: its connections are closed first."""
    _admin_statement(admin_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def probe_postgres(url: str) -> str | None:
    """None when the PostgreSQL server of ``url`` answers (its maintenance database), else why not."""
    try:
        conn = admin_connect(with_database(url, "postgres"), timeout=PROBE_TIMEOUT)
    except ServicesError as exc:
        return _first_line(exc.__cause__ or exc)
    conn.close()
    return None


def ensure_database(url: str, *, application_name: str | None = None) -> bool:
    """Create the database named by ``url`` on its server when it does not exist; True if created."""
    name = unquote(urlsplit(url).path.lstrip("/"))
    try:
        conn = admin_connect(with_database(url, "postgres"), timeout=PROBE_TIMEOUT, application_name=application_name)
    except ServicesError as exc:
        why = _first_line(exc.__cause__ or exc)
        raise ServicesError(f"PostgreSQL at {redact_url(url)} does not answer: {why}") from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is not None:
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created database %s", name)
            return True
    except psycopg2.errors.DuplicateDatabase:
        return False  # another run created it meanwhile
    except psycopg2.Error as exc:
        raise ServicesError(
            f"cannot create database {name!r} on {redact_url(url)}: {_first_line(exc)} "
            "(give the user CREATEDB or create it by hand)"
        ) from None
    finally:
        conn.close()


def migrate_schema() -> list[int]:
    """Bring the schema of the engine's database (``campaign.db.db``, initialised) to the latest
    version; the versions applied."""
    with db.connection_context():
        return migrate(db)


# --------------------------------------------------------------------------------------------
# RabbitMQ


def rabbitmqctl_command() -> list[str]:
    """The rabbitmqctl command line (env RABBITMQCTL, default ``rabbitmqctl``)."""
    return shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))


def rabbitmqctl(*args: str, command: Sequence[str] | None = None, timeout: float = 60) -> str:
    """Run rabbitmqctl; its output, or a ServicesError naming the command."""
    cmd = list(command or rabbitmqctl_command())
    try:
        done = subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ServicesError(f"{cmd[0]} not found: it creates the run's vhost (set RABBITMQCTL)") from exc
    except subprocess.CalledProcessError as exc:
        raise ServicesError(f"rabbitmqctl {' '.join(args)} failed: {(exc.stderr or exc.stdout).strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ServicesError(f"rabbitmqctl {' '.join(args)} did not answer in {timeout:.0f} s") from exc
    return done.stdout


def create_vhost(
    name: str,
    base_url: str = RABBIT_BASE_URL,
    *,
    command: Sequence[str] | None = None,
    attempts: int = 1,
    exist_ok: bool = False,
) -> str:
    """``add_vhost name`` and every permission on it for the user of ``base_url``; the vhost's URL.

    ``attempts`` > 1 retries ``add_vhost`` every 2 s (another job may have RabbitMQ stopped a moment).
    """
    for attempt in range(attempts):
        try:
            rabbitmqctl("add_vhost", name, command=command)
            break
        except ServicesError as exc:
            if exist_ok and "already exists" in str(exc):
                break
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    user = unquote(urlsplit(base_url).username or "guest")
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*", command=command)
    return with_vhost(base_url, name)


def delete_vhost(name: str, *, command: Sequence[str] | None = None) -> None:
    """``delete_vhost name`` (its queues and messages go with it)."""
    rabbitmqctl("delete_vhost", name, command=command)


def probe_rabbitmq(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when RabbitMQ accepts a connection to ``url``, else why not."""
    import pika
    from pika.exceptions import AMQPError

    logging.getLogger("pika").setLevel(logging.CRITICAL)  # a refused connection logs a page otherwise
    try:
        params = pika.URLParameters(url)
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.connection_attempts = 1
        conn = pika.BlockingConnection(params)
    except (AMQPError, OSError, ValueError) as exc:
        return _first_line(exc) if str(exc).strip() else type(exc).__name__
    conn.close()
    return None


def _create_vhost_with_management_api(url: str, vhost: str) -> str | None:
    """Create ``vhost`` through the management plugin (port 15672); None on success, else why not."""
    import httpx

    parts = urlsplit(url)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    base = f"http://{parts.hostname or '127.0.0.1'}:15672/api"
    try:
        with httpx.Client(auth=(user, password), timeout=PROBE_TIMEOUT, trust_env=False) as http:
            r = http.put(f"{base}/vhosts/{quote(vhost, safe='')}")
            if r.status_code not in (201, 204):
                return f"management API PUT /api/vhosts: HTTP {r.status_code}"
            r = http.put(
                f"{base}/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                json={"configure": ".*", "write": ".*", "read": ".*"},
            )
            if r.status_code not in (201, 204):
                return f"management API PUT /api/permissions: HTTP {r.status_code}"
    except httpx.HTTPError as exc:
        return f"management API unreachable ({type(exc).__name__})"
    return None


def _create_vhost_with_rabbitmqctl(url: str, vhost: str) -> str | None:
    """Create ``vhost`` with ``rabbitmqctl`` (works on the broker's own machine); None on success, else why not."""
    command = rabbitmqctl_command()
    if shutil.which(command[0]) is None:
        return f"{command[0]} not found"
    try:
        create_vhost(vhost, url, command=command, exist_ok=True)
    except ServicesError as exc:
        return _first_line(exc)
    return None


def ensure_vhost(url: str, vhost: str) -> str:
    """The URL of ``vhost`` on the RabbitMQ of ``url``, creating the vhost when it is missing
    (through the management API, else rabbitmqctl)."""
    target = with_vhost(url, vhost)
    if probe_rabbitmq(target) is None:
        return target
    why = []
    for create in (_create_vhost_with_management_api, _create_vhost_with_rabbitmqctl):
        error = create(url, vhost)
        if error is None and probe_rabbitmq(target) is None:
            log.info("created RabbitMQ vhost %s", vhost)
            return target
        why.append(error or "created, but still not reachable")
    raise ServicesError(
        f"RabbitMQ vhost {vhost!r} does not exist and could not be created ({'; '.join(why)}); "
        f"create it (rabbitmqctl add_vhost {vhost})"
    )


def purge_queues(url: str, queues: Iterable[str]) -> None:
    """Empty every given queue and its .DQ/.XQ twins on a connection of its own (missing ones are fine)."""
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


# --------------------------------------------------------------------------------------------
# one run's own database + vhost


class Throwaway:
    """A PostgreSQL database and a RabbitMQ vhost of one unique name, created and dropped here.

    ``with Throwaway("ce_test") as t:`` creates both, migrates the schema and points this process's
    environment (DATABASE_URL, RABBITMQ_URL, CAMPAIGN_BROKER) and settings at them; leaving the
    block restores the environment and drops both, also after a failure half way.
    """

    def __init__(
        self,
        prefix: str = "ce",
        *,
        name: str | None = None,
        admin_pg_url: str = ADMIN_PG_URL,
        rabbit_base_url: str = RABBIT_BASE_URL,
        rabbitmqctl: Sequence[str] | None = None,
        vhost_attempts: int = 1,
    ) -> None:
        self.name = name or f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.admin_pg_url = admin_pg_url
        self.rabbit_base_url = rabbit_base_url
        self.rabbitmqctl = list(rabbitmqctl or rabbitmqctl_command())
        self.vhost_attempts = vhost_attempts
        self.created_db = False
        self.created_vhost = False
        self._saved_env: dict[str, str | None] = {}

    @property
    def database_url(self) -> str:
        """DATABASE_URL of the run's database."""
        return with_database(self.admin_pg_url, self.name)

    @property
    def rabbitmq_url(self) -> str:
        """RABBITMQ_URL of the run's vhost."""
        return with_vhost(self.rabbit_base_url, self.name)

    @property
    def env(self) -> dict[str, str]:
        """The engine's settings for this run's services."""
        return {"DATABASE_URL": self.database_url, "RABBITMQ_URL": self.rabbitmq_url, "CAMPAIGN_BROKER": "rabbitmq"}

    def admin(self, application_name: str | None = None) -> psycopg2.extensions.connection:
        """A fresh autocommit connection to the admin database (never one of the engine's)."""
        return admin_connect(self.admin_pg_url, application_name=application_name)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run rabbitmqctl with this run's command line."""
        return rabbitmqctl(*args, command=self.rabbitmqctl, timeout=timeout)

    def create(self) -> None:
        """Create the database (empty) and the vhost (every permission for the URL's user)."""
        create_database(self.name, self.admin_pg_url)
        self.created_db = True
        create_vhost(self.name, self.rabbit_base_url, command=self.rabbitmqctl, attempts=self.vhost_attempts)
        self.created_vhost = True

    def drop(self) -> None:
        """Drop the database and delete the vhost (whichever of them was created); both are tried."""
        errors = []
        if self.created_db:
            try:
                drop_database(self.name, self.admin_pg_url)
                self.created_db = False
            except ServicesError as exc:
                errors.append(str(exc))
        if self.created_vhost:
            try:
                delete_vhost(self.name, command=self.rabbitmqctl)
                self.created_vhost = False
            except ServicesError as exc:
                errors.append(str(exc))
        if errors:
            raise ServicesError(f"{self.name} not dropped: " + "; ".join(errors))

    def extra_database(self) -> str:
        """One more empty database (no schema) named after this run; its URL (drop it with :meth:`drop_extra`)."""
        return create_database(f"{self.name}_{uuid.uuid4().hex[:6]}", self.admin_pg_url)

    def drop_extra(self, url: str) -> None:
        """Drop a database made by :meth:`extra_database`."""
        drop_database(unquote(urlsplit(url).path.lstrip("/")), self.admin_pg_url)

    def set_env(self, env: Mapping[str, str]) -> None:
        """Set variables in this process's environment (restored by :meth:`restore_env`) and re-read the settings."""
        for k, v in env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        reset_settings()

    def restore_env(self) -> None:
        """Put back every variable :meth:`set_env` changed."""
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        reset_settings()

    def activate(self) -> None:
        """Point the environment and the engine's pool at the run's services and migrate the schema."""
        self.set_env(self.env)
        init_db(get_settings())
        migrate_schema()

    def __enter__(self) -> Throwaway:
        try:
            self.create()
            self.activate()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            close_db()
        except Exception:
            log.debug("close_db failed", exc_info=True)
        self.restore_env()
        self.drop()


# --------------------------------------------------------------------------------------------
# the sandbox and engine processes


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
    error: type[Exception] = TimeoutError,
) -> Any:
    """Poll ``predicate`` until truthy (its value); ``error`` naming ``what`` after ``timeout`` seconds
    (``on_timeout`` adds a tail, e.g. a worker log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise error(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def sandbox_env(sb: Any) -> dict[str, str]:
    """The settings that send the engine's provider calls to the sandbox ``sb`` (a SandboxProcess)."""
    return {
        "OPENROUTER_BASE_URL": sb.openrouter_url,
        "OPENROUTER_API_KEY": sb.chat_key,
        "EVOLUTION_API_URL": sb.evolution_url,
        "EVOLUTION_API_KEY": sb.evolution_key,
    }


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment for a worker process, plus ``extra``."""
    return {**os.environ, "dramatiq_worker_timeout": WORKER_TIMEOUT_MS, **(extra or {}), "PYTHONUNBUFFERED": "1"}


def dramatiq_command(
    modules: Sequence[str] = ("actors",), *, processes: int = 1, threads: int = 4, queues: Sequence[str] = ()
) -> list[str]:
    """The ``dramatiq`` command line of a worker."""
    cmd = [DRAMATIQ, *modules, "--processes", str(processes), "--threads", str(threads)]
    if queues:
        cmd += ["--queues", *queues]
    return cmd


class Proc:
    """One process started from the repository in its own process group (a kill takes its children too)."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_path: Path | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env)
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None
        self.starts: list[float] = []
        self.expected_exit = False

    def start(self) -> Self:
        """Start (or restart) the process, appending its output to its log (if any)."""
        out: IO[bytes] | int = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
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
            if not isinstance(out, int):
                out.close()
        self.starts.append(time.time())
        self.expected_exit = False
        log.info("%s started (pid %s)", self.name, self.popen.pid)
        return self

    @property
    def pid(self) -> int:
        """The process id (of the group's leader)."""
        if self.popen is None:
            raise ServicesError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.popen is not None and self.popen.poll() is None

    def poll(self) -> int | None:
        """Its exit code, None while it runs."""
        return None if self.popen is None else self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; its exit code (``subprocess.TimeoutExpired`` after ``timeout``)."""
        if self.popen is None:
            raise ServicesError(f"{self.name} was never started")
        return self.popen.wait(timeout)

    def pids(self) -> set[int]:
        """The process and every process of its group (dramatiq forks its worker processes)."""
        if not self.alive:
            return set()
        out = {self.pid}
        try:
            children = subprocess.run(["pgrep", "-g", str(self.pid)], capture_output=True, text=True, timeout=5).stdout
            out.update(int(p) for p in children.split())
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return out

    def log_tail(self, n: int = 3000) -> str:
        """The end of its log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, marker: str, count: int = 1, timeout: float = 60) -> None:
        """Wait until ``marker`` stands ``count`` times in the log; stop it and raise when it exits or times out."""
        if self.log_path is None:
            raise ServicesError(f"{self.name}: readiness is read from a log, and it has none")
        deadline = time.monotonic() + timeout
        while self.log_path.read_text(errors="replace").count(marker) < count:
            if not self.alive or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ServicesError(f"{' '.join(self.cmd[:2])} did not start; log tail:\n{tail}")
            time.sleep(0.1)

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

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the group (graceful), SIGKILL after ``timeout``."""
        self.expected_exit = True
        if not self.alive:
            return
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        return self.start() if self.popen is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Workers(Proc):
    """``dramatiq MODULES`` on the current environment plus ``env``; ``start()`` returns once every
    worker process said it is ready (``ready_timeout``; 0 returns at once)."""

    def __init__(
        self,
        modules: Sequence[str] = ("actors",),
        *,
        processes: int = 1,
        threads: int = 4,
        queues: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 60,
        name: str = "workers",
    ) -> None:
        cmd = dramatiq_command(modules, processes=processes, threads=threads, queues=queues)
        super().__init__(name, cmd, worker_env(env), log_path)
        self.modules = list(modules)
        self.processes = processes
        self.ready_timeout = ready_timeout

    def start(self) -> Self:
        """Start the workers (and wait until they are ready when ``ready_timeout`` is set)."""
        if self.ready_timeout and self.log_path is not None:
            self.log_path.write_bytes(b"")  # count this start's ready lines only
        super().start()
        if self.ready_timeout and self.log_path is not None:
            self.wait_ready(WORKER_READY, self.processes, self.ready_timeout)
        return self


def start_worker(
    *,
    processes: int = 1,
    threads: int = 4,
    queues: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> Workers:
    """Start ``dramatiq actors`` with the current environment (the run's database and vhost); no wait."""
    return Workers(
        processes=processes, threads=threads, queues=queues, env=extra_env, log_path=log_path, ready_timeout=0
    ).start()


def stop_worker(proc: Proc | subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process gracefully (SIGTERM to its process group), killing it if it hangs."""
    if isinstance(proc, Proc):
        proc.stop(timeout)
        return
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
