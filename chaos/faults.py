"""The seeded fault plan and the thread that carries it out while the campaign runs.

Faults fire at seeded points of PROGRESS (the fraction of messages already terminal), not of
wall-clock time: the same seed then hits the same phase of the run on a fast or a loaded machine.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.services import Services, Supervisor
from devtools.services import Proc

log = logging.getLogger(__name__)

KILL_MID_SEND = "kill_mid_send"
KILL = "kill"
RABBIT_RESTART = "rabbit_restart"
PG_TERMINATE = "pg_terminate"
#: T-REL-2: the gateway answers 5xx to every send for ``outage_s`` seconds
GATEWAY_OUTAGE = "gateway_outage"
#: T-REL-2 / E-24: one inbox disconnected for ``outage_s`` seconds, while messages are mid-parts
DISCONNECT = "disconnect"
KINDS = (KILL_MID_SEND, KILL, RABBIT_RESTART, PG_TERMINATE, GATEWAY_OUTAGE, DISCONNECT)


@dataclass(frozen=True)
class FaultSpec:
    """One planned fault: what, at which progress fraction, and its seeded parameters."""

    kind: str
    at_progress: float
    outage_s: float = 0.0  # RabbitMQ: seconds between stop_app and start_app; gateway/disconnect: duration
    victim: int = 0  # KILL: index of the worker group (modulo their number)


@dataclass
class FaultEvent:
    """What the injector did (times are epoch seconds, comparable with the sandbox ledger and now())."""

    kind: str
    planned_progress: float
    t: float
    t_end: float
    progress: float
    details: dict = field(default_factory=dict)


def plan_faults(
    rng: random.Random,
    counts: dict[str, int],
    *,
    lo: float,
    hi: float,
    min_spacing: float,
    durations: dict[str, float] | None = None,
) -> list[FaultSpec]:
    """Seeded progress points in [lo, hi], at least ``min_spacing`` apart, one per fault, shuffled kinds."""
    kinds = [k for k in KINDS for _ in range(counts.get(k, 0))]
    n = len(kinds)
    if n == 0:
        return []
    if (n - 1) * min_spacing > hi - lo:
        raise ValueError(f"{n} faults cannot be {min_spacing} apart within [{lo}, {hi}]")
    # n points spaced >= min_spacing: draw in the shrunken interval, sort, then spread them out
    slack = (hi - lo) - (n - 1) * min_spacing
    points = sorted(rng.uniform(0, slack) for _ in range(n))
    points = [lo + p + i * min_spacing for i, p in enumerate(points)]
    rng.shuffle(kinds)
    durations = durations or {}

    def outage(kind: str) -> float:
        if kind == RABBIT_RESTART:
            return round(rng.uniform(1.0, 3.0), 1)
        return float(durations.get(kind, 0.0))

    return [
        FaultSpec(kind, round(at, 3), outage_s=outage(kind), victim=rng.randrange(1000))
        for kind, at in zip(kinds, points)
    ]


class Injector(threading.Thread):
    """Waits for each fault's progress point, then injects it; records a FaultEvent per fault."""

    def __init__(
        self,
        plan: list[FaultSpec],
        *,
        services: Services,
        supervisor: Supervisor,
        workers: list[Proc],
        progress: Callable[[], float],
        sending_parts: Callable[[], list[tuple[int, float]]],
        sandbox: Any = None,
        instances: list[str] | None = None,
        mid_parts_instance: Callable[[], str | None] | None = None,
        mid_send_timeout: float = 30.0,
    ) -> None:
        super().__init__(name="chaos-injector", daemon=True)
        self.plan = plan
        self.services = services
        self.supervisor = supervisor
        self.workers = workers
        self.progress = progress
        self.sending_parts = sending_parts
        self.mid_send_timeout = mid_send_timeout
        self.sandbox = sandbox
        self.instances = instances or []
        self.mid_parts_instance = mid_parts_instance
        self.events: list[FaultEvent] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        """Abandon the faults not yet injected."""
        self._halt.set()

    @property
    def done(self) -> bool:
        """Every planned fault was injected (or the injector gave up)."""
        return not self.is_alive()

    def run(self) -> None:
        try:
            for spec in self.plan:
                while not self._halt.is_set():
                    p = self.progress()
                    if p >= spec.at_progress:
                        break
                    self._halt.wait(0.1)
                if self._halt.is_set():
                    return
                self.events.append(self._inject(spec))
        except BaseException as exc:  # reported by the main thread as a failed run
            log.exception("fault injector failed")
            self.error = exc

    def _inject(self, spec: FaultSpec) -> FaultEvent:
        p = self.progress()
        if spec.kind == RABBIT_RESTART:
            moments = self.services.restart_rabbitmq(spec.outage_s)
            return FaultEvent(
                spec.kind,
                spec.at_progress,
                moments["t"],
                moments["started"],
                p,
                {"down_s": round(moments["started"] - moments["stopped"], 1)},
            )
        if spec.kind == PG_TERMINATE:
            t = time.time()
            n = self.services.terminate_worker_backends()
            log.warning("pg_terminate_backend: %s worker connection(s) terminated", n)
            return FaultEvent(spec.kind, spec.at_progress, t, time.time(), p, {"terminated": n})
        if spec.kind == KILL_MID_SEND:
            return self._kill_mid_send(spec, p)
        if spec.kind == GATEWAY_OUTAGE:
            # every send refused 503 (no Retry-After: a plain outage), the other faults' rates kept
            t = time.time()
            self.sandbox.set_faults(send={"always_status": 500})
            self._halt.wait(spec.outage_s)
            self.sandbox.set_faults(send={"always_status": None})
            log.warning("gateway outage: every send answered 500 for %.1fs", time.time() - t)
            return FaultEvent(spec.kind, spec.at_progress, t, time.time(), p, {"down_s": round(time.time() - t, 1)})
        if spec.kind == DISCONNECT:
            # the inbox of a message that has sent part 1 and not its last part, when there is one (E-24)
            instance = (self.mid_parts_instance() if self.mid_parts_instance else None) or self.instances[
                spec.victim % len(self.instances)
            ]
            t = time.time()
            self.sandbox.set_faults(disconnected_instances=[instance])
            self._halt.wait(spec.outage_s)
            self.sandbox.set_faults(disconnected_instances=[])
            log.warning("inbox %s disconnected for %.1fs", instance, time.time() - t)
            return FaultEvent(
                spec.kind,
                spec.at_progress,
                t,
                time.time(),
                p,
                {"instance": instance, "down_s": round(time.time() - t, 1)},
            )
        victim = self.workers[spec.victim % len(self.workers)]
        t = time.time()
        self.supervisor.kill9(victim)
        return FaultEvent(spec.kind, spec.at_progress, t, time.time(), p, {"worker": victim.name})

    def _kill_mid_send(self, spec: FaultSpec, p: float) -> FaultEvent:
        """Kill the worker group whose connection just claimed a part ``sending`` (it is in the HTTP call)."""
        deadline = time.monotonic() + self.mid_send_timeout
        owners: dict[int, Proc] = {}
        owners_at = 0.0
        while time.monotonic() < deadline and not self._halt.is_set():
            if time.monotonic() - owners_at > 1.0:
                # pid -> group, refreshed now and then: a send lasts tens of ms, so the kill must
                # follow the detection at once, not after a pgrep
                owners = {pid: proc for proc in self.workers for pid in proc.pids()}
                owners_at = time.monotonic()
            pids = self.services.mid_send_worker_pids()
            victims = [owners[pid] for pid in pids if pid in owners and owners[pid].alive]
            if victims:
                proc = victims[0]
                t = time.time()
                self.supervisor.kill9(proc)
                # the victim's parts stay `sending` (nobody will record their outcome); the
                # survivors' sends end within tens of ms
                time.sleep(1.5)
                stuck = sorted(pid for pid, at in self.sending_parts() if at < t)
                log.warning("killed %s mid-send; parts left 'sending': %s", proc.name, stuck)
                return FaultEvent(
                    spec.kind,
                    spec.at_progress,
                    t,
                    t,
                    p,
                    {"worker": proc.name, "parts_sending": stuck, "targeted": True},
                )
            time.sleep(0.01)
        # nothing observed mid-send in time: still kill one while parts are sending, say so
        victim = self.workers[spec.victim % len(self.workers)]
        t = time.time()
        self.supervisor.kill9(victim)
        return FaultEvent(
            spec.kind, spec.at_progress, t, t, p, {"worker": victim.name, "parts_sending": [], "targeted": False}
        )
