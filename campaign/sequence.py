"""Follow-up sequences from kanban columns: who counts as having replied, and the conversation
a follow-up's prompt carries (SPEC §4.6d R-SEQ-1..2, R-IN-3, R-IN-5).

A follow-up is a campaign whose source column is where an earlier campaign puts leads. Three
rules decide which leads of that column it writes to, all in the planner's ONE eligibility query
(``campaign.planner``), and each excluded lead is counted on the run under the first rule it fails,
in this order:

1. ``opted_out`` — the lead asked to stop (R-IN-4): never written to again;
2. ``replied`` — with ``skip_if_replied`` (the default), the lead replied after it entered the
   column (:data:`REPLIED_SQL`); a person who moves it into another column makes it eligible there;
3. ``too_recent`` — with ``min_days_in_column = N``, the lead entered the column fewer than N
   local days ago (see :func:`campaign.planner.entered_before`).

What counts as a reply lives here and only here. ``leads.last_reply_at`` is the time of the lead's
last reply that counts; recording a reply sets it at once (R-IN-2, before anything knows its
intent). An intent of :data:`NOT_A_REPLY_INTENTS` (``out_of_office``, R-IN-5) does not count:
whoever stores such an intent on the conversation message calls :func:`recount_last_reply` in the
same transaction, which sets ``last_reply_at`` back to the latest reply that still counts, so the
lead stays eligible for the next follow-up.
"""

from __future__ import annotations

from campaign.db import db

__all__ = [
    "NOT_A_REPLY_INTENTS",
    "EXCLUSION_RULES",
    "REPLIED_SQL",
    "RECOUNT_LAST_REPLY_SQL",
    "recount_last_reply",
    "HISTORY_MAX",
    "HISTORY_COLUMN",
]

#: triage intents (R-IN-5) whose reply does not count as one for ``skip_if_replied``
NOT_A_REPLY_INTENTS: tuple[str, ...] = ("out_of_office",)

#: the exclusion rules, in the order a lead is counted under (the run's ``excluded_*`` columns)
EXCLUSION_RULES: tuple[str, ...] = ("opted_out", "replied", "too_recent")

#: SQL (lead aliased ``l``): the lead replied after it entered its current column (R-IN-3).
#: ``column_changed_at`` is never NULL (schema V10) and ``last_reply_at`` only holds replies that count.
REPLIED_SQL = "(l.last_reply_at IS NOT NULL AND l.last_reply_at > l.column_changed_at)"

#: ``last_reply_at`` of lead %(lead)s recomputed from its inbound conversation messages whose
#: intent counts (none: NULL)
RECOUNT_LAST_REPLY_SQL = """
    UPDATE leads l SET last_reply_at = (
        SELECT max(cm.at) FROM conversation_messages cm JOIN conversations cv ON cv.id = cm.conversation_id
         WHERE cv.lead_id = l.id AND cm.direction = 'in' AND coalesce(cm.intent, '') <> ALL(%(not_a_reply)s))
     WHERE l.id = %(lead)s
    RETURNING l.last_reply_at"""


def recount_last_reply(lead_id: int) -> None:
    """Make ``leads.last_reply_at`` the latest reply of the lead that counts (out-of-office ones do not)."""
    db.execute_sql(RECOUNT_LAST_REPLY_SQL, {"lead": lead_id, "not_a_reply": list(NOT_A_REPLY_INTENTS)})


#: ``history = K`` is at most this (the schema's check; ``apply`` says so first)
HISTORY_MAX = 50

#: The generate step's context column (message aliased ``m``, config ``c``): the last
#: ``c.history`` conversation messages of the lead on the message's inbox, oldest first, as a JSON
#: array of {"direction", "text", "at"} — NULL when history is 0 (the subquery is not run then),
#: so a first touch pays nothing and a follow-up no extra round trip (R-SEQ-2). Texts are cut in
#: SQL to bound what a long message costs; the prompt cuts them again to its own limit.
HISTORY_COLUMN = """
    CASE WHEN c.history > 0 AND m.lead_id IS NOT NULL THEN (
        SELECT json_agg(json_build_object('direction', h.direction, 'text', left(h.text, 2000), 'at', h.at)
                        ORDER BY h.at, h.id)
          FROM (SELECT cm.direction, cm.text, cm.at, cm.id
                  FROM conversations cv JOIN conversation_messages cm ON cm.conversation_id = cv.id
                 WHERE cv.lead_id = m.lead_id AND cv.inbox_id = m.inbox_id
                 ORDER BY cm.at DESC, cm.id DESC LIMIT c.history) h)
    END AS history"""
