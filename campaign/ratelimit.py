"""Shared pacing state in PostgreSQL (R-RATE-1): every worker process on every machine sees it.

Per inbox: one send in flight (a lease with an expiry, so a crashed holder cannot block the
inbox forever), a minimum gap between consecutive sends (measured from the end of the last
one), and sliding hour/day caps counted from the inbox's own send history — the effective caps of
:mod:`campaign.capacity` (warm-up ramp, health multiplier; R-HEALTH-1). Per OpenRouter
key: requests per minute. Acquiring is one statement; a refusal says how long to wait.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from campaign.capacity import daily_cap_sql, hourly_cap_sql
from campaign.db import db
from campaign.sql import health_gap_factor

log = logging.getLogger(__name__)


_SENT_WINDOW = """(SELECT count(*) FROM message_parts p WHERE p.inbox_id = i.id
                   AND p.status IN ('sent', 'in_doubt', 'sending') AND p.sending_at > now() - interval '{w}')"""

# A throttled inbox (R-HEALTH-2) has its gap doubled for its cool-down; its caps are halved by
# campaign.capacity's health multiplier (the effective caps: warm-up and health, R-HEALTH-1/2).
_GAP = f"make_interval(secs => i.min_gap_seconds * {health_gap_factor('i')})"
_HOUR_CAP = hourly_cap_sql("i")
_DAY_CAP = daily_cap_sql("i")

#: The inbox's send slot is free (SQL over ``rl`` = its rate_limits row and ``i`` = the inbox): no
#: lease in force, no hold, the gap since the last send over, the effective caps not reached.
#: ONE definition: the acquire below and the send step's claim (pipeline: one statement takes the
#: slot, claims the part and reads the context, T-PERF-7) both test it.
SLOT_FREE = f"""(rl.lease_until IS NULL OR rl.lease_until < now())
  AND (rl.blocked_until IS NULL OR rl.blocked_until <= now())
  AND (rl.last_at IS NULL OR rl.last_at + {_GAP} <= now())
  AND (i.max_per_hour IS NULL OR {_SENT_WINDOW.format(w="1 hour")} < {_HOUR_CAP})
  AND (i.max_per_day IS NULL OR {_SENT_WINDOW.format(w="1 day")} < {_DAY_CAP})"""

#: The slot's holder, whose send has just ended, may keep it for the next part of the same message
#: sent right away (the send step's claim that records the part before, pipeline._SEND_NEXT_SQL):
#: no hold, the inbox's gap zero (counted from the send that just ended), the caps not reached —
#: what SLOT_FREE would say the moment the slot was given back.
SLOT_KEEP = f"""(rl.blocked_until IS NULL OR rl.blocked_until <= now())
  AND {_GAP} = make_interval()
  AND (i.max_per_hour IS NULL OR {_SENT_WINDOW.format(w="1 hour")} < {_HOUR_CAP})
  AND (i.max_per_day IS NULL OR {_SENT_WINDOW.format(w="1 day")} < {_DAY_CAP})"""

#: The SET list taking the slot for the lease %(token)s, %(lease)s seconds long.
TAKE_SLOT = "lease_token = %(token)s, lease_until = now() + make_interval(secs => %(lease)s), updated_at = now()"

_ACQUIRE_INBOX = f"""
UPDATE rate_limits rl SET {TAKE_SLOT}
FROM inboxes i
WHERE rl.key = %(key)s AND i.id = %(inbox)s AND {SLOT_FREE}
RETURNING rl.key"""

#: expected wait when another send of the inbox is in flight (its lease says only the worst case)
IN_FLIGHT_WAIT_SECONDS = 0.1

_INBOX_WAIT = f"""
SELECT rl.key IS NOT NULL,
    coalesce(extract(epoch FROM rl.lease_until - now()), 0)::float,
    coalesce(extract(epoch FROM rl.last_at + {_GAP} - now()), 0)::float,
    greatest(0,
      extract(epoch FROM rl.blocked_until - now()),
      CASE WHEN i.max_per_hour IS NOT NULL AND {_SENT_WINDOW.format(w="1 hour")} >= {_HOUR_CAP} THEN
        extract(epoch FROM (SELECT min(p.sending_at) FROM message_parts p WHERE p.inbox_id = i.id
            AND p.status IN ('sent', 'in_doubt', 'sending') AND p.sending_at > now() - interval '1 hour')
            + interval '1 hour' - now()) END,
      CASE WHEN i.max_per_day IS NOT NULL AND {_SENT_WINDOW.format(w="1 day")} >= {_DAY_CAP} THEN
        extract(epoch FROM (SELECT min(p.sending_at) FROM message_parts p WHERE p.inbox_id = i.id
            AND p.status IN ('sent', 'in_doubt', 'sending') AND p.sending_at > now() - interval '1 day')
            + interval '1 day' - now()) END)::float,
    i.min_gap_seconds * {health_gap_factor("i")}
