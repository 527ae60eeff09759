"""The sandbox publishes Evolution API's events as Evolution does (SPEC §5 "Evolution API events over
RabbitMQ", §4.6a R-IN-1, R-IN-2, R-IN-7): RabbitMQ global mode and webhook, receipts, send.message,
scripted and automatic inbound replies, connection changes.

RabbitMQ is the real broker, in this test run's vhost; each test uses its own exchange and queue prefix.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest

from devtools import services
from sandbox.config import FaultError, validate, with_defaults
from sandbox.events import EVENTS, lid_for, owner_jid
from sandbox.testing import SandboxProcess
from tests.integration.sandbox.receiver import Receiver

ENVELOPE_KEYS = {"event", "instance", "data", "server_url", "date_time", "sender", "apikey"}
NUMBER = "5511987654321"


# -- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def amqp_url(services: dict[str, str]) -> str:
    return services["RABBITMQ_URL"]


@pytest.fixture
def topology(amqp_url: str) -> Iterator[dict[str, str]]:
    """A fresh exchange and queue prefix for one test; its queues and exchange are deleted afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {"exchange": f"sbx-{tag}", "prefix": f"sbx{tag}"}
    yield names
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for event in EVENTS:
            ch.queue_delete(f"{names['prefix']}.{event}")
        ch.exchange_delete(names["exchange"])
    finally:
        conn.close()


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    return services.wait_until(pred, timeout=timeout, interval=0.05, what=what, error=AssertionError)


#: one client for every send of this module: httpx.post() builds a client (and its TLS context) per
#: request, tens of milliseconds each, and a test here sends 240 times
HTTP = httpx.Client(trust_env=False)


def send(sb: SandboxProcess, text: str, *, instance: str = "acme-1", number: str = NUMBER) -> httpx.Response:
    return HTTP.post(
        f"{sb.url}/message/sendText/{instance}",
        json={"number": number, "text": text},
        headers={"apikey": sb.evolution_key},
    )


def drain(amqp_url: str, queue: str, n: int, timeout: float = 10.0) -> list[tuple[Any, Any, dict[str, Any]]]:
    """Get (and ack) exactly n messages from a queue: (method, properties, decoded body)."""
    got: list[tuple[Any, Any, dict[str, Any]]] = []
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            got.append((method, props, json.loads(body)))
        time.sleep(0.2)  # nothing more than expected
        method, _, body = ch.basic_get(queue, auto_ack=True)
        assert method is None, f"unexpected extra message on {queue}: {body[:300]!r}"
    finally:
        conn.close()
    assert len(got) == n, f"{queue}: got {len(got)} message(s), expected {n}"
    return got


