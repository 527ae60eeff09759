"""Run the sandbox as a subprocess (``python -m sandbox``) from tests, the demo and the benchmarks.

with SandboxProcess(seed=1) as sb:
    client = OpenRouterClient(sb.openrouter_url, sb.chat_key)
    sb.set_faults(chat={"rate_429": 0.5}, retry_after=0.2)
    ...
    assert sb.summary()["early_retries"] == 0

with SandboxProcess(events_amqp_url=amqp_url, webhook_url=receiver_url) as sb:
    sb.inbound(instance="acme-1", number="5511987654321", text="PARE", lid=True)
    sb.set_connection("acme-1", "close")
    sb.events()["counts"]          # what went to which sink
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import httpx

from sandbox import DEFAULT_CHAT_KEY, DEFAULT_EVOLUTION_KEY, READY_PREFIX

__all__ = ["SandboxProcess", "SandboxStartError"]

logger = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_live: weakref.WeakSet[SandboxProcess] = weakref.WeakSet()


class SandboxStartError(RuntimeError):
    """The sandbox subprocess did not come up."""


class SandboxProcess:
    """A ``python -m sandbox`` subprocess on a free port, with helpers for its control API."""

    def __init__(
        self,
        *,
        faults: dict[str, Any] | None = None,
        seed: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        chat_key: str = DEFAULT_CHAT_KEY,
        evolution_key: str = DEFAULT_EVOLUTION_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "WARNING",
        startup_timeout: float = 15.0,
        python: str = sys.executable,
        events_amqp_url: str | None = None,
        events_exchange: str | None = None,
        events_prefix: str | None = None,
        events_amqp_retry_seconds: float | None = None,
        events_amqp_publishers: int | None = None,
    ) -> None:
        self.chat_key = chat_key
        self.evolution_key = evolution_key
        self._args = [
            python,
            "-m",
            "sandbox",
            "--host",
            host,
            "--port",
            str(port),
            "--seed",
            str(seed),
            "--chat-key",
            chat_key,
            "--evolution-key",
            evolution_key,
            "--log-level",
            log_level,
        ]
        if faults:
            self._args += ["--faults", json.dumps(faults)]
        if webhook_url:
            self._args += ["--webhook-url", webhook_url]
        if webhook_secret:
            self._args += ["--webhook-secret", webhook_secret]
        for option, value in (
            ("--events-amqp-url", events_amqp_url),
            ("--events-exchange", events_exchange),
            ("--events-prefix", events_prefix),
            ("--events-amqp-retry-seconds", events_amqp_retry_seconds),
            ("--events-amqp-publishers", events_amqp_publishers),
        ):
            if value is not None:
                self._args += [option, str(value)]
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> SandboxProcess:
        """Start the subprocess and wait until it answers its health route."""
        if self._proc is not None:
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self._proc = subprocess.Popen(
            self._args, cwd=_REPO_ROOT, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        _live.add(self)
        try:
            self.url = self._read_ready_line()
            self._http = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)
            deadline = time.monotonic() + self._startup_timeout
            while True:
                try:
                    if self._http.get("/__sandbox/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SandboxStartError("sandbox did not answer /__sandbox/health")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        logger.debug("sandbox pid=%s at %s", self._proc.pid, self.url)
        return self

    def _read_ready_line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self._startup_timeout
        buf = b""
        try:
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._proc.poll() is not None:
                    raise SandboxStartError(f"sandbox did not start (exit code {self._proc.poll()})")
                if sel.select(min(remaining, 0.2)):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        raise SandboxStartError(f"sandbox exited (code {self._proc.wait(1)})")
                    buf += chunk
        finally:
            sel.close()
        line = buf.split(b"\n", 1)[0].decode().strip()
        if not line.startswith(READY_PREFIX + " "):
            raise SandboxStartError(f"unexpected first line from the sandbox: {line[:200]!r}")
        return line.split(" ", 1)[1]

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the subprocess (SIGKILL after ``timeout``); returns its exit code."""
        if self._http is not None:
            self._http.close()
            self._http = None
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """Process id of the running sandbox."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def openrouter_url(self) -> str:
        """Base URL to give OpenRouterClient (``{url}/api/v1``)."""
        return f"{self.url}/api/v1"

    @property
    def evolution_url(self) -> str:
        """Base URL to give EvolutionClient."""
        return self.url

    # -- control API ------------------------------------------------------------------------------

    def _control(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._http is None:
            raise RuntimeError("sandbox not started")
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ValueError(f"sandbox control {method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def set_faults(
        self, patch: dict[str, Any] | None = None, /, *, replace: bool = False, **fields: Any
    ) -> dict[str, Any]:
        """Merge-patch the faults (dict and/or keywords; None restores a default); returns the full faults."""
        doc = {**(patch or {}), **fields}
        return self._control("POST", "/__sandbox/faults", params={"replace": "1"} if replace else None, json=doc)

    def faults(self) -> dict[str, Any]:
        """Current faults (secrets masked)."""
        return self._control("GET", "/__sandbox/faults")

    def ledger(self, since: int = 0, *, limit: int | None = None, entries: bool = True) -> dict[str, Any]:
        """Ledger entries with seq > since ({"requests", "sends", "summary"}); entries=False: summary only."""
        params: dict[str, Any] = {"since": since}
        if limit is not None:
            params["limit"] = limit
        if not entries:
            params["entries"] = "0"
        return self._control("GET", "/__sandbox/ledger", params=params)

    def summary(self) -> dict[str, Any]:
        """Ledger summary counters only."""
        return self.ledger(entries=False)["summary"]

    def reset(self, *, keep_faults: bool = False) -> None:
        """Clear the ledger; restore the start-up faults unless keep_faults."""
        self._control("POST", "/__sandbox/reset", json={"keep_faults": keep_faults})

    def inbound(self, **fields: Any) -> dict[str, Any]:
        """Publish a scripted inbound messages.upsert (see sandbox.replies); returns its key_id and data."""
        return self._control("POST", "/__sandbox/inbound", json=fields)

    def inbound_many(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Publish many scripted inbound messages in one request (all validated first)."""
        return self._control("POST", "/__sandbox/inbound", json=messages)["messages"]

    def set_connection(self, instance: str, state: str, status_reason: int | None = None) -> dict[str, Any]:
        """Put an instance "open", "close" or "connecting" (a connection.update goes out if it changed)."""
        body: dict[str, Any] = {"instance": instance, "state": state}
        if status_reason is not None:
            body["status_reason"] = status_reason
        return self._control("POST", "/__sandbox/connection", json=body)

    def events(self) -> dict[str, Any]:
        """The event sinks (RabbitMQ connection, queues), pending events and counts per sink and event."""
        return self._control("GET", "/__sandbox/events")


@atexit.register
def _stop_leftovers() -> None:
    for sb in list(_live):
        sb.stop(timeout=2.0)
