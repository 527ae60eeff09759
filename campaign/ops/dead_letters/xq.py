"""The RabbitMQ side of the dead letters: the ``.XQ`` browser (holds copies unacknowledged) and their decoding."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from campaign.errors import ConfigError
from campaign.ops.repairs import REQUEUE_TARGETS
from campaign.settings import Settings, redact_url

log = logging.getLogger(__name__)

UTC = dt.UTC
KNOWN_ACTORS = tuple(REQUEUE_TARGETS)  # generate, split, send_part
#: a browse never holds more than this many messages per XQ (the rest stays untouched, and is said so)
BROWSE_LIMIT = 50_000


@dataclasses.dataclass
class XqMessage:
    """One message fetched (unacknowledged) from a pipeline ``.XQ``."""

    queue: str  # the pipeline queue (without .XQ)
    delivery_tag: int
    key: str  # the Dramatiq message id, or raw-<sha1> for an undecodable body
    body: bytes
    actor: str | None = None
    args: list | None = None
    campaign_message_id: int | None = None
    dead_at: dt.datetime | None = None
    last_error: str | None = None  # the traceback's last line of the previous attempt, if any
    problem: str | None = None  # why it cannot be requeued (malformed, unknown actor)


def decode_xq(queue: str, delivery_tag: int, properties: Any, body: bytes) -> XqMessage:
    """Whatever the body is, an XqMessage (with ``problem`` set when it is not a usable step message)."""
    msg = XqMessage(queue, delivery_tag, "raw-" + hashlib.sha1(body).hexdigest()[:16], body)
    msg.dead_at = _x_death_time(properties)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        msg.problem = "malformed: not JSON"
        return msg
    if not isinstance(data, dict):
        msg.problem = "malformed: JSON but not a Dramatiq message"
        return msg
    if isinstance(data.get("message_id"), str) and data["message_id"]:
        msg.key = data["message_id"]
    msg.actor = data.get("actor_name") if isinstance(data.get("actor_name"), str) else None
    raw_options = data.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    if isinstance(options.get("traceback"), str) and options["traceback"].strip():
        msg.last_error = options["traceback"].strip().splitlines()[-1][:300]
    if msg.dead_at is None and isinstance(data.get("message_timestamp"), (int, float)):
        msg.dead_at = dt.datetime.fromtimestamp(data["message_timestamp"] / 1000, UTC)
    args = data.get("args")
    msg.args = args if isinstance(args, list) else None
    if not args or not isinstance(args, list):
        msg.problem = "malformed: no args"
    elif msg.actor not in KNOWN_ACTORS:
        msg.problem = f"unknown actor {msg.actor!r}"
    elif isinstance(args[0], bool) or not isinstance(args[0], int):
        msg.problem = f"malformed: first arg {args[0]!r} is not a campaign message id"
    else:
        msg.campaign_message_id = args[0]
    return msg


def _x_death_time(properties: Any) -> dt.datetime | None:
    """When RabbitMQ dead-lettered the message (its x-death header), as an aware UTC datetime."""
    headers = getattr(properties, "headers", None) or {}
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, dt.datetime):
            return when.replace(tzinfo=UTC) if when.tzinfo is None else when
    return None


class XqBrowser:
    """Holds the messages of the pipeline XQs unacknowledged; ack removes one, close returns the rest."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._conn: Any = None
        self._channel: Any = None
        self.truncated: list[str] = []

    def open(self) -> XqBrowser:
        """Connect (raises ConfigError naming the broker, without its password, when unreachable)."""
        import pika
        from pika.exceptions import AMQPError

        params = pika.URLParameters(self.settings.rabbitmq_url)
        params.socket_timeout = self.timeout
        params.blocked_connection_timeout = self.timeout
        params.stack_timeout = self.timeout
        params.connection_attempts = 1
        try:
            self._conn = pika.BlockingConnection(params)
            self._channel = self._conn.channel()
        except (AMQPError, OSError) as exc:
            raise ConfigError(
                f"RabbitMQ unreachable at {redact_url(self.settings.rabbitmq_url)}: {type(exc).__name__}"
            ) from exc
        return self

    def browse(self, queues: Iterable[str]) -> list[XqMessage]:
        """Fetch every message of each ``queue``'s XQ without acknowledging it (a missing XQ is empty)."""
        out: list[XqMessage] = []
        for queue in queues:
            xq = f"{queue}.XQ"
            depth = self._depth(xq)
            if depth is None:  # never declared (or deleted): nothing died there
                continue
            fetched = 0
            while fetched < BROWSE_LIMIT:
                method, properties, body = self._channel.basic_get(queue=xq, auto_ack=False)
                if method is None:
                    break
                fetched += 1
                out.append(decode_xq(queue, method.delivery_tag, properties, body))
            if fetched >= BROWSE_LIMIT and depth > fetched:
                self.truncated.append(f"{xq}: only the first {fetched} of {depth} messages were read")
        return out

    def _depth(self, xq: str) -> int | None:
        """Messages in ``xq``, None when it does not exist.

        Probed on a channel of its own: a 404 closes the channel it happens on, and closing the
        browsing channel would give back every copy held so far while its delivery tags restart
        at 1 on the next channel, so a later ack would remove a different dead letter.
        """
        from pika.exceptions import ChannelClosedByBroker

        probe = self._conn.channel()
        try:
            return probe.queue_declare(queue=xq, passive=True).method.message_count
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            return None
        finally:
            if probe.is_open:
                probe.close()

    def ack(self, msg: XqMessage) -> None:
        """Remove one XQ copy for good."""
        self._channel.basic_ack(delivery_tag=msg.delivery_tag)

    def close(self) -> None:
        """Give every message not acknowledged back to its XQ, then disconnect."""
        from pika.exceptions import AMQPError

        if self._conn is None:
            return
        try:
            if self._channel is not None and self._channel.is_open:
                self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                self._channel.close()
        except AMQPError:  # closing the connection requeues whatever is still unacknowledged
            log.debug("nack/close of the XQ channel failed", exc_info=True)
        finally:
            try:
                self._conn.close()
            except AMQPError:
                pass
            self._conn = self._channel = None

    def __enter__(self) -> XqBrowser:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
