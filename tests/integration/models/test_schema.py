"""Schema rules carried by PostgreSQL itself, and versioned idempotent migrations (issue 2)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import peewee
import psycopg2
import pytest
from playhouse.postgres_ext import ArrayField

from campaign.db import db
from models import CampaignMessage, CampaignRun, Lead, MessagePart
from models.schema import LATEST, MIGRATIONS
from tests import ROOT
from tests.integration import factories as f


@pytest.fixture
def world(clean_db):
    ws, cols = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="first-touch")
    run = f.run(cfg)
    return ws, cols, ibx, cfg, run


def test_duplicate_run_lead_rejected(world):
    ws, cols, _, _, run = world
    lead = f.lead(ws, cols["New"])
    f.message(run, lead)
    with pytest.raises(peewee.IntegrityError, match="campaign_messages_run_id_lead_id_key"):
        with db.atomic():
            f.message(run, lead)


def test_duplicate_config_run_date_rejected(world):
    _, _, _, cfg, run = world
    with pytest.raises(peewee.IntegrityError, match="campaign_runs_config_id_run_date_key"):
        with db.atomic():
            f.run(cfg, run_date=run.run_date)
    # another date is fine
    f.run(cfg, run_date=run.run_date + dt.timedelta(days=1))


def test_duplicate_part_index_rejected(world):
    ws, cols, _, _, run = world
    msg = f.message(run, f.lead(ws, cols["New"]))
    MessagePart.create(message=msg, inbox=msg.inbox_id, idx=0, text="hello")
    with pytest.raises(peewee.IntegrityError, match="message_parts_message_id_idx_key"):
        with db.atomic():
            MessagePart.create(message=msg, inbox=msg.inbox_id, idx=0, text="again")


def test_deleting_lead_keeps_message_with_null_lead(world):
    """E-01: the message row survives a hard delete of its lead (FK ON DELETE SET NULL)."""
    ws, cols, _, _, run = world
    lead = f.lead(ws, cols["New"])
    msg = f.message(run, lead)
    Lead.delete().where(Lead.id == lead.id).execute()
    survivor = CampaignMessage.get_by_id(msg.id)
    assert survivor.lead_id is None
    assert survivor.status == "pending"


@pytest.mark.parametrize(
    "table,column,value",
    [
        ("campaign_messages", "status", "exploded"),
        ("campaign_runs", "status", "done"),
        ("message_parts", "status", "maybe"),
        ("message_parts", "delivery_status", "seen"),
    ],
)
def test_invalid_status_rejected(world, table, column, value):
    ws, cols, _, _, run = world
    msg = f.message(run, f.lead(ws, cols["New"]))
    part = MessagePart.create(message=msg, inbox=msg.inbox_id, idx=0, text="hi")
    row_id = {"campaign_messages": msg.id, "campaign_runs": run.id, "message_parts": part.id}[table]
    with pytest.raises(peewee.IntegrityError, match="check constraint"):
        with db.atomic():
            db.execute_sql(f"UPDATE {table} SET {column} = %s WHERE id = %s", (value, row_id))


def test_counters_must_add_up(world):
    """leads_processed is exactly the sum of the outcome counters, and never above the total."""
    _, _, _, _, run = world
    with pytest.raises(peewee.IntegrityError, match="check constraint"):
        with db.atomic():
            CampaignRun.update(leads_total=5, leads_processed=1).where(CampaignRun.id == run.id).execute()
    with pytest.raises(peewee.IntegrityError, match="check constraint"):
        with db.atomic():
            CampaignRun.update(leads_total=0, leads_processed=1, leads_sent=1).where(CampaignRun.id == run.id).execute()
    CampaignRun.update(leads_total=5, leads_processed=2, leads_sent=1, leads_skipped=1).where(
        CampaignRun.id == run.id
    ).execute()


def test_cross_workspace_references_rejected(world):
    """E-20 at the database level: a config cannot use another workspace's inbox or columns."""
    ws, cols, ibx, _, _ = world
    other, other_cols = f.workspace("other")
    other_inbox = f.inbox(other, "x")
    with pytest.raises(peewee.IntegrityError, match="foreign key"):
        with db.atomic():
            f.config(ws, other_inbox, cols["New"], cols["Contacted"])
    with pytest.raises(peewee.IntegrityError, match="foreign key"):
        with db.atomic():
            f.config(ws, ibx, cols["New"], other_cols["Contacted"])
    with pytest.raises(peewee.IntegrityError, match="foreign key"):
        with db.atomic():
            f.lead(ws, other_cols["New"])


