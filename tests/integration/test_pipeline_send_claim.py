"""The send step's claim statement (issue 20, T-PERF-7): one round trip takes the inbox's slot,
claims the part `sending` and reads the context — and only when every check the step makes before
a send would pass ("ready"). These tests pin both halves: the round trips of a paced send, and
that a message that is NOT ready on an inbox whose connection is known (the fast path) ends exactly
as the checks say, with nothing sent, no part left `sending` and the slot given back without
starting the gap.
"""

from __future__ import annotations

from typing import Any

import peewee
import pytest

import pipeline
from campaign import ratelimit, runs
from campaign.db import db
from models import CampaignMessage, Lead
from tests.integration.pipeline_helpers import (
    Paused,
    assert_counters_match,
    fast_settings,
    make_world,
    no_wait,
    parts_of,
    slot_state,
    statements,
    to_sending,
)

LONG_TEXT = "Olá, tudo bem? " + "Temos uma proposta para a sua empresa em Recife. " * 3 + "Podemos falar amanhã?"


@pytest.fixture
def settings():
    return fast_settings()


def _connected(inbox_id: int) -> None:
    """The inbox's state as the health job and connection.update events keep it: open, just seen."""
    db.execute_sql("UPDATE inboxes SET connection_state = 'open', state_checked_at = now() WHERE id = %s", (inbox_id,))


def test_a_paced_send_of_a_two_part_message_is_two_round_trips_per_part(clean_db, sb, llm, evo, settings, monkeypatch):
    """T-PERF-7: per part, the claim statement (slot + `sending` + context) and the record (`sent` +
    slot released, the last one with the message's terminal transition); nothing else."""
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    _connected(w.inboxes[0].id)
    to_sending(m.id, settings, llm)
    if len(parts_of(m.id)) != 2:  # the sandbox's text was short: split a long one
        db.execute_sql("DELETE FROM message_parts WHERE message_id = %s", (m.id,))
        db.execute_sql(
            "INSERT INTO message_parts (message_id, inbox_id, idx, text) VALUES (%s, %s, 0, %s), (%s, %s, 1, %s)",
            (m.id, w.inboxes[0].id, LONG_TEXT[:80], m.id, w.inboxes[0].id, LONG_TEXT[80:]),
        )
    per_part = []
    for _ in range(2):
        with statements(monkeypatch) as seen:
            assert pipeline.send_step(m.id, settings, evo, pace=no_wait).sent
        per_part.append(seen)
    assert [len(s) for s in per_part] == [2, 2], per_part
    assert all(s[0].lstrip().startswith("WITH ctx AS") for s in per_part)
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert slot_state(w.inboxes[0].id) == (True, True)


def test_the_first_send_of_an_unknown_inbox_polls_its_state_then_claims(clean_db, sb, llm, evo, settings, monkeypatch):
    """R-PIPE-3: no known state (or an old one): connectionState is polled, then the part is claimed
    with the checks done; the next send of that inbox takes the one-statement path."""
    w = make_world()
    m1, m2 = w.add_leads(2)
    to_sending(m1.id, settings, llm)
    to_sending(m2.id, settings, llm)
    with statements(monkeypatch) as first:
        assert pipeline.send_step(m1.id, settings, evo, pace=no_wait).sent
    assert [s for s in first if "connection_state = %(state)s" in s], "connectionState was not polled and stored"
    with statements(monkeypatch) as second:
        assert pipeline.send_step(m2.id, settings, evo, pace=no_wait).sent
    assert len(second) == 2, second
    assert len(sb.ledger()["sends"]) == 2


NOT_READY = ["cancelled", "paused", "lead_moved", "opted_out", "replied", "inbox_disabled", "window_closed"]