def rabbitmqctl(*args: str) -> list[list[str]]:
    out = services.rabbitmqctl(*args, "--no-table-headers", "-q")
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def check_envelope(env: dict[str, Any], event: str, instance: str, sb: SandboxProcess) -> None:
    assert set(env) == ENVELOPE_KEYS, sorted(env)
    assert env["event"] == event and env["instance"] == instance
    assert env["server_url"] == sb.url
    assert env["sender"] == owner_jid(instance) and env["sender"].endswith("@s.whatsapp.net")
    assert env["date_time"].endswith("Z")
    when = dt.datetime.fromisoformat(env["date_time"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60


# -- RabbitMQ global mode -----------------------------------------------------------------------------


def test_amqp_declares_evolution_global_topology(amqp_url: str, topology: dict[str, str]) -> None:
    """R-IN-1: a durable topic exchange; per event a durable quorum queue {prefix}.{event} bound with
    routing key = the event; a consumer declaring them with the same arguments succeeds, one with other
    arguments gets PRECONDITION_FAILED (so the arguments really are Evolution's)."""
    with SandboxProcess(
        events_amqp_url=amqp_url, events_exchange=topology["exchange"], events_prefix=topology["prefix"]
    ) as sb:
        view = wait_until(lambda: sb.events()["sinks"]["amqp"]["connected"] and sb.events(), what="AMQP connected")
        amqp = view["sinks"]["amqp"]
        assert amqp["exchange"] == topology["exchange"] and amqp["prefix"] == topology["prefix"]
        assert amqp["queues"] == {e: f"{topology['prefix']}.{e}" for e in EVENTS}
        assert "guest:guest" not in amqp["url"]  # the password is masked

        vhost = services.vhost_of(amqp_url)
        exchanges = {
            row[0]: row[1:]
            for row in rabbitmqctl("list_exchanges", "-p", vhost, "name", "type", "durable", "auto_delete")
        }
        assert exchanges[topology["exchange"]] == ["topic", "true", "false"]
        queues = {
            row[0]: row[1:]
            for row in rabbitmqctl("list_queues", "-p", vhost, "name", "type", "durable", "auto_delete", "arguments")
        }
        bindings = {
            (row[0], row[1], row[2])
            for row in rabbitmqctl("list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key")
        }
        for event in EVENTS:
            name = f"{topology['prefix']}.{event}"
            qtype, durable, auto_delete, arguments = queues[name]
            assert (qtype, durable, auto_delete) == ("quorum", "true", "false")
            assert arguments == '[{"x-queue-type","quorum"}]'
            assert (topology["exchange"], name, event) in bindings
            # Evolution's start-up declaration also binds the settings' spelling (nothing publishes to it)
            assert (topology["exchange"], name, event.replace(".", "_").upper()) in bindings

        # the consumer's side: the same declaration is a no-op, another one is refused
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            ch = conn.channel()
            ch.exchange_declare(topology["exchange"], exchange_type="topic", durable=True, auto_delete=False)
            for event in EVENTS:
                name = f"{topology['prefix']}.{event}"
                ch.queue_declare(name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
                ch.queue_bind(name, topology["exchange"], routing_key=event)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                ch.queue_declare(
                    f"{topology['prefix']}.messages.upsert", durable=True, arguments={"x-queue-type": "classic"}
                )
            assert refused.value.reply_code == 406  # PRECONDITION_FAILED
        finally:
            conn.close()
        assert send(sb, "still serving").status_code == 201


def test_amqp_events_after_a_send_inbound_and_connection_change(amqp_url: str, topology: dict[str, str]) -> None:
    """R-IN-1/R-IN-7: send.message, then SERVER_ACK -> DELIVERY_ACK -> READ (messages.update), a scripted
    messages.upsert and a connection.update arrive on their queues, routing key = event, persistent,
    body = Evolution's JSON envelope."""
    with SandboxProcess(
        events_amqp_url=amqp_url,
        events_exchange=topology["exchange"],
        events_prefix=topology["prefix"],
        webhook_secret="whsec-1",
    ) as sb:
        wait_until(lambda: sb.events()["sinks"]["amqp"]["connected"], what="AMQP connected")
        answer = send(sb, "Olá, Ana!").json()
        key_id = answer["key"]["id"]
        sb.inbound(instance="acme-1", number=NUMBER, text="PARE")
        sb.set_connection("acme-1", "close")
        q = f"{topology['prefix']}."

        [(method, props, env)] = drain(amqp_url, q + "send.message", 1)
        assert method.routing_key == "send.message" and method.exchange == topology["exchange"]
        assert props.delivery_mode == 2
        check_envelope(env, "send.message", "acme-1", sb)
        assert env["apikey"] == "whsec-1"
        assert env["data"] == answer  # the message as sendText answered it

        receipts = drain(amqp_url, q + "messages.update", 3)
        assert [m.routing_key for m, _, _ in receipts] == ["messages.update"] * 3
        for _, _, env in receipts:
            check_envelope(env, "messages.update", "acme-1", sb)
            data = env["data"]
            assert data["keyId"] == key_id and data["fromMe"] is True
            assert data["remoteJid"] == f"{NUMBER}@s.whatsapp.net"
            assert set(data) == {"keyId", "remoteJid", "fromMe", "status", "instanceId", "messageId"}
        assert [env["data"]["status"] for _, _, env in receipts] == ["SERVER_ACK", "DELIVERY_ACK", "READ"]

        [(method, _, env)] = drain(amqp_url, q + "messages.upsert", 1)
        assert method.routing_key == "messages.upsert"
        check_envelope(env, "messages.upsert", "acme-1", sb)
        assert env["data"]["key"]["remoteJid"] == f"{NUMBER}@s.whatsapp.net" and env["data"]["key"]["fromMe"] is False
        assert env["data"]["message"]["conversation"] == "PARE"

        [(method, _, env)] = drain(amqp_url, q + "connection.update", 1)
        check_envelope(env, "connection.update", "acme-1", sb)
        assert env["data"] == {"instance": "acme-1", "state": "close", "statusReason": 401}

        counts = sb.summary()["events"]
        assert counts["amqp"]["messages.update"] == {"sent": 3}
        assert counts["amqp"]["send.message"] == {"sent": 1}
        assert counts["dispatched"] == {
            "send.message": 1,
            "messages.update": 3,
            "messages.upsert": 1,
            "connection.update": 1,
        }


def test_webhook_receives_the_same_envelopes_as_rabbitmq(
    amqp_url: str, topology: dict[str, str], receiver: Receiver
) -> None:
    """SPEC §5: the same envelopes arrive over a webhook (plus its destination)."""
    with SandboxProcess(
        events_amqp_url=amqp_url,
        events_exchange=topology["exchange"],
        events_prefix=topology["prefix"],
        webhook_url=receiver.url,
        faults={"webhook_events": list(EVENTS)},
    ) as sb:
        wait_until(lambda: sb.events()["sinks"]["amqp"]["connected"], what="AMQP connected")
        send(sb, "parte 1", instance="acme-2")
        sb.inbound(instance="acme-2", number=NUMBER, text="Oi", lid=True)
        sb.set_connection("acme-2", "connecting")
        hooks = receiver.wait_for(lambda ev: len(ev) >= 6)
        assert len(hooks) == 6
        via_amqp = []
        for event, n in (("send.message", 1), ("messages.update", 3), ("messages.upsert", 1), ("connection.update", 1)):
            via_amqp += [env for _, _, env in drain(amqp_url, f"{topology['prefix']}.{event}", n)]
        for hook in hooks:
            assert hook.pop("destination") == receiver.url
        key = lambda e: json.dumps({k: e[k] for k in ENVELOPE_KEYS - {"date_time"}}, sort_keys=True)  # noqa: E731
        assert sorted(map(key, hooks)) == sorted(map(key, via_amqp))
        webhook = sb.summary()["events"]["webhook"]
        assert webhook["messages.update"] == {"sent": 3} and webhook["connection.update"] == {"sent": 1}
        assert sb.summary()["webhooks"] == {"sent": 6}


def test_amqp_unreachable_broker_is_counted_and_the_sandbox_keeps_serving() -> None:
    """A publish failure is logged and counted; sends are still answered."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with SandboxProcess(
        events_amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F", events_amqp_retry_seconds=0.3
    ) as sb:
        for i in range(3):
            assert send(sb, f"m{i}").status_code == 201
        wait_until(
            lambda: sb.summary()["events"].get("amqp", {}).get("messages.update", {}).get("failed", 0) >= 9,
            what="failures counted",
        )
        view = sb.events()["sinks"]["amqp"]
        assert view["connected"] is False and view["last_error"]
        assert sb.summary()["sends"] == 3
        assert sb.summary()["events"]["amqp"]["send.message"].get("failed") == 3


def _close_connections(name: str) -> int:
    """Have the broker close every connection whose name starts with ``name`` (as a restart does)."""
    rows = rabbitmqctl("list_connections", "pid", "client_properties")
    pids = [row[0] for row in rows if name in "\t".join(row[1:])]
    for pid in pids:
        services.rabbitmqctl("close_connection", pid, "test closes it")
    return len(pids)


def test_amqp_reconnects_after_the_broker_drops_its_connection(amqp_url: str, topology: dict[str, str]) -> None:
    """The broker closes the sandbox's connections (as a restart does): the next events still arrive."""
    with SandboxProcess(
        events_amqp_url=amqp_url, events_exchange=topology["exchange"], events_prefix=topology["prefix"]
    ) as sb:
        amqp = wait_until(
            lambda: sb.events()["sinks"]["amqp"]["connected"] and sb.events()["sinks"]["amqp"], what="connected"
        )
        publishers = amqp["publishers"]
        assert amqp["connects"] == publishers
        assert _close_connections(amqp["connection_name"]) == publishers
        wait_until(lambda: sb.events()["sinks"]["amqp"]["connects"] == 2 * publishers, what="reconnected", timeout=15)
        for i in range(8):  # several chats: every publisher gets some
            sb.inbound(instance="acme-1", number=f"5511987650{i:03d}", text="depois da queda")
        got = drain(amqp_url, f"{topology['prefix']}.messages.upsert", 8)
        assert {env["data"]["message"]["conversation"] for _, _, env in got} == {"depois da queda"}
        assert sb.summary()["events"]["amqp"]["messages.upsert"].get("sent") == 8


def test_amqp_queue_with_other_arguments_is_a_clear_error(amqp_url: str, topology: dict[str, str]) -> None:
    """A queue already declared with other arguments (classic): PRECONDITION_FAILED is reported by name, events
    are counted failed, the sandbox keeps serving."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_declare(f"{topology['prefix']}.messages.upsert", durable=True)  # classic
    finally:
        conn.close()
    with SandboxProcess(
        events_amqp_url=amqp_url,
        events_exchange=topology["exchange"],
        events_prefix=topology["prefix"],
        events_amqp_retry_seconds=0.5,
    ) as sb:
        error = wait_until(lambda: sb.events()["sinks"]["amqp"]["last_error"], what="an error")
        assert "PRECONDITION_FAILED" in error and f"{topology['prefix']}.messages.upsert" in error
        sb.inbound(instance="acme-1", number=NUMBER, text="Oi")
        wait_until(
            lambda: sb.summary()["events"].get("amqp", {}).get("messages.upsert", {}).get("failed"), what="failed"
        )
        assert send(sb, "x").status_code == 201


# -- inbound shapes --------------------------------------------------------------------------------------


def test_inbound_message_shapes(receiver: Receiver) -> None:
    """R-IN-2, E-29, E-32: plain, LID (remoteJid @lid + remoteJidAlt), group, status broadcast, fromMe and
    non-text messages have Evolution's shapes; each is recorded in the ledger."""
    with SandboxProcess(webhook_url=receiver.url, seed=4) as sb:
        cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = []

        def case(fields: dict[str, Any]) -> Callable[[Callable[[dict[str, Any]], None]], None]:
            return lambda check: cases.append((fields, check))

        lid = lid_for(NUMBER)
        pn = f"{NUMBER}@s.whatsapp.net"

        @case({"text": "Oi, tenho interesse"})
        def _plain(d: dict[str, Any]) -> None:
            assert d["key"] == {"remoteJid": pn, "fromMe": False, "id": d["key"]["id"]}
            assert d["message"]["conversation"] == "Oi, tenho interesse" and d["messageType"] == "conversation"
            assert d["status"] == "DELIVERY_ACK" and isinstance(d["messageTimestamp"], int)
            assert len(d["key"]["id"]) == 32 and d["source"] == "android"

        @case({"text": "PARE", "lid": True})
        def _lid(d: dict[str, Any]) -> None:
            assert d["key"]["remoteJid"] == f"{lid}@lid" and d["key"]["remoteJidAlt"] == pn
            assert d["key"]["addressingMode"] == "lid" and d["key"]["fromMe"] is False

        @case({"text": "pn first", "lid": "123456789012345", "addressing_mode": "pn"})
        def _pn_with_lid(d: dict[str, Any]) -> None:
            assert d["key"]["remoteJid"] == pn and d["key"]["remoteJidAlt"] == "123456789012345@lid"
            assert d["key"]["addressingMode"] == "pn"

        @case({"text": "no grupo", "group": True})
        def _group(d: dict[str, Any]) -> None:
            assert d["key"]["remoteJid"].endswith("@g.us") and d["key"]["participant"] == pn

        @case({"text": "grupo lid", "group": "120363000000000001@g.us", "lid": True})
        def _group_lid(d: dict[str, Any]) -> None:
            assert d["key"]["remoteJid"] == "120363000000000001@g.us"
            assert d["key"]["participant"] == f"{lid}@lid" and d["key"]["participantAlt"] == pn

        @case({"text": "meu status", "broadcast": True})
        def _broadcast(d: dict[str, Any]) -> None:
            assert d["key"]["remoteJid"] == "status@broadcast" and d["key"]["participant"] == pn

        @case({"text": "digitado no celular", "from_me": True})
        def _from_me(d: dict[str, Any]) -> None:
            assert d["key"]["fromMe"] is True and d["key"]["remoteJid"] == pn and d["status"] == "SERVER_ACK"

        @case({"message_type": "audioMessage"})
        def _audio(d: dict[str, Any]) -> None:
            assert d["messageType"] == "audioMessage" and "conversation" not in d["message"]
            assert (
                d["message"]["audioMessage"]["mimetype"].startswith("audio/ogg") and d["message"]["audioMessage"]["ptt"]
            )

        @case({"message_type": "imageMessage", "text": "olha a foto"})
        def _image(d: dict[str, Any]) -> None:
            assert d["message"]["imageMessage"]["caption"] == "olha a foto"

        @case({"message_type": "extendedTextMessage", "text": "formato antigo"})
        def _extended(d: dict[str, Any]) -> None:
            assert d["message"]["extendedTextMessage"] == {"text": "formato antigo"}
            assert d["messageType"] == "extendedTextMessage"

        @case({"message": {"reactionMessage": {"text": "👍", "key": {"id": "X"}}}, "message_type": "reactionMessage"})
        def _raw(d: dict[str, Any]) -> None:
            assert d["messageType"] == "reactionMessage" and d["message"]["reactionMessage"]["text"] == "👍"

        sent = []
        for fields, _ in cases:
            sent.append(sb.inbound(instance="acme-1", number=f"+{NUMBER[:2]} {NUMBER[2:4]} {NUMBER[4:]}", **fields))
        hooks = receiver.wait_for(lambda ev: len(ev) >= len(cases))
        by_id = {h["data"]["key"]["id"]: h for h in hooks}
        assert len(by_id) == len(cases)
        for (_fields, check), answer in zip(cases, sent):
            hook = by_id[answer["key_id"]]
            assert hook["event"] == "messages.upsert" and hook["instance"] == "acme-1"
            assert hook["data"]["key"] == answer["data"]["key"]
            check(hook["data"])
        inbound = sb.ledger()["inbound"]
        assert [e["key_id"] for e in sorted(inbound, key=lambda e: e["seq"])] != []
        assert {e["key_id"] for e in inbound} == {a["key_id"] for a in sent}
        assert all(e["origin"] == "control" and e["number"] == NUMBER for e in inbound)
        assert sb.summary()["inbound_by_origin"] == {"control": len(cases)}


def test_inbound_delay_and_reset_drops_what_is_not_yet_published(receiver: Receiver) -> None:
    with SandboxProcess(webhook_url=receiver.url) as sb:
        started = time.monotonic()
        sb.inbound(instance="acme-1", number=NUMBER, text="depois", delay_ms=400)
        receiver.wait_for(lambda ev: len(ev) >= 1)
        assert time.monotonic() - started >= 0.35
        sb.inbound(instance="acme-1", number=NUMBER, text="nunca", delay_ms=400)
        sb.reset()
        time.sleep(0.7)
        assert [e["data"]["message"]["conversation"] for e in receiver.events] == ["depois"]
        assert sb.ledger()["inbound"] == []


def test_inbound_batch_is_validated_before_anything_is_published(receiver: Receiver) -> None:
    with SandboxProcess(webhook_url=receiver.url) as sb:
        good = [{"instance": "acme-1", "number": f"5511987650{i:03d}", "text": f"oi {i}"} for i in range(3)]
        with pytest.raises(ValueError, match=r"\[1\] number"):
            sb.inbound_many([good[0], {**good[1], "number": "12"}, good[2]])
        time.sleep(0.2)
        assert receiver.events == [] and sb.ledger()["inbound"] == []
        answers = sb.inbound_many(good)
        hooks = receiver.wait_for(lambda ev: len(ev) >= 3)
        assert sorted(h["data"]["message"]["conversation"] for h in hooks) == ["oi 0", "oi 1", "oi 2"]
        assert {a["key_id"] for a in answers} == {h["data"]["key"]["id"] for h in hooks}


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"number": NUMBER, "text": "x"}, "instance: required"),
        ({"instance": "a", "number": "12", "text": "x"}, "number"),
        ({"instance": "a", "number": NUMBER}, "text: required"),
        ({"instance": "a", "number": NUMBER, "message_type": "hologramMessage"}, "message_type"),
        ({"instance": "a", "number": NUMBER, "text": "x", "group": True, "broadcast": True}, "broadcast"),
        ({"instance": "a", "number": NUMBER, "text": "x", "lid": "abc"}, "lid"),
        ({"instance": "a", "number": NUMBER, "text": "x", "addressing_mode": "lid"}, "needs lid"),
        ({"instance": "a", "number": NUMBER, "text": "x", "delay_ms": -1}, "delay_ms"),
        ({"instance": "a", "number": NUMBER, "text": "x", "colour": "red"}, "colour: unknown key"),
    ],
)
def test_inbound_bad_input_is_a_clear_400(sb: SandboxProcess, fields: dict[str, Any], needle: str) -> None:
    # the session's sandbox (reset before and after): a refused request changes nothing
    r = httpx.post(f"{sb.url}/__sandbox/inbound", json=fields, trust_env=False)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert sb.ledger()["inbound"] == [] and sb.events()["pending"] == 0


