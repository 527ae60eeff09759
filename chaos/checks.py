"""The verdict of a suite run: every check of T-REL-1 from PostgreSQL + the sandbox ledger, and the
time each fault took to recover from."""

from __future__ import annotations

import bisect
import collections
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.faults import KILL, KILL_MID_SEND, PG_TERMINATE, FaultEvent

log = logging.getLogger(__name__)

TERMINAL = ("sent", "failed", "skipped", "in_doubt")
#: a send claimed this long before a fault (and still `sending` then) was interrupted by it
FAULT_REACH_BEFORE_S = 0.5


@dataclass
class Check:
    """One line of the verdict table."""

    name: str
    value: Any
    expected: str
    ok: bool
    note: str = ""


@dataclass
class Recovery:
    """How long the engine took to get back to work after one fault."""

    kind: str
    at_s: float
    progress: float
    details: str
    next_send_s: float | None
    all_inboxes_s: float | None
    rate_back_s: float | None
    note: str = ""


@dataclass
class Verdict:
    """Everything the run found; ``ok`` only when every check passed."""

    checks: list[Check]
    recoveries: list[Recovery]
    facts: dict[str, Any] = field(default_factory=dict)
    in_doubt_causes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the CI test reads it)."""
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "recoveries": [asdict(r) for r in self.recoveries],
            "facts": self.facts,
            "in_doubt_causes": self.in_doubt_causes,
            "problems": self.problems[:50],
        }


def _digits(number: str | None) -> str:
    return "".join(ch for ch in (number or "") if ch.isdigit())


def collect_db(cur) -> dict[str, Any]:
    """Read what the checks need from the run's database (psycopg2 cursor)."""
    cur.execute("SELECT status, count(*) FROM campaign_messages GROUP BY status")
    by_status = dict(cur.fetchall())
    cur.execute("SELECT id, status, pause_reason, leads_total, leads_overflow FROM campaign_runs ORDER BY id")
    runs = cur.fetchall()
    cur.execute("""SELECT p.id, p.message_id, p.idx, p.status, extract(epoch FROM p.sending_at)::float,
                          p.provider_message_id, p.error_message, p.text, i.instance_name, l.phone
                   FROM message_parts p JOIN inboxes i ON i.id = p.inbox_id
                   JOIN campaign_messages m ON m.id = p.message_id LEFT JOIN leads l ON l.id = m.lead_id""")
    parts = cur.fetchall()
    cur.execute("SELECT count(*) FROM dead_letters")
    dead = cur.fetchone()[0]
    cur.execute("""SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n = 2), count(*) FILTER (WHERE n = 3),
                          count(*) FILTER (WHERE n > 3) FROM (SELECT count(*) AS n FROM message_parts
                          GROUP BY message_id) x""")
    parts_hist = dict(zip(("1", "2", "3", ">3"), cur.fetchone()))
    cur.execute(
        "SELECT coalesce(error_class, skip_reason, status), count(*) FROM campaign_messages "
        "WHERE status IN ('failed', 'skipped') GROUP BY 1"
    )
    not_sent_reasons = dict(cur.fetchall())
    cur.execute("SELECT name FROM inboxes WHERE disabled ORDER BY name")
    disabled = [r[0] for r in cur.fetchall()]
    return {
        "by_status": by_status,
        "runs": runs,
        "parts": parts,
        "dead_letters": dead,
        "parts_hist": parts_hist,
        "not_sent_reasons": not_sent_reasons,
        "disabled_inboxes": disabled,
    }


#: what a message fails or is skipped with when gateway trouble or a disconnect got the better of
#: it (T-REL-2 expects none: an outage is waited out, a started message waits for its inbox)
OUTAGE_REASONS = (
    "retries_exhausted",
    "server_error",
    "rate_limited",
    "instance_disconnected",
    "connect_error",
    "timeout",
    "request_timeout",
    "window_closed",
    "too_late",
    "run_closed",
)


