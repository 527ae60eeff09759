"""Run transitions on the real PostgreSQL (campaign.runs; SPEC R-OPS-3, R-DISP-4, E-26): pause, resume
(re-planning without a burst), cancel, and the window's end closing paused runs too."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import uuid

import pytest

import pipeline
from campaign import outcomes, planner, recovery, runs
from campaign.db import db
from campaign.ops.monitor import verify
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Lead
from tests.integration import factories as f

UTC = dt.UTC
NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday


# --------------------------------------------------------------------------------------------
# operator transitions
# --------------------------------------------------------------------------------------------


def _office_hours(cfg, gmin=60, gmax=120):
    cfg.window_start_minute, cfg.window_end_minute = 9 * 60, 18 * 60
    cfg.gap_min_seconds, cfg.gap_max_seconds = gmin, gmax
    cfg.save()


def test_pause_then_resume_replans_without_burst(world):
    """E-22: paused at 09:10, resumed at 12:00 -> the rest re-planned from now, gaps >= min, nothing past."""
    ws, cols, _, cfg = world
    _office_hours(cfg)
    f.bulk_leads(ws, cols["New"], 200)
    t9 = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=t9, rng=random.Random(5))
    msgs = f.messages_of(run.id)
    # the first 3 were dispatched before the pause (one still in flight)
    s = get_settings()
    for m in msgs[:2]:
        outcomes.finish_message(m.id, "sent", s, from_statuses=("pending",))
    CampaignMessage.update(status="sending").where(CampaignMessage.id == msgs[2].id).execute()
    runs.pause_run(run.id)
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is paused \(manual\), cannot pause"):
        runs.pause_run(run.id)
    resume_at = NOON
    result = runs.resume_run(run.id, now=resume_at, rng=random.Random(6))
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "running" and run.pause_reason is None
    pending = [m for m in f.messages_of(run.id) if m.status == "pending"]
    assert result["replanned"] == len(pending) > 0
    times = [m.scheduled_at for m in pending]
    assert min(times) >= resume_at
    assert min(times) >= msgs[2].scheduled_at + dt.timedelta(seconds=60)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert min(gaps) >= 60 - 1e-6 and max(gaps) <= 120 + 1e-6
    end = NOON.replace(hour=18)
    assert max(times) < end
    # 6 h at >= 60 s per message cannot hold 197: the rest were skipped window_closed, counted
    skipped = (
        CampaignMessage.select()
        .where(CampaignMessage.run == run.id, CampaignMessage.skip_reason == "window_closed")
        .count()
    )
    assert skipped == result["skipped"] and skipped + len(pending) == 197
    assert run.leads_skipped == skipped
    assert verify() == []


def test_resume_after_window_closed_skips_everything_and_completes(world):
    ws, cols, _, cfg = world
    _office_hours(cfg)
    f.bulk_leads(ws, cols["New"], 10)
    run = planner.plan_run(cfg.id, now=NOON.replace(hour=9))
    runs.pause_run(run.id)
    result = runs.resume_run(run.id, now=NOON.replace(hour=19))
    run = CampaignRun.get_by_id(run.id)
    assert result == {"replanned": 0, "skipped": 10}
    assert run.status == "completed" and run.leads_skipped == 10
    assert verify() == []


def test_resume_with_nothing_overdue_keeps_the_schedule(world):
    ws, cols, _, cfg = world
    _office_hours(cfg)
    f.bulk_leads(ws, cols["New"], 10)
    run = planner.plan_run(cfg.id, now=NOON.replace(hour=9))
    before = [m.scheduled_at for m in f.messages_of(run.id)]
    runs.pause_run(run.id)
    assert runs.resume_run(run.id, now=NOON.replace(hour=8)) == {"replanned": 0, "skipped": 0}
    assert [m.scheduled_at for m in f.messages_of(run.id)] == before


def test_cancel_skips_pending_and_leaves_in_flight(world):
    """R-OPS-3: cancel -> pending skipped 'cancelled', run cancelled, in-flight ones finish afterwards."""
    ws, cols, _, cfg = world
    f.bulk_leads(ws, cols["New"], 6)
    run = planner.plan_run(cfg.id, now=NOON)
    msgs = f.messages_of(run.id)
    CampaignMessage.update(status="sending").where(CampaignMessage.id == msgs[0].id).execute()
    assert runs.cancel_run(run.id) == 5
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "cancelled" and run.leads_skipped == 5 and run.finished_at is not None
    assert CampaignMessage.get_by_id(msgs[0].id).status == "sending"
    outcomes.finish_message(msgs[0].id, "sent", get_settings(), from_statuses=("sending",))
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "cancelled" and run.leads_sent == 1 and run.leads_processed == 6
    assert verify() == []
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is cancelled, cannot resume"):
        runs.resume_run(run.id)
    with pytest.raises(planner.RunStateError, match=r"run 999999999 does not exist"):
        runs.cancel_run(999_999_999)


def test_state_errors_are_clear(world):
    ws, cols, _, cfg = world
    f.bulk_leads(ws, cols["New"], 1)
    run = planner.plan_run(cfg.id, now=NOON)
    outcomes.skip_pending_where("m.run_id = %s", (run.id,), "test")
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is completed, cannot pause"):
        runs.pause_run(run.id)
    with pytest.raises(planner.RunStateError, match="cannot cancel"):
        runs.cancel_run(run.id)


# --------------------------------------------------------------------------------------------
# the window's end closes paused runs too (R-DISP-4, E-26)
# --------------------------------------------------------------------------------------------


def _pause_automatically(reason: str):
    """Pause a run the way the engine does for ``reason`` (every automatic pause is runs.pause_runs)."""

    def pause(run, cfg):
        if reason in ("provider_auth", "provider_credits"):  # OpenRouter: every run of the engine
            assert runs.pause_runs("true", (), reason) == [run.id]
        else:  # the inbox's runs
            assert runs.pause_runs(
                "r.config_id IN (SELECT id FROM campaign_configs WHERE inbox_id = %s)", (cfg.inbox_id,), reason
            ) == [run.id]

    return pause


def _pause_by_failures(run, cfg):
    """error_threshold: failures past the ratio pause the run in their own terminal statement."""
    s = dataclasses.replace(get_settings(), error_threshold_min_processed=2, error_threshold_ratio=0.1)
    for m in f.messages_of(run.id)[:2]:
        outcomes.finish_message(m.id, "failed", s, from_statuses=("pending",), error_class="test")


PAUSE_FAMILIES = {
    "manual": lambda run, cfg: runs.pause_run(run.id),
    "provider_auth": _pause_automatically("provider_auth"),
    "provider_credits": _pause_automatically("provider_credits"),
    "inbox_disconnected": _pause_automatically("inbox_disconnected"),
    "inbox_disabled": _pause_automatically("inbox_disabled"),
    "error_threshold": _pause_by_failures,
}


def _nine_to_ten(cfg):
    cfg.window_start_minute, cfg.window_end_minute = 9 * 60, 10 * 60
    cfg.gap_min_seconds, cfg.gap_max_seconds = 60, 120
    cfg.save()


@pytest.mark.parametrize("reason", list(PAUSE_FAMILIES))
def test_e26_paused_run_closes_at_window_end_and_its_leads_come_back_tomorrow(world, reason):
    """E-26 / R-DISP-4: a run still paused (any reason) when its window ends is completed, its pending
    messages skipped window_closed, the reason stays in the report, and tomorrow's run plans its leads."""
    from campaign.ops import report

    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    f.bulk_leads(ws, cols["New"], 10)
    nine = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=nine, rng=random.Random(1))
    assert run.leads_total == 10
    if reason != "error_threshold":
        for m in f.messages_of(run.id)[:2]:  # two went out before the pause
            outcomes.finish_message(m.id, "sent", get_settings(), from_statuses=("pending",))
    PAUSE_FAMILIES[reason](run, cfg)
    assert (CampaignRun.get_by_id(run.id).status, CampaignRun.get_by_id(run.id).pause_reason) == ("paused", reason)

    assert runs.close_windows(now=nine + dt.timedelta(minutes=59))["runs"] == []  # still open
    result = runs.close_windows(now=nine + dt.timedelta(hours=1))
    assert result["runs"] == [run.id] and result["skipped"] == 8 and result["completed"] == [run.id]
    run = CampaignRun.get_by_id(run.id)
    assert run.status == "completed" and run.finished_at is not None and run.leads_skipped == 8
    assert (
        CampaignMessage.select()
        .where(CampaignMessage.run == run.id, CampaignMessage.skip_reason == "window_closed")
        .count()
        == 8
    )
    assert verify() == []
    # the reason is still there for the report (the row's pause_reason belongs to 'paused' only)
    assert runs.closed_while_paused(run.id) == reason
    rep = report.build_report(run.id)
    assert rep.status_text == f"completed (closed at its window's end while paused: {reason})"
    assert rep.status_text in report.render_text(rep)

    # tomorrow: every lead of this run still in the source column is planned again
    waiting = {lead.id for lead in Lead.select().where(Lead.column == cols["New"])}
    assert len(waiting) == (10 if reason == "error_threshold" else 8)  # failed ones stay there too
    tomorrow = planner.plan_run(cfg.id, now=nine + dt.timedelta(days=1), rng=random.Random(2))
    assert tomorrow.leads_total == len(waiting)
    assert {m.lead_id for m in f.messages_of(tomorrow.id)} == waiting


