"""campaign.errors: one exception tree, every class documented in one line and drawn in the module docstring;
provider errors keep their attributes across processes (pickle)."""

from __future__ import annotations

import pickle

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
    for cls in (BadRequest, AuthError, CreditsExhausted, errors.UnknownInstance, errors.InvalidNumber):
        assert issubclass(cls, PermanentError) and not cls.retryable
    assert issubclass(errors.AmbiguousSend, ProviderError)
    assert not issubclass(errors.AmbiguousSend, (TransientError, PermanentError))
    for name in errors.__all__:
        doc = getattr(errors, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name
        assert name in errors.__doc__
