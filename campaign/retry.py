"""The retry schedule every provider call of the engine shares (R-FAIL-2): exponential backoff with
full jitter, never below a provider's Retry-After. Generation, split, send and reply triage read it
here, so they can never disagree."""

from __future__ import annotations

import random

from campaign.settings import Settings

__all__ = ["backoff_seconds"]


def backoff_seconds(
    attempt: int, settings: Settings, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter for ``attempt`` (1-based), never below Retry-After."""
    draw = (rng or random).random()
    ceiling = min(settings.max_backoff_seconds, settings.min_backoff_seconds * 2 ** (attempt - 1))
    delay = settings.min_backoff_seconds + draw * max(0.0, ceiling - settings.min_backoff_seconds)
    if retry_after is not None:
        # Retry-After is a floor, not a suggestion (E-10); a little slack for clock skew.
        delay = max(delay, retry_after + 0.05)
    return min(delay, max(settings.max_backoff_seconds, (retry_after or 0) + 0.05))
