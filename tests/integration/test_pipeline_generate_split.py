"""The generate actor's delivery writes the text and splits it (issue 20, T-PERF-1): no hop through
RabbitMQ between the two steps, no claim statement of the split's own, and one statement records
the text, the parts and the move to `sending` — when, in the same rows, nothing the split's
preflight checks changed while the LLM wrote. These tests pin the round trips, that a change made
while the LLM wrote is settled by the split's own claim and checks exactly as before (R-PIPE-1/2),
that a redelivery of a message already `splitting` still splits it, that a copy that lost the
message to another delivery records nothing, and that the split's LLM request is always counted
against the per-minute budget (R-RATE-1).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

import pipeline
from campaign import outcomes, ratelimit, runs
from campaign.db import db
from campaign.sql import ASYNC_COMMIT
from campaign.text import SPLIT_BELOW_CHARS, build_prompt
from models import CampaignMessage, Lead
from sandbox.llm import generate_text, split_sentences
from tests.integration.pipeline_helpers import (
    answer_lost,
    assert_counters_match,
    claim,
    fast_settings,
    make_world,
    parts_of,
    statements,
)


@pytest.fixture(autouse=True)
def no_block_kept(monkeypatch):
    """Each test starts with no per-minute block kept in this process and no hold seen by it (as a
    fresh worker; another test's Retry-After on the same key must not reach into this one)."""
    monkeypatch.setattr(ratelimit, "_blocks", {})
    monkeypatch.setattr(ratelimit, "_holds", {})


@pytest.fixture(autouse=True)
def not_at_a_minutes_end(services):
    """The tests count requests of one budget minute: none starts in the last 8 s of a minute on the
    database's clock (a block is never spent past its minute, so a new one would be taken)."""
    second = db.execute_sql("SELECT extract(second FROM clock_timestamp())::float").fetchone()[0]
    if second > 52:
        time.sleep(60.2 - second)


@pytest.fixture
def settings():
    # 600 a minute: this process takes its requests from PostgreSQL in blocks of 10
    return fast_settings(openrouter_requests_per_minute=600)


def chats(sb, routes: tuple[str, ...] = ("chat", "split")) -> int:
    """LLM requests the sandbox has seen (the text's and the split's)."""
    return len([r for r in sb.ledger()["requests"] if r["route"] in routes])


def minute_count(settings) -> int:
    """Requests counted this minute against the OpenRouter key's budget (0: no row yet)."""
    row = db.execute_sql(
        "SELECT CASE WHEN minute_start = date_trunc('minute', now()) THEN minute_count ELSE 0 END "
        "FROM rate_limits WHERE key = %s",
        (ratelimit.openrouter_key(settings.openrouter_api_key),),
    ).fetchone()
    return row[0] if row else 0


def long_text(*messages: CampaignMessage) -> None:
    """Rename each message's lead so that the sandbox's (deterministic) text is long enough for the
    engine to ask the LLM to split it (as bench/common.two_part_name does)."""
    for m in messages:
        for k in range(500):
            Lead.update(name=f"Ana {m.id}-{k}").where(Lead.id == m.lead_id).execute()
            ctx = pipeline.load_context(m.id)
            assert ctx is not None
            text = generate_text(build_prompt(ctx))
            if len(text) > SPLIT_BELOW_CHARS and len(split_sentences(text)) >= 2:
                break
        else:
            raise AssertionError(f"no lead name gives message {m.id} a long text")


def local_tokens(monkeypatch) -> tuple[Callable[[], int], Callable[[], int]]:
    """(taken, given back): counts of the requests taken from this process's per-minute block
    and of those given back."""
    taken, given = [0], [0]
    reserve, give = ratelimit.reserve_local, ratelimit.give_back_local

    def counting_reserve(key: str) -> float | None:  # take_local goes through it too
        deadline = reserve(key)
        taken[0] += deadline is not None
        return deadline

    def counting_give(key: str) -> None:
        given[0] += 1
        give(key)

    monkeypatch.setattr(ratelimit, "reserve_local", counting_reserve)
    monkeypatch.setattr(ratelimit, "give_back_local", counting_give)
    return (lambda: taken[0]), (lambda: given[0])


class ChangingLLM:
    """The real client; ``change`` runs once, right after the first answer (while the step writes)."""

    def __init__(self, llm: Any, change: Callable[[], object]) -> None:
        self.llm, self.change, self.done = llm, change, False

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        out = self.llm.chat(*args, **kwargs)
        if not self.done:
            self.done = True
            self.change()
        return out


def test_one_generate_delivery_writes_and_splits_the_text_in_two_statements(clean_db, sb, llm, settings, monkeypatch):
    """T-PERF-1/T-PERF-7: the generate claim, then one record of the text and its parts (which
    checks the split's preflight in the same rows); both LLM requests counted, the send follows."""
    w = make_world(split=True, max_parts=2)
    m1, m2 = w.add_leads(2)
    long_text(m1, m2)
    claim(m1.id)
    assert pipeline.generate_then_split(m1.id, settings, llm, paced=True) == w.inboxes[0].id  # budget row made
    claim(m2.id)
    before = chats(sb)
    taken, given = local_tokens(monkeypatch)
    with statements(monkeypatch) as seen:
        assert pipeline.generate_then_split(m2.id, settings, llm, paced=True) == w.inboxes[0].id
    assert (taken(), given()) == (2, 0), "each LLM request of the delivery is counted from the process's block"
    msg = CampaignMessage.get_by_id(m2.id)
    assert msg.status == "sending"
    assert len(msg.generated_text or "") > SPLIT_BELOW_CHARS, "the sandbox's text is too short to ask for a split"
    assert chats(sb) - before == 2  # the text, then the split
    assert len(seen) == 2, seen
    assert "WITH claimed AS" in seen[0]
    assert "generated_text = %(text)s" in seen[1] and "INSERT INTO message_parts" in seen[1]
    assert len(parts_of(m2.id)) == 2, "the parts were not stored"
    assert msg.tokens_used and msg.generation_ms is not None and msg.split_ms is not None
    # every request was counted (blocks of 10 are taken ahead: at least as many as were made)
    assert minute_count(settings) >= chats(sb)


CHANGES: dict[str, tuple[Callable[[Any, Any], object], tuple[str, str | None]]] = {
    "cancelled": (lambda w, m: runs.cancel_run(w.run.id), ("skipped", "cancelled")),
    "paused": (lambda w, m: runs.pause_run(w.run.id), ("pending", None)),
    "lead_moved": (
        lambda w, m: Lead.update(column=w.cols["Replied"]).where(Lead.id == m.lead_id).execute(),
        ("skipped", "lead_moved"),
    ),
    "opted_out": (
        lambda w, m: Lead.update(opted_out=True).where(Lead.id == m.lead_id).execute(),
        ("skipped", "opted_out"),
    ),
    "replied": (
        lambda w, m: db.execute_sql("UPDATE leads SET last_reply_at = now() WHERE id = %s", (m.lead_id,)),
        ("skipped", "replied"),
    ),
    "inbox_disabled": (
        lambda w, m: db.execute_sql(
            "UPDATE inboxes SET disabled = true, disabled_reason = 'operator' WHERE id = %s", (w.inboxes[0].id,)
        ),
        ("pending", None),
    ),
    "inbox_restricted": (
        lambda w, m: db.execute_sql(
            "UPDATE inboxes SET health_state = 'restricted', health_until = now() + interval '1 hour' WHERE id = %s",
            (w.inboxes[0].id,),
        ),
        ("pending", None),
    ),
    "stopped": (  # the lead answered: R-IN-3 marked the message itself
        lambda w, m: db.execute_sql("UPDATE campaign_messages SET stop_reason = 'replied' WHERE id = %s", (m.id,)),
        ("skipped", "replied"),
    ),
    "window_closed": (lambda w, m: None, ("skipped", "window_closed")),  # the clock moved on (below)
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_made_while_the_llm_writes_is_settled_by_the_splits_own_checks(
    clean_db, sb, llm, settings, change, monkeypatch
):
    """R-PIPE-1/2, R-IN-3: the text is kept, but the split does not go on: the record of the text
    and parts finds the change in the same rows and records the text alone, then the split's own
    claim and preflight settle the message as they always did — no part, counters exact. (The
    split's LLM request was made before that record: a change while the LLM writes costs one
    request, the price of no statement between the two LLM calls. A window found closed before
    the split costs none.)"""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)
    act, expected = CHANGES[change]
    if change == "window_closed":  # the run's local window closes while the LLM writes
        act = lambda w, m: monkeypatch.setattr(pipeline, "_window_closed", lambda ctx: True)  # noqa: E731
    writer = ChangingLLM(llm, lambda: act(w, m))
    _, given = local_tokens(monkeypatch)
    assert pipeline.generate_then_split(m.id, settings, writer, paced=True) is None
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.skip_reason) == expected, (change, msg.status, msg.skip_reason)
    assert msg.generated_text, "the text written was lost"
    assert chats(sb, ("chat",)) == 1
    if change == "window_closed":
        # the request taken for a split in the same delivery goes back (the split's own claim then
        # counts one for itself, before its checks: as a split delivery always did)
        assert given() >= 1, "the split's request taken for the same delivery was not given back"
        assert chats(sb, ("split",)) == 0, "the split asked the LLM after the window closed"
    else:
        assert chats(sb, ("split",)) == 1, "the split's own claim asked the LLM again"
    assert parts_of(m.id) == []
    assert_counters_match(w.run.id)


