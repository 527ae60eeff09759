"""Operational tables: dead letters, shared rate-limit state, scheduler heartbeat."""

from __future__ import annotations

from peewee import BigAutoField, ForeignKeyField, IntegerField, TextField, UUIDField
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField

from models.base import BaseModel
from models.campaign import CampaignMessage, CampaignRun


class DeadLetter(BaseModel):
    """A pipeline message whose retries were exhausted, kept beyond RabbitMQ's dead-letter TTL."""

    id = BigAutoField()
    queue = TextField()
    actor = TextField()
    dramatiq_message_id = TextField(unique=True)
    campaign_message = ForeignKeyField(CampaignMessage, null=True, on_delete="SET NULL")
    campaign_message_id: int | None  # the foreign key's column, set by peewee
    run = ForeignKeyField(CampaignRun, null=True, on_delete="SET NULL")
    run_id: int | None  # the foreign key's column, set by peewee
    payload = BinaryJSONField()
    error_class = TextField(null=True)
    error_message = TextField(null=True)
    status = TextField(default="dead")
    note = TextField(null=True)  # why it was resolved without a replay (V5)
    resolved_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "dead_letters"


class RateLimit(BaseModel):
    """Shared pacing state of one key (an inbox or an OpenRouter key)."""

    key = TextField(primary_key=True)
    last_at = DateTimeTZField(null=True)
    lease_token = UUIDField(null=True)
    lease_until = DateTimeTZField(null=True)
    blocked_until = DateTimeTZField(null=True)
    hour_start = DateTimeTZField()
    hour_count = IntegerField(default=0)
    day_start = DateTimeTZField()
    day_count = IntegerField(default=0)
    minute_start = DateTimeTZField()
    minute_count = IntegerField(default=0)
    created_at = None

    class Meta:
        table_name = "rate_limits"


class SchedulerHeartbeat(BaseModel):
    """Which scheduler process is active, and when it last proved it is alive."""

    name = TextField(primary_key=True)
    holder = TextField()
    started_at = DateTimeTZField()
    beat_at = DateTimeTZField()
    created_at = None
    updated_at = None

    class Meta:
        table_name = "scheduler_heartbeats"
