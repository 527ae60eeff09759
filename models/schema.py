"""Versioned, idempotent schema migrations (``python cli.py init-db``).

The rules of SPEC §3 are carried by PostgreSQL itself, not only by code: unique keys,
foreign keys (including composite ones that keep every reference inside one workspace,
E-20), CHECK constraints on every status column and on the run counters, and the partial
index the dispatcher claims from.

Each migration runs in one transaction together with its ``schema_version`` row, under an
advisory lock, so two processes running ``init-db`` at once apply it once. Migrations are
append-only: never edit a released one, add the next version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peewee import Database, DatabaseProxy

log = logging.getLogger(__name__)

#: advisory lock key that serialises migrations ("campaign" in ASCII, truncated)
MIGRATION_LOCK_KEY = 0x63616D70


@dataclass(frozen=True)
class Migration:
    """One schema version: a name and the SQL statements that reach it from the previous one."""

    version: int
    name: str
    statements: tuple[str, ...]


_TIMESTAMPS = """
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()"""

_V1_TABLES = (
    "workspaces",
    "columns",
    "leads",
    "inboxes",
    "campaign_configs",
    "campaign_runs",
    "campaign_messages",
    "message_parts",
    "conversations",
)

V1 = Migration(
    1,
    "initial domain (SPEC §3)",
    (
        """CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN NEW.updated_at := now(); RETURN NEW; END $$""",
        f"""CREATE TABLE workspaces (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$'),{_TIMESTAMPS})""",
        f"""CREATE TABLE columns (
        id bigserial PRIMARY KEY,
        workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
        position integer NOT NULL DEFAULT 0,{_TIMESTAMPS},
        UNIQUE (workspace_id, name),
        UNIQUE (id, workspace_id))""",
        f"""CREATE TABLE leads (
        id bigserial PRIMARY KEY,
        workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        column_id bigint,
        name text NOT NULL DEFAULT '',
        phone text NOT NULL,
        custom_fields jsonb NOT NULL DEFAULT '{{}}'::jsonb CHECK (jsonb_typeof(custom_fields) = 'object'),
        opted_out boolean NOT NULL DEFAULT false,
        last_activity_at timestamptz,{_TIMESTAMPS},
        UNIQUE (workspace_id, phone),
        UNIQUE (id, workspace_id),
        FOREIGN KEY (column_id, workspace_id) REFERENCES columns(id, workspace_id)
            ON DELETE SET NULL (column_id))""",
        "CREATE INDEX leads_column_idx ON leads (column_id) WHERE NOT opted_out",
        f"""CREATE TABLE inboxes (
        id bigserial PRIMARY KEY,
        workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
        instance_name text NOT NULL UNIQUE CHECK (length(instance_name) BETWEEN 1 AND 200),
        connection_state text NOT NULL DEFAULT 'unknown'
            CHECK (connection_state IN ('unknown', 'open', 'close', 'connecting', 'error')),
        state_checked_at timestamptz,
        disconnected_since timestamptz,
        consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
        disabled boolean NOT NULL DEFAULT false,
        disabled_reason text,
        min_gap_seconds double precision NOT NULL DEFAULT 1.0 CHECK (min_gap_seconds >= 0),
        max_per_hour integer CHECK (max_per_hour > 0),
        max_per_day integer CHECK (max_per_day > 0),{_TIMESTAMPS},
        UNIQUE (workspace_id, name),
        UNIQUE (id, workspace_id),
        CHECK (disabled = (disabled_reason IS NOT NULL)))""",
        f"""CREATE TABLE campaign_configs (
        id bigserial PRIMARY KEY,
        workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        name text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$'),
        inbox_id bigint NOT NULL,
        source_column_id bigint NOT NULL,
        target_column_id bigint,
        weekdays smallint[] NOT NULL DEFAULT '{{0,1,2,3,4,5,6}}'
            CHECK (weekdays <@ '{{0,1,2,3,4,5,6}}'::smallint[] AND cardinality(weekdays) > 0),
        window_start_minute integer NOT NULL DEFAULT 0 CHECK (window_start_minute BETWEEN 0 AND 1439),
        window_end_minute integer NOT NULL DEFAULT 1440 CHECK (window_end_minute BETWEEN 1 AND 1440),
        timezone text NOT NULL DEFAULT 'UTC',
        daily_limit integer NOT NULL CHECK (daily_limit > 0),
        gap_min_seconds double precision NOT NULL CHECK (gap_min_seconds >= 0),
        gap_max_seconds double precision NOT NULL,
        part_gap_min_seconds double precision NOT NULL DEFAULT 1.0 CHECK (part_gap_min_seconds >= 0),
        part_gap_max_seconds double precision NOT NULL DEFAULT 4.0,
        model text NOT NULL CHECK (length(model) > 0),
        system_prompt text NOT NULL CHECK (length(system_prompt) > 0),
        fallback_template text,
        split_enabled boolean NOT NULL DEFAULT false,
        max_parts integer NOT NULL DEFAULT 1 CHECK (max_parts BETWEEN 1 AND 10),
        active boolean NOT NULL DEFAULT true,
        version integer NOT NULL DEFAULT 1 CHECK (version > 0),{_TIMESTAMPS},
        UNIQUE (workspace_id, name),
        CHECK (window_start_minute < window_end_minute),
        CHECK (gap_max_seconds >= gap_min_seconds),
        CHECK (part_gap_max_seconds >= part_gap_min_seconds),
        CHECK (source_column_id IS DISTINCT FROM target_column_id),
        FOREIGN KEY (inbox_id, workspace_id) REFERENCES inboxes(id, workspace_id),
        FOREIGN KEY (source_column_id, workspace_id) REFERENCES columns(id, workspace_id),
        FOREIGN KEY (target_column_id, workspace_id) REFERENCES columns(id, workspace_id)
            ON DELETE SET NULL (target_column_id))""",
        f"""CREATE TABLE campaign_runs (
        id bigserial PRIMARY KEY,
        config_id bigint NOT NULL REFERENCES campaign_configs(id) ON DELETE CASCADE,
        run_date date NOT NULL,
        status text NOT NULL DEFAULT 'planning'
            CHECK (status IN ('planning', 'running', 'paused', 'completed', 'cancelled', 'failed')),
        pause_reason text,
        failure_reason text,
        manual boolean NOT NULL DEFAULT false,
        leads_total integer NOT NULL DEFAULT 0 CHECK (leads_total >= 0),
        leads_processed integer NOT NULL DEFAULT 0 CHECK (leads_processed >= 0),
        leads_sent integer NOT NULL DEFAULT 0 CHECK (leads_sent >= 0),
        leads_failed integer NOT NULL DEFAULT 0 CHECK (leads_failed >= 0),
        leads_skipped integer NOT NULL DEFAULT 0 CHECK (leads_skipped >= 0),
        leads_in_doubt integer NOT NULL DEFAULT 0 CHECK (leads_in_doubt >= 0),
        leads_overflow integer NOT NULL DEFAULT 0 CHECK (leads_overflow >= 0),
        started_at timestamptz,
        finished_at timestamptz,{_TIMESTAMPS},
        UNIQUE (config_id, run_date),
        CHECK (leads_processed = leads_sent + leads_failed + leads_skipped + leads_in_doubt),
        CHECK (leads_processed <= leads_total),
        CHECK ((status = 'paused') = (pause_reason IS NOT NULL)))""",
        "CREATE INDEX campaign_runs_active_idx ON campaign_runs (status) "
        "WHERE status IN ('planning', 'running', 'paused')",
        f"""CREATE TABLE conversations (
        id bigserial PRIMARY KEY,
        workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        lead_id bigint NOT NULL,
        inbox_id bigint NOT NULL,{_TIMESTAMPS},
        UNIQUE (lead_id, inbox_id),
        FOREIGN KEY (lead_id, workspace_id) REFERENCES leads(id, workspace_id) ON DELETE CASCADE,
        FOREIGN KEY (inbox_id, workspace_id) REFERENCES inboxes(id, workspace_id) ON DELETE CASCADE)""",
        f"""CREATE TABLE campaign_messages (
        id bigserial PRIMARY KEY,
        run_id bigint NOT NULL REFERENCES campaign_runs(id) ON DELETE CASCADE,
        lead_id bigint REFERENCES leads(id) ON DELETE SET NULL,
        inbox_id bigint NOT NULL REFERENCES inboxes(id),
        status text NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'queued', 'generating', 'splitting', 'sending',
                              'sent', 'failed', 'skipped', 'in_doubt')),
        scheduled_at timestamptz NOT NULL,
        status_changed_at timestamptz NOT NULL DEFAULT now(),
        generated_text text,
        tokens_used integer CHECK (tokens_used >= 0),
        generation_ms integer CHECK (generation_ms >= 0),
        split_ms integer CHECK (split_ms >= 0),
        send_ms integer CHECK (send_ms >= 0),
        attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        error_class text,
        error_message text,
        skip_reason text,
        conversation_id bigint REFERENCES conversations(id) ON DELETE SET NULL,
        sent_at timestamptz,
        finished_at timestamptz,{_TIMESTAMPS},
        UNIQUE (run_id, lead_id),
        CHECK ((status = 'skipped') = (skip_reason IS NOT NULL)),
        CHECK (status <> 'sent' OR sent_at IS NOT NULL))""",
        # The dispatcher's claim: pending messages by due time (partial: stays small however long
        # the history grows, T-PERF-4).
        "CREATE INDEX campaign_messages_due_idx ON campaign_messages (scheduled_at) WHERE status = 'pending'",
        "CREATE INDEX campaign_messages_run_status_idx ON campaign_messages (run_id, status)",
        "CREATE INDEX campaign_messages_lead_idx ON campaign_messages (lead_id)",
        # Recovery sweep: in-flight messages by how long they have been in their state.
        """CREATE INDEX campaign_messages_inflight_idx ON campaign_messages (status_changed_at)
        WHERE status IN ('queued', 'generating', 'splitting', 'sending')""",
        f"""CREATE TABLE message_parts (
        id bigserial PRIMARY KEY,
        message_id bigint NOT NULL REFERENCES campaign_messages(id) ON DELETE CASCADE,
        idx integer NOT NULL CHECK (idx >= 0),
        text text NOT NULL CHECK (length(text) > 0),
        status text NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'in_doubt')),
        attempt_id uuid,
        provider_message_id text UNIQUE,
        sending_at timestamptz,
        sent_at timestamptz,
        delivery_status text CHECK (delivery_status IN ('server_ack', 'delivered', 'read')),
        delivery_updated_at timestamptz,{_TIMESTAMPS},
        UNIQUE (message_id, idx),
        CHECK (status <> 'sending' OR attempt_id IS NOT NULL),
        CHECK (status <> 'sent' OR sent_at IS NOT NULL))""",
        "CREATE INDEX message_parts_sending_idx ON message_parts (sending_at) WHERE status = 'sending'",
        """CREATE TABLE campaign_events (
        id bigserial PRIMARY KEY,
        run_id bigint REFERENCES campaign_runs(id) ON DELETE CASCADE,
        message_id bigint REFERENCES campaign_messages(id) ON DELETE SET NULL,
        lead_id bigint REFERENCES leads(id) ON DELETE SET NULL,
        step text NOT NULL,
        level text NOT NULL DEFAULT 'info' CHECK (level IN ('debug', 'info', 'warning', 'error')),
        text text NOT NULL,
        details jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX campaign_events_run_idx ON campaign_events (run_id, id)",
        *(
            f"""CREATE TRIGGER {t}_updated_at BEFORE UPDATE ON {t}
          FOR EACH ROW EXECUTE FUNCTION set_updated_at()"""
            for t in _V1_TABLES
        ),
    ),
)

V2 = Migration(
    2,
    "operations: dead letters, rate-limit state, scheduler lease",
    (
        # Dead letters are recorded in PostgreSQL too, so nothing is lost when RabbitMQ's 7-day
        # dead-letter TTL expires (R-OPS-2).
        """CREATE TABLE dead_letters (
        id bigserial PRIMARY KEY,
        queue text NOT NULL,
        actor text NOT NULL,
        dramatiq_message_id text NOT NULL UNIQUE,
        campaign_message_id bigint REFERENCES campaign_messages(id) ON DELETE SET NULL,
        run_id bigint REFERENCES campaign_runs(id) ON DELETE SET NULL,
        payload jsonb NOT NULL,
        error_class text,
        error_message text,
        status text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'requeued', 'purged')),
        resolved_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX dead_letters_open_idx ON dead_letters (created_at) WHERE status = 'dead'",
        """CREATE TRIGGER dead_letters_updated_at BEFORE UPDATE ON dead_letters
       FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
        # Shared pacing state for every worker process and machine (R-RATE-1): one row per key
        # ("inbox:<id>", "openrouter:<key hash>").
        """CREATE TABLE rate_limits (
        key text PRIMARY KEY,
        last_at timestamptz,
        lease_token uuid,
        lease_until timestamptz,
        hour_start timestamptz NOT NULL DEFAULT date_trunc('hour', now()),
        hour_count integer NOT NULL DEFAULT 0 CHECK (hour_count >= 0),
        day_start timestamptz NOT NULL DEFAULT date_trunc('day', now()),
        day_count integer NOT NULL DEFAULT 0 CHECK (day_count >= 0),
        minute_start timestamptz NOT NULL DEFAULT date_trunc('minute', now()),
        minute_count integer NOT NULL DEFAULT 0 CHECK (minute_count >= 0),
        updated_at timestamptz NOT NULL DEFAULT now())""",
        # The single active scheduler and its heartbeat (R-OPS-4: heartbeat older than 2 min).
        """CREATE TABLE scheduler_heartbeats (
        name text PRIMARY KEY,
        holder text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        beat_at timestamptz NOT NULL DEFAULT now())""",
    ),
)

V3 = Migration(
    3,
    "pipeline: per-inbox send history for sliding hour/day caps",
    (
        # Sliding-window caps (R-RATE-1) count this inbox's sends of the last hour/day; a part
        # carries its inbox so that count is one index range scan, however long the history.
        "ALTER TABLE message_parts ADD COLUMN inbox_id bigint REFERENCES inboxes(id) ON DELETE CASCADE",
        """UPDATE message_parts p SET inbox_id = m.inbox_id FROM campaign_messages m
       WHERE m.id = p.message_id AND p.inbox_id IS NULL""",
        "ALTER TABLE message_parts ALTER COLUMN inbox_id SET NOT NULL",
        """CREATE INDEX message_parts_inbox_sends_idx ON message_parts (inbox_id, sending_at)
       WHERE status IN ('sent', 'in_doubt', 'sending')""",
        # Error detail of the failed step, kept on the part for the operator.
        "ALTER TABLE message_parts ADD COLUMN error_message text",
    ),
)

V4 = Migration(
    4,
    "delivery webhook: provider-reported delivery errors",
    (
        # Evolution's messages.update ERROR is recorded beside the rank-ordered delivery_status
        # (server_ack < delivered < read) instead of in it: an ERROR must never downgrade a part
        # that was already delivered or read, and an operator still wants to see that it happened.
        "ALTER TABLE message_parts ADD COLUMN delivery_error_at timestamptz",
    ),
)

V5 = Migration(
    5,
    "dead letters: resolved without a replay, with the operator's note",
    (
        # A dead letter whose campaign message moved on (completed since, lead deleted, run
        # cancelled) is settled without re-publishing anything: 'resolved', and the note says why
        # (R-OPS-2). 'requeued' / 'purged' keep their meaning.
        "ALTER TABLE dead_letters DROP CONSTRAINT IF EXISTS dead_letters_status_check",
        """ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_status_check
       CHECK (status IN ('dead', 'requeued', 'purged', 'resolved'))""",
        "ALTER TABLE dead_letters ADD COLUMN note text",
    ),
)

V6 = Migration(
    6,
    "failure paths: hand-off deadlines, parked messages, gateway outages per scope",
    (
        # When the next step of an in-flight message must have started by (R-FAIL-8). Every step
        # hand-off sets it (now + the delay it asked for + a short grace); a message parked in
        # PostgreSQL (a long Retry-After, a started message waiting for its disconnected inbox,
        # R-DISP-2, E-24) sets it to the time it is due again. The recovery sweep re-publishes what
        # is past it: a lost publish costs seconds, not the old ten-minute lease.
        "ALTER TABLE campaign_messages ADD COLUMN wake_at timestamptz",
        """UPDATE campaign_messages SET wake_at = status_changed_at + interval '10 minutes'
       WHERE status IN ('queued', 'generating', 'splitting', 'sending')""",
        """CREATE INDEX campaign_messages_wake_idx ON campaign_messages (wake_at)
        WHERE status IN ('queued', 'generating', 'splitting', 'sending')""",
        # Gateway trouble (429, 5xx, timeouts, connect errors) is counted apart from real send
        # failures (R-FAIL-6): it never disables an inbox; it holds the inbox's sends for a
        # growing backoff instead (E-23).
        "ALTER TABLE inboxes ADD COLUMN gateway_failures integer NOT NULL DEFAULT 0 CHECK (gateway_failures >= 0)",
        "ALTER TABLE inboxes ADD COLUMN gateway_trouble_since timestamptz",
        # No request of a scope (an inbox = Evolution instance, an OpenRouter key) before this:
        # a provider's Retry-After or a gateway outage's backoff (R-FAIL-2).
        "ALTER TABLE rate_limits ADD COLUMN blocked_until timestamptz",
    ),
)

V7 = Migration(
    7,
    "listening: replies, opt-outs, the conversation log, connection events (R-IN)",
    (
        # A lead's reply and opt-out state (R-IN-2..4). column_changed_at is kept by a trigger, so
        # a move made by the CRM (or a person in SQL) counts as much as one made by the engine:
        # skip_if_replied compares it with last_reply_at.
        "ALTER TABLE leads ADD COLUMN opted_out_at timestamptz",
        "ALTER TABLE leads ADD COLUMN opted_out_reason text",
        "ALTER TABLE leads ADD COLUMN opt_out_reply_at timestamptz",
        "ALTER TABLE leads ADD COLUMN last_reply_at timestamptz",
        "ALTER TABLE leads ADD COLUMN column_changed_at timestamptz",
        # the recovery sweep's look for opt-out confirmations still to send (R-IN-4)
        """CREATE INDEX leads_opt_out_reply_idx ON leads (opted_out_at)
        WHERE opted_out AND opt_out_reply_at IS NULL""",
        """CREATE OR REPLACE FUNCTION leads_column_changed() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'INSERT' OR NEW.column_id IS DISTINCT FROM OLD.column_id THEN
           NEW.column_changed_at := now();
         END IF;
         RETURN NEW;
       END $$""",
        """CREATE TRIGGER leads_column_changed BEFORE INSERT OR UPDATE OF column_id ON leads
       FOR EACH ROW EXECUTE FUNCTION leads_column_changed()""",
        # Workspace-wide opt-out phrases (NULL: the built-in pt/en/es list) and the optional
        # confirmation sent once to a lead who opted out (R-IN-4).
        "ALTER TABLE workspaces ADD COLUMN opt_out_phrases text[]",
        "ALTER TABLE workspaces ADD COLUMN opt_out_reply text",
        # Where a lead who answers goes, and whether a lead who replied is skipped (R-IN-3).
        "ALTER TABLE campaign_configs ADD COLUMN reply_column_id bigint",
        """ALTER TABLE campaign_configs ADD CONSTRAINT campaign_configs_reply_column_fkey
       FOREIGN KEY (reply_column_id, workspace_id) REFERENCES columns(id, workspace_id)
       ON DELETE SET NULL (reply_column_id)""",
        "ALTER TABLE campaign_configs ADD COLUMN skip_if_replied boolean NOT NULL DEFAULT true",
        # Why a message was stopped by its lead (replied / opted_out): a part in flight when the
        # reply came finishes, nothing after it is sent (R-IN-3).
        "ALTER TABLE campaign_messages ADD COLUMN stop_reason text",
        # A part a reply stopped before it went out (R-IN-3, E-27).
        "ALTER TABLE message_parts DROP CONSTRAINT IF EXISTS message_parts_status_check",
        """ALTER TABLE message_parts ADD CONSTRAINT message_parts_status_check
       CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'in_doubt', 'skipped'))""",
        # Every part sent and every reply received, per conversation: what a salesperson opening
        # the lead sees (R-IN-6). Unique per inbox on the provider's id: the idempotency key of
        # every inbound effect (R-IN-1, E-30).
        f"""CREATE TABLE conversation_messages (
        id bigserial PRIMARY KEY,
        conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        inbox_id bigint NOT NULL REFERENCES inboxes(id) ON DELETE CASCADE,
        direction text NOT NULL CHECK (direction IN ('out', 'in')),
        provider_message_id text NOT NULL CHECK (length(provider_message_id) BETWEEN 1 AND 200),
        text text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        part_id bigint REFERENCES message_parts(id) ON DELETE SET NULL,
        intent text,
        action text,{_TIMESTAMPS},
        UNIQUE (inbox_id, provider_message_id))""",
        "CREATE INDEX conversation_messages_conversation_idx ON conversation_messages (conversation_id, at)",
        """CREATE TRIGGER conversation_messages_updated_at BEFORE UPDATE ON conversation_messages
       FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
        # Every inbound message event, matched or not, once per (inbox, provider id): the gate that
        # makes a duplicate, a redelivery or the same event on both paths change nothing twice
        # (E-30), and what `status` counts (unknown senders, ignored chats).
        """CREATE TABLE inbound_events (
        id bigserial PRIMARY KEY,
        inbox_id bigint NOT NULL REFERENCES inboxes(id) ON DELETE CASCADE,
        provider_message_id text NOT NULL,
        lead_id bigint REFERENCES leads(id) ON DELETE SET NULL,
        outcome text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (inbox_id, provider_message_id))""",
        "CREATE INDEX inbound_events_created_idx ON inbound_events (created_at)",
    ),
)

