"""Engine bugs found by the fault-injection suite (scripts/fault_suite.py), one focused test each.

Each test fails on the code before its fix; the docstring names the seed that exposed it.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import psycopg2

from campaign import ratelimit, recovery, steps
from campaign.db import db
from campaign.errors import Deferred, RetryLater
from campaign.settings import get_settings
from tests import factories as f
from tests.workers import terminate_backend


def _terminate_own_connection() -> None:
    """pg_terminate_backend of this thread's pooled connection, from a separate admin connection."""
    terminate_backend(db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])


def _lease(inbox_id: int) -> tuple:
    admin = psycopg2.connect(get_settings().database_url)
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT lease_token::text, last_at IS NOT NULL FROM rate_limits WHERE key = %s",
                (ratelimit.inbox_key(inbox_id),),
            )
            return cur.fetchone()
    finally:
        admin.close()


def test_inbox_lease_is_released_after_the_workers_connection_was_terminated(clean_db):
    """E-16 (chaos seed 1): a pg_terminate_backend under a send left the inbox's lease held, so the
    whole inbox stalled ~45 s (send_lease_seconds) after every connection termination. The
    release now retries on a fresh pooled connection."""
    import dramatiq
    from dramatiq.broker import MessageProxy

    from actors.middleware import RateLimits

    ws, _ = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1", min_gap_seconds=0)
    limiter = RateLimits(get_settings())
    seen: dict = {}

    def worker_thread() -> None:
        # as in a worker: DbConnection checks a pooled connection out per message, closes it after
        db.connect(reuse_if_open=True)
        try:
            grant = ratelimit.acquire_inbox(ibx.id, 100)
            seen["grant"] = grant
            limiter._local.grant = grant
            limiter.mark_sent()
            seen["leased"] = _lease(ibx.id)[0]
            _terminate_own_connection()
            limiter.after_process_message(cast(dramatiq.Broker, None), cast(MessageProxy, None))  # reads neither
        finally:
            try:
                db.close()
            except Exception:
                pass

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join(30)
    assert seen["grant"].granted and seen["leased"] == seen["grant"].token
    token, gap_started = _lease(ibx.id)
    assert token is None, "the inbox's send slot is still leased: the inbox stalls until it expires"
    assert gap_started  # the send counted: the min gap runs from it
    assert ratelimit.acquire_inbox(ibx.id, 100).granted


