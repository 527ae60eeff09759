"""The engine's exception tree.

Everything the engine raises on purpose derives from :class:`EngineError`.
Provider errors are classified once, at the client boundary (SPEC R-FAIL-1),
so callers only ever ask "can a retry help?" (``isinstance(exc, TransientError)``)
and never look at HTTP status codes themselves::

    EngineError                      base of everything the engine raises on purpose
     ├─ ConfigError                  bad settings / bad operator input
     │   ├─ PlanError, RunStateError, InboxCommandError, TemplateError, LeadImportError,
     │   │  LeadNotFound, RunNotFound, DeadLetterUsageError
     │   └─ ConfigFileError          an invalid TOML file (every problem by key path)
     │       └─ ConcurrentChangeError
     ├─ PipelineSignal               a step tells its actor how the delivery ends
     │   ├─ StepFailed, RetryLater, Deferred
     ├─ RepairRefused                an operator repair does not apply
     ├─ BrokerNotSetUp               dramatiq's implicit default broker would lose messages
     ├─ DemoError                    the demo cannot run (says what to do)
     ├─ ServicesError                a throw-away database / vhost / worker step failed (devtools)
     ├─ EnvelopeError                an inbound Evolution event is malformed (also a ValueError)
     └─ ProviderError                an external provider call failed
         ├─ TransientError           a retry can help
         │   ├─ RateLimited          429 (or 402 carrying Retry-After)
         │   ├─ ProviderUnavailable  5xx, 408, connect/pool errors, timeouts before the request was processed
         │   └─ BadCompletion        200 with finish_reason "error" / choices[0].error / empty content
         ├─ PermanentError           a retry cannot help
         │   ├─ BadRequest           400/403/404 and other unexpected 4xx (generic)
         │   ├─ AuthError            401: pause every run using that key/inbox (provider_auth)
         │   ├─ CreditsExhausted     402 without Retry-After: pause (provider_credits)
         │   ├─ UnknownInstance      Evolution 404 for the instance
         │   └─ InvalidNumber        Evolution 400 with response.message[*].exists == false
         └─ AmbiguousSend            sendText outcome unknown: never retried automatically (in_doubt)

Every :class:`ProviderError` carries ``provider`` ("openrouter" | "evolution"),
``status_code`` (int or None), ``retry_after`` (seconds, float or None) and ``code``
(a short machine-readable class such as "rate_limited" or "invalid_number").

Messages never contain API keys or URL passwords: the clients redact them
before building the exception (see ``clients.http.redact``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EngineError",
    "ConfigError",
    "ProviderError",
    "TransientError",
    "RateLimited",
    "ProviderUnavailable",
    "BadCompletion",
    "PermanentError",
    "BadRequest",
    "AuthError",
    "CreditsExhausted",
    "UnknownInstance",
    "InvalidNumber",
    "AmbiguousSend",
    "EnvelopeError",
    "DeadLetterUsageError",
    "RunNotFound",
    "ConfigFileError",
    "ConcurrentChangeError",
    "LeadImportError",
    "LeadNotFound",
    "TemplateError",
    "InboxCommandError",
    "BrokerNotSetUp",
    "DemoError",
    "ServicesError",
]


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class ConfigError(EngineError):
    """Bad settings or bad operator input."""


class ProviderError(EngineError):
    """An external provider call failed."""

    #: short machine-readable class used when the caller gives none
    default_code: str = "provider_error"
    #: whether an automatic retry may help
    retryable: bool = False
    #: run pause reason this error calls for (SPEC R-FAIL-1), None = no pause
    pause_reason: str | None = None

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status_code = status_code
        self.retry_after = retry_after
        self.code = code or self.default_code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(provider={self.provider!r}, status_code={self.status_code!r}, "
            f"code={self.code!r}, retry_after={self.retry_after!r}, message={self.message!r})"
        )

    def __reduce__(
        self,
    ) -> tuple[Any, ...]:  # keep the keyword-only attributes through pickling (Dramatiq, multiprocessing)
        return (
            _rebuild,
            (type(self), self.message, self.provider, self.status_code, self.retry_after, self.code),
        )


def _rebuild(
    cls: type[ProviderError],
    message: str,
    provider: str,
    status_code: int | None,
    retry_after: float | None,
    code: str,
) -> ProviderError:
    """Unpickle a ProviderError subclass."""
    return cls(message, provider=provider, status_code=status_code, retry_after=retry_after, code=code)


class TransientError(ProviderError):
    """A retry can help."""

    default_code = "transient"
    retryable = True


class RateLimited(TransientError):
    """The provider asked us to slow down (429, or 402 carrying Retry-After)."""

    default_code = "rate_limited"


class ProviderUnavailable(TransientError):
    """5xx, 408, connect/pool errors or timeouts where the request surely was not processed."""

    default_code = "unavailable"


class BadCompletion(TransientError):
    """A 200 answer that carries an error or empty content."""

    default_code = "bad_completion"


class PermanentError(ProviderError):
    """A retry cannot help."""

    default_code = "permanent"


class BadRequest(PermanentError):
    """The provider rejected the request (400/403/404 and other 4xx)."""

    default_code = "bad_request"


class AuthError(PermanentError):
    """The API key was refused (401): callers pause every run using that key/inbox."""

    default_code = "auth"
    pause_reason = "provider_auth"


class CreditsExhausted(PermanentError):
    """402 without Retry-After: callers pause every run using that key."""

    default_code = "credits"
    pause_reason = "provider_credits"


class UnknownInstance(PermanentError):
    """Evolution answered 404 for the instance."""

    default_code = "unknown_instance"


class InvalidNumber(PermanentError):
    """The number is not on WhatsApp (Evolution 400 with exists == false) or is not a number."""

    default_code = "invalid_number"


class AmbiguousSend(ProviderError):
    """The sendText outcome is unknown (the request may have been accepted): never retried automatically."""

    default_code = "ambiguous_send"


# -- the chain and the operator repairs -------------------------------------------------------


class PipelineSignal(EngineError):
    """What a step raises to tell its actor how the delivery ends (retry, defer, dead-letter)."""


class StepFailed(PipelineSignal):
    """A step's retries are exhausted or its failure is final: dead-letter the Dramatiq message."""


