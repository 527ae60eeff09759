"""webhook.py without a database: a sender trickling its request must not hold a thread (and SIGTERM)
forever (issue 23 second read). The receiver's behaviour on the real PostgreSQL is in
tests/integration/test_webhook.py."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest


@pytest.fixture
def fast_webhook():
    """An in-process receiver whose request head and body each have a 3 s deadline."""
    import webhook

    server = webhook.WebhookServer(
        ("127.0.0.1", 0), "s3cret-" + uuid.uuid4().hex, head_timeout=3.0, body_timeout=3.0, threads=4
    )
    server.start()
    yield server
    # the shutdown waits for open connections: it must not hang on a trickling sender
    closer = threading.Thread(target=server.shutdown, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "shutdown hung on a trickling connection"


def _trickle(sock: socket.socket, head: bytes, byte_every: float, for_seconds: float) -> float | None:
    """Send ``head``, then one body byte every ``byte_every`` s; return when the server closed, or None."""
    started = time.monotonic()
    sock.sendall(head)
    sock.settimeout(byte_every)
    while time.monotonic() - started < for_seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        try:
            sock.sendall(b" ")
        except OSError:
            return time.monotonic() - started
    return None


@pytest.mark.parametrize(
    "head",
    [
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Padding: ",  # headers that never end
    ],
    ids=["trickled-body", "trickled-headers"],
)
def test_webhook_trickling_sender_is_cut_off_at_the_request_deadline(fast_webhook, head):
    """A 15 s socket timeout is per recv: one byte every few seconds kept the connection and its
    thread for as long as the sender liked (256 KiB at 1 B/10 s: a month), and kept SIGTERM's
    server_close waiting for it. Thousands of such connections exhaust the threads."""
    host, port = fast_webhook.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        closed_after = _trickle(sock, head, byte_every=0.3, for_seconds=8.0)
    assert closed_after is not None, "the receiver kept a trickling connection open for 8 s"
    assert closed_after < 5.0, f"closed only after {closed_after:.1f} s (deadline 3 s)"


def test_webhook_silent_connection_is_closed_at_the_head_deadline(fast_webhook):
    """uvicorn arms no timer on a new connection (only between requests): a connection that never
    sends a byte stayed open for ever, and thousands of them exhaust the connection limit."""
    host, port = fast_webhook.server_address[:2]
    with socket.create_connection((host, port), timeout=8) as sock:
        started = time.monotonic()
        try:
            assert sock.recv(4096) == b""
        except ConnectionResetError:
            pass
        closed_after = time.monotonic() - started
    assert 2.0 < closed_after < 5.0, f"closed after {closed_after:.1f} s (deadline 3 s)"