FROM inboxes i LEFT JOIN rate_limits rl ON rl.key = %(key)s
WHERE i.id = %(inbox)s"""


@dataclass(frozen=True)
class Grant:
    """The result of asking for a slot: a lease token when granted, else the seconds to wait."""

    key: str
    token: str | None
    wait: float = 0.0

    @property
    def granted(self) -> bool:
        return self.token is not None


def inbox_key(inbox_id: int) -> str:
    """The rate-limit key of an inbox."""
    return f"inbox:{inbox_id}"


@functools.lru_cache(maxsize=16)
def openrouter_key(api_key: str) -> str:
    """The rate-limit key of an OpenRouter API key (hashed: keys never stored or logged)."""
    return "openrouter:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def acquire_inbox(inbox_id: int, lease_seconds: float) -> Grant:
    """Take the inbox's send slot if its lease, gap and caps allow; else say how long to wait.

    ``lease_seconds`` must outlast the slowest send, so a live holder never loses the slot; a
    crashed holder's slot frees itself when the lease ends. (The send step takes its slot inside
    its claim statement instead, with :data:`SLOT_FREE`; this is for everything else.)
    """
    key = inbox_key(inbox_id)
    token = str(uuid.uuid4())
    params = {"token": token, "lease": lease_seconds, "key": key, "inbox": inbox_id}
    for _ in range(2):
        if db.execute_sql(_ACQUIRE_INBOX, params).fetchone():
            return Grant(key, token)
        refused = inbox_wait(inbox_id)
        if refused is None:  # the inbox is gone: nothing to pace; the step will settle the message
            return Grant(key, token)
        if refused.wait > 0:
            return refused
    return Grant(key, None, 0.05)


def inbox_wait(inbox_id: int) -> Grant | None:
    """Why the inbox's slot was refused: a Grant without token saying how long to wait (0: its
    rate_limits row was missing and is now there, try again); None when the inbox is gone."""
    key = inbox_key(inbox_id)
    row = db.execute_sql(_INBOX_WAIT, {"key": key, "inbox": inbox_id}).fetchone()
    if row is None:
        return None
    exists, lease_left, gap_left, cap_wait, min_gap = row
    if not exists:
        # every inbox gets its row when it is created (schema V14); this covers one made before
        db.execute_sql("INSERT INTO rate_limits (key) VALUES (%s) ON CONFLICT (key) DO NOTHING", (key,))
        return Grant(key, None, 0.0)
    if cap_wait > 0:
        return Grant(key, None, cap_wait)
    # Another send is in flight: it usually ends within a round trip, then the gap runs.
    # (Its lease is only the worst case: waiting for that would stall the inbox.)
    in_flight = min(lease_left, IN_FLIGHT_WAIT_SECONDS + min_gap) if lease_left > 0 else 0.0
    return Grant(key, None, max(0.01, gap_left, in_flight))


def release_inbox(grant: Grant, *, sent: bool) -> None:
    """Give the slot back; ``sent``: a send was attempted, so the gap counts from now."""
    if not grant.granted:
        return
    db.execute_sql(
        """UPDATE rate_limits SET lease_token = NULL, lease_until = NULL, updated_at = now(),
                          last_at = CASE WHEN %s THEN now() ELSE last_at END
                      WHERE key = %s AND lease_token = %s""",
        (sent, grant.key, grant.token),
    )


#: most requests of a per-minute budget one process takes from PostgreSQL at once (T-PERF-1: one
#: round trip per block instead of per request); small budgets take less (see block_size)
MINUTE_BLOCK = 10
#: local tokens stop being used this long before the database's minute ends (clock-rate slack)
MINUTE_BLOCK_MARGIN_SECONDS = 0.05
#: a wait this short is spent in the worker thread (polling) instead of a round trip through the
#: delay queue: the handover between two sends of one inbox stays fast, and a thread is held for
#: at most this long, so other inboxes are not slowed (R-RATE-3)
IN_THREAD_WAIT_SECONDS = 0.5

# Takes up to %(m_want)s requests of the current minute's budget of %(m_key)s (%(m_limit)s a
# minute), when {gate} holds: CTEs any statement can carry (the generate and split claims take
# their LLM request in the statement that claims the message, T-PERF-7), read back with
# MINUTE_COLUMNS and minute_outcome(). The row is locked (FOR UPDATE) before it is read, so the
# grant is exact under any number of concurrent takers: the minute's count never passes the
# limit. The minute is the later of the row's and this statement's (a statement that waited on
# the lock across a minute boundary must not move the row's minute back). The seconds left in
# that minute are read on the clock AFTER the update: a block is never used past the minute it
# was counted in.
_MINUTE_CTES = """
mcur AS (
    SELECT key, minute_start, minute_count, blocked_until FROM rate_limits
     WHERE key = %(m_key)s AND %(m_want)s > 0 AND ({gate}) FOR UPDATE
), meff AS (
    SELECT key, greatest(minute_start, date_trunc('minute', now())) AS minute,
           CASE WHEN minute_start >= date_trunc('minute', now()) THEN minute_count ELSE 0 END AS used,
           blocked_until > now() AS blocked
    FROM mcur
), mupd AS (
    UPDATE rate_limits rl SET minute_start = meff.minute, updated_at = now(),
        minute_count = meff.used + least(%(m_want)s, %(m_limit)s - meff.used)
    FROM meff WHERE rl.key = meff.key AND meff.used < %(m_limit)s AND meff.blocked IS NOT TRUE
    RETURNING least(%(m_want)s, %(m_limit)s - meff.used) AS n
)"""

#: the columns minute_outcome() reads
MINUTE_COLUMNS = """EXISTS (SELECT 1 FROM mcur) AS m_exists, (SELECT n FROM mupd) AS m_n,
       extract(epoch FROM coalesce((SELECT minute FROM meff), date_trunc('minute', now()))
                          + interval '1 minute' - clock_timestamp())::float AS m_left,
       (SELECT extract(epoch FROM blocked_until - clock_timestamp())::float FROM mcur
         WHERE blocked_until > now()) AS m_blocked"""


def minute_ctes(gate: str = "true") -> str:
    """The CTEs taking a block of a per-minute budget when ``gate`` (SQL) holds (see _MINUTE_CTES)."""
    return _MINUTE_CTES.format(gate=gate)


_TAKE_MINUTE = f"WITH {minute_ctes()} SELECT {MINUTE_COLUMNS}"

_blocks: dict[str, tuple[float, int]] = {}  # key -> (monotonic deadline, requests left) in this process
_holds: dict[str, float] = {}  # key -> monotonic time until which a hold seen by this process lasts
_blocks_lock = threading.Lock()


def block_size(per_minute: int) -> int:
    """How many requests one take asks for: a small budget is shared out one request at a time (a
    block would let one process hog it)."""
    return max(1, min(MINUTE_BLOCK, per_minute // 20))


def minute_params(key: str, per_minute: int, *, take: bool = True) -> dict:
    """The parameters of :func:`minute_ctes` (``take`` False: the CTEs take nothing)."""
    return {"m_key": key, "m_limit": per_minute, "m_want": block_size(per_minute) if take else 0}


def take_local(key: str) -> bool:
    """Spend one request of this process's block of ``key`` (False: none left in this minute)."""
    return reserve_local(key) is not None


