"""Operator repairs: dead-letter requeue (R-OPS-2, R-FAIL-3) and in-doubt resolution (R-FAIL-4).

Conditional transitions like every step of the chain: a second invocation finds another status
and changes nothing. Each runs in ONE transaction (message, parts, run counters, run reopen); the
caller publishes the next step only once it committed. A publish lost after the commit is the
recovery sweep's: it re-publishes in-flight messages past their hand-off deadline (R-FAIL-8),
which is why every repair stamps ``wake_at``.
"""

from __future__ import annotations

import dataclasses

from campaign import runs, steps
from campaign.db import db
from campaign.errors import RepairRefused
from campaign.events import log_event
from campaign.outcomes import finish_message
from campaign.settings import Settings
from campaign.sql import fetch_all as _all
from campaign.sql import fetch_one as _one

#: the status a message goes back to for each step, and the queue whose actor carries it on
REQUEUE_TARGETS: dict[str, tuple[str, str]] = {s.name: (s.entry_status, s.queue) for s in steps.STEPS}


RUN_SNAPSHOT_FIELDS = (
    "status",
    "pause_reason",
    "leads_total",
    "leads_processed",
    "leads_sent",
    "leads_failed",
    "leads_skipped",
    "leads_in_doubt",
)


@dataclasses.dataclass
class Repair:
    """What an operator repair changed; ``changed`` False: nothing, and ``note`` says why."""

    message_id: int
    changed: bool
    note: str | None = None
    status_from: str | None = None
    status_to: str | None = None
    #: every part as (idx, status before, status after); equal statuses = left untouched
    parts: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    run_id: int | None = None
    run_before: dict | None = None
    run_after: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: (queue, actor args) to publish once the transaction committed
    publish: tuple[str, tuple] | None = None


def run_snapshot(run_id: int) -> dict:
    """The run's status and counters ({} when it does not exist)."""
    row = _one(f"SELECT {', '.join(RUN_SNAPSHOT_FIELDS)} FROM campaign_runs WHERE id = %s", (run_id,))
    return dict(zip(RUN_SNAPSHOT_FIELDS, row)) if row else {}


def _uncount(run_id: int, counter: str) -> list[str]:
    """Take one terminal message back out of its run's counters; a completed run reopens."""
    assert counter in ("leads_failed", "leads_in_doubt"), counter
    row = _one(
        f"""UPDATE campaign_runs r SET {counter} = r.{counter} - 1, leads_processed = r.leads_processed - 1,
                       status = CASE WHEN r.status = 'completed' THEN 'running' ELSE r.status END,
                       finished_at = CASE WHEN r.status = 'completed' THEN NULL ELSE r.finished_at END
                   FROM campaign_runs old WHERE r.id = %s AND old.id = r.id
                   RETURNING old.status""",
        (run_id,),
    )
    return [f"run {run_id} reopened (completed -> running)"] if row and row[0] == "completed" else []


def _requeue_target(message_id: int) -> str:
    """The step a failed message died in, read from its data: parts exist -> send, text -> split.

    Safer than the dead letter's actor name: a dead duplicate of an earlier step must never send
    a message that already went out partly back through generate's checks (R-DISP-4, R-FAIL-5).
    """
    row = _one(
        """SELECT m.generated_text IS NOT NULL,
                         EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id)
                  FROM campaign_messages m WHERE m.id = %s""",
        (message_id,),
    )
    assert row is not None, f"message {message_id} vanished under its FOR UPDATE lock"  # the caller holds it
    has_text, has_parts = row
    return "send_part" if has_parts else "split" if has_text else "generate"


