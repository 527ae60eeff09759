"""Evolution API client against the real sandbox over HTTP (SPEC R-FAIL-1/4, E-13, E-14); the request shape
and the classification are unit-tested against MockTransport in tests/unit/clients/test_evolution.py.

`sandbox` / `sb`: the session sandbox of tests/integration/conftest.py (reset around each test).
"""

from __future__ import annotations

import time

import httpx
import pytest

from campaign.errors import (
    AmbiguousSend,
    AuthError,
    BadRequest,
    InvalidNumber,
    ProviderUnavailable,
    RateLimited,
    TransientError,
    UnknownInstance,
)
from clients.evolution import EvolutionClient
from sandbox.testing import SandboxProcess

DIGITS = "5511987654321"  # the number every test sends to


@pytest.fixture()
def client(sb: SandboxProcess):
    with EvolutionClient(sb.evolution_url, sb.evolution_key, timeout=httpx.Timeout(5.0)) as c:
        yield c


def test_sandbox_send_and_state(client: EvolutionClient, sb: SandboxProcess) -> None:
    result = client.send_text("acme-1", "+5511987654321", "Olá Ana!")
    assert result.key_id.startswith("3EB0")
    assert result.remote_jid == f"{DIGITS}@s.whatsapp.net"
    assert result.status == "PENDING"
    assert client.connection_state("acme-1") == "open"
    ledger = sb.ledger()
    [send] = ledger["sends"]
    assert (send["instance"], send["number"], send["text"], send["key_id"]) == (
        "acme-1",
        DIGITS,
        "Olá Ana!",
        result.key_id,
    )
    assert send["seen"] is True and send["outcome"] == "ok"


def test_sandbox_wrong_apikey(sb: SandboxProcess) -> None:
    with EvolutionClient(sb.evolution_url, "wrong-evo-key") as c:
        with pytest.raises(AuthError):
            c.send_text("acme-1", DIGITS, "t")
        with pytest.raises(AuthError):
            c.connection_state("acme-1")
    assert sb.summary()["sends"] == 0


def test_sandbox_unknown_instance(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(unknown_instances=["ghost"])
    with pytest.raises(UnknownInstance):
        client.send_text("ghost", DIGITS, "t")
    with pytest.raises(UnknownInstance):
        client.connection_state("ghost")
    assert client.connection_state("acme-1") == "open"


def test_sandbox_disconnected_and_connecting_instances(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(disconnected_instances=["down-1"], connecting_instances=["boot-1"])
    assert client.connection_state("down-1") == "close"
    assert client.connection_state("boot-1") == "connecting"
    for instance in ("down-1", "boot-1"):
        with pytest.raises(ProviderUnavailable) as info:
            client.send_text(instance, DIGITS, "t")
        assert (info.value.status_code, info.value.code) == (500, "instance_disconnected")
    assert sb.summary()["sends"] == 0


def test_e13_number_not_on_whatsapp(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(invalid_numbers=[DIGITS])
    with pytest.raises(InvalidNumber) as info:
        client.send_text("acme-1", "+" + DIGITS, "t")
    assert info.value.status_code == 400
    assert client.send_text("acme-1", "+5511900000000", "t").key_id
    assert sb.summary()["sends"] == 1


@pytest.mark.parametrize(
    ("faults", "exc_type", "status", "code"),
    [
        ({"send": {"rate_429": 1.0}}, RateLimited, 429, "rate_limited"),
        ({"send": {"rate_500": 1.0}}, ProviderUnavailable, 500, "server_error"),
        ({"send": {"rate_502": 1.0}}, ProviderUnavailable, 502, "server_error"),
        ({"send": {"rate_503": 1.0}}, ProviderUnavailable, 503, "server_error"),
        ({"send": {"always_status": 401}}, AuthError, 401, "auth"),
        ({"send": {"always_status": 400}}, BadRequest, 400, "bad_request"),
        ({"send": {"always_status": 404}}, UnknownInstance, 404, "unknown_instance"),
    ],
)
def test_sandbox_status_faults(client, sb, faults, exc_type, status, code) -> None:
    sb.set_faults(faults)
    with pytest.raises(exc_type) as info:
        client.send_text("acme-1", DIGITS, "t")
    assert (info.value.status_code, info.value.code) == (status, code)
    if status in (429, 503):
        assert info.value.retry_after == 1.0  # the sandbox default
    assert sb.summary()["sends"] == 0  # nothing was accepted


def test_sandbox_state_faults(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(state={"rate_503": 1.0}, retry_after=2)
    with pytest.raises(ProviderUnavailable) as info:
        client.connection_state("acme-1")
    assert info.value.retry_after == 2.0


def test_e14_accept_then_hang_is_ambiguous(sb: SandboxProcess) -> None:
    sb.set_faults(send={"rate_accept_then_hang": 1.0, "hang_seconds": 2})
    with EvolutionClient(sb.evolution_url, sb.evolution_key, timeout=httpx.Timeout(5.0, read=0.3)) as c:
        with pytest.raises(AmbiguousSend) as info:
            c.send_text("acme-1", DIGITS, "hang")
    assert info.value.code == "read_timeout"
    [send] = sb.ledger()["sends"]
    assert (send["text"], send["seen"], send["outcome"]) == ("hang", False, "hang")


def test_accept_then_close_is_ambiguous(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(send={"rate_accept_then_hang": 1.0}, hang_mode="close")
    with pytest.raises(AmbiguousSend) as info:
        client.send_text("acme-1", DIGITS, "drop")
    assert info.value.code == "connection_dropped"
    summary = sb.summary()
    assert (summary["sends"], summary["sends_unseen"]) == (1, 1)


def test_client_timeout_during_latency_is_ambiguous_and_ledger_knows_it(sb: SandboxProcess) -> None:
    sb.set_faults(send={"latency_ms": 600})
    with EvolutionClient(sb.evolution_url, sb.evolution_key, timeout=httpx.Timeout(5.0, read=0.2)) as c:
        with pytest.raises(AmbiguousSend):
            c.send_text("acme-1", DIGITS, "slow")
    deadline = time.monotonic() + 3
    while not sb.ledger()["sends"] and time.monotonic() < deadline:
        time.sleep(0.05)
    [send] = sb.ledger()["sends"]
    assert send["seen"] is False and send["outcome"] == "client_gone"  # sent, but the client never saw it


def test_delay_is_honoured(client: EvolutionClient, sb: SandboxProcess) -> None:
    started = time.monotonic()
    client.send_text("acme-1", DIGITS, "typing...", delay_ms=300)
    assert time.monotonic() - started >= 0.3


def test_send_retry_after_honoured_then_single_delivery(client: EvolutionClient, sb: SandboxProcess) -> None:
    sb.set_faults(send={"rate_429": 0.5, "rate_503": 0.2}, retry_after=0.2)
    transient = 0
    for _ in range(40):
        try:
            result = client.send_text("acme-1", DIGITS, "Olá, retry!")
            break
        except TransientError as exc:
            transient += 1
            time.sleep(exc.retry_after if exc.retry_after is not None else 0.01)
    else:
        raise AssertionError("no success")
    summary = sb.summary()
    assert transient >= 1
    assert summary["early_retries"] == 0
    assert (summary["sends"], summary["duplicate_sends"]) == (1, 0)
    assert sb.ledger()["sends"][0]["key_id"] == result.key_id
