"""Evolution API v2 client (sendText, connectionState) with error classification (SPEC R-FAIL-1/4, §5).

Numbers are sent to Evolution as digits only, without the leading "+" ("+55 11 99999-0000" ->
"5511999990000"); :func:`normalize_number` does it and refuses anything that is not 8-15 digits
(:class:`errors.InvalidNumber`, raised before any HTTP call).

Classification of ``sendText``:

* 200/201 with ``key.id`` -> :class:`SendResult`; a 2xx without ``key.id`` (or not JSON) ->
  :class:`errors.AmbiguousSend` (the message may have gone out)
* 400 with ``response.message[*].exists == false`` -> :class:`errors.InvalidNumber`; other 400 ->
  :class:`errors.BadRequest`
* 401 -> :class:`errors.AuthError`; 404 -> :class:`errors.UnknownInstance`; 429 -> :class:`errors.RateLimited`
* 408, 5xx -> :class:`errors.ProviderUnavailable`. Evolution answers a send on a disconnected instance with
  ``500 {"response":{"message":["Error: Connection Closed"]}}``: that one gets code ``instance_disconnected``
* the request never left (ConnectError, ConnectTimeout, PoolTimeout) -> :class:`errors.ProviderUnavailable`
* the request may have been accepted (ReadTimeout, ReadError, RemoteProtocolError, WriteError,
  WriteTimeout, any other transport error) -> :class:`errors.AmbiguousSend`: never retried automatically

``connectionState`` is a read, so every transport error there is :class:`errors.ProviderUnavailable`.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx

from campaign.errors import (
    AmbiguousSend,
    AuthError,
    BadRequest,
    InvalidNumber,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    UnknownInstance,
)
from clients.http import ProviderClient, error_message_from_body, parse_retry_after, truncate

__all__ = ["EvolutionClient", "SendResult", "DEFAULT_TIMEOUT", "normalize_number", "parse_retry_after"]

logger = logging.getLogger(__name__)

PROVIDER = "evolution"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=5.0)

#: transport errors raised before the request could reach the server: safe to retry
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


@dataclass(frozen=True, slots=True)
class SendResult:
    """An accepted sendText."""

    key_id: str
    remote_jid: str | None
    status: str | None
    raw: dict[str, Any] = field(repr=False)
    latency_ms: int = 0


def normalize_number(number: str) -> str:
    """Digits-only number as Evolution expects it (no "+", spaces, dashes or parentheses)."""
    digits = str(number).strip()
    if digits.startswith("+"):
        digits = digits[1:]
    for ch in " -().\t":
        digits = digits.replace(ch, "")
    if not (digits.isascii() and digits.isdigit() and 8 <= len(digits) <= 15):
        raise InvalidNumber(
            f"evolution: not a phone number: {truncate(str(number), 40)!r}",
            provider=PROVIDER,
            code="invalid_number",
        )
    return digits


class EvolutionClient(ProviderClient):
    """Thread-safe Evolution API client; share one per process (see ``clients.get_evolution``)."""

    PROVIDER = PROVIDER

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, auth={"apikey": api_key}, timeout=timeout, transport=transport, client=client
        )

    # -- calls ----------------------------------------------------------------------------------

    def send_text(
        self,
        instance: str,
        number: str,
        text: str,
        *,
        delay_ms: int | None = None,
        link_preview: bool | None = None,
    ) -> SendResult:
        """POST /message/sendText/{instance}; return the accepted message's key or raise a ProviderError."""
        digits = normalize_number(number)
        body: dict[str, Any] = {"number": digits, "text": text}
        timeout: httpx.Timeout | None = None  # None: the client's
        if delay_ms:
            body["delay"] = int(delay_ms)
            # Evolution blocks for `delay` before answering: give the read that much more time
            base = self._timeout
            timeout = httpx.Timeout(
                connect=base.connect,
                write=base.write,
                pool=base.pool,
                read=None if base.read is None else base.read + delay_ms / 1000.0,
            )
        if link_preview is not None:
            body["linkPreview"] = bool(link_preview)
        path = f"/message/sendText/{urllib.parse.quote(instance, safe='')}"
        started = time.perf_counter()
        try:
            response = self._send("POST", path, json_body=body, timeout=timeout)
        except _NOT_SENT as exc:
            raise self._error(
                ProviderUnavailable, path, f"request not sent ({type(exc).__name__}): {exc}", code="connect_error"
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise self._error(BadRequest, path, f"unsupported URL: {exc}", code="bad_url") from exc
        except httpx.LocalProtocolError as exc:
            raise self._error(
                BadRequest, path, f"invalid request ({type(exc).__name__}): {exc}", code="local_protocol_error"
            ) from exc
        except httpx.TransportError as exc:
            # ReadTimeout, ReadError, RemoteProtocolError, WriteError, WriteTimeout...: the request was
            # (perhaps partly) written, so Evolution may have accepted it (SPEC R-FAIL-4)
            code = "read_timeout" if isinstance(exc, httpx.TimeoutException) else "connection_dropped"
            raise self._error(AmbiguousSend, path, f"outcome unknown ({type(exc).__name__}): {exc}", code=code) from exc
        latency_ms = int((time.perf_counter() - started) * 1000)
        status = response.status_code
        body_json, raw = _json(response)
        if 200 <= status < 300:
            found = body_json.get("key") if isinstance(body_json, dict) else None
            key: dict[str, Any] = found if isinstance(found, dict) else {}
            key_id = key.get("id")
            if not key_id:
                raise self._error(
                    AmbiguousSend,
                    path,
                    f"{status} answer without key.id: {raw!r}",
                    status_code=status,
                    code="missing_key_id",
                )
            logger.debug(
                "evolution sendText instance=%s status=%s key_id=%s latency_ms=%s", instance, status, key_id, latency_ms
            )
            return SendResult(
                key_id=str(key_id),
                remote_jid=key.get("remoteJid"),
                status=body_json.get("status"),
                raw=body_json,
                latency_ms=latency_ms,
            )
        raise self._classify(response, path, body_json, raw, send=True)

    def connection_state(self, instance: str) -> str:
        """GET /instance/connectionState/{instance} -> "open" | "close" | "connecting" (or another state)."""
        path = f"/instance/connectionState/{urllib.parse.quote(instance, safe='')}"
        try:
            response = self._send("GET", path)
        except httpx.TimeoutException as exc:
            raise self._error(ProviderUnavailable, path, f"timeout ({type(exc).__name__})", code="timeout") from exc
        except httpx.UnsupportedProtocol as exc:
            raise self._error(BadRequest, path, f"unsupported URL: {exc}", code="bad_url") from exc
        except httpx.TransportError as exc:
            raise self._error(
                ProviderUnavailable,
                path,
                f"network error ({type(exc).__name__}): {exc}",
                code="connect_error" if isinstance(exc, _NOT_SENT) else "network_error",
            ) from exc
        status = response.status_code
        body_json, raw = _json(response)
        if 200 <= status < 300:
            state = None
            if isinstance(body_json, dict):
                inner = body_json.get("instance")
                state = inner.get("state") if isinstance(inner, dict) else body_json.get("state")
            if not isinstance(state, str) or not state:
                raise self._error(
                    ProviderUnavailable,
                    path,
                    f"{status} answer without instance.state: {raw!r}",
                    status_code=status,
                    code="bad_body",
                )
            return state
        raise self._classify(response, path, body_json, raw, send=False)

    # -- classification -------------------------------------------------------------------------

    def _error(
        self,
        cls: type[ProviderError],
        path: str,
        detail: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> ProviderError:
        return self._provider_error(
            cls, f"evolution {path}", detail, status_code=status_code, retry_after=retry_after, code=code
        )

    def _classify(self, response: httpx.Response, path: str, body: Any, raw: str, *, send: bool) -> ProviderError:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        detail = error_message_from_body(body, raw)
        kw: dict[str, Any] = {"status_code": status, "retry_after": retry_after}
        if status == 400:
            if send and _not_on_whatsapp(body):
                return self._error(InvalidNumber, path, f"number not on WhatsApp: {detail}", **kw)
            if _disconnected(detail):
                return self._error(
                    ProviderUnavailable, path, f"instance not connected: {detail}", code="instance_disconnected", **kw
                )
            return self._error(BadRequest, path, f"rejected: {detail}", **kw)
        if status == 401:
            return self._error(AuthError, path, f"apikey refused: {detail}", **kw)
        if status == 404:
            return self._error(UnknownInstance, path, f"unknown instance: {detail}", **kw)
        if status == 429:
            return self._error(RateLimited, path, f"rate limited: {detail}", **kw)
        if status == 408:
            return self._error(ProviderUnavailable, path, f"request timeout: {detail}", code="request_timeout", **kw)
        if status >= 500:
            code = "instance_disconnected" if _disconnected(detail) else "server_error"
            return self._error(ProviderUnavailable, path, f"server error: {detail}", code=code, **kw)
        code = {403: "forbidden"}.get(status, f"http_{status}")
        return self._error(BadRequest, path, f"rejected: {detail}", code=code, **kw)


def _json(response: httpx.Response) -> tuple[Any, str]:
    raw = response.text
    try:
        return (json.loads(raw) if raw else None), raw
    except ValueError:
        return None, raw


def _not_on_whatsapp(body: Any) -> bool:
    """True for Evolution's ``response.message[*].exists == false`` answer."""
    if not isinstance(body, dict):
        return False
    response = body.get("response")
    messages = response.get("message") if isinstance(response, dict) else None
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and m.get("exists") is False for m in messages)


def _disconnected(detail: str) -> bool:
    lowered = detail.lower()
    return "connection closed" in lowered or "not connected" in lowered
