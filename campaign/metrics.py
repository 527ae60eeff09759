"""Prometheus metrics of the engine (SPEC R-OBS-1): names under ``campaign_``, bounded labels only.

Two kinds:

* **Process metrics** every entry point owns (the scheduler's leader flag, the webhook's requests,
  the inbound consumer's events, the process's CPU / memory / GC); each process serves its own
  registry on ``METRICS_PORT`` (:func:`serve`).
* **Database gauges**: what PostgreSQL knows (messages by status and reason, parts, in doubt, dead
  letters, replies / opt-outs, tokens, per-inbox pacing and health, queue depths, heartbeat). The
  ACTIVE scheduler computes them on an interval in a handful of statements (:func:`refresh`) and
  serves them; a standby clears them, so a sum over every scheduler never counts twice and a
  scrape never costs a query.

Labels are bounded (R-OBS-1): workspace, campaign, inbox, status / outcome / reason (fixed
vocabularies), queue (the pipeline's queues) and alert (the R-OPS-4 kinds) -- never a lead, a
phone, a message id, a text or a secret. ``LABELS`` lists every label a metric may carry; a test
scrapes every endpoint after a run and refuses anything else.

Workers are not served from here: Dramatiq's own Prometheus middleware (multiprocess-safe,
``dramatiq_prom_port``) exports their actor metrics, step latencies included
(``dramatiq_message_duration_milliseconds`` by actor = step). This module must therefore not be
imported by the worker's code path before Dramatiq's process boot (prometheus_client picks its
multiprocess mode at import).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from campaign import capacity, health
from campaign.db import db

log = logging.getLogger(__name__)

PREFIX = "campaign_"

#: every label an engine metric may carry (bounded vocabularies; see the module docstring)
LABELS = frozenset(
    {"workspace", "campaign", "inbox", "status", "outcome", "reason", "queue", "alert", "state", "event"}
)

#: one registry per process: only the engine's metrics and the process/platform collectors
REGISTRY = CollectorRegistry(auto_describe=True)


def _register_default_collectors(registry: CollectorRegistry) -> None:
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)


_register_default_collectors(REGISTRY)

# ---------------------------------------------------------------------------------------------
# process metrics
# ---------------------------------------------------------------------------------------------

SCHEDULER_LEADER = Gauge(
    "campaign_scheduler_leader", "1 while this scheduler process holds the leader lock, else 0", registry=REGISTRY
)
WEBHOOK_REQUESTS = Counter(
    "campaign_webhook_requests_total",
    "Webhook requests answered, by HTTP status (outcome)",
    ["outcome"],
    registry=REGISTRY,
)

#: the inbound consumer's tallies (registered by inbound.py with :func:`register_counts`)
INBOUND_CONSUMED = "campaign_inbound_consumed"


class CountsCollector(Collector):
    """A counter read at scrape time from a process's own tallies (e.g. the inbound consumer's
    ``Stats.by_result``): the code that counts stays free of prometheus_client."""

    def __init__(self, name: str, documentation: str, label: str, counts: Callable[[], Mapping[str, int]]) -> None:
        self.name, self.documentation, self.label, self.counts = name, documentation, label, counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, n in sorted(dict(self.counts()).items()):
            family.add_metric([value], n)
        yield family


def register_counts(name: str, documentation: str, label: str, counts: Callable[[], Mapping[str, int]]) -> None:
    """Export ``counts()`` (label value -> count) as the counter ``name`` of this process."""
    REGISTRY.register(CountsCollector(name, documentation, label, counts))


# ---------------------------------------------------------------------------------------------
# database gauges (set by the active scheduler only)
# ---------------------------------------------------------------------------------------------

#: the database gauges live apart and are exported (through :class:`_WhileLive`) only after a
#: refresh and until :func:`clear`: a standby scheduler exports none of them, not even stale zeros
DB_REGISTRY = CollectorRegistry(auto_describe=True)


class _WhileLive(Collector):
    def __init__(self) -> None:
        self.live = False

    def collect(self) -> Iterator[Metric]:
        if self.live:
            yield from DB_REGISTRY.collect()


_DB_EXPORT = _WhileLive()
REGISTRY.register(_DB_EXPORT)

MESSAGES = Gauge(
    "campaign_messages",
    "Campaign messages by status (every run's messages; sent, failed, skipped, in_doubt are final)",
    ["workspace", "campaign", "status"],
    registry=DB_REGISTRY,
)
MESSAGES_ENDED = Gauge(
    "campaign_messages_ended",
    "Finished messages by outcome (failed / skipped) and reason (error class, skip or stop reason)",
    ["workspace", "campaign", "outcome", "reason"],
    registry=DB_REGISTRY,
)
PARTS = Gauge(
    "campaign_message_parts",
    "Message parts by status (sent = WhatsApp messages that left; in_doubt = unknown fate)",
    ["workspace", "campaign", "status"],
    registry=DB_REGISTRY,
)
LLM_TOKENS = Gauge(
    "campaign_llm_tokens",
    "LLM tokens recorded on generated messages (generation only: triage's are campaign_triage_tokens)",
    ["workspace", "campaign"],
    registry=DB_REGISTRY,
)
REPLY_INTENTS = Gauge(
    "campaign_reply_intents",
    "Replies by AI triage intent (R-IN-5); source llm, keywords (the LLM failed, E-37) or pending",
    ["workspace", "campaign", "intent", "source"],
    registry=DB_REGISTRY,
)
TRIAGE_TOKENS = Gauge(
    "campaign_triage_tokens",
    "LLM tokens spent by reply triage (apart from generation's campaign_llm_tokens)",
    ["workspace", "campaign"],
    registry=DB_REGISTRY,
)
TRIAGE_COST = Gauge(
    "campaign_triage_cost",
    "What reply triage cost, in OpenRouter credits (usage.cost; absent when never reported)",
    ["workspace", "campaign"],
    registry=DB_REGISTRY,
)
MESSAGES_STUCK = Gauge("campaign_messages_stuck", "Messages in flight longer than 2 h (R-OPS-4)", registry=DB_REGISTRY)
DEAD_LETTERS = Gauge(
    "campaign_dead_letters",
    "Dead letters recorded in PostgreSQL and not yet resolved, by queue",
    ["queue"],
    registry=DB_REGISTRY,
)
INBOUND_EVENTS = Gauge(
    "campaign_inbound_events",
    "Inbound message events recorded, by inbox and outcome (reply, opt_out, unknown_sender, ...)",
    ["workspace", "inbox", "outcome"],
    registry=DB_REGISTRY,
)
INBOX_CONNECTION = Gauge(
    "campaign_inbox_connection_state",
    "1 for the inbox's current connection state (open, close, connecting, error, unknown)",
    ["workspace", "inbox", "state"],
    registry=DB_REGISTRY,
)
INBOX_DISABLED = Gauge(
    "campaign_inbox_disabled", "1 while the inbox is disabled", ["workspace", "inbox"], registry=DB_REGISTRY
)
INBOX_HEALTH = Gauge(
    "campaign_inbox_health_state",
    "1 for the inbox's current health state (healthy, throttled, restricted; R-HEALTH-2)",
    ["workspace", "inbox", "state"],
    registry=DB_REGISTRY,
)
INBOX_REPLY_RATIO = Gauge(
    "campaign_inbox_reply_ratio",
    "Replies / leads messaged by the inbox in the last 7 days (R-HEALTH-3; absent when it messaged nobody)",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
INBOX_DISCONNECTED = Gauge(
    "campaign_inbox_disconnected_seconds",
    "How long the inbox has been disconnected (0 while connected)",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
INBOX_SENT_HOUR = Gauge(
    "campaign_inbox_parts_sent_last_hour",
    "Parts the inbox sent in the last hour",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
INBOX_SENT_DAY = Gauge(
    "campaign_inbox_parts_sent_last_day",
    "Parts the inbox sent in the last 24 h",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
INBOX_CAP_HOUR = Gauge(
    "campaign_inbox_max_per_hour",
    "The inbox's hourly cap (absent when uncapped)",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
INBOX_CAP_DAY = Gauge(
    "campaign_inbox_max_per_day",
    "The inbox's effective daily cap now: warm-up ramp included (absent when uncapped)",
    ["workspace", "inbox"],
    registry=DB_REGISTRY,
)
QUEUE_MESSAGES = Gauge(
    "campaign_queue_messages", "Ready messages per pipeline queue (steps, .DQ, .XQ)", ["queue"], registry=DB_REGISTRY
)
HEARTBEAT = Gauge(
    "campaign_scheduler_heartbeat_timestamp_seconds",
    "Unix time of the scheduler's last heartbeat row",
    registry=DB_REGISTRY,
)
ALERTS = Gauge(
    "campaign_alerts",
    "R-OPS-4 alerts firing now, by kind (the same computation as `status` and the ERROR log)",
    ["alert"],
    registry=DB_REGISTRY,
)
REFRESHED = Gauge(
    "campaign_metrics_refreshed_timestamp_seconds",
    "Unix time the database gauges were last computed",
    registry=DB_REGISTRY,
)
REFRESH_SECONDS = Gauge(
    "campaign_metrics_refresh_duration_seconds",
    "How long the last refresh of the database gauges took",
    registry=DB_REGISTRY,
)

#: the R-OPS-4 alert kinds (campaign.ops.monitor.alerts); each is exported, 0 when quiet
ALERT_KINDS = (
    "stuck_messages",
    "failure_ratio",
    "scheduler_heartbeat",
    "inbox_disconnected",
    "inbox_restricted",
    "dead_letters",
)


def metric_names() -> set[str]:
    """Every sample name this module can export (``campaign_*``), for the dashboard/rules checks."""
    names = {f"{INBOUND_CONSUMED}_total"}
    for registry in (REGISTRY, DB_REGISTRY):
        for family in registry.collect():
            if family.name.startswith(PREFIX):
                names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


_DB_GAUGES: tuple[Gauge, ...] = (
    MESSAGES, MESSAGES_ENDED, PARTS, LLM_TOKENS, REPLY_INTENTS, TRIAGE_TOKENS, TRIAGE_COST, MESSAGES_STUCK,
    DEAD_LETTERS, INBOUND_EVENTS, INBOX_CONNECTION, INBOX_DISABLED, INBOX_HEALTH, INBOX_REPLY_RATIO,
    INBOX_DISCONNECTED, INBOX_SENT_HOUR,
    INBOX_SENT_DAY, INBOX_CAP_HOUR, INBOX_CAP_DAY, QUEUE_MESSAGES, HEARTBEAT, ALERTS, REFRESHED, REFRESH_SECONDS,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# the refresh: five statements, whatever the number of campaigns and inboxes
# ---------------------------------------------------------------------------------------------

_MESSAGES_SQL = """
    SELECT w.name AS workspace, c.name AS campaign, m.status,
           CASE WHEN m.status IN ('failed', 'skipped')
                THEN coalesce(m.stop_reason, m.skip_reason, m.error_class, 'unknown') END AS reason,
           count(*) AS n, coalesce(sum(m.tokens_used), 0) AS tokens
      FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
      JOIN campaign_configs c ON c.id = r.config_id JOIN workspaces w ON w.id = c.workspace_id
     GROUP BY 1, 2, 3, 4"""

_PARTS_SQL = """
    SELECT w.name AS workspace, c.name AS campaign, p.status, count(*) AS n
      FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
      JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
      JOIN workspaces w ON w.id = c.workspace_id
     GROUP BY 1, 2, 3"""

_INBOXES_SQL = f"""
    SELECT w.name AS workspace, i.name AS inbox, i.connection_state, i.disabled, {capacity.hourly_cap_sql("i")},
           {capacity.daily_cap_sql("i")}, i.health_state, i.id,
           coalesce(extract(epoch FROM now() - i.disconnected_since), 0) AS disconnected_s,
           (SELECT count(*) FROM message_parts p
             WHERE p.inbox_id = i.id AND p.status = 'sent' AND p.sent_at > now() - interval '1 hour') AS sent_hour,
           (SELECT count(*) FROM message_parts p
             WHERE p.inbox_id = i.id AND p.status = 'sent' AND p.sent_at > now() - interval '1 day') AS sent_day,
           coalesce((SELECT json_object_agg(e.outcome, e.n) FROM (
               SELECT outcome, count(*) AS n FROM inbound_events WHERE inbox_id = i.id GROUP BY outcome) e),
               '{{}}'::json) AS inbound
      FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id"""

_OPS_SQL = """
    SELECT (SELECT count(*) FROM campaign_messages
             WHERE status IN ('queued', 'generating', 'splitting', 'sending')
               AND status_changed_at < now() - interval '2 hours') AS stuck,
           (SELECT extract(epoch FROM max(beat_at)) FROM scheduler_heartbeats WHERE name = 'scheduler') AS beat,
           coalesce((SELECT json_object_agg(queue, n) FROM (
               SELECT queue, count(*) AS n FROM dead_letters WHERE status = 'dead' GROUP BY queue) d),
               '{}'::json) AS dead"""


_TRIAGE_SQL = """
    SELECT w.name AS workspace, c.name AS campaign, coalesce(t.intent, 'pending') AS intent,
           CASE t.status WHEN 'done' THEN 'llm' WHEN 'fallback' THEN 'keywords' ELSE 'pending' END AS source,
           count(*) AS n, coalesce(sum(t.total_tokens), 0) AS tokens, sum(t.cost) AS cost
      FROM reply_triage t JOIN campaign_configs c ON c.id = t.config_id JOIN workspaces w ON w.id = c.workspace_id
     GROUP BY 1, 2, 3, 4"""


@dataclass(frozen=True)
class Snapshot:
    """What one refresh read (also returned to the caller, e.g. a test or the demo)."""

    messages: list[tuple]
    parts: list[tuple]
    inboxes: list[tuple]
    ops: tuple
    triage: list[tuple] = field(default_factory=list)  # reply triage per campaign, intent, source
    reply_ratios: dict[int, tuple[int, int]] = field(default_factory=dict)  # inbox id -> (messaged, replied)


def read_snapshot() -> Snapshot:
    """The five statements (one round trip each) behind every database gauge."""
    return Snapshot(
        messages=list(db.execute_sql(_MESSAGES_SQL).fetchall()),
        parts=list(db.execute_sql(_PARTS_SQL).fetchall()),
        inboxes=list(db.execute_sql(_INBOXES_SQL).fetchall()),
        ops=tuple(db.execute_sql(_OPS_SQL).fetchone()),
        triage=list(db.execute_sql(_TRIAGE_SQL).fetchall()),
        reply_ratios={i: (r.messaged, r.replied) for i, r in health.reply_ratios().items()},
    )


def _set_triage(rows: Iterable[tuple]) -> None:
    tokens: dict[tuple[str, str], float] = {}
    costs: dict[tuple[str, str], float] = {}
    for workspace, campaign, intent, source, n, used, cost in rows:
        REPLY_INTENTS.labels(workspace, campaign, intent, source).set(n)
        tokens[(workspace, campaign)] = tokens.get((workspace, campaign), 0) + float(used)
        if cost is not None:
            costs[(workspace, campaign)] = costs.get((workspace, campaign), 0) + float(cost)
    for key, total in tokens.items():
        TRIAGE_TOKENS.labels(*key).set(total)
    for key, total in costs.items():
        TRIAGE_COST.labels(*key).set(total)


def _set_messages(rows: Iterable[tuple]) -> None:
    statuses: dict[tuple[str, str, str], float] = {}
    tokens: dict[tuple[str, str], float] = {}
    for workspace, campaign, status, reason, n, used in rows:
        statuses[(workspace, campaign, status)] = statuses.get((workspace, campaign, status), 0) + n
        tokens[(workspace, campaign)] = tokens.get((workspace, campaign), 0) + float(used)
        if reason is not None:
            MESSAGES_ENDED.labels(workspace, campaign, status, reason).set(n)
    for status_key, count in statuses.items():
        MESSAGES.labels(*status_key).set(count)
    for campaign_key, total in tokens.items():
        LLM_TOKENS.labels(*campaign_key).set(total)


def _set_inboxes(rows: Iterable[tuple], replies: Mapping[int, tuple[int, int]]) -> None:
    for row in rows:
        workspace, inbox, state, disabled, per_hour, per_day, health, inbox_id = row[:8]
        disconnected_s, hour, day, inbound = row[8:]
        INBOX_CONNECTION.labels(workspace, inbox, state).set(1)
        INBOX_HEALTH.labels(workspace, inbox, health).set(1)
        messaged, replied = replies.get(inbox_id, (0, 0))
        if messaged:
            INBOX_REPLY_RATIO.labels(workspace, inbox).set(replied / messaged)
        INBOX_DISABLED.labels(workspace, inbox).set(1 if disabled else 0)
        INBOX_DISCONNECTED.labels(workspace, inbox).set(float(disconnected_s))
        INBOX_SENT_HOUR.labels(workspace, inbox).set(hour)
        INBOX_SENT_DAY.labels(workspace, inbox).set(day)
        if per_hour is not None:
            INBOX_CAP_HOUR.labels(workspace, inbox).set(per_hour)
        if per_day is not None:
            INBOX_CAP_DAY.labels(workspace, inbox).set(per_day)
        for outcome, n in (inbound or {}).items():
            INBOUND_EVENTS.labels(workspace, inbox, outcome).set(n)


def apply_snapshot(
    snap: Snapshot, *, queue_depths: Mapping[str, int | None] | None = None, alerts: Iterable[str] = ()
) -> None:
    """Replace every database gauge with ``snap`` (labels that vanished from the data vanish too)."""
    _clear_values()
    _set_messages(snap.messages)
    for workspace, campaign, status, n in snap.parts:
        PARTS.labels(workspace, campaign, status).set(n)
    _set_inboxes(snap.inboxes, snap.reply_ratios)
    _set_triage(snap.triage)
    stuck, beat, dead = snap.ops
    MESSAGES_STUCK.set(stuck)
    if beat is not None:
        HEARTBEAT.set(float(beat))
    for queue, n in (dead or {}).items():
        DEAD_LETTERS.labels(queue).set(n)
    for queue, depth in (queue_depths or {}).items():
        if depth is not None:  # RabbitMQ unreachable: absent, not a false 0
            QUEUE_MESSAGES.labels(queue).set(depth)
    firing = list(alerts)
    for kind in ALERT_KINDS:
        ALERTS.labels(kind).set(firing.count(kind))


def refresh(*, queue_depths: Mapping[str, int | None] | None = None, alerts: Iterable[str] = ()) -> Snapshot:
    """Read the database gauges (five statements) and publish them; returns what was read."""
    started = time.monotonic()
    snap = read_snapshot()
    apply_snapshot(snap, queue_depths=queue_depths, alerts=alerts)
    REFRESHED.set(time.time())
    REFRESH_SECONDS.set(time.monotonic() - started)
    _DB_EXPORT.live = True
    return snap


def clear() -> None:
    """Drop every database gauge (a standby scheduler exports none)."""
    _DB_EXPORT.live = False
    _clear_values()


def _clear_values() -> None:
    for gauge in _DB_GAUGES:
        if gauge._labelnames:  # an unlabelled gauge has one value, overwritten by the next refresh
            gauge.clear()


# ---------------------------------------------------------------------------------------------
# the endpoint
# ---------------------------------------------------------------------------------------------

_server_lock = threading.Lock()
_server_port: int | None = None


def serve(port: int | None, host: str = "0.0.0.0") -> int | None:
    """Serve ``/metrics`` of this process on ``port`` (None: off); returns the bound port.

    prometheus_client's own threaded server, on its own port rather than a route of the webhook:
    the webhook's port faces Evolution API with a hardened parser and a secret, the metrics port
    faces Prometheus inside the network, and every process serves the same way.
    """
    global _server_port
    if port is None:
        return None
    with _server_lock:
        if _server_port is not None:
            return _server_port
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        _server_port = int(server.server_address[1])
    log.info("metrics: serving /metrics on %s:%s", host, _server_port)
    return _server_port