def _near(events: list[FaultEvent], kinds: tuple[str, ...], sending_at: float, reach_s: float) -> FaultEvent | None:
    """A fault of ``kinds`` that happened while a send claimed at ``sending_at`` could still be in flight."""
    for ev in events:
        if ev.kind in kinds and sending_at - FAULT_REACH_BEFORE_S <= ev.t <= sending_at + reach_s:
            return ev
    return None


def classify_in_doubt(
    parts: list[tuple], ledger_sends: list[dict], events: list[FaultEvent], send_reach_s: float
) -> tuple[collections.Counter, list[str], list[str]]:
    """Why each in_doubt part is in doubt; and every ambiguous send of the sandbox that is NOT in_doubt.

    A part is legitimately in doubt when the sandbox accepted it and never answered (hang), its
    answer was never read (the client was gone), or a worker kill / connection termination hit
    while it was being sent. Anything else is a false in_doubt (reported as a problem).
    """
    by_identity: dict[tuple, list[dict]] = collections.defaultdict(list)
    for s in ledger_sends:
        by_identity[(s["instance"], s["number"], s["text"])].append(s)
    causes: collections.Counter = collections.Counter()
    problems: list[str] = []
    killed_mid_send = {pid for ev in events for pid in ev.details.get("parts_sending", [])}
    part_by_identity: dict[tuple, tuple] = {}
    for part in parts:
        pid, mid, idx, status, sending_at, key_id, err, text, instance, phone = part
        ident = (instance, _digits(phone), text)
        part_by_identity[ident] = part
        if status != "in_doubt":
            continue
        sends = by_identity.get(ident, [])
        if pid in killed_mid_send:
            causes["worker killed mid-send" + ("" if sends else " (no send accepted)")] += 1
        elif any(s["outcome"] in ("hang", "close") for s in sends):
            causes["sandbox hang after accept (read timeout)"] += 1
        elif any(not s["seen"] or s["outcome"] != "ok" for s in sends):
            causes["answer never read (client gone)"] += 1
        elif sending_at is not None and _near(events, (KILL, KILL_MID_SEND), sending_at, send_reach_s):
            causes["worker killed mid-send" + ("" if sends else " (no send accepted)")] += 1
        elif sending_at is not None and _near(events, (PG_TERMINATE,), sending_at, send_reach_s):
            causes["db connection terminated mid-send" + ("" if sends else " (no send accepted)")] += 1
        else:
            causes["UNEXPLAINED"] += 1
            problems.append(
                f"part {pid} (message {mid}, idx {idx}) in_doubt without a hang or a fault nearby: "
                f"{err!r}; sandbox saw {len(sends)} send(s); sending_at={sending_at}"
            )
    # every ambiguous send the sandbox saw must have left its part in_doubt (never sent/pending/failed)
    ambiguous_not_in_doubt: list[str] = []
    for ident, sends in by_identity.items():
        if not any(s["outcome"] != "ok" or not s["seen"] for s in sends):
            continue
        found = part_by_identity.get(ident)
        status = found[3] if found else None
        if status != "in_doubt":
            ambiguous_not_in_doubt.append(
                f"{ident[0]} {ident[1]} part {found[0] if found else '?'} is {status} "
                f"after {[s['outcome'] for s in sends]}"
            )
    return causes, problems, ambiguous_not_in_doubt


def ledger_vs_parts(parts: list[tuple], ledger_sends: list[dict]) -> tuple[list[str], list[str]]:
    """(sent parts the sandbox never accepted, accepted sends whose part the engine thinks NOT sent)."""
    ok_keys = {s["key_id"] for s in ledger_sends}
    part_by_identity = {(p[8], _digits(p[9]), p[7]): p for p in parts}
    sent_without_ledger = [f"part {p[0]} key {p[5]}" for p in parts if p[3] == "sent" and p[5] not in ok_keys]
    unaccounted = []
    for s in ledger_sends:
        part = part_by_identity.get((s["instance"], s["number"], s["text"]))
        if part is None or part[3] not in ("sent", "in_doubt"):
            unaccounted.append(
                f"{s['instance']} {s['number']} key {s['key_id']} ({s['outcome']}): part "
                f"{part[0] if part else 'missing'} is {part[3] if part else '-'}"
            )
    return sent_without_ledger, unaccounted