def test_deleting_target_column_keeps_config(world):
    """E-09 at the database level: the config survives with no target column."""
    _, cols, _, cfg, _ = world
    cols["Contacted"].delete_instance()
    cfg = type(cfg).get_by_id(cfg.id)
    assert cfg.target_column_id is None
    assert cfg.workspace_id is not None


def test_dispatcher_claim_uses_partial_index(world):
    # tiny tables may be seq-scanned; force the planner's hand to prove the index fits the query
    db.execute_sql("SET enable_seqscan = off")
    try:
        plan = "\n".join(
            r[0]
            for r in db.execute_sql(
                "EXPLAIN SELECT id FROM campaign_messages WHERE status = 'pending' AND scheduled_at <= now() "
                "ORDER BY scheduled_at LIMIT 500 FOR UPDATE SKIP LOCKED"
            ).fetchall()
        )
    finally:
        db.execute_sql("SET enable_seqscan = on")
    assert "campaign_messages_due_idx" in plan


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _dump_schema(database_url: str) -> list[tuple]:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("""SELECT table_name, column_name, data_type, is_nullable, column_default
                           FROM information_schema.columns WHERE table_schema = 'public'
                           ORDER BY 1, 2""")
            cols = cur.fetchall()
            cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint ORDER BY 1")
            cons = cur.fetchall()
            cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
            idx = cur.fetchall()
        return cols + cons + idx
    finally:
        conn.close()


def test_init_db_twice_is_a_noop(fresh_database):
    first = _cli(fresh_database, "init-db")
    assert first.returncode == 0, first.stderr
    assert f"schema upgraded to version {LATEST}" in first.stdout
    before = _dump_schema(fresh_database)
    second = _cli(fresh_database, "init-db")
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert _dump_schema(fresh_database) == before


def test_upgrade_from_previous_version_keeps_rows(fresh_database):
    previous = MIGRATIONS[-2].version
    assert _cli(fresh_database, "init-db", "--target", str(previous)).returncode == 0
    conn = psycopg2.connect(fresh_database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO workspaces (name) VALUES ('keep') RETURNING id")
        ws = cur.fetchone()[0]
        cur.execute("INSERT INTO columns (workspace_id, name) VALUES (%s, 'New') RETURNING id", (ws,))
        col = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO leads (workspace_id, column_id, name, phone) VALUES (%s, %s, 'Ana', '+5511999990000')",
            (ws, col),
        )
        cur.execute("SELECT max(version) FROM schema_version")
        assert cur.fetchone()[0] == previous
    upgraded = _cli(fresh_database, "init-db")
    assert upgraded.returncode == 0, upgraded.stderr
    with conn.cursor() as cur:
        cur.execute(
            "SELECT w.name, c.name, l.name, l.phone FROM leads l JOIN columns c ON c.id = l.column_id "
            "JOIN workspaces w ON w.id = l.workspace_id"
        )
        assert cur.fetchall() == [("keep", "New", "Ana", "+5511999990000")]
        cur.execute("SELECT max(version) FROM schema_version")
        assert cur.fetchone()[0] == LATEST
        cur.execute("SELECT count(*) FROM dead_letters")  # a table of the newer version exists
        assert cur.fetchone()[0] == 0
    conn.close()


