"""Pool failover on the real PostgreSQL (SPEC R-POOL-3, R-POOL-4, E-33; DESIGN principle 8).

The moves themselves, called as the scheduler, ``connection.update`` and ``inbox disable`` call them.
The same with real workers, the sandbox and a disconnect mid-run: tests/integration/test_pool_workers.py.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid

import pytest

import scheduler
from campaign import dispatch, failover, inboxes, planner, runs
from campaign.db import db
from campaign.inbound.connection import apply_connection
from campaign.inbound.envelopes import ConnectionChange
from campaign.ops.monitor import verify
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Conversation
from tests.integration import factories as f

UTC = dt.UTC
GAP_MIN, GAP_MAX = 10.0, 20.0


@pytest.fixture
def world(clean_db):
    """A pool of two (sales-1, sales-2), a whole-day window, 10..20 s gaps, 20 leads planned for today."""
    ws, cols = f.workspace("acme")
    a, b = f.inbox(ws, "sales-1"), f.inbox(ws, "sales-2")
    cfg = f.config(
        ws, a, cols["New"], cols["Contacted"], name="pooled", gap_min_seconds=GAP_MIN, gap_max_seconds=GAP_MAX
    )
    cfg = f.pool(cfg, a, b)
    f.bulk_leads(ws, cols["New"], 20)
    run = planner.plan_run(cfg.id, rng=random.Random(7))
    return ws, cols, a, b, cfg, run


def _on(run_id: int, inbox_id: int, status: str | None = None) -> list[CampaignMessage]:
    q = CampaignMessage.select().where(CampaignMessage.run == run_id, CampaignMessage.inbox == inbox_id)
    if status:
        q = q.where(CampaignMessage.status == status)
    return list(q.order_by(CampaignMessage.scheduled_at))


def _state(run_id: int) -> tuple[str, str | None]:
    r = CampaignRun.get_by_id(run_id)
    return r.status, r.pause_reason


def _events(run_id: int) -> list[dict]:
    return [
        r[0]
        for r in db.execute_sql(
            "SELECT details FROM campaign_events WHERE run_id = %s AND step = 'failover' ORDER BY id", (run_id,)
        ).fetchall()
    ]


def _gaps_ok(run_id: int, inbox_id: int) -> None:
    """The member's pending schedule keeps the campaign's gaps (R-POOL-2, per inbox) and the window."""
    times = [m.scheduled_at for m in _on(run_id, inbox_id, "pending")]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert all(g >= GAP_MIN - 1e-6 for g in gaps), gaps


def _started(run, lead, inbox) -> CampaignMessage:
    """A message whose first part went out (parked `sending`, its second part not yet)."""
    m = f.message(run, lead, inbox=inbox, status="sending", scheduled_at=dt.datetime.now(UTC))
    now = dt.datetime.now(UTC)
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, attempt_id, provider_message_id,
                                      sending_at, sent_at)
           VALUES (%s, %s, 0, 'Oi!', 'sent', %s, %s, %s, %s),
                  (%s, %s, 1, 'Tudo bem?', 'pending', NULL, NULL, NULL, NULL)""",
        (m.id, inbox.id, str(uuid.uuid4()), f"KEY-{m.id}", now, now, m.id, inbox.id),
    )
    return m


def _sticky(ws, lead, inbox) -> None:
    """The lead already talks to ``inbox``: a conversation with a message in it (R-POOL-2)."""
    conv = Conversation.create(workspace=ws, lead=lead, inbox=inbox)
    db.execute_sql(
        """INSERT INTO conversation_messages (conversation_id, inbox_id, direction, provider_message_id, text)
           VALUES (%s, %s, 'in', %s, 'oi')""",
        (conv.id, inbox.id, f"IN-{conv.id}"),
    )


def _bump_total(run, n: int) -> None:
    db.execute_sql("UPDATE campaign_runs SET leads_total = leads_total + %s WHERE id = %s", (n, run.id))


