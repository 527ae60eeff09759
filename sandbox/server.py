"""The sandbox HTTP server: fake OpenRouter + Evolution API v2 with faults and a ledger (SPEC §5).

Implementation: the standard library's ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, one
thread per connection. Threads make slow answers (latency injection, Evolution's ``delay``, hangs)
trivially concurrent, and with each answer written in one ``sendall`` and Nagle off it sustains
thousands of requests/s on two cores (``bench/bench_sandbox.py``), so no third-party server is needed.

Routes:

* ``POST /api/v1/chat/completions`` (also ``/chat/completions``, ``/v1/chat/completions``): Bearer key
* ``POST /message/sendText/{instance}``, ``GET /instance/connectionState/{instance}``: ``apikey`` header
* control: ``GET /__sandbox/health``, ``GET|POST /__sandbox/faults`` (JSON merge patch; ``?replace=1``
  starts from the defaults), ``GET /__sandbox/ledger?since=SEQ&limit=N&entries=0``,
  ``POST /__sandbox/reset`` (``{"keep_faults": true}`` keeps the current faults, else the start-up ones),
  ``POST /__sandbox/inbound`` (a scripted inbound message, see sandbox.replies),
  ``GET|POST /__sandbox/connection`` (``{"instance", "state": "open"|"close"|"connecting",
  "status_reason"?}``), ``GET /__sandbox/events`` (sinks, RabbitMQ connection and queues, pending
  events, counts per sink and event)

Events (sandbox.events): after an accepted send, ``send.message`` and the receipts
(``messages.update``, ``webhook_statuses`` each ``webhook_gap_ms`` apart); scripted and automatic
inbound replies (``messages.upsert``); ``connection.update`` whenever an instance's state changes.
They go to the webhook sink (``webhook_url``, ``webhook_events``) and, when started with an AMQP URL,
to RabbitMQ as Evolution's global mode publishes them (``amqp_events``; sandbox.amqp).

Evolution answers a send on an instance that is not connected with
``500 {"status":500,"error":"Internal Server Error","response":{"message":["Error: Connection Closed"]}}``
(what Evolution v2.2/2.3 do); the sandbox does the same for disconnected and connecting instances.

Fault draws are deterministic: each request's random stream is seeded from (seed, route, request
identity, how many times that identity was seen), so a replay gives the same faults whatever the
thread interleaving.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sandbox import llm
from sandbox.amqp import AmqpSink
from sandbox.config import CONTENT_FAULTS, FaultError, merge_patch, public_view, strip_masked, validate, with_defaults
from sandbox.events import (
    EVENTS,
    EventBus,
    Sink,
    connection_data,
    messages_update_data,
    sent_message_data,
)
from sandbox.ledger import Ledger
from sandbox.replies import Inbound, draw_reply, message_id, parse_inbound, upsert_data
from sandbox.webhook import WebhookSink

__all__ = ["SandboxApp", "SandboxServer", "make_server"]

logger = logging.getLogger(__name__)

_CHAT_PATHS = ("/api/v1/chat/completions", "/chat/completions", "/v1/chat/completions")
_SEND_PREFIX = "/message/sendText/"
_STATE_PREFIX = "/instance/connectionState/"

_OPENROUTER_MESSAGES = {
    400: "Bad Request",
    401: "User not found.",
    402: "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
    403: "Input flagged by moderation",
    404: "Model not found",
    408: "Request timed out",
    429: "Rate limit exceeded: too many requests per minute",
    500: "Internal Server Error",
    502: "Provider returned error",
    503: "No available model provider that meets your routing requirements",
}


@dataclass
class Reply:
    """What to do with a request: answer it, or hang/close without answering."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    action: str = "reply"  # "reply" | "hang" | "close"
    hang_seconds: float = 0.0
    check_peer: bool = False  # sends: find out whether the client is still there to see the answer
    on_written: Callable[[bool], None] | None = None


def _json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status=status, body=json.dumps(obj, ensure_ascii=False).encode(), headers=headers or [])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _digits(number: Any) -> str:
    return "".join(ch for ch in str(number) if ch.isascii() and ch.isdigit())


_STATES = ("open", "close", "connecting")