def gap_violations(requests: list[dict], min_gap: float, tolerance: float) -> tuple[int, float | None]:
    """Sends of one inbox closer than its minimum gap (arrival times: the ledger's t minus injected latency)."""
    by_instance: dict[str, list[float]] = collections.defaultdict(list)
    for r in requests:
        if r.get("route") == "send" and r.get("instance") and r.get("fault") != "auth":
            by_instance[r["instance"]].append(r["t"] - (r.get("latency_ms") or 0) / 1000.0)
    violations = 0
    smallest: float | None = None
    for times in by_instance.values():
        times.sort()
        for a, b in zip(times, times[1:]):
            gap = b - a
            smallest = gap if smallest is None else min(smallest, gap)
            if gap < min_gap - tolerance:
                violations += 1
    return violations, smallest


def recoveries(events: list[FaultEvent], ledger_sends: list[dict], t0: float, last_t: float) -> list[Recovery]:
    """Per fault: next accepted send, every busy inbox sending again, and the send rate back to >= 50 %."""
    times = sorted(s["t"] for s in ledger_sends)
    by_inbox: dict[str, list[float]] = collections.defaultdict(list)
    for s in ledger_sends:
        by_inbox[s["instance"]].append(s["t"])
    for ts in by_inbox.values():
        ts.sort()
    out: list[Recovery] = []
    for ev in events:
        start = ev.t_end
        i = bisect.bisect_right(times, start)
        next_send = times[i] - ev.t if i < len(times) else None
        # inboxes that were busy just before the fault and still had sends to do afterwards
        waits = []
        for ts in by_inbox.values():
            j = bisect.bisect_right(ts, start)
            if j < len(ts) and j > 0 and ev.t - ts[j - 1] < 5.0:
                waits.append(ts[j] - ev.t)
        all_inboxes = max(waits) if waits else None
        lo = bisect.bisect_left(times, ev.t - 10.0)
        hi = bisect.bisect_left(times, ev.t)
        baseline = (hi - lo) / 10.0
        rate_back = None
        note = ""
        if baseline >= 1.0:
            step = start
            while step < last_t:
                a = bisect.bisect_left(times, step)
                b = bisect.bisect_left(times, step + 3.0)
                if (b - a) / 3.0 >= 0.5 * baseline:
                    rate_back = step - ev.t
                    break
                step += 0.5
        else:
            note = f"baseline {baseline:.1f} sends/s before the fault: rate not compared"
        details = ", ".join(f"{k}={v}" for k, v in ev.details.items() if k != "parts_sending")
        if ev.details.get("parts_sending"):
            details += f", parts in flight={len(ev.details['parts_sending'])}"
        out.append(
            Recovery(
                ev.kind,
                round(ev.t - t0, 1),
                round(ev.progress, 3),
                details,
                None if next_send is None else round(next_send, 2),
                None if all_inboxes is None else round(all_inboxes, 2),
                None if rate_back is None else round(rate_back, 2),
                note,
            )
        )
    return out


