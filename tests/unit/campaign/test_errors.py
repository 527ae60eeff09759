"""campaign.errors: one exception tree, every class documented in one line and drawn in the module docstring;
provider errors keep their attributes across processes (pickle)."""

from __future__ import annotations

import pickle

import pytest

from campaign import errors
from campaign.errors import (
    AuthError,
    BadCompletion,
    BadRequest,
    CreditsExhausted,
    PermanentError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientError,
)


def test_errors_pickle_with_their_attributes() -> None:
    exc = RateLimited("x", provider="openrouter", status_code=429, retry_after=3.0)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is RateLimited
    assert (back.provider, back.status_code, back.retry_after, back.code) == ("openrouter", 429, 3.0, "rate_limited")


def test_exception_tree_and_docstrings() -> None:
    assert issubclass(errors.ConfigError, errors.EngineError)
    assert issubclass(ProviderError, errors.EngineError)
    for cls in (RateLimited, ProviderUnavailable, BadCompletion):
        assert issubclass(cls, TransientError) and cls.retryable
    for perm in (BadRequest, AuthError, CreditsExhausted, errors.UnknownInstance, errors.InvalidNumber):
        assert issubclass(perm, PermanentError) and not perm.retryable
    assert issubclass(errors.AmbiguousSend, ProviderError)
    assert not issubclass(errors.AmbiguousSend, (TransientError, PermanentError))
    for name in errors.__all__:
        doc = getattr(errors, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name
        assert name in errors.__doc__


def test_every_exception_the_engine_raises_on_purpose_is_an_engine_error() -> None:
    """One tree: the chain's signals, the repairs' refusal and the planner's errors included."""
    for name in ("PipelineSignal", "StepFailed", "RetryLater", "Deferred", "RepairRefused", "PlanError"):
        assert issubclass(getattr(errors, name), errors.EngineError), name
    for cls in (errors.StepFailed, errors.RetryLater, errors.Deferred):
        assert issubclass(cls, errors.PipelineSignal) and not issubclass(cls, ProviderError)
    for operator_error in (errors.PlanError, errors.RunStateError):
        assert issubclass(operator_error, errors.ConfigError)  # operator input: the CLI answers exit 2


@pytest.mark.parametrize(
    "cls,code,retryable,pause_reason",
    [
        (RateLimited, "rate_limited", True, None),
        (ProviderUnavailable, "unavailable", True, None),
        (BadCompletion, "bad_completion", True, None),
        (BadRequest, "bad_request", False, None),
        (AuthError, "auth", False, "provider_auth"),
        (CreditsExhausted, "credits", False, "provider_credits"),
        (errors.UnknownInstance, "unknown_instance", False, None),
        (errors.InvalidNumber, "invalid_number", False, None),
        (errors.AmbiguousSend, "ambiguous_send", False, None),
    ],
)
def test_each_provider_error_says_whether_a_retry_helps_and_what_to_pause(cls, code, retryable, pause_reason) -> None:
    """R-FAIL-1: callers ask the class, never the HTTP status; 401 and 402 pause, nothing else does."""
    exc = cls("boom", provider="evolution", status_code=500)
    assert (exc.code, exc.retryable, exc.pause_reason) == (code, retryable, pause_reason)
    assert isinstance(exc, TransientError) is retryable
    assert cls("boom", provider="evolution", code="custom").code == "custom"  # the caller's code wins


def test_a_provider_error_shows_its_message_and_every_attribute() -> None:
    exc = RateLimited("slow down", provider="openrouter", status_code=429, retry_after=2.5)
    assert str(exc) == "slow down"
    assert repr(exc) == (
        "RateLimited(provider='openrouter', status_code=429, code='rate_limited', retry_after=2.5, message='slow down')"
    )


def test_retry_later_and_deferred_carry_their_delay_and_say_why() -> None:
    cause = ProviderUnavailable("502 from the gateway", provider="evolution", status_code=502)
    later = errors.RetryLater(1.5, cause)
    assert (later.delay, later.cause) == (1.5, cause)
    assert str(later) == "retry in 1.50s: 502 from the gateway"
    deferred = errors.Deferred(30, "inbox held by a Retry-After")
    assert deferred.delay == 30 and str(deferred) == "deferred 30.00s: inbox held by a Retry-After"