def reserve_local(key: str) -> float | None:
    """:func:`take_local`, returning the monotonic deadline of the block the request came from (None:
    none left) — for a request spent later: check :func:`still_usable` before spending it."""
    with _blocks_lock:
        deadline, left = _blocks.get(key, (0.0, 0))
        if left > 0 and time.monotonic() < deadline:
            _blocks[key] = (deadline, left - 1)
            return deadline
        _blocks.pop(key, None)
        return None


def still_usable(key: str, deadline: float) -> bool:
    """Whether a request reserved from a block with ``deadline`` may still be spent: its minute has
    not ended (a block is never used past the minute it was counted in) and no hold of the key
    (a Retry-After, an outage's backoff) started in this process since."""
    now = time.monotonic()
    with _blocks_lock:
        return now < deadline and _holds.get(key, 0.0) <= now


def give_back_local(key: str) -> None:
    """A request taken with :func:`take_local` and not used goes back to the block."""
    with _blocks_lock:
        deadline, left = _blocks.get(key, (0.0, 0))
        if time.monotonic() < deadline:
            _blocks[key] = (deadline, left + 1)


def minute_outcome(key: str, row: dict, asked_at: float) -> Grant | None:
    """The grant of a statement carrying :func:`minute_ctes` (its MINUTE_COLUMNS in ``row``;
    ``asked_at``: monotonic time before the statement). None: the key has no row yet
    (:func:`ensure_minute_row`, then ask again). The rest of a block granted is kept in this
    process for the same minute."""
    if not row["m_exists"]:
        return None
    if row["m_blocked"] is not None:  # a Retry-After (or an outage's backoff) holds the whole key
        return Grant(key, None, max(0.05, float(row["m_blocked"])))
    n, left = row["m_n"], float(row["m_left"])
    if not n:
        return Grant(key, None, max(0.05, left))
    if n > 1:
        deadline = asked_at + left - MINUTE_BLOCK_MARGIN_SECONDS  # errs early, never late
        with _blocks_lock:
            # threads that all found the block empty each took one: keep every request, until
            # the earlier of their deadlines (the same database minute)
            old_deadline, old_left = _blocks.get(key, (deadline, 0))
            _blocks[key] = (min(deadline, old_deadline), old_left + n - 1)
        log.debug("took %s requests of %s's per-minute budget (%.1fs left in the minute)", n, key, left)
    return Grant(key, "minute")


