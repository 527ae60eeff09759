"""Small helpers for raw SQL on the bound database: rows as tuples, or by column name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from campaign.db import ASYNC_COMMIT as _ASYNC_COMMIT
from campaign.db import db
from campaign.db import prepared as prepared

#: Sent before a statement in the same round trip (one simple-protocol query: one implicit
#: transaction), this makes THAT statement's commit asynchronous: PostgreSQL answers before the
#: WAL is flushed (issue 20, T-PERF-1, R-SCALE-3). A PostgreSQL crash may then lose the last few
#: hundred milliseconds of such commits, never a later synchronous one's (WAL is a sequence: a
#: synchronous commit flushes everything before it). ONLY for a commit whose loss is harmless:
#: it repeats work with no outside effect (a claim, the LLM's text, the split) or leaves an
#: honest ``in_doubt`` (a part recorded ``sent``: it goes back to ``sending``, which the sweep
#: calls in doubt). NEVER for the commit before a foreign call (a part's ``sending`` mark), for an
#: operator's action, or inside a transaction that holds other writes (SET LOCAL covers it all).
#: (Defined in campaign.db, which runs hot statements prepared with it in front.)
ASYNC_COMMIT = _ASYNC_COMMIT


def async_commit(sql: str) -> str:
    """``sql`` prefixed to commit asynchronously (see :data:`ASYNC_COMMIT` for when that is allowed)."""
    return ASYNC_COMMIT + sql


# -- inbox health (R-HEALTH-2, R-FAIL-6): what the send-time caps, failover and planning share ----


def health_cap_factor(alias: str = "i") -> str:
    """SQL factor on an inbox's caps: ``throttled`` halves them for its cool-down (R-HEALTH-2)."""
    return f"(CASE WHEN {alias}.health_state = 'throttled' THEN 0.5 ELSE 1 END)"


def health_gap_factor(alias: str = "i") -> str:
    """SQL factor on an inbox's minimum gap: ``throttled`` doubles it for its cool-down (R-HEALTH-2)."""
    return f"(CASE WHEN {alias}.health_state = 'throttled' THEN 2 ELSE 1 END)"


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


# -- sender pools (R-POOL-3) ----------------------------------------------------------------

#: THE "inbox can send" predicate of an inbox (alias ``i``): not disabled and not disconnected
#: (``close``/``connecting``; ``unknown``/``error`` are no evidence, R-FAIL-6). Every pool decision
#: reads it: the dispatcher holds the messages of an inbox that cannot send, a run pauses only
#: when no member of its pool can send, and resumes when one can again.
#: R-HEALTH-2: a ``restricted`` inbox cannot send either.
INBOX_CAN_SEND = (
    "(NOT i.disabled AND i.health_state <> 'restricted' AND i.connection_state NOT IN ('close', 'connecting'))"
)


def inbox_hands_over(failover_seconds: float) -> str:
    """An inbox (alias ``i``) whose pool takes over its not-started messages (R-POOL-3): disabled
    (or restricted, R-HEALTH: the same seam as :data:`INBOX_CAN_SEND`), or disconnected for at least
    ``failover_seconds`` (POOL_FAILOVER_SECONDS)."""
    seconds = float(failover_seconds)  # a float from the settings: safe to inline
    return (
        "(i.disabled OR i.health_state = 'restricted'"
        " OR (i.connection_state IN ('close', 'connecting') AND i.disconnected_since IS NOT NULL"
        f" AND i.disconnected_since <= now() - make_interval(secs => {seconds!r})))"
    )
