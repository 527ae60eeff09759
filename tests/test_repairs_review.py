"""Second read of the operator repairs (dead letters, resolve, webhook): regressions on real services.

Each test here failed on the code as first landed (027a20a, 9bd818f) and names the defect it pins.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pika
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL

import pipeline
from campaign import steps
from campaign.errors import RepairRefused
from campaign.ops import dead_letters, repairs
from campaign.settings import get_settings
from tests.test_deadletters import _args, _Capture, _raw_dramatiq, dead_letter_via_rabbitmq, queues  # noqa: F401


def _xq_depth(name: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    try:
        return conn.channel().queue_declare(queue=name, passive=True).method.message_count
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# XQ browsing: a missing XQ must not cost the messages already held (delivery tags are per channel)


def test_missing_xq_between_two_browsed_ones_never_acks_another_dead_letter(queues):  # noqa: F811
    """campaign.split.XQ missing (deleted by hand, or never declared on a fresh broker): the browser
    used to re-open its channel, which silently returned the generate copies it held AND restarted
    the delivery tags at 1, so acking the generate copy removed the send copy instead: a dead letter
    lost for good (this one had no PostgreSQL row to fall back on)."""
    gen_body = _raw_dramatiq("generate", [424201])
    send_body = _raw_dramatiq("send_part", [424202, 7])
    dead_letter_via_rabbitmq(gen_body, "campaign.generate")
    dead_letter_via_rabbitmq(send_body, "campaign.send")
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    try:
        conn.channel().queue_delete("campaign.split.XQ")
        try:
            browser = dead_letters.XqBrowser(get_settings()).open()
            try:
                got = browser.browse(steps.QUEUES)
                assert sorted(m.actor or "" for m in got) == ["generate", "send_part"]
                (gen,) = [m for m in got if m.actor == "generate"]
                browser.ack(gen)  # what --purge/--requeue of the generate dead letter does
            finally:
                browser.close()
            depths = (_xq_depth("campaign.generate.XQ"), _xq_depth("campaign.send.XQ"))
            assert depths == (0, 1), f"generate.XQ, send.XQ = {depths}: expected the acked copy gone, the other kept"
        finally:
            conn.channel().queue_declare(
                "campaign.split.XQ", durable=True, arguments={"x-message-ttl": DEAD_MESSAGE_TTL}
            )
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# webhook: a sender trickling its request must not hold a thread (and SIGTERM) forever


@pytest.fixture
def fast_webhook():
    """An in-process receiver whose request head and body each have a 3 s deadline."""
    import webhook

    server = webhook.WebhookServer(
        ("127.0.0.1", 0), "s3cret-" + uuid.uuid4().hex, head_timeout=3.0, body_timeout=3.0, threads=4
    )
    server.start()
    yield server
    # the shutdown waits for open connections: it must not hang on a trickling sender
    closer = threading.Thread(target=server.shutdown, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "shutdown hung on a trickling connection"


def _trickle(sock: socket.socket, head: bytes, byte_every: float, for_seconds: float) -> float | None:
    """Send ``head``, then one body byte every ``byte_every`` s; return when the server closed, or None."""
    started = time.monotonic()
    sock.sendall(head)
    sock.settimeout(byte_every)
    while time.monotonic() - started < for_seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        try:
            sock.sendall(b" ")
        except OSError:
            return time.monotonic() - started
    return None


@pytest.mark.parametrize(
    "head",
    [
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Padding: ",  # headers that never end
    ],
    ids=["trickled-body", "trickled-headers"],
)
def test_webhook_trickling_sender_is_cut_off_at_the_request_deadline(fast_webhook, head):
    """A 15 s socket timeout is per recv: one byte every few seconds kept the connection and its
    thread for as long as the sender liked (256 KiB at 1 B/10 s: a month), and kept SIGTERM's
    server_close waiting for it. Thousands of such connections exhaust the threads."""
    host, port = fast_webhook.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        closed_after = _trickle(sock, head, byte_every=0.3, for_seconds=8.0)
    assert closed_after is not None, "the receiver kept a trickling connection open for 8 s"
    assert closed_after < 5.0, f"closed only after {closed_after:.1f} s (deadline 3 s)"


def test_webhook_silent_connection_is_closed_at_the_head_deadline(fast_webhook):
    """uvicorn arms no timer on a new connection (only between requests): a connection that never
    sends a byte stayed open for ever, and thousands of them exhaust the connection limit."""
    host, port = fast_webhook.server_address[:2]
    with socket.create_connection((host, port), timeout=8) as sock:
        started = time.monotonic()
        try:
            assert sock.recv(4096) == b""
        except ConnectionResetError:
            pass
        closed_after = time.monotonic() - started
    assert 2.0 < closed_after < 5.0, f"closed after {closed_after:.1f} s (deadline 3 s)"


# --------------------------------------------------------------------------------------------
# resolve --resend must never resend a part the provider is known to have accepted (R-PIPE-5)


def test_resolve_resend_refuses_a_part_evolution_accepted(queues, evo):  # noqa: F811
    """A send that answered after its part had been marked in_doubt keeps the provider's key id on
    the part (pipeline._record_sent_part: "keep the provider's id anyway"), and the webhook then
    records its delivery: proof it went out. ``resolve --resend`` ignored that proof and sent the
    part a second time. It must refuse, name the part and its key, and change nothing."""
    from models import CampaignMessage, MessagePart
    from tests.pipeline_helpers import assert_counters_match, fast_settings, make_world, run_counters
    from tests.test_resolve import in_doubt_message

    s = fast_settings()
    w = make_world()
    w.add_leads(1)
    m = in_doubt_message(w, evo, s, ["Oi!", "Tudo bem?"], doubt_idx=0)
    part = MessagePart.get(MessagePart.message == m.id, MessagePart.idx == 0)
    assert part.status == "in_doubt"
    key = "KEYLATE" + uuid.uuid4().hex[:8]
    assert part.attempt_id is not None  # set when the send started
    pipeline._record_sent_part(part.id, part.attempt_id, key)  # the late answer of the interrupted send
    assert MessagePart.get_by_id(part.id).provider_message_id == key
    before = (
        run_counters(w.run.id),
        [(p.status, p.provider_message_id) for p in MessagePart.select().where(MessagePart.message == m.id)],
    )

    published: list = []
    with pytest.raises(RepairRefused) as refused:
        dead_letters.resolve(m.id, "resend", s, out=_Capture(), publish=lambda q, a: published.append((q, a)))
    assert "#1" in str(refused.value) and key in str(refused.value) and "--sent" in str(refused.value)
    assert published == []
    assert CampaignMessage.get_by_id(m.id).status == "in_doubt"
    assert (
        run_counters(w.run.id),
        [(p.status, p.provider_message_id) for p in MessagePart.select().where(MessagePart.message == m.id)],
    ) == before

    # --sent is the verdict the evidence supports: part 1 kept as sent, part 2 goes out
    repair = repairs.resolve_in_doubt(m.id, "sent", s)
    assert repair.publish == ("campaign.send", (m.id, m.inbox_id))
    assert [p.status for p in MessagePart.select().where(MessagePart.message == m.id).order_by(MessagePart.idx)] == [
        "sent",
        "pending",
    ]
    assert_counters_match(w.run.id)
