"""actors.send: a part whose gap is zero goes out in the same delivery as the one before it
(issue 20, T-PERF-1: no hop through RabbitMQ); a part with a gap, or after a slow send, is
enqueued as before. The first part goes out from the generate delivery (send_now) when the inbox
can send now; anything else hands it to the send actor. The actors' functions run in this process
on the real PostgreSQL and sandbox; what they would publish is recorded instead of sent.
"""

from __future__ import annotations

from typing import Any

import pytest

from campaign.db import db
from models import CampaignMessage, MessagePart
from tests.integration.pipeline_helpers import fast_settings, make_world, parts_of


def _message(parts: int, gap: float) -> tuple[Any, CampaignMessage]:
    """A world with one `sending` message of ``parts`` pending parts, part gap ``gap``..``gap``,
    on an inbox known connected."""
    w = make_world(split=True, max_parts=parts, part_gap_min_seconds=gap, part_gap_max_seconds=gap)
    (m,) = w.add_leads(1)
    CampaignMessage.update(status="sending", generated_text="x" * 40).where(CampaignMessage.id == m.id).execute()
    for i in range(parts):
        MessagePart.create(message=m.id, inbox=w.inboxes[0].id, idx=i, text=f"parte {i + 1}")
    db.execute_sql(
        "UPDATE inboxes SET connection_state = 'open', state_checked_at = now() WHERE id = %s", (w.inboxes[0].id,)
    )
    return w, m


@pytest.fixture
def send_actor(services, monkeypatch, sb, evo) -> Any:
    """The actor's module in this process — imported once the test services are set, as the other
    tests import ``actors`` — with the sandbox's gateway, test-speed settings, publishes recorded
    (in ``send_actor.published``)."""
    import actors.send as send_actor

    seen: list[tuple[Any, tuple, float | None]] = []
    monkeypatch.setattr(send_actor, "evolution", lambda: evo)
    monkeypatch.setattr(send_actor, "_settings", fast_settings())
    monkeypatch.setattr(
        send_actor, "enqueue", lambda step, args, delay_s=None: seen.append((step.name, tuple(args), delay_s))
    )
    monkeypatch.setattr(send_actor, "published", seen, raising=False)
    return send_actor


@pytest.mark.parametrize("parts", [2, 3])
def test_parts_with_a_zero_gap_go_out_in_one_delivery(clean_db, sb, send_actor, parts):
    w, m = _message(parts, 0.0)
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["sent"] * parts
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert [s["text"] for s in sb.ledger()["sends"]] == [f"parte {i + 1}" for i in range(parts)]
    assert send_actor.published == [], "a zero-gap part hopped through RabbitMQ"


def test_a_part_with_a_gap_is_enqueued_with_it(clean_db, sb, send_actor):
    """A human pause between parts stays a delay in RabbitMQ: the thread does not sleep it."""
    w, m = _message(2, 0.3)
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["sent", "pending"]
    assert send_actor.published == [("send_part", (m.id, w.inboxes[0].id), pytest.approx(0.3))]


def test_after_a_slow_send_the_next_part_is_enqueued_not_sent_in_the_same_delivery(
    clean_db, sb, send_actor, monkeypatch
):
    """The delivery's time limit covers one whole step: past CONTINUE_WITHIN_SECONDS, the next part
    gets a delivery of its own (straight onto the queue: no delay)."""
    monkeypatch.setattr(send_actor, "CONTINUE_WITHIN_SECONDS", -1.0)
    w, m = _message(2, 0.0)
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["sent", "pending"]
    assert send_actor.published == [("send_part", (m.id, w.inboxes[0].id), 0.0)]


def _slot_held_by_another_send(inbox_id: int) -> None:
    db.execute_sql(
        "UPDATE rate_limits SET lease_token = '00000000-0000-4000-8000-000000000001', "
        "lease_until = now() + interval '1 minute' WHERE key = %s",
        (f"inbox:{inbox_id}",),
    )


