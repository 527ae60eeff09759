"""Database handle: ``db`` is a proxy bound once per process by ``init_db(settings)``.

Connections come from a small pool (playhouse ``PooledPostgresqlExtDatabase``): a unit of
work (one actor message, one scheduler job, one CLI command) checks a connection out with
``db.connection_context()`` / ``db.connect(reuse_if_open=True)`` and returns it with
``db.close()``. A connection that broke (server restart, ``pg_terminate_backend``, E-16) is
detected by the pool (``conn.closed``) and replaced instead of being handed out again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import peewee
from peewee import DatabaseProxy
from playhouse.postgres_ext import PooledPostgresqlExtDatabase

from campaign.errors import ConfigError
from campaign.settings import Settings, redact_url

log = logging.getLogger(__name__)

db = DatabaseProxy()

__all__ = ["db", "init_db", "connect_kwargs", "close_db", "prepared", "ASYNC_COMMIT"]

#: Sent before a statement in the same round trip (one simple-protocol query: one implicit
#: transaction), this makes THAT statement's commit asynchronous (see campaign.sql.async_commit
#: for when that is allowed).
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off;\n"


# -- hot statements: parsed and planned once per connection (issue 20, T-PERF-1) -----------------
#
# psycopg2 sends every statement as text with its parameters inlined, so PostgreSQL parses and
# plans it afresh each time. For the chain's big statements (the send claim joins six tables and
# carries three data-modifying CTEs) planning costs more than running: ~1 ms against ~0.3 ms on
# this machine's PostgreSQL, which shares the CPU with the workers. A statement marked with
# prepared() is sent once per pooled connection as PREPARE (server-side; the plan is kept for the
# session: one generic plan, planned at its first EXECUTE — see plan_cache_mode below), and
# afterwards as EXECUTE name(parameters): one round trip, as before, and no parse or plan. The
# caller's SQL text and parameters do not change; anyone watching execute_sql sees the statement
# it asked for. Only outside a transaction (an explicit transaction keeps its statements as sent).

_PARAM = re.compile(r"%\((\w+)\)s|%s|%%")


@dataclass(frozen=True)
class _Hot:
    name: str
    prepare_sql: str  # PREPARE name AS <body with $n>; '%%' kept: psycopg2 turns it into '%'
    execute_sql: str  # [ASYNC_COMMIT] EXECUTE name(%(a)s, %s, ...): psycopg2 inlines the parameters


_hot: dict[str, _Hot | None] = {}  # SQL text -> how to run it prepared (None: could not be prepared)
_hot_lock = threading.Lock()


def prepared(sql: str, label: str = "stmt") -> str:
    """Mark ``sql`` (pyformat ``%(name)s`` or ``%s`` parameters, optionally prefixed with
    ASYNC_COMMIT) as a hot statement run as a server-side prepared statement; returns it unchanged.
    ``label`` names it where operators see it (``pg_stat_activity``: ``EXECUTE ce_<label>_<hash>(…)``)."""
    if sql in _hot:
        return sql
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", label):
        raise ValueError(f"prepared statement label {label!r}: lower-case letters, digits and _ only")
    prefix, body = (ASYNC_COMMIT, sql[len(ASYNC_COMMIT) :]) if sql.startswith(ASYNC_COMMIT) else ("", sql)
    names: list[str] = []
    args: list[str] = []
    positional = 0

    def number(match: re.Match) -> str:
        nonlocal positional
        token = match.group(0)
        if token == "%%":
            return token
        if match.group(1) is not None:
            if match.group(1) not in names:
                names.append(match.group(1))
                args.append(token)
            return f"${names.index(match.group(1)) + 1}"
        positional += 1
        args.append("%s")
        return f"${positional}"

    numbered = _PARAM.sub(number, body)
    if names and positional:
        raise ValueError("a prepared statement uses named or positional parameters, not both")
    name = f"ce_{label}_{hashlib.sha1(body.encode()).hexdigest()[:12]}"
    call = f"EXECUTE {name}({', '.join(args)})" if args else f"EXECUTE {name}"
    with _hot_lock:
        _hot[sql] = _Hot(name, f"PREPARE {name} AS {numbered}", prefix + call)
    return sql


def prepared_name(sql: str) -> str | None:
    """The server-side name of a hot statement (what ``pg_stat_activity`` shows it as: ``EXECUTE name(...)``)."""
    hot = _hot.get(sql)
    return hot.name if hot is not None else None


def connect_kwargs(url: str) -> dict:
    """Split a ``postgresql://user:pass@host:port/dbname`` URL into psycopg2 keyword arguments."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"DATABASE_URL {redact_url(url)!r} must start with postgresql://")
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ConfigError(f"DATABASE_URL {redact_url(url)!r} names no database")
    # libpq's form for a Unix-socket directory, ``postgresql://user@/dbname?host=/run/dir`` (the
    # embedded PostgreSQL of the demo listens on a socket only), wins over the URL's host part
    socket_dir = (parse_qs(parts.query).get("host") or [""])[-1]
    kwargs: dict = {"database": name, "host": socket_dir or parts.hostname or "127.0.0.1", "port": parts.port or 5432}
    if parts.username:
        kwargs["user"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    return kwargs


class ResilientPooledDatabase(PooledPostgresqlExtDatabase):
    """The pool, plus: a statement run OUTSIDE a transaction whose connection turns out to be dead
    (``pg_terminate_backend``, a server restart: E-16) runs once more on a fresh connection.

    Without this, the first statement after a termination fails, so a worker that has just
    sent a WhatsApp part cannot record it (the part becomes ``in_doubt`` although its outcome
    was known) and cannot release its inbox's send slot (the inbox stalls until the lease
    expires). Running a statement twice is safe here because every state change is a
    conditional UPDATE (DESIGN #2): a second run finds nothing left to do. Inside a transaction
    nothing is retried: the whole transaction is gone, the caller's error handling owns it.
    """

    #: the hot statements each open connection has prepared (a connection replaced forgets them)
    _prepared_on: weakref.WeakKeyDictionary[Any, set[str]]

    def execute_sql(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None, named_cursor: Any = None
    ) -> Any:
        try:
            return self._execute_maybe_prepared(sql, params, named_cursor)
        except (peewee.OperationalError, peewee.InterfaceError):
            conn = self._state.conn
            if self.in_transaction() or conn is None or not getattr(conn, "closed", 0):
                raise
            log.warning(
                "database connection lost (terminated or server restarted); "
                "running the statement again on a fresh connection"
            )
            self._replace_connection()
            return self._execute_maybe_prepared(sql, params, named_cursor)

    def _prepare_all(self, names: set[str]) -> None:
        """A connection's first hot statement prepares every hot statement known so far, in one round
        trip: a fresh pooled connection (a worker's first deliveries) does not spend a round trip
        and a parse on each statement's first use — the rare paths' included. If that fails (a
        statement PostgreSQL cannot prepare), each is prepared on its own, once, here."""
        with _hot_lock:
            batch = [(sql, h) for sql, h in _hot.items() if h is not None]
        if len(batch) < 2:
            return
        try:
            super().execute_sql("; ".join(h.prepare_sql for _, h in batch), ())
        except peewee.DatabaseError:
            for sql, h in batch:
                self._prepare_one(sql, h, names)
            return
        names.update(h.name for _, h in batch)

    def _prepare_one(self, sql: str, hot: _Hot, names: set[str]) -> bool:
        """PREPARE one hot statement on this connection; False (and run as text from now on, said
        once) when PostgreSQL cannot prepare it (a parameter of unknown type)."""
        try:
            super().execute_sql(hot.prepare_sql, ())
        except peewee.ProgrammingError as exc:
            if getattr(getattr(exc, "orig", exc), "pgcode", None) != "42P05":  # not "already exists"
                log.warning("statement %s cannot be prepared (%s); running it unprepared", hot.name, exc)
                with _hot_lock:
                    _hot[sql] = None
                return False
        names.add(hot.name)
        return True

    def _execute_maybe_prepared(self, sql: str, params: Any, named_cursor: Any) -> Any:
        """A hot statement (see prepared()) as EXECUTE, PREPAREd first on a connection that has not
        seen it; anything else, or inside a transaction, as it is."""
        hot = _hot.get(sql)
        if hot is None or named_cursor is not None or self.in_transaction():
            return super().execute_sql(sql, params, named_cursor=named_cursor)
        conn = self.connection()
        with _hot_lock:
            names = self._prepared_on.setdefault(conn, set())
        if not names:
            self._prepare_all(names)
            if _hot.get(sql) is None:  # found unpreparable just now
                return super().execute_sql(sql, params, named_cursor=named_cursor)
        if hot.name not in names and not self._prepare_one(sql, hot, names):
            return super().execute_sql(sql, params, named_cursor=named_cursor)
        try:
            return super().execute_sql(hot.execute_sql, params)
        except peewee.NotSupportedError as exc:
            # "cached plan must not change result type": the schema changed under the session (a
            # migration while this worker runs); prepare it again next time, run it as text now
            if getattr(getattr(exc, "orig", exc), "pgcode", None) != "0A000":
                raise
            names.discard(hot.name)
            super().execute_sql(f"DEALLOCATE {hot.name}", ())
            return super().execute_sql(sql, params, named_cursor=named_cursor)

    def _is_closed(self, conn: Any) -> bool:
        """Pool checkout test from psycopg2's own state: no ``SELECT 1`` round trip per checkout.

        peewee's default pings the server on every checkout (once per actor delivery). A socket
        that died while the connection sat in the pool is caught instead by the first statement
        (``execute_sql``/``begin`` above re-run it once on a fresh connection), so the ping buys
        nothing but a round trip.
        """
        if conn.closed:
            return True
        adapter = self._adapter
        status = adapter.txn_status(conn)
        if status == adapter.txn_unknown:
            return True
        if status != adapter.txn_idle:  # a transaction left open: never hand it out
            try:
                adapter.rollback(conn)
            except Exception:
                return True
        return False

    def begin(self, *args: Any, **kwargs: Any) -> None:
        """BEGIN of an outermost transaction; on a connection found dead, once more on a fresh one."""
        try:
            return super().begin(*args, **kwargs)
        except (peewee.OperationalError, peewee.InterfaceError):
            conn = self._state.conn
            # nested: the enclosing transaction is gone with the connection; the caller owns that
            if self.transaction_depth() or conn is None or not getattr(conn, "closed", 0):
                raise
            log.warning(
                "database connection lost (terminated or server restarted); "
                "starting the transaction on a fresh connection"
            )
            self._replace_connection()
            return super().begin(*args, **kwargs)

    def _replace_connection(self) -> None:
        """Discard this thread's dead connection and open a NEW one; keep connection_context() state.

        Not another pooled one: what killed this connection (``pg_terminate_backend`` of every
        backend, a server restart) most likely killed the idle ones too, and the pool cannot tell
        without a round trip, so a checkout could spend the single retry on another dead
        connection. The idle connections are closed (public ``close_idle``; a healthy one costs a
        reconnect later), then ``_connect`` finds the pool empty and connects afresh.
        """
        with self._lock:
            ctx = self._state.ctx
            self._close(self._state.conn, close_conn=True)
            with self._pool_lock:  # no other thread returns a connection in between
                self.close_idle()
                conn = self._connect()
            self._state.set_connection(conn)
            self._state.ctx = ctx
            self._initialize_connection(self._state.conn)


def init_db(
    settings: Settings, *, max_connections: int | None = None, application_name: str | None = None
) -> PooledPostgresqlExtDatabase:
    """Bind ``db`` to the database of ``settings`` (idempotent per URL); return the real database."""
    current = db.obj
    if current is not None and getattr(current, "_campaign_url", None) == settings.database_url:
        return current
    kwargs = connect_kwargs(settings.database_url)
    database = ResilientPooledDatabase(
        kwargs.pop("database"),
        max_connections=max_connections or settings.db_max_connections,
        stale_timeout=300,
        timeout=30,  # wait this long for a free pooled connection before raising
        register_hstore=False,
        connect_timeout=5,
        application_name=application_name or f"campaign-engine:{os.getpid()}",
        # Timestamps come back in UTC whatever the server's default; statements cannot hang
        # forever on a lock (a stuck worker would hold its message lease). The prepared hot
        # statements (every one a single message or row by its key: a generic plan is the right
        # one) are planned once, not custom-planned for their first five runs on each connection
        # as PostgreSQL does by default — ~2 ms of server CPU each time for the big ones, which
        # added up to more than their runs in a fresh worker's first minutes (T-PERF-1 --quick).
        # Only server-side prepared statements (and PL/pgSQL's, all trivial here) use the plan
        # cache; everything else psycopg2 sends as text is planned as always.
        options="-c timezone=UTC -c lock_timeout=30000 -c plan_cache_mode=force_generic_plan",
        **kwargs,
    )
    database._campaign_url = settings.database_url
    database._prepared_on = weakref.WeakKeyDictionary()
    if current is not None:
        current.close_all()
    db.initialize(database)
    log.info("database bound: %s", redact_url(settings.database_url))
    return database


def close_db() -> None:
    """Close every pooled connection of this process (shutdown, after fork)."""
    if db.obj is not None:
        db.obj.close_all()
