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
    "build_http_transport",
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


def build_http_transport(limits: httpx.Limits = DEFAULT_LIMITS) -> httpx.HTTPTransport:
    """The connection pool of a provider client: what httpx.Client builds itself from the same arguments
    (shared TLS context, wide pool, no proxy from the environment)."""
    return httpx.HTTPTransport(verify=shared_ssl_context(), limits=limits, trust_env=False)


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
        transport=build_http_transport(limits) if transport is None else transport,
        follow_redirects=False,
        trust_env=False,
    )


#: how httpx encodes ``json=`` (httpx/_content.py ``encode_json``, httpx 0.28): same bytes on the wire
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_JSON_CONTENT_TYPE = (b"Content-Type", b"application/json")


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
        # a caller-supplied client still needs our auth header on each request
        self._headers: dict[str, str] | None = dict(auth) if client is not None else None
        # what ``_send`` needs to bypass httpx.Client: the pool (None: go through the Client), the headers
        # the Client sends (Host, its defaults Accept-Encoding/Connection/User-Agent, then ours, in its
        # order) and the parsed URL of each path
        self._transport: httpx.BaseTransport | None = None
        self._request_headers: list[tuple[bytes, bytes]] = []
        self._urls: dict[str, httpx.URL] = {}
        if client is None:
            transport = build_http_transport() if transport is None else transport
            client = build_http_client(
                self.base_url, timeout=timeout, headers={**auth, "Accept": "application/json"}, transport=transport
            )
            url = httpx.URL(self.base_url)
            # not for a relative base URL (the Client merges it with its base_url) or credentials in the
            # URL (the Client turns them into Basic auth): rare set-ups, left to httpx.Client
            if url.is_absolute_url and not (url.username or url.password):
                self._transport = transport
                self._request_headers = [(b"Host", url.netloc), *client.headers.raw]
        self._client = client

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={redact(self.base_url, self._api_key)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying httpx client (and so its transport) if this object created it."""
        if self._owns_client:
            self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Response:
        """``method`` ``base_url + path``, with ``json_body`` as JSON if not None, and return the response,
        read. ``timeout`` None: this client's. Raises what ``httpx.Client.request`` raises.

        Not through ``httpx.Client`` when this object built it: the Client's per-request machinery, which
        the providers never use (URL/header/cookie merging, the cookie jar parsing every response, auth,
        redirect and event-hook layers), was two thirds of a call's CPU (96 -> 32 us per chat call over an
        in-process transport), and httpx a third of a worker's CPU (py-spy, issue 20). The request built
        here is the one the Client built (same method, URL, headers in the same order, body bytes and
        timeout extension; tests/unit/clients/test_direct_send.py) and goes to the Client's own pool
        through ``BaseTransport.handle_request``, httpx's public transport API. Skipped, and unused by the
        providers' code: the cookie jar (nothing kept or sent back), ``response.elapsed``, the 3xx
        ``next_request`` and httpx's INFO line per request (``campaign.logs`` sets httpx to WARNING)."""
        if self._transport is None:
            return self._client.request(
                method,
                self.base_url + path,
                json=json_body,
                headers=self._headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        if self._client.is_closed:  # as httpx.Client.send: its transport is closed too
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        headers = self._request_headers
        content = b""
        if json_body is not None:
            content = _JSON.encode(json_body).encode("utf-8")
            headers = [*headers, (b"Content-Length", str(len(content)).encode("ascii")), _JSON_CONTENT_TYPE]
        url = self._urls.get(path)
        if url is None:  # parsing the URL was a quarter of what is left; paths repeat (one per instance)
            if len(self._urls) >= 1024:
                self._urls.clear()
            url = self._urls[path] = httpx.URL(self.base_url + path)
        request = httpx.Request(  # stream=: the headers are complete, Host and Content-Length included
            method,
            url,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"timeout": (self._timeout if timeout is None else httpx.Timeout(timeout)).as_dict()},
        )
        try:
            response = self._transport.handle_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # as httpx.Client does (httpx._exceptions.request_context)
            raise
        response.request = request
        try:
            response.read()  # closes the stream: the connection goes back to the pool
        except BaseException:
            response.close()
            raise
        return response

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
