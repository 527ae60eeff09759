"""The demo's second step of a sequence (SPEC R-SEQ-3): a follow-up "a day" after the first touch.

After the first-touch runs of ``devtools.demo`` finished (their leads are in "Contacted"), with the
workers, the scheduler and the listeners still running:

1. two leads of the ``comeback`` campaign that have not answered yet answer through the sandbox as
   Evolution would: one a question, one "PARE" (opted out for good); the comeback campaign's AI
   triage (devtools.demo_triage) moves them out of "Contacted" (Questions, Lost), the welcome
   campaign's two scripted answers moved their leads to "Replied" already, and the triage scene's
   away message (out_of_office) is no reply: that lead stays and is followed up (E-36);
2. a day passes on the compressed clock: every time the engine keeps about the demo's leads
   (``column_changed_at``, ``last_reply_at``) moves back 24 hours, exactly as if the follow-up were
   planned the next day; nothing else changes, and the order of entries and replies stays;
3. the ``follow-up`` campaign of ``examples/demo.toml`` (``min_days_in_column = 1``,
   ``skip_if_replied``, ``history = 4``, a pool of every number) is planned the ``run-now`` way and
   run by the same workers: it writes only to the silent leads, each from the number it already
   talks to (R-POOL-2), and counts who it left out and why (too recent, replied, opted out);
4. one LLM request of the follow-up is printed from the sandbox ledger: the first message is in its
   prompt, as data in the user message.

``devtools.demo`` calls :func:`plan_later` (which campaigns wait for this step) and :func:`run`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("demo")

__all__ = ["FOLLOW_UP", "REPLY_TEXT", "OPT_OUT_TEXT", "plan_later", "run"]

FOLLOW_UP = "follow-up"  # the campaign of examples/demo.toml planned by this step, not with the first touches
REPLIER_CAMPAIGN = "comeback"  # whose leads answer here (no reply column: they stay in the follow-up's column)
REPLY_TEXT = "Oi! Vou ver com meu sócio e te falo."
OPT_OUT_TEXT = "PARE"
SHIFT = "1 day"  # how far the compressed clock jumps


def plan_later(name: str) -> bool:
    """True for a campaign that this step plans (the first planning round leaves it alone)."""
    return name == FOLLOW_UP


def run(
    console: Any,
    sb: Any,
    workspace_id: int,
    *,
    watch: Callable[[Any, list[int], float], list[dict[str, Any]]],
    timeout: float,
) -> dict[str, Any]:
    """Replies, a day later, the follow-up run; returns what happened (empty without a follow-up)."""
    from campaign import planner
    from campaign.db import db

    with db.connection_context():
        row = db.execute_sql(
            "SELECT id FROM campaign_configs WHERE workspace_id = %s AND name = %s", (workspace_id, FOLLOW_UP)
        ).fetchone()
    if row is None:
        return {}
    config_id = int(row[0])
    sb.set_faults({"keep_prompts": True})  # the ledger keeps the follow-up's prompts (printed below)
    since = _last_seq(sb)

    answered = _replies(console, sb, workspace_id, timeout)
    with db.connection_context():
        db.execute_sql(
            f"""UPDATE leads SET column_changed_at = column_changed_at - interval '{SHIFT}',
                                last_reply_at = last_reply_at - interval '{SHIFT}'
                 WHERE workspace_id = %s""",
            (workspace_id,),
        )
    console.print(
        f"[seq 2/4] a day passes (compressed clock): the leads' column and reply times move back {SHIFT}; "
        f"the {FOLLOW_UP} campaign waits min_days_in_column = 1 local day in Contacted",
        markup=False,
    )

    with db.connection_context():
        follow = planner.plan_run(config_id, manual=True)
    if follow is None or follow.status == "failed":
        console.print(f"run-now of {FOLLOW_UP} did not plan a run", style="bold red", markup=False)
        return {"run_ids": [], "status": "failed"}
    console.print(
        f"[seq 3/4] run-now {FOLLOW_UP}: run {follow.id}, {follow.leads_total} message(s) to the silent leads; "
        f"excluded from Contacted: too recent {follow.excluded_too_recent}, replied {follow.excluded_replied}, "
        f"opted out {follow.excluded_opted_out}",
        markup=False,
    )
    (state,) = watch(console, [follow.id], timeout)
    summary = _summary(follow.id, answered)
    console.print(
        f"      {summary['sent']} follow-up(s) sent, {summary['to_repliers']} to a lead who answered; "
        + ", ".join(f"{n} through {inbox}" for inbox, n in sorted(summary["by_inbox"].items()))
        + f" ({summary['same_number']} of {summary['sent']} from the number that sent the first touch, R-POOL-2)",
        markup=False,
    )
    _print_prompt(console, sb, since)
    return {**summary, "run_ids": [follow.id], "status": state["status"]}


def _ledger(sb: Any, since: int) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{sb.url}/__sandbox/ledger", params={"since": since}, timeout=30.0, trust_env=False)
    r.raise_for_status()
    return r.json()


def _last_seq(sb: Any) -> int:
    """The ledger's newest sequence number (entries after it are this step's)."""
    ledger = _ledger(sb, 0)
    seqs = [e["seq"] for key in ("requests", "sends", "inbound", "connections") for e in ledger.get(key, [])]
    return max(seqs, default=0)


def _replies(console: Any, sb: Any, workspace_id: int, timeout: float) -> dict[str, str]:
    """Two leads of the comeback campaign answer (a question, an opt-out); wait until both are applied."""
    from campaign.db import db

    with db.connection_context():
        rows = db.execute_sql(
            """SELECT l.phone, i.instance_name FROM campaign_messages m
                 JOIN campaign_runs r ON r.id = m.run_id JOIN campaign_configs c ON c.id = r.config_id
                 JOIN leads l ON l.id = m.lead_id JOIN inboxes i ON i.id = m.inbox_id
                WHERE c.workspace_id = %s AND c.name = %s AND m.status = 'sent' AND NOT l.opted_out
                  AND NOT EXISTS (SELECT 1 FROM conversation_messages cm JOIN conversations cv
                                      ON cv.id = cm.conversation_id
                                   WHERE cv.lead_id = l.id AND cm.direction = 'in')
                ORDER BY l.id LIMIT 2""",
            (workspace_id, REPLIER_CAMPAIGN),
        ).fetchall()
    answered = dict(zip((phone for phone, _ in rows), (REPLY_TEXT, OPT_OUT_TEXT), strict=False))
    for phone, instance in rows:
        sb.inbound(instance=instance, number=phone, text=answered[phone])
    deadline = time.monotonic() + min(timeout, 30.0)
    while answered and time.monotonic() < deadline:
        # applied AND triaged: the AI triage (an actor of its own) moves each answer out of
        # Contacted; the follow-up is planned only then, so it never meets them there
        with db.connection_context():
            (settled,) = db.execute_sql(
                """SELECT count(*) FROM leads l JOIN columns c ON c.id = l.column_id
                    WHERE l.workspace_id = %s AND l.phone = ANY(%s) AND l.last_reply_at IS NOT NULL
                      AND c.name <> 'Contacted'""",
                (workspace_id, list(answered)),
            ).fetchone()
        if settled == len(answered):
            break
        time.sleep(0.1)
    console.print(
        f"[seq 1/4] {len(answered)} lead(s) of {REPLIER_CAMPAIGN} answer in Contacted: "
        + "; ".join(f"{phone} {text!r}" for phone, text in answered.items())
        + " (the welcome campaign's two answers already moved their leads to Replied)",
        markup=False,
    )
    return answered


def _summary(run_id: int, answered: dict[str, str]) -> dict[str, Any]:
    """What the follow-up did, from its rows."""
    from campaign.db import db

    with db.connection_context():
        rows = db.execute_sql(
            """SELECT l.phone, m.status, i.name,
                      EXISTS (SELECT 1 FROM campaign_messages f JOIN campaign_runs fr ON fr.id = f.run_id
                               WHERE f.lead_id = m.lead_id AND f.run_id <> m.run_id AND f.status = 'sent'
                                 AND f.inbox_id = m.inbox_id)
                 FROM campaign_messages m JOIN leads l ON l.id = m.lead_id JOIN inboxes i ON i.id = m.inbox_id
                WHERE m.run_id = %s""",
            (run_id,),
        ).fetchall()
    sent = [r for r in rows if r[1] == "sent"]
    by_inbox: dict[str, int] = {}
    for r in sent:
        by_inbox[r[2]] = by_inbox.get(r[2], 0) + 1
    return {
        "run_id": run_id,
        "planned": len(rows),
        "sent": len(sent),
        "to_repliers": sum(1 for r in rows if r[0] in answered),
        "by_inbox": by_inbox,
        "same_number": sum(1 for r in sent if r[3]),
        "answered": answered,
    }


def _print_prompt(console: Any, sb: Any, since: int) -> None:
    """One generation request of the follow-up, as the sandbox (the fake OpenRouter) received it."""
    from rich.markup import escape

    requests = [
        e["messages"]
        for e in _ledger(sb, since)["requests"]
        if e.get("route") == "chat" and e.get("messages") and "<conversation>" in str(e["messages"][-1].get("content"))
    ]
    if not requests:
        console.print("      (no follow-up LLM request with a conversation in the sandbox ledger)", style="yellow")
        return
    # the one with the longest conversation (a first touch split in bubbles shows them all)
    messages = max(requests, key=lambda ms: str(ms[-1].get("content")).count("\nus: "))
    console.rule(escape("[seq 4/4] one LLM request of the follow-up, as the sandbox's ledger keeps it"))
    for m in messages:
        console.print(f"{m['role']}:", style="bold")
        console.print("  " + str(m["content"]).replace("\n", "\n  "), markup=False, highlight=False)
