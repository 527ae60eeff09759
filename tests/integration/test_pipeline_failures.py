"""Failure paths of the chain (issue 12): gateway outages, disconnects mid-message, crashes next to
a decision, Retry-After scopes, parked waits, lost hand-offs. Real PostgreSQL and the sandbox over
real HTTP; E-23 also on real RabbitMQ with real worker processes. Each test fails on the code
before issue 12.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import peewee
import pytest

import pipeline
from campaign import dispatch, outcomes, ratelimit, recovery, runs
from campaign.db import db
from campaign.errors import Deferred, RetryLater, StepFailed
from campaign.settings import get_settings
from models import CampaignMessage, Inbox, Lead
from tests.integration.pipeline_helpers import (
    assert_counters_match,
    claim,
    drive,
    fast_settings,
    make_world,
    parts_of,
    run_counters,
    to_sending,
)
from tests.integration.test_pipeline_steps import _two_part_message
from tests.integration.test_pipeline_workers import engine  # noqa: F401  (real worker processes fixture)


@pytest.fixture
def settings():
    return fast_settings()


def _sends(sb) -> list[dict]:
    return sb.ledger()["sends"]


def _inbox(inbox_id: int) -> Inbox:
    return Inbox.get_by_id(inbox_id)


# --------------------------------------------------------------------------------------------
# R-FAIL-6 / E-23: gateway trouble is not the number's fault


def test_e23_gateway_5xx_burst_longer_than_the_failure_limit_disables_nothing(engine, sb):  # noqa: F811
    """E-23 on real workers: the gateway answers 500 to every send for 4 s, far more failures
    than INBOX_FAILURE_LIMIT=2; nothing is disabled, no message fails before its attempts are
    spent (none here), the sends resume when the gateway does and the run completes."""
    w = make_world(n_inboxes=1)
    w.add_leads(6)
    sb.set_faults(send={"always_status": 500})
    timer = threading.Timer(4.0, lambda: sb.set_faults(send={"always_status": None}))
    timer.start()
    try:
        engine.start(
            processes=1,
            threads=4,
            INBOX_FAILURE_LIMIT="2",
            MAX_ATTEMPTS="3",
            MIN_BACKOFF_SECONDS="0.2",
            MAX_BACKOFF_SECONDS="1",
        )
        engine.dispatch_all()
        engine.wait_terminal(timeout=90)
    finally:
        timer.cancel()
    by_status = sb.summary()["by_route"]["send"]
    refused = sum(n for k, n in by_status.items() if "500" in k)
    assert refused > 2, f"the outage must outlast the failure limit (got {refused} refusals)"
    inbox = _inbox(w.inboxes[0].id)
    assert (inbox.disabled, inbox.consecutive_failures) == (False, 0)
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_sent"], c["leads_failed"]) == ("completed", 6, 0), c
    assert_counters_match(w.run.id)


def test_gateway_trouble_holds_the_instance_and_spends_no_attempt_after_the_first(clean_db, sb, llm, evo, settings):
    """R-FAIL-2/R-FAIL-6: the first 5xx of a streak counts for its message; the next ones hold the
    whole instance (no send of it before the hold ends) and are waited out, not counted."""
    w = make_world(n_inboxes=2)
    m1, m2 = w.add_leads(2)
    for m in (m1, m2):
        to_sending(m.id, settings, llm)
    sb.set_faults(send={"always_status": 503})
    with pytest.raises(RetryLater):
        pipeline.send_step(m1.id, settings, evo)
    with pytest.raises(Deferred) as waited:
        pipeline.send_step(m2.id, settings, evo)
    assert waited.value.delay > 0
    assert [CampaignMessage.get_by_id(m.id).attempts for m in (m1, m2)] == [1, 0]
    inbox = _inbox(w.inboxes[0].id)
    assert (inbox.gateway_failures, inbox.consecutive_failures, inbox.disabled) == (2, 0, False)
    held = ratelimit.acquire_inbox(w.inboxes[0].id, 30)
    assert not held.granted and held.wait > 0  # the instance is held for everyone
    assert ratelimit.acquire_inbox(w.inboxes[1].id, 30).granted  # another inbox is not
    sb.set_faults(send={"always_status": None})
    assert drive(m2.id, settings, llm, evo) == "sent"
    inbox = _inbox(w.inboxes[0].id)
    assert (inbox.gateway_failures, inbox.gateway_trouble_since) == (0, None)  # a success ends the streak


def test_real_send_failures_still_disable_the_inbox(clean_db, sb, llm, evo):
    """R-FAIL-6: 401 of the instance is this number's failure: N in a row disable it (and pause)."""
    settings = fast_settings(inbox_failure_limit=2)
    w = make_world()
    msgs = w.add_leads(2)
    sb.set_faults(send={"always_status": 401})
    for m in msgs:
        claim(m.id)
        drive(m.id, settings, llm, evo)
        runs.resume_paused_run(w.run.id, "provider_auth")
    inbox = _inbox(w.inboxes[0].id)
    assert inbox.disabled and inbox.consecutive_failures == 2
    assert run_counters(w.run.id)["pause_reason"] == "inbox_disabled"