def test_a_copy_that_lost_the_message_to_another_delivery_records_nothing(clean_db, sb, llm, settings):
    """R-PIPE-5: two copies of the generate delivery (a redelivery after a lease ran out): the one
    whose message another copy already moved on records neither its text nor its parts."""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)

    def other_copy_records_first() -> None:
        db.execute_sql(
            "UPDATE campaign_messages SET status = 'splitting', generated_text = 'the other copy' WHERE id = %s",
            (m.id,),
        )

    writer = ChangingLLM(llm, other_copy_records_first)
    assert pipeline.generate_then_split(m.id, settings, writer, paced=True) is None
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.generated_text) == ("splitting", "the other copy")
    assert parts_of(m.id) == [], "a copy that lost the message wrote parts"


def test_a_redelivered_generate_of_a_message_already_splitting_splits_it(clean_db, sb, llm, settings, monkeypatch):
    """R-PIPE-5: the text was recorded and the delivery died (or deferred its split's budget wait):
    the delivery again splits the message from the split's own claim instead of leaving it to the
    recovery sweep."""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)
    assert pipeline.generate_step(m.id, settings, llm)  # text recorded, the split not run
    assert CampaignMessage.get_by_id(m.id).status == "splitting"
    assert pipeline.generate_then_split(m.id, settings, llm, paced=True) == w.inboxes[0].id
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert chats(sb) == 2 and parts_of(m.id)
    # and a further duplicate finds nothing to do: no request, no statement that writes
    with statements(monkeypatch) as seen:
        assert pipeline.generate_then_split(m.id, settings, llm, paced=True) is None
    assert chats(sb) == 2
    assert len(seen) == 2, seen  # the generate claim finds nothing, nor does the split's


