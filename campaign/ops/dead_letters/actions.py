"""What is done to dead letters: requeue and purge (commit, then publish, then ack) and the in-doubt resolve."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sys
from collections.abc import Callable

from campaign import events, steps
from campaign.db import db
from campaign.enqueue import enqueue
from campaign.logs import TextSink
from campaign.ops import repairs
from campaign.ops.dead_letters.store import Item
from campaign.ops.dead_letters.xq import XqBrowser
from campaign.ops.repairs import REQUEUE_TARGETS, Repair
from campaign.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2

Publisher = Callable[[str, tuple], None]


class _DryRunRollback(Exception):
    """Raised at the end of a dry run to roll back everything it simulated."""


@dataclasses.dataclass
class Outcome:
    """What happened (or, in a dry run, would happen) to one dead letter."""

    item: Item
    action: str  # requeued | resolved | purged | stale | skipped | error
    text: str
    ok: bool
    repair: Repair | None = None


def _publish_via_broker(queue: str, args: tuple) -> None:
    """Publish the step's actor message by name through the engine's broker (publisher confirms on)."""
    import actors  # noqa: F401  (builds the engine's broker: confirms on, the steps' queues declared)

    enqueue(steps.BY_QUEUE[queue], args)


def _lock_row(row_id: int) -> str | None:
    found = db.execute_sql("SELECT status FROM dead_letters WHERE id = %s FOR UPDATE", (row_id,)).fetchone()
    return found[0] if found else None


def _mark(row_id: int, status: str, note: str) -> None:
    db.execute_sql(
        "UPDATE dead_letters SET status = %s, resolved_at = now(), note = %s WHERE id = %s AND status = 'dead'",
        (status, note[:2000], row_id),
    )


def describe_repair(r: Repair) -> str:
    """One line: status from -> to, parts, counters, run changes, what gets published."""
    bits = [f"message {r.message_id}: {r.status_from} -> {r.status_to}"]
    if r.parts:
        bits.append("parts " + ", ".join(f"#{i + 1} {a}" + (f"->{b}" if b != a else " (kept)") for i, a, b in r.parts))
    if r.run_before and r.run_after:
        changes = [
            f"{k.removeprefix('leads_')} {r.run_before[k]}->{r.run_after[k]}"
            for k in repairs.RUN_SNAPSHOT_FIELDS
            if k.startswith("leads_") and r.run_before[k] != r.run_after[k]
        ]
        if r.run_before["status"] != r.run_after["status"]:
            changes.append(f"status {r.run_before['status']}->{r.run_after['status']}")
        bits.append(f"run {r.run_id}: " + (", ".join(changes) or "unchanged"))
    bits += r.notes
    if r.publish:
        queue, args = r.publish
        bits.append(f"publish {REQUEUE_ACTOR_OF[queue]}({', '.join(map(str, args))}) to {queue}")
    return "; ".join(bits)


REQUEUE_ACTOR_OF = {queue: actor for actor, (_, queue) in REQUEUE_TARGETS.items()}


def _stale(item: Item) -> Outcome:
    row = item.row
    assert row is not None
    when = f" at {row.resolved_at:%Y-%m-%d %H:%M:%S}" if row.resolved_at else ""
    if item.xq:
        return Outcome(item, "stale", f"already {row.status}{when}: stale XQ copy removed, nothing published", True)
    return Outcome(item, "stale", f"already {row.status}{when}: nothing to do", True)


def _requeue_one(item: Item, settings: Settings, dry_run: bool) -> Outcome:
    """The transactional part of one requeue (publish and ack come after, in ``requeue``)."""
    if item.row is None:
        return Outcome(item, "skipped", f"not requeued: {item.problem}; `--purge --id {item.key}` drops it", False)
    if item.row.status != "dead":
        return _stale(item)
    with db.atomic():
        current = _lock_row(item.row.id)
        if current != "dead":  # another operator got there first
            item.row.status = current or "deleted"
            return _stale(item)
        mid = item.row.campaign_message_id
        if item.row.actor == steps.TRIAGE_REPLY.actor:
            # E-37: the keyword rules settled the reply when its triage died; nothing to replay
            repair = Repair(0, False, note="a reply triage: the keyword rules decided it when it died")
        elif mid is None:
            repair = Repair(0, False, note="its campaign message no longer exists (its run was deleted)")
        else:
            repair = repairs.requeue_dead_step(mid, item.row.actor, settings)
        if repair.changed:
            text = describe_repair(repair)
            _mark(item.row.id, "requeued", text)
            action = "requeued"
        else:
            text = (f"message {mid}: " if mid else "") + f"{repair.note}; nothing published"
            _mark(item.row.id, "resolved", text)
            action = "resolved"
        if not dry_run and repair.run_id is not None:  # the message and its run exist: an audit line
            events.log_event(
                "dead_letters",
                f"dead letter {item.row.id} {action}: {text}",
                run_id=repair.run_id,
                message_id=mid,
                details={"dead_letter": item.row.id, "dramatiq_id": item.key},
            )
    return Outcome(item, action, text, True, repair)


def _purge_one(item: Item) -> Outcome:
    if item.row is not None and item.row.status != "dead":
        return _stale(item)
    with db.atomic():
        if item.row is not None:
            if _lock_row(item.row.id) != "dead":
                return _stale(item)
            text = f"purged: message {item.campaign_message_id} stays {item.message_status or 'as it is'}"
            _mark(item.row.id, "purged", text)
        else:
            # keep a record of what was thrown away: a dead letter never vanishes silently
            x = item.xq[0]
            try:
                payload = json.loads(x.body.decode("utf-8"))
                if "\\u0000" in json.dumps(payload):
                    raise ValueError("NUL")  # jsonb cannot hold \u0000
            except (UnicodeDecodeError, ValueError):
                # the exact bytes, plus something a person can read
                payload = {
                    "raw_base64": base64.b64encode(x.body[:100_000]).decode("ascii"),
                    "preview": x.body[:500].decode("utf-8", "replace").replace("\x00", "\\0"),
                }
            text = f"purged from {x.queue}.XQ ({item.problem}); recorded here"
            db.execute_sql(
                """INSERT INTO dead_letters (queue, actor, dramatiq_message_id, campaign_message_id,
                                  payload, error_class, error_message, status, resolved_at, note)
                              VALUES (%s, %s, %s, (SELECT id FROM campaign_messages WHERE id = %s), %s, %s, %s,
                                      'purged', now(), %s)
                              ON CONFLICT (dramatiq_message_id) DO NOTHING""",
                (
                    x.queue,
                    x.actor or "(unknown)",
                    item.key,
                    item.campaign_message_id,
                    json.dumps(payload, default=str),
                    "unrecorded",
                    item.error[:2000],
                    text,
                ),
            )
    if item.xq:
        text += f"; {len(item.xq)} XQ cop{'y' if len(item.xq) == 1 else 'ies'} removed"
    return Outcome(item, "purged", text, True)


def _act(
    items: list[Item],
    settings: Settings,
    browser: XqBrowser | None,
    dry_run: bool,
    one: Callable[[Item], Outcome],
    publish: Publisher | None,
) -> list[Outcome]:
    if dry_run:
        outcomes: list[Outcome] = []
        # Everything runs for real inside one transaction that is rolled back: the dry run
        # shows exactly what the real run does, counters of several letters of one run included.
        # The simulation's own INFO log lines would read as if it happened: muted meanwhile.
        previous = logging.root.manager.disable
        logging.disable(logging.INFO)
        try:
            with db.atomic():
                for item in items:
                    try:
                        with db.atomic():
                            outcomes.append(one(item))
                    except Exception as exc:
                        outcomes.append(Outcome(item, "error", f"{type(exc).__name__}: {exc}", False))
                raise _DryRunRollback
        except _DryRunRollback:
            pass
        finally:
            logging.disable(previous)
        return outcomes
    outcomes = []
    for item in items:
        try:
            outcome = one(item)
        except Exception as exc:
            log.exception("dead letter %s: %s", item.label, exc)
            outcomes.append(Outcome(item, "error", f"nothing changed: {type(exc).__name__}: {exc}", False))
            continue
        if outcome.repair is not None and outcome.repair.publish is not None:
            queue, args = outcome.repair.publish
            try:
                (publish or _publish_via_broker)(queue, args)
            except Exception as exc:
                log.error(
                    "dead letter %s: message %s committed but publishing to %s failed: %s",
                    item.label,
                    outcome.repair.message_id,
                    queue,
                    exc,
                )
                outcome.ok = False
                outcome.action = "error"
                outcome.text += (
                    f"; PUBLISH FAILED ({type(exc).__name__}: {exc}): the recovery sweep re-enqueues "
                    f"message {outcome.repair.message_id} within LEASE_SECONDS "
                    f"({settings.lease_seconds} s); the XQ copy is kept"
                )
                outcomes.append(outcome)
                continue
        if outcome.ok and outcome.action != "skipped" and browser is not None:
            try:
                for copy in item.xq:
                    browser.ack(copy)
            except Exception as exc:
                outcome.text += f"; XQ copy not removed ({type(exc).__name__}); the next run removes it"
        log.info("dead letter %s %s: %s", item.label, outcome.action, outcome.text)
        outcomes.append(outcome)
    return outcomes


def requeue(
    items: list[Item],
    settings: Settings,
    browser: XqBrowser | None,
    *,
    dry_run: bool = False,
    publish: Publisher | None = None,
) -> list[Outcome]:
    """Requeue each item (see the module docstring for the order of commit, publish, ack)."""
    return _act(items, settings, browser, dry_run, lambda i: _requeue_one(i, settings, dry_run), publish)


def purge(items: list[Item], settings: Settings, browser: XqBrowser | None, *, dry_run: bool = False) -> list[Outcome]:
    """Drop each item's XQ copies and mark its row purged (the campaign message is not touched)."""
    return _act(items, settings, browser, dry_run, _purge_one, None)


