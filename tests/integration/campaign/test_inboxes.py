"""Inbox commands (SPEC R-FAIL-6): ``cli.py inbox enable|disable NAME``, ``cli.py inboxes``; who and why
in ``campaign_events``; ``apply`` never re-enables a disabled inbox; runs paused ``inbox_disabled``
resume when their inbox is enabled, and only those."""

from __future__ import annotations

import datetime as dt
import getpass
import re

import pytest

import scheduler
from campaign import dispatch, recovery
from campaign import runs as run_ops
from campaign.db import db
from campaign.ops import cli
from campaign.settings import get_settings
from models import CampaignMessage, CampaignRun, Inbox
from tests.integration import factories as f
from tests.integration.campaign.ops.test_configfile import EXAMPLE

UTC = dt.UTC


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def operator(monkeypatch):
    """The OS user the commands record."""
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    return "alice"


@pytest.fixture
def world(clean_db):
    """Workspace acme: inbox sales-1 with three campaigns, inbox sales-2 with one; one run each, pending work."""
    ws, cols = f.workspace("acme")
    one, two = f.inbox(ws, "sales-1"), f.inbox(ws, "sales-2")
    runs = {}
    for name, ibx in (("a", one), ("b", one), ("c", one), ("d", two)):
        cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name=name)
        runs[name] = f.run(cfg, leads_total=2)
        for _ in range(2):
            f.message(runs[name], f.lead(ws, cols["New"]), scheduled_at=dt.datetime.now(UTC) - dt.timedelta(minutes=5))
    return ws, cols, one, two, runs


def _run(run) -> tuple[str, str | None]:
    r = CampaignRun.get_by_id(run.id)
    return r.status, r.pause_reason


def _inbox_events() -> list[tuple[str, str, dict]]:
    return db.execute_sql(
        "SELECT level, text, details FROM campaign_events WHERE step = 'inbox' ORDER BY id"
    ).fetchall()


def test_disable_pauses_the_inbox_runs_and_says_who_and_why(world, capsys):
    ws, cols, one, two, runs = world
    run_ops.pause_run(runs["b"].id)  # the operator's own pause stays what it is
    code, out, err = run_cli(capsys, "inbox", "disable", "sales-1", "--reason", "number reported as spam")
    assert code == 0, err
    assert out == (
        f"inbox acme/sales-1 disabled by alice: number reported as spam; runs paused (inbox_disabled): "
        f"{runs['a'].id}, {runs['c'].id}\n"
    )
    ibx = Inbox.get_by_id(one.id)
    assert ibx.disabled and ibx.disabled_reason == "number reported as spam"
    assert _run(runs["a"]) == _run(runs["c"]) == ("paused", "inbox_disabled")
    assert _run(runs["b"]) == ("paused", "manual")
    assert _run(runs["d"]) == ("running", None) and not Inbox.get_by_id(two.id).disabled  # the other inbox
    ((level, text, details),) = _inbox_events()
    assert level == "warning" and text == "inbox acme/sales-1 disabled by alice: number reported as spam"
    assert details == {
        "inbox_id": one.id,
        "inbox": "acme/sales-1",
        "action": "disable",
        "by": "alice",
        "reason": "number reported as spam",
        "paused_runs": [runs["a"].id, runs["c"].id],
    }
    # nothing is dispatched for a paused run
    assert dispatch.dispatch_due(get_settings(), publish=lambda q, ids: None) == 2  # run d's two only
    # disabling again changes nothing
    code, out, _ = run_cli(capsys, "inbox", "disable", "acme/sales-1", "--reason", "again")
    assert code == 0 and out == "inbox acme/sales-1: already disabled (number reported as spam); nothing changed\n"
    assert len(_inbox_events()) == 1


