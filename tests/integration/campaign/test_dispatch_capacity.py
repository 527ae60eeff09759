"""Just-in-time dispatch end to end (issue 22, SPEC R-DISP-2, R-PLAN-3): the mis-configured campaign of
issue 22 on real PostgreSQL and the sandbox (real HTTP clients; the chain driven in this process).

A 25/hour inbox and gaps of a fraction of a second: `apply` warns, the plan widens the gaps and counts
the overflow, a burst of due messages costs one LLM call per message actually sent, the rest waits
in PostgreSQL (`pending`, due time moved) and is skipped at the window's end without having been
generated.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from campaign import dispatch, planner, runs
from campaign.db import db
from campaign.ops.configfile import apply_text
from campaign.ops.monitor import verify
from models import CampaignMessage, CampaignRun, Column, Inbox
from tests.integration import factories as f
from tests.integration.pipeline_helpers import drive, fast_settings

UTC = dt.UTC

TOML = """
[workspaces.acme]
columns = ["New", "Contacted"]

[workspaces.acme.inboxes.sales-1]
instance = "acme-sales-1"
max_per_hour = 25
min_gap_seconds = 0

[workspaces.acme.campaigns.burst]
inbox = "sales-1"
source_column = "New"
target_column = "Contacted"
window = {{ start = "00:00", end = "{end}" }}
timezone = "{tz}"
daily_limit = 500
gap_seconds = {{ min = 0.1, max = 0.3 }}
part_gap_seconds = {{ min = 0, max = 0 }}
model = "test/model"
system_prompt = "Be brief."
"""


def _midday_zone(now: dt.datetime) -> str:
    """A fixed-offset zone where it is about noon now (the test's window never crosses midnight)."""
    k = 12 - now.hour
    k = k - 24 if k > 14 else k + 24 if k < -12 else k
    return "UTC" if k == 0 else f"Etc/GMT{'-' if k > 0 else '+'}{abs(k)}"


def _llm_calls(sb) -> int:
    return sum(sb.summary()["by_route"].get("chat", {}).values())


def test_misconfigured_campaign_spends_no_tokens_on_messages_that_cannot_go_out(clean_db, sb, llm, evo):
    """issue 22: 25/hour, sub-second gaps. apply warns; the plan keeps 144 s gaps and counts the overflow;
    with the hour nearly spent, a burst of due messages gets ONE claim, ONE LLM call, ONE send; the
    others stay pending (no Dramatiq delay loop) and are skipped `window_closed` at the window's end
    with no text generated; the leads not planned stay in the source column; counters verify."""
    settings = fast_settings()
    now = dt.datetime.now(UTC)
    tz = _midday_zone(now)
    local = now.astimezone(ZoneInfo(tz))
    end_minute = local.hour * 60 + local.minute + 20
    summary = apply_text(TOML.format(tz=tz, end=f"{end_minute // 60:02d}:{end_minute % 60:02d}"))
    warnings = [line for line in summary.lines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "max_per_hour is 25" in warnings[0] and "0.1 s" in warnings[0], summary.lines()

    ibx = Inbox.get(Inbox.name == "sales-1")
    ws = ibx.workspace
    new_id = db.execute_sql("SELECT id FROM columns WHERE workspace_id = %s AND name = 'New'", (ws.id,)).fetchone()[0]
    db.execute_sql(
        """INSERT INTO leads (workspace_id, column_id, name, phone)
           SELECT %s, %s, 'Lead ' || g, '+5521' || (900000000 + g)::text FROM generate_series(1, 100) g""",
        (ws.id, new_id),
    )
    cfg_id = planner.find_config("acme/burst")
    run = planner.plan_run(cfg_id)
    assert run is not None
    # at most 25 an hour in what is left of the window (20 minutes, minus the seconds of this one)
    assert 1 <= run.leads_total <= 9 and run.leads_overflow == 100 - run.leads_total
    times = [m.scheduled_at for m in f.messages_of(run.id)]
    assert all((b - a).total_seconds() >= 144 - 1e-6 for a, b in zip(times, times[1:], strict=False))

    # Another campaign already spent 24 of the hour's 25 sends on this number, and every planned
    # message is due at once (the burst of issue 22: a resumed run, a plan made before the cap fell).
    hist_cfg = f.config(ws, ibx, Column.get_by_id(new_id), None, name="earlier", active=False)
    hist_run = f.run(hist_cfg, run_date=dt.date(2000, 1, 1), status="completed")
    hist = f.message(hist_run, None, inbox=ibx.id, status="sent", sent_at=now)
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sending_at, sent_at)
           SELECT %s, %s, g, 'hi', 'sent', now() - interval '10 minutes', now() - interval '10 minutes'
             FROM generate_series(0, 23) g""",
        (hist.id, ibx.id),
    )
    db.execute_sql(
        "UPDATE campaign_messages SET scheduled_at = now() - interval '1 second' WHERE run_id = %s", (run.id,)
    )

    claimed: list[int] = []
    assert dispatch.dispatch_due(settings, publish=lambda q, ids: claimed.extend(ids)) == 1
    assert drive(claimed[0], settings, llm, evo) == "sent"
    assert dispatch.dispatch_due(settings, publish=lambda q, ids: claimed.extend(ids)) == 0  # the hour is full
    waiting = CampaignMessage.select().where((CampaignMessage.run == run.id) & (CampaignMessage.status == "pending"))
    assert waiting.count() == run.leads_total - 1
    assert all(m.scheduled_at > now + dt.timedelta(minutes=45) for m in waiting)  # when the hour has room
    assert Inbox.get_by_id(ibx.id).first_send_at is not None  # its first send (R-HEALTH-1's day 0)

    close = planner.window_close_at(local.date(), tz, 0, end_minute)
    assert close is not None
    runs.close_windows(now=close + dt.timedelta(seconds=1))
    rows = db.execute_sql(
        """SELECT status, skip_reason, generated_text IS NOT NULL, count(*) FROM campaign_messages
            WHERE run_id = %s GROUP BY 1, 2, 3""",
        (run.id,),
    ).fetchall()
    by = {(s, r, g): n for s, r, g, n in rows}
    assert by == {("sent", None, True): 1, ("skipped", "window_closed", False): run.leads_total - 1}, by
    assert _llm_calls(sb) == 1 == sb.summary()["sends"]  # tokens only for what went out
    done = CampaignRun.get_by_id(run.id)
    assert done.status == "completed" and done.leads_overflow == 100 - run.leads_total
    left = db.execute_sql("SELECT count(*) FROM leads WHERE column_id = %s", (new_id,)).fetchone()[0]
    assert left == 99  # every lead but the one messaged stays for the next run
    assert [x for x in verify() if x.run_id == run.id] == []  # (the hand-made history run has no counters)
