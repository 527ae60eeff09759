"""Sandbox fault configuration: defaults, JSON merge patches (RFC 7386) and validation.

The whole document is replaced atomically on every change (copy on write), so request threads
read it without a lock. Shape (every key optional in a patch; ``null`` restores the default)::

    {
      "chat":  {ROUTE},   # POST .../chat/completions without response_format
      "split": {ROUTE},   # POST .../chat/completions with response_format json_object
      "triage": {ROUTE},  # the same with a <reply> block in the user message (reply triage, R-IN-5):
                          # answered {"intent": ...} by sandbox.llm.triage_intent's keyword rules
      "send":  {ROUTE},   # POST /message/sendText/{instance}
      "state": {ROUTE},   # GET /instance/connectionState/{instance}
      "retry_after": 1.0,                 # seconds announced in Retry-After
      "retry_after_form": "seconds",      # or "http-date" (whole seconds, rounded up)
      "retry_after_statuses": [429, 503], # statuses that carry Retry-After (add 402 to test that case)
      "hang_seconds": 5.0,                # accept_then_hang: how long the connection hangs
      "hang_mode": "hang",                # "hang" (sleep, then close unanswered) | "close" (close at once)
      "error_in_200_form": "mixed",       # "finish_reason" | "choice_error" | "top_level" | "mixed"
      "unknown_instances": [],            # 404 on every Evolution route
      "disconnected_instances": [],       # state "close"; sendText -> 500 "Error: Connection Closed"
      "connecting_instances": [],         # state "connecting"; sendText -> 500 "Error: Connection Closed"
      "invalid_numbers": [],              # digits; sendText -> 400 exists:false
      "chat_key": "sandbox-key",          # expected Bearer key
      "evolution_key": "sandbox-evo-key", # expected apikey header
      "webhook_url": null, "webhook_secret": null,
      "webhook_statuses": ["SERVER_ACK", "DELIVERY_ACK", "READ"], "webhook_gap_ms": 5,
      "webhook_events": ["messages.update", "messages.upsert", "connection.update"],  # posted to webhook_url
      "amqp_events": ["messages.upsert", "messages.update", "connection.update", "send.message"],  # RabbitMQ
      "replies": null,                    # automatic inbound replies (below); null: none
      "early_tolerance_ms": 10,           # slack before a retry counts as early
      "keep_prompts": false               # chat requests keep their messages in the ledger ("messages")
    }

    replies = {                           # a lead = an (instance, number) pair; it replies at most once
      "rate": 0.0,                        # probability that a lead replies
      "after_part": 1,                    # ... once it received its Nth accepted send (since the last reset)
      "delay_ms": 500 | [min, max],       # that long after the send was accepted
      "texts": ["Oi, tenho interesse"],   # weighted choice: strings or {"text", "message_type", "weight"}
      "lid_rate": 0.0,                    # share of replying leads whose chat is LID-addressed
      "instances": null                   # only these instances (null: all)
    }

    ROUTE = {
      "latency_ms": 0 | [min, max],       # added to every answer of the route
      "always_status": null | 401 | 402 | 500 | ...,   # every request of the route gets it until cleared
      "rate_429": 0.0, "rate_500": 0.0, "rate_502": 0.0, "rate_503": 0.0, "rate_<any status>": 0.0,
      "rate_error_in_200": 0.0, "rate_empty": 0.0,                      # chat, split
      "rate_non_json": 0.0, "rate_fenced": 0.0, "rate_prose": 0.0,
      "rate_too_many": 0.0, "rate_too_long": 0.0,                       # split
      "rate_garbage": 0.0, "rate_unknown_intent": 0.0,                  # triage: not JSON / {"intent": "maybe"}
      "rate_accept_then_hang": 0.0,       # send: accepted (ledger), then hang/close without answering
      "retry_after": ..., "retry_after_form": ..., "hang_seconds": ..., "hang_mode": ...  # per-route overrides
    }

Rates are probabilities of mutually exclusive outcomes drawn once per request; their sum must be <= 1.
Changing ``disconnected_instances`` / ``connecting_instances`` changes those instances' connection
state, and the sandbox publishes a ``connection.update`` for each instance whose state changed.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from sandbox.events import EVENTS, MESSAGE_TYPES

__all__ = [
    "ROUTES",
    "DEFAULTS",
    "REPLY_DEFAULTS",
    "FaultError",
    "merge_patch",
    "validate",
    "public_view",
    "ROUTE_OVERRIDES",
]

ROUTES = ("chat", "split", "triage", "send", "state")

#: content faults each route understands, in draw order (after the status faults)
CONTENT_FAULTS: dict[str, tuple[str, ...]] = {
    "chat": ("error_in_200", "empty", "accept_then_hang"),
    "split": ("error_in_200", "empty", "non_json", "fenced", "prose", "too_many", "too_long", "accept_then_hang"),
    "triage": ("error_in_200", "empty", "garbage", "unknown_intent", "accept_then_hang"),
    "send": ("accept_then_hang",),
    "state": ("accept_then_hang",),
}

ROUTE_OVERRIDES = ("retry_after", "retry_after_form", "hang_seconds", "hang_mode")

DEFAULTS: dict[str, Any] = {
    **{route: {"latency_ms": 0, "always_status": None} for route in ROUTES},
    "retry_after": 1.0,
    "retry_after_form": "seconds",
    "retry_after_statuses": [429, 503],
    "hang_seconds": 5.0,
    "hang_mode": "hang",
    "error_in_200_form": "mixed",
    "unknown_instances": [],
    "disconnected_instances": [],
    "connecting_instances": [],
    "invalid_numbers": [],
    "chat_key": "sandbox-key",
    "evolution_key": "sandbox-evo-key",
    "webhook_url": None,
    "webhook_secret": None,
    "webhook_statuses": ["SERVER_ACK", "DELIVERY_ACK", "READ"],
    "webhook_gap_ms": 5,
    # Evolution switches events on per integration (WEBHOOK_EVENTS_*, RABBITMQ_EVENTS_*); the webhook
    # default leaves out send.message, which the engine's receiver has no use for
    "webhook_events": ["messages.update", "messages.upsert", "connection.update"],
    "amqp_events": ["messages.upsert", "messages.update", "connection.update", "send.message"],
    "replies": None,
    "early_tolerance_ms": 10,
    # the ledger keeps each generation request's messages (what a test or the demo shows of a
    # prompt); off by default: a fault run of thousands of messages need not hold every prompt
    "keep_prompts": False,
}

#: the "replies" object's keys and defaults (a patch may give any subset)
REPLY_DEFAULTS: dict[str, Any] = {
    "rate": 0.0,
    "after_part": 1,
    "delay_ms": 500,
    "texts": ["Oi, tenho interesse"],
    "lid_rate": 0.0,
    "instances": None,
}
MAX_DELAY_MS = 3_600_000

_SECRET_KEYS = ("chat_key", "evolution_key", "webhook_secret")
_RATE_STATUS_RE = re.compile(r"^rate_([1-5]\d\d)$")
_WEBHOOK_STATUSES = {"SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED", "ERROR"}


class FaultError(ValueError):
    """A fault patch is invalid (answered 400 by the control API)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """Fill every missing key (null-removed ones included) from DEFAULTS."""
    full = copy.deepcopy(DEFAULTS)
    for key, value in doc.items():
        if key in ROUTES and isinstance(value, dict):
            full[key] = {**full[key], **value}
        elif key == "replies" and isinstance(value, dict):
            full[key] = {**REPLY_DEFAULTS, **value}
        else:
            full[key] = value
    return full


