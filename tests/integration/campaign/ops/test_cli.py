"""The operator CLI end to end on the real services (R-OPS-1): apply, import-leads, run-now,
pause/resume/cancel, status, verify — exit codes and one-line errors."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from campaign.db import db
from campaign.ops import cli
from models import CampaignConfig, CampaignMessage, CampaignRun, Lead
from tests import ROOT
from tests.integration.campaign.ops.test_configfile import EXAMPLE, snapshot

# the example, open every day and all day, with gaps short enough to run now
ALWAYS = (
    EXAMPLE.replace('weekdays = ["mon", "tue", "wed", "thu", "fri"]', "")
    .replace('window = { start = "09:00", end = "18:00" }', "")
    .replace("min = 60, max = 180", "min = 1, max = 2")
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def applied(clean_db, tmp_path, capsys):
    path = tmp_path / "acme.toml"
    path.write_text(ALWAYS)
    code, out, _ = run_cli(capsys, "apply", str(path))
    assert code == 0 and "campaigns: 1 created" in out
    return path


def test_apply_twice_is_a_no_op(clean_db, capsys):
    example = str(ROOT / "examples" / "acme.toml")
    code, out, _ = run_cli(capsys, "apply", example)
    assert code == 0 and "workspaces: 1 created" in out and "inboxes: 1 created" in out
    before = snapshot()
    code, out, _ = run_cli(capsys, "apply", example)
    assert code == 0 and "nothing changed" in out
    assert snapshot() == before
    assert CampaignConfig.get().version == 1


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("daily_limit = 200", "daily_limit = -3", "workspaces.acme.campaigns.first-touch.daily_limit"),
        ('"America/Sao_Paulo"', '"America/Atlantis"', "workspaces.acme.campaigns.first-touch.timezone"),
        ('inbox = "sales-1"', 'inbox = "ghost"', "workspaces.acme.campaigns.first-touch.inbox"),
        ('start = "09:00"', 'start = "9h"', "workspaces.acme.campaigns.first-touch.window.start"),
        ("max_parts = 3", "max_parts = 0", "workspaces.acme.campaigns.first-touch.split.max_parts"),
        ("max_per_day = 300", 'max_per_day = "many"', "workspaces.acme.inboxes.sales-1.max_per_day"),
        ("[workspaces.acme]", "[workspaces.acme\n", "invalid TOML"),
    ],
)
def test_broken_toml_changes_nothing(clean_db, capsys, tmp_path, old, new, key):
    run_cli(capsys, "apply", str(ROOT / "examples" / "acme.toml"))
    before = snapshot()
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.replace(old, new).replace("daily_limit = 200", "daily_limit = 201"))
    code, out, err = run_cli(capsys, "apply", str(bad))
    assert code == 2 and out == ""
    assert any(key in line for line in _error_lines(err)), err
    assert "nothing was applied" in err
    assert snapshot() == before


def test_import_leads_reports_bad_rows_and_reimport_updates(applied, capsys, tmp_path):
    code, out, _ = run_cli(
        capsys, "import-leads", str(ROOT / "examples" / "leads.csv"), "--workspace", "acme", "--column", "New"
    )
    assert code == 1  # some rows rejected, the good ones imported
    assert "17 lead(s) imported into acme/New: 17 new" in out
    assert "rejected line 19: missing phone" in out and "rejected line 22: missing name" in out
    assert "rejected line 20: invalid phone '12345'" in out
    csv = tmp_path / "more.csv"
    csv.write_text("name,phone,city\nAna Souza Lima,+55 11 91234-5601,Recife\n")
    code, out, _ = run_cli(capsys, "import-leads", str(csv), "--workspace", "acme", "--column", "New")
    assert code == 0 and "0 new, 1 updated" in out
    assert Lead.select().count() == 17
    assert Lead.get(phone="+5511912345601").name == "Ana Souza Lima"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workspace", "nope", "--column", "New"], "error: workspace 'nope' does not exist"),
        (["--workspace", "acme", "--column", "Done"], "error: column 'Done' is not a column of workspace 'acme'"),
        (["--workspace", "acme", "--column", "New", "--region", "ZZ"], "error: --region 'ZZ'"),
    ],
)
def test_import_leads_bad_arguments(applied, capsys, args, message):
    code, out, err = run_cli(capsys, "import-leads", str(ROOT / "examples" / "leads.csv"), *args)
    assert code == 2 and len(_error_lines(err)) == 1 and _error_lines(err)[0].startswith(message), err
    assert Lead.select().count() == 0


def test_import_leads_binary_file(applied, capsys, tmp_path):
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "import-leads", str(junk), "--workspace", "acme", "--column", "New")
    assert code == 2 and "binary data" in err and Lead.select().count() == 0


def test_run_now_pause_resume_cancel_status_verify(applied, capsys):
    run_cli(capsys, "import-leads", str(ROOT / "examples" / "leads.csv"), "--workspace", "acme", "--column", "New")
    code, out, err = run_cli(capsys, "run-now", "acme/first-touch")
    assert code == 0, err
    run = CampaignRun.get()
    assert f"run {run.id} of acme/first-touch planned" in out and "17 message(s)" in out
    assert run.manual and run.leads_total == 17

    code, _, err = run_cli(capsys, "run-now", "acme/first-touch")
    assert code == 2 and f"already has run {run.id}" in err
    code, _, err = run_cli(capsys, "run-now", "acme/ghost")
    assert code == 2 and _error_lines(err) == [
        "error: campaign 'acme/ghost' does not exist (workspace 'acme', campaign 'ghost')"
    ]

    code, out, _ = run_cli(capsys, "status", "--no-queues")
    assert code == 0 and "acme/first-touch" in out and str(run.id) in out and "running" in out

    assert run_cli(capsys, "pause", str(run.id))[:2] == (0, f"run {run.id} paused\n")
    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and "paused (manual)" in out and "campaign.generate" in out
    code, _, err = run_cli(capsys, "pause", str(run.id))
    assert code == 2 and _error_lines(err) == [
        f"error: run {run.id} is paused (manual), cannot pause (only a running or automatically paused run can)"
    ]
    code, out, _ = run_cli(capsys, "resume", str(run.id))
    assert code == 0 and out.startswith(f"run {run.id} resumed")
    assert CampaignRun.get_by_id(run.id).status == "running"

    code, out, _ = run_cli(capsys, "cancel", str(run.id))
    assert code == 0 and out == f"run {run.id} cancelled: 17 pending message(s) skipped\n"
    assert CampaignMessage.select().where(CampaignMessage.skip_reason == "cancelled").count() == 17
    code, _, err = run_cli(capsys, "resume", str(run.id))
    assert code == 2 and f"run {run.id} is cancelled, cannot resume" in err
    code, _, err = run_cli(capsys, "cancel", "424242")
    assert code == 2 and "run 424242 does not exist" in err

    code, out, _ = run_cli(capsys, "verify")
    assert code == 0 and out.startswith("ok: the counters of all 1 run(s) match")
    # a counter that disagrees with the rows: verify exits 1 and names it
    db.execute_sql("UPDATE campaign_runs SET leads_total = leads_total + 1 WHERE id = %s", (run.id,))
    code, out, _ = run_cli(capsys, "verify")
    assert code == 1 and f"MISMATCH run {run.id}: leads_total = 18 but the rows say 17" in out


def test_run_now_outside_the_window_is_refused(clean_db, capsys, tmp_path):
    path = tmp_path / "closed.toml"
    path.write_text(
        EXAMPLE.replace('weekdays = ["mon", "tue", "wed", "thu", "fri"]', 'weekdays = ["mon"]').replace(
            'window = { start = "09:00", end = "18:00" }', 'window = { start = "00:00", end = "00:01" }'
        )
    )
    run_cli(capsys, "apply", str(path))
    code, _, err = run_cli(capsys, "run-now", "acme/first-touch")
    assert code == 2 and ("does not run on" in err or "is closed for the rest of" in err), err
    assert CampaignRun.select().count() == 0


def test_status_and_verify_on_an_empty_database(clean_db, capsys):
    code, out, _ = run_cli(capsys, "status", "--no-queues")
    assert code == 0 and "no run in progress" in out and "scheduler_heartbeat" in out
    assert run_cli(capsys, "verify")[0] == 0
    code, _, err = run_cli(capsys, "status", "--interval", "0")
    assert code == 2 and "--interval" in err


def test_cli_runs_as_a_script(applied):
    """``python cli.py`` itself (entry point, settings from the environment, exit code)."""
    proc = subprocess.run(
        [sys.executable, "cli.py", "apply", str(applied)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "nothing changed" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "cli.py", "pause", "777"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "error: run 777 does not exist" in proc.stderr


# --------------------------------------------------------------------------------------------
# status renders data as data (issue 23 item 3)


def test_status_command_with_a_markup_like_provider_error(clean_db, capsys):
    """Issue 23 item 3, end to end: the reproduction through `cli.py status`."""
    from tests.integration import factories as f

    ws, cols = f.workspace("acme")
    run = f.run(f.config(ws, f.inbox(ws), cols["New"], cols["Contacted"], name="first-touch"), leads_total=1)
    f.message(
        run,
        f.lead(ws, cols["New"]),
        status="failed",
        error_class="PermanentError",
        error_message="[/x] is not a valid model ID [bold]",
        finished_at=dt.datetime.now(dt.UTC),
    )
    code, out, err = run_cli(capsys, "status", "--no-queues")
    assert code == 0, err
    assert "[/x] is not a valid model ID [bold]" in out
