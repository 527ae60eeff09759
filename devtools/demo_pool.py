"""The demo's sender pool and its failover (SPEC R-POOL-3, R-POOL-4, E-33), called by devtools/demo.py.

The demo's second campaign (``comeback``) sends through a pool of two numbers, ``sales-2`` and
``sales-3`` (``examples/demo.toml``). Once ``sales-3`` has sent a few messages, this scenario
disconnects it through the sandbox's control API, as a phone losing its session would: the sandbox
answers its sends "Connection Closed" and says ``close``, and posts the ``connection.update`` the
engine listens to. The run goes on through ``sales-2`` (it never pauses: a member can still send);
after ``POOL_FAILOVER_SECONDS`` (1.5 s on the demo's clock) the scheduler's failover job hands
``sales-3``'s not-started messages to ``sales-2``, re-planned at ``sales-2``'s own pace. Then
``sales-3`` comes back (the sandbox says ``open`` again) and takes work again from the next plan.
The summary prints what the rows say: moved per failover, per member assigned / sent / moved away.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("demo")

__all__ = ["POOL_CAMPAIGN", "DOWN_INSTANCE", "ENGINE_TUNING", "JOB_SECONDS", "PoolFailover"]

POOL_CAMPAIGN = "comeback"  # the demo campaign with a pool of two numbers
DOWN_INSTANCE = "demo-sales-3"  # the member the demo disconnects mid-run
SENT_BEFORE_DOWN = 3  # messages sales-3 sends before it drops
#: engine settings on the demo's clock: a member down 1.5 s hands over (the default is 120 s)
ENGINE_TUNING = {"POOL_FAILOVER_SECONDS": "1.5"}
#: the scheduler's failover job at demo speed (seconds)
JOB_SECONDS = {"pool_failover": 0.5}


class PoolFailover:
    """Drives the failover scene in a thread: disconnect, wait for the failover row, reconnect."""

    def __init__(self, sb: Any, run_ids: list[int]) -> None:
        self.sb = sb
        self.run_ids = run_ids
        self.run_id: int | None = None
        self.down = False
        self.back = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, console: Any) -> None:
        """Find the pooled run and start watching it."""
        from campaign.db import db

        with db.connection_context():
            row = db.execute_sql(
                """SELECT r.id FROM campaign_runs r JOIN campaign_configs c ON c.id = r.config_id
                    WHERE r.id = ANY(%s) AND c.name = %s""",
                (self.run_ids, POOL_CAMPAIGN),
            ).fetchone()
        if row is None:
            return
        self.run_id = int(row[0])
        self._thread = threading.Thread(target=self._script, name="demo-pool", daemon=True)
        self._thread.start()
        console.print(
            f"      sender pool: run {self.run_id} {POOL_CAMPAIGN} sends through sales-2 and sales-3; "
            f"sales-3 will drop after {SENT_BEFORE_DOWN} sends (POOL_FAILOVER_SECONDS="
            f"{ENGINE_TUNING['POOL_FAILOVER_SECONDS']})",
            markup=False,
        )

    def _set(self, state: str) -> None:
        self.sb._control("POST", "/__sandbox/connection", json={"instance": DOWN_INSTANCE, "state": state})

    def _script(self) -> None:
        from campaign.db import db

        while not self._stop.wait(0.1) and not self.back:
            try:
                with db.connection_context():
                    if not self.down:
                        sent = db.execute_sql(
                            """SELECT count(*) FROM campaign_messages m JOIN inboxes i ON i.id = m.inbox_id
                                WHERE m.run_id = %s AND i.instance_name = %s AND m.status = 'sent'""",
                            (self.run_id, DOWN_INSTANCE),
                        ).fetchone()[0]
                        if sent >= SENT_BEFORE_DOWN:
                            self._set("close")
                            self.down = True
                        continue
                    moved = db.execute_sql(
                        "SELECT count(*) FROM campaign_events WHERE run_id = %s AND step = 'failover'", (self.run_id,)
                    ).fetchone()[0]
                    status = db.execute_sql("SELECT status FROM campaign_runs WHERE id = %s", (self.run_id,)).fetchone()
                if moved or (status and status[0] != "running"):
                    self._stop.wait(1.0)
                    self._set("open")  # back: it takes work again (its parked messages, the next plan)
                    self.back = True
            except Exception:  # the demo goes on; the summary says what did not happen
                log.warning("demo pool: could not drive the failover scene", exc_info=True)

    def stop(self) -> None:
        """Stop the scene; a number still down is put back (the sandbox is shared with the next run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.down and not self.back:
            try:
                self._set("open")
            except Exception:
                log.warning("demo pool: could not reconnect %s", DOWN_INSTANCE, exc_info=True)

    def summary(self, console: Any) -> dict[str, Any]:
        """Print and return what the rows say about the pool (R-POOL-4)."""
        from campaign import failover
        from campaign.db import db
        from campaign.ops import monitor

        if self.run_id is None:
            return {}
        with db.connection_context():
            events = failover.failover_events(self.run_id)
            members = monitor.pool_members([self.run_id])
            paused = db.execute_sql(
                "SELECT count(*) FROM campaign_events WHERE run_id = %s AND text LIKE 'run paused%%'", (self.run_id,)
            ).fetchone()[0]
        moved = sum(n for _, _, n, _ in events)
        console.print(
            f"  sender pool (E-33): {DOWN_INSTANCE} disconnected mid-run "
            f"({'yes' if self.down else 'NO'}); {moved} not-started message(s) moved to the other number "
            f"in {len(events)} failover(s); the run paused {paused} time(s); back again: "
            f"{'yes' if self.back else 'no'}",
            markup=False,
        )
        for m in members:
            console.print(
                f"    {m.inbox:<14} assigned {m.assigned:>3}  sent {m.sent:>3}  failed {m.failed}  "
                f"moved away {m.moved_away:>3}  {m.state}",
                markup=False,
            )
        return {
            "run_id": self.run_id,
            "down": self.down,
            "back": self.back,
            "moved": moved,
            "failovers": len(events),
            "paused": paused,
            "members": {m.inbox: [m.assigned, m.sent, m.failed, m.moved_away] for m in members},
        }