def test_e33_disabled_member_hands_its_not_started_messages_to_the_other(world):
    """E-33: sales-2 disabled mid-run: the run goes on; every not-started message of sales-2 moves to
    sales-1 within sales-1's pacing; a started one stays; a sticky lead waits; one event row counts it."""
    ws, cols, a, b, cfg, run = world
    on_b = _on(run.id, b.id)
    assert len(on_b) == 10 and len(_on(run.id, a.id)) == 10
    queued = on_b[0]
    db.execute_sql("UPDATE campaign_messages SET status = 'queued' WHERE id = %s", (queued.id,))
    generating = on_b[1]  # a worker holds it: it never moves under the worker's feet
    db.execute_sql("UPDATE campaign_messages SET status = 'generating' WHERE id = %s", (generating.id,))
    sticky = on_b[2]
    _sticky(ws, sticky.lead_id, b)
    started = _started(run, f.lead(ws, cols["New"]), b)
    _bump_total(run, 1)

    change = inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")

    assert change.paused == [] and _state(run.id) == ("running", None)  # another member can send
    assert change.moved == 8  # its 10, less the one a worker holds and the sticky one
    left_on_b = {m.id: m.status for m in _on(run.id, b.id)}
    assert left_on_b == {generating.id: "generating", sticky.id: "pending", started.id: "sending"}
    assert CampaignMessage.get_by_id(queued.id).inbox_id == a.id  # queued: not started, it moved
    assert CampaignMessage.get_by_id(queued.id).status == "pending"
    assert len(_on(run.id, a.id)) == 18
    _gaps_ok(run.id, a.id)
    assert (
        db.execute_sql(
            "SELECT count(*) FROM message_parts WHERE message_id = %s AND inbox_id = %s", (started.id, b.id)
        ).fetchone()[0]
        == 2
    )  # its parts stay on its inbox too
    [event] = _events(run.id)
    assert event["from_inbox"] == b.id and event["moved"] == 8 and event["to"] == {str(a.id): 8}
    assert event["sticky_waiting"] == 1 and event["no_room"] == 0
    assert failover.moved_away([run.id]) == {(run.id, b.id): 8}
    # idempotent: another pass (the scheduler's job) moves nothing more and writes no row
    assert failover.fail_over(get_settings()) == [
        failover.Failover(run.id, b.id, "disabled (banned)", {}, sticky_waiting=1, no_room=0)
    ]
    assert len(_events(run.id)) == 1
    assert verify() == []


def test_e33_disconnected_member_waits_out_the_grace_then_hands_over(world):
    """E-33 with a disconnect: before POOL_FAILOVER_SECONDS its due messages are held (the dispatcher
    skips them, the run goes on with the other member); after it, they move."""
    ws, cols, a, b, cfg, run = world
    settings = get_settings()
    db.execute_sql(
        "UPDATE campaign_messages SET scheduled_at = now() - interval '1 second' WHERE run_id = %s", (run.id,)
    )
    recent = dt.datetime.now(UTC) - dt.timedelta(seconds=5)
    apply_connection(ConnectionChange(instance=b.instance_name, state="close", at=recent, reason=None))
    assert _state(run.id) == ("running", None)
    published: list[int] = []
    dispatch.dispatch_due(settings, publish=lambda q, ids: published.extend(ids))
    assert {CampaignMessage.get_by_id(i).inbox_id for i in published} == {a.id}  # only sales-1's went
    assert len(_on(run.id, b.id, "pending")) == 10
    assert scheduler._pool_failover(settings, lambda: True)["moved"] == {}  # still inside the grace
    # the same inbox, down longer than POOL_FAILOVER_SECONDS (the stored state says since when)
    db.execute_sql(
        "UPDATE inboxes SET disconnected_since = now() - make_interval(secs => %s) WHERE id = %s",
        (settings.pool_failover_seconds + 1, b.id),
    )
    assert scheduler._pool_failover(settings, lambda: True)["moved"] == {f"{run.id}:{b.id}": 10}
    assert _on(run.id, b.id) == [] and len(_on(run.id, a.id, "pending")) == 10
    _gaps_ok(run.id, a.id)
    # not before the last message sales-1 already took: its pacing counts from there
    last_taken = max(CampaignMessage.get_by_id(i).scheduled_at for i in published)
    assert min(m.scheduled_at for m in _on(run.id, a.id, "pending")) >= last_taken + dt.timedelta(seconds=GAP_MIN)
    assert _state(run.id) == ("running", None)


