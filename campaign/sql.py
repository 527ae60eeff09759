"""Two one-line helpers for raw SQL on the bound database (rows as tuples)."""

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
