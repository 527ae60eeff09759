"""The Evolution events consumer on a real RabbitMQ vhost and PostgreSQL (R-IN-1, E-30, E-38)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pika
import pytest

from campaign.db import db
from campaign.errors import ConfigError
from campaign.inbound.consumer import EVENTS, QUEUE_ARGUMENTS, InboundConsumer, declare_topology, queue_name
from campaign.settings import get_settings
from devtools import services
from models import CampaignMessage, CampaignRun, Lead
from tests.integration.campaign.inbound.test_handle import connection, upsert
from tests.integration.pipeline_helpers import assert_counters_match, make_world

EXCHANGE = "evolution_test"


@pytest.fixture
def events_settings(services):
    """Settings pointing the consumer at this run's vhost, with a per-test exchange and prefix."""
    prefix = f"evo{time.monotonic_ns() % 10**9}"
    return dataclasses.replace(
        get_settings(),
        evolution_events_rabbitmq_url=services["RABBITMQ_URL"],
        evolution_events_exchange=EXCHANGE,
        evolution_events_prefix=prefix,
        inbound_prefetch=50,
    )


@pytest.fixture
def consumer(clean_db, events_settings):
    c = InboundConsumer(events_settings)
    t = threading.Thread(target=c.run, name="inbound-test", daemon=True)
    t.start()
    assert c.ready.wait(15), "consumer did not start"
    yield c
    c.stop()
    t.join(15)
    assert not t.is_alive()


def _channel(settings):
    conn = pika.BlockingConnection(pika.URLParameters(settings.evolution_events_rabbitmq_url))
    return conn, conn.channel()


def publish(settings, docs, *, raw: list[bytes] | None = None) -> None:
    """Publish as Evolution does: to the topic exchange, routing key = the event name."""
    conn, ch = _channel(settings)
    ch.confirm_delivery()
    try:
        for doc in docs:
            ch.basic_publish(EXCHANGE, doc["event"], json.dumps(doc).encode())
        for body in raw or []:
            ch.basic_publish(EXCHANGE, "messages.upsert", body)
    finally:
        conn.close()


def queue_depths(settings) -> dict[str, int]:
    conn, ch = _channel(settings)
    try:
        out = {}
        for event in EVENTS:
            q = queue_name(settings.evolution_events_prefix, event)
            out[q] = ch.queue_declare(
                q, durable=True, arguments=dict(QUEUE_ARGUMENTS), passive=True
            ).method.message_count
        return out
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_queues_are_declared_as_evolution_declares_them(consumer, events_settings):
    """R-IN-1: quorum queues `{prefix}.{event}` bound to the topic exchange; Evolution declaring them
    again with its own arguments (durable, x-queue-type quorum) does not fail."""
    conn, ch = _channel(events_settings)
    try:
        # what Evolution's controller does on start (assertExchange + assertQueue + bindQueue)
        queues = declare_topology(ch, EXCHANGE, events_settings.evolution_events_prefix)
        assert queues == [f"{events_settings.evolution_events_prefix}.{e}" for e in EVENTS]
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.queue_declare(queues[0], durable=True)  # a classic declaration is refused: it IS quorum
        assert exc.value.reply_code == 406
    finally:
        if conn.is_open:
            conn.close()


def test_a_reply_and_a_connection_change_arrive_over_rabbitmq(consumer, events_settings):
    """R-IN-1/R-IN-7: a messages.upsert stops the lead's message; connection.update pauses the run."""
    w = make_world("amqp")
    m, _other = w.add_leads(2)  # the other keeps the run open
    lead = Lead.get_by_id(m.lead_id)
    publish(events_settings, [upsert(w.inboxes[0].instance_name, lead.phone, "Oi, tenho interesse")])
    wait_for(lambda: CampaignMessage.get_by_id(m.id).status == "skipped", what="the reply to apply")
    assert CampaignMessage.get_by_id(m.id).skip_reason == "replied"
    publish(events_settings, [connection(w.inboxes[0].instance_name, "close")])
    wait_for(lambda: CampaignRun.get_by_id(w.run.id).status == "paused", what="the run to pause")
    wait_for(lambda: sum(queue_depths(events_settings).values()) == 0, what="the queues to drain")


def test_poison_events_are_recorded_and_acked_never_redelivered(consumer, events_settings):
    """R-IN-1, T-SEC-1: unparsable or malformed events are recorded (no body, no apikey) and acked;
    the consumer keeps going and applies the next good event."""
    w = make_world("poison")
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    bad_shape = upsert(w.inboxes[0].instance_name, lead.phone, "x")
    del bad_shape["data"]["key"]
    bad_shape["apikey"] = "SECRET-APIKEY-123"
    publish(
        events_settings,
        [bad_shape, upsert(w.inboxes[0].instance_name, lead.phone, "Oi")],
        raw=[b"\xff\xfe not json", b"[1, 2", json.dumps("a string").encode()],
    )
    wait_for(lambda: CampaignMessage.get_by_id(m.id).status == "skipped", what="the good event")
    wait_for(lambda: consumer.stats.poison == 4, what="4 poison events")
    wait_for(lambda: sum(queue_depths(events_settings).values()) == 0, what="the queues to drain")
    rows = db.execute_sql(
        "SELECT text, details::text FROM campaign_events WHERE step = 'inbound' AND level = 'error'"
    ).fetchall()
    assert len(rows) == 4
    assert any("data.key" in text for text, _ in rows)
    assert not any("SECRET-APIKEY-123" in text + details for text, details in rows)
    time.sleep(0.5)
    assert consumer.stats.poison == 4  # acked: nothing came back