def judge(
    *,
    db_facts: dict[str, Any],
    ledger: dict[str, Any],
    events: list[FaultEvent],
    expected_faults: dict[str, int],
    expected_messages: int,
    mismatches: list,
    min_gap: float,
    send_reach_s: float,
    t0: float,
    quiescent: bool,
    quiescence_s: float | None,
    injector_error: str | None,
) -> Verdict:
    """Every check of the suite, from the collected facts."""
    summary = ledger["summary"]
    sends = ledger["sends"]
    requests = ledger["requests"]
    by_status = db_facts["by_status"]
    total = sum(by_status.values())
    lost = sum(n for s, n in by_status.items() if s not in TERMINAL)
    runs = db_facts["runs"]
    completed = sum(1 for r in runs if r[1] == "completed")
    overflow = sum(r[4] or 0 for r in runs)
    parts = db_facts["parts"]
    causes, in_doubt_problems, ambiguous_not_in_doubt = classify_in_doubt(parts, sends, events, send_reach_s)
    in_doubt_parts = sum(1 for p in parts if p[3] == "in_doubt")
    sent_without_ledger, unaccounted = ledger_vs_parts(parts, sends)
    # arrival = the ledger's time minus the injected latency; a loaded machine oversleeps that
    # latency by some ms, hence the tolerance (a real breach of one-send-in-flight is ~0 s apart)
    gaps, smallest_gap = gap_violations(requests, min_gap, tolerance=0.04)
    hangs = sum(1 for s in sends if s["outcome"] in ("hang", "close"))
    unseen = sum(1 for s in sends if s["outcome"] not in ("hang", "close") and (not s["seen"] or s["outcome"] != "ok"))
    injected = collections.Counter(e.kind for e in events)
    targeted = [e for e in events if e.kind == KILL_MID_SEND and e.details.get("targeted")]

    checks = [
        Check(
            "messages planned",
            total,
            f">= {expected_messages}, overflow 0",
            total >= expected_messages and overflow == 0,
            f"overflow {overflow}",
        ),
        Check(
            "quiescence reached",
            "yes" if quiescent else "TIMEOUT",
            "yes",
            quiescent,
            f"after {quiescence_s:.0f} s" if quiescence_s is not None else "",
        ),
        Check(
            "messages lost (not terminal)",
            lost,
            "0",
            lost == 0,
            ", ".join(f"{s}={n}" for s, n in by_status.items() if s not in TERMINAL),
        ),
        Check(
            "parts delivered twice (sandbox ledger)",
            summary["duplicate_sends"],
            "0",
            summary["duplicate_sends"] == 0,
            "; ".join(str(d) for d in summary.get("duplicates", [])[:3]),
        ),
        Check(
            "parts 'sent' the sandbox never accepted",
            len(sent_without_ledger),
            "0",
            not sent_without_ledger,
            "; ".join(sent_without_ledger[:3]),
        ),
        Check(
            "accepted sends the engine thinks unsent",
            len(unaccounted),
            "0",
            not unaccounted,
            "; ".join(unaccounted[:3]),
        ),
        Check(
            "runs finalised",
            f"{completed}/{len(runs)}",
            "100 %",
            bool(runs) and completed == len(runs),
            ", ".join(f"run {r[0]} {r[1]}({r[2]})" for r in runs if r[1] != "completed"),
        ),
        Check("verify mismatches", len(mismatches), "0", not mismatches, "; ".join(map(str, mismatches[:3]))),
        Check(
            "in_doubt parts without a hang/kill/termination",
            causes.get("UNEXPLAINED", 0),
            "0",
            not causes.get("UNEXPLAINED"),
            f"{in_doubt_parts} in_doubt part(s), {by_status.get('in_doubt', 0)} in_doubt message(s)",
        ),
        Check(
            "ambiguous sends not left in_doubt",
            len(ambiguous_not_in_doubt),
            "0",
            not ambiguous_not_in_doubt,
            f"sandbox: {hangs} hang(s), {unseen} unread answer(s); " + "; ".join(ambiguous_not_in_doubt[:2]),
        ),
        Check(
            "requests before Retry-After elapsed",
            summary["early_retries"],
            "0",
            summary["early_retries"] == 0,
            str(summary.get("early_retries_by_route") or ""),
        ),
        Check(
            "sends closer than the inbox's min gap",
            gaps,
            "0",
            gaps == 0,
            f"min gap {min_gap}s, smallest seen {smallest_gap:.3f}s" if smallest_gap is not None else "",
        ),
        Check(
            "faults injected",
            dict(injected),
            str(expected_faults),
            all(injected.get(k, 0) >= n for k, n in expected_faults.items())
            and injector_error is None
            and (not expected_faults.get(KILL_MID_SEND) or bool(targeted)),
            (f"injector error: {injector_error}" if injector_error else "")
            + ("" if targeted or not expected_faults.get(KILL_MID_SEND) else "no kill hit a worker mid-send"),
        ),
    ]
    outage_hits = {r: n for r, n in db_facts["not_sent_reasons"].items() if r in OUTAGE_REASONS}
    checks.append(
        Check(
            "messages failed/skipped by gateway trouble or a disconnect",
            sum(outage_hits.values()),
            "0",
            not outage_hits,
            ", ".join(f"{r}={n}" for r, n in outage_hits.items()),
        )
    )
    disabled = db_facts["disabled_inboxes"]
    checks.append(Check("inboxes left disabled", len(disabled), "0", not disabled, ", ".join(disabled)))
    hist = db_facts["parts_hist"]
    checks.append(
        Check(
            "messages of 1, 2 and 3 parts",
            hist,
            "each > 0, none > 3",
            all(hist.get(k, 0) > 0 for k in ("1", "2", "3")) and not hist.get(">3"),
        )
    )
    # sandbox faults must really have happened, or the run proved nothing about them
    faults_seen = summary.get("faults", {})
    for fault in ("429", "500", "accept_then_hang"):
        checks.append(
            Check(f"sandbox fault {fault} exercised", faults_seen.get(fault, 0), "> 0", faults_seen.get(fault, 0) > 0)
        )
    last_t = max((s["t"] for s in sends), default=t0)
    facts = {
        "messages_by_status": by_status,
        "runs": len(runs),
        "parts_by_message": db_facts["parts_hist"],
        "parts": len(parts),
        "parts_in_doubt": in_doubt_parts,
        "sandbox_sends": len(sends),
        "sandbox_requests": summary["requests"],
        "sandbox_faults": faults_seen,
        "dead_letters": db_facts["dead_letters"],
        "failed_or_skipped_reasons": db_facts["not_sent_reasons"],
        "smallest_inbox_gap_s": smallest_gap,
        "faults": [asdict(e) for e in events],
    }
    early = [
        f"early {r['route']} request at +{r['t'] - t0:.2f}s {r.get('instance', '')} {r.get('number', '')} "
        f"status={r.get('status')} fault={r.get('fault')}"
        for r in requests
        if r.get("early")
    ]
    return Verdict(
        checks,
        recoveries(events, sends, t0, last_t),
        facts,
        dict(causes),
        in_doubt_problems + ambiguous_not_in_doubt + sent_without_ledger + unaccounted + early,
    )


