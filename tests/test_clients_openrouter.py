"""OpenRouter client: classification against MockTransport and the real sandbox (SPEC R-FAIL-1/2, E-10, E-11)."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import pickle
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign import errors
from campaign.errors import (
    AuthError,
    BadCompletion,
    BadRequest,
    CreditsExhausted,
    PermanentError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientError,
)
from clients import close_clients, get_openrouter
from clients.openrouter import Completion, OpenRouterClient, parse_retry_after
from sandbox.testing import SandboxProcess

KEY = "sk-or-v1-SUPERSECRET0123456789"
BASE = "https://openrouter.test/api/v1"
MESSAGES = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "<lead>\nname: Ana\n</lead>"}]


def ok_body(content: Any = "Olá Ana!", **choice: Any) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "model": "openai/gpt-4o-mini",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}, **choice}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def client_for(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> OpenRouterClient:
    return OpenRouterClient(
        kw.pop("base_url", BASE), kw.pop("api_key", KEY), transport=httpx.MockTransport(handler), **kw
    )


def respond(status: int, body: Any = None, *, headers: dict[str, str] | None = None, text: str | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raise_(exc_type: type[httpx.RequestError]):
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return handler


def err_body(status: int, message: str = "nope") -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "metadata": None}}


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in repr(exc)


# -- the request ---------------------------------------------------------------------------------


def test_success_request_shape_and_completion() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body())

    completion = client_for(handler).chat("openai/gpt-4o-mini", MESSAGES, max_tokens=99, temperature=0.3)
    req = seen[0]
    assert req.method == "POST"
    assert str(req.url) == f"{BASE}/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(req.content)
    assert body == {"model": "openai/gpt-4o-mini", "messages": MESSAGES, "max_tokens": 99, "temperature": 0.3}
    assert isinstance(completion, Completion)
    assert completion.text == "Olá Ana!"
    assert completion.finish_reason == "stop"
    assert (completion.prompt_tokens, completion.completion_tokens, completion.total_tokens) == (11, 7, 18)
    assert completion.model == "openai/gpt-4o-mini"
    assert completion.latency_ms >= 0


def test_json_mode_sets_response_format() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=ok_body('{"messages": ["a"]}'))

    client_for(handler).chat("m", MESSAGES, json_mode=True)
    assert seen[0]["response_format"] == {"type": "json_object"}


def test_explicit_timeout_is_passed_to_the_request() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json=ok_body())

    client_for(handler).chat("m", MESSAGES)
    assert seen[0] == {"connect": 5.0, "read": 60.0, "write": 10.0, "pool": 5.0}


# -- status classification ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "exc_type", "code", "retry_after"),
    [
        (400, None, BadRequest, "bad_request", None),
        (403, None, BadRequest, "forbidden", None),
        (404, None, BadRequest, "not_found", None),
        (422, None, BadRequest, "http_422", None),
        (401, None, AuthError, "auth", None),
        (402, None, CreditsExhausted, "credits", None),
        (402, {"Retry-After": "30"}, RateLimited, "rate_limited", 30.0),
        (408, None, ProviderUnavailable, "request_timeout", None),
        (429, None, RateLimited, "rate_limited", None),
        (429, {"Retry-After": "7"}, RateLimited, "rate_limited", 7.0),
        (500, None, ProviderUnavailable, "server_error", None),
        (502, None, ProviderUnavailable, "server_error", None),
        (503, {"Retry-After": "2"}, ProviderUnavailable, "server_error", 2.0),
        (504, None, ProviderUnavailable, "server_error", None),
    ],
)
def test_status_classification(status, headers, exc_type, code, retry_after) -> None:
    client = client_for(respond(status, err_body(status, "provider says no"), headers=headers))
    with pytest.raises(exc_type) as info:
        client.chat("m", MESSAGES)
    exc = info.value
    assert exc.status_code == status
    assert exc.code == code
    assert exc.provider == "openrouter"
    assert exc.retry_after == retry_after
    assert "provider says no" in str(exc)
    assert isinstance(exc, TransientError) == (exc_type in (RateLimited, ProviderUnavailable))


def test_pause_reasons_for_auth_and_credits() -> None:
    with pytest.raises(AuthError) as a:
        client_for(respond(401, err_body(401))).chat("m", MESSAGES)
    with pytest.raises(CreditsExhausted) as c:
        client_for(respond(402, err_body(402))).chat("m", MESSAGES)
    assert a.value.pause_reason == "provider_auth"
    assert c.value.pause_reason == "provider_credits"
    assert isinstance(a.value, PermanentError) and isinstance(c.value, PermanentError)


def test_retry_after_http_date_form() -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    header = email.utils.format_datetime(when.replace(microsecond=0), usegmt=True)
    with pytest.raises(RateLimited) as info:
        client_for(respond(429, err_body(429), headers={"Retry-After": header})).chat("m", MESSAGES)
    assert info.value.retry_after is not None
    assert 27.0 <= info.value.retry_after <= 30.0


def test_provider_message_is_truncated() -> None:
    with pytest.raises(BadRequest) as info:
        client_for(respond(400, err_body(400, "x" * 5000))).chat("m", MESSAGES)
    assert 300 <= len(str(info.value)) < 400


def test_non_json_error_body_is_still_classified_by_status() -> None:
    with pytest.raises(ProviderUnavailable) as info:
        client_for(respond(502, text="<html>Bad Gateway</html>")).chat("m", MESSAGES)
    assert info.value.status_code == 502
    assert "Bad Gateway" in str(info.value)


# -- errors inside a 200 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (ok_body("partial", finish_reason="error"), "error_in_200"),
        (ok_body("", error={"code": 502, "message": "upstream died"}), "error_in_200"),
        ({"error": {"code": 502, "message": "Provider returned error"}}, "error_in_200"),
        (ok_body(""), "empty_content"),
        (ok_body("   \n\t "), "empty_content"),
        (ok_body(None), "empty_content"),
        ({"id": "x", "choices": []}, "no_choices"),
        ({"id": "x"}, "no_choices"),
    ],
)
def test_bad_completions_are_transient(body: dict[str, Any], code: str) -> None:
    with pytest.raises(BadCompletion) as info:
        client_for(respond(200, body)).chat("m", MESSAGES)
    assert info.value.code == code
    assert info.value.status_code == 200
    assert isinstance(info.value, TransientError)


def test_non_json_200_is_transient_and_says_so() -> None:
    with pytest.raises(ProviderUnavailable) as info:
        client_for(respond(200, text="<html>maintenance</html>")).chat("m", MESSAGES)
    assert info.value.code == "non_json"
    assert "non-JSON" in str(info.value)


def test_content_parts_list_is_joined() -> None:
    completion = client_for(
        respond(200, ok_body([{"type": "text", "text": "Oi "}, {"type": "text", "text": "Ana"}]))
    ).chat("m", MESSAGES)
    assert completion.text == "Oi Ana"


# -- transport errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc_type", "code"),
    [
        (httpx.ConnectError, "connect_error"),
        (httpx.ConnectTimeout, "timeout"),
        (httpx.ReadTimeout, "timeout"),
        (httpx.WriteTimeout, "timeout"),
        (httpx.PoolTimeout, "timeout"),
        (httpx.ReadError, "network_error"),
        (httpx.RemoteProtocolError, "network_error"),
    ],
)
def test_transport_errors_are_transient(exc_type: type[httpx.RequestError], code: str) -> None:
    with pytest.raises(ProviderUnavailable) as info:
        client_for(raise_(exc_type)).chat("m", MESSAGES)
    assert info.value.code == code
    assert info.value.status_code is None
    assert isinstance(info.value.__cause__, exc_type)


# -- secrets -------------------------------------------------------------------------------------


def test_secrets_never_in_error_texts() -> None:
    echo = err_body(401, f"Invalid key {KEY} for https://user:hunter2pw@openrouter.test/api/v1")
    with pytest.raises(AuthError) as info:
        client_for(respond(401, echo)).chat("m", MESSAGES)
    assert_no_secret(info.value, KEY, "hunter2pw")

    def connect_fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach http://bob:hunter2pw@proxy.test:3128 with {KEY}", request=request)

    client = client_for(connect_fail, base_url="https://bob:hunter2pw@openrouter.test/api/v1")
    with pytest.raises(ProviderUnavailable) as info2:
        client.chat("m", MESSAGES)
    assert_no_secret(info2.value, KEY, "hunter2pw")
    assert KEY not in repr(client) and "hunter2pw" not in repr(client)


def test_errors_pickle_with_their_attributes() -> None:
    exc = RateLimited("x", provider="openrouter", status_code=429, retry_after=3.0)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is RateLimited
    assert (back.provider, back.status_code, back.retry_after, back.code) == ("openrouter", 429, 3.0, "rate_limited")


def test_exception_tree_and_docstrings() -> None:
    assert issubclass(errors.ConfigError, errors.EngineError)
    assert issubclass(ProviderError, errors.EngineError)
    for cls in (RateLimited, ProviderUnavailable, BadCompletion):
        assert issubclass(cls, TransientError) and cls.retryable
    for perm in (BadRequest, AuthError, CreditsExhausted, errors.UnknownInstance, errors.InvalidNumber):
        assert issubclass(perm, PermanentError) and not perm.retryable
    assert issubclass(errors.AmbiguousSend, ProviderError)
    assert not issubclass(errors.AmbiguousSend, (TransientError, PermanentError))
    for name in errors.__all__:
        doc = getattr(errors, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name
        assert name in errors.__doc__


# -- parse_retry_after ---------------------------------------------------------------------------


NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),
        ("Sat, 01 Mar 2025 12:01:00 -0000", 60.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=NOW)
    assert result is None or result >= 0


def test_factory_caches_one_client_per_process() -> None:
    try:
        a = get_openrouter("http://127.0.0.1:9/api/v1", "k1")
        b = get_openrouter("http://127.0.0.1:9/api/v1/", "k1")
        c = get_openrouter("http://127.0.0.1:9/api/v1", "k2")
        d = get_openrouter("http://127.0.0.1:9/api/v1", "k1", timeout=3.0)
        assert a is b
        assert a is not c and a is not d
    finally:
        close_clients()


# -- against the real sandbox --------------------------------------------------------------------


# `sandbox` / `sb`: the session sandbox of tests/conftest.py (reset around each test)


@pytest.fixture()
def client(sb: SandboxProcess):
    with OpenRouterClient(sb.openrouter_url, sb.chat_key, timeout=httpx.Timeout(5.0)) as c:
        yield c


LEAD_MESSAGES = [
    {"role": "system", "content": "You write short WhatsApp messages."},
    {
        "role": "user",
        "content": "Write to this lead.\n<lead>\nname: maria souza\ncompany: Padaria Sol\ncity: Recife\n</lead>",
    },
]


def test_sandbox_chat_success(client: OpenRouterClient, sb: SandboxProcess) -> None:
    completion = client.chat("openai/gpt-4o-mini", LEAD_MESSAGES)
    assert "Maria" in completion.text
    assert completion.finish_reason == "stop"
    assert completion.total_tokens == completion.prompt_tokens + completion.completion_tokens > 0
    assert completion.model == "openai/gpt-4o-mini"
    again = client.chat("openai/gpt-4o-mini", LEAD_MESSAGES)
    assert again.text == completion.text  # deterministic
    assert sb.summary()["by_route"]["chat"] == {"200": 2}


def test_sandbox_split_json(client: OpenRouterClient) -> None:
    text = "Olá Maria! Tudo bem? Vi que você está na Padaria Sol. Posso te mandar detalhes?"
    messages = [
        {"role": "system", "content": "Split the text into at most 3 parts. Answer JSON."},
        {"role": "user", "content": f"<text>{text}</text>"},
    ]
    completion = client.chat("m", messages, json_mode=True)
    parts = json.loads(completion.text)["messages"]
    assert 1 < len(parts) <= 3
    assert " ".join(parts) == text


def test_sandbox_wrong_key(sb: SandboxProcess) -> None:
    with OpenRouterClient(sb.openrouter_url, "sk-wrong-key-123") as c, pytest.raises(AuthError) as info:
        c.chat("m", LEAD_MESSAGES)
    assert "sk-wrong-key-123" not in str(info.value)


@pytest.mark.parametrize(
    ("faults", "exc_type", "status", "code"),
    [
        ({"chat": {"always_status": 401}}, AuthError, 401, "auth"),
        ({"chat": {"always_status": 402}}, CreditsExhausted, 402, "credits"),
        ({"chat": {"always_status": 402}, "retry_after_statuses": [402, 429, 503]}, RateLimited, 402, "rate_limited"),
        ({"chat": {"always_status": 400}}, BadRequest, 400, "bad_request"),
        ({"chat": {"always_status": 403}}, BadRequest, 403, "forbidden"),
        ({"chat": {"always_status": 404}}, BadRequest, 404, "not_found"),
        ({"chat": {"rate_408": 1.0}}, ProviderUnavailable, 408, "request_timeout"),
        ({"chat": {"rate_429": 1.0}}, RateLimited, 429, "rate_limited"),
        ({"chat": {"rate_500": 1.0}}, ProviderUnavailable, 500, "server_error"),
        ({"chat": {"rate_502": 1.0}}, ProviderUnavailable, 502, "server_error"),
        ({"chat": {"rate_503": 1.0}}, ProviderUnavailable, 503, "server_error"),
        ({"chat": {"rate_empty": 1.0}}, BadCompletion, 200, "empty_content"),
        (
            {"chat": {"rate_error_in_200": 1.0}, "error_in_200_form": "finish_reason"},
            BadCompletion,
            200,
            "error_in_200",
        ),
        ({"chat": {"rate_error_in_200": 1.0}, "error_in_200_form": "choice_error"}, BadCompletion, 200, "error_in_200"),
        ({"chat": {"rate_error_in_200": 1.0}, "error_in_200_form": "top_level"}, BadCompletion, 200, "error_in_200"),
    ],
)
def test_sandbox_faults_classified(client, sb, faults, exc_type, status, code) -> None:
    sb.set_faults(faults)
    with pytest.raises(exc_type) as info:
        client.chat("m", LEAD_MESSAGES)
    assert (info.value.status_code, info.value.code) == (status, code)


def test_sandbox_retry_after_both_forms(client: OpenRouterClient, sb: SandboxProcess) -> None:
    sb.set_faults(chat={"rate_429": 1.0}, retry_after=4)
    with pytest.raises(RateLimited) as info:
        client.chat("m", LEAD_MESSAGES)
    assert info.value.retry_after == 4.0
    sb.set_faults(retry_after_form="http-date")
    with pytest.raises(RateLimited) as info:
        client.chat("m", LEAD_MESSAGES)
    assert info.value.retry_after is not None
    assert 3.0 <= info.value.retry_after <= 5.0
    sb.set_faults(chat={"rate_429": None, "rate_503": 1.0})
    with pytest.raises(ProviderUnavailable) as unavailable:
        client.chat("m", LEAD_MESSAGES)
    assert unavailable.value.retry_after is not None and unavailable.value.retry_after >= 3.0


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ("non_json", lambda t: t.startswith("Claro!") and "{" not in t),
        ("fenced", lambda t: t.startswith("```json") and t.rstrip().endswith("```")),
        ("prose", lambda t: t.startswith("Aqui está") and '{"messages"' in t),
        ("too_many", lambda t: len(json.loads(t)["messages"]) > 3),
        ("too_long", lambda t: max(len(p) for p in json.loads(t)["messages"]) >= 1200),
    ],
)
def test_sandbox_split_faults_reach_the_caller(client, sb, fault: str, check) -> None:
    sb.set_faults(split={f"rate_{fault}": 1.0})
    messages = [{"role": "user", "content": "max parts: 3\n<text>Olá Ana! Tudo bem? Temos novidades. Abraço.</text>"}]
    completion = client.chat("m", messages, json_mode=True)  # a 200 with text: parsing is the caller's job
    assert check(completion.text), completion.text
    assert sb.summary()["faults"] == {fault: 1}


def test_sandbox_read_timeout_is_transient(sb: SandboxProcess) -> None:
    sb.set_faults(chat={"latency_ms": 1500})
    with OpenRouterClient(sb.openrouter_url, sb.chat_key, timeout=httpx.Timeout(5.0, read=0.3)) as c:
        with pytest.raises(ProviderUnavailable) as info:
            c.chat("m", LEAD_MESSAGES)
    assert info.value.code == "timeout"


def test_sandbox_hang_and_drop_are_transient_for_chat(client: OpenRouterClient, sb: SandboxProcess) -> None:
    sb.set_faults(chat={"rate_accept_then_hang": 1.0, "hang_mode": "close"})
    with pytest.raises(ProviderUnavailable) as info:
        client.chat("m", LEAD_MESSAGES)
    assert info.value.code == "network_error"


def test_sandbox_unreachable_is_transient(sb: SandboxProcess) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with (
        OpenRouterClient(f"http://127.0.0.1:{port}/api/v1", sb.chat_key) as c,
        pytest.raises(ProviderUnavailable) as info,
    ):
        c.chat("m", LEAD_MESSAGES)
    assert info.value.code == "connect_error"


def _call_honouring_retry_after(
    client: OpenRouterClient, messages: list[dict[str, str]], max_attempts: int = 40
) -> tuple[Completion, int]:
    """Test-only retry loop: wait exactly what Retry-After says (the engine adds backoff on top)."""
    for attempt in range(1, max_attempts + 1):
        try:
            return client.chat("m", messages), attempt
        except TransientError as exc:
            time.sleep(exc.retry_after if exc.retry_after is not None else 0.01)
    raise AssertionError("no success")


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_e10_retry_after_honoured_then_success(client: OpenRouterClient, sb: SandboxProcess, form: str) -> None:
    retry_after = 0.2 if form == "seconds" else 1
    sb.set_faults(chat={"rate_429": 0.5}, retry_after=retry_after, retry_after_form=form)
    # draws are seeded per request: this variant gets one 429 (HTTP dates round up to whole seconds)
    messages = (
        LEAD_MESSAGES
        if form == "seconds"
        else [LEAD_MESSAGES[0], {"role": "user", "content": LEAD_MESSAGES[1]["content"] + "x"}]
    )
    completion, attempts = _call_honouring_retry_after(client, messages)
    assert completion.text
    summary = sb.summary()
    assert summary["early_retries"] == 0
    assert summary["by_route"]["chat"].get("200") == 1
    assert summary["by_route"]["chat"].get("429", 0) == attempts - 1 >= 1


def test_early_retry_is_detected(client: OpenRouterClient, sb: SandboxProcess) -> None:
    """The discipline check can fail: retrying at once after a 429 is counted."""
    sb.set_faults(chat={"rate_429": 1.0}, retry_after=5)
    for _ in range(2):
        with pytest.raises(RateLimited):
            client.chat("m", LEAD_MESSAGES)
    assert sb.summary()["early_retries"] == 1