def test_enable_resumes_exactly_the_runs_paused_inbox_disabled(world, capsys):
    ws, cols, one, two, runs = world
    db.execute_sql("UPDATE inboxes SET consecutive_failures = 5 WHERE id = %s", (one.id,))
    run_ops.pause_run(runs["b"].id)  # paused by the operator before the inbox was disabled
    run_cli(capsys, "inbox", "disable", "sales-1", "--reason", "5 consecutive send failures")
    run_ops.pause_run(runs["d"].id)  # manual, on the other inbox
    # run c: the operator took over its pause (issue 12: an operator pause sticks)
    db.execute_sql("UPDATE campaign_runs SET pause_reason = 'manual' WHERE id = %s", (runs["c"].id,))
    before = {m.id: m.scheduled_at for m in CampaignMessage.select().where(CampaignMessage.run == runs["a"].id)}

    code, out, err = run_cli(capsys, "inbox", "enable", "sales-1", "--reason", "number unblocked by Meta")
    assert code == 0, err
    assert out == (
        f"inbox acme/sales-1 enabled by alice (consecutive failures reset to 0); runs resumed: {runs['a'].id}\n"
    )
    ibx = Inbox.get_by_id(one.id)
    assert (ibx.disabled, ibx.disabled_reason, ibx.consecutive_failures) == (False, None, 0)
    assert _run(runs["a"]) == ("running", None)
    assert _run(runs["b"]) == _run(runs["c"]) == _run(runs["d"]) == ("paused", "manual")
    # resumed the way a resume does: the overdue messages were re-planned from now (E-22)
    after = {m.id: m.scheduled_at for m in CampaignMessage.select().where(CampaignMessage.run == runs["a"].id)}
    assert all(after[i] > before[i] for i in before)
    level, text, details = _inbox_events()[-1]
    assert (level, text) == ("info", "inbox acme/sales-1 enabled by alice: number unblocked by Meta")
    assert details == {
        "inbox_id": one.id,
        "inbox": "acme/sales-1",
        "action": "enable",
        "by": "alice",
        "reason": "number unblocked by Meta",
        "was_disabled": True,
        "disabled_reason": "5 consecutive send failures",
        "failures_reset": 5,
        "health_was": "healthy",
        "health_reason": None,
        "resumed_runs": [runs["a"].id],
    }
    resumed = db.execute_sql(
        "SELECT run_id FROM campaign_events WHERE text = 'run resumed (inbox_disabled cleared)'"
    ).fetchall()
    assert resumed == [(runs["a"].id,)]
    # enabling an enabled inbox: nothing to do, nothing logged
    code, out, _ = run_cli(capsys, "inbox", "enable", "sales-1")
    assert code == 0 and out == "inbox acme/sales-1: not disabled, throttled or restricted; nothing changed\n"
    assert len(_inbox_events()) == 2


def test_enable_without_reason_is_logged_as_such(world, capsys):
    ws, cols, one, two, runs = world
    run_cli(capsys, "inbox", "disable", "sales-2", "--reason", "maintenance")
    assert run_cli(capsys, "inbox", "enable", "sales-2")[0] == 0
    assert _run(runs["d"]) == ("running", None)
    level, text, details = _inbox_events()[-1]
    assert text == "inbox acme/sales-2 enabled by alice: no reason given" and details["reason"] is None


def test_names_workspaces_and_bad_input(world, capsys):
    ws, cols, one, two, runs = world
    other, _ = f.workspace("beta")
    theirs = f.inbox(other, "sales-1")
    code, out, err = run_cli(capsys, "inbox", "disable", "sales-1", "--reason", "x")
    assert code == 2 and out == ""
    assert err == (
        "error: inbox 'sales-1' exists in 2 workspaces (acme, beta): name one with --workspace W or as W/sales-1\n"
    )
    assert run_cli(capsys, "inbox", "disable", "sales-1", "--workspace", "beta", "--reason", "x")[0] == 0
    assert Inbox.get_by_id(theirs.id).disabled and not Inbox.get_by_id(one.id).disabled
    assert run_cli(capsys, "inbox", "enable", "beta/sales-1")[0] == 0
    assert not Inbox.get_by_id(theirs.id).disabled

    code, _, err = run_cli(capsys, "inbox", "enable", "ghost")
    assert code == 2 and err == (
        "error: inbox 'ghost' does not exist (inboxes: acme/sales-1, acme/sales-2, beta/sales-1)\n"
    )
    code, _, err = run_cli(capsys, "inbox", "enable", "ghost", "--workspace", "acme")
    assert code == 2 and err == (
        "error: inbox 'ghost' is not an inbox of workspace 'acme' (its inboxes: acme/sales-1, acme/sales-2)\n"
    )
    code, _, err = run_cli(capsys, "inbox", "enable", "sales-1", "--workspace", "nope")
    assert code == 2 and err == "error: workspace 'nope' does not exist\n"
    code, _, err = run_cli(capsys, "inbox", "disable", "acme/sales-2", "--reason", "  ")
    assert code == 2 and "needs --reason" in err
    with pytest.raises(SystemExit) as exc:  # argparse: --reason is required to disable
        cli.main(["inbox", "disable", "sales-2"])
    assert exc.value.code == 2 and "--reason" in capsys.readouterr().err
    assert not Inbox.get_by_id(two.id).disabled
    assert [e[2]["inbox"] for e in _inbox_events()] == ["beta/sales-1", "beta/sales-1"]  # refusals log nothing