def test_send_now_sends_the_first_parts_without_a_hop(clean_db, sb, send_actor):
    w, m = _message(2, 0.0)
    send_actor.send_now(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["sent", "sent"]
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert send_actor.published == [], "the first send hopped through RabbitMQ"


def test_send_now_leaves_a_busy_inbox_to_the_send_actor(clean_db, sb, send_actor):
    """R-RATE-1: another send of the inbox in flight — nothing goes out here, nothing waits in this
    thread; the send actor (which waits for the slot) gets the message at once."""
    w, m = _message(2, 0.0)
    _slot_held_by_another_send(w.inboxes[0].id)
    send_actor.send_now(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["pending", "pending"]
    assert sb.ledger()["sends"] == []
    assert send_actor.published == [("send_part", (m.id, w.inboxes[0].id), None)]
    held = db.execute_sql(
        "SELECT lease_token FROM rate_limits WHERE key = %s", (f"inbox:{w.inboxes[0].id}",)
    ).fetchone()
    assert str(held[0]) == "00000000-0000-4000-8000-000000000001", "the other send's slot was touched"


def test_send_now_hands_a_send_that_hit_trouble_to_the_send_actor_with_its_delay(clean_db, sb, send_actor):
    """R-FAIL-2: a 503 from the gateway — the part goes back to pending with the attempt counted,
    and the send actor retries it after the backoff (as a retry of its own delivery would)."""
    w, m = _message(1, 0.0)
    sb.set_faults(send={"always_status": 503})
    try:
        send_actor.send_now(m.id, w.inboxes[0].id)
    finally:
        sb.set_faults(send={"always_status": None})
    assert [p.status for p in parts_of(m.id)] == ["pending"]
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert len(send_actor.published) == 1
    name, args, delay = send_actor.published[0]
    assert (name, args) == ("send_part", (m.id, w.inboxes[0].id)) and delay and delay > 0


@pytest.fixture
def generate_actor(services, monkeypatch, send_actor, llm) -> Any:
    """actors.generate in this process, with the sandbox's LLM and the send module of send_actor."""
    import actors.generate as generate_actor

    monkeypatch.setattr(generate_actor, "openrouter", lambda: llm)
    monkeypatch.setattr(generate_actor, "_settings", send_actor._settings)
    monkeypatch.setattr(generate_actor, "enqueue", send_actor.enqueue)
    return generate_actor


def _queued(parts: int) -> tuple[Any, CampaignMessage]:
    w = make_world(split=True, max_parts=parts, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    CampaignMessage.update(status="queued").where(CampaignMessage.id == m.id).execute()
    db.execute_sql(
        "UPDATE inboxes SET connection_state = 'open', state_checked_at = now() WHERE id = %s", (w.inboxes[0].id,)
    )
    return w, m


def test_one_generate_delivery_writes_splits_and_sends(clean_db, sb, send_actor, generate_actor):
    """T-PERF-1: queued to sent in one delivery when the inbox can send now — no publish at all."""
    w, m = _queued(2)
    generate_actor.generate.fn(m.id)
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert [p.status for p in parts_of(m.id)] == ["sent"] * len(parts_of(m.id))
    assert len(sb.ledger()["sends"]) == len(parts_of(m.id)) >= 1
    assert send_actor.published == []


def test_a_generate_delivery_that_took_long_enqueues_the_send(clean_db, sb, send_actor, generate_actor, monkeypatch):
    """The delivery's time limit covers its LLM calls and one whole send step: when the LLM calls
    used up their share, the send gets a delivery of its own."""
    monkeypatch.setattr(generate_actor, "LLM_SECONDS", -1)
    w, m = _queued(2)
    generate_actor.generate.fn(m.id)
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert sb.ledger()["sends"] == []
    assert send_actor.published == [("send_part", (m.id, w.inboxes[0].id), None)]
