"""Provider clients (OpenRouter, Evolution API) and the per-process client cache.

One httpx connection pool per process, shared by every worker thread: ``get_openrouter`` and
``get_evolution`` build a client the first time they see a (base_url, api_key, timeout) and return the
same object afterwards. The cache is dropped in a forked child (``os.register_at_fork``): sockets
inherited from the parent must not be shared across processes. Plain arguments on purpose, so this
package never imports the settings module.
"""

from __future__ import annotations

import os
import threading

import httpx

from clients.evolution import EvolutionClient, SendResult, normalize_number
from clients.http import parse_retry_after
from clients.openrouter import Completion, OpenRouterClient

__all__ = [
    "OpenRouterClient",
    "Completion",
    "EvolutionClient",
    "SendResult",
    "normalize_number",
    "parse_retry_after",
    "get_openrouter",
    "get_evolution",
    "close_clients",
]

_lock = threading.Lock()
_cache: dict[tuple, OpenRouterClient | EvolutionClient] = {}


def _timeout_key(timeout: httpx.Timeout | None) -> tuple | None:
    return None if timeout is None else (timeout.connect, timeout.read, timeout.write, timeout.pool)


def _as_timeout(timeout: httpx.Timeout | float | None) -> httpx.Timeout | None:
    if timeout is None or isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def get_openrouter(base_url: str, api_key: str, *, timeout: httpx.Timeout | float | None = None) -> OpenRouterClient:
    """The process-wide OpenRouter client for this base URL, key and timeout."""
    t = _as_timeout(timeout)
    key = ("openrouter", base_url.rstrip("/"), api_key, _timeout_key(t))
    with _lock:
        client = _cache.get(key)
        if client is None:
            client = OpenRouterClient(base_url, api_key, **({"timeout": t} if t is not None else {}))
            _cache[key] = client
        return client  # type: ignore[return-value]


def get_evolution(base_url: str, api_key: str, *, timeout: httpx.Timeout | float | None = None) -> EvolutionClient:
    """The process-wide Evolution API client for this base URL, key and timeout."""
    t = _as_timeout(timeout)
    key = ("evolution", base_url.rstrip("/"), api_key, _timeout_key(t))
    with _lock:
        client = _cache.get(key)
        if client is None:
            client = EvolutionClient(base_url, api_key, **({"timeout": t} if t is not None else {}))
            _cache[key] = client
        return client  # type: ignore[return-value]


def close_clients() -> None:
    """Close and forget every cached client (worker shutdown, tests)."""
    with _lock:
        clients = list(_cache.values())
        _cache.clear()
    for client in clients:
        client.close()


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's clients without closing its sockets, and renew the lock."""
    global _lock, _cache
    _lock = threading.Lock()
    _cache = {}


os.register_at_fork(after_in_child=_reset_after_fork)
