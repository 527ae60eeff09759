"""``ProviderClient._send``: the request it hands to the transport directly is the one ``httpx.Client.post``
built before (same method, URL, headers in the same order, body bytes, timeout extension), on a mock
transport and on the wire; it skips the Client's machinery (cookie jar) yet keeps what the Client did that
callers can see (the request on exceptions, RuntimeError once closed, the connection back in the pool)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from campaign.errors import AmbiguousSend
from clients.evolution import DEFAULT_TIMEOUT as EVO_TIMEOUT
from clients.evolution import EvolutionClient
from clients.openrouter import DEFAULT_TIMEOUT as OR_TIMEOUT
from clients.openrouter import OpenRouterClient

OR_KEY = "sk-or-v1-SECRET"
EVO_KEY = "evo-SECRET"
MESSAGES = [{"role": "system", "content": "Você é útil 🙂"}, {"role": "user", "content": 'Diga "olá"\n'}]
COMPLETION = {
    "id": "gen-1",
    "model": "m",
    "choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "Olá!"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
SENT = {"key": {"id": "3EB0ABC", "remoteJid": "5511987654321@s.whatsapp.net"}, "status": "PENDING"}
STATE = {"instance": {"instanceName": "acme", "state": "open"}}


def _answer(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    body = COMPLETION if path.endswith("/chat/completions") else STATE if "connectionState" in path else SENT
    return httpx.Response(200, json=body)


def _capture(seen: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _answer(request)

    return handler


def _old_request(
    base_url: str,
    auth: dict[str, str],
    timeout: httpx.Timeout,
    method: str,
    path: str,
    body: Any,
    call_timeout: Any = httpx.USE_CLIENT_DEFAULT,
) -> httpx.Request:
    """The request the provider clients sent before ``_send``: ``build_http_client``'s httpx.Client and
    ``client.post(absolute URL, json=body, headers=None, timeout=...)`` / ``client.get(...)``."""
    seen: list[httpx.Request] = []
    with httpx.Client(
        base_url=base_url.rstrip("/"),
        timeout=timeout,
        headers={**auth, "Accept": "application/json"},
        transport=httpx.MockTransport(_capture(seen)),
        follow_redirects=False,
        trust_env=False,
    ) as client:
        client.request(method, base_url.rstrip("/") + path, json=body, headers=None, timeout=call_timeout)
    return seen[0]


def _assert_same(new: httpx.Request, old: httpx.Request) -> None:
    assert new.method == old.method
    assert str(new.url) == str(old.url) and new.url.raw_path == old.url.raw_path
    assert new.headers.raw == old.headers.raw  # names, values and order: Host, Accept-Encoding, ..., Content-Type
    assert new.content == old.content
    assert new.extensions == old.extensions  # {"timeout": {...}} only
    assert "timeout" in new.extensions


@pytest.mark.parametrize(
    ("json_mode", "timeout"),
    [(False, None), (True, 12.5), (False, httpx.Timeout(3.0, read=90.0))],
)
def test_chat_sends_what_the_client_sent(json_mode: bool, timeout: Any) -> None:
    seen: list[httpx.Request] = []
    base = "https://openrouter.test/api/v1/"
    with OpenRouterClient(base, OR_KEY, transport=httpx.MockTransport(_capture(seen))) as c:
        c.chat("vendor/model", MESSAGES, max_tokens=64, temperature=0.25, json_mode=json_mode, timeout=timeout)
    body: dict[str, Any] = {"model": "vendor/model", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.25}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    auth = {"Authorization": f"Bearer {OR_KEY}"}
    old = _old_request(
        base,
        auth,
        OR_TIMEOUT,
        "POST",
        "/chat/completions",
        body,
        httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
    )
    _assert_same(seen[0], old)
    assert '"content":"Você é útil 🙂"}'.encode() in seen[0].content  # raw UTF-8, compact: as httpx does


@pytest.mark.parametrize("base", ["https://evo.test", "http://127.0.0.1:8080/prefix/", "https://u:p%40ss@evo.test"])
def test_send_text_and_connection_state_send_what_the_client_sent(base: str) -> None:
    seen: list[httpx.Request] = []
    with EvolutionClient(base, EVO_KEY, transport=httpx.MockTransport(_capture(seen))) as c:
        c.send_text("acme sales/1", "+55 11 98765-4321", "Olá 👋", delay_ms=1500, link_preview=False)
        c.send_text("acme", "5511987654321", "t")
        assert c.connection_state("acme sales/1") == "open"
    auth = {"apikey": EVO_KEY}
    delayed = httpx.Timeout(connect=5.0, read=31.5, write=10.0, pool=5.0)
    body = {"number": "5511987654321", "text": "Olá 👋", "delay": 1500, "linkPreview": False}
    path = "/message/sendText/acme%20sales%2F1"
    _assert_same(seen[0], _old_request(base, auth, EVO_TIMEOUT, "POST", path, body, delayed))
    assert seen[0].extensions["timeout"]["read"] == 31.5  # the read waits for Evolution's delay
    body = {"number": "5511987654321", "text": "t"}
    _assert_same(seen[1], _old_request(base, auth, EVO_TIMEOUT, "POST", "/message/sendText/acme", body))
    path = "/instance/connectionState/acme%20sales%2F1"
    _assert_same(seen[2], _old_request(base, auth, EVO_TIMEOUT, "GET", path, None))
    assert "content-length" not in seen[2].headers
    if "@" in base:  # credentials in the URL: the Client's Basic auth, so that case stays on the Client
        assert seen[0].headers["authorization"].startswith("Basic ")


def test_the_cookie_jar_is_not_consulted() -> None:
    """The direct path never goes through httpx.Client: a Set-Cookie is not kept nor sent back (the
    Client stored it in its jar and sent it on the next request). A caller's client still goes through."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=SENT, headers={"Set-Cookie": "__cf_bm=abc; Path=/; Secure; HttpOnly"})

    with EvolutionClient("https://evo.test", EVO_KEY, transport=httpx.MockTransport(handler)) as c:
        c.send_text("acme", "5511987654321", "a")
        c.send_text("acme", "5511987654321", "b")
        assert not c._client.cookies
    assert "cookie" not in seen[1].headers

    seen.clear()
    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as theirs,
        EvolutionClient("https://evo.test", EVO_KEY, client=theirs) as c,
    ):
        c.send_text("acme", "5511987654321", "a")
        c.send_text("acme", "5511987654321", "b")
        assert c._transport is None and theirs.cookies["__cf_bm"] == "abc"
    assert seen[1].headers["cookie"] == "__cf_bm=abc" and seen[1].headers["apikey"] == EVO_KEY


