"""The chain's asynchronous commits (issue 20, T-PERF-1, R-SCALE-3): which commits skip the WAL
flush, and that losing each of them in a PostgreSQL crash ends in a safe state.

A commit with ``synchronous_commit = off`` (campaign.sql.ASYNC_COMMIT) returns before its WAL is
on disk; a crash can lose it (and only the last such commits: a later synchronous commit flushes
everything before it). The loss is simulated exactly: the statement runs in a transaction that is
rolled back while the step is told it succeeded, as a worker would have been before the crash.
Then the world carries on from what PostgreSQL kept (redeliveries, the recovery sweep), and the
outcome is checked against the sandbox's ledger of what really went out.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline
from campaign import recovery
from campaign.db import db
from campaign.sql import ASYNC_COMMIT, async_commit
from models import CampaignMessage, Lead
from tests.integration.pipeline_helpers import (
    assert_counters_match,
    claim,
    drive,
    fast_settings,
    make_world,
    parts_of,
    run_counters,
    statements,
)

LONG_TEXT = "Olá, tudo bem? " + "Temos uma proposta para a sua empresa em Recife. " * 3 + "Podemos falar amanhã?"


@pytest.fixture
def settings():
    return fast_settings()


class _Kept:
    """What the worker saw from a statement whose commit PostgreSQL then lost."""

    def __init__(self, rows: list[tuple], description: Any) -> None:
        self.rows, self.description = rows, description

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return self.rows


@contextlib.contextmanager
def losing(monkeypatch, marker: str) -> Iterator[list[str]]:
    """The first asynchronous commit whose statement contains ``marker`` is lost: it runs, its
    step gets its RETURNING rows, and PostgreSQL forgets it (a crash right after)."""
    lost: list[str] = []
    real = db.obj.execute_sql

    def execute_sql(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not lost and sql.startswith(ASYNC_COMMIT) and marker in sql:
            with db.atomic() as txn:
                cursor = real(sql, params)
                kept = _Kept(cursor.fetchall(), cursor.description)
                txn.rollback()
            lost.append(sql)
            return kept
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(db.obj, "execute_sql", execute_sql)
    try:
        yield lost
    finally:
        monkeypatch.undo()
    assert lost, f"no asynchronous commit containing {marker!r} ran: the scenario tested nothing"


def _after_the_crash(message_id: int, settings, llm, evo) -> str:
    """What follows a PostgreSQL crash: leases run out, the sweep re-publishes, the steps run."""
    db.execute_sql("UPDATE campaign_messages SET wake_at = now() - interval '1 second' WHERE id = %s", (message_id,))
    recovery.recovery_sweep(settings)
    status = CampaignMessage.get_by_id(message_id).status
    if status == "pending":  # back to the dispatcher
        claim(message_id)
    return drive(message_id, settings, llm, evo)


def _lengthen(message_id: int) -> None:
    """The generated text made long enough to go out in two parts (the sandbox writes 1-4 sentences)."""
    CampaignMessage.update(generated_text=LONG_TEXT).where(CampaignMessage.id == message_id).execute()


def ratelimit_source() -> str:
    import campaign.ratelimit

    return Path(campaign.ratelimit.__file__).read_text()


def _sends(sb) -> collections.Counter:
    return collections.Counter(s["text"] for s in sb.ledger()["sends"] if s["outcome"] == "ok")


def test_async_commit_covers_its_own_statement_only(clean_db):
    assert db.execute_sql(async_commit("SELECT current_setting('synchronous_commit')")).fetchone() == ("off",)
    assert db.execute_sql("SELECT current_setting('synchronous_commit')").fetchone() == ("on",)


def test_which_commits_wait_for_the_wal_flush(clean_db, sb, llm, evo, settings, monkeypatch):
    """The claims, the LLM text, the split and the `sent` records commit asynchronously; the
    `sending` mark (the commit before the HTTP call) and the inbox slot never do."""
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    claim(m.id)
    with statements(monkeypatch) as seen:
        pipeline.generate_step(m.id, settings, llm)
        _lengthen(m.id)
        assert drive(m.id, settings, llm, evo) == "sent"
    assert len(parts_of(m.id)) == 2

    def kinds(marker: str) -> set[bool]:
        found = {sql.startswith(ASYNC_COMMIT) for sql in seen if marker in sql}
        assert found, f"no statement containing {marker!r} ran"
        return found

    assert kinds("WITH claimed AS") == {True}  # generate and split claims
    assert kinds("SET generated_text") == {True}  # the text alone (generate_step), and with its parts
    assert kinds("INSERT INTO message_parts") == {True}
    assert kinds("SET status = 'sent', provider_message_id") == {True}  # part 1, and part 2 + finish
    assert kinds("SET status = 'sending', attempt_id") == {False}  # before the foreign call
    # the inbox slot (taken in the send claim statement, above; and by ratelimit's acquire) never
    # commits asynchronously: its loss could let a number send twice within its gap
    assert kinds("lease_token = %(token)s") == {False}
    assert "ASYNC_COMMIT" not in ratelimit_source() and "async_commit" not in ratelimit_source()
    assert not [sql for sql in seen if sql.startswith(ASYNC_COMMIT) and "BEGIN" in sql.upper().split()]


@pytest.mark.parametrize(
    ("marker", "what", "split_on_its_own"),
    [
        ("WITH claimed AS", "the generate claim", False),
        ("generated_text = %(text)s", "the LLM's text with its parts (the generate delivery's split)", False),
        ("generation_ms = %(ms)s", "the LLM's text alone (the split follows on its own)", True),
        ("AND status = 'splitting' RETURNING id, lead_id", "the split on its own (the parts with it)", True),
    ],
)
def test_a_lost_commit_before_any_send_repeats_work_and_sends_each_part_once(
    clean_db, sb, llm, evo, settings, monkeypatch, marker, what, split_on_its_own
):
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    claim(m.id)
    with losing(monkeypatch, marker):
        if split_on_its_own:  # the text recorded by itself (a hand-off to the split actor)
            pipeline.generate_step(m.id, settings, llm)
        # the redelivery finds the row where the lost commit left it and does the work again
        status = drive(m.id, settings, llm, evo)
    if status not in ("sent", "failed", "skipped", "in_doubt"):
        status = _after_the_crash(m.id, settings, llm, evo)
    assert status == "sent", what
    parts = parts_of(m.id)
    assert [p.status for p in parts] == ["sent"] * len(parts)
    assert _sends(sb) == collections.Counter(p.text for p in parts), f"{what}: each part exactly once"
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["Contacted"].id
    assert_counters_match(w.run.id)


def test_a_lost_sent_record_of_a_middle_part_ends_in_doubt_and_is_never_resent(
    clean_db, sb, llm, evo, settings, monkeypatch
):
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    claim(m.id)
    pipeline.generate_step(m.id, settings, llm)
    _lengthen(m.id)
    pipeline.split_step(m.id, settings, llm)
    first = parts_of(m.id)[0]
    with losing(monkeypatch, "WITH part AS (UPDATE message_parts SET status = 'sent'"):
        assert pipeline.send_step(m.id, settings, evo).sent  # Evolution took part 1; its record is lost
    assert [p.status for p in parts_of(m.id)] == ["sending", "pending"]  # the synchronous mark stayed
    assert _after_the_crash(m.id, settings, llm, evo) == "in_doubt"
    assert _sends(sb) == collections.Counter([first.text])  # part 1 once, part 2 never: nothing after a doubt
    assert [p.status for p in parts_of(m.id)] == ["in_doubt", "pending"]
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["New"].id
    assert run_counters(w.run.id)["leads_in_doubt"] == 1
    assert_counters_match(w.run.id)


def test_a_lost_finish_of_the_last_part_ends_in_doubt_with_nothing_half_done(
    clean_db, sb, llm, evo, settings, monkeypatch
):
    """The last part's record carries the whole terminal transition (lead move, counters, run
    completion, the conversation log): lost, all of it is lost together, and the message ends in
    doubt, the lead unmoved, the counters equal to the rows."""
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    claim(m.id)
    pipeline.generate_step(m.id, settings, llm)
    _lengthen(m.id)
    pipeline.split_step(m.id, settings, llm)
    assert pipeline.send_step(m.id, settings, evo).sent
    with losing(monkeypatch, "finished_at = now()"):
        assert pipeline.send_step(m.id, settings, evo).sent
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert [p.status for p in parts_of(m.id)] == ["sent", "sending"]
    out_logged = db.execute_sql(
        "SELECT count(*) FROM conversation_messages c JOIN message_parts p ON p.id = c.part_id WHERE p.message_id = %s",
        (m.id,),
    ).fetchone()[0]
    assert out_logged == 1  # part 1's log line stayed, part 2's went with its lost record
    assert _after_the_crash(m.id, settings, llm, evo) == "in_doubt"
    parts = parts_of(m.id)
    assert _sends(sb) == collections.Counter(p.text for p in parts)  # each once, none again
    assert [p.status for p in parts] == ["sent", "in_doubt"]
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["New"].id
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_in_doubt"], c["leads_sent"]) == ("completed", 1, 0)
    assert_counters_match(w.run.id)
