"""What an inbox may send (SPEC R-RATE-1, R-HEALTH-1, R-PLAN-3, R-POOL-2; issue 22).

One place answers "how many sends may this inbox make today, and how fast": the planner (how
many messages a run puts on an inbox, how far apart), the pools (each member's room), the
dispatcher (claim a message only when its inbox can send it soon, R-DISP-2), the send-time caps
(:mod:`campaign.ratelimit`) and ``status`` all read the caps from here, so they cannot disagree.

Units
-----
Caps count **sends**: every part of a split message is one WhatsApp message and one send
(``message_parts.sending_at``). A campaign message is expected to take
:func:`expected_parts` sends: ``split.max_parts`` when splitting is on, else 1 — the most it can
take, so a plan made with it never asks for more sends than the caps allow (a message that
splits into fewer parts leaves room unused rather than over-booking the number).

Warm-up (R-HEALTH-1)
--------------------
An inbox with ``warmup = { start_per_day = S, days = N }`` and ``max_per_day = M`` has, on warm-up
day ``d`` (whole 24-hour periods since its first send; before its first send ``d`` is 0), the
effective daily cap::

    cap(d) = S + floor((M - S) * d / N)    for 0 <= d < N
    cap(d) = M                             for d >= N

a straight line from ``S`` on day 0 to ``M`` on day ``N`` (20 -> 300 over 14 days: 20, 40, 60,
80, ... 280, then 300). Days count from the first send and keep counting through a pause: a
number that sent on day 0 and then stayed silent for a week comes back on day 7 of its ramp, not
day 1 — the ramp measures the number's age, as R-HEALTH-1 says ("counted from its first send").

Health (R-HEALTH-2) seam
------------------------
Every cap goes through a multiplier (``multiplier`` in Python, :func:`multiplier_sql` in SQL):
1 today. The health states make ``throttled`` halve the caps by returning 0.5 there; nothing
else has to change.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from campaign.sql import fetch_all, health_cap_factor

__all__ = [
    "DAY_SECONDS",
    "Warmup",
    "warmup_day",
    "ramp_cap",
    "daily_cap",
    "hourly_cap",
    "scaled",
    "expected_parts",
    "messages_per_hour",
    "gap_floor_seconds",
    "multiplier_sql",
    "daily_cap_sql",
    "hourly_cap_sql",
    "expected_parts_sql",
    "InboxDay",
    "inbox_days",
]

DAY_SECONDS = 86_400


@dataclass(frozen=True)
class Warmup:
    """An inbox's warm-up ramp: ``start_per_day`` sends on day 0, growing to its max over ``days`` days."""

    start_per_day: int
    days: int