# --------------------------------------------------------------------------------------------
# in-doubt resolution (R-FAIL-4): `python cli.py resolve MESSAGE --sent | --resend`


def resolve(
    message_id: int, outcome: str, settings: Settings, *, out: TextSink | None = None, publish: Publisher | None = None
) -> int:
    """Settle one in_doubt message (repairs.resolve_in_doubt), then publish its next send if any.

    Raises RepairRefused (exit 2 in the CLI) when the message is not in_doubt.
    """
    out = out or sys.stdout
    with db.connection_context():
        repair = repairs.resolve_in_doubt(message_id, outcome, settings)
    out.write(f"resolved ({outcome}): {describe_repair(repair)}\n")
    log.info(
        "message %s resolved %s run=%s: %s -> %s",
        message_id,
        outcome,
        repair.run_id,
        repair.status_from,
        repair.status_to,
    )
    if repair.publish is None:
        return EXIT_OK
    queue, args = repair.publish
    try:
        (publish or _publish_via_broker)(queue, args)
    except Exception as exc:
        log.error("message %s resolved but publishing to %s failed: %s", message_id, queue, exc)
        print(
            f"error: message {message_id} is back to 'sending' but publishing to {queue} failed "
            f"({type(exc).__name__}: {exc}); the recovery sweep re-enqueues it within LEASE_SECONDS "
            f"({settings.lease_seconds} s)",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK
