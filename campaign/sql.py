"""Small helpers for raw SQL on the bound database: rows as tuples, or by column name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from campaign.db import db


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
#: R-HEALTH's ``restricted`` state belongs here too (seam: ``AND i.health_state <> 'restricted'``).
INBOX_CAN_SEND = "(NOT i.disabled AND i.connection_state NOT IN ('close', 'connecting'))"


def inbox_hands_over(failover_seconds: float) -> str:
    """An inbox (alias ``i``) whose pool takes over its not-started messages (R-POOL-3): disabled
    (or restricted, R-HEALTH: the same seam as :data:`INBOX_CAN_SEND`), or disconnected for at least
    ``failover_seconds`` (POOL_FAILOVER_SECONDS)."""
    seconds = float(failover_seconds)  # a float from the settings: safe to inline
    return (
        "(i.disabled OR (i.connection_state IN ('close', 'connecting') AND i.disconnected_since IS NOT NULL"
        f" AND i.disconnected_since <= now() - make_interval(secs => {seconds!r})))"
    )