def warmup_day(first_send_at: dt.datetime | None, at: dt.datetime) -> int:
    """The warm-up day at ``at``: whole 24-hour periods since the first send (0 before any send)."""
    if first_send_at is None or at <= first_send_at:
        return 0
    return int((at - first_send_at).total_seconds() // DAY_SECONDS)


def ramp_cap(start_per_day: int, max_per_day: int, days: int, day: int) -> int:
    """The warm-up curve: ``start_per_day`` on day 0, a straight line to ``max_per_day`` on day ``days``."""
    if day >= days:
        return max_per_day
    return start_per_day + (max_per_day - start_per_day) * max(0, day) // days


def scaled(cap: int | None, multiplier: float = 1.0) -> int | None:
    """A cap times the health multiplier, rounded down, a cap of 1 or more never below 1 (a
    throttled inbox slows down, it does not stop); None (uncapped) stays uncapped."""
    if cap is None or multiplier == 1.0:
        return cap
    return max(min(1, cap), math.floor(cap * multiplier))


def daily_cap(
    max_per_day: int | None,
    warmup: Warmup | None,
    first_send_at: dt.datetime | None,
    at: dt.datetime,
    *,
    multiplier: float = 1.0,
) -> int | None:
    """The effective daily cap of an inbox at ``at`` (None: uncapped); warm-up and health included."""
    if max_per_day is None:
        return None
    cap = max_per_day
    if warmup is not None:
        cap = ramp_cap(warmup.start_per_day, max_per_day, warmup.days, warmup_day(first_send_at, at))
    return scaled(cap, multiplier)


def hourly_cap(max_per_hour: int | None, *, multiplier: float = 1.0) -> int | None:
    """The effective hourly cap of an inbox (None: uncapped)."""
    return scaled(max_per_hour, multiplier)


def expected_parts(split_enabled: bool, max_parts: int) -> int:
    """Sends one message of a campaign is planned to take: its ``max_parts`` when it splits, else 1."""
    return max(1, max_parts) if split_enabled else 1


def messages_per_hour(hour_cap: int | None, parts: int) -> int | None:
    """Whole messages of ``parts`` sends an hourly cap allows (None: uncapped; 0: not even one)."""
    if hour_cap is None:
        return None
    return hour_cap // max(1, parts)


def gap_floor_seconds(hour_cap: int | None, parts: int) -> float | None:
    """The least gap between two messages of ``parts`` sends that keeps an hour within ``hour_cap``.

    ``3600 / floor(cap / parts)``: any hour (RateLimits counts the sends of the last hour) then
    holds at most ``floor(cap / parts)`` messages, so at most ``cap`` sends. 0.0 when uncapped;
    None when the cap cannot take even one message of ``parts`` sends.
    """
    per_hour = messages_per_hour(hour_cap, parts)
    if per_hour is None:
        return 0.0
    if per_hour == 0:
        return None
    return 3600.0 / per_hour


# --------------------------------------------------------------------------------------------
# the same, as SQL expressions over an ``inboxes`` row (one definition for every statement)
# --------------------------------------------------------------------------------------------


def multiplier_sql(inbox: str = "i") -> str:
    """SQL of the health multiplier of inbox alias ``inbox``: 0.5 while it is ``throttled`` (R-HEALTH-2)."""
    return health_cap_factor(inbox)


def _scaled_sql(cap: str, inbox: str) -> str:
    # NULL (uncapped) stays NULL; a throttled cap of 1 stays 1 (the inbox slows down, it does not
    # stop: `restricted` does that); as :func:`scaled`
    return (
        f"(CASE WHEN ({cap}) IS NULL THEN NULL "
        f"ELSE greatest(least(1, ({cap})), floor(({cap}) * {multiplier_sql(inbox)}))::int END)"
    )


def daily_cap_sql(inbox: str = "i", at: str = "now()") -> str:
    """SQL of the effective daily cap (:func:`daily_cap`) of inbox alias ``inbox`` at the instant ``at``.

    ``at`` appears several times: give a named parameter (``%(at)s``) or an expression (``now()``).
    """
    day = f"coalesce(greatest(0, floor(extract(epoch FROM ({at}) - {inbox}.first_send_at) / {DAY_SECONDS})), 0)::bigint"
    ramp = (
        f"CASE WHEN {inbox}.warmup_days IS NULL OR {day} >= {inbox}.warmup_days THEN {inbox}.max_per_day "
        f"ELSE ({inbox}.warmup_start_per_day + ({inbox}.max_per_day - {inbox}.warmup_start_per_day)::bigint "
        f"* {day} / {inbox}.warmup_days)::int END"
    )
    return _scaled_sql(ramp, inbox)


def hourly_cap_sql(inbox: str = "i") -> str:
    """SQL of the effective hourly cap (:func:`hourly_cap`) of inbox alias ``inbox``."""
    return _scaled_sql(f"{inbox}.max_per_hour", inbox)


def expected_parts_sql(config: str = "c") -> str:
    """SQL of :func:`expected_parts` for campaign config alias ``config``."""
    return f"(CASE WHEN {config}.split_enabled THEN greatest(1, {config}.max_parts) ELSE 1 END)"


# --------------------------------------------------------------------------------------------
# read model: each inbox's day (``status``, ``cli.py inboxes``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxDay:
    """An inbox's capacity now, in sends: caps, what the last hour/day used, what is planned, what is left.

    ``used_*`` are sends started in the last hour / 24 h (the windows the send-time caps count);
    ``planned`` the sends still to come from messages due in the next 24 h or in flight (expected
    parts for a message not split yet, pending parts for one mid-way); ``left`` = the effective daily
    cap minus both (negative: more is planned than the cap allows; the dispatcher holds the rest).
    """

    inbox_id: int
    label: str  # workspace/inbox
    max_per_hour: int | None
    hour_cap: int | None
    max_per_day: int | None
    day_cap: int | None  # the effective daily cap now: warm-up and health included
    warmup: Warmup | None
    warmup_day: int | None  # day of its ramp (None without warm-up)
    used_hour: int
    used_day: int
    planned: int

    @property
    def left(self) -> int | None:
        """Sends left today under the daily cap (None: uncapped)."""
        return None if self.day_cap is None else self.day_cap - self.used_day - self.planned


_SENT_IN = """(SELECT count(*) FROM message_parts p WHERE p.inbox_id = i.id
                AND p.status IN ('sent', 'in_doubt', 'sending') AND p.sending_at > now() - interval '{w}')"""

_INBOX_DAYS_SQL = f"""
    WITH todo AS (
        SELECT m.inbox_id, {expected_parts_sql("c")} AS sends
          FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
          JOIN campaign_configs c ON c.id = r.config_id
         WHERE m.status = 'pending' AND m.scheduled_at < now() + interval '1 day' AND r.status = 'running'
        UNION ALL
        SELECT m.inbox_id, CASE WHEN m.status = 'sending'
                                THEN (SELECT count(*) FROM message_parts mp
                                       WHERE mp.message_id = m.id AND mp.status = 'pending')
                                ELSE {expected_parts_sql("c")} END
          FROM campaign_messages m JOIN campaign_runs r ON r.id = m.run_id
          JOIN campaign_configs c ON c.id = r.config_id
         WHERE m.status IN ('queued', 'generating', 'splitting', 'sending')
    ), planned AS (SELECT inbox_id, sum(sends) AS sends FROM todo GROUP BY inbox_id)
    SELECT i.id, w.name || '/' || i.name, i.max_per_hour, {hourly_cap_sql("i")}, i.max_per_day,
           {daily_cap_sql("i")}, i.warmup_start_per_day, i.warmup_days, i.first_send_at,
           {_SENT_IN.format(w="1 hour")}, {_SENT_IN.format(w="1 day")}, coalesce(pl.sends, 0), now()
      FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id
      LEFT JOIN planned pl ON pl.inbox_id = i.id
     WHERE pl.sends IS NOT NULL
        OR EXISTS (SELECT 1 FROM campaign_config_inboxes ci JOIN campaign_configs cc ON cc.id = ci.config_id
                    WHERE ci.inbox_id = i.id AND cc.active)
        OR EXISTS (SELECT 1 FROM message_parts p WHERE p.inbox_id = i.id
                      AND p.status IN ('sent', 'in_doubt', 'sending') AND p.sending_at > now() - interval '1 day')
     ORDER BY w.name, i.name"""


def inbox_days() -> list[InboxDay]:
    """The capacity of every inbox in use (in an active campaign, with work planned, or sent in 24 h)."""
    out = []
    for row in fetch_all(_INBOX_DAYS_SQL):
        iid, label, mph, hcap, mpd, dcap, w_start, w_days, first, used_h, used_d, planned, now = row
        warm = Warmup(int(w_start), int(w_days)) if w_start is not None and w_days is not None else None
        out.append(
            InboxDay(
                int(iid),
                label,
                mph,
                hcap,
                mpd,
                dcap,
                warm,
                warmup_day(first, now) if warm else None,
                int(used_h),
                int(used_d),
                int(planned),
            )
        )
    return out