def test_with_no_request_left_in_this_process_the_split_takes_its_budget_in_its_claim(
    clean_db, sb, llm, settings, monkeypatch
):
    """R-RATE-1: a small budget is shared one request at a time (no block kept in the process), so
    the split in the same delivery cannot count its request locally: it takes it in its own claim
    statement — both requests counted, exactly."""
    settings = dataclasses.replace(settings, openrouter_requests_per_minute=10)
    assert ratelimit.block_size(10) == 1
    w = make_world(split=True, max_parts=2)
    m1, m2 = w.add_leads(2)
    long_text(m1, m2)
    claim(m1.id)
    assert pipeline.generate_then_split(m1.id, settings, llm, paced=True)  # budget row made
    claim(m2.id)
    counted = minute_count(settings)
    with statements(monkeypatch) as seen:
        assert pipeline.generate_then_split(m2.id, settings, llm, paced=True) == w.inboxes[0].id
    assert len(seen) == 4, "\n---\n".join(seen)  # generate claim, text record, split claim, parts record
    assert minute_count(settings) - counted == 2
    assert minute_count(settings) == chats(sb) == 4


def test_a_dead_generate_delivery_fails_a_message_it_left_splitting(clean_db, sb, llm, settings):
    """R-FAIL-3: the generate delivery carries the split too, so when it dies (retries exhausted)
    with the message `splitting` — its split kept failing — the message fails at once instead of
    waiting out the lease for the sweep; a dead generate copy of a message another delivery carried
    on to `sending` still fails nothing (R-PIPE-5)."""
    w = make_world(split=True, max_parts=2)
    m1, m2 = w.add_leads(2)
    for m in (m1, m2):
        claim(m.id)
        assert pipeline.generate_step(m.id, settings, llm)  # the text recorded: `splitting`
    assert outcomes.fail_exhausted(m1.id, "generate gave up", settings, "generate") is not None
    assert CampaignMessage.get_by_id(m1.id).status == "failed"
    assert pipeline.split_step(m2.id, settings, llm) == w.inboxes[0].id
    assert outcomes.fail_exhausted(m2.id, "a dead copy", settings, "generate") is None
    assert CampaignMessage.get_by_id(m2.id).status == "sending"
    assert_counters_match(w.run.id)


