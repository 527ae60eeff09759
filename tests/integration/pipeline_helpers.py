"""Shared pieces of the pipeline tests: a campaign world, an in-process driver of the chain."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pipeline
from campaign import outcomes
from campaign.db import db
from campaign.errors import Deferred, RetryLater, StepFailed
from campaign.ops.repairs import RUN_SNAPSHOT_FIELDS
from campaign.settings import Settings, get_settings
from models import CampaignConfig, CampaignMessage, CampaignRun, Column, Inbox, Lead, MessagePart, Workspace
from tests.integration import factories as f

FAST = dict(
    min_backoff_seconds=0.05, max_backoff_seconds=1.0, max_attempts=4, lease_seconds=5, send_timeout_seconds=2.0
)


def fast_settings(**kw) -> Settings:
    """The run's settings with test-speed backoffs."""
    return dataclasses.replace(get_settings(), **{**FAST, **kw})


@dataclasses.dataclass
class World:
    """A workspace with columns, inboxes, one config and a running run."""

    ws: Workspace
    cols: dict[str, Column]
    inboxes: list[Inbox]
    config: CampaignConfig
    run: CampaignRun

    def add_leads(self, n: int, *, inbox=None, **kw) -> list[CampaignMessage]:
        """``n`` leads in the source column, each with a pending message due now."""
        msgs = []
        for _ in range(n):
            lead = f.lead(self.ws, self.cols["New"], custom_fields={"city": "Recife", "company": "ACME"}, **kw)
            msgs.append(f.message(self.run, lead, inbox=(inbox or self.inboxes[0]).id))
        CampaignRun.update(leads_total=CampaignRun.leads_total + n).where(CampaignRun.id == self.run.id).execute()
        return msgs


def make_world(
    name: str = "acme",
    *,
    n_inboxes: int = 1,
    split: bool = False,
    max_parts: int = 1,
    fallback: str | None = None,
    inbox_kw: dict | None = None,
    **cfg_kw,
) -> World:
    """A fresh world (call inside ``clean_db``)."""
    ws, cols = f.workspace(name)
    inboxes = [f.inbox(ws, f"sales-{i}", min_gap_seconds=0, **(inbox_kw or {})) for i in range(n_inboxes)]
    cfg = f.config(
        ws,
        inboxes[0],
        cols["New"],
        cols["Contacted"],
        name="first-touch",
        split_enabled=split,
        max_parts=max_parts,
        fallback_template=fallback,
        **cfg_kw,
    )
    run = f.run(cfg)
    return World(ws, cols, inboxes, cfg, run)


def run_counters(run_id: int) -> dict:
    """The run's status and counters."""
    r = CampaignRun.get_by_id(run_id)
    return {k: getattr(r, k) for k in RUN_SNAPSHOT_FIELDS}


def row_counts(run_id: int) -> dict:
    """Counts of the run's messages by status."""
    rows = db.execute_sql(
        "SELECT status, count(*) FROM campaign_messages WHERE run_id = %s GROUP BY status", (run_id,)
    ).fetchall()
    return dict(rows)


def assert_counters_match(run_id: int) -> None:
    """The run's counters equal its row counts (what `verify` checks)."""
    c = run_counters(run_id)
    rows = row_counts(run_id)
    assert c["leads_total"] == sum(rows.values()), (c, rows)
    for status in ("sent", "failed", "skipped", "in_doubt"):
        assert c[f"leads_{status}"] == rows.get(status, 0), (status, c, rows)
    assert c["leads_processed"] == sum(rows.get(s, 0) for s in ("sent", "failed", "skipped", "in_doubt"))


def claim(message_id: int) -> None:
    """Dispatch exactly this message (pending -> queued), as the dispatcher would."""
    n = db.execute_sql(
        "UPDATE campaign_messages SET status = 'queued' WHERE id = %s AND status = 'pending' RETURNING id",
        (message_id,),
    ).fetchall()
    assert n, f"message {message_id} was not pending"