def test_run_pauses_only_when_no_member_can_send_and_resumes_when_one_is_back(world):
    """R-POOL-3: one member down, the run goes on; both down, it pauses; one back, it resumes and the
    other's waiting work moves to it."""
    ws, cols, a, b, cfg, run = world
    settings = get_settings()
    long_ago = dt.datetime.now(UTC) - dt.timedelta(seconds=settings.pool_failover_seconds + 30)
    inboxes.store_state(a.id, "close", observed_at=long_ago)  # sales-1 has been down for a while
    assert runs.pause_inbox_runs(a.id, "inbox_disconnected") == []  # sales-2 can send
    assert _state(run.id) == ("running", None)
    inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")
    assert _state(run.id) == ("paused", "inbox_disabled")  # nobody left who can send
    assert failover.fail_over(settings) == []  # a paused run moves nothing
    result = apply_connection(ConnectionChange(instance=a.instance_name, state="open", at=None, reason=None))
    assert result.resumed == [run.id] and _state(run.id) == ("running", None)
    assert result.moved == 10  # sales-2's messages went to sales-1, now back
    assert _on(run.id, b.id) == [] and len(_on(run.id, a.id)) == 20
    _gaps_ok(run.id, a.id)
    # both down again (a disconnect seen by the health check): the scheduler's job pauses the run
    inboxes.store_state(a.id, "close")
    assert scheduler._pool_failover(settings, lambda: True)["paused"] == [run.id]
    assert _state(run.id) == ("paused", "inbox_disconnected")
    assert inboxes.enable_inbox("sales-2", workspace="acme", by="test").resumed == [run.id]


def test_sticky_lead_waits_for_its_number_and_goes_when_it_is_back(world):
    """R-POOL-3: a sticky lead's message is not moved; it is not skipped too_late while its number is
    down; when the number is back it is re-planned from now in that number's pacing."""
    ws, cols, a, b, cfg, run = world
    settings = get_settings()
    on_b = _on(run.id, b.id)
    for m in on_b:
        _sticky(ws, m.lead_id, b)
    late = dt.datetime.now(UTC) - dt.timedelta(seconds=settings.max_lateness_seconds + 60)
    db.execute_sql(
        "UPDATE campaign_messages SET scheduled_at = %s WHERE run_id = %s AND inbox_id = %s", (late, run.id, b.id)
    )
    inboxes.disable_inbox("sales-2", workspace="acme", reason="checking", by="test")
    assert [m.id for m in _on(run.id, b.id, "pending")] == [m.id for m in on_b]  # every one waits
    assert _events(run.id) == []  # nothing moved: no failover row
    assert runs.skip_too_late(settings) == 0  # waiting for its number is not being late
    inboxes.enable_inbox("sales-2", workspace="acme", by="test")
    back = _on(run.id, b.id, "pending")
    assert len(back) == 10 and min(m.scheduled_at for m in back) >= dt.datetime.now(UTC) - dt.timedelta(seconds=5)
    _gaps_ok(run.id, b.id)


def test_a_member_that_finds_no_room_keeps_the_rest(clean_db):
    """R-POOL-3 within caps: the receiving member takes only what its day's cap leaves; the rest stays."""
    ws, cols = f.workspace("acme")
    a, b = f.inbox(ws, "sales-1", max_per_day=12), f.inbox(ws, "sales-2", max_per_day=10)
    cfg = f.pool(f.config(ws, a, cols["New"], cols["Contacted"], name="capped"), a, b)
    f.bulk_leads(ws, cols["New"], 20)
    run = planner.plan_run(cfg.id, rng=random.Random(3))
    n_a, n_b = len(_on(run.id, a.id)), len(_on(run.id, b.id))
    assert n_a + n_b == 20 and n_a < 12 and n_b > 12 - n_a  # sales-1 has less room left than sales-2 has work
    inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")
    assert len(_on(run.id, a.id)) == 12 and len(_on(run.id, b.id)) == n_b - (12 - n_a)
    [event] = _events(run.id)
    assert event["moved"] == 12 - n_a and event["no_room"] == n_b - (12 - n_a)


def test_concurrent_failover_passes_move_each_message_once(world):
    """Two passes at once (the scheduler's job and a connection.update): each message moves once,
    the counts add up to what moved."""
    ws, cols, a, b, cfg, run = world
    db.execute_sql("UPDATE inboxes SET disabled = true, disabled_reason = 'banned' WHERE id = %s", (b.id,))
    settings = get_settings()
    barrier = threading.Barrier(4)
    results: list[int] = []

    def one_pass() -> None:
        with db.connection_context():
            barrier.wait()
            results.append(sum(m.total for m in failover.fail_over(settings)))

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(results) == 10 and sorted(results)[-1] == 10
    assert sum(e["moved"] for e in _events(run.id)) == 10
    assert len(_on(run.id, a.id)) == 20
    _gaps_ok(run.id, a.id)