# -- automatic replies -----------------------------------------------------------------------------------

REPLIES = {
    "rate": 0.5,
    "after_part": 2,
    "delay_ms": [0, 30],
    "texts": [{"text": "Oi, tenho interesse", "weight": 3}, "PARE", {"message_type": "audioMessage", "weight": 1}],
    "lid_rate": 0.4,
}


def _auto_replies(seed: int, leads: int = 40) -> list[tuple[str, str | None, str, str | None, str]]:
    with SandboxProcess(seed=seed, faults={"replies": REPLIES}) as sb:
        for i in range(leads):
            number = f"55119000{i:05d}"
            assert send(sb, f"parte 1 para {i}", number=number).status_code == 201
        time.sleep(0.2)
        assert sb.ledger()["inbound"] == []  # nobody answers after part 1
        for i in range(leads):
            assert send(sb, f"parte 2 para {i}", number=f"55119000{i:05d}").status_code == 201
        wait_until(lambda: sb.events()["pending"] == 0, what="replies published")
        ledger = sb.ledger()
        sends = {(s["number"], s["part"]): s["key_id"] for s in ledger["sends"]}
        out = []
        for e in ledger["inbound"]:
            assert e["origin"] == "auto" and e["trigger"]["part"] == 2
            assert e["trigger"]["key_id"] == sends[(e["number"], 2)]
            assert e["sends_to_number"] == 2
            assert (e["lid"] is not None) == e["remote_jid"].endswith("@lid")
            out.append((e["number"], e["text"], e["message_type"], e["lid"], e["key_id"]))
        # a third part does not make anyone answer again
        send(sb, "parte 3", number="5511900000000")
        time.sleep(0.1)
        assert len(sb.ledger()["inbound"]) == len(out)
        return sorted(out)