def connection_states(cfg: dict[str, Any]) -> dict[str, str]:
    """The state of every instance the faults name (any other instance is "open")."""
    states = {name: "connecting" for name in cfg["connecting_instances"]}
    states.update({name: "close" for name in cfg["disconnected_instances"]})  # as _state: close wins
    return states


class SandboxApp:
    """Request handling, fault state, ledger and events; independent of the socket server."""

    def __init__(
        self,
        *,
        faults: dict[str, Any] | None = None,
        seed: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        chat_key: str | None = None,
        evolution_key: str | None = None,
        events_amqp_url: str | None = None,
        events_exchange: str = "evolution",
        events_prefix: str = "evolution",
        events_amqp_retry_seconds: float = 30.0,
        events_amqp_publishers: int = 4,
    ) -> None:
        self.seed = seed
        self.stop_event = threading.Event()
        self.ledger = Ledger()
        self._faults_lock = threading.Lock()
        self._doc: dict[str, Any] = {}
        self.faults: dict[str, Any] = validate(with_defaults({}))
        self.bus: EventBus | None = None  # no connection.update for the start-up faults
        start: dict[str, Any] = {}
        for key, value in (
            ("webhook_url", webhook_url),
            ("webhook_secret", webhook_secret),
            ("chat_key", chat_key),
            ("evolution_key", evolution_key),
        ):
            if value is not None:
                start[key] = value
        self.patch_faults(merge_patch(start, faults or {}))
        self._initial_doc = self._doc
        self.server_url = ""
        self._key_counter = 0
        self._inbound_counter = 0
        self._key_lock = threading.Lock()
        self.amqp: AmqpSink | None = None
        if events_amqp_url:
            self.amqp = AmqpSink(
                url=events_amqp_url,
                exchange=events_exchange,
                prefix=events_prefix,
                events=lambda: list(self.faults["amqp_events"]),
                on_outcome=lambda e, o: self.ledger.event_outcome("amqp", e, o),
                retry_seconds=events_amqp_retry_seconds,
                publishers=events_amqp_publishers,
            )
        sinks: list[Sink] = [WebhookSink(on_outcome=lambda e, o: self.ledger.event_outcome("webhook", e, o))]
        if self.amqp is not None:
            sinks.append(self.amqp)
        self.bus = EventBus(
            sinks=sinks,
            faults=lambda: self.faults,
            epoch=lambda: self.ledger.epoch,
            on_dispatch=self.ledger.dispatched,
        )

    # -- control ----------------------------------------------------------------------------------

    def patch_faults(
        self,
        patch: dict[str, Any],
        *,
        replace: bool = False,
        origin: str = "faults",
        reasons: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Apply a JSON merge patch to the faults (atomically); return the new full document.

        Instances whose connection state changes get a ``connection.update`` (``reasons`` may give
        their ``statusReason``).
        """
        if not isinstance(patch, dict):
            raise FaultError("a fault patch must be a JSON object")
        with self._faults_lock:
            doc = merge_patch({} if replace else self._doc, strip_masked(patch))
            self._swap(doc, origin, reasons or {})
            full = self.faults
        logger.info("faults now %s", json.dumps(public_view(self._doc), sort_keys=True))
        return full

    def _swap(self, doc: dict[str, Any], origin: str, reasons: dict[str, int]) -> None:
        """Install a new fault document (caller holds the lock) and publish the connection changes."""
        full = validate(with_defaults(doc))
        before = connection_states(self.faults)
        self._doc, self.faults = doc, full
        if self.bus is None:
            return
        after = connection_states(full)
        for instance in sorted(set(before) | set(after)):
            state = after.get(instance, "open")
            if state != before.get(instance, "open"):
                data = connection_data(instance, state, reasons.get(instance))
                self.ledger.record_connection(instance, state, data["statusReason"], origin)
                self.bus.schedule("connection.update", instance, data)

    def set_connection(self, instance: Any, state: Any, status_reason: Any = None) -> bool:
        """Put an instance in a connection state (control API); True if its state changed."""
        if not isinstance(instance, str) or not instance:
            raise FaultError("instance: expected a non-empty string")
        if state not in _STATES:
            raise FaultError(f"state: {state!r} is not one of {', '.join(_STATES)}")
        if status_reason is not None and (
            isinstance(status_reason, bool) or not isinstance(status_reason, int) or not 0 <= status_reason <= 999
        ):
            raise FaultError(f"status_reason: expected a whole number (a DisconnectReason), got {status_reason!r}")
        with self._faults_lock:
            cfg = self.faults
            changed = connection_states(cfg).get(instance, "open") != state
            lists = {
                key: [name for name in cfg[key] if name != instance]
                for key in ("disconnected_instances", "connecting_instances")
            }
            if state == "close":
                lists["disconnected_instances"].append(instance)
            elif state == "connecting":
                lists["connecting_instances"].append(instance)
            reasons = {instance: status_reason} if status_reason is not None else {}
            self._swap(merge_patch(self._doc, lists), "control", reasons)
        return changed

    def inbound(self, spec: Inbound, *, epoch: int | None = None) -> dict[str, Any]:
        """Publish a scripted inbound ``messages.upsert`` after ``spec.delay_ms``; returns its key id and data."""
        epoch = self.ledger.epoch if epoch is None else epoch
        if spec.id:
            key_id = spec.id
        elif spec.trigger:
            key_id = message_id(self.seed, spec, f"auto|{spec.trigger['key_id']}")
        else:
            with self._key_lock:
                self._inbound_counter += 1
                n = self._inbound_counter
            key_id = message_id(self.seed, spec, n)
        data = upsert_data(spec, key_id)
        entry = {
            "instance": spec.instance,
            "number": spec.number,
            "lid": spec.lid,
            "remote_jid": data["key"]["remoteJid"],
            "key_id": key_id,
            "text": spec.text,
            "message_type": data["messageType"],
            "from_me": spec.from_me,
            "group": spec.group,
            "broadcast": spec.broadcast,
            "origin": spec.origin,
            "trigger": spec.trigger or None,
            "delay_ms": round(spec.delay_ms, 1),
        }

        def on_publish(envelope: dict[str, Any]) -> None:
            envelope["data"]["messageTimestamp"] = int(time.time())
            self.ledger.record_inbound(entry, epoch)

        assert self.bus is not None
        self.bus.schedule(
            "messages.upsert", spec.instance, data, delay_s=spec.delay_ms / 1000.0, epoch=epoch, on_publish=on_publish
        )
        return {"key_id": key_id, "instance": spec.instance, "delay_ms": spec.delay_ms, "data": data}

    def events_view(self) -> dict[str, Any]:
        """The event sinks, what is pending and what was published, for the control API."""
        cfg = self.faults
        assert self.bus is not None
        return {
            "events": list(EVENTS),
            "pending": self.bus.pending(),
            "sinks": {
                "webhook": {
                    "url": cfg["webhook_url"],
                    "events": cfg["webhook_events"],
                    **self.bus.sinks[0].view(),
                },
                "amqp": {"events": cfg["amqp_events"], **self.amqp.view()} if self.amqp is not None else None,
            },
            "counts": self.ledger.summary()["events"],
            "connections": {"instances": connection_states(cfg), "default": "open"},
        }

    def reset(self, *, keep_faults: bool = False) -> None:
        """Clear the ledger (and restore the start-up faults unless keep_faults).

        Events scheduled before the reset are dropped; connection changes the restored faults make are
        published (and recorded) after it.
        """
        self.ledger.reset()
        if not keep_faults:
            with self._faults_lock:
                self._swap(self._initial_doc, "reset", {})

    def close(self) -> None:
        """Stop background work and wake every sleeping request."""
        self.stop_event.set()
        if self.bus is not None:
            self.bus.stop()

    # -- dispatch ---------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> Reply:
        """Answer one request."""
        path, _, query = target.partition("?")
        if path.startswith("/__sandbox/"):
            return self._control(method, path, urllib.parse.parse_qs(query), body)
        if method == "POST" and path in _CHAT_PATHS:
            return self._chat(headers, body)
        if method == "POST" and path.startswith(_SEND_PREFIX) and len(path) > len(_SEND_PREFIX):
            return self._send(urllib.parse.unquote(path[len(_SEND_PREFIX) :]), headers, body)
        if method == "GET" and path.startswith(_STATE_PREFIX) and len(path) > len(_STATE_PREFIX):
            return self._state(urllib.parse.unquote(path[len(_STATE_PREFIX) :]), headers)
        return _json_reply(
            404, {"status": 404, "error": "Not Found", "response": {"message": [f"Cannot {method} {path}"]}}
        )

    def _control(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Reply:
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            return _json_reply(400, {"error": "body is not JSON"})
        if path == "/__sandbox/health":
            return _json_reply(200, {"ok": True, "pid": os.getpid(), "seed": self.seed})
        if path == "/__sandbox/faults":
            if method == "POST":
                try:
                    full = self.patch_faults(payload, replace=query.get("replace", ["0"])[0] in ("1", "true"))
                except FaultError as exc:
                    return _json_reply(400, {"error": str(exc)})
                return _json_reply(200, public_view(full))
            return _json_reply(200, public_view(self.faults))
        if path == "/__sandbox/ledger":
            since = int(query.get("since", ["0"])[0] or 0)
            limit_raw = query.get("limit", [""])[0]
            if query.get("entries", ["1"])[0] in ("0", "false"):
                return _json_reply(200, {"summary": self.ledger.summary()})
            return _json_reply(200, self.ledger.entries_since(since, int(limit_raw) if limit_raw else None))
        if path == "/__sandbox/inbound" and method == "POST":
            return self._control_inbound(payload)
        if path == "/__sandbox/connection":
            return self._control_connection(method, payload)
        if path == "/__sandbox/events":
            return _json_reply(200, self.events_view())
        if path == "/__sandbox/reset" and method == "POST":
            self.reset(keep_faults=bool(payload.get("keep_faults")) if isinstance(payload, dict) else False)
            return _json_reply(200, {"ok": True})
        return _json_reply(404, {"error": f"no control route {method} {path}"})

    def _control_inbound(self, payload: Any) -> Reply:
        try:
            if isinstance(payload, list):  # a batch: all validated before any is scheduled
                if len(payload) > 10_000:
                    raise FaultError("at most 10000 inbound messages per request")
                specs = []
                for i, doc in enumerate(payload):
                    try:
                        specs.append(parse_inbound(doc))
                    except FaultError as exc:
                        raise FaultError(f"[{i}] {exc}") from exc
                return _json_reply(200, {"messages": [self.inbound(spec) for spec in specs]})
            return _json_reply(200, self.inbound(parse_inbound(payload)))
        except FaultError as exc:
            return _json_reply(400, {"error": str(exc)})

    def _control_connection(self, method: str, payload: Any) -> Reply:
        if method != "POST":
            return _json_reply(200, {"instances": connection_states(self.faults), "default": "open"})
        if not isinstance(payload, dict):
            return _json_reply(400, {"error": "expected a JSON object"})
        unknown = sorted(set(payload) - {"instance", "state", "status_reason"})
        try:
            if unknown:
                raise FaultError(f"{unknown[0]}: unknown key (instance, state, status_reason)")
            changed = self.set_connection(payload.get("instance"), payload.get("state"), payload.get("status_reason"))
        except FaultError as exc:
            return _json_reply(400, {"error": str(exc)})
        return _json_reply(200, {"instance": payload["instance"], "state": payload["state"], "changed": changed})

    # -- shared fault machinery -------------------------------------------------------------------

    def _rng(self, route: str, identity: Hashable, attempt: int) -> random.Random:
        seed = hashlib.sha256(f"{self.seed}|{route}|{identity!r}|{attempt}".encode()).digest()
        return random.Random(int.from_bytes(seed[:8], "big"))

    @staticmethod
    def _draw(route: str, rcfg: dict[str, Any], rng: random.Random) -> str | None:
        """One uniform draw against the cumulative rates: a status ("429") or content fault, or None."""
        u = rng.random()
        acc = 0.0
        statuses = sorted(k for k in rcfg if k.startswith("rate_") and k[5:].isdigit())
        for key in (*statuses, *(f"rate_{name}" for name in CONTENT_FAULTS[route])):
            rate = rcfg.get(key) or 0.0
            if rate:
                acc += rate
                if u < acc:
                    return key[5:]
        return None

    @staticmethod
    def _latency(rcfg: dict[str, Any], rng: random.Random) -> float:
        value = rcfg.get("latency_ms") or 0
        if isinstance(value, list):
            return rng.uniform(value[0], value[1]) / 1000.0
        return float(value) / 1000.0

    @staticmethod
    def _opt(cfg: dict[str, Any], rcfg: dict[str, Any], key: str) -> Any:
        return rcfg[key] if key in rcfg else cfg[key]

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.stop_event.wait(seconds)

    def _forced_error(
        self,
        cfg: dict[str, Any],
        rcfg: dict[str, Any],
        fault: str | None,
        entry: dict[str, Any],
        identity: Hashable,
        epoch: int,
    ) -> tuple[int, list[tuple[str, str]]] | None:
        """The error status (and Retry-After headers) a request gets from the route's
        ``always_status`` or a drawn status fault, recorded in the ledger; None: no forced error."""
        status = rcfg.get("always_status")
        if status is not None and not 200 <= status < 300:
            fault = f"always_{status}"
        elif fault is not None and fault.isdigit():
            status = int(fault)
        else:
            return None
        entry.update(status=status, fault=fault)
        self.ledger.record_request(entry, epoch)
        return status, self._retry_after(cfg, rcfg, status, identity, epoch)

    def _retry_after(
        self, cfg: dict[str, Any], rcfg: dict[str, Any], status: int, identity: Hashable, epoch: int
    ) -> list[tuple[str, str]]:
        """Retry-After header for this status (if configured) and remember the not-before time."""
        if status not in cfg["retry_after_statuses"]:
            return []
        seconds = float(self._opt(cfg, rcfg, "retry_after"))
        now = time.time()
        if self._opt(cfg, rcfg, "retry_after_form") == "http-date":
            not_before = float(math.ceil(now + seconds))  # HTTP dates have whole seconds: round up
            value = email.utils.formatdate(not_before, usegmt=True)
        else:
            not_before = now + seconds
            value = str(int(seconds)) if seconds.is_integer() else repr(seconds)
        self.ledger.hold(identity, not_before, epoch)
        return [("Retry-After", value)]

    # -- OpenRouter -------------------------------------------------------------------------------

    def _or_error(self, status: int, message: str | None = None, headers: list[tuple[str, str]] | None = None) -> Reply:
        if status == 502:  # what a gateway in front of the API answers: not JSON
            return Reply(
                status=502,
                body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
                headers=headers or [],
            )
        msg = message or _OPENROUTER_MESSAGES.get(status) or HTTPStatus(status).phrase
        return _json_reply(status, {"error": {"code": status, "message": msg, "metadata": None}}, headers)

    def _chat(self, headers: Any, body: bytes) -> Reply:
        cfg = self.faults
        if headers.get("Authorization", "") != f"Bearer {cfg['chat_key']}":
            self.ledger.record_request({"route": "chat", "status": 401, "fault": "auth"})
            return self._or_error(401, "No auth credentials found" if not headers.get("Authorization") else None)
        try:
            req = json.loads(body)
            messages = req["messages"]
            model = str(req["model"])
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except (ValueError, KeyError, TypeError) as exc:
            self.ledger.record_request({"route": "chat", "status": 400, "fault": None})
            return self._or_error(400, f"Invalid request: {type(exc).__name__}: {str(exc)[:100]}")
        fmt = req.get("response_format")
        json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        route = ("triage" if llm.is_triage(messages) else "split") if json_mode else "chat"
        rcfg = cfg[route]
        epoch = self.ledger.epoch
        identity = ("llm", _digest(req))
        attempt, early = self.ledger.arrive(route, identity, cfg["early_tolerance_ms"] / 1000.0)
        rng = self._rng(route, identity[1], attempt)
        fault = self._draw(route, rcfg, rng)
        latency = self._latency(rcfg, rng)
        self._sleep(latency)
        entry: dict[str, Any] = {"route": route, "early": early, "latency_ms": round(latency * 1000, 1)}
        if cfg["keep_prompts"] and route == "chat":
            entry["model"] = model
            entry["messages"] = messages

        forced = self._forced_error(cfg, rcfg, fault, entry, identity, epoch)
        if forced is not None:
            status, headers = forced
            return self._or_error(status, headers=headers)
        if fault == "accept_then_hang":
            entry.update(status=None, fault=fault)
            self.ledger.record_request(entry, epoch)
            return Reply(
                action=self._opt(cfg, rcfg, "hang_mode"), hang_seconds=float(self._opt(cfg, rcfg, "hang_seconds"))
            )

        if route == "triage":
            reply = llm.triage_reply(messages)
            intent = llm.triage_intent(reply)
            content = self._triage_content(intent, fault)
            # T-SEC-1 evidence: whether the reply's text reached a system message
            entry.update(intent=intent, reply_in_system=bool(reply) and reply in llm.system_text(messages))
        elif json_mode:
            source = llm.split_source(messages)
            content = self._split_content(source, llm.max_parts_hint(messages), fault, rng)
        else:
            content = llm.generate_text(messages)
        finish_reason: str | None = "stop"
        choice_extra: dict[str, Any] = {}
        top_error = None
        if fault == "empty":
            content = rng.choice(["", "   ", "\n"])
        elif fault == "error_in_200":
            form = cfg["error_in_200_form"]
            if form == "mixed":
                form = rng.choice(["finish_reason", "choice_error", "top_level"])
            if form == "finish_reason":
                finish_reason, content = "error", content[: len(content) // 3]
            elif form == "choice_error":
                finish_reason = "error"
                content = ""
                choice_extra["error"] = {"code": 502, "message": "Upstream provider error", "metadata": {}}
            else:
                top_error = {"code": 502, "message": "Provider returned error", "metadata": {}}
        prompt_tokens = llm.count_tokens(llm.all_text(messages))
        completion_tokens = llm.count_tokens(content) if content.strip() else 0
        answer: dict[str, Any] = {
            "id": f"gen-{identity[1][:24]}-{attempt}",
            "provider": "Sandbox",
            "model": model,
            "object": "chat.completion",
            "created": int(time.time()),
            "choices": [
                {
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "native_finish_reason": finish_reason,
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None, "reasoning": None},
                    **choice_extra,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        if route == "triage":  # OpenRouter's usage accounting: what the call cost, in credits
            answer["usage"]["cost"] = round((prompt_tokens + completion_tokens) * 1e-6, 8)
        if top_error is not None:
            answer = {"error": top_error, "user_id": "sandbox"}
        entry.update(status=200, fault=fault)
        self.ledger.record_request(entry, epoch)
        return _json_reply(200, answer)

    @staticmethod
    def _triage_content(intent: str, fault: str | None) -> str:
        if fault == "garbage":
            return f"The intent is probably {intent}, I think."
        if fault == "unknown_intent":
            return json.dumps({"intent": "maybe_later"})
        return json.dumps({"intent": intent})

    @staticmethod
    def _split_content(source: str, max_parts: int | None, fault: str | None, rng: random.Random) -> str:
        parts = llm.split_parts(source, max_parts)
        good = json.dumps({"messages": parts}, ensure_ascii=False)
        if fault == "non_json":
            return "Claro! Aqui estão as mensagens:\n" + "\n".join(f"- {p}" for p in parts)
        if fault == "fenced":
            return f"```json\n{json.dumps({'messages': parts}, ensure_ascii=False, indent=2)}\n```"
        if fault == "prose":
            return f"Aqui está o JSON pedido:\n{good}\nQualquer ajuste, é só pedir!"
        if fault == "too_many":
            words = source.split()
            many = [" ".join(words[i : i + 2]) for i in range(0, len(words), 2)] or [source]
            limit = (max_parts or 3) + 2
            while len(many) < limit:  # always more parts than allowed, even for a short text
                many.append(rng.choice(["Ok!", "Abraço!", "Até mais."]))
            return json.dumps({"messages": many}, ensure_ascii=False)
        if fault == "too_long":
            long = source
            while len(long) < 1200:
                long = f"{long} {source}" if source else long + "a" * 100
            return json.dumps({"messages": [long]}, ensure_ascii=False)
        return good

    # -- Evolution --------------------------------------------------------------------------------

    @staticmethod
    def _evo_error(status: int, messages: list[Any], headers: list[tuple[str, str]] | None = None) -> Reply:
        if status == 502:
            return Reply(
                status=502,
                body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
                headers=headers or [],
            )
        return _json_reply(
            status, {"status": status, "error": HTTPStatus(status).phrase, "response": {"message": messages}}, headers
        )

    def _evo_gate(self, route: str, instance: str, headers: Any) -> Reply | None:
        cfg = self.faults
        if headers.get("apikey") != cfg["evolution_key"]:
            self.ledger.record_request({"route": route, "instance": instance, "status": 401, "fault": "auth"})
            return self._evo_error(401, ["Unauthorized"])
        if instance in cfg["unknown_instances"]:
            self.ledger.record_request(
                {"route": route, "instance": instance, "status": 404, "fault": "unknown_instance"}
            )
            return self._evo_error(404, [f'The "{instance}" instance does not exist'])
        return None

    def _new_key_id(self, identity: Hashable) -> str:
        with self._key_lock:
            self._key_counter += 1
            n = self._key_counter
        return "3EB0" + hashlib.sha256(f"{self.seed}|{n}|{identity!r}".encode()).hexdigest()[:18].upper()

    def _send(self, instance: str, headers: Any, body: bytes) -> Reply:
        denied = self._evo_gate("send", instance, headers)
        if denied is not None:
            return denied
        cfg = self.faults
        rcfg = cfg["send"]
        try:
            req = json.loads(body)
            number_raw, text = req["number"], req["text"]
            if not isinstance(text, str) or not text:
                raise ValueError("text")
            delay_ms = float(req.get("delay") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            self.ledger.record_request({"route": "send", "instance": instance, "status": 400, "fault": None})
            return self._evo_error(
                400,
                [
                    [
                        f'instance requires property "{exc.args[0]}"'
                        if isinstance(exc, KeyError)
                        else f"invalid body: {type(exc).__name__}"
                    ]
                ],
            )
        number = _digits(number_raw)
        epoch = self.ledger.epoch
        identity = ("send", instance, number, text)
        attempt, early = self.ledger.arrive("send", identity, cfg["early_tolerance_ms"] / 1000.0)
        rng = self._rng("send", identity, attempt)
        fault = self._draw("send", rcfg, rng)
        latency = self._latency(rcfg, rng)
        self._sleep(latency + max(0.0, delay_ms) / 1000.0)
        entry: dict[str, Any] = {
            "route": "send",
            "instance": instance,
            "number": number,
            "early": early,
            "latency_ms": round(latency * 1000, 1),
        }

        forced = self._forced_error(cfg, rcfg, fault, entry, identity, epoch)
        if forced is not None:
            status, headers = forced
            return self._evo_error(status, [HTTPStatus(status).phrase], headers)
        if instance in cfg["disconnected_instances"] or instance in cfg["connecting_instances"]:
            entry.update(status=500, fault="disconnected")
            self.ledger.record_request(entry, epoch)
            return self._evo_error(500, ["Error: Connection Closed"])
        if not number or number in cfg["invalid_numbers"]:
            entry.update(status=400, fault="invalid_number")
            self.ledger.record_request(entry, epoch)
            return self._evo_error(400, [{"exists": False, "jid": f"{number}@s.whatsapp.net", "number": number}])

        remote_jid = f"{number}@s.whatsapp.net"
        key_id = self._new_key_id(identity)
        hang = fault == "accept_then_hang"
        hang_mode = self._opt(cfg, rcfg, "hang_mode") if hang else "ok"
        send_entry = self.ledger.record_send(instance, number, text, key_id, hang_mode or "ok", epoch)
        answer = sent_message_data(instance, remote_jid, key_id, text)
        if send_entry is not None:
            self._after_send(cfg, instance, number, remote_jid, key_id, answer, send_entry["part"], epoch)
        entry.update(key_id=key_id)
        if hang:
            entry.update(status=None, fault=fault)
            self.ledger.record_request(entry, epoch)
            return Reply(action=hang_mode, hang_seconds=float(self._opt(cfg, rcfg, "hang_seconds")))
        entry.update(status=201, fault=None)
        self.ledger.record_request(entry, epoch)
        reply = _json_reply(201, answer)
        reply.check_peer = True
        reply.on_written = lambda ok: self.ledger.mark_seen(send_entry, ok, None if ok else "client_gone", epoch)
        return reply

    def _after_send(
        self,
        cfg: dict[str, Any],
        instance: str,
        number: str,
        remote_jid: str,
        key_id: str,
        answer: dict[str, Any],
        part: int,
        epoch: int,
    ) -> None:
        """What Evolution publishes after an accepted send: send.message, the receipts; and the lead's reply."""
        bus = self.bus
        assert bus is not None
        if bus.wants("send.message"):
            bus.schedule("send.message", instance, answer, epoch=epoch)
        # delivery_errors: a deterministic draw per send (seed, key id) says whether this one fails
        error_rate = float(cfg["delivery_errors"].get(instance, 0.0))
        failed = error_rate > 0 and random.Random(f"{self.seed}|delivery_error|{key_id}").random() < error_rate
        statuses = cfg["webhook_statuses"]
        if failed:
            statuses = [s for s in statuses if s == "SERVER_ACK"] + ["ERROR"]
        if bus.wants("messages.update"):
            gap_s = cfg["webhook_gap_ms"] / 1000.0
            for i, status in enumerate(statuses, start=1):
                data = messages_update_data(instance, key_id, remote_jid, status)
                bus.schedule("messages.update", instance, data, delay_s=gap_s * i, epoch=epoch)
        if failed:
            return  # it never reached the lead: nobody answers it
        reply = draw_reply(cfg["replies"], self.seed, instance, number, part, key_id)
        if reply is not None:
            self.inbound(reply, epoch=epoch)

    def _state(self, instance: str, headers: Any) -> Reply:
        denied = self._evo_gate("state", instance, headers)
        if denied is not None:
            return denied
        cfg = self.faults
        rcfg = cfg["state"]
        epoch = self.ledger.epoch
        identity = ("state", instance)
        attempt, early = self.ledger.arrive("state", identity, cfg["early_tolerance_ms"] / 1000.0)
        rng = self._rng("state", identity, attempt)
        fault = self._draw("state", rcfg, rng)
        latency = self._latency(rcfg, rng)
        self._sleep(latency)
        entry: dict[str, Any] = {
            "route": "state",
            "instance": instance,
            "early": early,
            "latency_ms": round(latency * 1000, 1),
        }
        forced = self._forced_error(cfg, rcfg, fault, entry, identity, epoch)
        if forced is not None:
            status, headers = forced
            return self._evo_error(status, [HTTPStatus(status).phrase], headers)
        if fault == "accept_then_hang":
            entry.update(status=None, fault=fault)
            self.ledger.record_request(entry, epoch)
            return Reply(
                action=self._opt(cfg, rcfg, "hang_mode"), hang_seconds=float(self._opt(cfg, rcfg, "hang_seconds"))
            )
        if instance in cfg["disconnected_instances"]:
            state = "close"
        elif instance in cfg["connecting_instances"]:
            state = "connecting"
        else:
            state = "open"
        entry.update(status=200, fault=None, state=state)
        self.ledger.record_request(entry, epoch)
        return _json_reply(200, {"instance": {"instanceName": instance, "state": state}})


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP/1.1 keep-alive adapter between the socket and SandboxApp.handle."""

    protocol_version = "HTTP/1.1"
    server_version = "Sandbox/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections; far above any client's keep-alive expiry
    server: SandboxServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            reply = self.server.app.handle(method, self.path, self.headers, body)
        except Exception:  # a sandbox bug must show up as a 500, never kill the connection thread silently
            logger.exception("sandbox error on %s %s", method, self.path.partition("?")[0])
            reply = _json_reply(500, {"error": {"code": 500, "message": "sandbox internal error"}})
        if reply.action != "reply":
            if reply.action == "hang":
                self.server.app.stop_event.wait(reply.hang_seconds)
            self.close_connection = True  # the socket is closed with no answer written
            return
        if reply.check_peer and _peer_closed(self.connection):
            self.close_connection = True
            if reply.on_written:
                reply.on_written(False)
            return
        if self.close_connection:
            conn = "close"
        else:
            conn = "keep-alive"
        head = [
            f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            f"Connection: {conn}",
        ]
        head.extend(f"{k}: {v}" for k, v in reply.headers)
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body
        ok = True
        try:
            self.wfile.write(data)
        except OSError:
            ok = False
            self.close_connection = True
        if reply.on_written:
            reply.on_written(ok)


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client already closed its side (it will never see our answer)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class SandboxServer(ThreadingHTTPServer):
    """Threading HTTP server owning a SandboxApp."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: SandboxApp) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection error from %s", client_address, exc_info=True)

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # server_bind stored getsockname(): a str host, never bytes
        return f"http://{host}:{port}"


def make_server(host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any) -> SandboxServer:
    """Build (not start) a sandbox server; port 0 picks a free port."""
    app = SandboxApp(**app_kwargs)
    server = SandboxServer((host, port), app)
    app.server_url = server.url
    assert app.bus is not None
    app.bus.server_url = server.url
    return server
