"""The number-health state machine (SPEC R-HEALTH-2), table-driven: every transition and every
"stay" of :func:`campaign.health.decide`, at and around its thresholds."""

from __future__ import annotations

import datetime as dt

import pytest

from campaign import health
from campaign.health import Evidence, Thresholds, decide
from campaign.settings import Settings

UTC = dt.UTC
NOW = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
H = dt.timedelta(hours=1)
TH = Thresholds()  # the documented defaults: 5 and 5 %, 15 and 15 %, 24 h


def ev(errors: int, sends: int, refusals: int = 0, last: dt.timedelta | None = dt.timedelta(minutes=-1)) -> Evidence:
    """Evidence of the hour before NOW; ``last``: the last problem relative to NOW (None: none ever)."""
    any_problem = errors or refusals
    return Evidence(errors, refusals, sends, NOW - H, NOW, NOW + last if (last is not None and any_problem) else None)


def quiet(last: dt.timedelta) -> Evidence:
    """An empty hour, the last problem ``last`` ago (negative)."""
    return Evidence(0, 0, 40, NOW - H, NOW, NOW + last)


LATER = NOW + dt.timedelta(hours=5)
FRESH = NOW + 24 * H  # a transition: the cool-down starts now
PUSHED = NOW - dt.timedelta(minutes=1) + 24 * H  # staying: 24 h after the last problem (a minute ago)

# (case, state, until, evidence, new state, changed, new until): a transition starts the cool-down
# at NOW; staying throttled/restricted pushes its end to 24 h after the last problem
CASES = [
    # healthy
    ("healthy, nothing happened", "healthy", None, ev(0, 100), "healthy", False, None),
    ("healthy, 4 errors = 100 % but under the count", "healthy", None, ev(4, 4), "healthy", False, None),
    ("healthy, 5 errors of 101 sends < 5 %", "healthy", None, ev(5, 101), "healthy", False, None),
    (
        "healthy, 5 errors of 100 sends = 5 %: throttled",
        "healthy",
        None,
        ev(5, 100),
        "throttled",
        True,
        FRESH,
    ),
    (
        "healthy, 3 errors + 2 refusals count together",
        "healthy",
        None,
        ev(3, 40, refusals=2),
        "throttled",
        True,
        FRESH,
    ),
    (
        "healthy, 15 errors of 100: straight to restricted",
        "healthy",
        None,
        ev(15, 100),
        "restricted",
        True,
        FRESH,
    ),
    (
        "healthy, 15 errors of 101 sends: only throttled",
        "healthy",
        None,
        ev(15, 101),
        "throttled",
        True,
        FRESH,
    ),
    # throttled
    (
        "throttled, still erring under restrict: stays, cool-down pushed",
        "throttled",
        NOW + H,
        ev(6, 100),
        "throttled",
        False,
        PUSHED,
    ),
    (
        "throttled, 15 of 100: restricted",
        "throttled",
        NOW + H,
        ev(15, 100),
        "restricted",
        True,
        FRESH,
    ),
    ("throttled, cool-down not over", "throttled", NOW + H, quiet(-23 * H), "throttled", False, NOW + H),
    (
        "throttled, cool-down over, last error 24 h ago: healthy",
        "throttled",
        NOW,
        quiet(-24 * H),
        "healthy",
        True,
        None,
    ),
    (
        "throttled, until passed but an error 23 h ago: stays",
        "throttled",
        NOW - H,
        quiet(-23 * H),
        "throttled",
        False,
        NOW + H,
    ),
    (
        "throttled, until passed, no error known: healthy",
        "throttled",
        NOW - H,
        Evidence(0, 0, 0, NOW - H, NOW),
        "healthy",
        True,
        None,
    ),
    # restricted
    (
        "restricted, errors still coming: stays, cool-down pushed",
        "restricted",
        NOW + H,
        ev(20, 20),
        "restricted",
        False,
        PUSHED,
    ),
    ("restricted, quiet but cool-down not over", "restricted", LATER, quiet(-20 * H), "restricted", False, LATER),
    ("restricted, cool-down over with no new error: healthy", "restricted", NOW, quiet(-25 * H), "healthy", True, None),
]


@pytest.mark.parametrize(
    ("state", "until", "evidence", "new", "changed", "new_until"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_transitions(state, until, evidence, new, changed, new_until):
    """R-HEALTH-2: healthy -> throttled -> restricted on the thresholds; back only after the cool-down."""
    d = decide(state, until, evidence, NOW, TH)
    assert (d.state, d.changed, d.until) == (new, changed, new_until)
    if changed:
        assert d.reason and d.check in health.CHECKS


def test_every_row_of_the_table_is_exercised():
    """Each (from, check, to) row of TRANSITIONS is taken by at least one case above."""
    taken = set()
    for _, state, until, evidence, *_ in CASES:
        d = decide(state, until, evidence, NOW, TH)
        if d.changed:
            taken.add((state, d.check, d.state))
    assert taken == set(health.TRANSITIONS)


def test_the_reason_carries_the_evidence():
    d = decide("healthy", None, ev(5, 100), NOW, TH)
    assert d.reason == "5 delivery error(s) + 0 refused send(s) of 100 attempt(s) in the last hour (5%; limit 5 and 5%)"
    assert decide("throttled", NOW, quiet(-25 * H), NOW, TH).reason == "cool-down of 24 h ended with no new error"


def test_ratio_never_exceeds_one_when_receipts_trail_their_sends():
    """Errors of parts sent before the hour: the attempts are at least the problems."""
    e = ev(7, 2)
    assert (e.attempts, e.ratio) == (7, 1.0)
    assert Evidence(0, 0, 0, NOW - H, NOW).ratio == 0.0


def test_unknown_state_is_refused():
    with pytest.raises(ValueError, match="unknown health state 'sick'"):
        decide("sick", None, ev(0, 0), NOW, TH)


def test_thresholds_come_from_settings_and_must_be_ordered():
    s = Settings(health_throttle_errors=2, health_restrict_errors=3, health_cooldown_hours=0.5)
    assert Thresholds.of(s) == Thresholds(2, 0.05, 3, 0.15, dt.timedelta(minutes=30))
    assert Thresholds.of(Settings()) == TH
    from campaign.errors import ConfigError

    with pytest.raises(ConfigError, match="HEALTH_RESTRICT_ERRORS must not be below HEALTH_THROTTLE_ERRORS"):
        Settings(health_throttle_errors=20)
    with pytest.raises(ConfigError, match="HEALTH_COOLDOWN_HOURS"):
        Settings.from_env({"HEALTH_COOLDOWN_HOURS": "0"})


def test_can_send():
    """Disabled or restricted: the number may not send (campaign.sql.INBOX_CAN_SEND also checks the connection)."""
    assert health.can_send(False, "healthy") and health.can_send(False, "throttled")
    assert not health.can_send(False, "restricted") and not health.can_send(True, "healthy")
