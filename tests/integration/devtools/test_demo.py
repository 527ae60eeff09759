"""The demo end to end (issue 8): its real entry points, in embedded mode and on the real services.

Each test runs the demo as a user does (a subprocess: the broker is built once per process) against
the session's sandbox, then checks the outcome ROWS in the database the demo used and the sandbox
LEDGER itself, not what the demo printed about them.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg2
import pytest

from campaign.db import connect_kwargs
from devtools import demo, demo_triage
from tests import ROOT

pytestmark = pytest.mark.timeout(150)

WELCOME_LEADS, COMEBACK_LEADS = 32, 27  # examples/demo_leads.csv: 33 "new" rows (one invalid phone), 27 "returning"


def _run(cmd: list[str], tmp_path: Path, sb, *, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run a demo entry point against the session sandbox; (its JSON outcome, its output)."""
    out = tmp_path / "outcome.json"
    done = subprocess.run(
        [*cmd, "--sandbox-url", sb.url, "--output-dir", str(tmp_path / "pictures"), "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=140,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return json.loads(out.read_text()), output


def _rows(conn, sql: str, params: tuple = ()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _assert_outcome(conn, result: dict, output: str, sb) -> None:
    """The rows and the ledger of one demo run (shared by both modes)."""
    assert result["ok"] and not result["mismatches"], result
    runs = {r["campaign"]: r for r in result["runs"]}
    assert set(runs) == {"welcome", "comeback"}
    run_ids = [r["id"] for r in result["runs"]]
    seq = result["sequence"]  # the follow-up a "day" later (R-SEQ-3): checked in _assert_follow_up
    all_ids = run_ids + seq["run_ids"]

    # every message terminal, and exactly the planted outcomes
    outcome = {
        phone: (status, reason)
        for phone, status, reason in _rows(
            conn,
            """
        SELECT l.phone, m.status, coalesce(m.skip_reason, m.error_class)
          FROM campaign_messages m JOIN leads l ON l.id = m.lead_id WHERE m.run_id = ANY(%s)""",
            (run_ids,),
        )
    }
    assert len(outcome) == WELCOME_LEADS + COMEBACK_LEADS
    assert outcome.pop(demo.NOT_ON_WHATSAPP) == ("failed", "invalid_number")
    assert outcome.pop(demo.OPTS_OUT) == ("skipped", "opted_out")
    # R-IN: the two leads that answered: their first part had gone out, so their messages are `sent`
    heard = result["listening"]
    midway = heard["midway_phone"]
    assert midway and outcome.pop(midway) == ("sent", None)
    assert outcome.pop(demo.OPTS_OUT_BY_REPLY) == ("sent", None)
    assert {s for s, _ in outcome.values()} == {"sent"}, collections.Counter(s for s, _ in outcome.values())

    # counters equal row counts, both runs completed
    for _run_id, status, total, processed, sent, failed, skipped, in_doubt, n, n_sent, n_failed, n_skipped in _rows(
        conn,
        """SELECT r.id, r.status, r.leads_total, r.leads_processed, r.leads_sent, r.leads_failed,
                            r.leads_skipped, r.leads_in_doubt, count(m.id),
                            count(m.id) FILTER (WHERE m.status = 'sent'),
                            count(m.id) FILTER (WHERE m.status = 'failed'),
                            count(m.id) FILTER (WHERE m.status = 'skipped')
                       FROM campaign_runs r JOIN campaign_messages m ON m.run_id = r.id
                      WHERE r.id = ANY(%s) GROUP BY r.id""",
        (run_ids,),
    ):
        assert status == "completed"
        assert (total, processed, sent, failed, skipped, in_doubt) == (n, n, n_sent, n_failed, n_skipped, 0)
    assert runs["welcome"]["total"] == WELCOME_LEADS and runs["welcome"]["failed"] == 1

    # R-OBS-1/2: the demo served its metrics and printed the dashboard's "Messages by status" panel
    # from a scrape of them; the panel equals the rows (counted here, not by the demo)
    by_status = dict(
        _rows(conn, "SELECT status, count(*) FROM campaign_messages WHERE run_id = ANY(%s) GROUP BY status", (all_ids,))
    )
    assert result["metrics"]["values"] == by_status, (result["metrics"], by_status)
    assert result["metrics"]["url"].startswith("http://127.0.0.1:") and f"metrics: {result['metrics']['url']}" in output
    assert "dashboard panel 'Messages by status' (sum by (status) (campaign_messages))" in output
    assert runs["comeback"]["total"] == COMEBACK_LEADS and runs["comeback"]["skipped"] == 1

    # the invalid phone was rejected at import (line 22 of the CSV) and never became a lead
    assert any(r.startswith("line 22: invalid phone") for r in result["rejected_rows"]), result["rejected_rows"]
    assert _rows(conn, "SELECT count(*) FROM leads WHERE name = 'Telefone Errado'") == [(0,)]

    # leads moved: every sent lead is in Contacted; the failed and the opted-out ones stayed put
    columns = dict(
        _rows(
            conn,
            """SELECT l.phone, c.name FROM leads l JOIN columns c ON c.id = l.column_id
                                    JOIN workspaces w ON w.id = l.workspace_id WHERE w.name = %s""",
            (demo.WORKSPACE,),
        )
    )
    assert columns.pop(demo.NOT_ON_WHATSAPP) == "New"
    assert columns.pop(demo.OPTS_OUT) == "Returning"
    # who answered went to the welcome campaign's reply_column (R-IN-3)
    assert columns.pop(midway) == "Replied" and columns.pop(demo.OPTS_OUT_BY_REPLY) == "Replied"
    # the comeback leads who answered went where the AI triage of their reply says (R-IN-5); the
    # away message (out_of_office) is no reply for skip_if_replied, so that lead was followed up (E-36)
    assert len(seq["answered"]) == 2
    triaged = {r["phone"]: r for r in heard["triage"] if r["phone"] not in seq["answered"]}
    expected = {
        text: (intent, "Followed up" if intent == "out_of_office" else column)
        for text, intent, column in demo_triage.REPLIES
    }
    assert sorted(r["reply"] for r in triaged.values()) == sorted(expected), heard["triage"]
    for phone, r in triaged.items():
        assert (r["intent"], columns.pop(phone)) == expected[r["reply"]], r
        assert r["opted_out"] == (r["intent"] == "opt_out"), r
    # the two comeback leads that answered before the follow-up (one of them "PARE") were triaged
    # too and moved out of Contacted by examples/demo.toml's map; every silent lead was followed up
    mapped = {"interested": "Interested", "question": "Questions", "not_interested": "Lost", "opt_out": "Lost"}
    later = {r["phone"]: r for r in heard["triage"] if r["phone"] in seq["answered"]}
    assert sorted(later) == sorted(seq["answered"]), heard["triage"]
    for phone, r in later.items():
        assert columns.pop(phone) == mapped.get(r["intent"], "Replied"), r
        assert r["opted_out"] == (seq["answered"][phone].startswith("PARE")), r
    assert set(columns.values()) == {"Followed up"}
    assert len(columns) == WELCOME_LEADS + COMEBACK_LEADS - 6 - len(triaged)
    # the replies: one stopped its message between the parts (E-27), one opted out for good (R-IN-4),
    # the triaged ones (one of which opts out in words no keyword matches) and the follow-up step's
    # two (one of them a "PARE")
    assert (heard["replies"], heard["opt_outs"]) == (2 + len(triaged) + 2, 3), heard
    assert heard["stopped_between_parts"] >= 1 and heard["opted_out_by_reply"], heard
    assert _rows(conn, "SELECT opted_out, opted_out_reason FROM leads WHERE phone = %s", (demo.OPTS_OUT_BY_REPLY,)) == [
        (True, "PARE 🛑")
    ]

    # split on for welcome (some messages in 2-3 bubbles), off for comeback (one part each)
    parts = dict(
        _rows(
            conn,
            """SELECT c.name, array_agg(DISTINCT n) FROM (
                                    SELECT m.run_id, count(p.id) AS n FROM campaign_messages m
                                      JOIN message_parts p ON p.message_id = m.id
                                     WHERE m.run_id = ANY(%s) AND m.status = 'sent' GROUP BY m.id, m.run_id) x
                                  JOIN campaign_runs r ON r.id = x.run_id JOIN campaign_configs c ON c.id = r.config_id
                                 GROUP BY c.name""",
            (run_ids,),
        )
    )
    assert parts["comeback"] == [1] and max(parts["welcome"]) > 1 and max(parts["welcome"]) <= 3, parts

    # the ledger: each sent part exactly once, nothing to the failed/opted-out numbers, no early retry
    ledger = sb.ledger()
    # the opt-out confirmations (R-IN-4) are sends of their own, not campaign parts
    sends = [s for s in ledger["sends"] if not s["text"].startswith("Tudo bem, não vamos mais")]
    assert len(ledger["sends"]) - len(sends) <= 3  # the two "PARE" leads' and the triaged opt-out's
    assert ledger["summary"]["duplicate_sends"] == 0 and ledger["summary"]["early_retries"] == 0
    assert collections.Counter((s["instance"], s["number"], s["text"]) for s in sends).most_common(1)[0][1] == 1
    sent_keys = sorted(
        k
        for (k,) in _rows(
            conn,
            """SELECT p.provider_message_id FROM message_parts p
                                                      JOIN campaign_messages m ON m.id = p.message_id
                                                     WHERE m.run_id = ANY(%s) AND p.status = 'sent'""",
            (all_ids,),
        )
    )
    assert sent_keys == sorted(s["key_id"] for s in sends if s["outcome"] == "ok")
    numbers = {s["number"] for s in sends}
    assert len(numbers) == WELCOME_LEADS + COMEBACK_LEADS - 2
    for planted in (demo.NOT_ON_WHATSAPP, demo.OPTS_OUT):
        assert planted.lstrip("+") not in numbers
    invalid = demo.NOT_ON_WHATSAPP.lstrip("+")
    tried = [r for r in ledger["requests"] if r.get("route") == "send" and r.get("number") == invalid]
    assert [r["fault"] for r in tried] == ["invalid_number"]  # asked once, never retried (E-13)
    assert not [r for r in ledger["requests"] if r.get("number") == demo.OPTS_OUT.lstrip("+")]

    # the report of each run, text and picture
    assert len(result["pictures"]) == 3 and not result["report_missing"]
    for path in result["pictures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run_id in all_ids:
        assert f"report of run {run_id}" in output
    _assert_follow_up(conn, seq, ledger, output)


def _assert_follow_up(conn, seq: dict, ledger: dict, output: str) -> None:
    """R-SEQ-3: the follow-up wrote to exactly the silent leads of Contacted, each from the number
    of its first touch (R-POOL-2), counted who it left out, and its prompts carry the first message."""
    (follow_id,) = seq["run_ids"]
    assert seq["status"] == "completed"
    # who answered left Contacted (the welcome campaign's reply column, the comeback campaign's AI
    # triage), so the follow-up never even considered them: none is left to exclude by a rule; the
    # triage scene's away message (out_of_office) stayed and is followed up (E-36)
    moved_by_triage = sum(1 for _, intent, _ in demo_triage.REPLIES if intent != "out_of_office")
    assert _rows(
        conn,
        """SELECT excluded_too_recent, excluded_replied, excluded_opted_out, leads_total
             FROM campaign_runs WHERE id = %s""",
        (follow_id,),
    ) == [(0, 0, 0, WELCOME_LEADS + COMEBACK_LEADS - 6 - moved_by_triage)]
    followed = _rows(
        conn,
        """SELECT l.phone, l.last_reply_at IS NULL AND NOT l.opted_out, m.status, m.inbox_id,
                  (SELECT f.inbox_id FROM campaign_messages f WHERE f.lead_id = m.lead_id AND f.run_id <> m.run_id)
             FROM campaign_messages m JOIN leads l ON l.id = m.lead_id WHERE m.run_id = %s""",
        (follow_id,),
    )
    assert all(silent and status == "sent" for _, silent, status, _, _ in followed), followed
    assert not {phone for phone, *_ in followed} & (set(seq["answered"]) | {demo.OPTS_OUT_BY_REPLY})
    assert all(inbox == first_inbox for *_, inbox, first_inbox in followed)  # sticky: the same number
    assert {inbox for *_, inbox, _ in followed} == set(
        i for (i,) in _rows(conn, "SELECT id FROM inboxes WHERE name IN ('sales-1', 'sales-2')")
    )
    prompts = [
        r["messages"]
        for r in ledger["requests"]
        if r.get("route") == "chat" and r.get("status") == 200 and r.get("messages")
    ]
    follow_ups = [m for m in prompts if "<conversation>" in m[-1]["content"]]
    assert len(follow_ups) >= len(followed)
    for system, user in ((m[0]["content"], m[-1]["content"]) for m in follow_ups):
        assert "<conversation>" not in system and "name:" not in system  # lead data only in the user message
        assert "\nus: " in user
    assert "one LLM request of the follow-up" in output and "<conversation>" in output


def test_demo_embedded_pgserver_and_stub_broker(sb, tmp_path):
    """`python demo.py --embedded`: pgserver PostgreSQL + StubBroker + in-process workers, run twice."""
    import warnings

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pgserver

    # Not under tmp_path: as root, pgserver opens every parent directory to its `pgserver` user,
    # and a concurrent pytest session resets /tmp/pytest-of-root to 0700 under its feet.
    data_dir = Path(tempfile.mkdtemp(prefix="ce-demo-test-"))
    # Holding a handle keeps the server up after the demo exits (pgserver stops it with its last
    # user), so the rows can be read here.
    server = pgserver.get_server(data_dir / "pgdata", cleanup_mode="delete")
    try:
        cmd = [sys.executable, "demo.py", "--embedded", "--data-dir", str(data_dir)]
        # a short first run (4 leads), so that the real one below must reset the demo's workspace
        few = tmp_path / "few.csv"
        few.write_text(
            "".join(demo.DEFAULT_LEADS.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), encoding="utf-8"
        )
        first, _ = _run([*cmd, "--leads", str(few)], tmp_path, sb)
        assert [r["total"] for r in first["runs"]] == [4, 0]
        result, output = _run(cmd, tmp_path, sb)
        assert result["mode"] == "embedded" and "mode: embedded" in output
        assert result["database_url"].endswith(f"?host={data_dir / 'pgdata'}")
        assert min(r["id"] for r in result["runs"]) > max(r["id"] for r in first["runs"])
        conn = psycopg2.connect(server.get_uri("campaign_demo"))
        try:
            assert _rows(conn, "SELECT count(*) FROM workspaces") == [(1,)]
            # the first run's are gone: the two first touches and the follow-up of this one
            assert _rows(conn, "SELECT count(*) FROM campaign_runs") == [(3,)]
            _assert_outcome(conn, result, output, sb)
        finally:
            conn.close()
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_demo_on_real_services_through_the_cli(clean_db, sb, tmp_path):
    """`python cli.py demo --services` on the session's PostgreSQL database and RabbitMQ vhost."""
    db_url, mq_url = os.environ["DATABASE_URL"], os.environ["RABBITMQ_URL"]
    database = unquote(urlsplit(db_url).path[1:])
    vhost = unquote(urlsplit(mq_url).path[1:])
    result, output = _run(
        [sys.executable, "cli.py", "demo", "--services", "--database", database, "--vhost", vhost], tmp_path, sb
    )
    assert result["mode"] == "services" and "mode: services" in output
    assert f"/{database}" in result["database_url"] and vhost in unquote(result["rabbitmq_url"])
    conn = psycopg2.connect(**connect_kwargs(db_url))
    try:
        _assert_outcome(conn, result, output, sb)
        assert _rows(conn, "SELECT count(*) FROM dead_letters") == [(0,)]
    finally:
        conn.close()


def test_services_mode_names_the_service_that_does_not_answer(tmp_path, sb):
    """--services never falls back silently: PostgreSQL down is a clear error and exit 2."""
    env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    done = subprocess.run(
        [sys.executable, "demo.py", "--services", "--sandbox-url", sb.url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: --services: PostgreSQL at postgresql://postgres@127.0.0.1:1/nowhere does not answer" in done.stderr
