"""Provider clients (OpenRouter, Evolution API) and the per-process client cache.

One client (and so one httpx connection pool) per thread: ``get_openrouter`` and ``get_evolution``
build a client the first time a thread asks for a (base_url, api_key, timeout) and return the same object
to that thread afterwards. Not one per process: httpcore 1.0.9's pool, shared between threads, can close
a connection another thread has just started a request on (encode/httpcore#1110, unfixed in a release):
the request fails with ``ReadError: [Errno 9] Bad file descriptor`` after it may have reached the
server, so a WhatsApp send became ``in_doubt``. Threads are few and long-lived (worker threads); all
clients share one TLS context (``clients.http.shared_ssl_context``), so a client costs a few KiB, and
the clients of a thread that ended are closed the next time a client is built. The cache is dropped in a
forked child (``os.register_at_fork``): sockets inherited from the parent must not be shared across
processes. Plain arguments on purpose, so this package never imports the settings module.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

import httpx

from clients import evolution, openrouter
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


class _Closeable(Protocol):
    """What the cache needs of a client: closing it when its thread is gone."""

    def close(self) -> None: ...


_lock = threading.Lock()
#: (kind, base_url, api_key, timeout, thread ident) -> (client, the thread that owns it)
_cache: dict[tuple, tuple[_Closeable, weakref.ref[threading.Thread]]] = {}

_C = TypeVar("_C", bound=_Closeable)


def _timeout_key(timeout: httpx.Timeout | None) -> tuple | None:
    return None if timeout is None else (timeout.connect, timeout.read, timeout.write, timeout.pool)


def _as_timeout(timeout: httpx.Timeout | float | None) -> httpx.Timeout | None:
    if timeout is None or isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def _thread_client(key: tuple, build: Callable[[], _C]) -> _C:
    """This thread's client for ``key``, built on first use (clients of ended threads are closed then)."""
    thread = threading.current_thread()
    full_key = (*key, threading.get_ident())
    with _lock:
        entry = _cache.get(full_key)
        if entry is not None and entry[1]() is thread:
            return cast(_C, entry[0])  # the key's kind decided the type when ``build`` made it
        # a new thread (or a thread id reused after its first owner ended): drop what dead threads left
        dead = [k for k, (_, ref) in _cache.items() if (t := ref()) is None or not t.is_alive() or k == full_key]
        stale = [_cache.pop(k)[0] for k in dead]
        client = build()
        _cache[full_key] = (client, weakref.ref(thread))
    for old in stale:  # their threads are gone: nobody is using them
        old.close()
    return client


def get_openrouter(base_url: str, api_key: str, *, timeout: httpx.Timeout | float | None = None) -> OpenRouterClient:
    """This thread's OpenRouter client for this base URL, key and timeout."""
    t = _as_timeout(timeout)
    return _thread_client(
        ("openrouter", base_url.rstrip("/"), api_key, _timeout_key(t)),
        lambda: OpenRouterClient(base_url, api_key, timeout=openrouter.DEFAULT_TIMEOUT if t is None else t),
    )


def get_evolution(base_url: str, api_key: str, *, timeout: httpx.Timeout | float | None = None) -> EvolutionClient:
    """This thread's Evolution API client for this base URL, key and timeout."""
    t = _as_timeout(timeout)
    return _thread_client(
        ("evolution", base_url.rstrip("/"), api_key, _timeout_key(t)),
        lambda: EvolutionClient(base_url, api_key, timeout=evolution.DEFAULT_TIMEOUT if t is None else t),
    )


def close_clients() -> None:
    """Close and forget every cached client of every thread (worker shutdown, tests)."""
    with _lock:
        clients = [client for client, _ in _cache.values()]
        _cache.clear()
    for client in clients:
        client.close()


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's clients without closing its sockets, and renew the lock."""
    global _lock, _cache
    _lock = threading.Lock()
    _cache = {}


os.register_at_fork(after_in_child=_reset_after_fork)