class RetryLater(PipelineSignal):
    """Raised by a step to be retried after ``delay`` seconds; the attempt was counted on the row
    (the actor turns it into dramatiq.Retry)."""

    def __init__(self, delay: float, cause: BaseException) -> None:
        super().__init__(f"retry in {delay:.2f}s: {cause}")
        self.delay = delay
        self.cause = cause


class Deferred(PipelineSignal):
    """Raised by a step that must wait ``delay`` seconds without spending an attempt (a scope's
    Retry-After, a gateway outage's hold): the actor re-enqueues a fresh copy with that delay,
    outside Dramatiq's retry budget (R-RATE-2)."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(f"deferred {delay:.2f}s: {why}")
        self.delay = delay


class RepairRefused(EngineError):
    """An operator repair does not apply to the message as it is now; nothing was changed."""


# -- planning and run transitions ----------------------------------------------------------------


class PlanError(ConfigError):
    """A run cannot be planned (unknown config, window closed, already planned today...)."""


class RunStateError(ConfigError):
    """An operator transition found the run in another state (e.g. pause of a completed run)."""


class EnvelopeError(EngineError, ValueError):
    """An inbound Evolution event is not a usable envelope (the text names the field, never its value)."""


# -- operator tools and devtools (raised on bad operator input; exit 2 with the text) ----------


class DeadLetterUsageError(ConfigError):
    """The command line asks for something inconsistent (exit 2)."""


class RunNotFound(ConfigError):
    """The run id given to ``report`` does not exist."""


class ConfigFileError(ConfigError):
    """The TOML file is invalid; ``errors`` lists every problem as ``key.path: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)


class ConcurrentChangeError(ConfigFileError):
    """A campaign changed between validation and write (optimistic lock on ``version``)."""


class LeadImportError(ConfigError):
    """The CSV file as a whole cannot be imported (nothing was written)."""


class LeadNotFound(ConfigError):
    """LEAD names no lead (or more than one: the message lists the choices)."""


class TemplateError(ConfigError, ValueError):
    """A fallback template uses something :func:`render_template` does not implement."""


class InboxCommandError(ConfigError):
    """An inbox command cannot apply: unknown or ambiguous inbox name, missing reason."""


class BrokerNotSetUp(EngineError, RuntimeError):
    """Nothing set up the engine's broker: dramatiq's default one would publish to the wrong place."""


class DemoError(EngineError):
    """The demo cannot run (a service, a file or a setting is wrong); the text says what to do."""


class ServicesError(EngineError, RuntimeError):
    """A service a test run, benchmark or the demo needs does not answer or refuses a step (devtools)."""