def test_connection_closed_while_the_state_says_open_is_a_real_failure(clean_db, sb, llm, evo, settings):
    """R-FAIL-6: Evolution's "Connection Closed" while connectionState answers open counts."""
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    # the instance is not in disconnected_instances (state: open) but its sends are refused so
    orig = evo.send_text

    def closed(instance, number, text):
        from campaign.errors import ProviderUnavailable

        raise ProviderUnavailable(
            "evolution sendText: HTTP 400: Connection Closed",
            provider="evolution",
            status_code=400,
            code="instance_disconnected",
        )

    evo.send_text = closed
    try:
        with pytest.raises(RetryLater):
            pipeline.send_step(m.id, settings, evo)
    finally:
        evo.send_text = orig
    assert _inbox(w.inboxes[0].id).consecutive_failures == 1


# --------------------------------------------------------------------------------------------
# E-24: a disconnect mid-message waits, then goes on at the next part


def test_e24_disconnect_after_part_one_waits_and_sends_the_rest_after_reconnection(clean_db, sb, llm, evo, settings):
    w = make_world(split=True, max_parts=3)
    m1 = _two_part_message(w, settings, llm)
    assert pipeline.send_step(m1.id, settings, evo).sent  # part 1 reached the lead
    sb.set_faults(disconnected_instances=[w.inboxes[0].instance_name])
    db.execute_sql("UPDATE inboxes SET state_checked_at = NULL")  # the engine learns it on the next send
    out = pipeline.send_step(m1.id, settings, evo)
    assert not out.sent
    m = CampaignMessage.get_by_id(m1.id)
    assert m.status == "sending", "a started message never fails or restarts because of a disconnect"
    assert m.wake_at > dt.datetime.now(dt.UTC)  # parked in PostgreSQL
    assert run_counters(w.run.id)["pause_reason"] == "inbox_disconnected"
    inbox = _inbox(w.inboxes[0].id)
    assert (inbox.consecutive_failures, inbox.disabled, inbox.connection_state) == (0, False, "close")
    # still down: the next wake-up parks it again without calling sendText
    before = len(_sends(sb))
    pipeline.send_step(m1.id, settings, evo)
    assert len(_sends(sb)) == before and CampaignMessage.get_by_id(m1.id).status == "sending"

    sb.set_faults(disconnected_instances=[])
    assert recovery.check_inboxes(settings, evo)["resumed"] == [w.run.id]
    swept: list = []
    recovery.recovery_sweep(settings, publish=lambda q, args: swept.extend((q, a) for a in args))
    assert swept == [("campaign.send", (m1.id, m1.inbox_id))]  # woken by the reconnection
    assert drive(m1.id, settings, llm, evo) == "sent"
    sent_texts = [s["text"] for s in _sends(sb)]
    assert sent_texts == [p.text for p in parts_of(m1.id)]  # each part once, in order: no duplicate
    assert Lead.get_by_id(m1.lead_id).column_id == w.cols["Contacted"].id  # not a "first message" again
    assert_counters_match(w.run.id)


def test_e07_a_message_not_started_goes_back_to_wait_without_calling_send(clean_db, sb, llm, evo, settings):
    """R-PIPE-3: a known fresh 'close' state stops the send before any sendText."""
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    db.execute_sql("UPDATE inboxes SET connection_state = 'close', state_checked_at = now()")
    pipeline.send_step(m.id, settings, evo)
    assert CampaignMessage.get_by_id(m.id).status == "pending"
    assert sb.summary()["by_route"].get("send", {}) == {}
    assert sb.summary()["by_route"].get("state", {}) == {}  # fresh knowledge: no poll either


# --------------------------------------------------------------------------------------------
# E-25: a part left `sending` by a crash is settled in doubt before any other check


def _crashed_mid_send(w, settings, llm):
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    db.execute_sql(
        "UPDATE message_parts SET status = 'sending', attempt_id = gen_random_uuid(), "
        "sending_at = now() WHERE message_id = %s",
        (m.id,),
    )
    return m


