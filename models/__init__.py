"""Peewee models of every table (SPEC §3); the DDL and migrations live in ``models.schema``."""

from models.campaign import (
    ACTIVE_RUN_STATUSES,
    DELIVERY_STATUSES,
    MESSAGE_STATUSES,
    PART_STATUSES,
    RUN_STATUSES,
    TERMINAL_MESSAGE_STATUSES,
    CampaignConfig,
    CampaignConfigInbox,
    CampaignEvent,
    CampaignMessage,
    CampaignRun,
    CampaignTriageColumn,
    MessagePart,
    ReplyTriage,
)
from models.ops import DeadLetter, RateLimit, SchedulerHeartbeat
from models.workspace import Column, Conversation, ConversationMessage, InboundEvent, Inbox, Lead, Workspace

ALL_MODELS = (
    Workspace,
    Column,
    Lead,
    Inbox,
    Conversation,
    CampaignConfig,
    CampaignConfigInbox,
    CampaignRun,
    CampaignMessage,
    MessagePart,
    CampaignEvent,
    ConversationMessage,
    InboundEvent,
    CampaignTriageColumn,
    ReplyTriage,
    DeadLetter,
    RateLimit,
    SchedulerHeartbeat,
)

__all__ = [m.__name__ for m in ALL_MODELS] + [
    "ALL_MODELS",
    "ACTIVE_RUN_STATUSES",
    "DELIVERY_STATUSES",
    "MESSAGE_STATUSES",
    "PART_STATUSES",
    "RUN_STATUSES",
    "TERMINAL_MESSAGE_STATUSES",
]
