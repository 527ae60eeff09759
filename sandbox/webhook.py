"""The webhook sink: POSTs Evolution event envelopes to ``webhook_url`` (Evolution's global webhook).

A small pool of threads drains bounded queues; every event of one instance goes through the same
thread, so an instance's events arrive in the order they were published (Evolution emits one
instance's events one after the other). Delivery failures are logged and counted, never raised.
Which events go out is ``webhook_events`` in the fault document (Evolution's per-event switches,
``WEBHOOK_EVENTS_*``).
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["WebhookSink"]

logger = logging.getLogger(__name__)


class WebhookSink:
    """Posts envelopes to the fault document's ``webhook_url``; outcomes via ``on_outcome(event, outcome)``."""

    name = "webhook"

    def __init__(
        self,
        *,
        on_outcome: Callable[[str, str], None],
        threads: int = 8,
        max_queue: int = 100_000,
        timeout_s: float = 2.0,
    ) -> None:
        self._on_outcome = on_outcome
        self._queues: list[queue.Queue[tuple[str, dict[str, Any]] | None]] = [
            queue.Queue(maxsize=max(1, max_queue // threads)) for _ in range(threads)
        ]
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=False)
        self._failures_logged = 0
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"webhook-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def accepts(self, event: str, cfg: dict[str, Any]) -> bool:
        """A URL is configured and the event is switched on."""
        return bool(cfg["webhook_url"]) and event in cfg["webhook_events"]

    def submit(self, envelope: dict[str, Any], cfg: dict[str, Any]) -> None:
        """Queue one envelope for the current URL (dropped and counted if that queue is full)."""
        url = cfg["webhook_url"]
        body = {**envelope, "destination": url}
        q = self._queues[zlib.crc32(envelope["instance"].encode()) % len(self._queues)]
        try:
            q.put_nowait((url, body))
        except queue.Full:
            self._on_outcome(envelope["event"], "dropped")

    def view(self) -> dict[str, Any]:
        """Queue depth for the control API."""
        return {"queued": sum(q.qsize() for q in self._queues)}

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads (pending envelopes are abandoned)."""
        self._stop.set()
        for q in self._queues:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
        for t in self._threads:
            t.join(timeout / max(1, len(self._threads)))
        self._client.close()

    def _run(self, q: queue.Queue[tuple[str, dict[str, Any]] | None]) -> None:
        while not self._stop.is_set():
            job = q.get()
            if job is None:
                return
            self._post(*job)

    def _post(self, url: str, body: dict[str, Any]) -> None:
        try:
            response = self._client.post(url, json=body)
            ok = response.status_code < 300
        except httpx.HTTPError as exc:
            ok = False
            detail = type(exc).__name__
        else:
            detail = f"HTTP {response.status_code}"
        self._on_outcome(body["event"], "sent" if ok else "failed")
        if not ok and self._failures_logged < 20:  # a dead receiver must not flood the log
            self._failures_logged += 1
            logger.warning("webhook delivery of %s for %s failed: %s", body["event"], body["instance"], detail)
