"""Pool checkout without a `SELECT 1` per delivery (issue 7, T-PERF-1), and no loss of E-16 healing."""

from __future__ import annotations

import threading

import psycopg2
import pytest

from campaign.db import db
from campaign.settings import get_settings
from tests.integration.workers import terminate_backend


def _in_thread(fn):
    """Run ``fn`` in a fresh thread (its own pooled connection, as a worker thread); return its result."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # surfaced to the test below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _checkout_and_backend_pid() -> int:
    db.connect(reuse_if_open=True)
    try:
        return db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    finally:
        db.close()


def _backends_state() -> dict[int, object]:
    """pid -> time of its last state change, for every other backend of this test database."""
    admin = psycopg2.connect(get_settings().database_url)
    try:
        with admin.cursor() as cur:
            cur.execute("""SELECT pid, state_change FROM pg_stat_activity
                           WHERE datname = current_database() AND pid <> pg_backend_pid()""")
            return dict(cur.fetchall())
    finally:
        admin.close()


def test_checkout_sends_no_statement(services):
    """A pooled connection handed out again costs no round trip (peewee's default pings with SELECT 1)."""
    pid = _in_thread(_checkout_and_backend_pid)  # a connection now sits idle in the pool
    before = _backends_state()
    assert pid in before

    def checkout_only() -> int:
        db.connect(reuse_if_open=True)
        try:
            return db.connection().get_backend_pid()
        finally:
            db.close()

    reused = _in_thread(checkout_only)
    assert reused in before, "the checkout opened a new connection instead of reusing the pooled one"
    after = _backends_state()
    assert after[reused] == before[reused], "the checkout sent a statement to the server"


def test_a_pooled_connection_killed_while_idle_heals_on_the_first_statement(services):
    """E-16: the backend of an idle pooled connection is terminated; the next unit of work runs normally."""
    pid = _in_thread(_checkout_and_backend_pid)
    terminate_backend(pid)

    def work() -> int:
        db.connect(reuse_if_open=True)
        try:
            return db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        finally:
            db.close()

    new_pid = _in_thread(work)
    assert new_pid != pid


def test_a_transaction_on_a_pooled_connection_killed_while_idle_heals(services):
    """E-16: the first thing of the unit of work is ``db.atomic()``: BEGIN runs again on a fresh connection."""
    pid = _in_thread(_checkout_and_backend_pid)
    terminate_backend(pid)

    def work() -> tuple[int, int]:
        db.connect(reuse_if_open=True)
        try:
            with db.atomic():
                a = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
                b = db.execute_sql("SELECT txid_current()").fetchone()[0]
            return a, b
        finally:
            db.close()

    new_pid, txid = _in_thread(work)
    assert new_pid != pid and txid > 0


def _fill_pool_and_terminate_every_idle_backend(n: int = 3) -> list[int]:
    """``n`` connections (at least) idle in the pool, then every idle pooled backend terminated:
    the "full pool termination" of a server restart or a chaos fault."""
    barrier = threading.Barrier(n)

    def hold() -> None:
        db.connect(reuse_if_open=True)
        try:
            db.execute_sql("SELECT 1")
            barrier.wait(10)  # n connections checked out at once, so n distinct ones go back
        finally:
            db.close()

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pids = [conn.get_backend_pid() for _, _, conn in list(db.obj._connections)]
    assert len(pids) >= n
    for pid in pids:
        terminate_backend(pid)
    return pids


def test_after_a_full_pool_termination_the_retry_gets_a_fresh_connection(services):
    """Issue 23 item 8 (E-16): after every pooled connection was terminated, the single retry used
    to check out another dead connection from the pool and fail; it now opens a new one."""
    dead = _fill_pool_and_terminate_every_idle_backend()

    def work() -> int:
        db.connect(reuse_if_open=True)
        try:
            return db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        finally:
            db.close()

    assert _in_thread(work) not in dead
    dead = _fill_pool_and_terminate_every_idle_backend()

    def transaction() -> int:
        db.connect(reuse_if_open=True)
        try:
            with db.atomic():
                return db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        finally:
            db.close()

    assert _in_thread(transaction) not in dead


# --------------------------------------------------------------------------------------------
# hot statements run prepared (campaign.db.prepared, issue 20)


def _session_statements() -> set[str]:
    return {r[0] for r in db.execute_sql("SELECT name FROM pg_prepared_statements").fetchall()}


def test_a_hot_statement_is_prepared_once_per_connection_and_answers_as_text_would(clean_db):
    from campaign.db import _hot, prepared

    sql = prepared("SELECT %(a)s::int + %(b)s::int AS total, %(a)s::int * 2 AS twice")
    hot = _hot[sql]
    assert hot is not None
    with db.connection_context():
        assert db.execute_sql(sql, {"a": 2, "b": 3}).fetchone() == (5, 4)
        assert hot.name in _session_statements()
        assert db.execute_sql(sql, {"a": 10, "b": -1}).fetchone() == (9, 20)
        # inside a transaction it is sent as text (an explicit transaction keeps what it is sent)
        with db.atomic():
            assert db.execute_sql(sql, {"a": 1, "b": 1}).fetchone() == (2, 2)


def test_a_hot_statement_is_planned_once_generically_never_custom(clean_db):
    """T-PERF-1: PostgreSQL would custom-plan a prepared statement on its first five runs on each
    connection (~2 ms of server CPU each for the chain's big statements); the engine's sessions
    plan every hot statement once, generically (all of them find their rows by key)."""
    from campaign.db import _hot, prepared

    sql = prepared("SELECT count(*) FROM campaign_messages WHERE id = %(id)s AND status = ANY(%(st)s)")
    hot = _hot[sql]
    assert hot is not None
    with db.connection_context():
        for i in range(3):
            db.execute_sql(sql, {"id": i, "st": ["queued", "sending"]})
        plans = db.execute_sql(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s", (hot.name,)
        ).fetchone()
    assert plans == (3, 0), plans


def test_a_connections_first_hot_statement_prepares_them_all_in_one_round_trip(clean_db, monkeypatch):
    """A fresh pooled connection prepares every hot statement known (the chain's rare paths too)
    with its first one, in one round trip — not one round trip and parse per statement later."""
    import pipeline  # noqa: F401  (registers the chain's hot statements)
    from campaign.db import _hot, prepared
    from tests.integration.pipeline_helpers import statements
    from tests.integration.workers import terminate_own_connection

    sql = prepared("SELECT %(a)s::int * 3 AS thrice")
    with db.connection_context():
        terminate_own_connection()  # the next statement runs on a fresh connection
        with pytest.MonkeyPatch.context() as mp, statements(mp):
            assert db.execute_sql(sql, {"a": 2}).fetchone() == (6,)
        known = {h.name for h in _hot.values() if h is not None}
        assert len(known) > 5 and known <= _session_statements(), known - _session_statements()


def test_a_statement_postgresql_cannot_prepare_runs_as_text_and_says_so(clean_db, caplog):
    from campaign.db import _hot, prepared

    sql = prepared("SELECT %s IS NULL AS untyped")  # PostgreSQL cannot tell the type of $1 here
    with caplog.at_level("WARNING", logger="campaign.db"), db.connection_context():
        assert db.execute_sql(sql, ("x",)).fetchone() == (False,)
        assert db.execute_sql(sql, (None,)).fetchone() == (True,)
    assert _hot[sql] is None and caplog.text.count("cannot be prepared") == 1


def test_a_prepared_statement_survives_its_connection_being_terminated(clean_db):
    """E-16: the pool replaces a terminated connection; the new session prepares the statement again."""
    from campaign.db import prepared
    from tests.integration.workers import terminate_own_connection

    sql = prepared("SELECT count(*) FROM workspaces WHERE id > %(floor)s")
    with db.connection_context():
        assert db.execute_sql(sql, {"floor": 0}).fetchone() == (0,)
        terminate_own_connection()
        assert db.execute_sql(sql, {"floor": -1}).fetchone() == (0,)


def test_a_schema_change_under_a_prepared_statement_is_survived(clean_db):
    """A migration while a worker runs can change a statement's result type: PostgreSQL refuses the
    old plan ("cached plan must not change result type"); the statement runs as text and is
    prepared again next time."""
    from campaign.db import _hot, prepared

    db.execute_sql("DROP TABLE IF EXISTS prepared_probe")
    db.execute_sql("CREATE TABLE prepared_probe (a int)")
    db.execute_sql("INSERT INTO prepared_probe VALUES (1)")
    sql = prepared("SELECT * FROM prepared_probe WHERE a >= %(a)s")
    try:
        with db.connection_context():
            assert db.execute_sql(sql, {"a": 0}).fetchall() == [(1,)]
            db.execute_sql("ALTER TABLE prepared_probe ADD COLUMN b int DEFAULT 7")
            assert db.execute_sql(sql, {"a": 0}).fetchall() == [(1, 7)]
            assert db.execute_sql(sql, {"a": 0}).fetchall() == [(1, 7)]
            hot = _hot[sql]
            assert hot is not None and hot.name in _session_statements()
    finally:
        db.execute_sql("DROP TABLE IF EXISTS prepared_probe")