def _number(path: str, value: Any, *, lo: float = 0.0, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultError(f"{path}: expected a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise FaultError(f"{path}: {value!r} out of range [{lo}, {hi if hi is not None else 'inf'}]")


def _latency(path: str, value: Any) -> None:
    if isinstance(value, list):
        if len(value) != 2:
            raise FaultError(f"{path}: expected [min, max]")
        _number(path, value[0])
        _number(path, value[1])
        if value[0] > value[1]:
            raise FaultError(f"{path}: min > max")
    else:
        _number(path, value)


def _status(path: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise FaultError(f"{path}: expected an HTTP status, got {value!r}")


def _overrides(path: str, doc: dict[str, Any]) -> None:
    if "retry_after" in doc:
        _number(f"{path}retry_after", doc["retry_after"])
    if "retry_after_form" in doc and doc["retry_after_form"] not in ("seconds", "http-date"):
        raise FaultError(f"{path}retry_after_form: 'seconds' or 'http-date'")
    if "hang_seconds" in doc:
        _number(f"{path}hang_seconds", doc["hang_seconds"], hi=3600)
    if "hang_mode" in doc and doc["hang_mode"] not in ("hang", "close"):
        raise FaultError(f"{path}hang_mode: 'hang' or 'close'")


def _validate_route(route: str, rdoc: Any) -> None:
    """One route's faults: latency, always_status, per-route overrides and rates adding up to <= 1."""
    if not isinstance(rdoc, dict):
        raise FaultError(f"{route}: expected an object")
    total = 0.0
    for key, value in rdoc.items():
        path = f"{route}.{key}"
        if key == "latency_ms":
            _latency(path, value)
        elif key == "always_status":
            _status(path, value)
        elif key in ROUTE_OVERRIDES:
            continue
        elif _RATE_STATUS_RE.match(key) or (key.startswith("rate_") and key[5:] in CONTENT_FAULTS[route]):
            _number(path, value, hi=1.0)
            total += value
        else:
            raise FaultError(f"{path}: unknown key for route {route!r}")
    if total > 1.0 + 1e-9:
        raise FaultError(f"{route}: rates add up to {total:.3f} > 1")
    _overrides(f"{route}.", rdoc)


def validate(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a complete fault document (defaults filled in); return it or raise FaultError naming the key."""
    known = set(DEFAULTS)
    for key in doc:
        if key not in known:
            raise FaultError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
    for route in ROUTES:
        _validate_route(route, doc[route])
    _overrides("", doc)
    if not isinstance(doc["retry_after_statuses"], list):
        raise FaultError("retry_after_statuses: expected a list")
    for status in doc["retry_after_statuses"]:
        _status("retry_after_statuses[]", status)
    if doc["error_in_200_form"] not in ("finish_reason", "choice_error", "top_level", "mixed"):
        raise FaultError("error_in_200_form: 'finish_reason', 'choice_error', 'top_level' or 'mixed'")
    for key in ("unknown_instances", "disconnected_instances", "connecting_instances", "invalid_numbers"):
        if not isinstance(doc[key], list) or not all(isinstance(v, str) for v in doc[key]):
            raise FaultError(f"{key}: expected a list of strings")
    for key in ("chat_key", "evolution_key"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise FaultError(f"{key}: expected a non-empty string")
    for key in ("webhook_url", "webhook_secret"):
        if doc[key] is not None and not isinstance(doc[key], str):
            raise FaultError(f"{key}: expected a string or null")
    if not isinstance(doc["webhook_statuses"], list) or not set(doc["webhook_statuses"]) <= _WEBHOOK_STATUSES:
        raise FaultError(f"webhook_statuses: a list of {sorted(_WEBHOOK_STATUSES)}")
    _number("webhook_gap_ms", doc["webhook_gap_ms"], hi=60000)
    for key in ("webhook_events", "amqp_events"):
        if not isinstance(doc[key], list) or not set(doc[key]) <= set(EVENTS):
            raise FaultError(f"{key}: a list of {list(EVENTS)}")
    _validate_replies(doc["replies"])
    _number("early_tolerance_ms", doc["early_tolerance_ms"], hi=60000)
    if not isinstance(doc["keep_prompts"], bool):
        raise FaultError("keep_prompts: expected true or false")
    return doc


def _validate_text_choice(path: str, item: Any) -> None:
    if isinstance(item, str):
        if not item:
            raise FaultError(f"{path}: empty text")
        return
    if not isinstance(item, dict):
        raise FaultError(f"{path}: a string or an object with text / message_type / weight")
    unknown = set(item) - {"text", "message_type", "weight"}
    if unknown:
        raise FaultError(f"{path}.{sorted(unknown)[0]}: unknown key (text, message_type, weight)")
    mtype = item.get("message_type", "conversation")
    if mtype not in MESSAGE_TYPES:
        raise FaultError(f"{path}.message_type: {mtype!r} unknown (known: {', '.join(MESSAGE_TYPES)})")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise FaultError(f"{path}.text: expected a string")
    if mtype in ("conversation", "extendedTextMessage") and not text:
        raise FaultError(f"{path}.text: required for a text message")
    _number(f"{path}.weight", item.get("weight", 1), hi=1e9)


def _validate_replies(value: Any) -> None:
    """The ``replies`` object (merged with REPLY_DEFAULTS), or null."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise FaultError("replies: expected an object or null")
    unknown = set(value) - set(REPLY_DEFAULTS)
    if unknown:
        raise FaultError(f"replies.{sorted(unknown)[0]}: unknown key (known: {', '.join(REPLY_DEFAULTS)})")
    _number("replies.rate", value["rate"], hi=1.0)
    _number("replies.lid_rate", value["lid_rate"], hi=1.0)
    after = value["after_part"]
    if isinstance(after, bool) or not isinstance(after, int) or after < 1:
        raise FaultError(f"replies.after_part: expected a whole number >= 1, got {after!r}")
    delay = value["delay_ms"]
    if isinstance(delay, list):
        if len(delay) != 2:
            raise FaultError("replies.delay_ms: expected a number or [min, max]")
        _number("replies.delay_ms[0]", delay[0], hi=MAX_DELAY_MS)
        _number("replies.delay_ms[1]", delay[1], hi=MAX_DELAY_MS)
        if delay[0] > delay[1]:
            raise FaultError("replies.delay_ms: min > max")
    else:
        _number("replies.delay_ms", delay, hi=MAX_DELAY_MS)
    texts = value["texts"]
    if not isinstance(texts, list) or not texts:
        raise FaultError("replies.texts: expected a non-empty list")
    for i, item in enumerate(texts):
        _validate_text_choice(f"replies.texts[{i}]", item)
    if sum(1 if isinstance(t, str) else t.get("weight", 1) for t in texts) <= 0:
        raise FaultError("replies.texts: the weights add up to 0")
    instances = value["instances"]
    if instances is not None and (not isinstance(instances, list) or not all(isinstance(i, str) for i in instances)):
        raise FaultError("replies.instances: expected a list of instance names or null")


def public_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the control API shows it: secrets masked."""
    view = copy.deepcopy(doc)
    for key in _SECRET_KEYS:
        if view.get(key):
            view[key] = "***"
    return view


def strip_masked(patch: dict[str, Any]) -> dict[str, Any]:
    """Drop masked secrets ("***") from a patch so a GET-modify-POST round trip keeps the real ones."""
    return {k: v for k, v in patch.items() if not (k in _SECRET_KEYS and v == "***")}
