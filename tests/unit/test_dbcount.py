"""bench/dbcount.py: a hot statement run prepared (campaign.db.prepared) is counted as the statement
it executes — its label, and whether its commit writes and waits for the WAL flush — and its one
PREPARE per connection is a round trip that commits nothing."""

from __future__ import annotations

from bench import dbcount
from campaign.db import ASYNC_COMMIT, _hot, prepared


def test_an_execute_is_counted_as_the_statement_it_runs():
    sql = prepared(ASYNC_COMMIT + "UPDATE campaign_messages SET status = %(to)s WHERE id = %(id)s RETURNING id")
    hot = _hot[sql]
    assert hot is not None and hot.execute_sql.startswith(ASYNC_COMMIT + "EXECUTE ce_")
    assert hot.prepare_sql.endswith("UPDATE campaign_messages SET status = $1 WHERE id = $2 RETURNING id")
    assert dbcount._label(hot.execute_sql) == dbcount._label(sql)

    conn = object()
    dbcount.set_actor("unit")
    before = dict(dbcount._commits), dict(dbcount._async_commits)
    dbcount._track_commit(conn, hot.prepare_sql)
    assert dbcount._commits.get("unit", 0) == before[0].get("unit", 0)  # PREPARE writes nothing
    dbcount._track_commit(conn, hot.execute_sql)
    assert dbcount._commits["unit"] == before[0].get("unit", 0) + 1  # an asynchronous write commit
    assert dbcount._async_commits["unit"] == before[1].get("unit", 0) + 1
    dbcount.set_actor(None)


def test_positional_parameters_and_percent_signs():
    sql = prepared("SELECT %s::int + %s::int, 'a%%b' WHERE true")
    hot = _hot[sql]
    assert hot is not None
    assert hot.prepare_sql.endswith("SELECT $1::int + $2::int, 'a%%b' WHERE true")  # psycopg2 turns %% into %
    assert hot.execute_sql == f"EXECUTE {hot.name}(%s, %s)"
