"""actors.middleware (RateLimits) on the real PostgreSQL: engine bugs found by the fault-injection suite
(scripts/fault_suite.py), one focused test each.

Each test fails on the code before its fix; the docstring names the seed that exposed it.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import psycopg2

from campaign import ratelimit, recovery, steps
from campaign.db import db
from campaign.settings import get_settings
from tests.integration import factories as f
from tests.integration.pipeline_helpers import sending_message
from tests.integration.workers import terminate_own_connection


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


class _NoGateway:
    """The send must not reach the gateway in these tests: any call is a failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the gateway was called ({name}) although the inbox's slot was refused")


def _deliver(limiter: Any, broker: Any, message: Any, settings: Any) -> None:
    """A send delivery as a worker runs it: the pacing hook, then the step asking for its slot."""
    import pipeline

    limiter.before_process_message(broker, message)
    pipeline.send_step(message.args[0], settings, cast(Any, _NoGateway()), pace=limiter.slot_refused)


def test_inbox_lease_is_released_after_the_workers_connection_was_terminated(clean_db):
    """E-16 (chaos seed 1): a pg_terminate_backend under a send left the inbox's lease held, so the
    whole inbox stalled ~45 s (send_lease_seconds) after every connection termination. The
    release now retries on a fresh pooled connection."""

    ws, _ = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1", min_gap_seconds=0)
    seen: dict = {}

    def worker_thread() -> None:
        # as in a worker: DbConnection checks a pooled connection out per message, closes it after
        db.connect(reuse_if_open=True)
        try:
            grant = ratelimit.acquire_inbox(ibx.id, 100)
            seen["grant"] = grant
            seen["leased"] = _lease(ibx.id)[0]
            terminate_own_connection()
            # what the send step does on its way out when its record could not release the slot
            ratelimit.release_inbox(grant, sent=True)
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
    from tests.integration.pipeline_helpers import fast_settings

    settings = fast_settings()  # lease 5 s
    w, msg = sending_message()
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
        # the stand-in has only what the hooks call (get_actor, enqueue); a worker passes a MessageProxy
        _deliver(RateLimits(settings), cast(dramatiq.Broker, broker), MessageProxy(message), settings)
        raise AssertionError("the inbox is busy: the message must be deferred")
    except SkipMessage:
        pass
    assert len(broker.enqueued) == 1 and broker.enqueued[0][1] < 5000  # a short wait

    time.sleep(2.0)  # without the refresh the row is now 6.5 s old: past the 5 s lease
    copies: list = []
    recovery.recovery_sweep(settings, publish=lambda queue, args: copies.extend(args))
    assert copies == [], "the sweep copied a message that was only waiting its turn"


def test_a_send_held_by_a_cap_past_the_horizon_goes_back_to_pending_not_to_the_delay_queue(clean_db):
    """R-DISP-2 / issue 22: a not-started message whose inbox's daily cap is spent waits in PostgreSQL
    (`pending`, due when the cap has room, text and parts kept), not in a `.DQ` loop; a message whose
    first part went out keeps its place (it finishes on its inbox)."""
    import types

    import dramatiq
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware import SkipMessage

    from actors.middleware import RateLimits
    from models import CampaignMessage, MessagePart
    from tests.integration.pipeline_helpers import fast_settings

    settings = fast_settings()
    w, msg = sending_message()
    ibx = w.inboxes[0]
    db.execute_sql("UPDATE inboxes SET max_per_day = 1 WHERE id = %s", (ibx.id,))
    other = f.message(w.run, f.lead(w.ws, w.cols["New"]), inbox=ibx.id, status="sent", sent_at=db_now())
    MessagePart.create(
        message=other.id, inbox=ibx.id, idx=0, text="x", status="sent", sending_at=db_now(), sent_at=db_now()
    )

    class Broker:
        enqueued: list = []

        def get_actor(self, name):
            return types.SimpleNamespace(options={"rate_limit": "inbox"})

        def enqueue(self, message, delay=None):
            self.enqueued.append((message, delay))

    def attempt() -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=steps.SEND_PART.queue, actor_name="send_part", args=(msg.id, ibx.id), kwargs={}, options={}
        )
        try:
            _deliver(RateLimits(settings), cast(dramatiq.Broker, Broker()), MessageProxy(message), settings)
            raise AssertionError("the daily cap is spent: the message must not run")
        except SkipMessage:
            pass

    attempt()
    back = CampaignMessage.get_by_id(msg.id)
    assert back.status == "pending" and back.generated_text  # its text kept for when it is dispatched again
    assert (back.scheduled_at - db_now()).total_seconds() > 23 * 3600
    assert Broker.enqueued == []
    assert [p.status for p in MessagePart.select().where(MessagePart.message == msg.id)] == ["pending"]

    # started (a part out): it stays `sending` and waits in the delay queue / PostgreSQL as before
    db.execute_sql("UPDATE campaign_messages SET status = 'sending' WHERE id = %s", (msg.id,))
    MessagePart.create(message=msg.id, inbox=ibx.id, idx=1, text="y", status="pending")
    db.execute_sql(
        "UPDATE message_parts SET status = 'sent', sent_at = now(), sending_at = now() - interval '1 minute' "
        "WHERE message_id = %s AND idx = 0",
        (msg.id,),
    )
    attempt()
    assert CampaignMessage.get_by_id(msg.id).status == "sending"


def db_now():
    return db.execute_sql("SELECT now()").fetchone()[0]