def test_automatic_replies_are_deterministic_by_seed() -> None:
    a, b, c = _auto_replies(21), _auto_replies(21), _auto_replies(22)
    assert a == b
    assert a != c
    assert 8 <= len(a) <= 32  # rate 0.5 of 40 leads
    assert {t for _, t, _, _, _ in a} >= {"Oi, tenho interesse"}
    assert {m for _, _, m, _, _ in a} <= {"conversation", "audioMessage"}
    assert any(lid for _, _, _, lid, _ in a) and not all(lid for _, _, _, lid, _ in a)


def test_automatic_replies_reach_the_sinks_with_the_lid_shape(receiver: Receiver) -> None:
    """E-29: an automatic reply from a LID-addressed chat carries remoteJidAlt."""
    replies = {"rate": 1.0, "after_part": 1, "delay_ms": 0, "texts": ["PARE"], "lid_rate": 1.0, "instances": ["acme-9"]}
    with SandboxProcess(webhook_url=receiver.url, faults={"replies": replies, "webhook_statuses": []}) as sb:
        send(sb, "oi", instance="acme-1")  # not a replying instance
        send(sb, "oi", instance="acme-9")
        [hook] = receiver.wait_for(lambda ev: len(ev) >= 1)
        time.sleep(0.2)
        assert len(receiver.events) == 1
        assert hook["event"] == "messages.upsert" and hook["instance"] == "acme-9"
        key = hook["data"]["key"]
        assert key["remoteJid"] == f"{lid_for(NUMBER)}@lid" and key["remoteJidAlt"] == f"{NUMBER}@s.whatsapp.net"
        assert hook["data"]["message"]["conversation"] == "PARE"


