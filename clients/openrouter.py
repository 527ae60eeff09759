"""OpenRouter chat-completions client with error classification at the boundary (SPEC R-FAIL-1, §5).

Classification (``errors`` module):

* 2xx with a usable ``choices[0].message.content`` -> :class:`Completion`
* 2xx with ``finish_reason == "error"``, ``choices[0].error``, a top-level ``error``, no choices or
  empty/whitespace content -> :class:`errors.BadCompletion` (transient)
* 2xx whose body is not JSON -> :class:`errors.ProviderUnavailable` (transient, code ``non_json``)
* 408, 5xx, connect errors, any timeout -> :class:`errors.ProviderUnavailable` (a chat completion
  is safe to repeat: at worst it costs tokens)
* 429, or 402 carrying Retry-After -> :class:`errors.RateLimited`
* 401 -> :class:`errors.AuthError`; 402 without Retry-After -> :class:`errors.CreditsExhausted`
* 400/403/404 and any other status -> :class:`errors.BadRequest`

``Retry-After`` (delta seconds or HTTP-date) is attached as ``retry_after`` seconds on every error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from campaign.errors import (
    AuthError,
    BadCompletion,
    BadRequest,
    CreditsExhausted,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from clients.http import ProviderClient, error_message_from_body, parse_retry_after

__all__ = ["OpenRouterClient", "Completion", "DEFAULT_TIMEOUT", "parse_retry_after"]

logger = logging.getLogger(__name__)

PROVIDER = "openrouter"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=10.0, pool=5.0)


@dataclass(frozen=True, slots=True)
class Completion:
    """One successful chat completion."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model: str
    latency_ms: int
    id: str | None = None
    #: what OpenRouter charged for the call (``usage.cost``, in credits) when the answer says so
    cost: float | None = None


class OpenRouterClient(ProviderClient):
    """Thread-safe OpenRouter client; share one per process (see ``clients.get_openrouter``)."""

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
        auth = {"Authorization": f"Bearer {api_key}"}
        super().__init__(base_url, api_key, auth=auth, timeout=timeout, transport=transport, client=client)

    def chat(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.7,
        json_mode: bool = False,
        timeout: httpx.Timeout | float | None = None,
    ) -> Completion:
        """POST /chat/completions and return the completion, or raise a classified ProviderError."""
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        started = time.perf_counter()
        try:
            response = self._send("POST", "/chat/completions", json_body=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise self._error(ProviderUnavailable, f"timeout ({type(exc).__name__})", code="timeout") from exc
        except httpx.ConnectError as exc:
            raise self._error(ProviderUnavailable, f"connect error: {exc}", code="connect_error") from exc
        except httpx.UnsupportedProtocol as exc:
            raise self._error(BadRequest, f"unsupported URL: {exc}", code="bad_url") from exc
        except httpx.TransportError as exc:
            raise self._error(
                ProviderUnavailable, f"network error ({type(exc).__name__}): {exc}", code="network_error"
            ) from exc
        latency_ms = int((time.perf_counter() - started) * 1000)
        completion = self._parse(response, model, latency_ms)
        logger.debug(
            "openrouter chat model=%s status=%s tokens=%s latency_ms=%s",
            model,
            response.status_code,
            completion.total_tokens,
            latency_ms,
        )
        return completion

    # -- classification -------------------------------------------------------------------------

    def _error(
        self,
        cls: type[ProviderError],
        detail: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> ProviderError:
        return self._provider_error(
            cls, "openrouter chat/completions", detail, status_code=status_code, retry_after=retry_after, code=code
        )

    def _parse(self, response: httpx.Response, model: str, latency_ms: int) -> Completion:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raw = response.text
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
            is_json = False
        else:
            is_json = body is not None
        detail = error_message_from_body(body, raw) if not 200 <= status < 300 else ""

        if 200 <= status < 300:
            if not is_json or not isinstance(body, dict):
                raise self._error(
                    ProviderUnavailable,
                    f"non-JSON body in a {status} answer: {raw!r}",
                    status_code=status,
                    retry_after=retry_after,
                    code="non_json",
                )
            return self._completion(body, status, model, latency_ms, retry_after)
        if status == 401:
            raise self._error(AuthError, f"key refused: {detail}", status_code=status, retry_after=retry_after)
        if status == 402:
            if retry_after is not None:
                raise self._error(
                    RateLimited,
                    f"payment required, retry later: {detail}",
                    status_code=status,
                    retry_after=retry_after,
                    code="rate_limited",
                )
            raise self._error(CreditsExhausted, f"credits exhausted: {detail}", status_code=status)
        if status == 429:
            raise self._error(RateLimited, f"rate limited: {detail}", status_code=status, retry_after=retry_after)
        if status == 408:
            raise self._error(
                ProviderUnavailable,
                f"request timeout: {detail}",
                status_code=status,
                retry_after=retry_after,
                code="request_timeout",
            )
        if status >= 500:
            raise self._error(
                ProviderUnavailable,
                f"server error: {detail}",
                status_code=status,
                retry_after=retry_after,
                code="server_error",
            )
        code = {400: "bad_request", 403: "forbidden", 404: "not_found"}.get(status, f"http_{status}")
        raise self._error(BadRequest, f"rejected: {detail}", status_code=status, retry_after=retry_after, code=code)

    def _completion(
        self, body: dict[str, Any], status: int, model: str, latency_ms: int, retry_after: float | None
    ) -> Completion:
        def bad(detail: str, code: str) -> ProviderError:
            return self._error(BadCompletion, detail, status_code=status, retry_after=retry_after, code=code)

        if body.get("error"):
            raise bad(f"error inside a {status} answer: {error_message_from_body(body, '')}", "error_in_200")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad("answer without choices", "no_choices")
        choice = choices[0]
        if choice.get("error"):
            err = choice["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise bad(f"choices[0].error: {msg}", "error_in_200")
        finish_reason = choice.get("finish_reason")
        if finish_reason == "error":
            raise bad('finish_reason "error"', "error_in_200")
        message = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise bad("empty content", "empty_content")
        usage = body.get("usage") or {}
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
        total_tokens = _int(usage.get("total_tokens")) or prompt_tokens + completion_tokens
        return Completion(
            text=content,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total_tokens,
            model=str(body.get("model") or model),
            latency_ms=latency_ms,
            id=body.get("id"),
            cost=_float(usage.get("cost")),
        )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