@pytest.mark.parametrize("change", ["cancelled", "window_closed", "lead_moved", "opted_out", "lead_deleted"])
def test_e25_crash_mid_send_then_a_decision_is_in_doubt_never_skipped(clean_db, sb, llm, evo, settings, change):
    w = make_world()
    m = _crashed_mid_send(w, settings, llm)
    if change == "cancelled":
        runs.cancel_run(w.run.id)
    elif change == "window_closed":
        db.execute_sql("UPDATE campaign_runs SET run_date = run_date - 2 WHERE id = %s", (w.run.id,))
    elif change == "lead_moved":
        Lead.update(column=w.cols["Replied"]).where(Lead.id == m.lead_id).execute()
    elif change == "opted_out":
        Lead.update(opted_out=True).where(Lead.id == m.lead_id).execute()
    else:
        Lead.delete().where(Lead.id == m.lead_id).execute()
    pipeline.send_step(m.id, settings, evo)
    msg = CampaignMessage.get_by_id(m.id)
    assert msg.status == "in_doubt", (change, msg.status, msg.skip_reason, msg.error_class)
    assert [p.status for p in parts_of(m.id)] == ["in_doubt"]
    assert _sends(sb) == []
    c = run_counters(w.run.id)
    assert (c["leads_in_doubt"], c["leads_skipped"]) == (1, 0)
    assert_counters_match(w.run.id)


def test_e25_the_sweep_settles_the_same_crash_in_doubt_after_a_cancel(clean_db, sb, llm, evo):
    settings = fast_settings(send_timeout_seconds=1.0)
    w = make_world()
    m = _crashed_mid_send(w, settings, llm)
    runs.cancel_run(w.run.id)
    db.execute_sql("UPDATE message_parts SET sending_at = now() - interval '1 hour' WHERE message_id = %s", (m.id,))
    assert recovery.recovery_sweep(settings, publish=lambda q, a: None)["in_doubt"] == 1
    assert CampaignMessage.get_by_id(m.id).status == "in_doubt"
    assert_counters_match(w.run.id)


# --------------------------------------------------------------------------------------------
# a known outcome stays known: the record of a successful send failing


def test_lock_timeout_on_recording_a_sent_part_does_not_make_it_in_doubt(clean_db, sb, llm, evo, settings):
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    # another transaction holds the run row: the statement recording the send times out
    import psycopg2

    blocker = psycopg2.connect(get_settings().database_url)
    cur = blocker.cursor()
    cur.execute("SELECT id FROM campaign_runs WHERE id = %s FOR UPDATE", (w.run.id,))
    db.execute_sql("SET lock_timeout = '300ms'")
    try:
        with pytest.raises(peewee.DatabaseError):
            pipeline.send_step(m.id, settings, evo)
    finally:
        blocker.rollback()
        blocker.close()
        db.execute_sql("SET lock_timeout = '30s'")
    (part,) = parts_of(m.id)
    assert part.status == "sending" and part.provider_message_id  # the key was kept
    # the redelivery (or the sweep's copy) records the known outcome; no second sendText
    out = pipeline.send_step(m.id, settings, evo)
    assert out.sent
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert len(_sends(sb)) == 1
    assert run_counters(w.run.id)["leads_in_doubt"] == 0
    assert_counters_match(w.run.id)


def test_a_terminal_statement_run_twice_counts_once(clean_db, sb, llm, evo, settings):
    """A statement re-run on a fresh connection after the first one committed (the reply lost,
    db.ResilientPooledDatabase) must not double a counter: every terminal write is conditional."""
    w = make_world()
    m1, m2 = w.add_leads(2)
    for _ in range(2):
        outcomes.finish_message(m1.id, "skipped", settings, from_statuses=("pending",), skip_reason="lead_moved")
        outcomes.skip_pending_where("m.id = %s", (m2.id,), "cancelled")
    c = run_counters(w.run.id)
    assert (c["leads_skipped"], c["leads_processed"]) == (2, 2)
    assert_counters_match(w.run.id)


# --------------------------------------------------------------------------------------------
# R-FAIL-2: Retry-After per scope, capped waits, attempts that survive re-dispatch


def test_openrouter_retry_after_holds_the_whole_key(clean_db, sb, llm, evo, settings):
    w = make_world()
    (m1,) = w.add_leads(1)
    sb.set_faults(chat={"always_status": 429}, retry_after=2.0)
    claim(m1.id)
    with pytest.raises(RetryLater):
        pipeline.generate_step(m1.id, settings, llm)
    key = ratelimit.openrouter_key(settings.openrouter_api_key)
    grant = ratelimit.acquire_minute(key, 600)
    assert not grant.granted and 1.0 < grant.wait <= 2.1  # any other message of the key waits too


