"""Base model bound to the process-wide database proxy; the schema itself lives in schema.py."""

from __future__ import annotations

from peewee import Model
from playhouse.postgres_ext import DateTimeTZField

from campaign.db import db


class BaseModel(Model):
    """Every table: a surrogate ``id``, created/updated timestamps kept by the database."""

    id: int  # every table's surrogate key (declared per model as BigAutoField, or a text key)
    created_at = DateTimeTZField(null=True)
    updated_at = DateTimeTZField(null=True)

    class Meta:
        database = db
        legacy_table_names = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id}>"