def ensure_minute_row(key: str) -> None:
    """Create the budget row of ``key`` (its first request ever)."""
    db.execute_sql(
        "INSERT INTO rate_limits (key, minute_start, minute_count) "
        "VALUES (%s, date_trunc('minute', now()), 0) ON CONFLICT (key) DO NOTHING",
        (key,),
    )


def acquire_minute(key: str, per_minute: int) -> Grant:
    """Count one request against a per-minute budget shared by every process (R-RATE-1).

    Requests are taken from PostgreSQL in blocks (``MINUTE_BLOCK``) and spent locally, only
    within the database minute they were counted in, so the budget is never exceeded across
    processes; the requests of a block left unused when its minute ends are forgone. Refused
    requests wait for the next minute.
    """
    if take_local(key):
        return Grant(key, "minute")
    params = minute_params(key, per_minute)
    for _ in range(2):
        asked_at = time.monotonic()  # before the statement: the deadline errs early, never late
        cursor = db.execute_sql(_TAKE_MINUTE, params)
        row = dict(zip((d[0] for d in cursor.description), cursor.fetchone(), strict=True))
        grant = minute_outcome(key, row, asked_at)
        if grant is not None:
            return grant
        ensure_minute_row(key)
    return Grant(key, None, 0.05)


def block_scope(key: str, seconds: float) -> None:
    """No request of the scope ``key`` (an inbox, an OpenRouter key) starts for ``seconds`` (R-FAIL-2).

    A provider's Retry-After holds the whole scope it was given for, not just the message that
    got it; so does the backoff of a gateway outage (E-23). Waiting messages are deferred by the
    pacing middleware (never counted as an attempt, R-RATE-2). A hold only ever grows. This
    process's unspent per-minute tokens of the key are dropped; another process may still spend
    the block it already took (at most ``MINUTE_BLOCK`` requests) — each message keeps its own
    Retry-After hold besides (``retry_after_key``), which is exact.
    """
    db.execute_sql(
        """INSERT INTO rate_limits (key, blocked_until) VALUES (%s, now() + make_interval(secs => %s))
                      ON CONFLICT (key) DO UPDATE SET updated_at = now(),
                          blocked_until = greatest(rate_limits.blocked_until, EXCLUDED.blocked_until)""",
        (key, seconds),
    )
    with _blocks_lock:
        _blocks.pop(key, None)
        _holds[key] = max(_holds.get(key, 0.0), time.monotonic() + seconds)


def retry_after_key(message_id: int) -> str:
    """The key holding a campaign message's pending Retry-After (E-10)."""
    return f"retry_after:message:{message_id}"


def hold(key: str, seconds: float) -> None:
    """Nobody calls the provider for ``key`` before ``seconds`` from now (a Retry-After the provider gave).

    Kept in PostgreSQL, not only in the delayed Dramatiq retry: a duplicate delivery of the same
    message (a redelivery after a broker restart or a worker kill) must honour it too.
    """
    db.execute_sql(
        """INSERT INTO rate_limits (key, lease_until) VALUES (%s, now() + make_interval(secs => %s))
                      ON CONFLICT (key) DO UPDATE SET updated_at = now(),
                          lease_until = greatest(rate_limits.lease_until, EXCLUDED.lease_until)""",
        (key, seconds),
    )


def hold_remaining(key: str) -> float:
    """Seconds left of the hold on ``key`` (0 when none)."""
    row = db.execute_sql(
        "SELECT extract(epoch FROM lease_until - now())::float FROM rate_limits WHERE key = %s", (key,)
    ).fetchone()
    return max(0.0, row[0]) if row and row[0] is not None else 0.0


def purge_expired_holds(older_than_seconds: float = 3600) -> int:
    """Delete Retry-After holds that ended long ago (the recovery sweep calls this)."""
    rows = db.execute_sql(
        """DELETE FROM rate_limits WHERE key LIKE 'retry_after:%%'
                             AND lease_until < now() - make_interval(secs => %s) RETURNING key""",
        (older_than_seconds,),
    ).fetchall()
    return len(rows)
