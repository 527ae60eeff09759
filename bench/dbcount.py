"""Bench-only instrumentation: count real DB round trips and broker publishes in a process.

Loaded into a worker by naming it on the command line after the engine's actors
(``dramatiq actors bench.dbcount``); nothing of the engine changes. Every psycopg2 connection
opened afterwards gets a cursor class that counts each ``execute`` (one round trip: peewee runs
in autocommit, BEGIN/COMMIT are statements of their own) and the time it waited, keyed by the
actor the thread is running and the statement's first words. A middleware placed first in the
broker's list names the actor (so the rate-limit statements count too) and counts publishes.
Every 0.25 s the totals are written to ``$BENCH_DBCOUNT_DIR/<pid>.json``.

No server setting is touched (pg_stat_statements would need a PostgreSQL restart).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

log = logging.getLogger("bench.dbcount")

_local = threading.local()
_lock = threading.Lock()
_stmts: dict[str, list[float]] = {}
_publishes: dict[str, int] = {}
_processed: dict[str, int] = {}
#: write transactions committed, per actor: the commits that wait for the WAL flush (fsync). A
#: transaction (BEGIN .. COMMIT, or one statement in autocommit) counts when it wrote something:
#: INSERT / UPDATE / DELETE (also inside WITH) or a row lock (SELECT ... FOR UPDATE / SHARE).
_commits: dict[str, int] = {}
_async_commits: dict[str, int] = {}  # of those, the ones with synchronous_commit off (no WAL flush wait)
_txn: dict[int, list[bool]] = {}  # id(connection) -> [inside BEGIN, wrote, asynchronous]
_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE)\b|\bFOR (NO KEY )?(UPDATE|SHARE)\b|\bFOR KEY SHARE\b", re.I)
_installed = False
_capture: list[tuple[Any, Any]] | None = None  # (query, vars) of every statement while capturing
_dumper: threading.Thread | None = None
_SPACES = re.compile(r"\s+")


def set_actor(name: str | None) -> None:
    """Name what the current thread is doing (its statements are counted under it)."""
    _local.actor = name


_EXECUTE = re.compile(r"^\s*(?:SET LOCAL synchronous_commit TO off;\s*)?EXECUTE (ce_\w+)")
_by_name: dict[str, str] = {}  # prepared statement name -> the SQL it runs (campaign.db.prepared)


def _statement(query: Any) -> str:
    """The SQL a query runs: a hot statement's EXECUTE is shown (and judged) as the statement it
    executes, so the counts per statement read the same whether it ran prepared or not."""
    if isinstance(query, bytes):
        query = query.decode(errors="replace")
    text = str(query)
    match = _EXECUTE.match(text)
    if match is None:
        return text
    name = match.group(1)
    if name not in _by_name:
        from campaign import db as dbmod

        _by_name.update({hot.name: sql for sql, hot in list(dbmod._hot.items()) if hot is not None})
    return _by_name.get(name, text)


_labels: dict[str, str] = {}  # statement text -> label (the engine's statements repeat: cached)
_writes: dict[str, bool] = {}  # statement text -> whether it writes


def _label(query: Any) -> str:
    text = _statement(query)
    label = _labels.get(text)
    if label is None:
        label = _SPACES.sub(" ", text[:400]).strip()[:90]
        if len(_labels) < 10_000:  # a text with its parameters inlined repeats less: bounded
            _labels[text] = label
    return label


def _writes_something(text: str) -> bool:
    wrote = _writes.get(text)
    if wrote is None:
        wrote = bool(_WRITE.search(text))
        if len(_writes) < 10_000:
            _writes[text] = wrote
    return wrote


def _track_commit(connection: Any, query: Any) -> None:
    """Follow the connection's transaction; count a write transaction when it commits."""
    sent = query.decode(errors="replace") if isinstance(query, bytes) else str(query)
    text = _statement(sent).lstrip()
    word = text[:8].split(None, 1)[0].upper() if text else ""
    # from what was sent: the synchronous and asynchronous variants of a statement share one
    # prepared statement (its name), so the mapped text cannot tell them apart
    asynchronous = "synchronous_commit TO off" in sent
    actor = getattr(_local, "actor", None) or "other"
    with _lock:
        state = _txn.setdefault(id(connection), [False, False, False])
        if word == "BEGIN":
            state[:] = [True, False, False]
            return
        if word in ("PREPARE", "DEALLOCATE"):  # the plan of a hot statement: it writes nothing
            return
        if word in ("COMMIT", "END", "ROLLBACK"):
            if word != "ROLLBACK" and state[0] and state[1]:
                _count_commit(actor, state[2])
            state[:] = [False, False, False]
            return
        wrote = _writes_something(text)
        if state[0]:
            state[1] = state[1] or wrote
            state[2] = state[2] or asynchronous
        elif wrote:  # autocommit: the statement (or the statements sent together) is its own transaction
            _count_commit(actor, asynchronous)


