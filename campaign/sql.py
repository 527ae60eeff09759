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
