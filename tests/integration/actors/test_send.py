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
from tests.integration.pipeline_helpers import fast_settings, make_world, parts_of, statements


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
    """T-PERF-7: each part after the first is claimed by the statement recording the one before
    (the inbox's slot kept through): parts + 1 statements for the delivery."""
    w, m = _message(parts, 0.0)
    with pytest.MonkeyPatch.context() as mp, statements(mp) as seen:
        send_actor.send_part.fn(m.id, w.inboxes[0].id)
    assert len(seen) == parts + 1, "\n---\n".join(seen)
    assert sum("WITH prev AS" in sql for sql in seen) == parts - 1
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


class _During:
    """The sandbox's gateway; ``change`` runs while the first part is in its HTTP call."""

    def __init__(self, evo: Any, change: Any) -> None:
        self.evo, self.change, self.calls = evo, change, 0

    def send_text(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.change()
        return self.evo.send_text(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.evo, name)


def _slot_row(inbox_id: int) -> tuple:
    return db.execute_sql(
        "SELECT lease_token, last_at IS NOT NULL FROM rate_limits WHERE key = %s", (f"inbox:{inbox_id}",)
    ).fetchone()


def test_an_inbox_gap_between_sends_is_kept_between_zero_gap_parts(clean_db, sb, send_actor):
    """R-RATE-1: the part before is recorded by the next claim, but the slot is kept only when the
    inbox's own gap is zero: with a gap, the slot is given back and the next part waits for it."""
    w, m = _message(2, 0.0)
    db.execute_sql("UPDATE inboxes SET min_gap_seconds = 0.3 WHERE id = %s", (w.inboxes[0].id,))
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    assert [p.status for p in parts_of(m.id)] == ["sent", "sent"]
    t0, t1 = (s["t"] for s in sb.ledger()["sends"])
    assert t1 - t0 >= 0.3, f"the second part went out {t1 - t0:.3f} s after the first: the inbox's gap was not kept"
    assert _slot_row(w.inboxes[0].id) == (None, True)


def test_a_lead_who_opts_out_during_a_part_gets_no_next_part(clean_db, sb, evo, send_actor, monkeypatch):
    """R-IN-3: the next claim records the part that went out and claims nothing more; the step's
    own checks then stop the rest, as before."""
    w, m = _message(2, 0.0)
    change = lambda: db.execute_sql("UPDATE leads SET opted_out = true WHERE id = %s", (m.lead_id,))  # noqa: E731
    monkeypatch.setattr(send_actor, "evolution", lambda: _During(evo, change))
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    parts = parts_of(m.id)
    assert parts[0].status == "sent" and parts[0].provider_message_id
    assert parts[1].status != "sent" and len(sb.ledger()["sends"]) == 1
    assert _slot_row(w.inboxes[0].id)[0] is None, "the slot was not given back"


def test_a_part_moved_while_it_was_sent_keeps_its_key_and_gives_the_slot_back(
    clean_db, sb, evo, send_actor, monkeypatch
):
    """An operator resolved the part while it was in its HTTP call: the next claim cannot record it,
    so the provider's key is kept on it anyway, the slot given back, and nothing more is sent."""
    w, m = _message(2, 0.0)

    def resolve() -> None:
        db.execute_sql("UPDATE message_parts SET status = 'in_doubt' WHERE message_id = %s AND idx = 0", (m.id,))

    monkeypatch.setattr(send_actor, "evolution", lambda: _During(evo, resolve))
    send_actor.send_part.fn(m.id, w.inboxes[0].id)
    first = parts_of(m.id)[0]
    assert first.status == "in_doubt" and first.provider_message_id
    assert len(sb.ledger()["sends"]) == 1
    assert _slot_row(w.inboxes[0].id)[0] is None, "the slot was not given back"


def test_a_next_claim_that_fails_keeps_the_key_of_the_part_before(clean_db, sb, send_actor, monkeypatch):
    """The statement that would record the part before fails (the connection lost): the provider's
    key is kept on the part, so its redelivery records the known outcome instead of a doubt."""
    import peewee

    import pipeline

    w, m = _message(2, 0.0)
    real = pipeline._named

    def failing(sql: str, params: Any) -> Any:
        if sql is pipeline._SEND_NEXT_SQL:
            raise peewee.OperationalError("server closed the connection unexpectedly")
        return real(sql, params)

    monkeypatch.setattr(pipeline, "_named", failing)
    with pytest.raises(peewee.OperationalError):
        send_actor.send_part.fn(m.id, w.inboxes[0].id)
    first = parts_of(m.id)[0]
    assert first.status == "sending" and first.provider_message_id == sb.ledger()["sends"][0]["key_id"]
    monkeypatch.setattr(pipeline, "_named", real)
    db.execute_sql(
        "UPDATE rate_limits SET lease_token = NULL, lease_until = NULL WHERE key = %s", (f"inbox:{w.inboxes[0].id}",)
    )
    send_actor.send_part.fn(m.id, w.inboxes[0].id)  # the redelivery
    assert [p.status for p in parts_of(m.id)] == ["sent", "sent"]
    assert len(sb.ledger()["sends"]) == 2, "a part went out twice"


def test_a_reply_that_skips_the_rest_while_the_next_claim_runs_ends_the_message(clean_db, sb, evo):
    """R-IN-3, E-27: the reply handler skips the next part in a transaction that commits while the
    claim recording the part before waits on that row — the claim finds nothing to claim, claims
    again on fresh rows and ends the message `sent` (a part went out), not left `sending`."""
    import threading

    import psycopg2

    import pipeline
    from campaign.settings import get_settings
    from tests.integration.pipeline_helpers import no_wait

    settings = fast_settings()
    w, m = _message(2, 0.0)
    first = pipeline.send_step(m.id, settings, evo, pace=no_wait, defer_record=True)
    assert first.unrecorded is not None
    reply = psycopg2.connect(get_settings().database_url)
    try:
        with reply.cursor() as cur:  # the reply handler's transaction, not committed yet
            cur.execute("UPDATE message_parts SET status = 'skipped' WHERE message_id = %s AND idx = 1", (m.id,))
            cur.execute("UPDATE campaign_messages SET stop_reason = 'replied' WHERE id = %s", (m.id,))
        out: list[Any] = []
        step = threading.Thread(
            target=lambda: out.append(
                pipeline.send_step(m.id, settings, evo, pace=no_wait, prev=first.unrecorded, defer_record=True)
            )
        )
        step.start()
        step.join(0.5)
        assert step.is_alive(), "the claim did not wait for the reply's row lock: the race was not set up"
        reply.commit()
        step.join(10)
        assert not step.is_alive()
    finally:
        reply.close()
    parts = parts_of(m.id)
    assert [p.status for p in parts] == ["sent", "skipped"]
    assert CampaignMessage.get_by_id(m.id).status == "sent", "the message was left unfinished"
    assert len(sb.ledger()["sends"]) == 1
    assert _slot_row(w.inboxes[0].id)[0] is None, "the slot was not given back"


def test_a_next_claim_run_again_after_its_commit_sends_its_part_and_gives_the_slot_back(clean_db, sb, evo):
    """E-16: the claim that records the part before commits, its answer is lost and it runs again on
    a fresh connection: the part it claimed is recognised as its own (sent once, not in doubt) and
    the slot it kept under its token is given back at the end."""
    import pipeline
    from tests.integration.pipeline_helpers import answer_lost, no_wait

    settings = fast_settings()
    w, m = _message(2, 0.0)
    first = pipeline.send_step(m.id, settings, evo, pace=no_wait, defer_record=True)
    with answer_lost(pipeline._SEND_NEXT_SQL):
        second = pipeline.send_step(m.id, settings, evo, pace=no_wait, prev=first.unrecorded, defer_record=True)
    assert second.sent and second.next_delay is None
    assert [p.status for p in parts_of(m.id)] == ["sent", "sent"]
    assert len(sb.ledger()["sends"]) == 2
    assert _slot_row(w.inboxes[0].id)[0] is None, "the slot kept under the claim's token was never given back"


def test_a_left_record_that_fails_keeps_the_key_and_gives_the_slot_back(clean_db, sb, evo, monkeypatch):
    """The part's record left for a next claim that is not coming fails (the connection lost): the
    provider's key stays on the part, so its redelivery records it instead of a doubt."""
    import peewee

    import pipeline
    from tests.integration.pipeline_helpers import no_wait

    settings = fast_settings()
    w, m = _message(2, 0.0)
    first = pipeline.send_step(m.id, settings, evo, pace=no_wait, defer_record=True)
    assert first.unrecorded is not None

    def lost(*args: Any, **kwargs: Any) -> None:
        raise peewee.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(pipeline, "_record_sent_part", lost)
    with pytest.raises(peewee.OperationalError):
        pipeline.record_sent(first.unrecorded, settings)
    part = parts_of(m.id)[0]
    assert part.status == "sending" and part.provider_message_id == first.unrecorded.key_id
    assert _slot_row(w.inboxes[0].id)[0] is None, "the slot was not given back"


def test_a_send_in_the_generate_delivery_is_cut_off_as_a_send_deliverys_would_be(clean_db, sb, send_actor, monkeypatch):
    """R-RATE-1: the generate delivery's time limit covers its LLM calls and a send; from the send on,
    the delivery is re-armed to the send actor's own limit, shorter than the inbox slot's lease."""
    import threading
    import time

    import dramatiq
    from dramatiq.middleware import TimeLimit

    (limiter,) = [mw for mw in dramatiq.get_broker().middleware if isinstance(mw, TimeLimit)]
    seen: list[float] = []
    monkeypatch.setattr(
        send_actor,
        "_send_parts",
        lambda *a, **k: seen.append(limiter.manager.deadlines[threading.get_ident()] - time.monotonic()),
    )
    limiter.manager.add_timeout(threading.get_ident(), 390_000)  # the generate delivery's limit
    try:
        send_actor.send_now(1, 1)
    finally:
        limiter.manager.remove_timeout(threading.get_ident())
    assert seen and abs(seen[0] - send_actor.TIME_LIMIT_SECONDS) < 1.0, seen
