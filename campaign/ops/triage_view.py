"""What reply triage did, for ``status`` and ``report`` (SPEC R-IN-5): replies per intent (by the
LLM or by the keyword rules after an LLM failure, E-37), still pending, and triage's own tokens and
cost, kept apart from generation's."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from campaign.db import db
from campaign.inbound.triage import INTENTS

__all__ = ["TriageSummary", "for_run", "since"]


@dataclass(frozen=True)
class TriageSummary:
    """Triage rows of a scope (a run, or every campaign since a time)."""

    intents: dict[str, int] = field(default_factory=dict)  # every settled reply, by intent (INTENTS order)
    by_keywords: int = 0  # of them, decided by the keyword rules (the LLM failed or answered garbage)
    pending: int = 0  # waiting for the LLM
    calls: int = 0  # replies with a token count (the LLM answered)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None  # what OpenRouter said the calls cost; None when it never said

    @property
    def settled(self) -> int:
        """Replies triage has decided."""
        return sum(self.intents.values())

    @property
    def empty(self) -> bool:
        """No reply was ever handed to triage in this scope."""
        return not self.settled and not self.pending


_SQL = """
    SELECT intent, status, count(*), count(total_tokens), coalesce(sum(prompt_tokens), 0),
           coalesce(sum(completion_tokens), 0), coalesce(sum(total_tokens), 0), sum(cost)
      FROM reply_triage WHERE {where} GROUP BY intent, status"""


def _read(where: str, params: tuple) -> TriageSummary:
    intents: dict[str, int] = {}
    by_keywords = pending = calls = prompt = completion = total = 0
    cost: float | None = None
    for intent, status, n, with_tokens, p, c, t, spent in db.execute_sql(_SQL.format(where=where), params):
        if status == "pending":
            pending += n
        else:
            intents[intent] = intents.get(intent, 0) + n
            by_keywords += n if status == "fallback" else 0
        calls += with_tokens
        prompt, completion, total = prompt + p, completion + c, total + t
        if spent is not None:
            cost = (cost or 0.0) + float(spent)
    ordered = {i: intents[i] for i in INTENTS if intents.get(i)}
    return TriageSummary(ordered, by_keywords, pending, calls, prompt, completion, total, cost)


def for_run(run_id: int) -> TriageSummary:
    """Replies to this run's messages (the run whose message the lead answered)."""
    return _read("run_id = %s", (run_id,))


def since(when: dt.datetime | None) -> TriageSummary:
    """Every campaign's replies recorded since ``when`` (None: all of them)."""
    return _read("created_at >= %s", (when,)) if when is not None else _read("true", ())
