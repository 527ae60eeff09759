"""Evolution API client: classification against httpx.MockTransport (no services;
the real sandbox: tests/integration/clients/) (SPEC R-FAIL-1/4, E-13, E-14)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from campaign.errors import (
    AmbiguousSend,
    AuthError,
    BadRequest,
    InvalidNumber,
    PermanentError,
    ProviderUnavailable,
    RateLimited,
    TransientError,
    UnknownInstance,
)
from clients import close_clients, get_evolution
from clients.evolution import EvolutionClient, SendResult, normalize_number
from tests.unit.clients.transport import raise_, respond

KEY = "evo-SUPERSECRET-abcdef0123"
BASE = "https://evo.test"
NUMBER = "+55 (11) 98765-4321"
DIGITS = "5511987654321"


def ok_body(key_id: str | None = "3EB0ABCDEF") -> dict[str, Any]:
    key: dict[str, Any] = {"remoteJid": f"{DIGITS}@s.whatsapp.net", "fromMe": True}
    if key_id is not None:
        key["id"] = key_id
    return {"key": key, "message": {"conversation": "oi"}, "messageTimestamp": 1700000000, "status": "PENDING"}


def evo_err(status: int, messages: list[Any]) -> dict[str, Any]:
    return {"status": status, "error": "x", "response": {"message": messages}}


def client_for(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> EvolutionClient:
    return EvolutionClient(
        kw.pop("base_url", BASE), kw.pop("api_key", KEY), transport=httpx.MockTransport(handler), **kw
    )


# -- request shape -------------------------------------------------------------------------------


def test_send_text_request_shape_and_result() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=ok_body())

    result = client_for(handler).send_text("acme sales/1", NUMBER, "Olá Ana!")
    req = seen[0]
    assert req.method == "POST"
    assert req.url.raw_path == b"/message/sendText/acme%20sales%2F1"
    assert req.headers["apikey"] == KEY
    assert json.loads(req.content) == {"number": DIGITS, "text": "Olá Ana!"}
    assert isinstance(result, SendResult)
    assert (result.key_id, result.remote_jid, result.status) == ("3EB0ABCDEF", f"{DIGITS}@s.whatsapp.net", "PENDING")
    assert result.raw["messageTimestamp"] == 1700000000


def test_delay_and_link_preview_are_sent_and_extend_the_read_timeout() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body())

    client_for(handler).send_text("i", DIGITS, "t", delay_ms=2500, link_preview=False)
    assert json.loads(seen[0].content) == {"number": DIGITS, "text": "t", "delay": 2500, "linkPreview": False}
    assert seen[0].extensions["timeout"]["read"] == pytest.approx(30.0 + 2.5)


@pytest.mark.parametrize(
    ("raw", "digits"),
    [("+5511987654321", DIGITS), ("55 11 98765-4321", DIGITS), ("(55) 11.98765.4321", DIGITS), (DIGITS, DIGITS)],
)
def test_normalize_number(raw: str, digits: str) -> None:
    assert normalize_number(raw) == digits


@pytest.mark.parametrize("raw", ["", "+", "abc", "+55 11 9876x4321", "1234567", "1" * 16, "٥٥١١٩٨٧٦٥٤٣٢١"])
def test_invalid_numbers_never_reach_the_network(raw: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(201, json=ok_body())

    with pytest.raises(InvalidNumber) as info:
        client_for(handler).send_text("i", raw, "t")
    assert calls == []
    assert info.value.status_code is None


# -- success without key.id: it may have been sent -------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        respond(201, ok_body(key_id=None)),
        respond(200, {"status": "PENDING"}),
        respond(201, text="OK"),
        respond(201, [1]),
    ],
)
def test_success_without_key_id_is_ambiguous(handler) -> None:
    with pytest.raises(AmbiguousSend) as info:
        client_for(handler).send_text("i", DIGITS, "t")
    assert info.value.code == "missing_key_id"
    assert not isinstance(info.value, (TransientError, PermanentError))


# -- status classification ------------------------------------------------------------------------


EXISTS_FALSE = {
    "status": 400,
    "error": "Bad Request",
    "response": {"message": [{"exists": False, "jid": f"{DIGITS}@s.whatsapp.net", "number": DIGITS}]},
}


@pytest.mark.parametrize(
    ("status", "body", "headers", "exc_type", "code", "retry_after"),
    [
        (400, EXISTS_FALSE, None, InvalidNumber, "invalid_number", None),
        (400, evo_err(400, [['instance requires property "text"']]), None, BadRequest, "bad_request", None),
        (400, evo_err(400, [{"exists": True, "number": DIGITS}]), None, BadRequest, "bad_request", None),
        (401, evo_err(401, ["Unauthorized"]), None, AuthError, "auth", None),
        (403, evo_err(403, ["Forbidden"]), None, BadRequest, "forbidden", None),
        (404, evo_err(404, ['The "i" instance does not exist']), None, UnknownInstance, "unknown_instance", None),
        (408, evo_err(408, ["timeout"]), None, ProviderUnavailable, "request_timeout", None),
        (429, evo_err(429, ["slow down"]), {"Retry-After": "3"}, RateLimited, "rate_limited", 3.0),
        (
            429,
            evo_err(429, ["slow down"]),
            {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
            RateLimited,
            "rate_limited",
            0.0,
        ),
        (500, evo_err(500, ["boom"]), None, ProviderUnavailable, "server_error", None),
        (500, evo_err(500, ["Error: Connection Closed"]), None, ProviderUnavailable, "instance_disconnected", None),
        (503, evo_err(503, ["down"]), {"Retry-After": "9"}, ProviderUnavailable, "server_error", 9.0),
    ],
)
def test_send_status_classification(status, body, headers, exc_type, code, retry_after) -> None:
    with pytest.raises(exc_type) as info:
        client_for(respond(status, body, headers=headers)).send_text("i", DIGITS, "t")
    exc = info.value
    assert (exc.status_code, exc.code, exc.provider, exc.retry_after) == (status, code, "evolution", retry_after)
    assert isinstance(exc, TransientError) == (exc_type in (RateLimited, ProviderUnavailable))


def test_auth_error_pauses_the_inbox() -> None:
    with pytest.raises(AuthError) as info:
        client_for(respond(401, evo_err(401, ["Unauthorized"]))).send_text("i", DIGITS, "t")
    assert info.value.pause_reason == "provider_auth"


def test_html_502_is_transient() -> None:
    with pytest.raises(ProviderUnavailable) as info:
        client_for(respond(502, text="<html>502 Bad Gateway</html>")).send_text("i", DIGITS, "t")
    assert info.value.status_code == 502


# -- transport errors: not sent vs maybe sent --------------------------------------------------


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_request_never_sent_is_transient(exc_type: type[httpx.RequestError]) -> None:
    with pytest.raises(ProviderUnavailable) as info:
        client_for(raise_(exc_type)).send_text("i", DIGITS, "t")
    assert info.value.code == "connect_error"
    assert isinstance(info.value.__cause__, exc_type)


@pytest.mark.parametrize(
    ("exc_type", "code"),
    [
        (httpx.ReadTimeout, "read_timeout"),
        (httpx.WriteTimeout, "read_timeout"),
        (httpx.ReadError, "connection_dropped"),
        (httpx.WriteError, "connection_dropped"),
        (httpx.RemoteProtocolError, "connection_dropped"),
    ],
)
def test_request_maybe_accepted_is_ambiguous(exc_type: type[httpx.RequestError], code: str) -> None:
    with pytest.raises(AmbiguousSend) as info:
        client_for(raise_(exc_type)).send_text("i", DIGITS, "t")
    assert info.value.code == code
    assert not info.value.retryable


# -- connectionState ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["open", "close", "connecting"])
def test_connection_state(state: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"instance": {"instanceName": "acme-1", "state": state}})

    assert client_for(handler).connection_state("acme-1") == state
    assert seen[0].method == "GET"
    assert seen[0].url.path == "/instance/connectionState/acme-1"
    assert seen[0].headers["apikey"] == KEY


@pytest.mark.parametrize(
    ("handler", "exc_type", "code"),
    [
        (respond(200, {"instance": {}}), ProviderUnavailable, "bad_body"),
        (respond(200, text="nope"), ProviderUnavailable, "bad_body"),
        (respond(401, evo_err(401, ["Unauthorized"])), AuthError, "auth"),
        (respond(404, evo_err(404, ["no such instance"])), UnknownInstance, "unknown_instance"),
        (respond(500, evo_err(500, ["boom"])), ProviderUnavailable, "server_error"),
        (raise_(httpx.ReadTimeout), ProviderUnavailable, "timeout"),  # a read: never ambiguous
        (raise_(httpx.RemoteProtocolError), ProviderUnavailable, "network_error"),
        (raise_(httpx.ConnectError), ProviderUnavailable, "connect_error"),
    ],
)
def test_connection_state_errors(handler, exc_type, code) -> None:
    with pytest.raises(exc_type) as info:
        client_for(handler).connection_state("i")
    assert info.value.code == code


# -- secrets -------------------------------------------------------------------------------------


def test_secrets_never_in_error_texts() -> None:
    with pytest.raises(AuthError) as info:
        client_for(respond(401, evo_err(401, [f"apikey {KEY} is not valid"]))).send_text("i", DIGITS, "t")
    assert KEY not in str(info.value) and KEY not in repr(info.value)

    def dropped(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError(f"lost http://admin:pa55w0rd@evo.test/ key={KEY}", request=request)

    client = client_for(dropped, base_url="http://admin:pa55w0rd@evo.test")
    with pytest.raises(AmbiguousSend) as info2:
        client.send_text("i", DIGITS, "t")
    for text in (str(info2.value), repr(info2.value), repr(client)):
        assert KEY not in text and "pa55w0rd" not in text


def test_factory_caches_and_resets() -> None:
    try:
        a = get_evolution("http://127.0.0.1:9", "k")
        assert get_evolution("http://127.0.0.1:9/", "k") is a
        assert get_evolution("http://127.0.0.1:9", "other") is not a
        close_clients()
        assert get_evolution("http://127.0.0.1:9", "k") is not a
    finally:
        close_clients()


def test_connect_error_is_not_ambiguous() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with EvolutionClient(f"http://127.0.0.1:{port}", KEY) as c, pytest.raises(ProviderUnavailable) as info:
        c.send_text("acme-1", DIGITS, "t")
    assert info.value.code == "connect_error"


def test_factory_forgets_clients_in_a_forked_child() -> None:
    import os

    import clients

    try:
        parent = get_evolution("http://127.0.0.1:9", "k")
        pid = os.fork()
        if pid == 0:  # child: must build its own client, never reuse the parent's sockets
            ok = get_evolution("http://127.0.0.1:9", "k") is not parent and len(clients._cache) == 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert get_evolution("http://127.0.0.1:9", "k") is parent
    finally:
        close_clients()
