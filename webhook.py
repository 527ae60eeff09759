"""Delivery webhook receiver: ``python webhook.py`` (SPEC R-OPS-5, §5).

Evolution API posts ``messages.update`` events here; each one moves the delivery status of the
message part that the event's ``instance`` sent with the provider id ``data.keyId`` (T-SEC-1: the
pair identifies a part, through the inbox of that instance and so its workspace; an event naming
another instance never touches it):

    SERVER_ACK -> server_ack    DELIVERY_ACK -> delivered    READ, PLAYED -> read

Rank order is ``server_ack < delivered < read`` and a status only ever goes up: the change is ONE
conditional UPDATE that compares ranks in its WHERE clause, so a late DELIVERY_ACK after READ, a
duplicate delivery, or two copies of one event racing on two threads all end on the highest
status (PostgreSQL re-checks the WHERE on the locked row). PLAYED (voice/video notes) implies the
part was read; the engine only sends text, so it gets no rank of its own. ERROR never touches
``delivery_status`` (it must not downgrade a delivered part); the first one sets
``delivery_error_at`` and writes a ``campaign_events`` warning in the same statement (schema V4).
PENDING and DELETED are acknowledged and ignored. An unknown ``keyId`` (a message a person sent
from the same WhatsApp number, or an update racing ahead of the worker's "sent" commit) is
acknowledged and ignored; so is any other event.

The shared secret (``WEBHOOK_SECRET``) may arrive in any of the ways an Evolution deployment can
send it: a custom webhook header (``Authorization: Bearer <secret>`` or ``X-Webhook-Secret``), a
``?secret=`` in the configured webhook URL (works with every Evolution version, global webhooks
included), or the envelope's ``apikey`` field (what the sandbox sends). Every candidate is
compared with ``hmac.compare_digest``; none matching is 401 and nothing changes. The receiver
refuses to start while ``WEBHOOK_SECRET`` is empty. The secret is never logged: the access log
is off and every line goes through the redacting formatter of ``logs``.

Answers: 200 JSON ``{"result": "updated"|"unchanged"|"unknown"|"ignored", ...}``; 400 malformed
body (the reason names the field; every string field has a length limit, checked before anything
logs it); 401 secret; 404 path; 411/413 body length (exactly one ``Content-Length`` of ASCII digits,
no ``Transfer-Encoding``); 503 database unavailable (Evolution retries non-2xx answers).
``GET /healthz`` is 200 when PostgreSQL answers and the schema has V4, else 503.

Why the standard library (``http.server.ThreadingHTTPServer``) and not a framework: the surface is
one POST route and one GET route with a JSON body each; every request is a single indexed UPDATE
(about a millisecond), so a thread per connection with the kernel's listen backlog absorbs a
burst without an event loop; it adds no dependency to the image every engine process shares; and
it keeps the blocking peewee/psycopg2 pool the rest of the engine uses, which an async framework
would have to wrap in threads anyway. Concurrency is bounded by the database pool
(``DB_MAX_CONNECTIONS``): extra requests wait for a connection instead of failing.
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import peewee
import psycopg2
from playhouse.pool import MaxConnectionsExceeded

from campaign.db import close_db, db, init_db
from campaign.errors import EngineError
from campaign.logs import configure_logging, log_context
from campaign.settings import Settings, get_settings
from models import DELIVERY_STATUSES

log = logging.getLogger("webhook")

__all__ = [
    "DeliveryUpdate",
    "EnvelopeError",
    "STATUS_MAP",
    "IGNORED_STATUSES",
    "READY_PREFIX",
    "parse_envelope",
    "secret_matches",
    "apply_update",
    "WebhookServer",
    "make_server",
    "main",
]

#: first stdout line once the socket is bound (tests and supervisors read the URL from it)
READY_PREFIX = "webhook listening on"
#: Evolution status -> our delivery status (DELIVERY_STATUSES is in rank order)
STATUS_MAP = {"SERVER_ACK": "server_ack", "DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read"}
ERROR_STATUS = "ERROR"
#: real Evolution statuses that carry no delivery progress: acknowledged, nothing changes
IGNORED_STATUSES = frozenset({"PENDING", "DELETED"})
HANDLED_EVENT = "messages.update"
MAX_BODY_BYTES = 256 * 1024  # an update envelope is ~500 bytes; anything this big is not one
MAX_KEY_ID_LENGTH = 256
MAX_EVENT_LENGTH = 64  # Evolution's longest event name is about 25
MAX_INSTANCE_LENGTH = 200  # as inboxes.instance_name (schema CHECK, `apply`)
MAX_JID_LENGTH = 256  # a JID is ~30-60 characters
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")  # RFC 9110: 1*DIGIT; no sign, no spaces, no underscores

_RANKS = list(DELIVERY_STATUSES)

# Never downgrade: the WHERE compares ranks, so the row is only touched on a real upgrade, and a
# concurrent duplicate that waited on the row lock is re-checked against the committed status.
_UPGRADE_SQL = """
UPDATE message_parts p
   SET delivery_status = %(status)s, delivery_updated_at = now()
  FROM campaign_messages m, inboxes i
 WHERE p.provider_message_id = %(key_id)s
   AND i.id = p.inbox_id AND i.instance_name = %(instance)s
   AND m.id = p.message_id
   AND coalesce(array_position(%(ranks)s::text[], p.delivery_status), 0)
       < array_position(%(ranks)s::text[], %(status)s)
