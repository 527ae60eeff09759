"""campaign.ops.monitor on the real PostgreSQL.

``verify`` (R-OPS-1, issue 12 item 6): counters vs rows, message <-> part consistency, finished runs
left open. Each inconsistency is planted on the real PostgreSQL and must be named (run, message,
what is wrong); the legitimate combinations the engine does produce must not be.

R-OPS-4 alerts: computed in one place (monitor.alerts), logged at ERROR by the scheduler's job, shown by
``status``. Each condition is checked just past its threshold and just before it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import uuid

import pytest

from campaign.db import db
from campaign.ops import cli, monitor
from campaign.settings import get_settings
from models import CampaignMessage, DeadLetter, Inbox, MessagePart, SchedulerHeartbeat
from tests import ROOT
from tests.integration import factories as f

UTC = dt.UTC
TERMINAL = ("sent", "failed", "skipped", "in_doubt")


@pytest.fixture
def world(clean_db):
    ws, cols = f.workspace("verify")
    ibx = f.inbox(ws, "sales-1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="touch")
    return ws, cols, ibx, cfg


def plant(run, status: str, parts: tuple[str, ...] = ()) -> int:
    """A message of ``run`` in ``status`` with parts in ``parts`` (by index); returns its id."""
    ws = run.config.workspace
    lead = f.lead(ws, None)
    now = dt.datetime.now(UTC)
    m = f.message(
        run,
        lead,
        status=status,
        generated_text="Hello there. How are you?" if parts else None,
        skip_reason="test" if status == "skipped" else None,
        sent_at=now if status == "sent" else None,
    )
    for idx, part_status in enumerate(parts):
        MessagePart.create(
            message=m,
            inbox=m.inbox_id,
            idx=idx,
            text=f"part {idx + 1}",
            status=part_status,
            attempt_id=uuid.uuid4() if part_status in ("sending", "in_doubt", "sent") else None,
            sending_at=now if part_status != "pending" else None,
            sent_at=now if part_status == "sent" else None,
        )
    return m.id


def settle_counters(run, status: str | None = None) -> None:
    """Set the run's counters from its rows (so only what the test planted can be wrong)."""
    db.execute_sql(
        """
        UPDATE campaign_runs r SET leads_total = c.total, leads_processed = c.done, leads_sent = c.sent,
               leads_failed = c.failed, leads_skipped = c.skipped, leads_in_doubt = c.in_doubt,
               status = coalesce(%s, CASE WHEN c.done = c.total THEN 'completed' ELSE r.status END),
               pause_reason = CASE WHEN coalesce(%s, r.status) = 'paused' THEN 'manual' END
          FROM (SELECT count(*) AS total,
                       count(*) FILTER (WHERE status IN ('sent', 'failed', 'skipped', 'in_doubt')) AS done,
                       count(*) FILTER (WHERE status = 'sent') AS sent,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       count(*) FILTER (WHERE status = 'skipped') AS skipped,
                       count(*) FILTER (WHERE status = 'in_doubt') AS in_doubt
                  FROM campaign_messages WHERE run_id = %s) c
         WHERE r.id = %s""",
        (status, status, run.id, run.id),
    )


def test_engine_states_that_are_legitimate_report_nothing(world):
    """Every message <-> part combination the pipeline, resolve or requeue do leave is clean."""
    ws, cols, ibx, cfg = world
    done = f.run(cfg, run_date=dt.date(2026, 6, 9))
    plant(done, "sent", ("sent", "sent"))
    plant(done, "failed", ("sent", "failed"))  # permanent error at part 2 (E-08 after retries)
    plant(done, "failed", ("sent", "pending"))  # lead opted out / deleted mid-message
    plant(done, "in_doubt", ("sent", "in_doubt", "pending"))
    plant(done, "skipped", ("pending", "pending"))  # cancelled before its first part went out
    plant(done, "skipped")
    plant(done, "failed")
    settle_counters(done)
    going = f.run(cfg, run_date=dt.date(2026, 6, 10))
    plant(going, "sending", ("sent", "sending", "pending"))
    plant(going, "sending", ("sent", "pending"))  # between two parts
    plant(going, "sending", ("failed", "pending"))  # a retry continues at the failed part
    plant(going, "pending", ("pending", "pending"))  # put back to wait before its first part
    plant(going, "splitting")
    plant(going, "sent", ("sent",))
    settle_counters(going)
    cancelled = f.run(cfg, run_date=dt.date(2026, 6, 11))
    plant(cancelled, "skipped")
    settle_counters(cancelled, "cancelled")
    assert monitor.verify() == []