V8 = Migration(
    8,
    "status: unusable inbound events counted from an index (R-IN-1, R-OPS-1)",
    (
        # `status` counts the poison events the consumer recorded (campaign_events step 'inbound',
        # level 'error') in the last 24 h and in total: a partial index holds only those rows, so
        # the count stays sub-millisecond however long the event log grows (a scan of 2 M events
        # took 0.2 s per refresh of `status --watch`).
        """CREATE INDEX campaign_events_inbound_errors_idx ON campaign_events (created_at)
        WHERE step = 'inbound' AND level = 'error'""",
    ),
)

V9 = Migration(
    9,
    "sender pools: a campaign's inboxes (R-POOL-1, E-20)",
    (
        # A config sends through a pool of inboxes of its own workspace (R-POOL-1): the composite
        # foreign keys keep every member inside the config's workspace (E-20) in PostgreSQL itself.
        # Both cascade: a workspace deleted with its campaigns and inboxes takes its pools along
        # (the inbox a config names in inbox_id and the inbox of every message stay protected).
        "ALTER TABLE campaign_configs ADD CONSTRAINT campaign_configs_id_workspace_key UNIQUE (id, workspace_id)",
        f"""CREATE TABLE campaign_config_inboxes (
        config_id bigint NOT NULL,
        inbox_id bigint NOT NULL,
        workspace_id bigint NOT NULL,
        position integer NOT NULL CHECK (position BETWEEN 0 AND 99),{_TIMESTAMPS},
        PRIMARY KEY (config_id, inbox_id),
        UNIQUE (config_id, position),
        FOREIGN KEY (config_id, workspace_id) REFERENCES campaign_configs(id, workspace_id) ON DELETE CASCADE,
        FOREIGN KEY (inbox_id, workspace_id) REFERENCES inboxes(id, workspace_id) ON DELETE CASCADE)""",
        "CREATE INDEX campaign_config_inboxes_inbox_idx ON campaign_config_inboxes (inbox_id)",
        """CREATE TRIGGER campaign_config_inboxes_updated_at BEFORE UPDATE ON campaign_config_inboxes
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
        # Every existing one-inbox config becomes a pool of one.
        """INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position)
        SELECT id, inbox_id, workspace_id, 0 FROM campaign_configs""",
        # campaign_configs.inbox_id stays: it is the pool's first member (position 0), the inbox
        # that the readers of "the campaign's inbox" (pause, enable/disable, recovery, report,
        # monitor, demo) still use. The trigger keeps it a member: a config written with an inbox
        # outside its pool (an older writer, a factory) gets that inbox as its whole pool, so a
        # one-inbox config needs no pool rows written by hand.
        """CREATE FUNCTION campaign_config_primary_inbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM campaign_config_inboxes
                          WHERE config_id = NEW.id AND inbox_id = NEW.inbox_id) THEN
            DELETE FROM campaign_config_inboxes WHERE config_id = NEW.id;
            INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position)
            VALUES (NEW.id, NEW.inbox_id, NEW.workspace_id, 0);
          END IF;
          RETURN NULL;
        END $$""",
        """CREATE TRIGGER campaign_configs_primary_inbox AFTER INSERT OR UPDATE OF inbox_id ON campaign_configs
        FOR EACH ROW EXECUTE FUNCTION campaign_config_primary_inbox()""",
        # Remaining capacity of the day (R-POOL-2) counts what every campaign planned on an inbox
        # for the day: one index range per pool member, however long the message history.
        "CREATE INDEX campaign_messages_inbox_day_idx ON campaign_messages (inbox_id, scheduled_at)",
    ),
)

#: the six intents of AI reply triage (R-IN-5); campaign.inbound.triage.INTENTS is this tuple
TRIAGE_INTENTS = ("interested", "not_interested", "opt_out", "question", "out_of_office", "other")
_INTENT_LIST = ", ".join(f"'{i}'" for i in TRIAGE_INTENTS)

V10 = Migration(
    10,
    "AI reply triage: per-campaign settings, intent -> column map, one triage row per reply (R-IN-5, E-37)",
    (
        "ALTER TABLE campaign_configs ADD COLUMN triage_enabled boolean NOT NULL DEFAULT false",
        "ALTER TABLE campaign_configs ADD COLUMN triage_model text",
        # intent -> column of the campaign's own workspace (E-20 in PostgreSQL: composite keys);
        # a column deleted takes its mapping along (the intent then moves like an unmapped one)
        f"""CREATE TABLE campaign_triage_columns (
        config_id bigint NOT NULL,
        workspace_id bigint NOT NULL,
        intent text NOT NULL CHECK (intent IN ({_INTENT_LIST})),
        column_id bigint NOT NULL,{_TIMESTAMPS},
        PRIMARY KEY (config_id, intent),
        FOREIGN KEY (config_id, workspace_id) REFERENCES campaign_configs(id, workspace_id) ON DELETE CASCADE,
        FOREIGN KEY (column_id, workspace_id) REFERENCES columns(id, workspace_id) ON DELETE CASCADE)""",
        """CREATE TRIGGER campaign_triage_columns_updated_at BEFORE UPDATE ON campaign_triage_columns
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
        # One row per recorded reply of a lead whose campaign has triage on, written in the reply's
        # own transaction: the state the triage actor works on and the recovery sweep finishes
        # (nothing is stuck, E-37). pending -> done (the LLM's intent) | fallback (keyword rules).
        f"""CREATE TABLE reply_triage (
        id bigserial PRIMARY KEY,
        conversation_message_id bigint NOT NULL UNIQUE REFERENCES conversation_messages(id) ON DELETE CASCADE,
        lead_id bigint NOT NULL REFERENCES leads(id) ON DELETE CASCADE,
        config_id bigint NOT NULL REFERENCES campaign_configs(id) ON DELETE CASCADE,
        run_id bigint REFERENCES campaign_runs(id) ON DELETE SET NULL,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'fallback')),
        intent text CHECK (intent IN ({_INTENT_LIST})),
        attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        wake_at timestamptz,
        error_class text,
        error_message text,
        model text,
        prompt_tokens integer,
        completion_tokens integer,
        total_tokens integer,
        cost double precision,
        triage_ms integer,
        finished_at timestamptz,{_TIMESTAMPS},
        CHECK ((status = 'pending') = (intent IS NULL)))""",
        "CREATE INDEX reply_triage_due_idx ON reply_triage (wake_at) WHERE status = 'pending'",
        "CREATE INDEX reply_triage_config_idx ON reply_triage (config_id, intent)",
        "CREATE INDEX reply_triage_run_idx ON reply_triage (run_id) WHERE run_id IS NOT NULL",
        """CREATE TRIGGER reply_triage_updated_at BEFORE UPDATE ON reply_triage
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
    ),
)

V11 = Migration(
    11,
    "follow-ups: days in column, history, exclusions per run (R-SEQ-1..2, R-IN-3)",
    (
        # Leads of before V7 have no column_changed_at: the best evidence of when each entered its
        # column is the engine's last message to it (finalize moves a lead right after its last
        # part), else the row's creation (import placed it there). The same fallback the planner
        # used for skip_if_replied until now; from here the trigger keeps it and it is never NULL,
        # so the eligibility query compares columns, not a sub-select per lead (T-PERF-4).
        """UPDATE leads l SET column_changed_at = coalesce(
               (SELECT max(m.sent_at) FROM campaign_messages m WHERE m.lead_id = l.id), l.created_at)
         WHERE l.column_changed_at IS NULL""",
        "ALTER TABLE leads ALTER COLUMN column_changed_at SET DEFAULT now()",
        "ALTER TABLE leads ALTER COLUMN column_changed_at SET NOT NULL",
        # The planner's one eligibility query reads a column's leads opted out or not (it counts
        # the excluded ones) and compares when they entered it (min_days_in_column).
        "CREATE INDEX leads_column_changed_idx ON leads (column_id, column_changed_at)",
        # A follow-up waits N local days in its source column and may carry the conversation so far.
        """ALTER TABLE campaign_configs ADD COLUMN min_days_in_column integer NOT NULL DEFAULT 0
           CHECK (min_days_in_column BETWEEN 0 AND 3650)""",
        """ALTER TABLE campaign_configs ADD COLUMN history integer NOT NULL DEFAULT 0
           CHECK (history BETWEEN 0 AND 50)""",
        # Leads of the source column a run left out, by rule, counted when it was planned (R-SEQ).
        "ALTER TABLE campaign_runs ADD COLUMN excluded_too_recent integer NOT NULL DEFAULT 0",
        "ALTER TABLE campaign_runs ADD COLUMN excluded_replied integer NOT NULL DEFAULT 0",
        "ALTER TABLE campaign_runs ADD COLUMN excluded_opted_out integer NOT NULL DEFAULT 0",
    ),
)

V12 = Migration(
    12,
    "number health: healthy / throttled / restricted per inbox, send refusals (R-HEALTH-2)",
    (
        # The inbox's health state (R-HEALTH-2) beside `disabled` (R-FAIL-6, an operator's or N
        # failures in a row): since when, until when its cool-down runs, and why. Problems before
        # health_counted_from are not evidence any more (an operator's `inbox enable` forgives them).
        """ALTER TABLE inboxes ADD COLUMN health_state text NOT NULL DEFAULT 'healthy'
        CHECK (health_state IN ('healthy', 'throttled', 'restricted'))""",
        "ALTER TABLE inboxes ADD COLUMN health_since timestamptz",
        "ALTER TABLE inboxes ADD COLUMN health_until timestamptz",
        "ALTER TABLE inboxes ADD COLUMN health_reason text",
        "ALTER TABLE inboxes ADD COLUMN health_counted_from timestamptz",
        """ALTER TABLE inboxes ADD CONSTRAINT inboxes_health_until_check
        CHECK ((health_state = 'healthy') = (health_until IS NULL))""",
        # Every answer that said "this number cannot send" (401/403/404 of the instance, "Connection
        # Closed" while it says open), with its time: the sliding hour of R-HEALTH-2 counts them.
        """CREATE TABLE inbox_refusals (
        id bigserial PRIMARY KEY,
        inbox_id bigint NOT NULL REFERENCES inboxes(id) ON DELETE CASCADE,
        code text NOT NULL,
        at timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX inbox_refusals_inbox_at_idx ON inbox_refusals (inbox_id, at)",
        # The delivery ERRORs of an inbox's last hour: one range of a partial index (only parts that
        # got an ERROR are in it), however long the send history.
        """CREATE INDEX message_parts_delivery_errors_idx ON message_parts (inbox_id, delivery_error_at)
        WHERE delivery_error_at IS NOT NULL""",
    ),
)