def to_sending(message_id: int, settings: Settings, llm) -> None:
    """Dispatch, generate and split one pending message: it is ``sending``, its parts ``pending``."""
    claim(message_id)
    pipeline.generate_step(message_id, settings, llm)
    pipeline.split_step(message_id, settings, llm)


def drive(message_id: int, settings: Settings, llm, evo, *, max_rounds: int = 60) -> str:
    """Run the chain for one queued message in this process, retrying as Dramatiq would; return its status."""
    for _ in range(max_rounds):
        status = CampaignMessage.get_by_id(message_id).status
        try:
            if status in ("queued", "generating"):
                # the generate actor's delivery: generate, then split in the same delivery
                if pipeline.generate_then_split(message_id, settings, llm) is None:
                    if CampaignMessage.get_by_id(message_id).status == status:
                        return status
            elif status == "splitting":
                if pipeline.split_step(message_id, settings, llm) is None:
                    return CampaignMessage.get_by_id(message_id).status
            elif status == "sending":
                out = pipeline.send_step(message_id, settings, evo)
                if out.next_delay is None and not out.sent:
                    return CampaignMessage.get_by_id(message_id).status
            else:
                return status
        except (RetryLater, Deferred) as exc:
            time.sleep(exc.delay)
        except StepFailed as exc:
            outcomes.fail_exhausted(message_id, str(exc), settings)
            return CampaignMessage.get_by_id(message_id).status
    raise AssertionError(f"message {message_id} not settled after {max_rounds} rounds")


def parts_of(message_id: int) -> list[MessagePart]:
    """The message's parts in order."""
    return list(MessagePart.select().where(MessagePart.message == message_id).order_by(MessagePart.idx))


def lead_column(lead_id: int | None) -> int | None:
    """The lead's current column id (a message's ``lead_id``: the lead must still exist)."""
    assert lead_id is not None, "the message has no lead (deleted)"
    return Lead.get_by_id(lead_id).column_id


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sending_message(text: str = "Olá, tudo bem? Uma ideia rápida para a sua loja."):
    """A world with one message in `sending` and one pending part."""
    from models import CampaignMessage, MessagePart
    from tests.integration.pipeline_helpers import make_world

    w = make_world()
    (msg,) = w.add_leads(1)
    CampaignMessage.update(status="sending", generated_text=text).where(CampaignMessage.id == msg.id).execute()
    MessagePart.create(message=msg.id, inbox=w.inboxes[0].id, idx=0, text=text)
    return w, msg


# -- the send step's statements and inbox slot, as tests watch them ------------------------------


@contextlib.contextmanager
def statements(monkeypatch) -> Iterator[list[str]]:
    """Every statement this process sends while the block runs (as the caller wrote it)."""
    seen: list[str] = []
    real = db.obj.execute_sql

    def execute_sql(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.append(sql)
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(db.obj, "execute_sql", execute_sql)
    try:
        yield seen
    finally:
        monkeypatch.undo()


def slot_state(inbox_id: int) -> tuple:
    """(slot free, gap started) of the inbox's send slot."""
    from campaign import ratelimit

    return db.execute_sql(
        "SELECT lease_token IS NULL, last_at IS NOT NULL FROM rate_limits WHERE key = %s",
        (ratelimit.inbox_key(inbox_id),),
    ).fetchone()


def no_wait(wait: float) -> None:
    """A send step's ``pace`` where the inbox's slot must be free."""
    raise AssertionError(f"the inbox's slot was free, yet the step was told to wait {wait:.2f}s")


class Paused(Exception):
    """Stands for the middleware's SkipMessage in a direct call of a paced send step."""


@contextlib.contextmanager
def answer_lost(statement: str) -> Iterator[None]:
    """E-16 for one of the chain's statements: it commits, its answer is lost, and it runs again on a
    fresh connection (as campaign.db re-runs it) — each time the chain runs it inside the block."""
    real = pipeline._named

    def twice(sql: str, params: Any) -> Any:
        if sql is statement:
            real(sql, params)  # committed; its answer lost
        return real(sql, params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_named", twice)
        yield
