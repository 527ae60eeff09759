"""``report RUN`` (R-OPS-1): a run produced by the real chain (real PostgreSQL, the sandbox over real
HTTP, driven in-process) is reported; its numbers are checked against independent SQL counts and
the sandbox's ledger, and the picture is checked as a real PNG / SVG file."""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

import pipeline
from campaign.db import db
from campaign.errors import ConfigError
from campaign.ops import report
from clients.evolution import EvolutionClient
from models import CampaignMessage, CampaignRun, Lead
from tests import ROOT
from tests.integration.pipeline_helpers import (
    assert_counters_match,
    claim,
    drive,
    fast_settings,
    make_world,
    parts_of,
    run_counters,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_READ = httpx.Timeout(connect=2.0, read=0.5, write=2.0, pool=2.0)
LONG_TEXT = "Olá, tudo bem? " + "Temos uma proposta para a sua empresa em Recife. " * 3 + "Podemos falar amanhã?"


def _sql(sql: str, *params) -> list[tuple]:
    return db.execute_sql(sql, params).fetchall()


@pytest.fixture
def finished(clean_db, sb, llm, evo):
    """A completed run on two inboxes: sent (one- and multi-part), skipped (deleted, opted out),
    failed (number not on WhatsApp) and in doubt (accepted, answer lost)."""
    settings = fast_settings()
    w = make_world("rpt", n_inboxes=2, split=True, max_parts=3, timezone="America/Sao_Paulo")
    a = w.add_leads(6)
    b = w.add_leads(4, inbox=w.inboxes[1])
    msgs = a + b
    now = dt.datetime.now(dt.UTC)
    for k, m in enumerate(msgs):  # planned a little in the past, spread: lateness is positive and varied
        db.execute_sql(
            "UPDATE campaign_messages SET scheduled_at = %s WHERE id = %s",
            (now - dt.timedelta(seconds=90 - 7 * k), m.id),
        )
    deleted, opted, invalid, doubt, long_one = a[1], b[0], a[2], b[2], a[3]
    Lead.delete().where(Lead.id == deleted.lead_id).execute()
    Lead.update(opted_out=True).where(Lead.id == opted.lead_id).execute()
    bad_number = Lead.get_by_id(invalid.lead_id).phone.lstrip("+")
    sb.set_faults(invalid_numbers=[bad_number])
    for m in msgs:
        claim(m.id)
        if m is long_one:  # a guaranteed multi-part message: real generate, a long text, real split + sends
            pipeline.generate_step(m.id, settings, llm)
            CampaignMessage.update(generated_text=LONG_TEXT).where(CampaignMessage.id == m.id).execute()
        if m is doubt:
            sb.set_faults(send={"rate_accept_then_hang": 1.0}, hang_seconds=3.0)
            # the hung send is ambiguous once the client's read times out: after 0.5 s, not the
            # 2 s of ``evo`` (this fixture is set up for every test of the module)
            with EvolutionClient(sb.evolution_url, sb.evolution_key, timeout=QUICK_READ) as quick:
                drive(m.id, settings, llm, quick)
        else:
            drive(m.id, settings, llm, evo)
        if m is doubt:
            sb.set_faults(send={"rate_accept_then_hang": 0.0})
    assert len(parts_of(long_one.id)) >= 2
    assert CampaignMessage.get_by_id(doubt.id).status == "in_doubt"
    assert run_counters(w.run.id)["status"] == "completed"
    assert_counters_match(w.run.id)
    return w


def test_numbers_add_up_and_match_independent_counts(finished, sb):
    w = finished
    rep = report.build_report(w.run.id)
    run = CampaignRun.get_by_id(w.run.id)

    # the counters are the run's
    assert (
        (rep.total, rep.processed, rep.sent, rep.failed, rep.skipped, rep.in_doubt)
        == (
            run.leads_total,
            run.leads_processed,
            run.leads_sent,
            run.leads_failed,
            run.leads_skipped,
            run.leads_in_doubt,
        )
        == (10, 10, 6, 1, 2, 1)
    )
    assert rep.sent + rep.failed + rep.skipped + rep.in_doubt == rep.processed
    assert (rep.pending, rep.waiting, rep.in_flight) == (0, 0, 0)
    assert rep.row_mismatches == []
    assert (rep.status, rep.label, rep.run_date) == ("completed", "rpt/first-touch", run.run_date)

    # outcomes by reason sum to the counters and equal independent SQL
    assert sum(rep.failed_by_reason.values()) == rep.failed
    assert sum(rep.skipped_by_reason.values()) == rep.skipped
    assert (
        rep.failed_by_reason
        == dict(
            _sql(
                "SELECT error_class, count(*) FROM campaign_messages WHERE run_id = %s "
                "AND status = 'failed' GROUP BY 1",
                w.run.id,
            )
        )
        == {"invalid_number": 1}
    )
    assert rep.skipped_by_reason == {"lead_deleted": 1, "opted_out": 1}
    assert rep.in_doubt_ids == [
        r[0] for r in _sql("SELECT id FROM campaign_messages WHERE run_id = %s AND status = 'in_doubt'", w.run.id)
    ]
    assert len(rep.failed_ids) == 1

    # per inbox: parts == message_parts rows sent == what the sandbox accepted and answered
    parts_sql = dict(
        _sql(
            "SELECT p.inbox_id, count(*) FROM message_parts p JOIN campaign_messages m "
            "ON m.id = p.message_id WHERE m.run_id = %s AND p.status = 'sent' GROUP BY 1",
            w.run.id,
        )
    )
    by_id = {i.id: i for i in rep.inboxes}
    assert set(by_id) == {ib.id for ib in w.inboxes}
    assert {i: by_id[i].parts_sent for i in parts_sql} == parts_sql
    ok_sends = [s for s in sb.ledger()["sends"] if s["outcome"] == "ok"]
    assert sum(i.parts_sent for i in rep.inboxes) == len(ok_sends) > rep.sent  # a multi-part message
    assert sum(i.messages for i in rep.inboxes) == rep.total
    assert sum(i.messages_sent for i in rep.inboxes) == rep.sent
    assert sum(i.failed for i in rep.inboxes) == rep.failed and sum(i.in_doubt for i in rep.inboxes) == rep.in_doubt
    assert [i.messages for i in sorted(rep.inboxes, key=lambda i: i.name)] == [6, 4]
    for i in rep.inboxes:
        if i.parts_sent >= 2:
            assert i.gap_min_s is not None and i.gap_median_s is not None
            assert 0 <= i.gap_min_s <= i.gap_median_s

    # the picture's series: one planned point per message, one dot per part sent
    assert sum(len(s.planned) for s in rep.series) == rep.total
    assert sum(len(s.part_sends) for s in rep.series) == len(ok_sends)
    assert (
        sum(1 for s in rep.series for _, first in s.planned if first)
        == _sql(
            "SELECT count(DISTINCT p.message_id) FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id "
            "WHERE m.run_id = %s AND p.status = 'sent'",
            w.run.id,
        )[0][0]
        >= rep.sent
    )

    # timings and tokens against raw rows, computed here in Python
    raw = _sql("SELECT tokens_used, generation_ms, scheduled_at, id FROM campaign_messages WHERE run_id = %s", w.run.id)
    tokens = [r[0] for r in raw if r[0] is not None]
    assert rep.tokens_total == sum(tokens) > 0 and rep.tokens_messages == len(tokens)
    assert rep.tokens_mean == pytest.approx(sum(tokens) / len(tokens))
    gen = [r[1] for r in raw if r[1] is not None]
    assert rep.generation_ms.n == len(gen) and rep.generation_ms.p50 == pytest.approx(statistics.median(gen))
    assert rep.generation_ms.max == max(gen)
    firsts = dict(
        _sql(
            "SELECT p.message_id, min(p.sent_at) FROM message_parts p JOIN campaign_messages m "
            "ON m.id = p.message_id WHERE m.run_id = %s AND p.status = 'sent' GROUP BY 1",
            w.run.id,
        )
    )
    late = [(firsts[r[3]] - r[2]).total_seconds() for r in raw if r[3] in firsts]
    assert rep.lateness_s.n == len(late) and rep.lateness_s.max == pytest.approx(max(late))
    assert rep.lateness_s.p50 == pytest.approx(statistics.median(late)) and min(late) > 0
    assert rep.split_ms.n >= rep.sent and rep.send_ms.n >= rep.sent
    assert rep.duration is not None and rep.duration.total_seconds() >= 0
    assert (rep.planned_start, rep.planned_end) == tuple(
        _sql("SELECT min(scheduled_at), max(scheduled_at) FROM campaign_messages WHERE run_id = %s", w.run.id)[0]
    )


def test_text_summary(finished):
    rep = report.build_report(finished.run.id)
    text = report.render_text(rep)
    assert "\x1b" not in text  # no colour codes
    assert text.startswith(f"run {rep.run_id} · rpt/first-touch · {rep.run_date:%Y-%m-%d}")
    lines = text.splitlines()
    assert any(line.split()[:2] == ["sent", "6"] for line in lines)
    assert any(line.split()[:3] == ["failed", "invalid_number", "1"] for line in lines)
    assert any(line.split()[:3] == ["skipped", "opted_out", "1"] for line in lines)
    assert f"in doubt message ids (resolve each with `resolve ID --sent|--resend`): {rep.in_doubt_ids[0]}" in text
    for ib in rep.inboxes:
        row = next(line for line in lines if line.strip().startswith(ib.name))
        assert row.split()[1:4] == [str(ib.messages), str(ib.messages_sent), str(ib.parts_sent)]
    assert f"tokens: {rep.tokens_total:,} total" in text
    # aligned: every row of the counters table has its number ending in the same column
    block = lines[lines.index("counters") + 1 : lines.index("counters") + 11]
    ends = {len(line.rstrip().rsplit(" ", 1)[0].rstrip()) for line in block[2:6]}
    assert len(ends) == 1, block


def test_picture_png_and_svg(finished, tmp_path):
    rep = report.build_report(finished.run.id)
    png = report.render_picture(rep, tmp_path / "sub" / "run.png")
    data = png.read_bytes()
    assert png == tmp_path / "sub" / "run.png" and data[:8] == PNG_MAGIC and len(data) > 30_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 400

    svg = report.render_picture(rep, str(tmp_path / "run.SVG"))
    text = svg.read_text(encoding="utf-8")
    root = ET.fromstring(text)  # valid XML
    assert root.tag.endswith("svg") and len(text) > 30_000
    for ib in finished.inboxes:
        assert ib.name in text
    assert "rpt/first-touch" in text and f"run {rep.run_id}" in text
    assert list(tmp_path.glob(".run-*")) == [] and list((tmp_path / "sub").glob(".run-*")) == []  # no temp left


@pytest.mark.parametrize("name", ["run.jpg", "run", "run.png.txt"])
def test_picture_suffix_is_checked(finished, tmp_path, name):
    rep = report.build_report(finished.run.id)
    suffix = Path(name).suffix
    with pytest.raises(ValueError, match=repr(suffix) if suffix else "none"):
        report.render_picture(rep, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *argv],
        cwd=cwd,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_round_trip(finished, tmp_path):
    run_id = finished.run.id
    proc = _cli("report", str(run_id), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith(f"run {run_id} · rpt/first-touch")
    assert any(line.split()[:2] == ["total", "10"] for line in out)
    assert any(line.split()[:2] == ["sent", "6"] for line in out)
    assert out[-1] == f"picture: reports/run-{run_id}.png"
    assert (tmp_path / "reports" / f"run-{run_id}.png").read_bytes()[:8] == PNG_MAGIC

    svg = tmp_path / "x" / "r.svg"
    proc = _cli("report", str(run_id), "--picture", str(svg), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == f"picture: {svg}"
    ET.parse(svg)

    proc = _cli("report", str(run_id), "--no-picture", cwd=tmp_path / "x")
    assert proc.returncode == 0 and "picture:" not in proc.stdout and not (tmp_path / "x" / "reports").exists()


def test_cli_errors(finished, tmp_path):
    missing = _sql("SELECT coalesce(max(id), 0) + 1000 FROM campaign_runs")[0][0]
    proc = _cli("report", str(missing), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: run {missing} not found" in proc.stderr
    assert not (tmp_path / "reports").exists()

    proc = _cli("report", str(finished.run.id), "--picture", "out.gif", cwd=tmp_path)
    assert proc.returncode == 2 and "'.gif'" in proc.stderr and list(tmp_path.iterdir()) == []

    proc = _cli("report", "abc", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr


@pytest.mark.parametrize("bad", [0, -3, "7", True])
def test_bad_run_id(clean_db, bad):
    with pytest.raises(ConfigError, match="positive integer"):
        report.build_report(bad)


def test_unknown_run(clean_db):
    with pytest.raises(report.RunNotFound, match="run 987654321 not found"):
        report.build_report(987654321)


def test_running_run_without_sends_many_inboxes(clean_db, tmp_path):
    """Edge: a run still running that has sent nothing yet, spread over many inboxes."""
    w = make_world("busy", n_inboxes=12, timezone="Asia/Kolkata")
    now = dt.datetime.now(dt.UTC)
    for i, ib in enumerate(w.inboxes):
        for m in w.add_leads(1 + i % 3, inbox=ib):
            db.execute_sql(
                "UPDATE campaign_messages SET scheduled_at = %s WHERE id = %s",
                (now + dt.timedelta(minutes=5 + 3 * i), m.id),
            )
    total = run_counters(w.run.id)["leads_total"]
    rep = report.build_report(w.run.id, now=now)
    assert (rep.status, rep.total, rep.processed, rep.pending, rep.waiting) == ("running", total, 0, total, total)
    assert rep.lateness_s.n == 0 and rep.lateness_s.p50 is None and rep.tokens_mean is None
    assert len(rep.inboxes) == 12 and all(i.parts_sent == 0 and i.gap_min_s is None for i in rep.inboxes)
    assert rep.duration is not None and rep.finished_at is None
    text = report.render_text(rep)
    assert "not finished" in text and "so far" in text
    assert any(line.split()[:4] == ["not", "yet", "processed", str(total)] for line in text.splitlines())
    png = report.render_picture(rep, tmp_path / "busy.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    svg = report.render_picture(rep, tmp_path / "busy.svg").read_text()
    ET.fromstring(svg)
    assert all(ib.name in svg for ib in w.inboxes) and "no part sent yet" in svg


def test_run_with_no_messages(clean_db, tmp_path):
    """Edge: a run that planned nothing (everything overflowed) still reports and draws."""
    w = make_world("empty")
    CampaignRun.update(status="completed", leads_overflow=3).where(CampaignRun.id == w.run.id).execute()
    rep = report.build_report(w.run.id)
    assert (rep.total, rep.overflow, rep.series, rep.planned_start) == (0, 3, [], None)
    assert [i.name for i in rep.inboxes] == ["sales-0"]  # the config's inbox, with nothing on it
    assert "overflow 3" in report.render_text(rep)
    svg = report.render_picture(rep, tmp_path / "empty.svg").read_text()
    ET.fromstring(svg)
    assert "no messages planned" in svg and "nothing planned" in svg
    assert report.render_picture(rep, tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_mid_run_snapshot_is_consistent(clean_db, sb, llm, evo, tmp_path):
    """A run half done: counters, reasons and pending add up; the picture draws 'now'."""
    settings = fast_settings()
    w = make_world("half", n_inboxes=1, split=True, max_parts=3)
    msgs = w.add_leads(5)
    for m in msgs[:2]:
        claim(m.id)
        assert drive(m.id, settings, llm, evo) == "sent"
    claim(msgs[2].id)  # queued: in flight
    rep = report.build_report(w.run.id)
    assert (rep.status, rep.sent, rep.processed, rep.pending, rep.waiting, rep.in_flight) == ("running", 2, 2, 3, 2, 1)
    assert rep.waiting + rep.in_flight == rep.pending
    (ib,) = rep.inboxes
    assert ib.parts_sent == _sql("SELECT count(*) FROM message_parts WHERE status = 'sent'")[0][0] >= 2
    svg = report.render_picture(rep, tmp_path / "half.svg").read_text()
    assert "now" in svg and "sales-0" in svg
