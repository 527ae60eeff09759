"""Small builders of domain rows for tests (real PostgreSQL, through the models)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools

from campaign.db import db
from models import CampaignConfig, CampaignMessage, CampaignRun, Column, Inbox, Lead, Workspace

_seq = itertools.count(1)


def workspace(name: str | None = None, columns: tuple[str, ...] = ("New", "Contacted", "Replied")):
    """A workspace with its kanban columns; returns (workspace, {name: column})."""
    ws = Workspace.create(name=name or f"ws{next(_seq)}")
    cols = {c: Column.create(workspace=ws, name=c, position=i) for i, c in enumerate(columns)}
    return ws, cols


def inbox(ws: Workspace, name: str | None = None, **kw) -> Inbox:
    """An inbox (Evolution instance) of ``ws``."""
    n = name or f"inbox{next(_seq)}"
    return Inbox.create(workspace=ws, name=n, instance_name=kw.pop("instance_name", f"{ws.name}-{n}"), **kw)


def lead(ws: Workspace, column: Column | None, name: str | None = None, phone: str | None = None, **kw) -> Lead:
    """A lead of ``ws`` sitting in ``column``."""
    i = next(_seq)
    # +5511910000001 on: never one of the low numbers tests pick by hand (e.g. +5511900000099), which
    # a session-wide sequence would otherwise reach after enough earlier tests
    return Lead.create(
        workspace=ws, column=column, name=name or f"Lead {i}", phone=phone or f"+55119{10_000_000 + i:08d}", **kw
    )


def config(
    ws: Workspace, ibx: Inbox, source: Column, target: Column | None, name: str | None = None, **kw
) -> CampaignConfig:
    """A campaign config with test-friendly defaults (always open, no gaps)."""
    defaults = dict(
        daily_limit=1000,
        gap_min_seconds=0,
        gap_max_seconds=0,
        part_gap_min_seconds=0,
        part_gap_max_seconds=0,
        model="test/model",
        system_prompt="Be brief.",
    )
    defaults.update(kw)
    return CampaignConfig.create(
        workspace=ws,
        name=name or f"camp{next(_seq)}",
        inbox=ibx,
        source_column=source,
        target_column=target,
        **defaults,
    )


def run(cfg: CampaignConfig, run_date: dt.date | None = None, status: str = "running", **kw) -> CampaignRun:
    """A run of ``cfg``."""
    return CampaignRun.create(config=cfg, run_date=run_date or dt.date.today(), status=status, **kw)


def message(r: CampaignRun, ld: Lead | None, **kw) -> CampaignMessage:
    """A campaign message of run ``r`` for lead ``ld``."""
    kw.setdefault("scheduled_at", dt.datetime.now(dt.UTC))
    kw.setdefault("inbox", r.config.inbox_id)
    return CampaignMessage.create(run=r, lead=ld, **kw)


@contextlib.contextmanager
def recorded_sql():
    """Every SQL statement run through ``db.execute_sql`` inside the block."""
    real = db.obj.execute_sql
    seen: list[str] = []

    def spy(sql, params=None, *a, **kw):
        seen.append(sql)
        return real(sql, params, *a, **kw)

    db.obj.execute_sql = spy
    try:
        yield seen
    finally:
        del db.obj.execute_sql


def bulk_leads(ws, column, n: int, start: int = 0) -> None:
    """``n`` leads with valid, distinct phones in one statement."""
    db.execute_sql(
        """INSERT INTO leads (workspace_id, column_id, name, phone)
                      SELECT %s, %s, 'Lead ' || g, '+5521' || (900000000 + g)::text
                        FROM generate_series(%s, %s) g""",
        (ws.id, column.id, start + 1, start + n),
    )


def messages_of(run_id: int) -> list[CampaignMessage]:
    return list(CampaignMessage.select().where(CampaignMessage.run == run_id).order_by(CampaignMessage.scheduled_at))


def pool(cfg: CampaignConfig, *inboxes: Inbox) -> CampaignConfig:
    """Make ``inboxes`` the sender pool of ``cfg`` (R-POOL-1), the first one its ``inbox_id``."""
    db.execute_sql("DELETE FROM campaign_config_inboxes WHERE config_id = %s", (cfg.id,))
    for pos, ibx in enumerate(inboxes):
        db.execute_sql(
            "INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position) VALUES (%s, %s, %s, %s)",
            (cfg.id, ibx.id, cfg.workspace_id, pos),
        )
    db.execute_sql("UPDATE campaign_configs SET inbox_id = %s WHERE id = %s", (inboxes[0].id, cfg.id))
    return CampaignConfig.get_by_id(cfg.id)