@pytest.mark.parametrize("change", NOT_READY)
def test_a_message_not_ready_on_a_connected_inbox_ends_as_the_checks_say(clean_db, sb, llm, evo, settings, change):
    """Each pre-send check on the one-statement path (a connected inbox): the message ends as the
    step's checks decide (R-PIPE-1/3, R-IN-3, E-06), nothing goes out, no part is left `sending`
    (a part claimed and then found past the window goes back), and the slot is given back without
    starting the gap."""
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    _connected(w.inboxes[0].id)
    if change == "cancelled":
        runs.cancel_run(w.run.id)
    elif change == "paused":
        runs.pause_run(w.run.id)
    elif change == "lead_moved":
        Lead.update(column=w.cols["Replied"]).where(Lead.id == m.lead_id).execute()
    elif change == "opted_out":
        Lead.update(opted_out=True).where(Lead.id == m.lead_id).execute()
    elif change == "replied":
        db.execute_sql("UPDATE leads SET last_reply_at = now() WHERE id = %s", (m.lead_id,))
    elif change == "inbox_disabled":
        db.execute_sql(
            "UPDATE inboxes SET disabled = true, disabled_reason = 'operator' WHERE id = %s", (w.inboxes[0].id,)
        )
    else:  # the run's day is over: its local window closed (the one check made after the claim)
        db.execute_sql("UPDATE campaign_runs SET run_date = run_date - 2 WHERE id = %s", (w.run.id,))
    out = pipeline.send_step(m.id, settings, evo, pace=no_wait)
    assert not out.sent and out.next_delay is None
    msg = CampaignMessage.get_by_id(m.id)
    expected = {
        "cancelled": ("skipped", "cancelled"),
        "paused": ("pending", None),
        "lead_moved": ("skipped", "lead_moved"),
        "opted_out": ("skipped", "opted_out"),
        "replied": ("skipped", "replied"),
        "inbox_disabled": ("pending", None),
        "window_closed": ("skipped", "window_closed"),
    }[change]
    assert (msg.status, msg.skip_reason) == expected, (change, msg.status, msg.skip_reason)
    assert sb.ledger()["sends"] == []
    assert "sending" not in [p.status for p in parts_of(m.id)]
    assert slot_state(w.inboxes[0].id) == (True, False)
    assert_counters_match(w.run.id)


def test_a_started_message_goes_on_through_a_disabled_inbox(clean_db, sb, llm, evo, settings):
    """DESIGN principle 8: a message whose first part went out finishes on its number even when the
    inbox was disabled meanwhile (its runs pause); the claim statement is not ready for it, the
    checks let it through."""
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    if len(parts_of(m.id)) != 2:
        db.execute_sql("DELETE FROM message_parts WHERE message_id = %s", (m.id,))
        db.execute_sql(
            "INSERT INTO message_parts (message_id, inbox_id, idx, text) VALUES (%s, %s, 0, %s), (%s, %s, 1, %s)",
            (m.id, w.inboxes[0].id, LONG_TEXT[:80], m.id, w.inboxes[0].id, LONG_TEXT[80:]),
        )
    _connected(w.inboxes[0].id)
    assert pipeline.send_step(m.id, settings, evo, pace=no_wait).sent
    db.execute_sql("UPDATE inboxes SET disabled = true, disabled_reason = 'operator' WHERE id = %s", (w.inboxes[0].id,))
    assert pipeline.send_step(m.id, settings, evo, pace=no_wait).sent
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert len(sb.ledger()["sends"]) == 2