def _count_commit(actor: str, asynchronous: bool) -> None:
    _commits[actor] = _commits.get(actor, 0) + 1
    if asynchronous:
        _async_commits[actor] = _async_commits.get(actor, 0) + 1


def _record(query: Any, seconds: float, n: int = 1) -> None:
    key = f"{getattr(_local, 'actor', None) or 'other'} | {_label(query)}"
    with _lock:
        cur = _stmts.get(key)
        if cur is None:
            _stmts[key] = [n, seconds]
        else:
            cur[0] += n
            cur[1] += seconds


class CountingCursor(psycopg2.extensions.cursor):
    """A psycopg2 cursor that counts its round trips."""

    def execute(self, query: Any, vars: Any = None) -> Any:
        if _capture is not None:
            _capture.append((query, vars))
        started = time.perf_counter()
        try:
            return super().execute(query, vars)
        finally:
            _record(query, time.perf_counter() - started)
            _track_commit(self.connection, query)

    def executemany(self, query: Any, vars_list: Any) -> Any:
        vars_list = list(vars_list)
        started = time.perf_counter()
        try:
            return super().executemany(query, vars_list)
        finally:
            _record(query, time.perf_counter() - started, len(vars_list))


def install() -> None:
    """Make every psycopg2 connection opened from now on (peewee's pool included) count."""
    global _installed
    if _installed:
        return
    import peewee

    real_connect = psycopg2.connect

    def counting_connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cursor_factory", CountingCursor)
        return real_connect(*args, **kwargs)

    peewee.psycopg2.connect = counting_connect  # type: ignore[attr-defined]
    psycopg2.connect = counting_connect
    _installed = True


def start_capture() -> None:
    """Keep every statement (and its parameters) executed from now on, until :func:`stop_capture`."""
    global _capture
    _capture = []


def stop_capture() -> list[tuple[Any, Any]]:
    """The statements kept since :func:`start_capture`."""
    global _capture
    out, _capture = _capture or [], None
    return out


def snapshot() -> dict[str, Any]:
    """The process's totals so far."""
    with _lock:
        return {
            "pid": os.getpid(),
            "stmts": {k: list(v) for k, v in _stmts.items()},
            "publishes": dict(_publishes),
            "processed": dict(_processed),
            "commits": dict(_commits),
            "async_commits": dict(_async_commits),
        }


def dump(directory: str | os.PathLike[str]) -> None:
    """Write the totals to ``directory/<pid>.json`` (atomically)."""
    path = Path(directory) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot()))
    tmp.replace(path)


def _dump_loop(directory: str) -> None:
    while True:
        try:
            dump(directory)
        except OSError:
            log.warning("could not write counters to %s", directory, exc_info=True)
        time.sleep(0.25)


def _start_dumper() -> None:
    global _dumper
    directory = os.environ.get("BENCH_DBCOUNT_DIR")
    if not directory or (_dumper is not None and _dumper.is_alive()):
        return
    _dumper = threading.Thread(target=_dump_loop, args=(directory,), name="bench-dbcount", daemon=True)
    _dumper.start()


def _register_middleware() -> None:
    import dramatiq
    from dramatiq.middleware import Middleware

    class CountRoundTrips(Middleware):
        """Names the actor of each worker thread; counts deliveries and publishes."""

        def before_worker_boot(self, broker: Any, worker: Any) -> None:
            _start_dumper()

        def before_process_message(self, broker: Any, message: Any) -> None:
            set_actor(message.actor_name)
            with _lock:
                _processed[message.actor_name] = _processed.get(message.actor_name, 0) + 1

        def after_process_message(
            self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
        ) -> None:
            pass  # the actor name stays until the next message: DbConnection's release runs after this

        def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
            src = getattr(_local, "actor", None) or "other"
            key = f"{src} -> {message.actor_name}{' (delay queue)' if delay is not None else ''}"
            with _lock:
                _publishes[key] = _publishes.get(key, 0) + 1

    broker = dramatiq.get_broker()
    first = type(broker.middleware[0]) if broker.middleware else None
    broker.add_middleware(CountRoundTrips(), before=first)


install()
if os.environ.get("BENCH_DBCOUNT_DIR"):
    _register_middleware()