def render(verdict: Verdict) -> str:
    """The verdict as two plain-text tables."""
    rows = [("check", "value", "expected", "ok", "note")]
    for c in verdict.checks:
        rows.append((c.name, str(c.value), c.expected, "PASS" if c.ok else "FAIL", c.note))
    out = [_table(rows)]
    if verdict.in_doubt_causes:
        out.append("in_doubt parts by cause: " + ", ".join(f"{k}: {v}" for k, v in verdict.in_doubt_causes.items()))
    rrows = [("fault", "at s", "progress", "details", "next send s", "busy inboxes back s", "rate >=50% s")]
    for r in verdict.recoveries:
        rrows.append(
            (
                r.kind,
                f"{r.at_s:.1f}",
                f"{r.progress:.0%}",
                r.details,
                "-" if r.next_send_s is None else f"{r.next_send_s:.2f}",
                "-" if r.all_inboxes_s is None else f"{r.all_inboxes_s:.2f}",
                "-" if r.rate_back_s is None else f"{r.rate_back_s:.2f}" + (f" ({r.note})" if r.note else ""),
            )
        )
    out.append("time to recover after each fault (seconds from the fault):")
    out.append(_table(rrows))
    return "\n".join(out)


def _table(rows: list[tuple]) -> str:
    widths = [min(60, max(len(str(r[i])) for r in rows)) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(str(v)[:60].ljust(w) for v, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