def test_concurrent_init_db_applies_once(fresh_database):
    env = {**os.environ, "DATABASE_URL": fresh_database}
    procs = [
        subprocess.Popen(
            [sys.executable, "cli.py", "init-db"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    conn = psycopg2.connect(fresh_database)
    with conn.cursor() as cur:
        cur.execute("SELECT version, count(*) FROM schema_version GROUP BY version ORDER BY version")
        assert cur.fetchall() == [(m.version, 1) for m in MIGRATIONS]
    conn.close()


# --------------------------------------------------------------------------------------------
# the peewee models match the migrated schema (DESIGN: models/ + models/schema.py)

#: the PostgreSQL type (information_schema data_type) each peewee field type is stored as
PG_TYPE = {
    "BIGAUTO": "bigint",
    "BIGINT": "bigint",
    "INT": "integer",
    "TEXT": "text",
    "TIMESTAMPTZ": "timestamp with time zone",
    "BOOL": "boolean",
    "DOUBLE": "double precision",
    "JSONB": "jsonb",
    "UUID": "uuid",
    "DATE": "date",
}


def _schema_columns() -> dict[str, dict[str, tuple[str, bool]]]:
    """table -> column -> (data_type, nullable) of the session's migrated database."""
    out: dict[str, dict[str, tuple[str, bool]]] = {}
    for table, column, data_type, nullable in db.execute_sql(
        """SELECT table_name, column_name, data_type, is_nullable = 'YES' FROM information_schema.columns
            WHERE table_schema = 'public'"""
    ):
        out.setdefault(table, {})[column] = (data_type, nullable)
    return out


def _schema_foreign_keys() -> set[tuple[str, str, str]]:
    """(table, column, referenced table) of every foreign key (composite ones column by column)."""
    return set(
        db.execute_sql(
            """SELECT tc.table_name, kcu.column_name, ccu.table_name
                 FROM information_schema.table_constraints tc
                 JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)
                 JOIN information_schema.constraint_column_usage ccu USING (constraint_schema, constraint_name)
                WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_schema = 'public'"""
        ).fetchall()
    )


def test_the_models_match_the_migrated_schema(services):
    """Every table has a model and every model a table; each field is a column of the same type,
    NOT NULL where the model requires a value, nullable only where the model allows None, and a
    foreign key field references its model's table (directly or through a composite key). A
    migration that forgets the model (or the reverse) fails here, not in production."""
    from models import ALL_MODELS

    with db.connection_context():
        columns, foreign_keys = _schema_columns(), _schema_foreign_keys()
    problems: list[str] = []
    tables = {m._meta.table_name: m for m in ALL_MODELS}
    problems += [f"table {t} has no model" for t in sorted(set(columns) - set(tables) - {"schema_version"})]
    problems += [f"model {m.__name__} has no table {t}" for t, m in sorted(tables.items()) if t not in columns]
    for table, model in sorted(tables.items()):
        have = columns.get(table, {})
        fields = {f.column_name: f for f in model._meta.sorted_fields}
        problems += [f"{table}.{c} is not a field of {model.__name__}" for c in sorted(set(have) - set(fields))]
        for name, field in fields.items():
            if name not in have:
                problems.append(f"{model.__name__}.{field.name}: no column {table}.{name}")
                continue
            data_type, nullable = have[name]
            expected = "ARRAY" if isinstance(field, ArrayField) else PG_TYPE.get(field.field_type, field.field_type)
            if data_type != expected:
                problems.append(f"{table}.{name} is {data_type}, the model says {field.field_type} ({expected})")
            if nullable and not field.null:
                problems.append(f"{table}.{name} is nullable, the model requires a value")
            if not nullable and field.null and name not in DB_FILLED:
                problems.append(f"{table}.{name} is NOT NULL, the model allows None")
            if isinstance(field, peewee.ForeignKeyField):
                target = field.rel_model._meta.table_name
                # directly, or through a composite key whose table references it by the same column
                # (campaign_config_inboxes.workspace_id: via its config's and its inbox's workspace_id)
                via = {t for tbl, col, t in foreign_keys if (tbl, col) == (table, name)}
                if target not in via and not any((t, name, target) in foreign_keys for t in via):
                    problems.append(f"{table}.{name} has no foreign key to {target}")
    assert problems == [], "models vs schema:\n" + "\n".join(problems)


#: NOT NULL columns the model leaves to the database (a default fills them on insert)
DB_FILLED = {"created_at", "updated_at", "status_changed_at"}


def test_the_model_check_can_fail(services, monkeypatch):
    """The check itself: a model field the schema lacks is reported (a test that cannot fail proves nothing)."""
    from models import Lead as LeadModel

    monkeypatch.setitem(LeadModel._meta.fields, "nickname", peewee.TextField(column_name="nickname"))
    field = LeadModel._meta.fields["nickname"]
    field.model, field.name = LeadModel, "nickname"
    monkeypatch.setattr(LeadModel._meta, "sorted_fields", [*LeadModel._meta.sorted_fields, field])
    with pytest.raises(AssertionError, match=r"Lead.nickname: no column leads.nickname"):
        test_the_models_match_the_migrated_schema(services)


def test_models_match_schema(clean_db):
    """Every peewee model names exactly the columns of its table (models == schema)."""
    from models import ALL_MODELS

    rows = db.execute_sql(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
    ).fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    for model in ALL_MODELS:
        table = model._meta.table_name
        assert table in tables, f"model {model.__name__}: no table {table!r}"
        fields = {fld.column_name for fld in model._meta.sorted_fields}
        assert fields == tables[table], f"model {model.__name__} vs table {table}: {fields ^ tables[table]}"


def test_upgrade_to_pools_makes_one_inbox_configs_pools_of_one(fresh_database):
    """R-POOL-1: the migration to sender pools turns every existing config into a pool of its one inbox."""
    pool_version = next(m.version for m in MIGRATIONS if "sender pools" in m.name)
    assert _cli(fresh_database, "init-db", "--target", str(pool_version - 1)).returncode == 0
    conn = psycopg2.connect(fresh_database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO workspaces (name) VALUES ('keep') RETURNING id")
        ws = cur.fetchone()[0]
        cur.execute("INSERT INTO columns (workspace_id, name) VALUES (%s, 'New'), (%s, 'Done') RETURNING id", (ws, ws))
        src, dst = (r[0] for r in cur.fetchall())
        cur.execute(
            "INSERT INTO inboxes (workspace_id, name, instance_name) VALUES (%s, 'a', 'keep-a'), (%s, 'b', 'keep-b') "
            "RETURNING id",
            (ws, ws),
        )
        ia, ib = (r[0] for r in cur.fetchall())
        cfg_ids = []
        for name, ibx in (("one", ia), ("two", ib)):
            cur.execute(
                """INSERT INTO campaign_configs (workspace_id, name, inbox_id, source_column_id, target_column_id,
                       daily_limit, gap_min_seconds, gap_max_seconds, model, system_prompt)
                   VALUES (%s, %s, %s, %s, %s, 10, 0, 0, 'm', 'p') RETURNING id""",
                (ws, name, ibx, src, dst),
            )
            cfg_ids.append(cur.fetchone()[0])
    assert _cli(fresh_database, "init-db").returncode == 0
    with conn.cursor() as cur:
        cur.execute(
            "SELECT config_id, inbox_id, workspace_id, position FROM campaign_config_inboxes ORDER BY config_id"
        )
        assert cur.fetchall() == [(cfg_ids[0], ia, ws, 0), (cfg_ids[1], ib, ws, 0)]
    conn.close()


def test_pool_member_of_another_workspace_rejected(world):
    """E-20: a pool member must be an inbox of the config's own workspace (a composite foreign key)."""
    ws, cols, ibx, cfg, run = world
    other_ws, _ = f.workspace("other")
    foreign = f.inbox(other_ws, "theirs")
    with pytest.raises(peewee.IntegrityError), db.atomic():
        db.execute_sql(
            "INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position) VALUES (%s, %s, %s, 1)",
            (cfg.id, foreign.id, ws.id),
        )
    with pytest.raises(peewee.IntegrityError), db.atomic():
        db.execute_sql(
            "INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position) VALUES (%s, %s, %s, 1)",
            (cfg.id, foreign.id, other_ws.id),
        )


def test_config_inbox_is_always_a_pool_member(world):
    """R-POOL-1: a config's inbox_id (its first member) is always in its pool, whoever writes the config."""
    ws, cols, ibx, cfg, run = world
    pool = lambda: db.execute_sql(  # noqa: E731
        "SELECT inbox_id, position FROM campaign_config_inboxes WHERE config_id = %s ORDER BY position", (cfg.id,)
    ).fetchall()
    assert pool() == [(ibx.id, 0)]
    second = f.inbox(ws, "sales-2")
    db.execute_sql(
        "INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position) VALUES (%s, %s, %s, 1)",
        (cfg.id, second.id, ws.id),
    )
    db.execute_sql("UPDATE campaign_configs SET inbox_id = %s WHERE id = %s", (second.id, cfg.id))
    assert pool() == [(ibx.id, 0), (second.id, 1)]  # already a member: the pool stays
    third = f.inbox(ws, "sales-3")
    db.execute_sql("UPDATE campaign_configs SET inbox_id = %s WHERE id = %s", (third.id, cfg.id))
    assert pool() == [(third.id, 0)]  # an inbox outside the pool: a pool of that one inbox