def test_inboxes_lists_state_disabled_and_failures(world, capsys):
    """R-HEALTH-4: state (disabled wins over health), connection, cap today (halved while throttled),
    sent in 24 h, reply ratio, consecutive failures and the reason, one line per inbox."""
    ws, cols, one, two, runs = world
    db.execute_sql(
        """UPDATE inboxes SET connection_state = 'close', disconnected_since = '2026-06-10 12:00+00',
                             consecutive_failures = 2, max_per_day = 41, health_state = 'throttled',
                             health_since = now(), health_until = '2099-01-02 03:04+00',
                             health_reason = '6 delivery errors' WHERE id = %s""",
        (two.id,),
    )
    db.execute_sql("UPDATE inboxes SET max_per_day = NULL WHERE id = %s", (one.id,))
    run_cli(capsys, "inbox", "disable", "sales-1", "--reason", "banned")
    code, out, _ = run_cli(capsys, "inboxes")
    assert code == 0
    header, first, second = (re.split(r"\s{2,}", line.strip()) for line in out.splitlines())
    assert header == list(cli.INBOX_COLUMNS)
    # work: three one-inbox runs of two messages each on sales-1 (paused now), one on sales-2 (R-POOL-4)
    assert first == ["acme/sales-1", one.instance_name, "disabled", "unknown", "-", "0", "-", "6/0/0/0", "0", "banned"]
    assert second == [
        "acme/sales-2",
        two.instance_name,
        "throttled",
        "close since 2026-06-10 12:00 UTC",
        "20 (of 41)",
        "0",
        "-",
        "2/0/0/0",
        "2",
        "6 delivery errors (until 2099-01-02 03:04 UTC)",
    ]
    code, _, err = run_cli(capsys, "inboxes", "--workspace", "nope")
    assert code == 2 and "workspace 'nope' does not exist" in err


def test_apply_never_re_enables_a_disabled_inbox(clean_db, capsys, tmp_path):
    """R-FAIL-6: neither re-applying the file nor changing the inbox in it brings a disabled inbox back."""
    path = tmp_path / "acme.toml"
    path.write_text(EXAMPLE)
    assert run_cli(capsys, "apply", str(path))[0] == 0
    db.execute_sql("UPDATE inboxes SET consecutive_failures = 3")
    assert run_cli(capsys, "inbox", "disable", "sales-1", "--reason", "banned")[0] == 0
    assert run_cli(capsys, "apply", str(path))[0] == 0  # unchanged file
    path.write_text(EXAMPLE.replace("max_per_hour = 60", "max_per_hour = 30"))
    code, out, _ = run_cli(capsys, "apply", str(path))
    assert code == 0 and "inboxes: 0 created, 1 updated" in out
    ibx = Inbox.get(name="sales-1")
    assert ibx.max_per_hour == 30
    assert (ibx.disabled, ibx.disabled_reason, ibx.consecutive_failures) == (True, "banned", 3)


def test_scheduler_resumes_a_run_paused_inbox_disabled_after_its_inbox_came_back(world, monkeypatch):
    """A worker that read the inbox as disabled just before `inbox enable` pauses its run just after:
    the scheduler's inbox health job resumes it; a run on a still-disabled inbox stays paused."""
    ws, cols, one, two, runs = world
    monkeypatch.setattr(recovery, "check_inboxes", lambda settings, evolution: {"states": {}, "resumed": []})
    db.execute_sql("UPDATE inboxes SET disabled = true, disabled_reason = 'banned' WHERE id = %s", (two.id,))
    run_ops.pause_runs("true", (), "inbox_disabled")  # every run; only sales-2 is disabled
    result = scheduler._inbox_health(get_settings(), lambda: True)
    assert result["resumed_enabled"] == [runs["a"].id, runs["b"].id, runs["c"].id]
    assert _run(runs["a"]) == ("running", None) and _run(runs["d"]) == ("paused", "inbox_disabled")
    assert scheduler._inbox_health(get_settings(), lambda: True)["resumed_enabled"] == []