def test_evolution_retry_after_holds_the_instance(clean_db, sb, llm, evo, settings):
    w = make_world(n_inboxes=2)
    (m1,) = w.add_leads(1)
    to_sending(m1.id, settings, llm)
    sb.set_faults(send={"always_status": 429}, retry_after=3.0)
    with pytest.raises(RetryLater):
        pipeline.send_step(m1.id, settings, evo)
    held = ratelimit.acquire_inbox(w.inboxes[0].id, 30)
    assert not held.granted and 2.0 < held.wait <= 3.1
    assert ratelimit.acquire_inbox(w.inboxes[1].id, 30).granted


def test_a_long_retry_after_waits_in_postgresql_not_in_rabbitmq(clean_db, sb, llm, evo):
    """R-DISP-2: a Retry-After past MAX_BROKER_DELAY_SECONDS parks the message with its due time;
    the sweep re-publishes it then, not before."""
    settings = fast_settings(max_backoff_seconds=5000, lease_seconds=5000)
    w = make_world()
    (m1,) = w.add_leads(1)
    sb.set_faults(chat={"always_status": 429}, retry_after=1800)
    claim(m1.id)
    assert pipeline.generate_step(m1.id, settings, llm) is False  # no RetryLater: nothing for RabbitMQ
    msg = CampaignMessage.get_by_id(m1.id)
    wait = (msg.wake_at - dt.datetime.now(dt.UTC)).total_seconds()
    assert msg.status == "generating" and msg.attempts == 1 and 1700 < wait <= 1801
    swept: list = []
    recovery.recovery_sweep(settings, publish=lambda q, a: swept.extend(a))
    assert swept == []
    db.execute_sql("UPDATE campaign_messages SET wake_at = now() - interval '1 second' WHERE id = %s", (m1.id,))
    recovery.recovery_sweep(settings, publish=lambda q, a: swept.extend(a))
    assert swept == [(m1.id,)]


def test_a_pending_retry_after_longer_than_the_broker_delay_parks_a_duplicate(clean_db, sb, llm, evo, settings):
    w = make_world()
    (m1,) = w.add_leads(1)
    claim(m1.id)
    db.execute_sql("UPDATE campaign_messages SET attempts = 1 WHERE id = %s", (m1.id,))
    ratelimit.hold(ratelimit.retry_after_key(m1.id), 2000)
    assert pipeline.generate_step(m1.id, settings, llm) is False  # no Deferred of 2000 s
    assert CampaignMessage.get_by_id(m1.id).wake_at > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1900)
    assert sb.summary()["by_route"].get("chat", {}) == {}


def test_attempts_survive_a_re_dispatch(clean_db, sb, llm, evo, settings):
    """R-FAIL-2: a message sent back to pending keeps its count; a provider that keeps failing is
    not asked for ever."""
    w = make_world()
    (m1,) = w.add_leads(1)
    db.execute_sql("UPDATE campaign_messages SET attempts = 3 WHERE id = %s", (m1.id,))
    assert dispatch.dispatch_due(settings, publish=lambda q, ids: None) == 1
    assert CampaignMessage.get_by_id(m1.id).attempts == 3
    sb.set_faults(chat={"always_status": 500})
    with pytest.raises(StepFailed):  # max_attempts = 4: the 4th attempt is the last
        pipeline.generate_step(m1.id, settings, llm)


# --------------------------------------------------------------------------------------------
# R-FAIL-8: a lost hand-off is re-published within seconds


def test_a_lost_next_step_publish_is_republished_after_its_grace(clean_db, sb, llm, evo):
    settings = fast_settings(handoff_grace_seconds=1.0, lease_seconds=600)
    w = make_world()
    (m1,) = w.add_leads(1)
    claim(m1.id)
    assert pipeline.generate_step(m1.id, settings, llm)  # committed 'splitting'; its publish "lost"
    swept: list = []
    recovery.recovery_sweep(settings, publish=lambda q, a: swept.append((q, a)))
    assert swept == []
    time.sleep(1.2)
    recovery.recovery_sweep(settings, publish=lambda q, a: swept.append((q, a)))
    assert swept == [("campaign.split", [(m1.id,)])]  # seconds, not the 600 s lease
    recovery.recovery_sweep(settings, publish=lambda q, a: swept.append((q, a)))
    assert len(swept) == 1  # one copy; the next only after the full lease
