"""Small helpers for raw SQL on the bound database: rows as tuples, or by column name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from campaign.db import db

#: Sent before a statement in the same round trip (one simple-protocol query: one implicit
#: transaction), this makes THAT statement's commit asynchronous: PostgreSQL answers before the
#: WAL is flushed (issue 20, T-PERF-1, R-SCALE-3). A PostgreSQL crash may then lose the last few
#: hundred milliseconds of such commits, never a later synchronous one's (WAL is a sequence: a
#: synchronous commit flushes everything before it). ONLY for a commit whose loss is harmless:
#: it repeats work with no outside effect (a claim, the LLM's text, the split) or leaves an
#: honest ``in_doubt`` (a part recorded ``sent``: it goes back to ``sending``, which the sweep
#: calls in doubt). NEVER for the commit before a foreign call (a part's ``sending`` mark), for an
#: operator's action, or inside a transaction that holds other writes (SET LOCAL covers it all).
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off;\n"


def async_commit(sql: str) -> str:
    """``sql`` prefixed to commit asynchronously (see :data:`ASYNC_COMMIT` for when that is allowed)."""
    return ASYNC_COMMIT + sql


def fetch_one(sql: str, params: Sequence[Any] | dict = ()) -> tuple | None:
    """The first row of ``sql`` (None when it returns none)."""
    return db.execute_sql(sql, params).fetchone()


def fetch_all(sql: str, params: Sequence[Any] | dict = ()) -> list[tuple]:
    """Every row of ``sql``."""
    return db.execute_sql(sql, params).fetchall()


def fetch_named(sql: str, params: Sequence[Any] | dict = ()) -> dict[str, Any] | None:
    """The first row of ``sql`` as ``{column name: value}`` (None when it returns none): read by
    NAME, never by position, so a column added to a statement cannot shift another's meaning."""
    cursor = db.execute_sql(sql, params)
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip((d[0] for d in cursor.description), row, strict=True))
