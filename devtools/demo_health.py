"""The demo's number-health scene (SPEC R-HEALTH-2, E-35): one number gets throttled, its campaign goes on.

The sandbox answers a share of the sends of ``demo-sales-2`` (campaign ``comeback``) with a delivery
``ERROR`` receipt (fault ``delivery_errors``), published like every receipt (webhook + RabbitMQ).
The engine counts them in a sliding hour: past ``HEALTH_THROTTLE_ERRORS`` (lowered for the demo's
few dozen sends) and 5 % of the hour's sends the inbox becomes ``throttled`` — caps halved, minimum
gap doubled — and the campaign keeps sending, slower. ``HEALTH_RESTRICT_ERRORS`` is raised out of
reach so the demo's run completes (a ``restricted`` number would stop and pause its run: E-35's test).
"""

from __future__ import annotations

from typing import Any

__all__ = ["INSTANCE", "ERROR_RATE", "FAULTS", "ENGINE_TUNING", "show"]

INSTANCE = "demo-sales-2"  # examples/demo.toml: inbox sales-2, campaign comeback
ERROR_RATE = 0.35
#: merged into the demo's sandbox faults
FAULTS: dict[str, Any] = {"delivery_errors": {INSTANCE: ERROR_RATE}}
#: merged into the demo's engine settings (each an ordinary environment setting)
ENGINE_TUNING = {"HEALTH_THROTTLE_ERRORS": "3", "HEALTH_RESTRICT_ERRORS": "40"}


def show(console: Any, run_ids: list[int]) -> dict[str, Any]:
    """Print what happened to the erring number's health and to its campaign; return it."""
    from campaign.db import db

    with db.connection_context():
        row = db.execute_sql(
            """SELECT i.id, w.name || '/' || i.name, i.health_state, i.health_reason,
                      (SELECT count(*) FROM message_parts p
                        WHERE p.inbox_id = i.id AND p.delivery_error_at IS NOT NULL),
                      (SELECT count(*) FROM message_parts p WHERE p.inbox_id = i.id AND p.status = 'sent')
                 FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id WHERE i.instance_name = %s""",
            (INSTANCE,),
        ).fetchone()
        if row is None:
            console.print(f"  number health: no inbox with instance {INSTANCE}", markup=False)
            return {}
        inbox_id, label, state, reason, errors, sent = row
        changes = [
            f"{d['from']} -> {d['to']}"
            for (d,) in db.execute_sql(
                "SELECT details FROM campaign_events WHERE step = 'health' AND (details->>'inbox_id')::bigint = %s "
                "ORDER BY id",
                (inbox_id,),
            ).fetchall()
        ]
        run = db.execute_sql(
            """SELECT r.id, r.status, r.leads_sent, r.leads_total FROM campaign_runs r
                 JOIN campaign_config_inboxes p ON p.config_id = r.config_id
                WHERE p.inbox_id = %s AND r.id = ANY(%s) ORDER BY r.id LIMIT 1""",
            (inbox_id, run_ids),
        ).fetchone()
    went = ", ".join(changes) if changes else "no change"
    console.print(
        f"  number health   {label}: {errors} delivery ERROR(s) of {sent} part(s) sent "
        f"(sandbox error rate {ERROR_RATE:.0%}) -> {went}; now {state}" + (f" ({reason})" if reason else ""),
        markup=False,
    )
    if run is not None:
        console.print(
            f"                  its campaign went on while throttled (caps halved, gap doubled): run {run[0]} "
            f"{run[1]}, {run[2]} of {run[3]} sent (R-HEALTH-2)",
            markup=False,
        )
    return {
        "inbox": label,
        "state": state,
        "errors": int(errors),
        "sent": int(sent),
        "changes": changes,
        "run_status": run[1] if run else None,
    }