def test_one_inbox_run_still_pauses_and_resumes(clean_db):
    """E-07 unchanged for a pool of one: its inbox down, the run pauses; back, it resumes; nothing moves."""
    ws, cols = f.workspace("solo")
    ibx = f.inbox(ws, "only")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"])
    f.bulk_leads(ws, cols["New"], 3)
    run = planner.plan_run(cfg.id)
    apply_connection(ConnectionChange(instance=ibx.instance_name, state="close", at=None, reason=None))
    assert _state(run.id) == ("paused", "inbox_disconnected")
    back = apply_connection(ConnectionChange(instance=ibx.instance_name, state="open", at=None, reason=None))
    assert back.resumed == [run.id]
    assert _events(run.id) == []


def test_r_pool_4_status_report_and_inboxes_show_each_member(world, capsys, tmp_path):
    """R-POOL-4: status, report (text and picture) and `cli.py inboxes` show per member: assigned,
    sent, failed, moved away, state."""
    from campaign.ops import cli, monitor
    from campaign.ops.report import build_report, render_picture, render_text

    ws, cols, a, b, cfg, run = world
    sent = _on(run.id, a.id)[0]
    db.execute_sql(
        """UPDATE campaign_messages SET status = 'sent', sent_at = now(), finished_at = now() WHERE id = %s""",
        (sent.id,),
    )
    db.execute_sql("UPDATE campaign_runs SET leads_sent = 1, leads_processed = 1 WHERE id = %s", (run.id,))
    inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")

    members = {m.inbox: m for m in monitor.pool_members([run.id])}
    assert members["acme/sales-1"] == monitor.MemberStatus(run.id, a.id, "acme/sales-1", 20, 1, 0, 0, "ok")
    assert members["acme/sales-2"] == monitor.MemberStatus(run.id, b.id, "acme/sales-2", 0, 0, 0, 10, "disabled")
    assert monitor.status_snapshot(get_settings(), with_queues=False).members == list(members.values())

    rep = build_report(run.id)
    by_name = {i.name: i for i in rep.inboxes}
    assert (by_name["sales-1"].assigned, by_name["sales-1"].messages_sent, by_name["sales-1"].moved_away) == (20, 1, 0)
    assert (by_name["sales-2"].assigned, by_name["sales-2"].moved_away, by_name["sales-2"].state) == (0, 10, "disabled")
    assert [(fo.inbox, fo.moved) for fo in rep.failovers] == [("sales-2", 10)]
    text = render_text(rep)
    assert "moved away" in text and "failover" in text and "sales-2 disabled (banned): 10 moved away" in text
    svg = render_picture(rep, tmp_path / "run.svg").read_text()
    assert "sales-2: assigned 0 · sent 0 · failed 0 · moved away 10 · disabled" in svg
    assert "sales-1: assigned 20 · sent 1 · failed 0 · moved away 0 · ok" in svg

    assert cli.main(["inboxes"]) == 0
    out = capsys.readouterr().out
    assert "assigned/sent/failed/moved-away" in out
    line_b = next(line for line in out.splitlines() if line.startswith("acme/sales-2"))
    assert "0/0/0/10" in line_b


def test_planning_gives_a_member_that_hands_over_no_new_work(clean_db):
    """R-POOL-3: a disabled member gets no new lead at planning while another can send; a lead sticky
    to it waits for a later run; once it is enabled it takes work again at the next planning."""
    ws, cols = f.workspace("acme")
    a, b = f.inbox(ws, "sales-1"), f.inbox(ws, "sales-2")
    cfg = f.pool(f.config(ws, a, cols["New"], cols["Contacted"], name="pooled"), a, b)
    f.bulk_leads(ws, cols["New"], 10)
    first = db.execute_sql("SELECT min(id) FROM leads").fetchone()[0]
    _sticky(ws, first, b)
    inboxes.disable_inbox("sales-2", workspace="acme", reason="banned", by="test")
    run = planner.plan_run(cfg.id, rng=random.Random(5))
    assert len(_on(run.id, a.id)) == 9 and _on(run.id, b.id) == []
    assert run.leads_overflow == 1  # the sticky lead waits for its number
    inboxes.enable_inbox("sales-2", workspace="acme", by="test")
    later = planner.plan_run(cfg.id, now=dt.datetime.now(UTC) + dt.timedelta(days=1), rng=random.Random(6))
    assert [m.lead_id for m in _on(later.id, b.id)] == [first]
