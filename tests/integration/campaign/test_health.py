"""Number health on real services (SPEC R-HEALTH-2/3, E-35): delivery ERROR receipts from the sandbox,
published to RabbitMQ as Evolution does and applied by the real consumer, throttle then restrict one
inbox; its run pauses ``inbox_restricted`` and an alert fires; the other inbox is untouched; the
cool-down (clock advanced) brings it back; the send-time caps and gaps follow the state."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time

import pytest

import pipeline
from campaign import health, ratelimit
from campaign.db import db
from campaign.inbound.consumer import InboundConsumer
from campaign.ops import cli, monitor, report
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Inbox
from sandbox.testing import SandboxProcess
from tests.integration import factories as f
from tests.integration.pipeline_helpers import claim, drive, fast_settings, make_world, parts_of

UTC = dt.UTC


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def events(services, clean_db):
    """A sandbox publishing Evolution's events to this run's vhost, and the real consumer reading them."""
    prefix = f"evo{time.monotonic_ns() % 10**9}"
    exchange = "evolution_health"
    settings = dataclasses.replace(
        fast_settings(),
        evolution_events_rabbitmq_url=services["RABBITMQ_URL"],
        evolution_events_exchange=exchange,
        evolution_events_prefix=prefix,
    )
    consumer = InboundConsumer(settings)
    t = threading.Thread(target=consumer.run, name="inbound-health", daemon=True)
    t.start()
    assert consumer.ready.wait(15), "consumer did not start"
    with SandboxProcess(
        seed=5, events_amqp_url=services["RABBITMQ_URL"], events_exchange=exchange, events_prefix=prefix
    ) as sb:
        wait_for(lambda: sb.events()["sinks"]["amqp"]["connected"], what="the sandbox's AMQP sink")
        yield sb, settings
    consumer.stop()
    t.join(15)


def _state(inbox: Inbox) -> str:
    return Inbox.get_by_id(inbox.id).health_state


def _health_events(inbox: Inbox) -> list[tuple[str, str, dict]]:
    return [
        (d["from"], d["to"], d)
        for (d,) in db.execute_sql(
            "SELECT details FROM campaign_events WHERE step = 'health' AND (details->>'inbox_id')::bigint = %s "
            "ORDER BY id",
            (inbox.id,),
        ).fetchall()
    ]


def test_e35_errors_throttle_then_restrict_one_inbox_and_the_cool_down_brings_it_back(events, llm, capsys):
    """E-35: delivery ERRORs pile up on one inbox: throttled, then restricted; its run pauses
    ``inbox_restricted`` and the ``inbox_restricted`` alert fires; the other inbox (its own campaign)
    keeps sending and stays healthy; 24 h later with no new error it is healthy and its run resumes."""
    sb, settings = events
    w = make_world("health", n_inboxes=2)
    bad, good = w.inboxes
    other_cfg = f.config(w.ws, good, w.cols["New"], w.cols["Contacted"], name="second")
    other_run = f.run(other_cfg)
    # receipts trail their send by 0.2 s and 0.4 s, as real ones do: one that raced ahead of the
    # send's own record would find no part (R-IN-8) and could not count
    sb.set_faults({"delivery_errors": {bad.instance_name: 1.0}, "webhook_gap_ms": 200})
    from clients.evolution import EvolutionClient

    bad_msgs = w.add_leads(20, inbox=bad)
    good_msgs = []
    for _ in range(6):
        lead = f.lead(w.ws, w.cols["New"])
        good_msgs.append(f.message(other_run, lead, inbox=good.id))
    CampaignRun.update(leads_total=6).where(CampaignRun.id == other_run.id).execute()

    with EvolutionClient(sb.evolution_url, sb.evolution_key) as evo:
        # 5 errors of 5 sends: >= 5 and >= 5 % -> throttled
        for m in bad_msgs[:5]:
            claim(m.id)
            assert drive(m.id, settings, llm, evo) == "sent"
        wait_for(lambda: _state(bad) == "throttled", what="the inbox to be throttled")
        (frm, to, first), *_ = _health_events(bad)
        assert (frm, to) == ("healthy", "throttled")
        assert first["evidence"]["errors"] >= 5 and first["evidence"]["ratio"] >= 0.05
        assert first["evidence"]["window_start"] < first["evidence"]["window_end"]
        assert Inbox.get_by_id(bad.id).health_until is not None
        # 10 more: 15 errors -> restricted; the run pauses, an alert fires
        for m in bad_msgs[5:15]:
            claim(m.id)
            drive(m.id, settings, llm, evo)
        wait_for(lambda: _state(bad) == "restricted", what="the inbox to be restricted")
        wait_for(lambda: CampaignRun.get_by_id(w.run.id).status == "paused", what="its run to pause")
        assert CampaignRun.get_by_id(w.run.id).pause_reason == "inbox_restricted"
        transitions = [(a, b) for a, b, _ in _health_events(bad)]
        assert transitions == [("healthy", "throttled"), ("throttled", "restricted")]
        restricted = _health_events(bad)[-1][2]
        assert restricted["evidence"]["errors"] >= 15 and restricted["paused_runs"] == [w.run.id]
        kinds = {a.kind: a.text for a in monitor.alerts(settings)}
        assert "inbox_restricted" in kinds and "health/sales-0" in kinds["inbox_restricted"]
        # status and report show it (R-HEALTH-3/4): state, reason, the reply ratio column, the alert
        snap = monitor.status_snapshot(settings, with_queues=False)
        assert {r.label: r.state for r in snap.inboxes} == {"health/sales-0": "restricted", "health/sales-1": "healthy"}
        assert snap.reply_ratios[bad.id] == health.ReplyRatio(messaged=15, replied=0)
        assert cli.main(["status", "--no-queues"]) == 0
        out = capsys.readouterr().out
        assert "inboxes (2)" in out and "restricted" in out and "! inbox_restricted: inbox health/sales-0" in out
        text = report.render_text(report.build_report(w.run.id))
        assert "reply ratio 7 d" in text and "sales-0 (restricted)" in text and "0% (0/15)" in text
        # nothing new starts on the restricted inbox, even when an operator resumes the run: the send
        # path sees the state, puts the message back and pauses the run again
        db.execute_sql("UPDATE campaign_runs SET status = 'running', pause_reason = NULL WHERE id = %s", (w.run.id,))
        m = bad_msgs[15]
        claim(m.id)
        drive(m.id, settings, llm, evo)
        assert CampaignMessage.get_by_id(m.id).status == "pending"
        assert (CampaignRun.get_by_id(w.run.id).status, CampaignRun.get_by_id(w.run.id).pause_reason) == (
            "paused",
            "inbox_restricted",
        )
        assert not [p for p in parts_of(m.id) if p.status != "pending"]
        # the other inbox is untouched: its campaign sends every message, it stays healthy
        for m in good_msgs:
            claim(m.id)
            assert drive(m.id, settings, llm, evo) == "sent"
        assert _state(good) == "healthy" and _health_events(good) == []
        assert CampaignRun.get_by_id(other_run.id).status == "completed"

    # the cool-down: nothing changes before its end, then healthy and the run resumes
    until = Inbox.get_by_id(bad.id).health_until
    assert health.sweep(settings, now=until - dt.timedelta(minutes=1))["health_changes"] == []
    assert _state(bad) == "restricted"
    result = health.sweep(settings, now=until + dt.timedelta(seconds=1))
    assert result["health_changes"] == ["health/sales-0: restricted -> healthy"]
    assert _state(bad) == "healthy" and Inbox.get_by_id(bad.id).health_until is None
    back = _health_events(bad)[-1][2]
    assert back["check"] == "cooled" and back["resumed_runs"] == [w.run.id]
    assert CampaignRun.get_by_id(w.run.id).status == "running"
    assert "inbox_restricted" not in {a.kind for a in monitor.alerts(settings)}


def test_a_new_error_during_the_cool_down_pushes_its_end(clean_db):
    """R-HEALTH-2: back to healthy only after the cool-down with NO new error: each one restarts it."""
    w = make_world("push")
    ibx = w.inboxes[0]
    settings = get_settings()
    parts = _sent_parts(w, 10)
    _error(parts[:5])
    change = health.evaluate(ibx.id, settings)
    assert change is not None and change.new == "throttled"
    first_until = Inbox.get_by_id(ibx.id).health_until
    # an error 2 hours later (clock advanced): still throttled, the cool-down now ends 24 h after it
    later = first_until - dt.timedelta(hours=22)
    db.execute_sql("UPDATE message_parts SET delivery_error_at = %s WHERE id = %s", (later, parts[5].id))
    assert health.evaluate(ibx.id, settings, now=later + dt.timedelta(seconds=1)) is None
    pushed = Inbox.get_by_id(ibx.id).health_until
    assert pushed == later + dt.timedelta(hours=24)
    assert health.evaluate(ibx.id, settings, now=first_until + dt.timedelta(minutes=1)) is None
    assert _state(ibx) == "throttled"
    change = health.evaluate(ibx.id, settings, now=pushed + dt.timedelta(seconds=1))
    assert change is not None
    assert (change.old, change.new) == ("throttled", "healthy")


def _sent_parts(w, n: int):
    from models import MessagePart

    msgs = w.add_leads(n)
    out = []
    for i, m in enumerate(msgs):
        out.append(
            MessagePart.create(
                message=m.id,
                idx=0,
                text="x",
                status="sent",
                inbox=w.inboxes[0].id,
                provider_message_id=f"K{m.id}-{i}",
                sending_at=dt.datetime.now(UTC),
                sent_at=dt.datetime.now(UTC),
            )
        )
    return out


def _error(parts) -> None:
    db.execute_sql("UPDATE message_parts SET delivery_error_at = now() WHERE id = ANY(%s)", ([p.id for p in parts],))


def test_throttled_halves_the_send_time_caps_and_doubles_the_gap(clean_db):
    """R-HEALTH-2: the rate limiter (R-RATE-1) reads the state: caps halved, minimum gap doubled."""
    w = make_world("caps", inbox_kw={"max_per_hour": 4})
    ibx = w.inboxes[0]
    _sent_parts(w, 2)
    grant = ratelimit.acquire_inbox(ibx.id, 30)
    assert grant.granted  # 2 of 4 this hour
    ratelimit.release_inbox(grant, sent=False)
    db.execute_sql(
        "UPDATE inboxes SET health_state = 'throttled', health_until = now() + interval '1 day' WHERE id = %s",
        (ibx.id,),
    )
    refused = ratelimit.acquire_inbox(ibx.id, 30)
    assert not refused.granted and refused.wait > 3000  # 2 of 2: the oldest send leaves the hour first
    # the gap: 100 s configured, the last send 150 s ago -> healthy sends, throttled waits ~50 s
    db.execute_sql(
        "UPDATE inboxes SET max_per_hour = NULL, min_gap_seconds = 100 WHERE id = %s",
        (ibx.id,),
    )
    db.execute_sql(
        "UPDATE rate_limits SET last_at = now() - interval '150 seconds' WHERE key = %s", (ratelimit.inbox_key(ibx.id),)
    )
    waiting = ratelimit.acquire_inbox(ibx.id, 30)
    assert not waiting.granted and 45 < waiting.wait <= 50
    db.execute_sql(
        "UPDATE inboxes SET health_state = 'healthy', health_until = NULL WHERE id = %s",
        (ibx.id,),
    )
    assert ratelimit.acquire_inbox(ibx.id, 30).granted


def test_a_refused_send_is_evidence(clean_db, sb, llm, evo):
    """R-HEALTH-2: a send the number refused (404 of the instance) is recorded as evidence."""
    w = make_world("refuse")
    (m,) = w.add_leads(1)
    sb.set_faults({"unknown_instances": [w.inboxes[0].instance_name]})
    claim(m.id)
    drive(m.id, fast_settings(), llm, evo)
    rows = db.execute_sql("SELECT inbox_id, code FROM inbox_refusals").fetchall()
    assert rows == [(w.inboxes[0].id, "unknown_instance")]
    # a gateway 503 is not the number's fault: no refusal
    sb.set_faults({"unknown_instances": [], "send": {"always_status": 503}})
    db.execute_sql("UPDATE campaign_runs SET status = 'running', pause_reason = NULL WHERE id = %s", (w.run.id,))
    (m2,) = w.add_leads(1)
    claim(m2.id)
    drive(m2.id, fast_settings(max_attempts=1), llm, evo)
    assert len(db.execute_sql("SELECT 1 FROM inbox_refusals").fetchall()) == 1


def test_reply_ratio_per_inbox_over_seven_days(clean_db):
    """R-HEALTH-3: replies ÷ leads messaged, last 7 days, per inbox."""
    w = make_world("ratio", n_inboxes=2)
    parts = _sent_parts(w, 4)
    leads = [CampaignMessage.get_by_id(p.message_id).lead_id for p in parts]
    for lead_id, outcome, age in ((leads[0], "reply", 1), (leads[1], "opt_out", 2), (leads[2], "reply", 9)):
        db.execute_sql(
            "INSERT INTO inbound_events (inbox_id, provider_message_id, lead_id, outcome, created_at) "
            "VALUES (%s, %s, %s, %s, now() - make_interval(days => %s))",
            (w.inboxes[0].id, f"in-{lead_id}", lead_id, outcome, age),
        )
    ratios = health.reply_ratios()
    assert ratios[w.inboxes[0].id] == health.ReplyRatio(messaged=4, replied=2)
    assert ratios[w.inboxes[0].id].text() == "50% (2/4)"
    assert ratios[w.inboxes[1].id].ratio is None and ratios[w.inboxes[1].id].text() == "-"
    assert pipeline is not None  # the send path is what fills message_parts in production


def test_the_sweep_purges_refusals_no_cool_down_can_need(clean_db):
    """inbox_refusals does not grow forever: rows older than the cool-down + a day go."""
    w = make_world("purge")
    ibx = w.inboxes[0]
    db.execute_sql(
        "INSERT INTO inbox_refusals (inbox_id, code, at) VALUES (%s, 'forbidden', now() - interval '49 hours'), "
        "(%s, 'forbidden', now() - interval '47 hours')",
        (ibx.id, ibx.id),
    )
    assert health.sweep(get_settings())["refusals_purged"] == 1
    assert db.execute_sql("SELECT count(*) FROM inbox_refusals").fetchone() == (1,)


def test_e35_a_restricted_pool_member_fails_over_to_the_other(clean_db):
    """E-35 with a sender pool (R-POOL-3): the restricted member's not-started messages move to the
    member that can send; the run keeps running; back to healthy it takes work again."""
    from campaign import failover

    w = make_world("pooled", n_inboxes=2)
    bad, good = w.inboxes
    f.pool(w.config, bad, good)
    settings = get_settings()
    waiting = w.add_leads(4, inbox=bad)
    parts = _sent_parts(w, 15)
    _error(parts)
    change = health.evaluate(bad.id, settings)
    assert change is not None and change.new == "restricted"
    assert change.paused == [] and CampaignRun.get_by_id(w.run.id).status == "running"  # the pool goes on
    failover.fail_over(settings)
    moved = [CampaignMessage.get_by_id(m.id).inbox_id for m in waiting]
    assert moved == [good.id] * 4
    assert "inbox_restricted" in {a.kind for a in monitor.alerts(settings)}