def test_operator_pause_of_a_run_paused_inbox_disabled_survives_enable(world, capsys):
    """Issue 12: `pause` of a run auto-paused inbox_disabled makes it the operator's; `inbox enable` leaves
    it paused, `resume` ends it."""
    ws, cols, one, two, runs = world
    run_cli(capsys, "inbox", "disable", "sales-2", "--reason", "banned")
    assert _run(runs["d"]) == ("paused", "inbox_disabled")
    code, out, _ = run_cli(capsys, "pause", str(runs["d"].id))
    assert code == 0 and out == (
        f"run {runs['d'].id} paused (manual): it was paused automatically (inbox_disabled); "
        "it no longer resumes by itself, only with `resume`\n"
    )
    code, out, _ = run_cli(capsys, "inbox", "enable", "sales-2")
    assert code == 0 and out.endswith("runs resumed: none\n")
    assert _run(runs["d"]) == ("paused", "manual")
    assert run_cli(capsys, "resume", str(runs["d"].id))[0] == 0
    assert _run(runs["d"]) == ("running", None)


def _restrict(inbox: Inbox, world_runs: dict) -> None:
    """Make ``inbox`` restricted through real evidence: 15 of its sent parts got a delivery ERROR."""
    from campaign import health

    run = next(r for r in world_runs.values() if r.config.inbox_id == inbox.id)
    for i in range(15):
        m = f.message(run, f.lead(run.config.workspace, None))
        db.execute_sql(
            """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, provider_message_id, sending_at,
                                          sent_at, delivery_error_at)
               VALUES (%s, %s, 0, 'x', 'sent', %s, now(), now(), now())""",
            (m.id, inbox.id, f"KEY-{inbox.id}-{i}"),
        )
    change = health.evaluate(inbox.id, get_settings())
    assert change is not None and change.new == "restricted"


def test_enable_brings_a_restricted_inbox_back_and_resumes_its_runs(world, capsys):
    """R-HEALTH-2: `inbox enable` ends restricted at once (the errors so far forgiven), resumes the runs
    paused inbox_restricted on it, and logs who/why with the state it left."""
    from campaign import health

    ws, cols, one, two, runs = world
    _restrict(one, runs)
    assert _run(runs["a"]) == _run(runs["b"]) == _run(runs["c"]) == ("paused", "inbox_restricted")
    assert _run(runs["d"]) == ("running", None)
    code, out, err = run_cli(capsys, "inbox", "enable", "sales-1", "--reason", "checked the number")
    assert code == 0, err
    ids = ", ".join(str(runs[k].id) for k in "abc")
    assert out == (
        f"inbox acme/sales-1 enabled by alice (consecutive failures reset to 0; restricted -> healthy); "
        f"runs resumed: {ids}\n"
    )
    ibx = Inbox.get_by_id(one.id)
    assert (ibx.health_state, ibx.health_until, ibx.health_reason) == ("healthy", None, None)
    assert _run(runs["a"]) == ("running", None)
    level, text, details = _inbox_events()[-1]
    assert details["health_was"] == "restricted" and "15 delivery error(s)" in details["health_reason"]
    # the errors before the enable are forgiven: the next evaluation keeps it healthy
    assert health.evaluate(one.id, get_settings()) is None and Inbox.get_by_id(one.id).health_state == "healthy"


def test_apply_never_lifts_a_restricted_or_throttled_inbox(clean_db, capsys, tmp_path):
    """R-HEALTH-2: re-applying (or changing) the TOML leaves the health state, its cool-down and reason alone."""
    path = tmp_path / "acme.toml"
    path.write_text(EXAMPLE)
    assert run_cli(capsys, "apply", str(path))[0] == 0
    db.execute_sql(
        """UPDATE inboxes SET health_state = 'restricted', health_since = now(),
                  health_until = now() + interval '20 hours', health_reason = '16 delivery errors'
            WHERE name = 'sales-1'"""
    )
    before = Inbox.get(name="sales-1")
    assert run_cli(capsys, "apply", str(path))[0] == 0
    path.write_text(EXAMPLE.replace("max_per_hour = 60", "max_per_hour = 30"))
    assert run_cli(capsys, "apply", str(path))[0] == 0
    ibx = Inbox.get(name="sales-1")
    assert ibx.max_per_hour == 30
    assert (ibx.health_state, ibx.health_until, ibx.health_reason) == (
        "restricted",
        before.health_until,
        "16 delivery errors",
    )