RETURNING p.id, p.message_id, m.run_id, p.delivery_status"""

# ERROR: recorded once, beside the status (never replacing it), with an event for the operator.
_ERROR_SQL = """
WITH hit AS (
    UPDATE message_parts p SET delivery_error_at = now()
      FROM campaign_messages m, inboxes i
     WHERE p.provider_message_id = %(key_id)s AND i.id = p.inbox_id AND i.instance_name = %(instance)s
       AND m.id = p.message_id AND p.delivery_error_at IS NULL
    RETURNING p.id, p.idx, p.message_id, p.delivery_status, m.run_id, m.lead_id)
INSERT INTO campaign_events (run_id, message_id, lead_id, step, level, text, details)
SELECT run_id, message_id, lead_id, 'delivery', 'warning',
       'Evolution reported a delivery ERROR for part ' || idx,
       jsonb_build_object('part_id', id, 'key_id', %(key_id)s::text, 'instance', %(instance)s::text,
                          'delivery_status', delivery_status)
  FROM hit
RETURNING (details->>'part_id')::bigint, message_id, run_id, details->>'delivery_status'"""

_LOOKUP_SQL = """
SELECT p.id, p.message_id, m.run_id, p.delivery_status
  FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id JOIN inboxes i ON i.id = p.inbox_id
 WHERE p.provider_message_id = %(key_id)s AND i.instance_name = %(instance)s"""


class EnvelopeError(ValueError):
    """The request body is not a usable messages.update envelope (answered 400 with this text)."""


@dataclass(frozen=True)
class DeliveryUpdate:
    """One validated ``messages.update`` status change."""

    key_id: str
    status: str  # Evolution's status, upper case (SERVER_ACK, ..., ERROR)
    instance: str  # the Evolution instance that sent the part: with key_id, what identifies it
    remote_jid: str | None
    from_me: bool | None


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: ``updated``, ``unchanged``, ``unknown`` or ``ignored``, and to which part."""

    result: str
    delivery_status: str | None = None
    part_id: int | None = None
    message_id: int | None = None
    run_id: int | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The response body (no None fields)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _normalise_event(value: str) -> str:
    # Evolution spells it "messages.update" in the body, "MESSAGES_UPDATE" in its settings and
    # "messages-update" in per-event URLs
    return value.strip().lower().replace("_", ".").replace("-", ".")