# -- connection changes ----------------------------------------------------------------------------------


def test_connection_changes_publish_connection_update(receiver: Receiver) -> None:
    """R-IN-7: a fault patch or the control API changing an instance's state publishes connection.update;
    no change, no event; a reset back to the start-up faults is a change too."""
    with SandboxProcess(webhook_url=receiver.url, faults={"connecting_instances": ["acme-3"]}) as sb:
        sb.set_faults(disconnected_instances=["acme-1"])
        assert sb.set_connection("acme-1", "close")["changed"] is False  # already closed: nothing
        sb.set_connection("acme-2", "close", status_reason=403)
        sb.set_faults(disconnected_instances=[])  # acme-1 and acme-2 open again
        sb.set_connection("acme-3", "open")
        assert httpx.get(
            f"{sb.url}/instance/connectionState/acme-2", headers={"apikey": sb.evolution_key}, trust_env=False
        ).json() == {"instance": {"instanceName": "acme-2", "state": "open"}}
        sb.reset()  # acme-3 back to connecting
        events = receiver.wait_for(lambda ev: len(ev) >= 6)
        assert len(events) == 6
        per_instance: dict[str, list[tuple[str, int]]] = {}
        for e in events:  # one instance's events keep their order; instances interleave freely
            assert e["event"] == "connection.update" and e["data"]["instance"] == e["instance"]
            per_instance.setdefault(e["instance"], []).append((e["data"]["state"], e["data"]["statusReason"]))
        assert per_instance == {
            "acme-1": [("close", 401), ("open", 200)],
            "acme-2": [("close", 403), ("open", 200)],
            "acme-3": [("open", 200), ("connecting", 200)],
        }
        opened = next(e["data"] for e in events if e["data"]["state"] == "open")
        assert opened["wuid"] == owner_jid(opened["instance"]) and "profileName" in opened
        connections = sb.ledger()["connections"]  # since the reset: what the reset changed
        assert [(c["instance"], c["state"], c["origin"]) for c in connections] == [("acme-3", "connecting", "reset")]
        r = httpx.post(f"{sb.url}/__sandbox/connection", json={"instance": "x", "state": "sleeping"}, trust_env=False)
        assert r.status_code == 400 and "state" in r.json()["error"]


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"webhook_events": ["messages.bogus"]}, "webhook_events"),
        ({"amqp_events": "messages.upsert"}, "amqp_events"),
        ({"replies": {"rate": 2}}, "replies.rate"),
        ({"replies": {"after_part": 0}}, "replies.after_part"),
        ({"replies": {"delay_ms": [5, 1]}}, "replies.delay_ms"),
        ({"replies": {"texts": []}}, "replies.texts"),
        ({"replies": {"texts": [{"message_type": "conversation"}]}}, "replies.texts[0].text"),
        ({"replies": {"probability": 0.1}}, "replies.probability"),
    ],
)
def test_invalid_event_settings_are_rejected(patch: dict[str, Any], needle: str) -> None:
    with pytest.raises(FaultError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate(with_defaults(patch))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--events-amqp-url", "http://not-amqp/"], "is not amqp://"),
        (["--events-amqp-url", "amqp://127.0.0.1/", "--events-exchange", ""], "exchange name is empty"),
        (["--events-amqp-url", "amqp://127.0.0.1/", "--events-amqp-publishers", "0"], "publishers"),
    ],
)
def test_bad_events_options_stop_the_start(args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "--port", "0", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
