"""One settings object, read from the environment once at start-up (SPEC §4.7).

Nothing here does I/O at import time: entry points call ``get_settings()`` (or
``Settings.from_env()``) and pass the object on. ``os.environ`` is read in this module only.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from campaign.errors import ConfigError

__all__ = ["Settings", "get_settings", "reset_settings", "redact_url", "amqp_urls", "amqp_parameters"]

#: separates the nodes of a RabbitMQ cluster in RABBITMQ_URL (the form dramatiq itself accepts)
AMQP_URL_SEPARATOR = ";"


def amqp_urls(url: str) -> list[str]:
    """The node URLs of an AMQP setting: ``amqp://h1/v;amqp://h2/v`` -> two URLs, in order (R-SCALE-2).

    One URL per node, each complete (credentials, vhost, query string): a client tries them in
    order and connects to the first that answers.
    """
    return [part.strip() for part in url.split(AMQP_URL_SEPARATOR) if part.strip()]


def amqp_parameters(url: str, **attrs: Any) -> list[Any]:
    """One ``pika.URLParameters`` per node of ``url`` (see :func:`amqp_urls`), each with ``attrs`` set.

    ``pika.BlockingConnection`` takes the list and connects to the first node that answers, so a
    process (re)connecting after its node died lands on a live one (R-SCALE-2).
    """
    import pika  # here, not at import time: settings is imported by processes that never use AMQP

    out = []
    for node in amqp_urls(url):
        params = pika.URLParameters(node)
        for name, value in attrs.items():
            setattr(params, name, value)
        out.append(params)
    return out


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to log); every node of a
    ``;``-separated RabbitMQ node list is redacted."""
    if AMQP_URL_SEPARATOR in url and "://" in url:
        return AMQP_URL_SEPARATOR.join(_redact_one(u) for u in url.split(AMQP_URL_SEPARATOR))
    return _redact_one(url)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _int_in(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is out of range {lo}..{hi}")
        return value

    return parse


def _float_in(name: str, lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is out of range {lo}..{hi}")
        return value

    return parse


def _name(name: str) -> Callable[[str], str]:
    """An AMQP exchange/queue-name part: letters, digits and ``_ . -``, at most 100 characters."""

    def parse(raw: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", raw):
            raise ConfigError(f"{name}={raw!r} must be 1-100 letters, digits, '_', '.' or '-'")
        return raw

    return parse


def _choice(name: str, *allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ConfigError(f"{name}={raw!r} must be one of {', '.join(allowed)}")
        return raw

    return parse


def _url(name: str, *schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        try:
            scheme = urlsplit(raw).scheme
        except ValueError:
            scheme = ""
        if scheme not in schemes:
            raise ConfigError(f"{name}={redact_url(raw)!r} must be a {'/'.join(schemes)} URL")
        return raw.rstrip("/") if scheme.startswith("http") else raw

    return parse


def _amqp_nodes(name: str) -> Callable[[str], str]:
    """One AMQP URL, or several separated by ``;`` (the nodes of a cluster, tried in order)."""
    one = _url(name, "amqp", "amqps")

    def parse(raw: str) -> str:
        parts = raw.split(AMQP_URL_SEPARATOR)
        if len(parts) > 1 and any(not p.strip() for p in parts):
            raise ConfigError(f"{name}={redact_url(raw)!r} has an empty node between ';' separators")
        for i, part in enumerate(parts, 1):
            try:
                one(part.strip())
            except ConfigError:
                where = f" (node {i} of {len(parts)}: {redact_url(part.strip())!r})" if len(parts) > 1 else ""
                raise ConfigError(
                    f"{name}={redact_url(raw)!r} must be an amqp/amqps URL, or several separated by ';'{where}"
                ) from None
        return AMQP_URL_SEPARATOR.join(p.strip() for p in parts)

    return parse


def _host(name: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        # a hostname, an IPv4 address or an IPv6 address (bracketed or not); no scheme, port or path
        if not re.fullmatch(r"\[?[A-Za-z0-9._:-]{1,253}\]?", raw):
            raise ConfigError(f"{name}={raw!r} must be a host name or IP address (e.g. 0.0.0.0)")
        return raw.strip("[]")

    return parse


def _secret(env: str) -> dict:
    return {"env": env, "secret": True}


@dataclass(frozen=True)
class Settings:
    """Every setting of the engine; field metadata names its environment variable."""

    # -- interface names (SPEC §4.7) --------------------------------------------------------
    database_url: str = field(
        default="postgresql://postgres@127.0.0.1:5432/campaigns",
        metadata={"env": "DATABASE_URL", "parse": _url("DATABASE_URL", "postgresql", "postgres")},
    )
    rabbitmq_url: str = field(
        default="amqp://guest:guest@127.0.0.1:5672/%2F",
        metadata={"env": "RABBITMQ_URL", "parse": _amqp_nodes("RABBITMQ_URL")},
    )
    openrouter_base_url: str = field(
        default="https://openrouter.ai/api/v1",
        metadata={"env": "OPENROUTER_BASE_URL", "parse": _url("OPENROUTER_BASE_URL", "http", "https")},
    )
    openrouter_api_key: str = field(default="", repr=False, metadata=_secret("OPENROUTER_API_KEY"))
    evolution_api_url: str = field(
        default="http://127.0.0.1:8080",
        metadata={"env": "EVOLUTION_API_URL", "parse": _url("EVOLUTION_API_URL", "http", "https")},
    )
    evolution_api_key: str = field(default="", repr=False, metadata=_secret("EVOLUTION_API_KEY"))
    webhook_secret: str = field(default="", repr=False, metadata=_secret("WEBHOOK_SECRET"))
    # The broker Evolution API publishes its events to (RABBITMQ_GLOBAL_ENABLED=true); empty: the
    # inbound consumer refuses to start (R-IN-1). May be the engine's own RabbitMQ.
    evolution_events_rabbitmq_url: str = field(
        default="",
        metadata={
            "env": "EVOLUTION_EVENTS_RABBITMQ_URL",
            "parse": _amqp_nodes("EVOLUTION_EVENTS_RABBITMQ_URL"),
        },
    )
    #: classic (default, one node) or quorum (replicated, for a cluster of 3+ nodes): R-SCALE-1
    rabbitmq_queue_type: str = field(
        default="classic",
        metadata={"env": "RABBITMQ_QUEUE_TYPE", "parse": _choice("RABBITMQ_QUEUE_TYPE", "classic", "quorum")},
    )
    evolution_events_exchange: str = field(
        default="evolution",
        metadata={"env": "EVOLUTION_EVENTS_EXCHANGE", "parse": _name("EVOLUTION_EVENTS_EXCHANGE")},
    )
    evolution_events_prefix: str = field(
        default="evolution",
        metadata={"env": "EVOLUTION_EVENTS_PREFIX", "parse": _name("EVOLUTION_EVENTS_PREFIX")},
    )

    # -- engine tuning (validated: a bad value is a start-up error, R-DISP-5) ---------------
    broker: str = field(
        default="rabbitmq", metadata={"env": "CAMPAIGN_BROKER", "parse": _choice("CAMPAIGN_BROKER", "rabbitmq", "stub")}
    )
    dispatch_batch_size: int = field(
        default=200, metadata={"env": "DISPATCH_BATCH_SIZE", "parse": _int_in("DISPATCH_BATCH_SIZE", 1, 1000)}
    )
    #: a message is claimed for generation only when its inbox's caps let it send within this
    #: long; otherwise it stays pending and its due time moves to when they will (R-DISP-2)
    dispatch_horizon_seconds: float = field(
        default=120.0,
        metadata={"env": "DISPATCH_HORIZON_SECONDS", "parse": _float_in("DISPATCH_HORIZON_SECONDS", 1, 3600)},
    )
    dispatch_interval_seconds: float = field(
        default=1.0,
        metadata={"env": "DISPATCH_INTERVAL_SECONDS", "parse": _float_in("DISPATCH_INTERVAL_SECONDS", 0.1, 60)},
    )
    recovery_interval_seconds: float = field(
        default=10.0,
        metadata={"env": "RECOVERY_INTERVAL_SECONDS", "parse": _float_in("RECOVERY_INTERVAL_SECONDS", 1, 3600)},
    )
    inbox_health_interval_seconds: float = field(
        default=60.0,
        metadata={"env": "INBOX_HEALTH_INTERVAL_SECONDS", "parse": _float_in("INBOX_HEALTH_INTERVAL_SECONDS", 1, 3600)},
    )
    max_lateness_seconds: int = field(
        default=3600, metadata={"env": "MAX_LATENESS_SECONDS", "parse": _int_in("MAX_LATENESS_SECONDS", 60, 86400)}
    )
    lease_seconds: int = field(
        default=600, metadata={"env": "LEASE_SECONDS", "parse": _int_in("LEASE_SECONDS", 5, 86400)}
    )
    send_timeout_seconds: float = field(
        default=30.0, metadata={"env": "SEND_TIMEOUT_SECONDS", "parse": _float_in("SEND_TIMEOUT_SECONDS", 1, 300)}
    )
    llm_timeout_seconds: float = field(
        default=60.0, metadata={"env": "LLM_TIMEOUT_SECONDS", "parse": _float_in("LLM_TIMEOUT_SECONDS", 1, 600)}
    )
    max_attempts: int = field(default=5, metadata={"env": "MAX_ATTEMPTS", "parse": _int_in("MAX_ATTEMPTS", 1, 50)})
    min_backoff_seconds: float = field(
        default=2.0, metadata={"env": "MIN_BACKOFF_SECONDS", "parse": _float_in("MIN_BACKOFF_SECONDS", 0.01, 3600)}
    )
    max_backoff_seconds: float = field(
        default=300.0, metadata={"env": "MAX_BACKOFF_SECONDS", "parse": _float_in("MAX_BACKOFF_SECONDS", 0.01, 86400)}
    )
    handoff_grace_seconds: float = field(
        default=15.0, metadata={"env": "HANDOFF_GRACE_SECONDS", "parse": _float_in("HANDOFF_GRACE_SECONDS", 1, 3600)}
    )
    connection_state_max_age_seconds: float = field(
        default=60.0,
        metadata={
            "env": "CONNECTION_STATE_MAX_AGE_SECONDS",
            "parse": _float_in("CONNECTION_STATE_MAX_AGE_SECONDS", 1, 3600),
        },
    )
    gateway_outage_tolerance_seconds: float = field(
        default=900.0,
        metadata={
            "env": "GATEWAY_OUTAGE_TOLERANCE_SECONDS",
            "parse": _float_in("GATEWAY_OUTAGE_TOLERANCE_SECONDS", 0, 86400),
        },
    )
    #: a pool member disconnected this long hands its not-started messages to the pool's other
    #: members (R-POOL-3, E-33); a disabled or restricted member hands them over at once
    pool_failover_seconds: float = field(
        default=120.0,
        metadata={"env": "POOL_FAILOVER_SECONDS", "parse": _float_in("POOL_FAILOVER_SECONDS", 0, 86400)},
    )
    inbox_failure_limit: int = field(
        default=5, metadata={"env": "INBOX_FAILURE_LIMIT", "parse": _int_in("INBOX_FAILURE_LIMIT", 1, 1000)}
    )
    #: R-HEALTH-2: delivery ERRORs + send refusals in the sliding hour that throttle an inbox, AND
    #: at least this share of the hour's sends; restrict it at the second pair; how long it lasts
    health_throttle_errors: int = field(
        default=5, metadata={"env": "HEALTH_THROTTLE_ERRORS", "parse": _int_in("HEALTH_THROTTLE_ERRORS", 1, 100000)}
    )
    health_throttle_ratio: float = field(
        default=0.05,
        metadata={"env": "HEALTH_THROTTLE_RATIO", "parse": _float_in("HEALTH_THROTTLE_RATIO", 0.0, 1.0)},
    )
    health_restrict_errors: int = field(
        default=15, metadata={"env": "HEALTH_RESTRICT_ERRORS", "parse": _int_in("HEALTH_RESTRICT_ERRORS", 1, 100000)}
    )
    health_restrict_ratio: float = field(
        default=0.15,
        metadata={"env": "HEALTH_RESTRICT_RATIO", "parse": _float_in("HEALTH_RESTRICT_RATIO", 0.0, 1.0)},
    )
    health_cooldown_hours: float = field(
        default=24.0,
        metadata={"env": "HEALTH_COOLDOWN_HOURS", "parse": _float_in("HEALTH_COOLDOWN_HOURS", 0.001, 24 * 30)},
    )
    error_threshold_ratio: float = field(
        default=0.10, metadata={"env": "ERROR_THRESHOLD_RATIO", "parse": _float_in("ERROR_THRESHOLD_RATIO", 0.0, 1.0)}
    )
    error_threshold_min_processed: int = field(
        default=20,
        metadata={"env": "ERROR_THRESHOLD_MIN_PROCESSED", "parse": _int_in("ERROR_THRESHOLD_MIN_PROCESSED", 1, 100000)},
    )
    openrouter_requests_per_minute: int = field(
        default=600,
        metadata={
            "env": "OPENROUTER_REQUESTS_PER_MINUTE",
            "parse": _int_in("OPENROUTER_REQUESTS_PER_MINUTE", 1, 1000000),
        },
    )
    db_max_connections: int = field(
        default=32, metadata={"env": "DB_MAX_CONNECTIONS", "parse": _int_in("DB_MAX_CONNECTIONS", 1, 1000)}
    )
    log_level: str = field(
        default="INFO",
        metadata={"env": "LOG_LEVEL", "parse": _choice("LOG_LEVEL", "DEBUG", "INFO", "WARNING", "ERROR")},
    )
    webhook_host: str = field(default="0.0.0.0", metadata={"env": "WEBHOOK_HOST", "parse": _host("WEBHOOK_HOST")})
    webhook_port: int = field(
        default=8090, metadata={"env": "WEBHOOK_PORT", "parse": _int_in("WEBHOOK_PORT", 1, 65535)}
    )
    #: where the scheduler, the inbound consumer and the webhook serve Prometheus ``/metrics``
    #: (R-OBS-1); unset = no metrics server (and no Prometheus middleware in the workers, which
    #: serve on Dramatiq's own ``dramatiq_prom_port``). 0 picks a free port (tests).
    metrics_port: int | None = field(
        default=None, metadata={"env": "METRICS_PORT", "parse": _int_in("METRICS_PORT", 0, 65535)}
    )
    #: unacknowledged events the inbound consumer holds at most (R-IN-1: bounded prefetch)
    inbound_prefetch: int = field(
        default=200, metadata={"env": "INBOUND_PREFETCH", "parse": _int_in("INBOUND_PREFETCH", 1, 10000)}
    )
    #: logfmt ``key=value`` lines (default) or one JSON object per line (R-OPS-6)
    log_format: str = field(
        default="text", metadata={"env": "LOG_FORMAT", "parse": _choice("LOG_FORMAT", "text", "json")}
    )

    def __post_init__(self) -> None:
        if self.min_backoff_seconds > self.max_backoff_seconds:
            raise ConfigError("MIN_BACKOFF_SECONDS must not exceed MAX_BACKOFF_SECONDS")
        if self.lease_seconds < self.max_backoff_seconds:
            # a message waiting out its backoff would be re-enqueued by the sweep as "stuck"
            raise ConfigError("LEASE_SECONDS must be at least MAX_BACKOFF_SECONDS")
        if self.health_restrict_errors < self.health_throttle_errors:
            raise ConfigError("HEALTH_RESTRICT_ERRORS must not be below HEALTH_THROTTLE_ERRORS")
        if self.health_restrict_ratio < self.health_throttle_ratio:
            raise ConfigError("HEALTH_RESTRICT_RATIO must not be below HEALTH_THROTTLE_RATIO")

    @property
    def send_lease_seconds(self) -> float:
        """How long an inbox's send slot is held at most: longer than the send actor may live.

        A send is pool 5 + connect 5 + write 10 + read SEND_TIMEOUT, plus a connectionState probe
        after a failure; the send actor's time limit (this minus 10 s) kills anything slower, so a
        live holder never outlives its lease (one send in flight per inbox, R-RATE-1).
        """
        return 2 * self.send_timeout_seconds + 40

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise ConfigError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            parse = f.metadata.get("parse")
            values[f.name] = parse(raw.strip()) if parse else raw
        return cls(**values)

    def describe(self) -> dict[str, str]:
        """Settings by environment name, secrets masked and URL passwords redacted (safe to log)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                out[f.metadata["env"]] = "***" if value else "(unset)"
            elif isinstance(value, str) and "://" in value:
                out[f.metadata["env"]] = redact_url(value)
            else:
                out[f.metadata["env"]] = str(value)
        return out

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v}" for k, v in self.describe().items()) + ")"


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_env()
        return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    global _settings
    with _lock:
        _settings = None