@pytest.mark.parametrize(
    "status, parts, problem",
    [
        ("skipped", ("in_doubt",), "part #1 is 'in_doubt' but the message is 'skipped', not 'in_doubt'"),
        ("skipped", ("sent", "pending"), "part #1 is 'sent': the message started, yet it is 'skipped'"),
        ("failed", ("sent", "sending"), "part #2 is 'sending' (a send in flight) but the message is 'failed'"),
        ("failed", ("in_doubt",), "part #1 is 'in_doubt' but the message is 'failed', not 'in_doubt'"),
        ("pending", ("sent", "pending"), "part #1 is 'sent': the message started, yet it is 'pending'"),
        ("queued", ("sending",), "part #1 is 'sending' (a send in flight) but the message is 'queued'"),
        ("generating", ("sent",), "part #1 is 'sent': the message started, yet it is 'generating'"),
        ("splitting", ("in_doubt",), "part #1 is 'in_doubt' but the message is 'splitting', not 'in_doubt'"),
        ("sending", ("sent", "in_doubt"), "part #2 is 'in_doubt' but the message is 'sending', not 'in_doubt'"),
        ("sent", ("sent", "pending"), "the message is 'sent' but part #2 is 'pending', not sent"),
        ("sent", ("sent", "failed"), "the message is 'sent' but part #2 is 'failed', not sent"),
        ("sent", ("sending",), "part #1 is 'sending' (a send in flight) but the message is 'sent'"),
        ("in_doubt", ("sent", "pending"), "the message is 'in_doubt' but none of its parts is"),
        ("in_doubt", (), "the message is 'in_doubt' but none of its parts is"),
    ],
)
def test_message_and_parts_that_disagree_are_named(world, status, parts, problem):
    ws, cols, ibx, cfg = world
    run = f.run(cfg)
    plant(run, "sent", ("sent",))  # a clean neighbour: never reported
    bad = plant(run, status, parts)
    plant(run, "pending")  # keeps the run open, so only the message is wrong
    settle_counters(run)
    findings = monitor.verify()
    assert len(findings) == 1, findings
    found = findings[0]
    assert isinstance(found, monitor.Inconsistency) and (found.run_id, found.message_id) == (run.id, bad)
    assert problem in found.problem
    assert str(found).startswith(f"run {run.id} message {bad}: ")


def test_every_problem_of_one_message_in_one_finding(world):
    ws, cols, ibx, cfg = world
    run = f.run(cfg)
    bad = plant(run, "skipped", ("sent", "in_doubt", "sending"))
    plant(run, "pending")
    settle_counters(run)
    (found,) = monitor.verify()
    assert found.message_id == bad
    assert found.problem.count("part #") == 3


@pytest.mark.parametrize("status", ["running", "paused", "planning"])
def test_finished_run_left_open_is_named(world, status):
    """leads_processed reached leads_total, yet the run is not completed / cancelled / failed."""
    ws, cols, ibx, cfg = world
    run = f.run(cfg)
    plant(run, "sent", ("sent",))
    plant(run, "skipped")
    settle_counters(run, status)
    (found,) = monitor.verify()
    assert isinstance(found, monitor.Inconsistency) and found.run_id == run.id and found.message_id is None
    assert found.problem == f"status is '{status}' but leads_processed = 2 of leads_total = 2: it should be completed"


def test_verify_command_exits_1_and_names_each_finding(world, capsys):
    ws, cols, ibx, cfg = world
    run = f.run(cfg)
    bad = plant(run, "skipped", ("in_doubt",))
    plant(run, "pending")
    settle_counters(run)
    db.execute_sql(
        "UPDATE campaign_runs SET leads_sent = 1, leads_processed = 2, leads_total = 3 WHERE id = %s", (run.id,)
    )
    code = cli.main(["verify"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"MISMATCH run {run.id}: leads_sent = 1 but the rows say 0" in out
    assert f"INCONSISTENT run {run.id} message {bad}: part #1 is 'in_doubt' but the message is 'skipped'" in out
    assert out.rstrip().endswith("finding(s) in 1 of 1 run(s)")
    db.execute_sql("DELETE FROM campaign_messages WHERE id = %s", (bad,))
    settle_counters(run)
    assert cli.main(["verify"]) == 0
    assert capsys.readouterr().out.startswith("ok: the counters of all 1 run(s) match their message rows")


# --------------------------------------------------------------------------------------------
# alerts (R-OPS-4)


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
