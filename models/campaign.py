"""Campaign tables: configs, runs, messages, parts, events (SPEC §3)."""

from __future__ import annotations

from peewee import (
    BigAutoField,
    BooleanField,
    CompositeKey,
    DateField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    TextField,
    UUIDField,
)
from playhouse.postgres_ext import ArrayField, BinaryJSONField, DateTimeTZField

from models.base import BaseModel
from models.workspace import Column, Conversation, ConversationMessage, Inbox, Lead, Workspace

RUN_STATUSES = ("planning", "running", "paused", "completed", "cancelled", "failed")
ACTIVE_RUN_STATUSES = ("planning", "running", "paused")
MESSAGE_STATUSES = ("pending", "queued", "generating", "splitting", "sending", "sent", "failed", "skipped", "in_doubt")
TERMINAL_MESSAGE_STATUSES = ("sent", "failed", "skipped", "in_doubt")
PART_STATUSES = ("pending", "sending", "sent", "failed", "in_doubt", "skipped")
DELIVERY_STATUSES = ("server_ack", "delivered", "read")  # in rank order: never downgrade


class CampaignConfig(BaseModel):
    """What an operator applied: who, when, what to say, through which inbox, where to move."""

    id = BigAutoField()
    workspace = ForeignKeyField(Workspace, backref="campaigns", on_delete="CASCADE")
    workspace_id: int  # the foreign key's column, set by peewee
    name = TextField()
    inbox = ForeignKeyField(Inbox)
    inbox_id: int  # the foreign key's column, set by peewee
    source_column = ForeignKeyField(Column, backref="+")
    source_column_id: int  # the foreign key's column, set by peewee
    target_column = ForeignKeyField(Column, null=True, backref="+")
    target_column_id: int | None  # the foreign key's column, set by peewee
    reply_column = ForeignKeyField(Column, null=True, backref="+")
    reply_column_id: int | None  # the foreign key's column, set by peewee
    skip_if_replied = BooleanField(default=True)
    min_days_in_column = IntegerField(default=0)  # a follow-up waits this many local days (R-SEQ-1)
    history = IntegerField(default=0)  # conversation messages carried into the prompt (R-SEQ-2)
    weekdays = ArrayField(IntegerField, default=lambda: [0, 1, 2, 3, 4, 5, 6])  # 0 = Monday
    window_start_minute = IntegerField(default=0)
    window_end_minute = IntegerField(default=1440)
    timezone = TextField(default="UTC")
    daily_limit = IntegerField()
    gap_min_seconds = DoubleField()
    gap_max_seconds = DoubleField()
    part_gap_min_seconds = DoubleField(default=1.0)
    part_gap_max_seconds = DoubleField(default=4.0)
    model = TextField()
    system_prompt = TextField()
    fallback_template = TextField(null=True)
    split_enabled = BooleanField(default=False)
    max_parts = IntegerField(default=1)
    triage_enabled = BooleanField(default=False)  # R-IN-5
    triage_model = TextField(null=True)  # None: the campaign's model
    active = BooleanField(default=True)
    version = IntegerField(default=1)

    class Meta:
        table_name = "campaign_configs"


class CampaignConfigInbox(BaseModel):
    """One inbox of a campaign's sender pool (R-POOL-1); ``campaign_configs.inbox_id`` is always a member."""

    config = ForeignKeyField(CampaignConfig, backref="pool", on_delete="CASCADE")
    config_id: int  # the foreign key's column, set by peewee
    inbox = ForeignKeyField(Inbox, backref="+", on_delete="CASCADE")
    inbox_id: int  # the foreign key's column, set by peewee
    workspace = ForeignKeyField(Workspace, backref="+")
    workspace_id: int  # the foreign key's column, set by peewee
    position = IntegerField()

    class Meta:
        table_name = "campaign_config_inboxes"
        primary_key = CompositeKey("config", "inbox")


class CampaignRun(BaseModel):
    """One day's run of a config, with exact counters."""

    id = BigAutoField()
    config = ForeignKeyField(CampaignConfig, backref="runs", on_delete="CASCADE")
    config_id: int  # the foreign key's column, set by peewee
    run_date = DateField()
    status = TextField(default="planning")
    pause_reason = TextField(null=True)
    failure_reason = TextField(null=True)
    manual = BooleanField(default=False)
    leads_total = IntegerField(default=0)
    leads_processed = IntegerField(default=0)
    leads_sent = IntegerField(default=0)
    leads_failed = IntegerField(default=0)
    leads_skipped = IntegerField(default=0)
    leads_in_doubt = IntegerField(default=0)
    leads_overflow = IntegerField(default=0)
    # leads of the source column left out when the run was planned, by rule (R-SEQ-1, R-IN-3/4)
    excluded_too_recent = IntegerField(default=0)
    excluded_replied = IntegerField(default=0)
    excluded_opted_out = IntegerField(default=0)
    started_at = DateTimeTZField(null=True)
    finished_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "campaign_runs"


