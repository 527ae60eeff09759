"""OpenRouter client against the real sandbox over HTTP (SPEC R-FAIL-1/2, E-10, E-11); the request shape
and the classification are unit-tested against MockTransport in tests/unit/clients/test_openrouter.py.

`sandbox` / `sb`: the session sandbox of tests/integration/conftest.py (reset around each test).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from campaign.errors import (
    AuthError,
    BadCompletion,
    BadRequest,
    CreditsExhausted,
    ProviderUnavailable,
    RateLimited,
    TransientError,
)
from clients.openrouter import Completion, OpenRouterClient
from sandbox.testing import SandboxProcess


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