def requeue_dead_step(message_id: int, actor: str, settings: Settings) -> Repair:
    """Put a message whose step died (retries exhausted) back at that step, counters included.

    Only a message still ``failed`` by ``retries_exhausted`` is touched: one that completed
    since, failed for another reason, or whose lead or run is gone keeps its state (``changed``
    False + note). Parts already ``sent`` are never touched (R-FAIL-5); failed/pending ones go
    back to ``pending``. A completed run reopens; a run paused ``error_threshold`` is resumed.
    Publish ``Repair.publish`` after the commit (the sweep covers a lost publish).
    """
    if actor not in REQUEUE_TARGETS:
        raise RepairRefused(f"unknown pipeline actor {actor!r} (known: {', '.join(REQUEUE_TARGETS)})")
    with db.atomic():
        # message then run: the order finish_message locks them in, so no deadlock with a worker
        row = _one(
            """SELECT m.status, m.error_class, m.run_id, m.inbox_id, m.lead_id, r.status, r.pause_reason
                      FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
                      WHERE m.id = %s FOR UPDATE OF m, r""",
            (message_id,),
        )
        if row is None:
            return Repair(message_id, False, note=f"campaign message {message_id} no longer exists")
        status, error_class, run_id, inbox_id, lead_id, run_status, pause_reason = row
        kept = Repair(message_id, False, status_from=status, status_to=status, run_id=run_id)
        if status != "failed":
            kept.note = f"message is '{status}' now (it moved on since the step died): nothing to requeue"
            return kept
        if error_class != "retries_exhausted":
            kept.note = f"message failed for another reason ({error_class}), not by a dead step: not requeued"
            return kept
        if lead_id is None:
            kept.note = "the lead was deleted: nothing to send; the message stays failed"
            return kept
        if run_status in ("cancelled", "failed"):
            kept.note = f"run {run_id} is {run_status}: the message stays failed"
            return kept
        step = _requeue_target(message_id)
        to_status, queue = REQUEUE_TARGETS[step]
        repair = Repair(
            message_id, True, status_from=status, status_to=to_status, run_id=run_id, run_before=run_snapshot(run_id)
        )
        if step != actor:
            repair.notes.append(f"the dead letter is of {actor} but the message had reached {step}: requeued at {step}")
        _one(
            """UPDATE campaign_messages SET status = %s, attempts = 0, error_class = NULL, error_message = NULL,
                    finished_at = NULL, status_changed_at = now(), wake_at = now() + make_interval(secs => %s)
                WHERE id = %s AND status = 'failed' RETURNING id""",
            (to_status, settings.handoff_grace_seconds, message_id),
        )
        repair.parts = [
            tuple(r)
            for r in _all(
                """
            WITH before AS (SELECT id, idx, status FROM message_parts WHERE message_id = %s),
            upd AS (UPDATE message_parts p SET status = 'pending', error_message = NULL
                    FROM before b WHERE p.id = b.id AND b.status IN ('failed', 'pending') RETURNING p.id, p.status)
            SELECT b.idx, b.status, coalesce(upd.status, b.status)
            FROM before b LEFT JOIN upd ON upd.id = b.id ORDER BY b.idx""",
                (message_id,),
            )
        ]
        for idx, before, _ in repair.parts:
            if before in ("sending", "in_doubt"):
                repair.notes.append(
                    f"part #{idx + 1} is {before}: it is never resent automatically; "
                    "the message will turn in_doubt (then `resolve` it)"
                )
        repair.notes += _uncount(run_id, "leads_failed")
        if run_status == "paused":
            if pause_reason == "error_threshold":
                runs.resume_run(run_id)  # re-plans overdue pending messages into the window (E-22)
                repair.notes.append(f"run {run_id} resumed (it was paused: error_threshold)")
            elif any(before == "sent" for _, before, _ in repair.parts):
                repair.notes.append(
                    f"run {run_id} is paused ({pause_reason}); the message already started, so "
                    "its remaining parts still go out (R-DISP-4)"
                )
            else:
                repair.notes.append(f"run {run_id} stays paused ({pause_reason}): the message waits for its resume")
        repair.run_after = run_snapshot(run_id)
        repair.publish = (queue, (message_id, inbox_id) if queue == steps.SEND_PART.queue else (message_id,))
    return repair


