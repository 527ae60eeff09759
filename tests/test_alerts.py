"""R-OPS-4 alerts: computed in one place (monitor.alerts), logged at ERROR by the scheduler's job, shown by
``status``. Each condition is checked just past its threshold and just before it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys

from campaign.ops import monitor
from campaign.settings import get_settings
from models import CampaignMessage, DeadLetter, Inbox, SchedulerHeartbeat
from tests import factories as f
from tests.workers import ROOT

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _kinds(now: dt.datetime = NOW) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in monitor.alerts(get_settings(), now=now):
        out.setdefault(a.kind, []).append(a.text)
    return out


def _fresh_heartbeat(now: dt.datetime = NOW) -> None:
    SchedulerHeartbeat.insert(
        name=monitor.SCHEDULER_HEARTBEAT_NAME, holder="h:1", started_at=now, beat_at=now
    ).on_conflict(conflict_target=[SchedulerHeartbeat.name], update={SchedulerHeartbeat.beat_at: now}).execute()


def _world():
    ws, cols = f.workspace("alerts")
    ibx = f.inbox(ws, "sales-1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="touch")
    return ws, cols, ibx, cfg


def test_quiet_system_has_no_alerts(clean_db):
    _world()
    _fresh_heartbeat()
    assert _kinds() == {}


def test_stuck_messages_after_two_hours_only(clean_db):
    ws, cols, ibx, cfg = _world()
    _fresh_heartbeat()
    run = f.run(cfg, leads_total=2)
    stuck = f.message(run, f.lead(ws, cols["New"]), status="generating")
    fresh = f.message(run, f.lead(ws, cols["New"]), status="sending")
    CampaignMessage.update(status_changed_at=NOW - dt.timedelta(hours=2, minutes=1)).where(
        CampaignMessage.id == stuck.id
    ).execute()
    CampaignMessage.update(status_changed_at=NOW - dt.timedelta(hours=1, minutes=59)).where(
        CampaignMessage.id == fresh.id
    ).execute()
    kinds = _kinds()
    assert list(kinds) == ["stuck_messages"]
    assert "1 message(s)" in kinds["stuck_messages"][0] and str(stuck.id) in kinds["stuck_messages"][0]


def test_failure_ratio_above_ten_percent(clean_db):
    ws, cols, ibx, cfg = _world()
    _fresh_heartbeat()
    bad = f.run(cfg, leads_total=40, leads_processed=20, leads_sent=17, leads_failed=3)
    cfg2 = f.config(ws, ibx, cols["New"], cols["Contacted"], name="touch-2")
    f.run(cfg2, leads_total=40, leads_processed=20, leads_sent=18, leads_failed=2)  # exactly 10 %: no alert
    kinds = _kinds()
    assert list(kinds) == ["failure_ratio"]
    assert f"run {bad.id} (alerts/touch)" in kinds["failure_ratio"][0]


def test_scheduler_heartbeat_missing_or_stale(clean_db):
    _world()
    assert "no scheduler heartbeat" in _kinds()["scheduler_heartbeat"][0]
    _fresh_heartbeat(NOW - dt.timedelta(minutes=2, seconds=5))
    assert "125 s old" in _kinds()["scheduler_heartbeat"][0]
    _fresh_heartbeat(NOW - dt.timedelta(minutes=1, seconds=55))
    assert "scheduler_heartbeat" not in _kinds()


def test_inbox_disconnected_for_more_than_thirty_minutes(clean_db):
    ws, cols, ibx, cfg = _world()
    _fresh_heartbeat()
    other = f.inbox(ws, "sales-2")
    Inbox.update(connection_state="close", disconnected_since=NOW - dt.timedelta(minutes=31)).where(
        Inbox.id == ibx.id
    ).execute()
    Inbox.update(connection_state="connecting", disconnected_since=NOW - dt.timedelta(minutes=29)).where(
        Inbox.id == other.id
    ).execute()
    kinds = _kinds()
    assert list(kinds) == ["inbox_disconnected"]
    assert "alerts/sales-1" in kinds["inbox_disconnected"][0] and "close for 31 min" in kinds["inbox_disconnected"][0]


def test_dead_letters_present_until_resolved(clean_db):
    _world()
    _fresh_heartbeat()
    row = DeadLetter.create(
        queue="campaign.send",
        actor="send_part",
        dramatiq_message_id="dm-1",
        payload={},
        error_class="StepFailed",
        error_message="x",
    )
    assert "1 dead letter(s) waiting (campaign.send: 1)" in _kinds()["dead_letters"][0]
    DeadLetter.update(status="requeued", resolved_at=NOW).where(DeadLetter.id == row.id).execute()
    assert "dead_letters" not in _kinds()


def test_log_alerts_logs_each_at_error(clean_db, caplog):
    _world()  # no heartbeat row: one alert
    with caplog.at_level(logging.ERROR, logger="ops"):
        found = monitor.log_alerts(get_settings())
    assert [a.kind for a in found] == ["scheduler_heartbeat"]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records] == [
        (logging.ERROR, "ALERT scheduler_heartbeat")
    ]


def test_status_shows_the_alerts(clean_db, services):
    ws, cols, ibx, cfg = _world()
    DeadLetter.create(queue="campaign.generate", actor="generate", dramatiq_message_id="dm-2", payload={})
    out = subprocess.run(
        [sys.executable, "cli.py", "status"], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "dead_letters: 1 dead letter(s) waiting (campaign.generate: 1)" in out.stdout
    assert "scheduler_heartbeat" in out.stdout