class CampaignMessage(BaseModel):
    """One personal message to one lead inside a run; its status is the pipeline's state."""

    id = BigAutoField()
    run = ForeignKeyField(CampaignRun, backref="messages", on_delete="CASCADE")
    run_id: int  # the foreign key's column, set by peewee
    lead = ForeignKeyField(Lead, null=True, on_delete="SET NULL")
    lead_id: int | None  # the foreign key's column, set by peewee
    inbox = ForeignKeyField(Inbox)
    inbox_id: int  # the foreign key's column, set by peewee
    status = TextField(default="pending")
    scheduled_at = DateTimeTZField()
    status_changed_at = DateTimeTZField(null=True)
    wake_at = DateTimeTZField(null=True)
    generated_text = TextField(null=True)
    tokens_used = IntegerField(null=True)
    generation_ms = IntegerField(null=True)
    split_ms = IntegerField(null=True)
    send_ms = IntegerField(null=True)
    attempts = IntegerField(default=0)
    error_class = TextField(null=True)
    error_message = TextField(null=True)
    skip_reason = TextField(null=True)
    conversation = ForeignKeyField(Conversation, null=True, on_delete="SET NULL")
    conversation_id: int | None  # the foreign key's column, set by peewee
    stop_reason = TextField(null=True)  # replied / opted_out: the lead stopped it (R-IN-3)
    sent_at = DateTimeTZField(null=True)
    finished_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "campaign_messages"


class MessagePart(BaseModel):
    """One WhatsApp bubble of a message; ``provider_message_id`` is Evolution's ``key.id``."""

    id = BigAutoField()
    message = ForeignKeyField(CampaignMessage, backref="parts", on_delete="CASCADE")
    message_id: int  # the foreign key's column, set by peewee
    inbox = ForeignKeyField(Inbox)
    inbox_id: int  # the foreign key's column, set by peewee
    idx = IntegerField()
    text = TextField()
    status = TextField(default="pending")
    attempt_id = UUIDField(null=True)
    provider_message_id = TextField(null=True, unique=True)
    sending_at = DateTimeTZField(null=True)
    sent_at = DateTimeTZField(null=True)
    delivery_status = TextField(null=True)
    delivery_updated_at = DateTimeTZField(null=True)
    delivery_error_at = DateTimeTZField(null=True)  # first ERROR from the delivery webhook (V4)
    error_message = TextField(null=True)

    class Meta:
        table_name = "message_parts"


class CampaignEvent(BaseModel):
    """Append-only log line about a run, message or lead."""

    id = BigAutoField()
    run = ForeignKeyField(CampaignRun, null=True, on_delete="CASCADE")
    run_id: int | None  # the foreign key's column, set by peewee
    message = ForeignKeyField(CampaignMessage, null=True, on_delete="SET NULL")
    message_id: int | None  # the foreign key's column, set by peewee
    lead = ForeignKeyField(Lead, null=True, on_delete="SET NULL")
    lead_id: int | None  # the foreign key's column, set by peewee
    step = TextField()
    level = TextField(default="info")
    text = TextField()
    details = BinaryJSONField(default=dict)
    updated_at = None  # append-only: the table has no updated_at

    class Meta:
        table_name = "campaign_events"


class CampaignTriageColumn(BaseModel):
    """Where a lead goes when triage gives its reply this intent (R-IN-5)."""

    config = ForeignKeyField(CampaignConfig, backref="triage_columns", on_delete="CASCADE")
    config_id: int  # the foreign key's column, set by peewee
    workspace = ForeignKeyField(Workspace, backref="+")
    workspace_id: int  # the foreign key's column, set by peewee
    intent = TextField()
    column = ForeignKeyField(Column, backref="+", on_delete="CASCADE")
    column_id: int  # the foreign key's column, set by peewee

    class Meta:
        table_name = "campaign_triage_columns"
        primary_key = CompositeKey("config", "intent")


class ReplyTriage(BaseModel):
    """The triage of one recorded reply (R-IN-5): pending until the LLM (or the keyword rules) decide."""

    id = BigAutoField()
    conversation_message = ForeignKeyField(ConversationMessage, unique=True, on_delete="CASCADE")
    conversation_message_id: int  # the foreign key's column, set by peewee
    lead = ForeignKeyField(Lead, on_delete="CASCADE")
    lead_id: int  # the foreign key's column, set by peewee
    config = ForeignKeyField(CampaignConfig, on_delete="CASCADE")
    config_id: int  # the foreign key's column, set by peewee
    run = ForeignKeyField(CampaignRun, null=True, on_delete="SET NULL")
    run_id: int | None  # the foreign key's column, set by peewee
    status = TextField(default="pending")  # pending | done | fallback
    intent = TextField(null=True)
    attempts = IntegerField(default=0)
    wake_at = DateTimeTZField(null=True)
    error_class = TextField(null=True)
    error_message = TextField(null=True)
    model = TextField(null=True)
    prompt_tokens = IntegerField(null=True)
    completion_tokens = IntegerField(null=True)
    total_tokens = IntegerField(null=True)
    cost = DoubleField(null=True)
    triage_ms = IntegerField(null=True)
    finished_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "reply_triage"
