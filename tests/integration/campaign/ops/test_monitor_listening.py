"""``status`` shows what the engine heard (R-OPS-1, R-IN-1/2/4): replies, opt-outs, messages from
unknown numbers and unusable events, in the last 24 h and in total, from one indexed query.

The rows are made by the real paths: ``campaign.inbound.handle`` for Evolution's envelopes, and the
RabbitMQ consumer (``InboundConsumer`` on this run's vhost) for the events it cannot use."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
import time

import pika
import pytest

from campaign.db import db
from campaign.inbound import handle
from campaign.inbound.consumer import InboundConsumer
from campaign.ops import cli, monitor
from campaign.settings import get_settings
from models import Lead
from tests.integration.campaign.inbound.test_handle import upsert
from tests.integration.pipeline_helpers import fast_settings, make_world

EXCHANGE = "evolution_listening_test"


@pytest.fixture
def consumer(clean_db, services):
    """The real consumer on this run's vhost, with its own exchange and queue prefix."""
    settings = dataclasses.replace(
        get_settings(),
        evolution_events_rabbitmq_url=services["RABBITMQ_URL"],
        evolution_events_exchange=EXCHANGE,
        evolution_events_prefix=f"lst{time.monotonic_ns() % 10**9}",
    )
    c = InboundConsumer(settings)
    t = threading.Thread(target=c.run, name="inbound-listening-test", daemon=True)
    t.start()
    assert c.ready.wait(15), "consumer did not start"
    yield c
    c.stop()
    t.join(15)
    assert not t.is_alive()


def _publish_raw(consumer: InboundConsumer, bodies: list[bytes]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(consumer.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(EXCHANGE, "messages.upsert", body)
    finally:
        conn.close()


def _backdate(sql: str, *params: object) -> None:
    """Move one recorded row two days back (the 24 h column must leave it out, the total not)."""
    assert len(db.execute_sql(sql, params).fetchall()) == 1, (sql, params)


@pytest.fixture
def heard(consumer):
    """Replies (one of them two days old, one delivered twice), an opt-out, unknown numbers (one
    old), a group message (ignored), and two unusable events (one old) consumed from RabbitMQ."""
    settings = fast_settings()
    w = make_world("mon")
    a, b, c, _d = (Lead.get_by_id(m.lead_id) for m in w.add_leads(4))
    inbox = w.inboxes[0].instance_name
    twice = upsert(inbox, a.phone, "Oi, tenho interesse", key="A1")
    assert handle(twice, settings).result == "reply"
    assert handle(twice, settings).result == "duplicate"  # E-30: counted once
    assert handle(upsert(inbox, b.phone, "PARE"), settings).result == "opt_out"
    assert handle(upsert(inbox, c.phone, "Quero saber mais", key="OLD-REPLY"), settings).result == "reply"
    assert handle(upsert(inbox, "+5511955554444", "Quem é?"), settings).result == "unknown_sender"
    assert handle(upsert(inbox, "+5511955553333", "Oi?", key="OLD-UNKNOWN"), settings).result == "unknown_sender"
    group = upsert(inbox, a.phone, "Oi grupo")
    group["data"]["key"]["remoteJid"] = "120363025246125888@g.us"
    assert handle(group, settings) == "a group message"
    _publish_raw(consumer, [b"\xff\xfe not json", b'{"event": "messages.upsert", "instance": 7}'])
    deadline = time.monotonic() + 30
    while consumer.stats.poison < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert consumer.stats.poison == 2, consumer.stats
    update = (
        "UPDATE inbound_events SET created_at = now() - interval '2 days' WHERE provider_message_id = %s RETURNING id"
    )
    _backdate(update, "OLD-REPLY")
    _backdate(update, "OLD-UNKNOWN")
    _backdate(
        """UPDATE campaign_events SET created_at = now() - interval '2 days'
            WHERE id = (SELECT min(id) FROM campaign_events WHERE step = 'inbound' AND level = 'error')
        RETURNING id"""
    )
    return w


EXPECTED = dict(
    replies_24h=2,
    replies_total=3,
    opt_outs_24h=1,
    opt_outs_total=1,
    unknown_24h=1,
    unknown_total=2,
    unusable_24h=1,
    unusable_total=2,
)


def test_counts_replies_opt_outs_unknown_and_unusable(heard):
    """Replies include the opt-out; a duplicate counts once (E-30); an ignored group message is no
    inbound message; unusable = the consumer's poison records; 24 h leaves the old rows out."""
    now = dt.datetime.now(dt.UTC)
    got = monitor.listening(now=now)
    assert {k: v for k, v in dataclasses.asdict(got).items() if k != "last_at"} == EXPECTED
    assert got.last_at is not None and now - dt.timedelta(minutes=1) < got.last_at <= now
    snap = monitor.status_snapshot(get_settings(), with_queues=False, now=now)
    assert snap.listening == got


def _render(snap: monitor.StatusSnapshot) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200, color_system=None, force_terminal=False).print(cli.render_status(snap))
    return out.getvalue()


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if label in line)
    return line.replace("│", " ").replace(label, "").split()


def test_status_shows_the_listening_section(heard, capsys):
    text = _render(monitor.status_snapshot(get_settings(), with_queues=False))
    assert "listening (inbound messages)" in text
    assert _row(text, "replies from leads (opt-outs included)") == ["2", "3"]
    assert _row(text, "  opt-outs") == ["1", "1"]
    assert _row(text, "from unknown numbers (no lead)") == ["1", "2"]
    assert _row(text, "unusable events (recorded, acked)") == ["1", "2"]
    assert "last inbound message event " in text and " s ago)" in text
    assert cli.main(["status", "--no-queues"]) == 0
    out = capsys.readouterr().out
    assert "listening (inbound messages)" in out and _row(out, "from unknown numbers (no lead)") == ["1", "2"]


def test_nothing_heard_yet(clean_db):
    got = monitor.listening()
    assert dataclasses.asdict(got) == {**{k: 0 for k in EXPECTED}, "last_at": None}
    assert "no inbound message event yet" in _render(monitor.status_snapshot(get_settings(), with_queues=False))


def test_one_query_on_indexes(clean_db):
    """The 24 h counts read a range of inbound_events' created_at index; the unusable events come
    from the partial index that holds only them (schema V8), never a scan of the event log."""
    db.execute_sql("SET enable_seqscan = off")  # tiny tables: make the planner show what fits
    try:
        plan = "\n".join(
            r[0]
            for r in db.execute_sql(
                "EXPLAIN " + monitor._LISTENING_SQL, {"since": dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)}
            ).fetchall()
        )
    finally:
        db.execute_sql("SET enable_seqscan = on")
    assert "campaign_events_inbound_errors_idx" in plan, plan
    assert "inbound_events_created_idx" in plan, plan
