"""The send and split steps with fewer round trips (issue 7, T-PERF-1): behaviour kept."""

from __future__ import annotations

import pytest

import pipeline
from campaign.db import db
from models import CampaignMessage, MessagePart
from tests.pipeline_helpers import claim, drive, fast_settings, make_world, parts_of


@pytest.fixture
def settings():
    return fast_settings()


def _failures(inbox_id: int) -> int:
    return db.execute_sql("SELECT consecutive_failures FROM inboxes WHERE id = %s", (inbox_id,)).fetchone()[0]


def _to_sending(message_id: int, settings, llm) -> None:
    claim(message_id)
    assert pipeline.generate_step(message_id, settings, llm)
    assert pipeline.split_step(message_id, settings, llm) is not None


def test_a_successful_send_ends_the_inbox_failure_streak(clean_db, sb, llm, evo, settings):
    """The streak is read with the send context; a success after failures sets it back to 0 (R-FAIL-6)."""
    w = make_world()
    (msg,) = w.add_leads(1)
    _to_sending(msg.id, settings, llm)
    db.execute_sql("UPDATE inboxes SET consecutive_failures = 2 WHERE id = %s", (w.inboxes[0].id,))
    assert pipeline.send_step(msg.id, settings, evo).sent
    assert _failures(w.inboxes[0].id) == 0


def test_the_send_context_carries_the_first_unsent_part(clean_db, sb, llm, evo, settings):
    """Context and next part come from one statement: part 2 follows a sent part 1, the last finalizes."""
    w = make_world(split=True, max_parts=3)
    (msg,) = w.add_leads(1)
    claim(msg.id)
    assert pipeline.generate_step(msg.id, settings, llm)
    text = "Olá, tudo bem? " + "Temos uma proposta para a sua empresa em Recife. " * 3 + "Podemos falar amanhã?"
    CampaignMessage.update(generated_text=text).where(CampaignMessage.id == msg.id).execute()
    sb.set_faults(chat={"always_status": 500})  # LLM down: the deterministic local split
    assert pipeline.split_step(msg.id, settings, llm) is not None
    sb.set_faults(chat={"always_status": None})
    n = len(parts_of(msg.id))
    assert n > 1
    outcomes = [pipeline.send_step(msg.id, settings, evo) for _ in range(n)]
    assert [o.next_delay is None for o in outcomes] == [False] * (n - 1) + [True]
    assert [s["text"] for s in sb.ledger()["sends"]] == [p.text for p in parts_of(msg.id)]
    assert CampaignMessage.get_by_id(msg.id).status == "sent"


def test_split_of_a_message_that_already_has_parts_keeps_them(clean_db, sb, llm, evo, settings):
    """A message resumed after a wait keeps its parts (R-FAIL-5): the one-statement split adds none."""
    w = make_world(split=True, max_parts=3)
    (msg,) = w.add_leads(1)
    claim(msg.id)
    assert pipeline.generate_step(msg.id, settings, llm)
    MessagePart.create(message=msg.id, inbox=w.inboxes[0].id, idx=0, text="kept part")
    assert pipeline.split_step(msg.id, settings, llm) == w.inboxes[0].id
    assert [p.text for p in parts_of(msg.id)] == ["kept part"]
    assert CampaignMessage.get_by_id(msg.id).status == "sending"
    assert drive(msg.id, settings, llm, evo) == "sent"
    assert [s["text"] for s in sb.ledger()["sends"]] == ["kept part"]


def _slot(inbox_id: int) -> tuple:
    from campaign import ratelimit

    return db.execute_sql(
        "SELECT lease_token IS NULL, last_at IS NOT NULL FROM rate_limits WHERE key = %s",
        (ratelimit.inbox_key(inbox_id),),
    ).fetchone()


@pytest.mark.parametrize("outcome", ["sent", "invalid_number"])
def test_the_send_step_gives_the_inbox_slot_back_on_every_path(clean_db, sb, llm, evo, settings, outcome):
    """The slot handed to send_step is released (gap counted from the send) whether the part went out or not."""
    from campaign import ratelimit

    w = make_world()
    (msg,) = w.add_leads(1)
    _to_sending(msg.id, settings, llm)
    if outcome == "invalid_number":
        phone = db.execute_sql(
            "SELECT l.phone FROM leads l JOIN campaign_messages m ON m.lead_id = l.id WHERE m.id = %s", (msg.id,)
        ).fetchone()[0]
        sb.set_faults(invalid_numbers=[phone.lstrip("+")])
    grant = ratelimit.acquire_inbox(w.inboxes[0].id, 60)
    assert grant.granted and _slot(w.inboxes[0].id) == (False, False)
    pipeline.send_step(msg.id, settings, evo, lease=grant)
    assert _slot(w.inboxes[0].id) == (True, True)
    assert CampaignMessage.get_by_id(msg.id).status == ("sent" if outcome == "sent" else "failed")
    # the next send of the inbox gets the slot at once (min gap 0)
    assert ratelimit.acquire_inbox(w.inboxes[0].id, 60).granted


def test_the_send_step_releases_the_slot_when_it_does_not_send(clean_db, sb, llm, evo, settings):
    """A delivery that finds nothing to send gives the slot back without starting the gap."""
    from campaign import ratelimit

    w = make_world()
    (msg,) = w.add_leads(1)
    _to_sending(msg.id, settings, llm)
    assert pipeline.send_step(msg.id, settings, evo).sent
    grant = ratelimit.acquire_inbox(w.inboxes[0].id, 60)
    db.execute_sql("UPDATE rate_limits SET last_at = NULL WHERE key = %s", (grant.key,))
    assert not pipeline.send_step(msg.id, settings, evo, lease=grant).sent  # already sent: nothing to do
    assert _slot(w.inboxes[0].id) == (True, False)