class _TerminatedDuringSend:
    """An Evolution client whose send succeeds while the worker's database connection is killed."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_text(self, instance: str, number: str, text: str):
        from clients.evolution import SendResult

        _terminate_own_connection()  # the E-16 fault, at the worst moment: mid-call
        self.sent.append(text)
        return SendResult(key_id=f"KEY-{len(self.sent)}", remote_jid=None, status="PENDING", raw={})

    def connection_state(self, instance: str) -> str:
        return "open"


def test_a_send_that_succeeded_is_recorded_sent_even_if_the_connection_died_meanwhile(clean_db):
    """E-16 / T-REL-1 (chaos seed 1): the worker's connection was terminated while it waited for
    Evolution's answer; recording the known outcome then failed, so the part stayed `sending` and
    the next delivery made it `in_doubt` although the send had been confirmed (a false in_doubt
    the operator must resolve by hand). A statement outside a transaction now runs once more on a
    fresh connection."""
    import pipeline
    from models import CampaignMessage, MessagePart
    from tests.pipeline_helpers import assert_counters_match, fast_settings, make_world

    w = make_world()
    (msg,) = w.add_leads(1)
    CampaignMessage.update(status="sending", generated_text="Olá, tudo bem? Uma ideia rápida.").where(
        CampaignMessage.id == msg.id
    ).execute()
    MessagePart.create(message=msg.id, inbox=w.inboxes[0].id, idx=0, text="Olá, tudo bem? Uma ideia rápida.")
    evo = _TerminatedDuringSend()

    outcome = pipeline.send_step(msg.id, fast_settings(), evo)

    assert outcome.sent and len(evo.sent) == 1
    part = MessagePart.get(MessagePart.message == msg.id)
    assert (part.status, part.provider_message_id) == ("sent", "KEY-1")
    assert CampaignMessage.get_by_id(msg.id).status == "sent"
    assert_counters_match(w.run.id)


def _sending_message(text: str = "Olá, tudo bem? Uma ideia rápida para a sua loja."):
    """A world with one message in `sending` and one pending part."""
    from models import CampaignMessage, MessagePart
    from tests.pipeline_helpers import make_world

    w = make_world()
    (msg,) = w.add_leads(1)
    CampaignMessage.update(status="sending", generated_text=text).where(CampaignMessage.id == msg.id).execute()
    MessagePart.create(message=msg.id, inbox=w.inboxes[0].id, idx=0, text=text)
    return w, msg


def test_a_duplicate_delivery_honours_the_retry_after_of_an_earlier_attempt(sb, evo, clean_db):
    """E-10 / T-REL-1 (chaos seed 1, 3 early requests): a send got 429 + Retry-After and waited
    in its delayed retry, but another delivery of the same message (a copy made by the recovery
    sweep, a RabbitMQ redelivery) sent the part again at once. The Retry-After now lives in
    PostgreSQL and every delivery honours it."""
    import time

    import pipeline
    from models import MessagePart
    from tests.pipeline_helpers import fast_settings

    settings = fast_settings()
    w, msg = _sending_message()
    sb.set_faults(send={"always_status": 429}, retry_after=1.0)
    try:
        pipeline.send_step(msg.id, settings, evo)
        raise AssertionError("a 429 must be retried later")
    except RetryLater as exc:
        first_retry = exc.delay
    assert first_retry >= 1.0
    sb.set_faults(send={"always_status": None})

    # the duplicate delivery, right away: it must wait too, without calling Evolution (and
    # without spending an attempt: the wait is the provider's, R-RATE-2)
    try:
        pipeline.send_step(msg.id, settings, evo)
        raise AssertionError("the duplicate sent before the Retry-After elapsed")
    except Deferred as exc:
        assert 0.5 < exc.delay <= 1.1, exc.delay
        time.sleep(exc.delay)
    assert sum(sb.summary()["by_route"]["send"].values()) == 1  # the 429 only

    outcome = pipeline.send_step(msg.id, settings, evo)  # after the Retry-After: sent
    assert outcome.sent
    summary = sb.summary()
    assert summary["early_retries"] == 0 and summary["sends"] == 1
    assert MessagePart.get(MessagePart.message == msg.id).status == "sent"


def test_a_message_waiting_behind_a_busy_inbox_is_not_copied_by_the_recovery_sweep(clean_db):
    """R-FAIL-8 (chaos seed 1): a send deferred again and again by its busy inbox (short waits
    each) never looked alive to the sweep, which re-enqueued a copy every lease; the copies
    joined the pollers, slowed the inbox further (more copies) and sent parts early after a
    429. Every deferral now keeps the row fresh when it would otherwise look stale."""
    import time
    import types

    import dramatiq
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware import SkipMessage

    from actors.middleware import RateLimits
    from tests.pipeline_helpers import fast_settings

    settings = fast_settings()  # lease 5 s
    w, msg = _sending_message()
    db.execute_sql(
        "UPDATE campaign_messages SET status_changed_at = now() - interval '4 seconds' WHERE id = %s", (msg.id,)
    )
    assert ratelimit.acquire_inbox(w.inboxes[0].id, 100).granted  # another send holds the inbox

    class Broker:
        enqueued: list = []

        def get_actor(self, name):
            return types.SimpleNamespace(options={"rate_limit": "inbox"})

        def enqueue(self, message, delay=None):
            self.enqueued.append((message, delay))

    broker = Broker()
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=steps.SEND_PART.queue, actor_name="send_part", args=(msg.id, w.inboxes[0].id), kwargs={}, options={}
    )
    try:
        # the stand-in has only what the hook calls (get_actor, enqueue); a worker passes a MessageProxy
        RateLimits(settings).before_process_message(cast(dramatiq.Broker, broker), MessageProxy(message))
        raise AssertionError("the inbox is busy: the message must be deferred")
    except SkipMessage:
        pass
    assert len(broker.enqueued) == 1 and broker.enqueued[0][1] < 5000  # a short wait

    time.sleep(2.0)  # without the refresh the row is now 6.5 s old: past the 5 s lease
    copies: list = []
    recovery.recovery_sweep(settings, publish=lambda queue, args: copies.extend(args))
    assert copies == [], "the sweep copied a message that was only waiting its turn"
