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
import psycopg2
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


def test_a_batch_of_replies_never_deadlocks_with_a_send_recording_its_part(clean_db, services, events_settings, caplog):
    """R-IN-3, DESIGN #7, T-PERF-6: two replies in one broker batch, and just before the second lead's
    message is stopped a send records the part it just sent (part, message, then the run row: the
    send path's order). Had the batch's transaction already taken the run row (the first reply
    skipped a message of that run, one reply after the other), the send would wait for it holding
    the second lead's message, and the stop would wait for that message: a deadlock, one side
    aborted after deadlock_timeout (the send's recording lost, or the batch rolled back). The
    replies stop all their messages before any run row, so the send goes through at once."""
    import logging
    import uuid

    import campaign.inbound.consumer as consumer_module
    from campaign.outcomes import finish_message
    from tests.integration.campaign.inbound.test_handle import upsert

    w = make_world("deadlock")
    first, second = w.add_leads(2)
    attempt = uuid.uuid4()
    db.execute_sql("UPDATE campaign_messages SET status = 'sending', generated_text = 'x' WHERE id = %s", (second.id,))
    part_id = db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, attempt_id, sending_at)
           VALUES (%s, %s, 0, 'Olá!', 'sending', %s, now()) RETURNING id""",
        (second.id, second.inbox_id, str(attempt)),
    ).fetchone()[0]
    db.execute_sql(  # the split step creates the conversation the parts are logged in
        """INSERT INTO conversations (workspace_id, lead_id, inbox_id)
           SELECT %s, lead_id, inbox_id FROM campaign_messages WHERE run_id = %s""",
        (w.ws.id, w.run.id),
    )
    inst = w.inboxes[0].instance_name
    phones = {m.id: Lead.get_by_id(m.lead_id).phone for m in (first, second)}
    batch = [
        consumer_module._Delivery(tag, "messages.upsert", json.dumps(upsert(inst, phones[m.id], "Oi")).encode(), False)
        for tag, m in ((1, first), (2, second))
    ]
    send_error: list[BaseException] = []
    send_pid: list[int] = []
    send_done = threading.Event()

    def record_send() -> None:
        """What the send step does once the gateway accepted the part (its own connection)."""
        try:
            with db.connection_context():
                send_pid.append(db.connection().get_backend_pid())
                finish_message(
                    second.id, "sent", get_settings(), from_statuses=("sending",), last_part=(part_id, attempt, "K-2")
                )
        except BaseException as exc:  # noqa: B036 - reported by the test below
            send_error.append(exc)
        finally:
            send_done.set()

    watcher = psycopg2.connect(services["DATABASE_URL"])  # outside the consumer's transaction
    watcher.autocommit = True

    def send_is_waiting() -> bool:
        if not send_pid:
            return False
        with watcher.cursor() as cur:
            cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (send_pid[0],))
            row = cur.fetchone()
        return row is not None and row[0] == "Lock"

    import campaign.inbound.replies as replies_module

    real_stop = replies_module.stop_open_messages
    stops: list[list[int]] = []

    def send_then_stop(reasons, *args, **kwargs):
        if second.id in reasons:  # the send records its part first
            threading.Thread(target=record_send).start()
            wait_for(lambda: send_done.is_set() or send_is_waiting(), timeout=10, what="the send to record")
        stops.append(sorted(reasons))
        return real_stop(reasons, *args, **kwargs)

    class Channel:
        acks: list[tuple[int, bool]] = []

        def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            self.acks.append((delivery_tag, multiple))

    c = InboundConsumer(events_settings)
    caplog.set_level(logging.WARNING, logger="campaign.inbound.consumer")
    replies_module.stop_open_messages = send_then_stop
    try:
        c._apply_batch(Channel(), batch)
    finally:
        replies_module.stop_open_messages = real_stop
        watcher.close()
    assert send_done.wait(15)
    assert not send_error, f"the send could not record its part: {send_error[0]}"
    assert "rolled back" not in caplog.text
    assert c.stats.by_result == {"messages.upsert:reply": 2}
    assert Channel.acks == [(2, True)]
    assert CampaignMessage.get_by_id(first.id).status == "skipped"
    assert CampaignMessage.get_by_id(second.id).status == "sent"  # its only part went out before the reply
    assert_counters_match(w.run.id)


def test_receipts_in_one_statement_end_where_one_by_one_would(clean_db):
    """R-IN-7, R-OPS-5, T-PERF-6: the consumer applies a batch's receipts in one statement; for 300
    random batches (repeats, downgrades, ERROR, unknown ids, another instance's id) every part ends
    with the same delivery status and error mark as applying them one by one, and each result
    names the part (or `unknown`)."""
    import random

    from campaign.inbound import DeliveryUpdate, apply_update
    from campaign.inbound.receipts import apply_updates
    from tests.integration.test_webhook import make_parts

    rng = random.Random(14)
    ours = make_parts(6, prefix="ONE", instance="inst-one")
    twins = make_parts(6, prefix="TWO", instance="inst-two")  # the same keys on the other instance
    keys = [p.provider_message_id for p in ours]
    state_sql = """SELECT provider_message_id, delivery_status, delivery_error_at IS NOT NULL FROM message_parts
                    ORDER BY provider_message_id"""
    statuses = ("SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED", "ERROR")
    for _ in range(300):
        batch = [
            DeliveryUpdate(
                key_id=rng.choice([*keys, "NOPE-1", twins[0].provider_message_id]),
                status=rng.choice(statuses),
                instance=rng.choice(["inst-one", "inst-one", "inst-one", "inst-two"]),
                remote_jid=None,
                from_me=True,
            )
            for _ in range(rng.randint(1, 12))
        ]
        with db.atomic() as txn:
            for u in batch:
                apply_update(u)
            expected = db.execute_sql(state_sql).fetchall()
            txn.rollback()
        with db.atomic():
            results = apply_updates(batch)
        assert db.execute_sql(state_sql).fetchall() == expected
        assert len(results) == len(batch)
        for u, r in zip(batch, results):
            known = (
                u.instance == "inst-one"
                and u.key_id in keys
                or (u.instance == "inst-two" and u.key_id == twins[0].provider_message_id)
            )
            assert (r.result == "unknown") == (not known), (u, r)
            if known:
                assert r.part_id is not None and r.result in ("updated", "unchanged")


def test_acks_never_run_ahead_of_a_commit():
    """R-IN-1: a batch's transactions commit out of delivery order (receipts first, then each
    reply); an ack(multiple) only ever covers deliveries already committed."""
    import campaign.inbound.consumer as consumer_module

    class Channel:
        def __init__(self) -> None:
            self.acks: list[int] = []

        def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            assert multiple
            self.acks.append(delivery_tag)

    batch = [consumer_module._Delivery(tag, "q", b"{}", False) for tag in (11, 12, 13, 14, 15)]
    channel = Channel()
    acks = consumer_module._Acks(channel, batch)
    acks.committed([batch[0], batch[2], batch[4]])  # the receipts: 11, 13, 15
    assert channel.acks == [11]
    acks.committed([batch[3]])  # a reply, 14: 12 is not committed yet
    assert channel.acks == [11]
    acks.committed([batch[1]])
    assert channel.acks == [11, 15]