# -- the first send claimed by the same record (the generate actor's claim_first_until) ---------------


def _open_inbox(inbox_id: int, checked_ago_s: float = 0.0) -> None:
    db.execute_sql(
        "UPDATE inboxes SET connection_state = 'open', state_checked_at = now() - make_interval(secs => %s) "
        "WHERE id = %s",
        (checked_ago_s, inbox_id),
    )


def _slot(inbox_id: int) -> Any:
    return db.execute_sql(
        "SELECT lease_token FROM rate_limits WHERE key = %s", (ratelimit.inbox_key(inbox_id),)
    ).fetchone()[0]


def test_the_record_claims_the_first_part_when_the_inbox_can_send_now(clean_db, sb, llm, evo, settings, monkeypatch):
    """T-PERF-7: with the inbox known connected and its slot free, the record of the text and parts
    also takes the slot and inserts the first part `sending` — one statement for what the send
    step's claim did, committed synchronously (the mark before the HTTP call) — then the send."""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)
    _open_inbox(w.inboxes[0].id)
    with statements(monkeypatch) as seen:
        first = pipeline.generate_then_split(m.id, settings, llm, claim_first_until=time.monotonic() + 60)
    assert isinstance(first, pipeline.FirstSend), first
    assert len(seen) == 2, seen
    assert not seen[1].startswith(ASYNC_COMMIT), "the `sending` mark of the first part was committed asynchronously"
    parts = parts_of(m.id)
    assert [p.status for p in parts] == ["sending", "pending"]
    assert (parts[0].id, str(parts[0].attempt_id)) == (first.part_id, str(first.attempt))
    assert str(_slot(w.inboxes[0].id)) == first.token, "the inbox's slot is not held for the send"
    assert (first.inbox_id, first.last_idx, first.text) == (w.inboxes[0].id, 1, parts[0].text)
    outcome = pipeline.send_claimed(first, settings, evo)
    assert outcome.sent and outcome.next_delay is not None
    assert [p.status for p in parts_of(m.id)] == ["sent", "pending"]
    assert _slot(w.inboxes[0].id) is None, "the slot was not given back"
    assert [s["text"] for s in sb.ledger()["sends"]] == [parts[0].text]


CANNOT_SEND_NOW: dict[str, Callable[[Any], object]] = {
    "state_unknown_for_long": lambda w: _open_inbox(w.inboxes[0].id, checked_ago_s=3600),
    "slot_in_use": lambda w: db.execute_sql(
        "UPDATE rate_limits SET lease_token = '00000000-0000-4000-8000-000000000001', "
        "lease_until = now() + interval '1 minute' WHERE key = %s",
        (ratelimit.inbox_key(w.inboxes[0].id),),
    ),
    "gap_not_over": lambda w: (
        db.execute_sql("UPDATE inboxes SET min_gap_seconds = 60 WHERE id = %s", (w.inboxes[0].id,)),
        db.execute_sql(
            "UPDATE rate_limits SET last_at = now() WHERE key = %s", (ratelimit.inbox_key(w.inboxes[0].id),)
        ),
    ),
    "inbox_disconnected": lambda w: db.execute_sql(
        "UPDATE inboxes SET connection_state = 'close' WHERE id = %s", (w.inboxes[0].id,)
    ),
    "time_is_up": lambda w: None,  # claim_first_until already past (below)
}


@pytest.mark.parametrize("case", sorted(CANNOT_SEND_NOW))
def test_the_record_claims_nothing_when_the_send_step_would_not(clean_db, sb, llm, settings, case):
    """R-RATE-1, R-PIPE-3: the inbox's state not known fresh, its slot in use, its gap not over, it
    disconnected, or the delivery's time for a send used up — the text and parts are recorded, no
    part is `sending` and the slot is untouched: the send step (with its waits and checks) decides."""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)
    _open_inbox(w.inboxes[0].id)
    CANNOT_SEND_NOW[case](w)
    slot_before = _slot(w.inboxes[0].id)
    until = time.monotonic() + (-1 if case == "time_is_up" else 60)
    out = pipeline.generate_then_split(m.id, settings, llm, claim_first_until=until)
    assert out == w.inboxes[0].id, out
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert [p.status for p in parts_of(m.id)] == ["pending", "pending"]
    assert _slot(w.inboxes[0].id) == slot_before
    assert sb.ledger()["sends"] == []


