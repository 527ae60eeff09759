"""A webhook receiver for the sandbox's tests: collects the JSON bodies the sandbox POSTs."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """A webhook receiver collecting the JSON bodies it is sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.cond:
                    receiver.events.append(body)
                    receiver.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(
        self, pred: int | Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """The bodies so far, once ``pred`` holds (an int: that many bodies) or ``timeout`` passed."""
        if isinstance(pred, int):
            n = pred
            pred = lambda events: len(events) >= n  # noqa: E731
        with self.cond:
            self.cond.wait_for(lambda: pred(self.events), timeout)
            return list(self.events)

    def of(self, event: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e["event"] == event]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
