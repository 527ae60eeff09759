"""Tenant-side tables: workspaces, kanban columns, leads, inboxes, conversations (SPEC §3)."""

from __future__ import annotations

from peewee import BigAutoField, BooleanField, DoubleField, ForeignKeyField, IntegerField, TextField
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField

from models.base import BaseModel


class Workspace(BaseModel):
    """A tenant: every other row belongs to exactly one workspace."""

    id = BigAutoField()
    name = TextField(unique=True)

    class Meta:
        table_name = "workspaces"


class Column(BaseModel):
    """A kanban column of a workspace."""

    id = BigAutoField()
    workspace = ForeignKeyField(Workspace, backref="columns", on_delete="CASCADE")
    workspace_id: int  # the foreign key's column, set by peewee
    name = TextField()
    position = IntegerField(default=0)

    class Meta:
        table_name = "columns"


class Lead(BaseModel):
    """A CRM lead; ``phone`` is normalised E.164."""

    id = BigAutoField()
    workspace = ForeignKeyField(Workspace, backref="leads", on_delete="CASCADE")
    workspace_id: int  # the foreign key's column, set by peewee
    column = ForeignKeyField(Column, null=True, backref="leads")
    column_id: int | None  # the foreign key's column, set by peewee
    name = TextField(default="")
    phone = TextField()
    custom_fields = BinaryJSONField(default=dict)
    opted_out = BooleanField(default=False)
    last_activity_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "leads"


class Inbox(BaseModel):
    """One WhatsApp sender = one Evolution API instance, with its pacing limits and health."""

    id = BigAutoField()
    workspace = ForeignKeyField(Workspace, backref="inboxes", on_delete="CASCADE")
    workspace_id: int  # the foreign key's column, set by peewee
    name = TextField()
    instance_name = TextField(unique=True)
    connection_state = TextField(default="unknown")
    state_checked_at = DateTimeTZField(null=True)
    disconnected_since = DateTimeTZField(null=True)
    consecutive_failures = IntegerField(default=0)
    gateway_failures = IntegerField(default=0)
    gateway_trouble_since = DateTimeTZField(null=True)
    disabled = BooleanField(default=False)
    disabled_reason = TextField(null=True)
    min_gap_seconds = DoubleField(default=1.0)
    max_per_hour = IntegerField(null=True)
    max_per_day = IntegerField(null=True)

    class Meta:
        table_name = "inboxes"


class Conversation(BaseModel):
    """A lead talking to one inbox."""

    id = BigAutoField()
    workspace = ForeignKeyField(Workspace, on_delete="CASCADE")
    workspace_id: int  # the foreign key's column, set by peewee
    lead = ForeignKeyField(Lead, on_delete="CASCADE")
    lead_id: int  # the foreign key's column, set by peewee
    inbox = ForeignKeyField(Inbox, on_delete="CASCADE")
    inbox_id: int  # the foreign key's column, set by peewee

    class Meta:
        table_name = "conversations"