def resolve_in_doubt(message_id: int, outcome: str, settings: Settings) -> Repair:
    """The operator's verdict on an ``in_doubt`` message (R-FAIL-4), in one transaction.

    ``sent``: the in-doubt parts reached the lead and become ``sent``; unsent parts left -> the
    message goes back to ``sending`` (publish send_part), else it finishes ``sent`` through
    finish_message (lead move, counters, completion). ``resend``: the in-doubt parts go back
    to ``pending`` and the message to ``sending``. Raises RepairRefused unless ``in_doubt``.
    """
    if outcome not in ("sent", "resend"):
        raise RepairRefused(f"unknown resolution {outcome!r}: 'sent' or 'resend'")
    with db.atomic():
        row = _one(
            """SELECT m.status, m.run_id, m.inbox_id FROM campaign_messages m
                      WHERE m.id = %s FOR UPDATE""",
            (message_id,),
        )
        if row is None:
            raise RepairRefused(f"message {message_id} does not exist")
        status, run_id, inbox_id = row
        if status != "in_doubt":
            raise RepairRefused(f"message {message_id} is '{status}', not in_doubt: nothing to resolve")
        if outcome == "resend":
            # A late answer of the interrupted send (or the webhook) left proof it went out: a
            # resend would reach the lead twice (R-PIPE-5), whatever the operator believes.
            proof = _all(
                """SELECT idx, provider_message_id, delivery_status FROM message_parts
                            WHERE message_id = %s AND status = 'in_doubt'
                              AND (provider_message_id IS NOT NULL OR delivery_status IS NOT NULL)
                            ORDER BY idx""",
                (message_id,),
            )
            if proof:
                found = ", ".join(
                    f"part #{idx + 1} has Evolution key {key or '?'}" + (f" (delivery: {delivery})" if delivery else "")
                    for idx, key, delivery in proof
                )
                raise RepairRefused(
                    f"message {message_id}: {found}: Evolution accepted it, so it is not resent; use --sent"
                )
        repair = Repair(
            message_id, True, status_from=status, status_to="sending", run_id=run_id, run_before=run_snapshot(run_id)
        )
        _one(
            """UPDATE campaign_messages SET status = 'sending', attempts = 0, error_class = NULL,
                    error_message = NULL, finished_at = NULL, status_changed_at = now(),
                    wake_at = now() + make_interval(secs => %s)
                WHERE id = %s AND status = 'in_doubt' RETURNING id""",
            (settings.handoff_grace_seconds, message_id),
        )
        new_part_status = "sent" if outcome == "sent" else "pending"
        repair.parts = [
            tuple(r)
            for r in _all(
                """
            WITH before AS (SELECT id, idx, status FROM message_parts WHERE message_id = %s),
            upd AS (UPDATE message_parts p SET status = %s, error_message = NULL,
                        sent_at = CASE WHEN %s = 'sent' THEN coalesce(p.sent_at, now()) ELSE p.sent_at END
                    FROM before b WHERE p.id = b.id AND b.status = 'in_doubt' RETURNING p.id, p.status)
            SELECT b.idx, b.status, coalesce(upd.status, b.status)
            FROM before b LEFT JOIN upd ON upd.id = b.id ORDER BY b.idx""",
                (message_id, new_part_status, new_part_status),
            )
        ]
        reopened = _uncount(run_id, "leads_in_doubt")
        unsent = sum(1 for _, _, after in repair.parts if after != "sent")
        if outcome == "sent" and unsent == 0:
            finished = finish_message(message_id, "sent", settings, from_statuses=("sending",))
            if finished is None:  # cannot happen under the row lock; never leave it half-done
                raise RepairRefused(f"message {message_id} could not be finished as sent")
            repair.status_to = "sent"
            if finished.lead_note:
                repair.notes.append(finished.lead_note)
        else:
            repair.notes += reopened
            repair.publish = (steps.SEND_PART.queue, (message_id, inbox_id))
            after = run_snapshot(run_id)
            if after["status"] == "paused":
                repair.notes.append(
                    f"run {run_id} is paused ({after['pause_reason']}): a message with no part "
                    "sent yet waits for the run's resume"
                )
        repair.run_after = run_snapshot(run_id)
        log_event(
            "operator",
            f"in-doubt message resolved: {outcome}",
            run_id=run_id,
            message_id=message_id,
            details={"outcome": outcome, "parts": repair.parts, "status": repair.status_to},
        )
    return repair
