"""Sandbox fault configuration: defaults, JSON merge patches (RFC 7386) and validation.

The whole document is replaced atomically on every change (copy on write), so request threads
read it without a lock. Shape (every key optional in a patch; ``null`` restores the default)::

    {
      "chat":  {ROUTE},   # POST .../chat/completions without response_format
      "split": {ROUTE},   # POST .../chat/completions with response_format json_object
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
      "early_tolerance_ms": 10            # slack before a retry counts as early
    }

    ROUTE = {
      "latency_ms": 0 | [min, max],       # added to every answer of the route
      "always_status": null | 401 | 402 | 500 | ...,   # every request of the route gets it until cleared
      "rate_429": 0.0, "rate_500": 0.0, "rate_502": 0.0, "rate_503": 0.0, "rate_<any status>": 0.0,
      "rate_error_in_200": 0.0, "rate_empty": 0.0,                      # chat, split
      "rate_non_json": 0.0, "rate_fenced": 0.0, "rate_prose": 0.0,
      "rate_too_many": 0.0, "rate_too_long": 0.0,                       # split
      "rate_accept_then_hang": 0.0,       # send: accepted (ledger), then hang/close without answering
      "retry_after": ..., "retry_after_form": ..., "hang_seconds": ..., "hang_mode": ...  # per-route overrides
    }

Rates are probabilities of mutually exclusive outcomes drawn once per request; their sum must be <= 1.
"""

from __future__ import annotations

import copy
import re
from typing import Any

__all__ = ["ROUTES", "DEFAULTS", "FaultError", "merge_patch", "validate", "public_view", "ROUTE_OVERRIDES"]

ROUTES = ("chat", "split", "send", "state")

#: content faults each route understands, in draw order (after the status faults)
CONTENT_FAULTS: dict[str, tuple[str, ...]] = {
    "chat": ("error_in_200", "empty", "accept_then_hang"),
    "split": ("error_in_200", "empty", "non_json", "fenced", "prose", "too_many", "too_long", "accept_then_hang"),
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
    "early_tolerance_ms": 10,
}

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
    _number("early_tolerance_ms", doc["early_tolerance_ms"], hi=60000)
    return doc


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