def test_the_chain_s_hot_statements_run_prepared(clean_db, sb, llm, evo, settings, caplog):
    """T-PERF-1: the chain's statements are parsed and planned once per connection (campaign.db.prepared):
    after a message went through every step, each of them is a prepared statement of the session
    and none was refused by PostgreSQL (a parameter of unknown type would make it run unprepared)."""
    from campaign import db as dbmod

    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    _connected(w.inboxes[0].id)
    db.execute_sql("UPDATE campaign_messages SET status = 'queued' WHERE id = %s", (m.id,))
    with caplog.at_level("WARNING", logger="campaign.db"):
        assert pipeline.generate_step(m.id, settings, llm, paced=True)
        db.execute_sql("UPDATE campaign_messages SET generated_text = %s WHERE id = %s", (LONG_TEXT, m.id))
        assert pipeline.split_step(m.id, settings, llm, paced=True)
        while pipeline.send_step(m.id, settings, evo, pace=no_wait).next_delay is not None:
            pass
    assert CampaignMessage.get_by_id(m.id).status == "sent" and len(parts_of(m.id)) == 2
    assert "cannot be prepared" not in caplog.text
    session = {r[0] for r in db.execute_sql("SELECT name FROM pg_prepared_statements").fetchall()}
    hot = {h.name for h in dbmod._hot.values() if h is not None}
    send_claim = dbmod._hot[pipeline._SEND_CLAIM_SQL]
    assert send_claim is not None and send_claim.name in session, session
    # generate claim + record, split claim + record, send claim, part record, finish: all prepared here
    assert len(hot & session) >= 7, (hot & session, hot)


def test_a_slot_lost_during_a_slow_check_is_not_ours_any_more(clean_db, sb, llm, evo, settings):
    """A delivery takes the slot, then its checks outlast the lease (a connectionState poll that
    hangs): another send of the inbox takes the expired slot meanwhile. The first must then wait
    for the slot like anyone else — not send without it, not judge anything in doubt, and not
    release the other's lease."""
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)  # the inbox's state is unknown: the step will poll it
    other: list[ratelimit.Grant] = []

    class SlowProbe:
        def connection_state(self, instance: str) -> str:
            db.execute_sql(
                "UPDATE rate_limits SET lease_until = now() - interval '1 second' WHERE key = %s",
                (ratelimit.inbox_key(w.inboxes[0].id),),
            )
            other.append(ratelimit.acquire_inbox(w.inboxes[0].id, 60))  # another send takes it
            return "open"

        def send_text(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("sent without holding the inbox's slot")

    waits: list[float] = []

    def pace(wait: float) -> None:
        waits.append(wait)
        raise Paused()

    with pytest.raises(Paused):
        pipeline.send_step(m.id, settings, SlowProbe(), pace=pace)
    assert other and other[0].granted and len(waits) == 1
    assert [p.status for p in parts_of(m.id)] == ["pending"]
    token = db.execute_sql(
        "SELECT lease_token::text FROM rate_limits WHERE key = %s", (ratelimit.inbox_key(w.inboxes[0].id),)
    ).fetchone()[0]
    assert token == other[0].token, "the other send's lease was released by the delivery that lost it"


def test_a_claim_committed_before_its_connection_died_is_recognised_as_its_own(
    clean_db, sb, llm, evo, settings, monkeypatch
):
    """E-16 (review of issue 20): the claim statement commits the part `sending`, then the
    connection dies before its answer arrives; campaign.db runs the statement again on a fresh
    connection, which finds the part `sending` under this delivery's own attempt id. That is this
    send, not someone else's in doubt: the part goes out once and is recorded `sent`."""
    w = make_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    _connected(w.inboxes[0].id)
    db_class = type(db.obj)
    real = db_class._execute_maybe_prepared
    lost: list[str] = []

    def answer_lost_once(self: Any, sql: str, params: Any, named_cursor: Any) -> Any:
        out = real(self, sql, params, named_cursor)
        if sql == pipeline._SEND_CLAIM_SQL and not lost:
            lost.append(sql)
            out.fetchall()  # committed (autocommit) and answered; the answer never reaches the step
            self._state.conn.close()
            raise peewee.OperationalError("server closed the connection unexpectedly")
        return out

    monkeypatch.setattr(db_class, "_execute_maybe_prepared", answer_lost_once)
    out = pipeline.send_step(m.id, settings, evo, pace=no_wait)
    assert lost, "the claim's answer was not lost: the test proves nothing"
    assert out.sent
    assert [p.status for p in parts_of(m.id)] == ["sent"]
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert len(sb.ledger()["sends"]) == 1
    assert slot_state(w.inboxes[0].id) == (True, True)