def _second_message_with_a_block_kept(settings, llm) -> tuple[Any, CampaignMessage, str]:
    """A world whose first message went through (the budget row made, a block of it kept in this
    process) and whose second is queued; and the OpenRouter key's budget key."""
    w = make_world(split=True, max_parts=2)
    m1, m2 = w.add_leads(2)
    long_text(m1, m2)
    claim(m1.id)
    assert pipeline.generate_then_split(m1.id, settings, llm, paced=True)
    claim(m2.id)
    return w, m2, ratelimit.openrouter_key(settings.openrouter_api_key)


def test_the_splits_request_is_reserved_before_other_threads_drain_the_block(clean_db, sb, llm, settings, monkeypatch):
    """R-RATE-1, T-PERF-7: the split's request is taken from the process's block right after the
    generate claim; other threads emptying the block while the LLM writes do not send the split
    through its own claim (two statements, both requests counted once)."""
    w, m2, key = _second_message_with_a_block_kept(settings, llm)

    def other_threads_drain_the_block() -> None:
        while ratelimit.take_local(key):
            pass

    with statements(monkeypatch) as seen:
        out = pipeline.generate_then_split(m2.id, settings, ChangingLLM(llm, other_threads_drain_the_block), paced=True)
    assert out == w.inboxes[0].id
    assert len(seen) == 2, "\n---\n".join(seen)  # the claim, the text and parts: no split claim
    assert chats(sb, ("split",)) == 2
    assert CampaignMessage.get_by_id(m2.id).status == "sending" and len(parts_of(m2.id)) == 2


@pytest.mark.parametrize("why", ["minute_ended", "key_held"])
def test_a_reserved_split_request_is_not_spent_after_its_minute_or_into_a_hold(clean_db, sb, llm, settings, why):
    """R-RATE-1, R-FAIL-2: a block is never spent past the minute it was counted in, nor while a hold
    of the key (a Retry-After) lasts — the split's request reserved before the LLM wrote is dropped
    then, and the split takes its request in its own claim (which waits out a hold)."""
    w, m2, key = _second_message_with_a_block_kept(settings, llm)

    def meanwhile() -> None:
        if why == "minute_ended":  # the block's minute ends while the LLM writes
            time.sleep(0.06)
            with ratelimit._blocks_lock:
                left = ratelimit._blocks.get(key, (0.0, 0))[1]
                ratelimit._blocks[key] = (time.monotonic() - 0.001, left)
        else:
            with ratelimit._blocks_lock:  # another thread got a 429: block_scope dropped the block
                ratelimit._blocks.pop(key, None)
                ratelimit._holds[key] = time.monotonic() + 0.3

    reserved: list[float | None] = []
    real_reserve = ratelimit.reserve_local

    def spy(k: str) -> float | None:
        out = real_reserve(k)
        if out is not None and why == "minute_ended":
            out = min(out, time.monotonic() + 0.05)  # its minute ends in 50 ms
        reserved.append(out)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ratelimit, "reserve_local", spy)
        mp.setattr(ratelimit, "_holds", {})
        with statements(mp) as seen:
            pipeline.generate_then_split(m2.id, settings, ChangingLLM(llm, meanwhile), paced=True)
    assert len(reserved) >= 2 and reserved[1] is not None, "no request was reserved for the split"
    # the generate claim, the text alone, the split's claim (its request counted there), the parts
    assert len(seen) == 4, "\n---\n".join(seen)
    assert CampaignMessage.get_by_id(m2.id).status == "sending" and len(parts_of(m2.id)) == 2


def test_a_record_run_again_after_its_commit_recognises_its_own_claim(clean_db, sb, llm, evo, settings):
    """E-16: the record that claims the first part commits, its answer is lost and it runs again on a
    fresh connection: the part it claimed is recognised by its attempt and sent — not left
    `sending` for the sweep to call in doubt, its slot not held until the lease runs out."""
    w = make_world(split=True, max_parts=2)
    (m,) = w.add_leads(1)
    long_text(m)
    claim(m.id)
    _open_inbox(w.inboxes[0].id)
    with answer_lost(pipeline._RECORD_AND_CLAIM_SQL):
        first = pipeline.generate_then_split(m.id, settings, llm, claim_first_until=time.monotonic() + 60)
    assert isinstance(first, pipeline.FirstSend), first
    assert (first.part_id, first.last_idx) == (parts_of(m.id)[0].id, 1)
    assert pipeline.send_claimed(first, settings, evo).sent
    assert [p.status for p in parts_of(m.id)] == ["sent", "pending"]
    assert _slot(w.inboxes[0].id) is None, "the slot was not given back"
