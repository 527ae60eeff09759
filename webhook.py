"""Evolution API's webhook receiver: ``python webhook.py`` (SPEC R-OPS-5, R-IN-1, §5).

``messages.upsert`` (a reply: stop the lead's sequence, opt-out) and ``connection.update`` (pause or
resume the inbox's runs) go to the same handlers as the RabbitMQ consumer (``inbound.py``,
:mod:`campaign.inbound`); every effect is idempotent on (inbox, provider message id), so an event
arriving on both paths counts once.

Evolution posts ``messages.update`` events here; each one moves the delivery status of the message
part that the event's ``instance`` sent with the provider id ``data.keyId`` (T-SEC-1: the pair
identifies a part, through the inbox of that instance and so its workspace; an event naming another
instance never touches it):

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
acknowledged and ignored; so is any other event. :func:`route` dispatches an authenticated
envelope by its ``event`` (``_HANDLERS``): one entry per event a handler takes.

The shared secret (``WEBHOOK_SECRET``) may arrive in any of the ways an Evolution deployment can
send it: a custom webhook header (``Authorization: Bearer <secret>`` or ``X-Webhook-Secret``), a
``?secret=`` in the configured webhook URL (works with every Evolution version, global webhooks
included), or the envelope's ``apikey`` field (what the sandbox sends). Every candidate is
compared with ``hmac.compare_digest``; none matching is 401 and nothing changes. The receiver
refuses to start while ``WEBHOOK_SECRET`` is empty. The secret is never logged: the access log
is off and every line goes through the redacting formatter of ``logs``.

Answers (``GET /openapi.json`` describes them; schemathesis fuzzes the running server from it):
200 JSON ``{"result": "updated"|"unchanged"|"unknown"|"ignored", ...}`` for a receipt,
``{"result": "reply"|"opt_out"|"duplicate"|"unknown_sender"|"unknown_instance", ...}`` for a message,
``{"result": "updated"|"stale"|"unknown_instance", ...}`` for a connection change; 400 malformed body (the
reason names the field; every string field has a length limit, checked before anything logs it);
401 secret; 404 path; 405 method (``Allow`` names the one the path takes); 408 body not received
within its deadline; 411/413 body length (exactly one ``Content-Length`` of ASCII digits, at most
256 KiB, no ``Transfer-Encoding``: checked before the body is read); 431 request head over 64 KiB;
503 database unavailable (Evolution retries non-2xx answers). ``GET /healthz`` is 200 when
PostgreSQL answers and the schema has V4, else 503. A request the HTTP parser cannot accept (a
second or signed ``Content-Length``, ``Transfer-Encoding`` beside ``Content-Length``, a malformed
request line) is answered 400 by the server before the application sees it, and closed.

HTTP server: Starlette on uvicorn (DESIGN.md "HTTP": the standard library's ``http.server`` is "not
recommended for production"), parsing with httptools (llhttp, Node's strict parser: it refuses
duplicate or malformed lengths and ``Transfer-Encoding`` beside ``Content-Length``, the request
smuggling vectors). One event loop reads every connection; the endpoints' blocking work (JSON,
the secret, the envelope, the peewee/psycopg2 pool) runs in Starlette's threadpool, whose size is
the database pool's (``DB_MAX_CONNECTIONS``): extra requests wait for a thread, not for a
connection, and never fail for it. Connections are capped at ``MAX_CONNECTIONS`` (uvicorn answers
503 past it). Deadlines (slowloris): uvicorn has no timeout while a request arrives (its issue
#157; ``timeout_keep_alive`` only covers the silence between requests), so ``_GuardedProtocol``
adds one: the request head must be complete ``HEAD_TIMEOUT`` seconds after its first byte (or
after the connection opened) and within ``MAX_HEAD_BYTES``; the endpoint then reads the body under
its own ``BODY_TIMEOUT`` deadline (408 after it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import peewee
import psycopg2
import uvicorn
from playhouse.pool import MaxConnectionsExceeded
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from campaign import metrics
from campaign.db import close_db, db, init_db
from campaign.errors import EngineError, EnvelopeError
from campaign.inbound import apply_event
from campaign.inbound.envelopes import (
    CONNECTION_EVENT,
    DELIVERY_EVENT,
    ERROR_STATUS,
    IGNORED_STATUSES,
    MAX_EVENT_LENGTH,
    MAX_INSTANCE_LENGTH,
    MAX_JID_LENGTH,
    MAX_KEY_ID_LENGTH,
    MESSAGE_EVENT,
    STATUS_MAP,
    DeliveryUpdate,
    normalise_event,
    parse_envelope,
    text_field,
)
from campaign.inbound.receipts import UpdateResult, apply_update
from campaign.logs import configure_logging, log_context
from campaign.process import serve_metrics, stop_on_signals
from campaign.settings import Settings, get_settings
from models import DELIVERY_STATUSES

log = logging.getLogger("webhook")

__all__ = [
    "MAX_EVENT_LENGTH",
    "MAX_INSTANCE_LENGTH",
    "MAX_JID_LENGTH",
    "MAX_KEY_ID_LENGTH",
    "DeliveryUpdate",
    "EnvelopeError",
    "STATUS_MAP",
    "IGNORED_STATUSES",
    "READY_PREFIX",
    "Answer",
    "parse_envelope",
    "secret_matches",
    "apply_update",
    "route",
    "create_app",
    "openapi_document",
    "WebhookServer",
    "make_server",
    "main",
]

#: first stdout line once the socket is bound (tests and supervisors read the URL from it)
READY_PREFIX = "webhook listening on"
MAX_BODY_BYTES = 256 * 1024  # an update envelope is ~500 bytes; anything this big is not one
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")  # RFC 9110: 1*DIGIT; no sign, no spaces, no underscores


def secret_matches(secret: str, candidates: Sequence[Any]) -> bool:
    """Whether any candidate equals ``secret`` (constant-time per candidate; non-strings never match)."""
    expected = secret.encode("utf-8", "surrogatepass")
    matched = False
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            # compare every candidate (no early exit) so timing says nothing about which one matched
            matched |= hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), expected)
    return matched


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


# -- routing: an authenticated envelope -> its handler ------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the receiver answers: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]


_UNAVAILABLE = Answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable, retry later"})


def handle_messages_update(doc: dict[str, Any]) -> Answer:
    """``messages.update``: record the delivery status it carries (or ignore it, saying why)."""
    parsed = parse_envelope(doc)
    if isinstance(parsed, str):
        log.debug("webhook ignored: %s", parsed)
        return Answer(HTTPStatus.OK, {"result": "ignored", "reason": parsed})
    assert isinstance(parsed, DeliveryUpdate)  # routed here by its event name
    try:
        with db.connection_context():
            outcome = apply_update(parsed)
    except _DB_ERRORS as exc:
        log.warning(
            "delivery update key_id=%s status=%s not recorded: database error %s (answering 503 so Evolution retries)",
            parsed.key_id,
            parsed.status,
            type(exc).__name__,
        )
        return _UNAVAILABLE
    _log_outcome(parsed, outcome)
    return Answer(HTTPStatus.OK, outcome.as_json())


def _log_outcome(update: DeliveryUpdate, outcome: UpdateResult) -> None:
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


def handle_inbound_event(doc: dict[str, Any]) -> Answer:
    """``messages.upsert`` / ``connection.update``: the same handlers as the RabbitMQ consumer (R-IN-1)."""
    parsed = parse_envelope(doc)
    if isinstance(parsed, str):
        log.debug("webhook ignored: %s", parsed)
        return Answer(HTTPStatus.OK, {"result": "ignored", "reason": parsed})
    try:
        with db.connection_context():
            outcome = apply_event(parsed, get_settings())
    except _DB_ERRORS as exc:
        log.warning(
            "%s of instance %s not applied: database error %s (answering 503 so Evolution retries)",
            doc.get("event"),
            parsed.instance,
            type(exc).__name__,
        )
        return _UNAVAILABLE
    return Answer(HTTPStatus.OK, outcome.as_json())


#: normalised event name -> handler; an event not here is answered 200 "ignored"
_HANDLERS: dict[str, Callable[[dict[str, Any]], Answer]] = {
    DELIVERY_EVENT: handle_messages_update,
    MESSAGE_EVENT: handle_inbound_event,
    CONNECTION_EVENT: handle_inbound_event,
}


def route(doc: Any) -> Answer:
    """Dispatch an authenticated, decoded envelope by its ``event``.

    Raises EnvelopeError (answered 400) when the body is not an object with a usable ``event``.
    """
    if not isinstance(doc, dict):
        raise EnvelopeError(f"body must be a JSON object, got {type(doc).__name__}")
    event = text_field(doc.get("event"), "event", required=True, max_len=MAX_EVENT_LENGTH)
    assert event is not None
    handler = _HANDLERS.get(normalise_event(event))
    if handler is None:
        log.debug("webhook ignored: event %r is not handled", event)
        return Answer(HTTPStatus.OK, {"result": "ignored", "reason": f"event {event!r} is not handled"})
    return handler(doc)


def _decode_authenticate_route(secret: str, body: bytes, candidates: list[Any], peer: str) -> Answer:
    """Decode the body, check the secret (401 before any parse error: garbage learns nothing), route."""
    doc: Any = None
    decode_error: str | None = None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        decode_error = f"body is not valid JSON ({type(exc).__name__})"
    if isinstance(doc, dict):
        candidates = [*candidates, doc.get("apikey")]
    if not secret_matches(secret, candidates):
        return _rejected(HTTPStatus.UNAUTHORIZED, "missing or wrong webhook secret", peer)
    if decode_error is not None:
        return _rejected(HTTPStatus.BAD_REQUEST, decode_error, peer)
    try:
        return route(doc)
    except EnvelopeError as exc:
        return _rejected(HTTPStatus.BAD_REQUEST, str(exc), peer)
    except _DB_ERRORS as exc:  # a handler that did not map its own database errors
        log.warning("webhook event not recorded: database error %s (answering 503)", type(exc).__name__)
        return _UNAVAILABLE


def _rejected(status: int, reason: str, peer: str) -> Answer:
    level = logging.WARNING if status == HTTPStatus.UNAUTHORIZED else logging.INFO
    log.log(level, "webhook rejected: %s %s (peer %s)", status, reason, peer)
    return Answer(status, {"error": reason})


# -- HTTP: Starlette application -------------------------------------------------------------------------

#: the request head (request line + headers) must be complete this long after its first byte
HEAD_TIMEOUT = 10.0
#: the body must be complete this long after the head (30 s in all, as the http.server version)
BODY_TIMEOUT = 20.0
#: longest silence between two requests on a kept-alive connection (Evolution reuses them)
KEEPALIVE_TIMEOUT = 15
MAX_HEAD_BYTES = 64 * 1024  # as http.server's longest line; a real request head is < 1 KB
MAX_CONNECTIONS = 1024  # open connections + running requests; uvicorn answers 503 past it
BACKLOG = 256  # listen backlog: a burst waits in the kernel instead of being refused
_CLOSE = {"Connection": "close"}  # the body was not (or not wholly) read: no second request on it


def _json(answer: Answer, *, close: bool = False) -> JSONResponse:
    return JSONResponse(answer.body, answer.status, headers=_CLOSE if close else None)


def _peer(request: Request) -> str:
    return request.client.host if request.client else "?"


def _declared_length(headers: Headers, peer: str) -> int | Answer:
    """The body length from exactly one strict ``Content-Length``, or the refusal.

    Two lengths, a sign, spaces inside, ``_`` or non-ASCII digits (all of which ``int()``
    accepts) are how request smuggling starts behind a proxy that reads them differently. The
    parser already refuses most of them; this is the rule, whatever parser serves it.
    """
    if headers.getlist("transfer-encoding"):
        return _rejected(
            HTTPStatus.LENGTH_REQUIRED,
            "chunked or other Transfer-Encoding bodies are not accepted: send Content-Length",
            peer,
        )
    values = headers.getlist("content-length")
    if not values:
        return _rejected(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required", peer)
    if len(values) > 1:
        return _rejected(HTTPStatus.BAD_REQUEST, "Content-Length header appears more than once", peer)
    if not _CONTENT_LENGTH.fullmatch(values[0].strip(" \t")):
        return _rejected(
            HTTPStatus.BAD_REQUEST, "Content-Length is not a non-negative integer (ASCII digits only)", peer
        )
    length = int(values[0])
    if length > MAX_BODY_BYTES:
        return _rejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes", peer)
    return length


async def _read_body(request: Request, length: int, deadline: float) -> bytes | Response:
    """The body, read whole within ``deadline`` seconds, or the answer when it was not."""
    chunks: list[bytes] = []
    got = 0
    try:
        with anyio.move_on_after(deadline) as scope:
            async for chunk in request.stream():
                got += len(chunk)
                if got > length:  # the parser stops at Content-Length; never trust one layer alone
                    break
                chunks.append(chunk)
    except ClientDisconnect:
        log.info("webhook connection from %s ended mid-body (%s of %s bytes)", _peer(request), got, length)
        return Response(status_code=HTTPStatus.BAD_REQUEST, headers=_CLOSE)  # nobody left to read it
    if scope.cancelled_caught:
        reason = f"body not received within {deadline:g} s ({got} of {length} bytes)"
        return _json(_rejected(HTTPStatus.REQUEST_TIMEOUT, reason, _peer(request)), close=True)
    return b"".join(chunks)


class _Receiver:
    """The endpoints, holding the shared secret and the body deadline."""

    def __init__(self, secret: str, body_timeout: float) -> None:
        self.secret = secret
        self.body_timeout = body_timeout

    async def post(self, request: Request) -> Response:
        """The receiver, counted by HTTP status (R-OBS-1; never by path: ``/webhook/<event>`` is the caller's)."""
        response = await self._post(request)
        metrics.WEBHOOK_REQUESTS.labels(str(response.status_code)).inc()
        return response

    async def _post(self, request: Request) -> Response:
        """POST /webhook (or /webhook/<event>, Evolution's per-event URLs): one event envelope.

        Async only to read the body under its deadline; everything after runs in the threadpool.
        """
        peer = _peer(request)
        length = _declared_length(request.headers, peer)
        if isinstance(length, Answer):
            return _json(length, close=True)  # the body is left unread
        body = await _read_body(request, length, self.body_timeout)
        if isinstance(body, Response):
            return body
        candidates: list[Any] = [*request.query_params.getlist("secret"), request.headers.get("x-webhook-secret")]
        auth = request.headers.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        answer = await run_in_threadpool(_decode_authenticate_route, self.secret, body, candidates, peer)
        return _json(answer)


def healthz(request: Request) -> Response:
    """GET /healthz: 200 when PostgreSQL answers with the schema this code needs (threadpool)."""
    try:
        with db.connection_context():
            version = _schema_version()
    except _DB_ERRORS as exc:
        log.warning("healthz: database unavailable (%s)", type(exc).__name__)
        return JSONResponse({"status": "error", "error": "database unavailable"}, HTTPStatus.SERVICE_UNAVAILABLE)
    if version < 4:
        return JSONResponse(
            {"status": "error", "error": f"schema version {version} < 4: run `python cli.py init-db`"},
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
    return JSONResponse({"status": "ok", "schema": version})


async def _no_route(request: Request, exc: Exception) -> Response:
    """404 for a path that does not exist, 405 (with ``Allow``) for a method a path does not take."""
    status = exc.status_code if isinstance(exc, HTTPException) else HTTPStatus.INTERNAL_SERVER_ERROR
    path = request.url.path[:100]
    close = request.method not in ("GET", "HEAD")  # a body may follow, unread
    if status == HTTPStatus.METHOD_NOT_ALLOWED and isinstance(exc, HTTPException):
        allow = (exc.headers or {}).get("Allow", "")
        answer = _rejected(status, f"method {request.method[:16]} not allowed on {path}: {allow} only", _peer(request))
        return JSONResponse(answer.body, status, headers={"Allow": allow, **(_CLOSE if close else {})})
    if status == HTTPStatus.NOT_FOUND:
        return _json(_rejected(status, f"no route {request.method[:16]} {path}", _peer(request)), close=close)
    return JSONResponse({"error": HTTPStatus(status).phrase}, status)


def create_app(secret: str, *, body_timeout: float = BODY_TIMEOUT, threads: int = 32) -> Starlette:
    """The receiver's ASGI application; raises EngineError when ``secret`` is empty.

    ``threads``: the threadpool's size, the database pool's (more threads would only wait on it).
    """
    if not secret:
        raise EngineError("WEBHOOK_SECRET is empty: the webhook receiver will not start without it")
    receiver = _Receiver(secret, body_timeout)
    document = openapi_document()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return Starlette(
        routes=[
            Route("/webhook", receiver.post, methods=["POST"]),
            Route("/webhook/{event:path}", receiver.post, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _no_route},
        lifespan=lifespan,
        # no max_body_size: Starlette's cap answers a long Content-Length itself (text/plain 413)
        # before the endpoint's own check can name the limit; _read_body bounds the stream instead
    )


# -- HTTP: the OpenAPI document (SPEC §5) ------------------------------------------------------------


def _string(max_len: int, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_len, **extra}


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong, naming the field"}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(int(s)): {
            "description": HTTPStatus(s).phrase,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def openapi_document() -> dict[str, Any]:
    """The receiver's OpenAPI 3.1 document (``GET /openapi.json``)."""
    common: dict[str, Any] = {
        "type": "object",
        "properties": {"instance": _string(MAX_INSTANCE_LENGTH), "apikey": {"type": "string"}},
    }
    update = {
        **common,
        "description": "A delivery receipt; required fields are checked only for this event.",
        "required": ["event", "instance", "data"],
        "properties": {
            **common["properties"],
            "event": {"type": "string", "enum": ["messages.update", "MESSAGES_UPDATE", "messages-update"]},
            "data": {
                "type": "object",
                "required": ["keyId", "status"],
                "properties": {
                    "keyId": _string(MAX_KEY_ID_LENGTH, minLength=1),
                    "status": {"type": "string", "enum": [*STATUS_MAP, ERROR_STATUS, *sorted(IGNORED_STATUSES)]},
                    "fromMe": {"type": "boolean"},
                    "remoteJid": _string(MAX_JID_LENGTH),
                },
            },
        },
    }
    upsert = {
        **common,
        "description": (
            "A message a contact sent (a reply: SPEC §4.6a R-IN-2..4); fromMe, groups and broadcasts are ignored."
        ),
        "required": ["event"],
        "properties": {
            **common["properties"],
            "event": {"type": "string", "enum": ["messages.upsert", "MESSAGES_UPSERT"]},
            "data": {
                "type": "object",
                "properties": {
                    "key": {
                        "type": "object",
                        "properties": {
                            "id": _string(MAX_KEY_ID_LENGTH),
                            "remoteJid": _string(MAX_JID_LENGTH),
                            "remoteJidAlt": _string(MAX_JID_LENGTH),
                            "fromMe": {"type": "boolean"},
                        },
                    },
                    "message": {"type": "object"},
                    "messageTimestamp": {"type": "integer"},
                },
            },
        },
    }
    connection = {
        **common,
        "description": "An instance's connection state changed: its runs pause or resume (SPEC §4.6a R-IN-7).",
        "required": ["event"],
        "properties": {
            **common["properties"],
            "event": {"type": "string", "enum": ["connection.update", "CONNECTION_UPDATE"]},
            "data": {
                "type": "object",
                "properties": {
                    "state": {"type": "string", "enum": ["open", "close", "connecting"]},
                    "statusReason": {"type": "integer"},
                },
            },
        },
    }
    other = {
        "type": "object",
        "description": "Any other event: acknowledged and ignored.",
        "required": ["event"],
        "properties": {"event": _string(MAX_EVENT_LENGTH, minLength=1)},
    }
    post = {
        "summary": "One Evolution API event envelope",
        "description": (
            "The shared secret may come as `?secret=`, `X-Webhook-Secret`, `Authorization: Bearer` or the "
            "envelope's `apikey`. The body needs exactly one `Content-Length` (ASCII digits, at most "
            f"{MAX_BODY_BYTES} bytes) and no `Transfer-Encoding`."
        ),
        "security": [{"query": []}, {"header": []}, {"bearer": []}, {}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
        },
        "responses": {
            "200": {
                "description": "Recorded, already recorded, unknown message, or ignored",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}},
            },
            **_errors(400, 401, 404, 408, 411, 413, 503),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "campaign-engine webhook receiver",
            "version": "1",
            "description": "Evolution API events (SPEC R-OPS-5, §5): delivery receipts today.",
        },
        "paths": {
            "/webhook": {"post": post},
            "/webhook/{event}": {
                "post": {
                    **post,
                    "summary": "The same, at Evolution's per-event URL (the path's event name is not used)",
                    "parameters": [{"name": "event", "in": "path", "required": True, "schema": {"type": "string"}}],
                }
            },
            "/healthz": {
                "get": {
                    "summary": "200 when PostgreSQL answers with the schema this code needs",
                    "responses": {
                        "200": {
                            "description": "Ready",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "503": {
                            "description": "Database unavailable or schema too old",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "query": {"type": "apiKey", "in": "query", "name": "secret"},
                "header": {"type": "apiKey", "in": "header", "name": "X-Webhook-Secret"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Envelope": {"anyOf": [update, upsert, connection, other]},
                "Result": {
                    "type": "object",
                    "required": ["result"],
                    "properties": {
                        "result": {
                            "type": "string",
                            "enum": [
                                *("updated", "unchanged", "unknown", "ignored"),  # messages.update
                                *("reply", "opt_out", "duplicate", "unknown_sender", "unknown_instance"),  # upsert
                                "stale",  # connection.update older than what the inbox holds
                            ],
                        },
                        "delivery_status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                        "part_id": {"type": "integer"},
                        "message_id": {"type": "integer"},
                        "run_id": {"type": "integer"},
                        "reason": {"type": "string"},
                        "lead_id": {"type": "integer"},
                        "inbox_id": {"type": "integer"},
                        "skipped": {"type": "array", "items": {"type": "integer"}},
                        "ended": {"type": "array", "items": {"type": "integer"}},
                        "in_flight": {"type": "array", "items": {"type": "integer"}},
                        "moved_to": {"type": "integer"},
                        "state": {"type": "string", "enum": ["open", "close", "connecting"]},
                        "paused": {"type": "array", "items": {"type": "integer"}},
                        "resumed": {"type": "array", "items": {"type": "integer"}},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "error"]},
                        "schema": {"type": "integer"},
                        "error": {"type": "string"},
                    },
                },
                "Error": _ERROR,
            },
        },
    }


# -- HTTP: uvicorn -----------------------------------------------------------------------------------


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two limits it lacks while a request head arrives.

    A deadline: the head must be complete ``head_timeout`` s after its first byte (or after the
    connection opened); uvicorn only times the silence between requests, so one byte every few
    seconds held a connection forever. A size cap: llhttp keeps an unfinished header in memory
    however long it grows; past ``MAX_HEAD_BYTES`` the request is answered 431 and closed.
    """

    head_timeout = HEAD_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # bytes now arriving belong to a request head not yet complete
        self._raw_head = 0  # bytes received since that head began (an unfinished head's size)
        self._parsed_head = 0  # request line + headers parsed so far (a head that came in one piece)
        self._refused = False  # an answer was written and the connection is closing: parse no more
        self._peer_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            self._raw_head += len(data)
        super().data_received(data)
        if self._awaiting_head and self._raw_head > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head larger than {MAX_HEAD_BYTES} bytes")

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol allows a bool
        """The peer half-closed: still answer a request it sent whole (uvicorn would drop it)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._peer_done = True
            return True  # keep the transport open to write the answer; closed once it is sent
        return False  # nothing whole to answer: close

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._peer_done and not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_head = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._parsed_head += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._disarm_head_timer()
        if self._parsed_head > MAX_HEAD_BYTES:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._awaiting_head, self._raw_head = True, 0  # the next request's head (kept alive, or pipelined)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info(
                "webhook connection from %s closed: no complete request head within %g s",
                self.client[0] if self.client else "?",
                self.head_timeout,
            )
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        self._refused = True
        log.info("webhook rejected: %s %s (peer %s)", status, reason, self.client[0] if self.client else "?")
        body = json.dumps({"error": reason}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode(), len(body), body)
        )
        self.transport.close()


class WebhookServer:
    """The receiver bound to its socket (the real port when 0 was asked for), served by uvicorn.

    ``start()`` serves in a thread and returns once it accepts requests; ``shutdown()`` stops it
    (graceful for up to 5 s) and closes the socket. ``serve_forever()`` serves in the caller's thread.
    """

    def __init__(
        self,
        address: tuple[str, int],
        secret: str,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        threads: int = 32,
    ) -> None:
        app = create_app(secret, body_timeout=body_timeout, threads=threads)  # refuses an empty secret
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it a response's two writes (head, body) wait ~40 ms for the client's delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        protocol = type("GuardedProtocol", (_GuardedProtocol,), {"head_timeout": head_timeout})
        config = uvicorn.Config(
            app,
            http=protocol,
            loop="asyncio",
            ws="none",
            lifespan="on",
            log_config=None,  # our handlers and redacting formatter (configure_logging)
            access_log=False,  # the request line may carry ?secret=
            proxy_headers=False,  # nothing in front of us is trusted to name the peer
            server_header=False,
            backlog=BACKLOG,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=KEEPALIVE_TIMEOUT,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the bound socket."""
        host, port = self.server_address
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{port}"

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (from another thread)."""
        self._server.run(sockets=[self.socket])

    def start(self, timeout: float = 15.0) -> None:
        """Serve in a daemon thread; return once requests are accepted (EngineError if it died)."""
        self._thread = threading.Thread(target=self.serve_forever, name="webhook-serve", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > timeout:
                raise EngineError("the webhook receiver did not start (see its log)")
            self._thread.join(0.02)
            waited += 0.02

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop serving (requests in progress get up to 5 s) and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> WebhookServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def make_server(settings: Settings, host: str | None = None, port: int | None = None) -> WebhookServer:
    """Bind the receiver (not yet serving); raises EngineError when WEBHOOK_SECRET is empty."""
    return WebhookServer(
        (host if host is not None else settings.webhook_host, settings.webhook_port if port is None else port),
        settings.webhook_secret,
        threads=settings.db_max_connections,
    )


def parse_args(argv: Sequence[str] | None, settings: Settings) -> argparse.Namespace:
    """Command-line options (defaults from WEBHOOK_HOST / WEBHOOK_PORT)."""
    p = argparse.ArgumentParser(prog="python webhook.py", description="Evolution webhook receiver")
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
    # prometheus_client's server on METRICS_PORT, not a route here: this port faces Evolution
    if not serve_metrics(settings):
        return 2
    try:
        server = make_server(settings, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    stop_on_signals(stop.set)
    try:
        try:
            server.start()
        except EngineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{READY_PREFIX} {server.url}", flush=True)
        log.info("webhook receiver listening on %s:%s", args.host, server.server_address[1])
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        close_db()
    log.info("webhook receiver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
