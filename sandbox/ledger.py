"""The sandbox ledger: every request, accepted send, scripted inbound message and connection change,
what was published to which event sink, plus Retry-After discipline.

One sequence numbers all the lists, so ``entries_since(seq)`` pages through a 20k-entry ledger cheaply.
Summary counters are kept incrementally: reading the summary never walks the entries.
A reset starts a new epoch: requests that arrived before it (a slow answer still sleeping) are not
recorded after it, so a reset ledger only ever shows what began after the reset.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Hashable
from typing import Any

__all__ = ["Ledger"]


class Ledger:
    """Thread-safe record of what the sandbox answered and accepted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.epoch = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        with self._lock:
            self.epoch += 1
            self._seq = 0
            self._requests: list[dict[str, Any]] = []
            self._sends: list[dict[str, Any]] = []
            self._by_route: dict[str, Counter[str]] = defaultdict(Counter)
            self._faults: Counter[str] = Counter()
            self._send_counts: Counter[tuple[str, str, str]] = Counter()
            self._duplicate_sends = 0
            self._duplicate_keys: set[tuple[str, str, str]] = set()
            self._unseen_sends = 0
            self._not_before: dict[Hashable, float] = {}
            self._attempts: Counter[Hashable] = Counter()
            self._early = 0
            self._early_by_route: Counter[str] = Counter()
            self._number_sends: Counter[tuple[str, str]] = Counter()
            self._inbound: list[dict[str, Any]] = []
            self._inbound_origins: Counter[str] = Counter()
            self._connections: list[dict[str, Any]] = []
            self._dispatched: Counter[str] = Counter()
            self._sinks: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
            self._started = time.time()

    # -- Retry-After discipline -------------------------------------------------------------------

    def arrive(self, route: str, identity: Hashable, tolerance_s: float) -> tuple[int, bool]:
        """Register an incoming request: (attempt number for this identity, whether it came too early)."""
        now = time.time()
        with self._lock:
            attempt = self._attempts[identity]
            self._attempts[identity] = attempt + 1
            not_before = self._not_before.get(identity)
            early = not_before is not None and now + tolerance_s < not_before
            if early:
                self._early += 1
                self._early_by_route[route] += 1
        return attempt, early

    def hold(self, identity: Hashable, not_before: float, epoch: int | None = None) -> None:
        """Remember that this request identity was told to wait until ``not_before`` (epoch seconds)."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return
            if not_before > self._not_before.get(identity, 0.0):
                self._not_before[identity] = not_before

    # -- recording --------------------------------------------------------------------------------

    def record_request(self, entry: dict[str, Any], epoch: int | None = None) -> int | None:
        """Append a request entry (route, status, fault, ...) that arrived in ``epoch``; returns its seq."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return None
            self._seq += 1
            entry["seq"] = self._seq
            entry.setdefault("t", time.time())
            self._requests.append(entry)
            self._by_route[entry["route"]][str(entry.get("fault") or entry.get("status"))] += 1
            if entry.get("fault"):
                self._faults[entry["fault"]] += 1
            return self._seq

    def record_send(
        self, instance: str, number: str, text: str, key_id: str, outcome: str, epoch: int | None = None
    ) -> dict[str, Any] | None:
        """Append an accepted send (outcome "ok", "hang" or "close"); returns the entry to update later.

        ``part`` in the entry is how many sends this instance accepted for this number so far, this one
        included (what automatic replies count).
        """
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return None
            self._seq += 1
            entry = {
                "seq": self._seq,
                "t": time.time(),
                "instance": instance,
                "number": number,
                "text": text,
                "key_id": key_id,
                "outcome": outcome,
                "seen": False,
            }
            self._number_sends[(instance, number)] += 1
            entry["part"] = self._number_sends[(instance, number)]
            self._sends.append(entry)
            self._unseen_sends += 1
            ident = (instance, number, text)
            self._send_counts[ident] += 1
            if self._send_counts[ident] > 1:
                self._duplicate_sends += 1
                self._duplicate_keys.add(ident)
            return entry

    def mark_seen(
        self, entry: dict[str, Any] | None, seen: bool, outcome: str | None = None, epoch: int | None = None
    ) -> None:
        """Record whether the client got the answer of an accepted send (recorded in ``epoch``)."""
        with self._lock:
            if entry is None or (epoch is not None and epoch != self.epoch):
                return
            if seen and not entry["seen"]:
                self._unseen_sends -= 1
            entry["seen"] = seen
            if outcome:
                entry["outcome"] = outcome

    def record_inbound(self, entry: dict[str, Any], epoch: int | None = None) -> int | None:
        """Append a scripted inbound message as it is published; adds seq, t and ``sends_to_number``."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return None
            self._seq += 1
            entry.update(
                seq=self._seq, t=time.time(), sends_to_number=self._number_sends[(entry["instance"], entry["number"])]
            )
            self._inbound.append(entry)
            self._inbound_origins[entry["origin"]] += 1
            return self._seq

    def record_connection(self, instance: str, state: str, status_reason: int, origin: str) -> int:
        """Append an instance's connection change (state "open", "close" or "connecting")."""
        with self._lock:
            self._seq += 1
            self._connections.append(
                {
                    "seq": self._seq,
                    "t": time.time(),
                    "instance": instance,
                    "state": state,
                    "status_reason": status_reason,
                    "origin": origin,
                }
            )
            return self._seq

    def dispatched(self, event: str) -> None:
        """Count an event the bus published (whichever sinks took it)."""
        with self._lock:
            self._dispatched[event] += 1

    def event_outcome(self, sink: str, event: str, outcome: str) -> None:
        """Count a sink's outcome for one event ("sent", "failed", "dropped", "retried")."""
        with self._lock:
            self._sinks[sink][event][outcome] += 1

    def sends_to(self, instance: str, number: str) -> int:
        """Accepted sends of this instance to this number since the last reset."""
        with self._lock:
            return self._number_sends[(instance, number)]

    # -- reading ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counters only (cheap)."""
        with self._lock:
            duplicates: list[dict[str, Any]] = [
                {"instance": k[0], "number": k[1], "text": k[2][:80], "count": self._send_counts[k]}
                for k in self._duplicate_keys
            ]
            duplicates.sort(key=lambda d: -d["count"])
            return {
                "seq": self._seq,
                "requests": len(self._requests),
                "by_route": {route: dict(c) for route, c in self._by_route.items()},
                "faults": dict(self._faults),
                "sends": len(self._sends),
                "sends_unseen": self._unseen_sends,
                "distinct_sends": len(self._send_counts),
                "duplicate_sends": self._duplicate_sends,
                "duplicates": duplicates[:100],
                "early_retries": self._early,
                "early_retries_by_route": dict(self._early_by_route),
                "webhooks": dict(self._sink_totals("webhook")),
                "events": {
                    "dispatched": dict(self._dispatched),
                    **{
                        sink: {event: dict(c) for event, c in by_event.items()}
                        for sink, by_event in self._sinks.items()
                    },
                },
                "inbound": len(self._inbound),
                "inbound_by_origin": dict(self._inbound_origins),
                "connection_changes": len(self._connections),
                "since_reset_s": round(time.time() - self._started, 3),
            }

    def _sink_totals(self, sink: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self._sinks.get(sink, {}).values():
            total.update(counts)
        return total

    def entries_since(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        """Requests, sends, inbound messages and connection changes with seq > since (at most ``limit``
        of each), plus the summary."""
        with self._lock:
            requests = self._slice(self._requests, since, limit)
            sends = [dict(e) for e in self._slice(self._sends, since, limit)]
            inbound = [dict(e) for e in self._slice(self._inbound, since, limit)]
            connections = self._slice(self._connections, since, limit)
        return {
            "requests": requests,
            "sends": sends,
            "inbound": inbound,
            "connections": connections,
            "summary": self.summary(),
        }

    @staticmethod
    def _slice(entries: list[dict[str, Any]], since: int, limit: int | None) -> list[dict[str, Any]]:
        # entries are appended in seq order: binary search instead of a scan
        lo = bisect.bisect_right(entries, since, key=lambda e: e["seq"])
        hi = len(entries) if limit is None else min(len(entries), lo + limit)
        return entries[lo:hi]
