"""Background emission of Evolution ``messages.update`` webhooks (SERVER_ACK -> DELIVERY_ACK -> READ).

A small pool of threads drains a bounded queue; the statuses of one message are posted in order by one
thread, a few ms apart. Delivery failures are logged and counted, never raised.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["WebhookEmitter"]

logger = logging.getLogger(__name__)


class WebhookEmitter:
    """Posts messages.update events for accepted sends to the configured URL."""

    def __init__(
        self,
        *,
        on_outcome: Callable[[str], None],
        server_url: str = "",
        threads: int = 8,
        max_queue: int = 100_000,
    ) -> None:
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max_queue)
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self.server_url = server_url
        self._client = httpx.Client(timeout=httpx.Timeout(2.0), trust_env=False)
        self._threads = [threading.Thread(target=self._run, name=f"webhook-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()
        self._failures_logged = 0

    def emit(
        self,
        *,
        url: str,
        secret: str | None,
        instance: str,
        key_id: str,
        remote_jid: str,
        statuses: list[str],
        gap_s: float,
    ) -> None:
        """Queue the status events of one accepted send (dropped and counted if the queue is full)."""
        try:
            self._queue.put_nowait((url, secret, instance, key_id, remote_jid, list(statuses), gap_s))
        except queue.Full:
            self._on_outcome("dropped")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads (pending events are abandoned)."""
        self._stop.set()
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        for t in self._threads:
            t.join(timeout / max(1, len(self._threads)))
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                return
            url, secret, instance, key_id, remote_jid, statuses, gap_s = job
            for status in statuses:
                if self._stop.wait(gap_s):
                    return
                self._post(url, secret, instance, key_id, remote_jid, status)

    def _post(self, url: str, secret: str | None, instance: str, key_id: str, remote_jid: str, status: str) -> None:
        payload = {
            "event": "messages.update",
            "instance": instance,
            "data": {
                "keyId": key_id,
                "remoteJid": remote_jid,
                "fromMe": True,
                "status": status,
                "instanceId": instance,
            },
            "destination": url,
            "date_time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "sender": remote_jid,
            "server_url": self.server_url,
            "apikey": secret,
        }
        try:
            response = self._client.post(url, json=payload)
            ok = response.status_code < 300
        except httpx.HTTPError as exc:
            ok = False
            detail = type(exc).__name__
        else:
            detail = f"HTTP {response.status_code}"
        self._on_outcome("sent" if ok else "failed")
        if not ok and self._failures_logged < 20:  # a dead receiver must not flood the log
            self._failures_logged += 1
            logger.warning("webhook delivery failed key_id=%s status=%s: %s", key_id, status, detail)
