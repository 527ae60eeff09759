"""``report RUN`` tells who answered (R-OPS-1, R-IN-2..4): per inbox, how many of the run's leads
replied or opted out after their message's first part went out, and the picture marks them.

The run is sent by the real chain (sandbox over HTTP) and the replies go through the real inbound
handler (``campaign.inbound.handle``), as Evolution's envelopes."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from campaign import health
from campaign.db import db
from campaign.inbound import handle
from campaign.ops import report
from models import CampaignMessage, Lead
from tests.integration.campaign.inbound.test_handle import upsert
from tests.integration.pipeline_helpers import claim, drive, fast_settings, make_world

SVG = "{http://www.w3.org/2000/svg}"


def _reply(instance: str, lead_id: int | None, text: str, *, at: dt.datetime | None = None):
    assert lead_id is not None
    env = upsert(instance, Lead.get_by_id(lead_id).phone, text)
    if at is not None:
        env["data"]["messageTimestamp"] = int(at.timestamp())
    return handle(env, fast_settings())


@pytest.fixture
def answered(clean_db, sb, llm, evo):
    """A run on two inboxes, every message sent by the chain, then the leads answer (or not)."""
    settings = fast_settings()
    w = make_world("lst", n_inboxes=2)
    one, two = (ib.instance_name for ib in w.inboxes)
    a, b, f = w.add_leads(3)
    c, d, e = w.add_leads(3, inbox=w.inboxes[1])
    # f writes before its message went out: the reply skips it (never messaged, never counted)
    assert _reply(one, f.lead_id, "Oi, quem fala?").result == "reply"
    assert CampaignMessage.get_by_id(f.id).skip_reason == "replied"
    for m in (a, b, c, d, e):
        claim(m.id)
        assert drive(m.id, settings, llm, evo) == "sent"
    assert _reply(one, a.lead_id, "Tenho interesse, me liga").result == "reply"
    assert _reply(one, b.lead_id, "PARE").result == "opt_out"
    # d's answer arrives now but was written an hour before the send (R-IN-8): not an answer to it
    late = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    assert _reply(two, d.lead_id, "Oi, vi seu anúncio", at=late).result == "reply"
    # e was messaged from inbox 2 but writes to inbox 1: no reply on the message's inbox
    assert _reply(one, e.lead_id, "Quem é?").result == "reply"
    return w, {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f}


def test_replies_and_opt_outs_per_inbox_after_the_first_part(answered, monkeypatch):
    """Replied = wrote on the message's inbox at or after its first part; opted out = opted_out_at
    after it. A reply before the send (f, skipped; d, written earlier) or on another inbox (e) is
    not an answer to this run's message. The replies come with the message rows: the report of
    this run costs the statements of an empty run's (no query per message)."""
    w, _ = answered
    empty = make_world("lst-empty")
    counted: list[str] = []
    real = db.obj.execute_sql  # the proxy refuses attributes: count on the database it wraps

    def counting(sql, params=None, *args, **kwargs):
        counted.append(sql)
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(db.obj, "execute_sql", counting)
    report.build_report(empty.run.id)
    baseline, counted[:] = len(counted), []
    rep = report.build_report(w.run.id)
    assert len(counted) == baseline, counted
    assert (rep.messaged, rep.replied, rep.opted_out) == (5, 2, 1)
    by_name = {i.name: i for i in rep.inboxes}
    one, two = by_name[w.inboxes[0].name], by_name[w.inboxes[1].name]
    assert (one.messaged, one.replied, one.opted_out) == (2, 2, 1)
    assert (two.messaged, two.replied, two.opted_out) == (3, 0, 0)
    series = {s.name: s for s in rep.series}
    assert len(series[w.inboxes[0].name].replies) == 2 and len(series[w.inboxes[0].name].opt_outs) == 1
    assert series[w.inboxes[1].name].replies == [] and series[w.inboxes[1].name].opt_outs == []


def test_text_shows_run_totals_and_per_inbox_columns(answered):
    w, _ = answered
    text = report.render_text(report.build_report(w.run.id))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("replies ("))
    section = lines[start : start + 5]
    assert section[2].split() == ["messaged", "(first", "part", "sent)", "5"], section
    assert section[3].split() == ["replied", "2", "40.0%"], section
    assert section[4].split() == ["opted", "out", "1", "20.0%"], section
    header = next(line for line in lines if line.strip().startswith("inbox "))
    assert header.split()[-7:] == ["replied", "opted", "out", "reply", "ratio", "7", "d"]
    row_one = next(line for line in lines if line.strip().startswith(w.inboxes[0].name + " "))
    row_two = next(line for line in lines if line.strip().startswith(w.inboxes[1].name + " "))
    # R-HEALTH-3: the inbox's reply ratio over 7 days (every campaign), after this run's columns
    ratios = health.reply_ratios([w.inboxes[0].id, w.inboxes[1].id])
    one, two = (ratios[i.id].text() for i in w.inboxes[:2])
    assert row_one.split()[-2 - len(one.split()) :] == ["2", "1", *one.split()]
    assert row_two.split()[-2 - len(two.split()) :] == ["0", "0", *two.split()]
    assert ratios[w.inboxes[0].id].replied == 2


def _markers(root: ET.Element, gid: str) -> int:
    groups = [g for g in root.iter(f"{SVG}g") if g.get("id") == gid]
    return sum(1 for g in groups for _ in g.iter(f"{SVG}use"))


def test_picture_marks_replies_and_opt_outs_on_the_inbox_axis(answered, tmp_path):
    """One reply marker per lead that replied, one distinct opt-out marker per lead that opted out,
    on the inbox they answered; none on the inbox nobody answered."""
    w, _ = answered
    rep = report.build_report(w.run.id)
    svg = report.render_picture(rep, tmp_path / "run.svg").read_text(encoding="utf-8")
    root = ET.fromstring(svg)
    one, two = (ib.id for ib in w.inboxes)
    assert _markers(root, f"replies-{one}") == 2
    assert _markers(root, f"opt-outs-{one}") == 1
    assert _markers(root, f"replies-{two}") == 0 and _markers(root, f"opt-outs-{two}") == 0
    assert "lead replied" in svg and "lead opted out" in svg  # the legend names both markers
    assert "replied 2 · opted out 1" in svg
    png = report.render_picture(rep, tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
