"""Database handle: ``db`` is a proxy bound once per process by ``init_db(settings)``.

Connections come from a small pool (playhouse ``PooledPostgresqlExtDatabase``): a unit of
work (one actor message, one scheduler job, one CLI command) checks a connection out with
``db.connection_context()`` / ``db.connect(reuse_if_open=True)`` and returns it with
``db.close()``. A connection that broke (server restart, ``pg_terminate_backend``, E-16) is
detected by the pool (``conn.closed``) and replaced instead of being handed out again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import peewee
from peewee import DatabaseProxy
from playhouse.postgres_ext import PooledPostgresqlExtDatabase

from campaign.errors import ConfigError
from campaign.settings import Settings, redact_url

log = logging.getLogger(__name__)

db = DatabaseProxy()

__all__ = ["db", "init_db", "connect_kwargs", "close_db"]


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

    def execute_sql(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None, named_cursor: Any = None
    ) -> Any:
        try:
            return super().execute_sql(sql, params, named_cursor=named_cursor)
        except (peewee.OperationalError, peewee.InterfaceError):
            conn = self._state.conn
            if self.in_transaction() or conn is None or not getattr(conn, "closed", 0):
                raise
            log.warning(
                "database connection lost (terminated or server restarted); "
                "running the statement again on a fresh connection"
            )
            self._replace_connection()
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
        # forever on a lock (a stuck worker would hold its message lease).
        options="-c timezone=UTC -c lock_timeout=30000",
        **kwargs,
    )
    database._campaign_url = settings.database_url
    if current is not None:
        current.close_all()
    db.initialize(database)
    log.info("database bound: %s", redact_url(settings.database_url))
    return database


def close_db() -> None:
    """Close every pooled connection of this process (shutdown, after fork)."""
    if db.obj is not None:
        db.obj.close_all()
