"""The sandbox provider: ledger, reset, runtime faults, webhooks, determinism, concurrency, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sandbox import llm
from sandbox.config import DEFAULTS, FaultError, merge_patch, validate, with_defaults
from sandbox.testing import SandboxProcess, SandboxStartError
from tests.integration.sandbox.receiver import Receiver

CHAT_PATH = "/api/v1/chat/completions"


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(seed=3) as sb:
        yield sb


@pytest.fixture()
def sb(sandbox: SandboxProcess) -> SandboxProcess:
    sandbox.reset()
    return sandbox


@pytest.fixture()
def http(sb: SandboxProcess):
    with httpx.Client(base_url=sb.url, timeout=10.0, trust_env=False) as c:
        yield c


def send(
    http: httpx.Client, sb: SandboxProcess, text: str, *, instance: str = "acme-1", number: str = "5511987654321"
) -> httpx.Response:
    return http.post(
        f"/message/sendText/{instance}", json={"number": number, "text": text}, headers={"apikey": sb.evolution_key}
    )


def chat(http: httpx.Client, sb: SandboxProcess, user: str, *, json_mode: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": user}]}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    return http.post(CHAT_PATH, json=body, headers={"Authorization": f"Bearer {sb.chat_key}"})


# -- ledger --------------------------------------------------------------------------------------


def test_ledger_records_requests_sends_and_duplicates(sb: SandboxProcess, http: httpx.Client) -> None:
    for text in ("a", "b", "a"):
        assert send(http, sb, text).status_code == 201
    assert http.get("/instance/connectionState/acme-1", headers={"apikey": sb.evolution_key}).json() == {
        "instance": {"instanceName": "acme-1", "state": "open"}
    }
    assert chat(http, sb, "<lead>\nname: Ana\n</lead>").status_code == 200
    assert send(http, sb, "x", instance="acme-1").status_code == 201
    ledger = sb.ledger()
    summary = ledger["summary"]
    assert summary["sends"] == 4
    assert summary["distinct_sends"] == 3
    assert summary["duplicate_sends"] == 1
    assert summary["duplicates"] == [{"instance": "acme-1", "number": "5511987654321", "text": "a", "count": 2}]
    assert summary["by_route"] == {"send": {"201": 4}, "state": {"200": 1}, "chat": {"200": 1}}
    assert [s["text"] for s in ledger["sends"]] == ["a", "b", "a", "x"]
    assert len({s["key_id"] for s in ledger["sends"]}) == 4  # ids unique even for identical sends
    assert [r["route"] for r in ledger["requests"]] == ["send", "send", "send", "state", "chat", "send"]
    seqs = [e["seq"] for e in ledger["requests"] + ledger["sends"]]
    assert len(set(seqs)) == len(seqs)


def test_ledger_paging_since_and_limit(sb: SandboxProcess, http: httpx.Client) -> None:
    for i in range(60):
        send(http, sb, f"m{i}")
    first = sb.ledger(limit=25)
    assert len(first["sends"]) == 25 and len(first["requests"]) == 25
    last_seq = max(e["seq"] for e in first["sends"] + first["requests"])
    rest = sb.ledger(since=last_seq)
    assert all(e["seq"] > last_seq for e in rest["sends"] + rest["requests"])
    texts = [s["text"] for s in sb.ledger()["sends"]]
    assert texts == [f"m{i}" for i in range(60)]
    only_summary = sb.ledger(entries=False)
    assert set(only_summary) == {"summary"} and only_summary["summary"]["sends"] == 60
    tail = sb.ledger(since=only_summary["summary"]["seq"])
    assert tail["sends"] == [] and tail["requests"] == []


def test_reset_clears_ledger_and_restores_startup_faults(sb: SandboxProcess, http: httpx.Client) -> None:
    send(http, sb, "before")
    sb.set_faults(send={"rate_500": 1.0})
    assert send(http, sb, "fails").status_code == 500
    sb.reset(keep_faults=True)
    assert sb.summary()["requests"] == 0
    assert send(http, sb, "still fails").status_code == 500
    sb.reset()
    assert sb.faults()["send"] == {"latency_ms": 0, "always_status": None}
    assert send(http, sb, "works").status_code == 201
    assert sb.summary()["sends"] == 1


# -- runtime faults ------------------------------------------------------------------------------


def test_faults_merge_patch_at_runtime(sb: SandboxProcess, http: httpx.Client) -> None:
    full = sb.set_faults(send={"rate_429": 0.25, "latency_ms": [1, 2]}, invalid_numbers=["5511000000000"])
    assert full["send"]["rate_429"] == 0.25 and full["invalid_numbers"] == ["5511000000000"]
    full = sb.set_faults(send={"rate_500": 0.5})  # merges into the route
    assert full["send"]["rate_429"] == 0.25 and full["send"]["rate_500"] == 0.5
    full = sb.set_faults(send={"rate_429": None})  # null restores the default
    assert "rate_429" not in full["send"]
    assert sb.faults() == full
    assert full["chat_key"] == "***" and full["evolution_key"] == "***"  # secrets masked
    full = sb.set_faults({"state": {"always_status": 503}}, replace=True)
    assert full["send"] == DEFAULTS["send"] and full["state"]["always_status"] == 503
    assert http.get("/instance/connectionState/x", headers={"apikey": sb.evolution_key}).status_code == 503
    sb.set_faults(state={"always_status": None})  # cleared
    assert http.get("/instance/connectionState/x", headers={"apikey": sb.evolution_key}).status_code == 200


@pytest.mark.parametrize(
    "patch",
    [
        {"send": {"rate_429": 1.5}},
        {"send": {"rate_429": 0.7, "rate_500": 0.7}},
        {"send": {"rate_non_json": 0.1}},  # a split fault on the send route
        {"sned": {}},
        {"chat": {"latency_ms": [5, 1]}},
        {"chat": {"always_status": 99}},
        {"retry_after_form": "minutes"},
        {"hang_mode": "explode"},
        {"invalid_numbers": "5511"},
        {"webhook_statuses": ["SENT"]},
    ],
)
def test_invalid_fault_patches_are_rejected(sb: SandboxProcess, patch: dict[str, Any]) -> None:
    before = sb.faults()
    with pytest.raises(ValueError, match="400"):
        sb.set_faults(patch)
    assert sb.faults() == before


def test_startup_faults_and_bad_startup_faults() -> None:
    with SandboxProcess(faults={"send": {"always_status": 503}}, seed=1) as sb:
        assert sb.faults()["send"]["always_status"] == 503
        with httpx.Client(base_url=sb.url, trust_env=False) as http:
            assert send(http, sb, "x").status_code == 503
            sb.set_faults(send={"always_status": None})
            assert send(http, sb, "x").status_code == 201
            sb.reset()  # back to the start-up faults
            assert send(http, sb, "x").status_code == 503
    with pytest.raises(SandboxStartError):
        SandboxProcess(faults={"send": {"rate_429": 2}}).start()


def test_retry_after_http_date_and_early_retry_window(sb: SandboxProcess, http: httpx.Client) -> None:
    sb.set_faults(send={"rate_429": 1.0}, retry_after=1, retry_after_form="http-date")
    r = send(http, sb, "same")
    assert r.status_code == 429
    from email.utils import parsedate_to_datetime

    not_before = parsedate_to_datetime(r.headers["retry-after"]).timestamp()
    assert not_before >= time.time()
    send(http, sb, "same")  # too early
    send(http, sb, "other")  # another identity: not early
    time.sleep(max(0.0, not_before - time.time()) + 0.05)
    send(http, sb, "same")  # after the date: fine
    summary = sb.summary()
    assert summary["early_retries"] == 1
    assert summary["early_retries_by_route"] == {"send": 1}
    assert [r["early"] for r in sb.ledger()["requests"]] == [False, True, False, False]


# -- OpenRouter shape and fake LLM -----------------------------------------------------------------


def test_chat_response_shape(sb: SandboxProcess, http: httpx.Client) -> None:
    r = chat(http, sb, "Escreva.\n<lead>\nname: joão pedro\ncity: Natal\n</lead>")
    body = r.json()
    assert set(body) >= {"id", "model", "object", "created", "choices", "usage"}
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert "João" in choice["message"]["content"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    bad = http.post(CHAT_PATH, json={"model": "m", "messages": []}, headers={"Authorization": f"Bearer {sb.chat_key}"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
    assert http.post(CHAT_PATH, json={}, headers={"Authorization": "Bearer nope"}).json()["error"]["code"] == 401


def test_json_mode_split_preserves_text(sb: SandboxProcess, http: httpx.Client) -> None:
    text = "Olá, Ana! Tudo bem? Temos uma condição especial.\n\nPosso te mandar detalhes? Abraço!"
    r = chat(http, sb, f"Divida em no máximo 3 partes.\n<text>{text}</text>", json_mode=True)
    parts = json.loads(r.json()["choices"][0]["message"]["content"])["messages"]
    assert len(parts) == 3
    assert " ".join(parts).split() == text.split()


def test_llm_generation_is_personal_deterministic_and_bounded() -> None:
    lengths = set()
    for i in range(40):
        messages = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": f"<lead>\nname: ana {i}\ncompany: Loja {i}\n</lead>"},
        ]
        text = llm.generate_text(messages)
        assert text == llm.generate_text(messages)
        assert "Ana" in text
        n = len(llm.split_sentences(text))
        assert 1 <= n <= 5  # 1-4 sentences (a greeting may be two short ones)
        lengths.add(len(text))
    assert len(lengths) > 5  # varied


def test_llm_is_lenient_without_delimiters() -> None:
    assert llm.parse_lead("name: Bia\nphone: +55") == {"name": "Bia", "phone": "+55"}
    assert "Bia" in llm.generate_text([{"role": "user", "content": "name: Bia"}])
    assert llm.generate_text([{"role": "user", "content": "oi"}])  # no name: still a text
    assert llm.split_source([{"role": "user", "content": "Uma. Duas."}]) == "Uma. Duas."
    assert llm.split_parts("Uma. Duas. Três. Quatro. Cinco.", 2) == ["Uma. Duas. Três.", "Quatro. Cinco."]
    assert llm.max_parts_hint([{"role": "system", "content": "max_parts: 4"}]) == 4


def test_config_merge_patch_and_validation() -> None:
    doc = merge_patch({"send": {"rate_429": 0.1, "latency_ms": 5}}, {"send": {"rate_429": None, "rate_500": 0.2}})
    assert doc == {"send": {"latency_ms": 5, "rate_500": 0.2}}
    full = validate(with_defaults(doc))
    assert full["send"]["always_status"] is None and full["chat"] == DEFAULTS["chat"]
    with pytest.raises(FaultError, match="send.rate_abc"):
        validate(with_defaults({"send": {"rate_abc": 0.1}}))


# -- webhooks ------------------------------------------------------------------------------------


def test_webhook_emission() -> None:
    receiver = Receiver()
    try:
        with (
            SandboxProcess(webhook_url=receiver.url, webhook_secret="whsec-123") as sb,
            httpx.Client(base_url=sb.url, trust_env=False) as http,
        ):
            key_a = send(http, sb, "hello a").json()["key"]["id"]
            key_b = send(http, sb, "hello b", instance="acme-2").json()["key"]["id"]
            events = receiver.wait_for(6)
            assert len(events) == 6
            by_key: dict[str, list[str]] = {}
            for e in events:
                assert e["event"] == "messages.update"
                assert e["apikey"] == "whsec-123"
                assert e["data"]["fromMe"] is True
                assert e["data"]["remoteJid"] == "5511987654321@s.whatsapp.net"
                assert e["date_time"]
                by_key.setdefault(e["data"]["keyId"], []).append(e["data"]["status"])
            assert by_key == {
                key_a: ["SERVER_ACK", "DELIVERY_ACK", "READ"],
                key_b: ["SERVER_ACK", "DELIVERY_ACK", "READ"],
            }
            assert {e["instance"] for e in events} == {"acme-1", "acme-2"}
            assert "whsec-123" not in json.dumps(sb.faults())
            # a dead receiver is logged and counted, never a crash
            dead = socket.socket()
            dead.bind(("127.0.0.1", 0))
            dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/x"
            dead.close()
            sb.set_faults(webhook_url=dead_url, webhook_statuses=["READ"])
            assert send(http, sb, "to nowhere").status_code == 201
            deadline = time.monotonic() + 5
            while sb.summary()["webhooks"].get("failed", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sb.summary()["webhooks"]["failed"] == 1
            assert sb.summary()["webhooks"]["sent"] == 6
            # configured at runtime
            sb.set_faults(webhook_url=receiver.url, webhook_statuses=["DELIVERY_ACK"])
            send(http, sb, "runtime")
            assert receiver.wait_for(7)[-1]["data"]["status"] == "DELIVERY_ACK"
    finally:
        receiver.close()


def test_delivery_errors_answer_one_instance_with_error_receipts_at_its_rate() -> None:
    """R-HEALTH-2 / E-35 fixture: ``delivery_errors = {instance: rate}`` gives that share of the
    instance's accepted sends SERVER_ACK then ERROR (no DELIVERY_ACK / READ), published like every
    receipt; other instances are untouched; the draw is deterministic; bad rates are refused."""
    receiver = Receiver()
    try:
        with (
            SandboxProcess(webhook_url=receiver.url, webhook_secret="whsec-1", seed=9) as sb,
            httpx.Client(base_url=sb.url, trust_env=False) as http,
        ):
            sb.set_faults(delivery_errors={"acme-1": 0.5}, webhook_gap_ms=1)
            keys = {
                send(http, sb, f"m{i}", number=f"55119876543{i:02d}").json()["key"]["id"]: "acme-1" for i in range(40)
            }
            keys[send(http, sb, "other", instance="acme-2").json()["key"]["id"]] = "acme-2"
            by_key: dict[str, list[str]] = {}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                by_key = {}
                for e in receiver.events:
                    by_key.setdefault(e["data"]["keyId"], []).append(e["data"]["status"])
                if set(by_key) == set(keys) and all(v[-1] in ("ERROR", "READ") for v in by_key.values()):
                    break
                time.sleep(0.05)
            failed = {k for k, v in by_key.items() if v == ["SERVER_ACK", "ERROR"]}
            fine = {k for k, v in by_key.items() if v == ["SERVER_ACK", "DELIVERY_ACK", "READ"]}
            assert failed | fine == set(keys) and not failed & fine
            assert {keys[k] for k in failed} == {"acme-1"}  # acme-2 never errs
            assert 10 <= len(failed) <= 30  # about half of 40
            with pytest.raises(ValueError, match="400"):
                sb.set_faults(delivery_errors={"acme-1": 1.5})
            with pytest.raises(ValueError, match="400"):
                sb.set_faults(delivery_errors=["acme-1"])
    finally:
        receiver.close()
    with pytest.raises(FaultError, match=r"delivery_errors.acme-1: 2 out of range"):
        validate(with_defaults({"delivery_errors": {"acme-1": 2}}))


# -- determinism, concurrency, shutdown --------------------------------------------------------------


def _outcomes(seed: int) -> tuple[list[int], list[str]]:
    with (
        SandboxProcess(seed=seed, faults={"send": {"rate_500": 0.3, "rate_429": 0.2}}) as sb,
        httpx.Client(base_url=sb.url, trust_env=False) as http,
    ):
        statuses = [send(http, sb, f"msg {i % 10}").status_code for i in range(30)]
        keys = [s["key_id"] for s in sb.ledger()["sends"]]
    return statuses, keys


def test_seeded_runs_replay() -> None:
    a, b, c = _outcomes(5), _outcomes(5), _outcomes(6)
    assert a == b
    assert a != c
    assert set(a[0]) == {201, 429, 500}


def test_many_concurrent_slow_requests(sb: SandboxProcess) -> None:
    sb.set_faults(send={"latency_ms": 800}, chat={"latency_ms": [700, 900]})
    n = 40

    def one(i: int) -> int:
        with httpx.Client(base_url=sb.url, timeout=10.0, trust_env=False) as http:
            r = send(http, sb, f"slow {i}") if i % 2 else chat(http, sb, f"name: L{i}")
            return r.status_code

    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(one, range(n)))
    elapsed = time.monotonic() - started
    assert sorted(set(statuses)) == [200, 201]
    assert elapsed < 3.0, f"{n} concurrent 800 ms requests took {elapsed:.1f} s"
    assert sb.summary()["requests"] == n


def test_sigterm_stops_cleanly_even_with_hanging_requests() -> None:
    sb = SandboxProcess(faults={"send": {"rate_accept_then_hang": 1.0, "hang_seconds": 60}}).start()
    results: list[BaseException | None] = []

    def hang() -> None:
        try:
            with httpx.Client(base_url=sb.url, timeout=30.0, trust_env=False) as http:
                send(http, sb, "hangs")
            results.append(None)
        except httpx.HTTPError as exc:
            results.append(exc)

    t = threading.Thread(target=hang)
    t.start()
    deadline = time.monotonic() + 5
    while sb.summary()["sends"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc = sb._proc
    assert proc is not None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    assert code == 0
    assert time.monotonic() - started < 3
    t.join(5)
    assert isinstance(results[0], httpx.RemoteProtocolError)  # closed unanswered, not answered
    sb.stop()