def _close_consumer_connections(settings) -> int:
    """Close the consumer's broker connection(s) as a broker restart would (rabbitmqctl)."""
    vhost = services.vhost_of(settings.evolution_events_rabbitmq_url)
    out = services.rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "vhost", "client_properties")
    closed = 0
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1] == vhost and "campaign-engine inbound" in fields[2]:
            services.rabbitmqctl("close_connection", fields[0], "test: E-38")
            closed += 1
    return closed


def test_e38_broker_connection_lost_mid_stream_loses_nothing_and_applies_nothing_twice(consumer, events_settings):
    """E-38: the consumer's broker connection is closed while 400 replies (and 100 duplicates) flow:
    it reconnects; every reply is applied exactly once (gate rows, skipped counters exact)."""
    w = make_world("e38")
    msgs = w.add_leads(400)
    phones = {m.id: Lead.get_by_id(m.lead_id).phone for m in msgs}
    inst = w.inboxes[0].instance_name
    docs = [upsert(inst, phones[m.id], "Oi", key=f"E38-{m.id}") for m in msgs]
    docs += docs[:100]  # duplicates, as a redelivering Evolution would send
    publisher = threading.Thread(target=publish, args=(events_settings, docs))
    publisher.start()
    wait_for(lambda: consumer.stats.applied >= 50, what="the stream to start")
    assert _close_consumer_connections(events_settings) >= 1
    publisher.join(60)
    wait_for(lambda: consumer.stats.reconnects >= 1, what="a reconnect")
    wait_for(lambda: CampaignRun.get_by_id(w.run.id).leads_skipped == 400, timeout=60, what="all 400 replies applied")
    wait_for(lambda: sum(queue_depths(events_settings).values()) == 0, what="the queues to drain")
    gate = db.execute_sql(
        "SELECT count(*) FROM inbound_events WHERE provider_message_id LIKE %s", ("E38-%",)
    ).fetchone()
    assert gate[0] == 400
    inbound = db.execute_sql("SELECT count(*) FROM conversation_messages WHERE direction = 'in'").fetchone()
    assert inbound[0] == 400
    assert CampaignRun.get_by_id(w.run.id).status == "completed"
    assert_counters_match(w.run.id)


def test_consumer_refuses_to_start_without_the_events_url(events_settings):
    """R-IN-1: an empty EVOLUTION_EVENTS_RABBITMQ_URL is a clear start-up error."""
    with pytest.raises(ConfigError, match="EVOLUTION_EVENTS_RABBITMQ_URL"):
        InboundConsumer(dataclasses.replace(events_settings, evolution_events_rabbitmq_url=""))
    env = {**os.environ, "EVOLUTION_EVENTS_RABBITMQ_URL": ""}
    proc = subprocess.run([sys.executable, "inbound.py"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "EVOLUTION_EVENTS_RABBITMQ_URL is empty" in proc.stderr


def test_fuzzed_amqp_bodies_are_all_acked_and_the_consumer_keeps_going(consumer, events_settings):
    """T-SEC-1, R-IN-1: 300 random bodies (bytes, JSON of any shape, mutated envelopes) on every
    queue: each is applied, ignored or recorded as poison and acked; no crash, no redelivery loop;
    a good reply afterwards still applies."""
    import random

    rng = random.Random(1234)
    w = make_world("fuzz")
    m, _keep = w.add_leads(2)
    lead = Lead.get_by_id(m.lead_id)
    inst = w.inboxes[0].instance_name
    templates = [upsert(inst, "+5511900000001", "Oi"), connection(inst, "open")]

    def mutate(doc):
        doc = json.loads(json.dumps(doc))
        for _ in range(rng.randint(1, 4)):
            target = doc if rng.random() < 0.3 else doc.get("data", doc)
            if not isinstance(target, dict) or not target:
                break
            k = rng.choice(list(target))
            target[k] = rng.choice([None, 0, -1, 1e308, "", "x" * rng.randint(1, 5000), [], {}, True, "\u0000"])
        return doc

    bodies = []
    for _ in range(300):
        r = rng.random()
        if r < 0.2:
            bodies.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
        elif r < 0.4:
            bodies.append(json.dumps(rng.choice([None, 1, "s", [1, {}], {"event": 5}])).encode())
        else:
            bodies.append(json.dumps(mutate(rng.choice(templates))).encode())
    conn, ch = _channel(events_settings)
    ch.confirm_delivery()
    for i, body in enumerate(bodies):
        ch.basic_publish(EXCHANGE, EVENTS[i % len(EVENTS)], body)
    conn.close()
    total = lambda: consumer.stats.applied + consumer.stats.ignored + consumer.stats.poison  # noqa: E731
    wait_for(lambda: total() >= 300, timeout=60, what="every fuzzed body handled")
    wait_for(lambda: sum(queue_depths(events_settings).values()) == 0, what="the queues to drain")
    publish(events_settings, [upsert(inst, lead.phone, "Oi")])
    wait_for(lambda: CampaignMessage.get_by_id(m.id).status == "skipped", what="a good reply after the fuzz")
    assert consumer.stats.poison > 50
    assert total() == 301
