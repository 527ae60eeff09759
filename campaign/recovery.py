"""Nothing stays stuck (R-FAIL-8) and inboxes are watched (R-FAIL-6): the scheduler's recovery
sweep and inbox health check."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from campaign import enqueue, ratelimit, runs, steps
from campaign.errors import ProviderError
from campaign.inbound.notify import due_confirmations
from campaign.inbound.triage import due_triage, give_up_stale
from campaign.inboxes import resume_reconnected, store_state, wake_parked
from campaign.outcomes import mark_in_doubt
from campaign.settings import Settings
from campaign.sql import fetch_all as _all

log = logging.getLogger(__name__)


def recovery_sweep(settings: Settings, *, publish: Callable[[str, list[tuple]], None] | None = None) -> dict:
    """Nothing stays stuck (R-FAIL-8): re-enqueue in-flight messages past their hand-off deadline,
    wake parked ones that are due, settle orphaned sends.

    Every step hand-off sets ``wake_at`` (when the next step must have started: its delay plus
    HANDOFF_GRACE_SECONDS); a lost publish is re-published seconds after that, not after a
    ten-minute lease. A re-published message gets the full lease before the next copy, so a
    backlog in RabbitMQ is copied at most once. Safe because every step is idempotent (R-PIPE-5).
    """
    lease = settings.lease_seconds
    # A part left `sending` past the send lease had its worker die mid-call: outcome unknown.
    # One that kept Evolution's key.id was accepted: its send step is re-published below to record it.
    orphans = _all(
        """SELECT p.id, p.message_id, p.attempt_id FROM message_parts p
                      WHERE p.status = 'sending' AND p.sending_at < now() - make_interval(secs => %s)
                        AND p.provider_message_id IS NULL""",
        (settings.send_lease_seconds + 5,),
    )
    for part_id, message_id, attempt_id in orphans:
        mark_in_doubt(message_id, part_id, "send interrupted (worker lost mid-call)", settings, attempt=attempt_id)
    stale = _all(
        """UPDATE campaign_messages m SET wake_at = now() + make_interval(secs => %(lease)s)
                    WHERE m.status IN ('queued', 'generating', 'splitting', 'sending')
                      AND (m.wake_at < now()
                           OR (m.wake_at IS NULL AND m.status_changed_at < now() - make_interval(secs => %(lease)s)))
                      AND NOT EXISTS (SELECT 1 FROM message_parts p WHERE p.message_id = m.id AND p.status = 'sending'
                                      AND p.provider_message_id IS NULL)
                    RETURNING m.id, m.status, m.inbox_id""",
        {"lease": lease},
    )
    jobs: dict[str, list[tuple]] = {step.queue: [] for step in steps.STEPS}
    for message_id, status, inbox_id in stale:
        step = steps.for_status(status)
        jobs[step.queue].append(step.args(message_id, inbox_id))
    for queue, args in jobs.items():
        if args:
            (publish or _publish)(queue, args)
    confirmations = due_confirmations(settings)
    if confirmations:
        (publish or _publish)(steps.OPT_OUT_REPLY.queue, [(lead_id,) for lead_id in confirmations])
    # R-IN-5 / E-37: replies whose triage publish was lost (or never made) go out again; one
    # pending for too long is settled by the keyword rules
    triage_stale = give_up_stale(settings)
    triage_due = due_triage(settings)
    if triage_due:
        (publish or _publish)(steps.TRIAGE_REPLY.queue, [(triage_id,) for triage_id in triage_due])
    completed = runs.complete_runs_if_done()
    ratelimit.purge_expired_holds()
    result = {
        "in_doubt": len(orphans),
        "requeued": len(stale),
        "completed_runs": len(completed),
        "opt_out_replies": len(confirmations),
        "triage_requeued": len(triage_due),
        "triage_given_up": len(triage_stale),
    }
    if orphans or stale or completed:
        log.warning("recovery sweep: %s", result)
    return result


def _publish(queue: str, args_list: list[tuple]) -> None:
    target = steps.BY_QUEUE.get(queue) or next(j for j in steps.JOBS if j.queue == queue)
    enqueue.enqueue_many(target, args_list)


def check_inboxes(settings: Settings, evolution: Any) -> dict:
    """Probe ``connectionState`` of every inbox with work (informative, R-FAIL-6); resume runs that
    were paused ``inbox_disconnected`` once their inbox is open again (E-07)."""
    inboxes = _all("""SELECT DISTINCT i.id, i.instance_name FROM inboxes i
                      JOIN campaign_config_inboxes p ON p.inbox_id = i.id
                      JOIN campaign_runs r ON r.config_id = p.config_id AND r.status IN ('running', 'paused')""")
    states: dict[int, str] = {}
    resumed: list[int] = []
    for inbox_id, instance in inboxes:
        try:
            state = evolution.connection_state(instance)
        except ProviderError as exc:
            log.warning("inbox %s (%s): connectionState failed: %s", inbox_id, instance, exc.code)
            continue
        store_state(inbox_id, state)
        states[inbox_id] = state
        if state == "open":
            resumed.extend(resume_reconnected(inbox_id, wake=False))
        else:
            log.warning("inbox %s (%s) is %s", inbox_id, instance, state)
    wake_parked([inbox_id for inbox_id, state in states.items() if state == "open"])
    return {"states": states, "resumed": resumed}
