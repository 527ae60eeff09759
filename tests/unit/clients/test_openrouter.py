"""OpenRouter client: classification against httpx.MockTransport (no services;
the real sandbox: tests/integration/clients/) (SPEC R-FAIL-1/2, E-10, E-11)."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign.errors import (
    AuthError,
    BadCompletion,
    BadRequest,
    CreditsExhausted,
    PermanentError,
    ProviderUnavailable,
    RateLimited,
    TransientError,
)
from clients import close_clients, get_openrouter
from clients.openrouter import Completion, OpenRouterClient, parse_retry_after
from tests.unit.clients.transport import raise_, respond

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
