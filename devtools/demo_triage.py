"""The demo's AI reply triage scene (SPEC R-IN-5, E-37): six returning customers answer, each in
their own words, and each lands in the column its intent maps to.

``examples/demo.toml`` turns triage on for the ``comeback`` campaign (its own block) with a column
per intent. As soon as a comeback lead's message went out, one of :data:`REPLIES` is posted for it
through the sandbox (as Evolution would publish it); the reply handler records it and stops the
lead's sequence at once, and the ``triage_reply`` actor asks the sandbox's LLM, which answers by its
own keyword rules (``sandbox.llm.triage_intent``) and fails a share of the calls with 503 so that
the retries show. "Por favor, não me mandem mais nada." is an opt-out no keyword matches: the LLM's
``opt_out`` opts the lead out (R-IN-4). The away message keeps its lead in ``Contacted``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

INSTANCE = "demo-sales-2"  # the comeback campaign's first inbox (a lead answers the one that wrote to it)
#: (reply, the intent the sandbox gives it, the column the lead ends in)
REPLIES: tuple[tuple[str, str, str], ...] = (
    ("Oi! Tenho interesse, me conta mais.", "interested", "Interested"),
    ("Não tenho interesse, obrigado.", "not_interested", "Lost"),
    ("Qual o valor da mensalidade?", "question", "Questions"),
    ("Estou de férias, volto dia 20. Resposta automática.", "out_of_office", "Contacted"),
    ("Por favor, não me mandem mais nada.", "opt_out", "Lost"),
    ("👍", "other", "Replied"),
)
#: where examples/demo.toml's intent map sends a triaged lead of the comeback campaign (else Replied)
FOLLOW_UP_MAP = {"interested": "Interested", "question": "Questions", "not_interested": "Lost", "opt_out": "Lost"}
#: a share of triage calls the sandbox answers 503 (with Retry-After): retried like generation's
TRIAGE_FAULTS = {"triage": {"rate_503": 0.2}}


class TriageScene:
    """Posts the six replies to comeback leads whose message went out, then reports where they went."""

    def __init__(self, sb: Any, comeback_run: int, *, skip_phones: tuple[str, ...] = ()) -> None:
        self.sb, self.run_id, self.skip = sb, comeback_run, skip_phones
        self.posted: dict[str, str] = {}  # phone -> reply text
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, console: Any) -> None:
        """Start posting replies in a thread (the run goes on meanwhile)."""
        self.sb.set_faults(TRIAGE_FAULTS)
        self._thread = threading.Thread(target=self._script, name="demo-triage", daemon=True)
        self._thread.start()
        console.print(
            f"      triage: {len(REPLIES)} comeback leads will answer in their own words; the AI triage (R-IN-5) "
            f"moves each to its column ({TRIAGE_FAULTS['triage']['rate_503']:.0%} of its LLM calls answer 503)",
            markup=False,
        )

    def _script(self) -> None:
        from campaign.db import db

        while len(self.posted) < len(REPLIES) and not self._stop.wait(0.05):
            try:
                with db.connection_context():
                    # the lead answers the number that wrote to it (comeback sends through a pool, R-POOL)
                    rows = db.execute_sql(
                        """SELECT DISTINCT l.phone, i.instance_name FROM campaign_messages m
                             JOIN leads l ON l.id = m.lead_id JOIN inboxes i ON i.id = m.inbox_id
                            WHERE m.run_id = %s AND m.status = 'sent' AND NOT (l.phone = ANY(%s))
                            ORDER BY l.phone LIMIT %s""",
                        (self.run_id, [*self.skip, *self.posted], len(REPLIES) - len(self.posted)),
                    ).fetchall()
                for phone, instance in rows:
                    text = REPLIES[len(self.posted)][0]
                    self.sb.inbound(instance=instance or INSTANCE, number=phone, text=text)
                    self.posted[phone] = text
            except Exception:  # the demo goes on; the summary says what did not happen
                log.warning("demo triage: could not post a scripted reply", exc_info=True)

    def wait_settled(self, timeout: float) -> None:
        """Wait (while the workers still run) until every reply was posted and triaged."""
        from campaign.db import db

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            posted = list(self.posted)
            with db.connection_context():
                pending, settled, left = db.execute_sql(
                    """SELECT (SELECT count(*) FROM reply_triage WHERE status = 'pending'),
                              (SELECT count(*) FROM reply_triage WHERE run_id = %(run)s AND status <> 'pending'),
                              (SELECT count(*) FROM campaign_messages m JOIN leads l ON l.id = m.lead_id
                                WHERE m.run_id = %(run)s AND m.status = 'sent' AND NOT (l.phone = ANY(%(not)s)))""",
                    {"run": self.run_id, "not": [*self.skip, *posted]},
                ).fetchone()
            # every reply posted (or no lead left to answer: a short demo) and every one triaged
            if not pending and settled >= len(posted) and (len(posted) == len(REPLIES) or not left):
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def summary(self) -> list[dict[str, Any]]:
        """Per reply: the lead, what it wrote, the intent and where the lead is now (rows, not intentions)."""
        from campaign.db import db

        with db.connection_context():
            rows = db.execute_sql(
                """SELECT l.phone, cm.text, t.intent, t.status, c.name, l.opted_out
                     FROM reply_triage t JOIN leads l ON l.id = t.lead_id
                     JOIN conversation_messages cm ON cm.id = t.conversation_message_id
                     LEFT JOIN columns c ON c.id = l.column_id
                    WHERE t.run_id = %s ORDER BY t.id""",
                (self.run_id,),
            ).fetchall()
        return [
            {"phone": p, "reply": text, "intent": intent, "status": status, "column": col, "opted_out": out}
            for p, text, intent, status, col, out in rows
        ]


def show(console: Any, rows: list[dict[str, Any]], ledger: dict[str, Any]) -> None:
    """Print where each reply landed, and how many triage calls the sandbox failed (retried)."""
    # the away message is no reply for skip_if_replied: that lead is followed up (E-36)
    expected = {
        text: (intent, "Followed up" if intent == "out_of_office" else column) for text, intent, column in REPLIES
    }
    retried = ledger.get("by_route", {}).get("triage", {}).get("503", 0)
    console.print(
        f"  reply triage (R-IN-5): {len(rows)} repl(ies) classified; {retried} LLM call(s) answered 503 and retried",
        markup=False,
    )
    for r in rows:
        want = expected.get(r["reply"])
        if want is None:  # an answer of the follow-up scene: examples/demo.toml's map says where it goes
            want = (r["intent"], FOLLOW_UP_MAP.get(r["intent"] or "", "Replied"))
        ok = (r["intent"], r["column"]) == want
        console.print(
            f"    {r['phone']}  {r['reply'][:44]!r:48} -> {r['intent'] or 'pending'} "
            f"({'llm' if r['status'] == 'done' else 'keywords' if r['status'] == 'fallback' else 'pending'}) "
            f"-> column {r['column']}{' · opted out' if r['opted_out'] else ''}{'' if ok else '  (UNEXPECTED)'}",
            markup=False,
        )
