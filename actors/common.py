"""What every pipeline actor shares: retry policy, provider clients, RetryLater -> dramatiq.Retry."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import dramatiq
import httpx

import clients
from campaign.errors import Deferred, RetryLater, StepFailed
from campaign.settings import Settings, get_settings

log = logging.getLogger(__name__)


def step_options(settings: Settings, queue: str, *, time_limit_s: int) -> dict:
    """Explicit Dramatiq options of a pipeline step (DESIGN: never the 20-retries/7-days defaults)."""
    hard_cap = settings.max_attempts * 3  # attempts are counted on the row; this bounds a broken DB

    def retry_when(retries: int, exc: BaseException) -> bool:
        return retries < hard_cap

    return dict(
        queue_name=queue,
        max_retries=hard_cap,
        min_backoff=int(settings.min_backoff_seconds * 1000),
        max_backoff=int(settings.max_backoff_seconds * 1000),
        retry_when=retry_when,
        throws=(StepFailed,),  # final: straight to .XQ, no retry
        time_limit=time_limit_s * 1000,
        campaign_step=True,  # DeadLetters records and settles it when it dies
    )


def as_dramatiq_retry(func: Callable) -> Callable:
    """Turn the pipeline's RetryLater(delay) into dramatiq.Retry(delay=ms): quiet, backoff as computed.

    Deferred(delay) is a wait that spends no attempt (a scope's Retry-After, a gateway outage's
    hold): a fresh copy of the message is enqueued with that delay, outside Dramatiq's retry
    budget, and this delivery ends normally (acked after the publish was confirmed).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RetryLater as exc:
            raise dramatiq.Retry(str(exc), delay=max(1, int(exc.delay * 1000))) from exc
        except Deferred as exc:
            actor = dramatiq.get_broker().get_actor(func.__name__)
            actor.send_with_options(args=args, kwargs=kwargs, delay=max(1, int(exc.delay * 1000)))
            log.debug("%s%s deferred %.2fs", func.__name__, args, exc.delay)

    return wrapper


def openrouter():
    """The process's shared OpenRouter client."""
    s = get_settings()
    return clients.get_openrouter(
        s.openrouter_base_url,
        s.openrouter_api_key,
        timeout=httpx.Timeout(connect=5.0, read=s.llm_timeout_seconds, write=10.0, pool=5.0),
    )


def evolution():
    """The process's shared Evolution API client."""
    s = get_settings()
    return clients.get_evolution(
        s.evolution_api_url,
        s.evolution_api_key,
        timeout=httpx.Timeout(connect=5.0, read=s.send_timeout_seconds, write=10.0, pool=5.0),
    )