def _text(value: Any, name: str, *, required: bool, max_len: int) -> str | None:
    """A string field PostgreSQL can store (UTF-8, no NUL, at most ``max_len`` characters), or None
    when absent and optional. The value never goes into the error: it may be huge or hostile."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise EnvelopeError(
            f"field {name!r} is missing or not a non-empty string" if required else f"field {name!r} must be a string"
        )
    if len(value) > max_len:
        raise EnvelopeError(f"field {name!r} is longer than {max_len} characters")
    if "\x00" in value:
        raise EnvelopeError(f"field {name!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EnvelopeError(f"field {name!r} is not valid Unicode text (lone surrogate)") from None
    return value


def parse_envelope(doc: Any) -> DeliveryUpdate | str:
    """Validate a decoded body; return the update, or a reason string when the event is ignored.

    Raises EnvelopeError naming the offending field when the body is malformed.
    """
    if not isinstance(doc, dict):
        raise EnvelopeError(f"body must be a JSON object, got {type(doc).__name__}")
    event = _text(doc.get("event"), "event", required=True, max_len=MAX_EVENT_LENGTH)
    assert event is not None
    if _normalise_event(event) != HANDLED_EVENT:
        return f"event {event!r} is not handled"
    instance = _text(doc.get("instance"), "instance", required=False, max_len=MAX_INSTANCE_LENGTH)
    data = doc.get("data")
    if not isinstance(data, dict):
        raise EnvelopeError("field 'data' is missing or not an object")
    key_id = _text(data.get("keyId"), "data.keyId", required=True, max_len=MAX_KEY_ID_LENGTH)
    assert key_id is not None
    status = data.get("status")
    if not isinstance(status, str) or not status.strip():
        raise EnvelopeError("field 'data.status' is missing or not a string")
    status = status.strip().upper()
    known = (*STATUS_MAP, ERROR_STATUS, *sorted(IGNORED_STATUSES))
    if status not in known:
        raise EnvelopeError(f"field 'data.status' must be one of {', '.join(known)}, got {ascii(status[:32])[:40]}")
    remote_jid = _text(data.get("remoteJid"), "data.remoteJid", required=False, max_len=MAX_JID_LENGTH)
    from_me = data.get("fromMe")
    if from_me is not None and not isinstance(from_me, bool):
        raise EnvelopeError("field 'data.fromMe' must be a boolean")
    if status in IGNORED_STATUSES:
        return f"status {status} carries no delivery progress"
    if from_me is False:
        return "update of a message the contact sent (fromMe false)"
    if instance is None or not instance.strip():
        raise EnvelopeError(
            "field 'instance' is missing or not a non-empty string "
            "(a key id is only meaningful with the instance that sent it)"
        )
    return DeliveryUpdate(
        key_id=key_id.strip(), status=status, instance=instance, remote_jid=remote_jid, from_me=from_me
    )


def secret_matches(secret: str, candidates: Sequence[Any]) -> bool:
    """Whether any candidate equals ``secret`` (constant-time per candidate; non-strings never match)."""
    expected = secret.encode("utf-8", "surrogatepass")
    matched = False
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            # compare every candidate (no early exit) so timing says nothing about which one matched
            matched |= hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), expected)
    return matched


def apply_update(update: DeliveryUpdate) -> UpdateResult:
    """Record one status change on its part (never downgrading); the caller holds a connection."""
    ident = {"key_id": update.key_id, "instance": update.instance}
    if update.status == ERROR_STATUS:
        row = db.execute_sql(_ERROR_SQL, ident).fetchone()
        if row is not None:
            return UpdateResult(
                "updated",
                delivery_status=row[3],
                part_id=row[0],
                message_id=row[1],
                run_id=row[2],
                reason="delivery error recorded",
            )
    else:
        status = STATUS_MAP[update.status]
        row = db.execute_sql(_UPGRADE_SQL, {**ident, "status": status, "ranks": _RANKS}).fetchone()
        if row is not None:
            return UpdateResult("updated", delivery_status=row[3], part_id=row[0], message_id=row[1], run_id=row[2])
    # nothing changed: tell a duplicate / late update apart from an id that is not ours
    row = db.execute_sql(_LOOKUP_SQL, ident).fetchone()
    if row is None:
        return UpdateResult("unknown", reason="no message part of this instance has this keyId")
    return UpdateResult(
        "unchanged",
        delivery_status=row[3],
        part_id=row[0],
        message_id=row[1],
        run_id=row[2],
        reason="already recorded" if update.status == ERROR_STATUS else "already at or above",
    )


def _schema_version() -> int:
    row = db.execute_sql("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0])


# MaxConnectionsExceeded: every pooled connection stayed busy for the pool's whole timeout
_DB_ERRORS = (
    peewee.OperationalError,
    peewee.InterfaceError,
    peewee.DatabaseError,
    psycopg2.Error,
    MaxConnectionsExceeded,
)


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by the idle timeout AND the current request's deadline.

    A socket timeout alone is per ``recv``: a sender trickling one byte every few seconds would
    hold its thread (and the shutdown, which joins every handler thread) for as long as it likes.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self.idle_timeout = idle_timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request deadline exceeded")
            timeout = min(timeout, left)
        self._sock.settimeout(timeout)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    """One request: route, size checks, secret, envelope, update."""

    protocol_version = "HTTP/1.1"  # keep-alive: Evolution and the sandbox reuse their connections
    timeout = 15  # longest silence on a connection (an idle keep-alive one included)
    request_deadline = 30.0  # longest a whole request may take to arrive, however it trickles
    # Status line, headers and body leave in one segment: written separately, Nagle's algorithm
    # and the peer's delayed ACK stall every answer by ~40 ms.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024  # flushed once per request by http.server
    server: WebhookServer
    server_version = "campaign-webhook"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------------------

    def setup(self) -> None:
        """The stdlib setup, with the request line, headers and body read through a _DeadlineReader."""
        super().setup()
        self._reader = _DeadlineReader(self.connection, self.timeout)
        buffered, self.rfile = self.rfile, io.BufferedReader(self._reader)
        buffered.close()  # nothing read through it yet; the socket stays open

    def handle_one_request(self) -> None:
        """One request on the connection, which must arrive whole within ``request_deadline``."""
        self._reader.deadline = time.monotonic() + self.request_deadline
        super().handle_one_request()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log: the request line may carry ``?secret=``; outcomes are logged per update."""

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own errors (bad request lines, timeouts) at debug, through the redactor."""
        log.debug("http: %s", format % args)

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        try:
            self.connection.settimeout(self.timeout)  # the last read may have left the deadline's rest
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True  # the sender went away; nothing left to tell it

    def _error(self, code: int, reason: str, *, close: bool = False) -> None:
        if close:
            self.close_connection = True
        level = logging.WARNING if code == HTTPStatus.UNAUTHORIZED else logging.INFO
        log.log(level, "webhook rejected: %s %s (peer %s)", code, reason, self.client_address[0])
        self._reply(code, {"error": reason})

    def _path(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path.rstrip("/") or "/", parse_qs(parts.query, keep_blank_values=True)

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        """GET /healthz: 200 when PostgreSQL answers with the schema this code needs."""
        path, _ = self._path()
        if path != "/healthz":
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {path[:100]}")
            return
        try:
            with db.connection_context():
                version = _schema_version()
        except _DB_ERRORS as exc:
            log.warning("healthz: database unavailable (%s)", type(exc).__name__)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "error": "database unavailable"})
            return
        if version < 4:
            self._reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "error", "error": f"schema version {version} < 4: run `python cli.py init-db`"},
            )
            return
        self._reply(HTTPStatus.OK, {"status": "ok", "schema": version})

    def do_POST(self) -> None:
        """POST /webhook (or /webhook/<event>, Evolution's per-event URLs): one messages.update."""
        path, query = self._path()
        if path != "/webhook" and not path.startswith("/webhook/"):
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {path[:100]}", close=True)
            return
        length = self._content_length()
        if length is None:
            return
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes", close=True)
            return
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return
        if len(body) < length:
            self.close_connection = True  # the sender hung up mid-body; nobody to answer
            return

        doc: Any = None
        decode_error: str | None = None
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            decode_error = f"body is not valid JSON ({type(exc).__name__})"
        candidates = [*query.get("secret", []), self.headers.get("X-Webhook-Secret")]
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if isinstance(doc, dict):
            candidates.append(doc.get("apikey"))
        if not secret_matches(self.server.secret, candidates):
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong webhook secret")
            return
        if decode_error is not None:
            self._error(HTTPStatus.BAD_REQUEST, decode_error)
            return
        try:
            parsed = parse_envelope(doc)
        except EnvelopeError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        if isinstance(parsed, str):
            log.debug("webhook ignored: %s", parsed)
            self._reply(HTTPStatus.OK, {"result": "ignored", "reason": parsed})
            return
        self._apply(parsed)

    def _content_length(self) -> int | None:
        """The body length from exactly one strict ``Content-Length``, or None after answering.

        Two lengths, a sign, spaces inside, ``_`` or non-ASCII digits (all of which ``int()``
        accepts) are how request smuggling starts behind a proxy that reads them differently.
        """
        if self.headers.get_all("Transfer-Encoding"):
            self._error(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked or other Transfer-Encoding bodies are not accepted: send Content-Length",
                close=True,
            )
            return None
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required", close=True)
            return None
        if len(values) > 1:
            self._error(HTTPStatus.BAD_REQUEST, "Content-Length header appears more than once", close=True)
            return None
        if not _CONTENT_LENGTH.fullmatch(values[0].strip(" \t")):
            self._error(
                HTTPStatus.BAD_REQUEST, "Content-Length is not a non-negative integer (ASCII digits only)", close=True
            )
            return None
        return int(values[0])

    def _apply(self, update: DeliveryUpdate) -> None:
        try:
            with db.connection_context():
                outcome = apply_update(update)
        except _DB_ERRORS as exc:
            log.warning(
                "delivery update key_id=%s status=%s not recorded: database error %s (answering 503 "
                "so Evolution retries)",
                update.key_id,
                update.status,
                type(exc).__name__,
            )
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable, retry later"})
            return
        with log_context(
            run=outcome.run_id,
            message=outcome.message_id,
            part=outcome.part_id,
            key_id=update.key_id,
            instance=update.instance,
            outcome=outcome.result,
        ):
            if outcome.result == "unknown":
                log.debug("delivery %s ignored: no part has this key id", update.status)
            elif update.status == ERROR_STATUS and outcome.result == "updated":
                log.warning("delivery ERROR recorded (delivery status stays %s)", outcome.delivery_status)
            elif outcome.result == "updated":
                log.info("delivery %s recorded: part now %s", update.status, outcome.delivery_status)
            else:
                log.info("delivery %s unchanged: part already %s", update.status, outcome.delivery_status)
        self._reply(HTTPStatus.OK, outcome.as_json())


class WebhookServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the shared secret; errors of dropped connections are logged, not printed."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog: a burst waits in the kernel instead of being refused

    def __init__(self, address: tuple[str, int], secret: str) -> None:
        if not secret:
            raise EngineError("WEBHOOK_SECRET is empty: the webhook receiver will not start without it")
        self.secret = secret
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """Base URL of the bound socket (the real port when 0 was asked for)."""
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # server_bind stored getsockname(): a str host, never bytes
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke mid-request: one log line instead of a stderr traceback."""
        exc = sys.exc_info()[1]
        log.info(
            "webhook connection from %s ended: %s",
            client_address[0] if client_address else "?",
            type(exc).__name__ if exc else "unknown error",
        )


def make_server(settings: Settings, host: str | None = None, port: int | None = None) -> WebhookServer:
    """Bind the receiver (not yet serving); raises EngineError when WEBHOOK_SECRET is empty."""
    return WebhookServer(
        (host if host is not None else settings.webhook_host, settings.webhook_port if port is None else port),
        settings.webhook_secret,
    )


def parse_args(argv: Sequence[str] | None, settings: Settings) -> argparse.Namespace:
    """Command-line options (defaults from WEBHOOK_HOST / WEBHOOK_PORT)."""
    p = argparse.ArgumentParser(prog="python webhook.py", description="Evolution messages.update receiver")
    p.add_argument("--host", default=settings.webhook_host, help="listen address (WEBHOOK_HOST)")
    p.add_argument(
        "--port",
        type=int,
        default=settings.webhook_port,
        help="listen port (WEBHOOK_PORT); 0 picks a free one, printed on stdout",
    )
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is out of range 0..65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT."""
    try:
        settings = get_settings()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    if not settings.webhook_secret:
        print(
            "error: WEBHOOK_SECRET is empty: set the shared secret of the delivery webhook "
            "(the same value Evolution sends) before starting the receiver",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings)
    init_db(settings, application_name=f"campaign-webhook:{os.getpid()}")
    try:
        server = make_server(settings, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="webhook-serve", daemon=True
    )
    thread.start()
    print(f"{READY_PREFIX} {server.url}", flush=True)
    log.info("webhook receiver listening on %s:%s", args.host, server.server_address[1])
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2.0)
        close_db()
    log.info("webhook receiver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