def test_e26_paused_run_with_a_message_mid_parts_stays_open_until_it_settles(world):
    """E-26 / R-DISP-4: the window's end skips what has not started; a message whose first part went
    out (and one the pause sends back to wait) keep the paused run open until they settle. The
    reason is noted once, however often the guard comes back."""
    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    f.bulk_leads(ws, cols["New"], 6)
    nine = NOON.replace(hour=9)
    run = planner.plan_run(cfg.id, now=nine, rng=random.Random(1))
    started, queued, *rest = f.messages_of(run.id)
    CampaignMessage.update(status="sending", generated_text="Hello there, how are you today?").where(
        CampaignMessage.id == started.id
    ).execute()
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sent_at)
                      VALUES (%s, %s, 0, 'Hello there,', 'sent', now()),
                             (%s, %s, 1, 'how are you?', 'pending', NULL)""",
        (started.id, cfg.inbox_id, started.id, cfg.inbox_id),
    )
    CampaignMessage.update(status="queued").where(CampaignMessage.id == queued.id).execute()
    runs.pause_runs("r.id = %s", (run.id,), "inbox_disconnected")

    ten = nine + dt.timedelta(hours=1)
    result = runs.close_windows(now=ten)
    assert result["runs"] == [run.id] and result["skipped"] == 4 and result["completed"] == []
    run_row = CampaignRun.get_by_id(run.id)
    assert (run_row.status, run_row.pause_reason) == ("paused", "inbox_disconnected")
    assert CampaignMessage.get_by_id(started.id).status == "sending"  # not counted, not skipped
    # the queued one's actor finds the run paused and puts it back to wait: the next guard skips it
    assert pipeline._back_to_wait(queued.id, "queued")
    assert runs.close_windows(now=ten + dt.timedelta(seconds=15))["skipped"] == 1
    assert CampaignMessage.get_by_id(queued.id).skip_reason == "window_closed"
    assert CampaignRun.get_by_id(run.id).status == "paused"
    # the started message's last part goes out: its statement completes the run
    attempt = uuid.uuid4()
    (part_id,) = db.execute_sql(
        """UPDATE message_parts SET status = 'sending', attempt_id = %s, sending_at = now()
                                 WHERE message_id = %s AND idx = 1 RETURNING id""",
        (str(attempt), started.id),
    ).fetchone()
    outcomes.finish_message(
        started.id, "sent", get_settings(), from_statuses=("sending",), last_part=(part_id, attempt, "key-2")
    )
    run_row = CampaignRun.get_by_id(run.id)
    assert run_row.status == "completed" and (run_row.leads_sent, run_row.leads_skipped) == (1, 5)
    assert verify() == []
    notes = db.execute_sql(
        "SELECT count(*) FROM campaign_events WHERE run_id = %s AND step = %s", (run.id, runs.WINDOW_STEP)
    ).fetchone()[0]
    assert notes == 1 and runs.closed_while_paused(run.id) == "inbox_disconnected"


def test_run_still_planning_at_window_end_is_closed(world):
    """R-DISP-4 (any non-final status): a run stuck in 'planning' never dispatches; its day's end closes it
    and frees its leads."""
    ws, cols, _, cfg = world
    _nine_to_ten(cfg)
    nine = NOON.replace(hour=9)
    run = f.run(cfg, run_date=nine.date(), status="planning", leads_total=3)
    for _ in range(3):
        f.message(run, f.lead(ws, cols["New"]), scheduled_at=nine)
    result = runs.close_windows(now=nine + dt.timedelta(hours=1))
    assert result["runs"] == [run.id] and result["skipped"] == 3 and result["completed"] == [run.id]
    assert CampaignRun.get_by_id(run.id).status == "completed"
    assert verify() == []
    assert planner.plan_run(cfg.id, now=nine + dt.timedelta(days=1)).leads_total == 3


# --------------------------------------------------------------------------------------------
# an operator's pause sticks (issue 12, "also settle"; E-07)
# --------------------------------------------------------------------------------------------


class _Gateway:
    """The one Evolution call of the inbox health check: every instance reports ``state``."""

    def __init__(self, state: str = "open") -> None:
        self.state = state
        self.asked: list[str] = []

    def connection_state(self, instance: str) -> str:
        self.asked.append(instance)
        return self.state


def test_operator_pause_of_a_run_paused_inbox_disconnected_sticks_when_the_inbox_comes_back(world):
    """E-07 resumes runs paused inbox_disconnected once the inbox is open again, but not one the operator
    paused meanwhile: `pause` turns the automatic pause into a manual one; only `resume` ends it."""
    ws, cols, ibx, cfg = world
    f.bulk_leads(ws, cols["New"], 4)
    run = planner.plan_run(cfg.id)
    other = planner.plan_run(f.config(ws, ibx, cols["New"], cols["Replied"], name="second").id)
    assert runs.pause_runs(
        "r.config_id IN (SELECT id FROM campaign_configs WHERE inbox_id = %s)", (ibx.id,), "inbox_disconnected"
    ) == [run.id, other.id]
    db.execute_sql("UPDATE inboxes SET connection_state = 'close', disconnected_since = now() WHERE id = %s", (ibx.id,))

    assert runs.pause_run(run.id) == "inbox_disconnected"
    r = CampaignRun.get_by_id(run.id)
    assert (r.status, r.pause_reason) == ("paused", "manual")
    text, details = db.execute_sql(
        "SELECT text, details FROM campaign_events WHERE run_id = %s AND step = 'operator' ORDER BY id DESC LIMIT 1",
        (run.id,),
    ).fetchone()
    assert details == {"reason": "manual", "was": "inbox_disconnected"} and "replaces the automatic one" in text
    with pytest.raises(planner.RunStateError, match=rf"run {run.id} is paused \(manual\), cannot pause"):
        runs.pause_run(run.id)

    gateway = _Gateway("open")
    result = recovery.check_inboxes(get_settings(), gateway)
    assert gateway.asked == [ibx.instance_name] and result["states"] == {ibx.id: "open"}
    assert result["resumed"] == [other.id]  # the automatic pause ends by itself...
    r = CampaignRun.get_by_id(run.id)
    assert (r.status, r.pause_reason) == ("paused", "manual")  # ...the operator's does not
    assert recovery.check_inboxes(get_settings(), gateway)["resumed"] == []
    runs.resume_run(run.id)
    assert CampaignRun.get_by_id(run.id).status == "running"


@pytest.mark.parametrize("reason", ["provider_auth", "provider_credits", "inbox_disabled", "error_threshold"])
def test_operator_pause_takes_over_every_automatic_pause(world, reason):
    ws, cols, _, cfg = world
    f.bulk_leads(ws, cols["New"], 2)
    run = planner.plan_run(cfg.id)
    runs.pause_runs("r.id = %s", (run.id,), reason)
    assert runs.pause_run(run.id) == reason
    assert CampaignRun.get_by_id(run.id).pause_reason == "manual"
    assert runs.resume_paused_run(run.id, reason) is False  # the automatic resume of that reason
    assert CampaignRun.get_by_id(run.id).status == "paused"


def test_resume_for_a_reason_leaves_other_pauses_alone(world):
    ws, cols, _, cfg = world
    f.bulk_leads(ws, cols["New"], 2)
    run = planner.plan_run(cfg.id)
    runs.pause_run(run.id)
    with pytest.raises(
        planner.RunStateError,
        match=r"is paused \(manual\), cannot resume \(only a paused "
        r"\(inbox_disconnected\) run can\)",
    ):
        runs.resume_run(run.id, reason="inbox_disconnected")
    runs.resume_run(run.id, reason="manual")
    assert CampaignRun.get_by_id(run.id).status == "running"
