"""httpx.MockTransport handlers the clients' unit tests share (a canned answer, a network error)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


def respond(
    status: int, body: Any = None, *, headers: dict[str, str] | None = None, text: str | None = None
) -> Handler:
    """A handler answering every request with ``status`` and a JSON ``body`` (or the raw ``text``)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raise_(exc_type: type[httpx.RequestError]) -> Handler:
    """A handler failing every request with ``exc_type`` (a connect error, a read timeout…)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return handler
