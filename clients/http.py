"""Shared bits of the provider clients: httpx client construction, Retry-After parsing, redaction."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import os
import re
import ssl
import threading
from typing import Any, Self

import httpx

from campaign.errors import ProviderError

__all__ = [
    "DEFAULT_LIMITS",
    "build_http_client",
    "shared_ssl_context",
    "parse_retry_after",
    "redact",
    "truncate",
    "error_message_from_body",
    "MESSAGE_LIMIT",
]

#: how much of a provider's own error message is kept in exception texts
MESSAGE_LIMIT = 300

#: One client per process is shared by every worker thread, so the pool must be wide enough for all of
#: them; keep-alive expiry stays below Node's 5 s default keepAliveTimeout (Evolution API is Node): a
#: connection the server already closed, reused by us, would turn a send into an AmbiguousSend.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=4.0)

_USERINFO_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def shared_ssl_context() -> ssl.SSLContext:
    """The process's one verifying TLS context (certifi's CA bundle), shared by every client.

    httpx builds a context per client by default, and loading the CA bundle costs about 0.9 MiB of C
    heap each: with one client per worker thread (see ``clients.get_openrouter``) that would be
    ~30 MiB per worker process. An SSLContext is safe to share between threads and clients.
    """
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def _renew_ssl_lock_after_fork() -> None:
    global _ssl_lock
    _ssl_lock = threading.Lock()  # another thread may have held it at fork time; the context stays valid


os.register_at_fork(after_in_child=_renew_ssl_lock_after_fork)


def build_http_client(
    base_url: str,
    *,
    timeout: httpx.Timeout,
    headers: dict[str, str],
    transport: httpx.BaseTransport | None = None,
    limits: httpx.Limits = DEFAULT_LIMITS,
) -> httpx.Client:
    """Build the httpx.Client a provider client uses (explicit timeout, wide pool, no redirects)."""
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        timeout=timeout,
        headers=headers,
        transport=transport,
        verify=shared_ssl_context(),
        limits=limits,
        follow_redirects=False,
        trust_env=False,
    )


class ProviderClient:
    """What both provider clients share (issue 13: one base): one keep-alive httpx client (or the
    caller's, which then gets the auth header on each request), the API key never in a repr, and
    close() / ``with``, and one shape of error message. Thread-safe; share one per process
    (``clients.get_openrouter`` / ``get_evolution``)."""

    #: the provider's name in errors and metrics (``openrouter``, ``evolution``)
    PROVIDER: str = ""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        auth: dict[str, str],
        timeout: httpx.Timeout,
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._owns_client = client is None
        self._client = client or build_http_client(
            self.base_url, timeout=timeout, headers={**auth, "Accept": "application/json"}, transport=transport
        )
        # a caller-supplied client still needs our auth header on each request
        self._headers: dict[str, str] | None = dict(auth) if client is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={redact(self.base_url, self._api_key)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying httpx client if this object created it."""
        if self._owns_client:
            self._client.close()

    def _provider_error(
        self,
        cls: type[ProviderError],
        where: str,
        detail: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> ProviderError:
        """The error ``cls`` of a call to ``where`` (e.g. "evolution /message/sendText/x"): its HTTP
        status, and the detail truncated with the API key masked."""
        status = f"HTTP {status_code}" if status_code is not None else "no response"
        message = f"{where}: {status}: {truncate(redact(detail, self._api_key))}"
        return cls(message, provider=self.PROVIDER, status_code=status_code, retry_after=retry_after, code=code)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Parse a Retry-After header (delta seconds or HTTP-date) into seconds >= 0; None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)  # RFC 9110 says an integer; be lenient with fractions
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" dates come back naive: they are UTC
        when = when.replace(tzinfo=dt.UTC)
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def redact(text: str, *secrets: str | None) -> str:
    """Remove the given secrets and any URL password from a text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Cut a text to ``limit`` characters, marking the cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message_from_body(body: Any, raw: str) -> str:
    """Best human-readable message in a provider error body (OpenRouter or Evolution shape)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        response = body.get("response")
        if isinstance(response, dict) and "message" in response:
            msg = response["message"]
            if isinstance(msg, list):
                return "; ".join(m if isinstance(m, str) else json.dumps(m, ensure_ascii=False) for m in msg)
            return str(msg)
        if body.get("message"):
            return str(body["message"])
        if isinstance(err, str):
            return err
    return raw
