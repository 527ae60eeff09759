"""actors.send: a part whose gap is zero goes out in the same delivery as the one before it
(issue 20, T-PERF-1: no hop through RabbitMQ); a part with a gap, or after a slow send, is
enqueued as before. The actor's function runs in this process on the real PostgreSQL and sandbox;
what it would publish is recorded instead of sent.
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