V13 = Migration(
    13,
    "warm-up ramps: start cap, days and first send of an inbox (R-HEALTH-1, E-34)",
    (
        # warmup = { start_per_day, days } (both or neither); the ramp needs max_per_day to grow to
        # and starts no higher than it (campaign.capacity draws the curve).
        "ALTER TABLE inboxes ADD COLUMN warmup_start_per_day integer CHECK (warmup_start_per_day > 0)",
        "ALTER TABLE inboxes ADD COLUMN warmup_days integer CHECK (warmup_days > 0)",
        """ALTER TABLE inboxes ADD CONSTRAINT inboxes_warmup_check CHECK (
        (warmup_start_per_day IS NULL) = (warmup_days IS NULL)
        AND (warmup_start_per_day IS NULL
             OR (max_per_day IS NOT NULL AND warmup_start_per_day <= max_per_day)))""",
        # The instant the inbox first started a send: day 0 of its ramp. Set by the send step the
        # first time a part goes `sending`; an inbox that already sent takes its oldest send.
        "ALTER TABLE inboxes ADD COLUMN first_send_at timestamptz",
        """UPDATE inboxes i SET first_send_at = s.first
             FROM (SELECT inbox_id, min(sending_at) AS first FROM message_parts
                    WHERE status IN ('sent', 'in_doubt', 'sending') GROUP BY inbox_id) s
            WHERE s.inbox_id = i.id""",
    ),
)

