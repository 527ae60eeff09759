"""Tenant-side tables: workspaces, kanban columns, leads, inboxes, conversations (SPEC §3)."""

from __future__ import annotations

from peewee import BigAutoField, BigIntegerField, BooleanField, DoubleField, ForeignKeyField, IntegerField, TextField
from playhouse.postgres_ext import ArrayField, BinaryJSONField, DateTimeTZField

from models.base import BaseModel


class Workspace(BaseModel):
    """A tenant: every other row belongs to exactly one workspace."""

    id = BigAutoField()
    name = TextField(unique=True)
    opt_out_phrases = ArrayField(TextField, null=True)  # None: the built-in pt/en/es list (R-IN-4)
    opt_out_reply = TextField(null=True)

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
    opted_out_at = DateTimeTZField(null=True)
    opted_out_reason = TextField(null=True)  # the reply that opted the lead out
    opt_out_reply_at = DateTimeTZField(null=True)  # the confirmation went out (never twice)
    last_reply_at = DateTimeTZField(null=True)
    # when the lead entered its column: kept by a trigger on column_id (V7), never NULL (V10)
    column_changed_at = DateTimeTZField()  # filled by the database (default now(), the trigger)
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
    health_state = TextField(default="healthy")  # healthy | throttled | restricted (R-HEALTH-2, V10)
    health_since = DateTimeTZField(null=True)
    health_until = DateTimeTZField(null=True)  # the cool-down's end (None while healthy)
    health_reason = TextField(null=True)
    health_counted_from = DateTimeTZField(null=True)  # problems before this are forgiven (`inbox enable`)
    warmup_start_per_day = IntegerField(null=True)  # R-HEALTH-1: day 0 cap of the warm-up ramp
    warmup_days = IntegerField(null=True)  # days of the ramp up to max_per_day
    first_send_at = DateTimeTZField(null=True)  # day 0 of the ramp: the inbox's first send

    class Meta:
        table_name = "inboxes"


class InboxRefusal(BaseModel):
    """A send the number itself refused (401/403/404, "Connection Closed" while open): R-HEALTH-2 evidence."""

    id = BigAutoField()
    inbox = ForeignKeyField(Inbox, on_delete="CASCADE")
    inbox_id: int  # the foreign key's column, set by peewee
    code = TextField()
    at = DateTimeTZField()
    created_at = None  # append-only: the table has neither timestamp
    updated_at = None

    class Meta:
        table_name = "inbox_refusals"


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


class ConversationMessage(BaseModel):
    """One bubble of a conversation: a part the engine sent (``out``) or a reply (``in``)."""

    id = BigAutoField()
    conversation = ForeignKeyField(Conversation, backref="messages", on_delete="CASCADE")
    conversation_id: int  # the foreign key's column, set by peewee
    inbox = ForeignKeyField(Inbox, on_delete="CASCADE")
    inbox_id: int  # the foreign key's column, set by peewee
    direction = TextField()  # 'out' | 'in'
    provider_message_id = TextField()
    text = TextField()
    at = DateTimeTZField()
    part_id = BigIntegerField(null=True)  # message_parts.id of an 'out' row (a model import would cycle)
    intent = TextField(null=True)  # R-IN-5 triage intent of an 'in' row
    action = TextField(null=True)  # what the engine did about it

    class Meta:
        table_name = "conversation_messages"


class InboundEvent(BaseModel):
    """One inbound message event, once per (inbox, provider id): the idempotency gate (E-30)."""

    id = BigAutoField()
    inbox = ForeignKeyField(Inbox, on_delete="CASCADE")
    inbox_id: int  # the foreign key's column, set by peewee
    provider_message_id = TextField()
    lead = ForeignKeyField(Lead, null=True, on_delete="SET NULL")
    lead_id: int | None  # the foreign key's column, set by peewee
    outcome = TextField()
    created_at = DateTimeTZField()
    updated_at = None  # append-only: the table has no updated_at

    class Meta:
        table_name = "inbound_events"