def test_a_transport_error_carries_its_request_as_through_the_client() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("boom")  # as HTTPTransport raises them: without the request

    with EvolutionClient("https://evo.test", EVO_KEY, transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AmbiguousSend) as info:
            c.send_text("acme", "5511987654321", "a")
    cause = info.value.__cause__
    assert isinstance(cause, httpx.ReadTimeout)
    assert cause.request.url.path == "/message/sendText/acme"


def test_a_closed_client_refuses_to_send_as_httpx_did() -> None:
    c = OpenRouterClient("https://openrouter.test/api/v1", OR_KEY, transport=httpx.MockTransport(_answer))
    assert c.chat("m", MESSAGES).text == "Olá!"
    c.close()
    with pytest.raises(RuntimeError, match="client has been closed"):
        c.chat("m", MESSAGES)


def test_the_owned_client_and_the_direct_path_share_one_pool() -> None:
    c = OpenRouterClient("https://openrouter.test/api/v1", OR_KEY)
    try:
        assert isinstance(c._transport, httpx.HTTPTransport) and c._client._transport is c._transport
    finally:
        c.close()


# -- on the wire ----------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the providers
    seen: list[tuple[int, str, list[tuple[str, str]], bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append((self.client_address[1], self.requestline, list(self.headers.items()), body))
        out = _answer(httpx.Request(self.command, f"http://x{self.path}")).content
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[tuple[int, str, list[tuple[str, str]], bytes]]]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.daemon_threads = True
    _Recorder.seen = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Recorder.seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_provider_sees_the_same_bytes_and_the_connection_is_reused(recorder: Any) -> None:
    url, seen = recorder
    with EvolutionClient(url, EVO_KEY) as direct:
        for _ in range(3):
            direct.send_text("acme", "5511987654321", "Olá")
        assert direct.connection_state("acme") == "open"
    with httpx.Client(trust_env=False) as theirs, EvolutionClient(url, EVO_KEY, client=theirs) as through_client:
        # a caller's client: what the Client path sends (the auth header per request, so Accept is */*)
        through_client.send_text("acme", "5511987654321", "Olá")
    assert len({port for port, *_ in seen[:4]}) == 1  # each response was read and its connection pooled
    with httpx.Client(
        base_url=url, headers={"apikey": EVO_KEY, "Accept": "application/json"}, trust_env=False
    ) as old:  # the owned client as build_http_client made it before
        old.post(f"{url}/message/sendText/acme", json={"number": "5511987654321", "text": "Olá"})
        old.get(f"{url}/instance/connectionState/acme")
    assert seen[0][1:] == seen[5][1:]  # request line, headers in order, body
    assert seen[3][1:] == seen[6][1:]
    assert [k for k, _ in seen[0][2]] == [
        "Host",
        "Accept-Encoding",
        "Connection",
        "User-Agent",
        "apikey",
        "Accept",
        "Content-Length",
        "Content-Type",
    ]
    assert seen[4][3] == seen[0][3]