V14 = Migration(
    14,
    "every inbox has its rate_limits row from its creation (issue 20, T-PERF-7)",
    (
        # The send step takes an inbox's slot inside the statement that claims the part (one round
        # trip); that UPDATE needs the row to exist. It is made with the inbox, by a trigger (an
        # inbox inserted by any path, SQL included, has it), never probed per send.
        """CREATE FUNCTION inbox_rate_limit_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO rate_limits (key) VALUES ('inbox:' || NEW.id) ON CONFLICT (key) DO NOTHING;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER inboxes_rate_limit_row AFTER INSERT ON inboxes
        FOR EACH ROW EXECUTE FUNCTION inbox_rate_limit_row()""",
        "INSERT INTO rate_limits (key) SELECT 'inbox:' || id FROM inboxes ON CONFLICT (key) DO NOTHING",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13, V14)
LATEST = MIGRATIONS[-1].version


def current_version(db: Database | DatabaseProxy) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    db.execute_sql("""CREATE TABLE IF NOT EXISTS schema_version (
        version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
    row = db.execute_sql("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def migrate(db: Database | DatabaseProxy, target: int | None = None) -> list[int]:
    """Apply every migration above the recorded version up to ``target`` (default: latest).

    Returns the versions applied (empty when the schema is already current).
    """
    target = LATEST if target is None else target
    if not 0 <= target <= LATEST:
        raise ValueError(f"unknown schema version {target}; this code knows 1..{LATEST}")
    applied: list[int] = []
    with db.atomic():
        # Transaction-scoped lock: concurrent init-db runs queue here instead of racing.
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        version = current_version(db)
    if version > LATEST:
        raise RuntimeError(f"database schema is version {version}, newer than this code ({LATEST})")
    for migration in MIGRATIONS:
        if migration.version <= version or migration.version > target:
            continue
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            if current_version(db) >= migration.version:
                continue  # another process applied it while we waited for the lock
            for statement in migration.statements:
                db.execute_sql(statement)
            db.execute_sql(
                "INSERT INTO schema_version (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
        log.info("schema migrated to version %s (%s)", migration.version, migration.name)
        applied.append(migration.version)
    return applied
