"""Delivery webhook receiver (SPEC R-OPS-5, T-SEC-1) on real PostgreSQL, as a real process.

The receiver runs as ``python webhook.py --port 0`` against this session's database; the tests
post to it over HTTP and read the parts back. Its stderr goes to a file that the last test greps
for the secret.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import selectors
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests import ROOT
from tests.integration import factories as f
from webhook import openapi_document

# its last tests read what the earlier ones left (the fuzz tallies, the receiver's log): the module
# runs whole, in order, in one process (make test runs it after the parallel part)
pytestmark = pytest.mark.in_order

SECRET = "whsec-" + "".join(random.choices(string.ascii_letters + string.digits, k=24))
WRONG = "wrong-" + "".join(random.choices(string.ascii_letters, k=24))
INSTANCE = "acme-1"  # the instance of make_parts' inbox, named by envelope()
RANK = {None: 0, "server_ack": 1, "delivered": 2, "read": 3}
MAPPED = {"SERVER_ACK": "server_ack", "DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read"}


# -- the receiver process -------------------------------------------------------------------------


class Receiver:
    """A ``python webhook.py`` subprocess on a free port."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "webhook.py", "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )
        self.url = self._ready_url()
        self.http = httpx.Client(
            base_url=self.url,
            timeout=10.0,
            trust_env=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )

    def _ready_url(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf, deadline = b"", time.monotonic() + timeout
        try:
            while b"\n" not in buf:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"webhook receiver did not start (exit {self.proc.poll()}): {self.log_path.read_text()[-2000:]}"
                    )
                if sel.select(0.2):
                    buf += os.read(self.proc.stdout.fileno(), 4096)
        finally:
            sel.close()
        line = buf.split(b"\n", 1)[0].decode()
        assert line.startswith("webhook listening on http://"), line
        return line.rsplit(" ", 1)[1]

    def post(
        self,
        body: Any,
        *,
        secret: str | None = SECRET,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST an envelope (its apikey set to ``secret`` unless raw bytes are given)."""
        if raw is None:
            if isinstance(body, dict) and secret is not None:
                body = {**body, "apikey": secret}
            raw = json.dumps(body).encode()
        return self.http.post(
            "/webhook", content=raw, params=params, headers={"Content-Type": "application/json", **(headers or {})}
        )

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "DEBUG", **extra})
    return env


@pytest.fixture(scope="module")
def receiver(services, tmp_path_factory) -> Iterator[Receiver]:
    """One receiver process for the module, secret SECRET, logging at DEBUG to a file."""
    r = Receiver(tmp_path_factory.mktemp("webhook") / "webhook.log", _env(WEBHOOK_SECRET=SECRET))
    try:
        yield r
    finally:
        assert r.stop() == 0, "the receiver must stop cleanly on SIGTERM"


# -- rows ------------------------------------------------------------------------------------------


def make_parts(n: int, *, prefix: str | None = None, instance: str = INSTANCE) -> list[Any]:
    """``n`` sent parts (one message each) with unique provider ids, sent by ``instance``."""
    from models import MessagePart

    ws, cols = f.workspace()
    ibx = f.inbox(ws, instance_name=instance)
    run = f.run(f.config(ws, ibx, cols["New"], cols["Contacted"]))
    prefix = prefix or f"KEY{random.randrange(10**9):09d}"
    now = dt.datetime.now(dt.UTC)
    parts = []
    for i in range(n):
        msg = f.message(run, f.lead(ws, cols["New"]), status="sent", sent_at=now)
        parts.append(
            MessagePart.create(
                message=msg,
                inbox=ibx,
                idx=0,
                text=f"hello {i}",
                status="sent",
                sent_at=now,
                provider_message_id=f"{prefix}-{i}",
            )
        )
    return parts


def part_state(part_id: int) -> tuple[str | None, Any, Any]:
    """(delivery_status, delivery_updated_at, delivery_error_at) read fresh from PostgreSQL."""
    from campaign.db import db

    return db.execute_sql(
        "SELECT delivery_status, delivery_updated_at, delivery_error_at FROM message_parts WHERE id = %s", (part_id,)
    ).fetchone()


def envelope(key_id: str, status: str, **over: Any) -> dict[str, Any]:
    """A messages.update envelope as Evolution v2 posts it (apikey added by Receiver.post)."""
    doc = {
        "event": "messages.update",
        "instance": INSTANCE,
        "data": {
            "keyId": key_id,
            "remoteJid": "5511987654321@s.whatsapp.net",
            "fromMe": True,
            "status": status,
            "instanceId": "4f1c-instance-uuid",
        },
        "date_time": "2026-01-05T12:00:00.000Z",
        "destination": "http://x/webhook",
        "sender": "5511987654321@s.whatsapp.net",
        "server_url": "http://evolution",
    }
    doc.update(over)
    return doc


# -- secret ----------------------------------------------------------------------------------------


def test_wrong_secret_is_401_and_changes_nothing(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    key = part.provider_message_id
    attempts = [
        receiver.post(envelope(key, "READ"), secret=WRONG),
        receiver.post(envelope(key, "READ"), secret=None, params={"secret": WRONG}),
        receiver.post(envelope(key, "READ"), secret=None, headers={"Authorization": f"Bearer {WRONG}"}),
        receiver.post(envelope(key, "READ"), secret=None, headers={"X-Webhook-Secret": WRONG}),
        receiver.post(envelope(key, "READ"), secret=SECRET[:-1]),  # a prefix is not the secret
        receiver.post(envelope(key, "READ"), secret=SECRET + "x"),
        receiver.post(envelope(key, "ERROR"), secret=WRONG),
    ]
    for response in attempts:
        assert response.status_code == 401, response.text
        assert response.json() == {"error": "missing or wrong webhook secret"}
        assert SECRET not in response.text
    assert part_state(part.id) == (None, None, None)


def test_missing_secret_is_401(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    env = envelope(part.provider_message_id, "DELIVERY_ACK")
    assert receiver.post(env, secret=None).status_code == 401
    assert receiver.post({**env, "apikey": None}, secret=None).status_code == 401
    assert receiver.post({**env, "apikey": 12345}, secret=None).status_code == 401
    assert receiver.post(env, secret=None, headers={"Authorization": "Bearer"}).status_code == 401
    assert receiver.post(env, secret="").status_code == 401
    # unauthenticated garbage learns nothing about the parser: 401, not 400
    assert receiver.post(None, raw=b"{not json").status_code == 401
    assert part_state(part.id) == (None, None, None)


@pytest.mark.parametrize("transport", ["envelope", "query", "bearer", "header", "query+wrong_apikey"])
def test_each_secret_transport_is_accepted(receiver, clean_db, transport: str) -> None:
    (part,) = make_parts(1)
    env = envelope(part.provider_message_id, "DELIVERY_ACK")
    response = {
        "envelope": lambda: receiver.post(env),
        "query": lambda: receiver.post(env, secret=None, params={"secret": SECRET}),
        "bearer": lambda: receiver.post(env, secret=None, headers={"Authorization": f"Bearer {SECRET}"}),
        "header": lambda: receiver.post(env, secret=None, headers={"X-Webhook-Secret": SECRET}),
        # a real Evolution puts its instance token in apikey; the URL secret still authenticates
        "query+wrong_apikey": lambda: receiver.post(env, secret="instance-token", params={"secret": SECRET}),
    }[transport]()
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "updated"
    assert part_state(part.id)[0] == "delivered"


# -- status rules ----------------------------------------------------------------------------------


def test_out_of_order_and_duplicates_end_on_the_highest(receiver, clean_db) -> None:
    a, b, c = make_parts(3)
    # READ first, then the late ones: nothing moves after READ
    r = receiver.post(envelope(a.provider_message_id, "READ"))
    assert r.json() == {
        "result": "updated",
        "delivery_status": "read",
        "part_id": a.id,
        "message_id": a.message_id,
        "run_id": a.message.run_id,
    }
    first_read = part_state(a.id)
    for status in ("DELIVERY_ACK", "SERVER_ACK", "READ", "PLAYED", "DELIVERY_ACK"):
        r = receiver.post(envelope(a.provider_message_id, status))
        assert r.status_code == 200 and r.json()["result"] == "unchanged", (status, r.text)
        assert r.json()["delivery_status"] == "read"
    assert part_state(a.id) == first_read  # not even the timestamp moved

    # in order, each step is an upgrade; a duplicate is not
    seen = []
    for status in ("SERVER_ACK", "SERVER_ACK", "DELIVERY_ACK", "DELIVERY_ACK", "READ"):
        seen.append(receiver.post(envelope(b.provider_message_id, status)).json()["result"])
        assert part_state(b.id)[0] == MAPPED[status]
    assert seen == ["updated", "unchanged", "updated", "unchanged", "updated"]

    # PLAYED (voice notes) counts as read
    assert receiver.post(envelope(c.provider_message_id, "PLAYED")).json()["delivery_status"] == "read"
    assert part_state(c.id)[0] == "read"


def test_error_is_recorded_without_downgrading(receiver, clean_db) -> None:
    from models import CampaignEvent

    a, b = make_parts(2)
    receiver.post(envelope(a.provider_message_id, "DELIVERY_ACK"))
    r = receiver.post(envelope(a.provider_message_id, "ERROR"))
    assert r.status_code == 200 and r.json()["result"] == "updated", r.text
    status, _, error_at = part_state(a.id)
    assert status == "delivered" and error_at is not None
    events = list(CampaignEvent.select().where(CampaignEvent.step == "delivery"))
    assert len(events) == 1
    assert events[0].message_id == a.message_id and events[0].level == "warning"
    assert events[0].details["part_id"] == a.id and events[0].details["delivery_status"] == "delivered"
    # a duplicate ERROR records nothing new; a later READ still upgrades
    assert receiver.post(envelope(a.provider_message_id, "ERROR")).json()["result"] == "unchanged"
    assert part_state(a.id)[2] == error_at
    assert receiver.post(envelope(a.provider_message_id, "READ")).json()["result"] == "updated"
    assert part_state(a.id)[0] == "read"
    assert CampaignEvent.select().where(CampaignEvent.step == "delivery").count() == 1
    # ERROR before any ack: status stays empty
    receiver.post(envelope(b.provider_message_id, "ERROR"))
    assert part_state(b.id)[0] is None and part_state(b.id)[2] is not None


def test_error_receipts_over_the_webhook_throttle_the_inbox(receiver, clean_db) -> None:
    """R-HEALTH-2 on the webhook path: once the 5th delivery ERROR is committed, the receiver evaluates the
    inbox's health (in a transaction of its own): throttled, with an event carrying the evidence."""
    from models import Inbox, MessagePart

    parts = make_parts(6)
    inbox_id = MessagePart.get_by_id(parts[0].id).inbox_id
    for part in parts[:4]:
        assert receiver.post(envelope(part.provider_message_id, "ERROR")).json()["result"] == "updated"
    assert Inbox.get_by_id(inbox_id).health_state == "healthy"
    receiver.post(envelope(parts[4].provider_message_id, "ERROR"))
    assert Inbox.get_by_id(inbox_id).health_state == "throttled"
    from campaign.db import db

    (details,) = db.execute_sql("SELECT details FROM campaign_events WHERE step = 'health'").fetchone()
    assert (details["from"], details["to"], details["evidence"]["errors"]) == ("healthy", "throttled", 5)


def test_unknown_id_and_other_events_are_acknowledged_and_ignored(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    r = receiver.post(envelope("NOT-OURS-123", "READ"))
    assert r.status_code == 200 and r.json()["result"] == "unknown"
    r = receiver.post(envelope("NOT-OURS-123", "ERROR"))
    assert r.status_code == 200 and r.json()["result"] == "unknown"
    # the listening events are handled now (R-IN-1): an instance that is no inbox changes nothing,
    # a malformed message names its field
    r = receiver.post({"event": "connection.update", "instance": "nobody-1", "data": {"state": "open"}})
    assert r.status_code == 200 and r.json()["result"] == "unknown_instance", r.text
    r = receiver.post({"event": "messages.upsert", "instance": "acme-1", "data": {"key": {"id": "X"}}})
    assert r.status_code == 400 and "data.key.remoteJid" in r.text, r.text
    for doc in (
        {"event": "send.message", "instance": "acme-1", "data": {"key": {"id": part.provider_message_id}}},
        envelope(part.provider_message_id, "PENDING"),
        envelope(part.provider_message_id, "DELETED"),
        envelope(
            part.provider_message_id,
            "READ",
            data={"keyId": part.provider_message_id, "status": "READ", "fromMe": False, "remoteJid": "x"},
        ),
    ):
        r = receiver.post(doc)
        assert r.status_code == 200 and r.json()["result"] == "ignored", (doc, r.text)
    assert part_state(part.id) == (None, None, None)
    # Evolution's other spellings of the event name are the same event
    r = receiver.post(envelope(part.provider_message_id, "SERVER_ACK", event="MESSAGES_UPDATE"))
    assert r.json()["result"] == "updated"
    r = receiver.http.post(
        "/webhook/messages-update", params={"secret": SECRET}, json=envelope(part.provider_message_id, "DELIVERY_ACK")
    )
    assert r.json()["result"] == "updated" and part_state(part.id)[0] == "delivered"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'"messages.update"', "must be a JSON object"),
        (b'{"data": {}}', "'event'"),
        (b'{"event": "messages.update"}', "'data'"),
        (b'{"event": "messages.update", "data": []}', "'data'"),
        (b'{"event": "messages.update", "data": {"status": "READ"}}', "'data.keyId'"),
        (b'{"event": "messages.update", "data": {"keyId": 42, "status": "READ"}}', "'data.keyId'"),
        (b'{"event": "messages.update", "data": {"keyId": "   ", "status": "READ"}}', "'data.keyId'"),
        (b'{"event": "messages.update", "data": {"keyId": "K"}}', "'data.status'"),
        (b'{"event": "messages.update", "data": {"keyId": "K", "status": "SEEN"}}', "'data.status' must be one of"),
        (b'{"event": "messages.update", "data": {"keyId": "K", "status": "READ", "fromMe": "yes"}}', "'data.fromMe'"),
        (b'{"event": "messages.update", "instance": 7, "data": {"keyId": "K", "status": "READ"}}', "'instance'"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting deeper than the parser's stack
        (b'{"event": "messages.update", "data": {"keyId": "K\\u0000", "status": "READ"}}', "NUL"),
        (b'{"event": "messages.update", "data": {"keyId": "K\\ud800", "status": "READ"}}', "lone surrogate"),
    ],
)
def test_malformed_body_is_400_with_reason(receiver, clean_db, raw: bytes, reason: str) -> None:
    (part,) = make_parts(1)
    raw = raw.replace(b'"K"', json.dumps(part.provider_message_id).encode())
    r = receiver.post(None, raw=raw, params={"secret": SECRET})
    assert r.status_code in (400, 413), r.text
    assert reason in r.json()["error"]
    assert part_state(part.id) == (None, None, None)


def _raw_request(receiver: Receiver, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes on a fresh connection; the status line of the answer (b"" if none)."""
    import socket

    host, port = receiver.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
    return answer.split(b"\r\n", 1)[0]


def test_content_length_must_be_one_plain_number(receiver, clean_db) -> None:
    """Issue 23 item 8 (R-OPS-5): duplicate, signed or underscored lengths (all of which int()
    accepted) and Transfer-Encoding are refused: they are how request smuggling starts. The HTTP
    parser (llhttp) refuses the first three and Transfer-Encoding beside Content-Length with a 400
    before the application runs; Transfer-Encoding alone reaches the application: 411."""
    (part,) = make_parts(1)
    body = json.dumps({**envelope(part.provider_message_id, "READ"), "apikey": SECRET}).encode()
    n = len(body)
    assert n >= 100
    bad = {
        b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n): b"400",
        b"Content-Length: +%d\r\n" % n: b"400",
        b"Content-Length: %s_%s\r\n" % (str(n)[:1].encode(), str(n)[1:].encode()): b"400",
        b"Content-Length: %d\r\nTransfer-Encoding: identity\r\n" % n: b"400",
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % n: b"400",
    }
    for headers, code in bad.items():
        status = _raw_request(receiver, b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", body)
        assert status.startswith(b"HTTP/1.1 " + code), (headers, status)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (n, body)  # a well-formed chunked body, still refused
    status = _raw_request(receiver, b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", chunked)
    assert status.startswith(b"HTTP/1.1 411"), status
    assert part_state(part.id) == (None, None, None)
    ok = _raw_request(receiver, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n, body)
    assert ok.startswith(b"HTTP/1.1 200"), ok
    assert part_state(part.id)[0] == "read"


@pytest.mark.parametrize("field", ["instance", "data.remoteJid", "data.keyId", "event"])
def test_overlong_envelope_fields_are_400_and_never_logged(receiver, clean_db, field: str) -> None:
    """Issue 23 item 1 (R-OPS-5): a 250 KB field is refused by its length before anything logs it
    (it used to be logged at INFO and stall every request thread in the redactor)."""
    (part,) = make_parts(1)
    doc = envelope(part.provider_message_id, "READ")
    huge = "Z" * 250_000
    if field in ("instance", "event"):
        doc[field] = huge
    else:
        doc["data"][field.split(".")[1]] = huge
    r = receiver.post(doc)
    assert r.status_code == 400 and f"'{field}' is longer than" in r.json()["error"], r.text[:300]
    assert len(r.content) < 300
    assert part_state(part.id) == (None, None, None)
    time.sleep(0.2)
    assert "Z" * 300 not in receiver.log_path.read_text(errors="replace")


def test_receipt_of_another_instance_never_touches_a_part(receiver, clean_db) -> None:
    """Issue 23 item 7 (T-SEC-1, R-OPS-5): receipts are matched on (instance, keyId); an event
    naming another workspace's instance used to change this part and record an error under it."""
    from models import CampaignEvent

    (mine,) = make_parts(1, instance="acme-1")
    (theirs,) = make_parts(1, instance="other-1")
    for status in ("READ", "ERROR", "DELIVERY_ACK"):
        r = receiver.post(envelope(mine.provider_message_id, status, instance="other-1"))
        assert r.status_code == 200 and r.json()["result"] == "unknown", r.text
    assert part_state(mine.id) == (None, None, None)
    assert CampaignEvent.select().where(CampaignEvent.step == "delivery").count() == 0
    # the same key id from the instance that sent it lands; the other workspace's part does not move
    assert receiver.post(envelope(mine.provider_message_id, "ERROR", instance="acme-1")).json()["result"] == "updated"
    assert receiver.post(envelope(mine.provider_message_id, "READ", instance="acme-1")).json()["result"] == "updated"
    assert part_state(mine.id)[0] == "read" and part_state(theirs.id) == (None, None, None)
    (event,) = CampaignEvent.select().where(CampaignEvent.step == "delivery")
    assert event.details["instance"] == "acme-1" and event.message_id == mine.message_id
    # without an instance there is nothing to match on: 400 naming the field
    r = receiver.post({k: v for k, v in envelope(theirs.provider_message_id, "READ").items() if k != "instance"})
    assert r.status_code == 400 and "'instance'" in r.json()["error"]
    assert part_state(theirs.id) == (None, None, None)


def test_length_and_routes(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    body = json.dumps({**envelope(part.provider_message_id, "READ"), "apikey": SECRET}).encode()
    assert receiver.http.post("/elsewhere", content=body).status_code == 404
    wrong_method = receiver.http.get("/webhook")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST", wrong_method.text
    assert wrong_method.json() == {"error": "method GET not allowed on /webhook: POST only"}
    assert receiver.http.post("/healthz", content=body).status_code == 405

    def chunks() -> Iterator[bytes]:
        yield body  # a generator body is sent chunked, without Content-Length

    assert receiver.http.post("/webhook", content=chunks()).status_code == 411
    assert part_state(part.id) == (None, None, None)
    assert receiver.http.get("/healthz").status_code == 200  # still serving


def test_healthz(receiver, clean_db) -> None:
    r = receiver.http.get("/healthz")
    assert r.status_code == 200
    from models.schema import LATEST

    assert r.json() == {"status": "ok", "schema": LATEST}


# -- load --------------------------------------------------------------------------------------------


def test_burst_of_1000_concurrent_updates(receiver, clean_db) -> None:
    parts = make_parts(250)
    rng = random.Random(6)
    expected: dict[int, str] = {}
    updates: list[tuple[str, str]] = []
    for p in parts:
        statuses = [rng.choice(["SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED"]) for _ in range(4)]
        updates += [(p.provider_message_id, s) for s in statuses]
        expected[p.id] = max((MAPPED[s] for s in statuses), key=RANK.__getitem__)
    rng.shuffle(updates)
    assert len(updates) == 1000

    def post(update: tuple[str, str]) -> int:
        return receiver.post(envelope(*update)).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, updates))
    elapsed = time.perf_counter() - started
    print(f"\nwebhook burst: 1000 updates from 16 threads in {elapsed:.2f}s ({1000 / elapsed:.0f}/s)")
    assert codes == [200] * 1000
    from campaign.db import db

    got = dict(
        db.execute_sql(
            "SELECT id, delivery_status FROM message_parts WHERE id = ANY(%s)", ([p.id for p in parts],)
        ).fetchall()
    )
    assert got == expected


def test_kept_alive_requests_are_not_stalled_by_delayed_acks(receiver) -> None:
    """R-OPS-5 "answers 2xx fast": uvicorn writes a response's head and body separately; on a
    socket without TCP_NODELAY (asyncio sets it only when the listening socket says IPPROTO_TCP)
    every answer on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    import http.client

    host, port = receiver.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times = []
    try:
        for _ in range(21):
            started = time.perf_counter()
            conn.request("POST", "/webhook", body=b'{"event": "x.y"}', headers={"X-Webhook-Secret": SECRET})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["result"] == "ignored"
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    assert sorted(times)[10] < 0.025, f"median {sorted(times)[10] * 1000:.1f} ms on a kept-alive connection"


def test_concurrent_duplicates_of_one_part_never_downgrade(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    statuses = ["READ"] * 20 + ["DELIVERY_ACK"] * 60 + ["SERVER_ACK"] * 60
    random.Random(2).shuffle(statuses)
    barrier = threading.Barrier(16)

    def post(chunk: list[str]) -> list[str]:
        barrier.wait()
        return [receiver.post(envelope(part.provider_message_id, s)).json()["result"] for s in chunk]

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(post, [statuses[i::16] for i in range(16)]) for r in rs]
    assert part_state(part.id)[0] == "read"
    # at most one upgrade per rank (server_ack, delivered, read) can ever succeed
    assert 1 <= results.count("updated") <= 3
    assert results.count("unchanged") == len(statuses) - results.count("updated")


# -- fuzz ----------------------------------------------------------------------------------------------


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@hsettings(max_examples=300, deadline=None)
@given(
    doc=_json_values
    | st.fixed_dictionaries(
        {"event": st.sampled_from(["messages.update", "MESSAGES_UPDATE", "x"]) | _json_values},
        optional={
            "data": st.fixed_dictionaries(
                {},
                optional={
                    "keyId": st.text(max_size=300) | _json_values,
                    "status": st.sampled_from(["READ", "ERROR", "PENDING", "read", "bogus"]) | _json_values,
                    "fromMe": st.booleans() | _json_values,
                    "remoteJid": _json_values,
                },
            )
            | _json_values,
            "instance": _json_values,
        },
    )
)
def test_parse_envelope_never_raises_anything_but_envelope_error(doc: Any) -> None:
    from campaign.inbound import ConnectionChange, InboundMessage
    from webhook import DeliveryUpdate, EnvelopeError, parse_envelope

    try:
        out = parse_envelope(doc)
    except EnvelopeError as exc:
        assert str(exc)
    else:
        assert isinstance(out, (DeliveryUpdate, InboundMessage, ConnectionChange, str))
        if isinstance(out, DeliveryUpdate):
            assert out.key_id.strip() and len(out.key_id) <= 256


_LONG = st.text(max_size=40) | st.builds(lambda c, n: c * n, st.sampled_from("aZ9é/:@ "), st.integers(150, 2000))


@hsettings(max_examples=300, deadline=None)
@given(
    event=st.sampled_from(["messages.update", "MESSAGES_UPDATE"]) | _LONG,
    instance=st.none() | _LONG,
    key_id=_LONG,
    remote_jid=st.none() | _LONG,
    status=st.sampled_from(["READ", "ERROR", "SERVER_ACK"]) | _LONG,
)
@example(event="messages.update", instance="a" * 250_000, key_id="K1", remote_jid=None, status="READ")
@example(event="messages.update", instance="acme-1", key_id="K1", remote_jid="5" * 65_000, status="ERROR")
def test_parsed_envelope_fields_are_bounded_and_errors_never_echo_them(
    event, instance, key_id, remote_jid, status
) -> None:
    """Issue 23 item 1 (T-SEC-1, R-OPS-5): whatever lengths arrive, an accepted update carries only
    bounded fields (they go into log lines), and a rejection's reason is short."""
    from webhook import (
        MAX_INSTANCE_LENGTH,
        MAX_JID_LENGTH,
        MAX_KEY_ID_LENGTH,
        DeliveryUpdate,
        EnvelopeError,
        parse_envelope,
    )

    doc = {
        "event": event,
        "instance": instance,
        "data": {"keyId": key_id, "remoteJid": remote_jid, "status": status, "fromMe": True},
    }
    try:
        out = parse_envelope(doc)
    except EnvelopeError as exc:
        assert len(str(exc)) < 200
        return
    if isinstance(out, str):
        assert len(out) < 200
        return
    assert isinstance(out, DeliveryUpdate)
    assert 0 < len(out.instance) <= MAX_INSTANCE_LENGTH and out.instance.strip()
    assert 0 < len(out.key_id) <= MAX_KEY_ID_LENGTH
    assert out.remote_jid is None or len(out.remote_jid) <= MAX_JID_LENGTH


def _garbage(rng: random.Random, key: str) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:
        text = json.dumps({**envelope(key, "READ"), "apikey": SECRET})
        cut = rng.randrange(len(text))
        return (text[:cut] + rng.choice(["", "}", "\x00", "\ud800", "{{"]) + text[cut + 1 :]).encode(
            "utf-8", "surrogatepass"
        )
    if kind == 2:
        value: Any = rng.choice([None, 1, -1.5, "x", [], {}, True, "\u0000", "é" * 50, 10**30])
        doc = envelope(key, rng.choice(["READ", "SERVER_ACK", "ERROR", "bogus"]))
        target = rng.choice(["event", "data", "instance", "keyId", "status", "fromMe", "remoteJid"])
        (doc if target in doc else doc["data"])[target] = value
        return json.dumps(doc).encode()
    if kind == 3:
        return ("[" * rng.randrange(1, 5000)).encode()
    if kind == 4:
        return (
            json.dumps({"event": "messages.update", "data": {"keyId": "\ud800" + key, "status": "READ"}})
            .encode("utf-8", "surrogatepass")
            .replace(b"\\ud800", b"\\udc00\\ud800")
        )
    return json.dumps(rng.choice([None, 0, "", [], {}, [{}], {"data": None}, {"event": None}])).encode()


def test_fuzzed_bodies_never_crash_the_server(receiver, clean_db) -> None:
    (part,) = make_parts(1)
    rng = random.Random(1234)
    codes: dict[int, int] = {}
    for _ in range(400):
        raw = _garbage(rng, part.provider_message_id)
        r = receiver.post(None, raw=raw, params={"secret": SECRET})
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400), (raw[:200], r.status_code, r.text)
        assert "error" in r.json() or "result" in r.json()
    assert codes.get(400, 0) > 100, codes  # the fuzz really hit the validator
    assert receiver.proc.poll() is None
    assert receiver.http.get("/healthz").status_code == 200
    # the part only ever went up, and a valid update still works afterwards
    assert part_state(part.id)[0] in (None, "server_ack", "delivered", "read")
    assert receiver.post(envelope(part.provider_message_id, "READ")).status_code == 200
    assert part_state(part.id)[0] == "read"


FUZZ_KEYS = [f"FUZZKEY-{i}" for i in range(4)]
# The document the receiver serves at GET /openapi.json (fuzz_parts checks it is this one), loaded
# at import: schemathesis' lazy loader (pytest.from_fixture) fails on pytest 9's node ids.
_fuzz_schema = schemathesis.openapi.from_dict(openapi_document())
_fuzzed: dict[str, dict[Any, int]] = {}  # operation -> status code (and 200 result) -> count


@pytest.fixture
def fuzz_parts(receiver, clean_db) -> None:
    """Four sent parts of INSTANCE, key ids FUZZ_KEYS, for the fuzzed updates to reach."""
    make_parts(len(FUZZ_KEYS), prefix="FUZZKEY")
    served = receiver.http.get("/openapi.json")
    assert served.status_code == 200 and served.json() == openapi_document()


@_fuzz_schema.parametrize()
@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_document_fuzzed_against_the_running_receiver(case: Any, receiver, fuzz_parts) -> None:
    """R-OPS-5, T-SEC-1: schemathesis generates requests from the receiver's OpenAPI document
    (envelopes of every documented event, schema-invalid bodies, undeclared methods) and sends
    them, authenticated, to the real receiver on this run's PostgreSQL. No 5xx (503 means a
    database outage and the database is up); every answer is documented and matches its schema;
    schema-invalid bodies are refused; an undeclared method is 405. Not checked: that every
    schema-valid body is accepted (positive_data_acceptance): JSON Schema cannot say "no NUL" or
    "not blank" the way Python's str.strip() means it, and the receiver refuses those with 400."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and "keyId" in body["data"]:
        # half the time a key id this instance really sent, so updates reach parts, not only "unknown"
        pick = len(json.dumps(body, default=str)) % (2 * len(FUZZ_KEYS))
        if pick < len(FUZZ_KEYS):
            body["data"]["keyId"], body["instance"] = FUZZ_KEYS[pick], INSTANCE
    response = case.call(base_url=receiver.url, headers={"X-Webhook-Secret": SECRET}, timeout=10)
    seen = _fuzzed.setdefault(case.operation.label, {})
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    if response.status_code == 200 and "result" in response.json():
        seen[response.json()["result"]] = seen.get(response.json()["result"], 0) + 1
    assert response.status_code < 500, (response.status_code, response.text[:300])
    case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])


def test_openapi_fuzz_reached_the_database(receiver) -> None:
    """The fuzz above (run just before) exercised the receiver: updates recorded, envelopes refused,
    other events ignored, /healthz answered; and it is still serving."""
    posted: dict[Any, int] = {}
    for label, counts in _fuzzed.items():
        if label.startswith("POST"):
            for key, n in counts.items():
                posted[key] = posted.get(key, 0) + n
    assert posted.get("updated", 0) >= 1 and posted.get("ignored", 0) >= 10, _fuzzed
    assert posted.get(400, 0) >= 10, _fuzzed
    assert _fuzzed["GET /healthz"].get(200, 0) >= 1, _fuzzed
    assert receiver.proc.poll() is None and receiver.http.get("/healthz").status_code == 200


def test_raw_socket_garbage_never_crashes_the_server(receiver, clean_db) -> None:
    import socket

    host, port = receiver.url.removeprefix("http://").split(":")
    for payload in (
        b"GARBAGE\r\n\r\n",
        b"POST /webhook?secret=" + SECRET.encode() + b" extra HTTP/1.1\r\n\r\n",
        b"POST /webhook?secret=" + SECRET.encode() + b" HTTP/9\r\n\r\n",
        b'POST /webhook HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"short"',
        b"POST /webhook HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"\x00" * 3000,
    ):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            try:
                while chunk := s.recv(4096):  # until the receiver closes
                    answer += chunk
            except OSError:
                pass
        if b"99999999" in payload:
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert answer.endswith(b'{"error":"body larger than 262144 bytes"}'), answer
            assert b"connection: close" in answer.lower(), answer
        if b"-5" in payload:
            assert answer.startswith(b"HTTP/1.1 400"), answer
    assert receiver.proc.poll() is None
    assert receiver.http.get("/healthz").status_code == 200


def test_a_65_kb_request_line_at_debug_is_logged_bounded_and_masked(receiver, clean_db) -> None:
    """Issue 23 item 1: at DEBUG, http.server logged a malformed request line whole; 65 KB of it went
    through the quadratic redactor (no secret needed). The parser now refuses it with a 400 and one
    short line that carries none of it."""
    line = b"POST /webhook?secret=" + SECRET.encode() + b"&x=" + b"Q7" * 32_500 + b" junk HTTP/1.1\r\n"
    assert len(line) > 65_000
    assert _raw_request(receiver, line + b"Host: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert receiver.http.get("/healthz").status_code == 200
    time.sleep(0.3)
    text = receiver.log_path.read_text(errors="replace")
    assert "Invalid HTTP request received" in text
    assert "Q7Q7" not in text and SECRET not in text


def test_request_head_over_64_kib_is_431(receiver, clean_db) -> None:
    """R-OPS-5: llhttp keeps an unfinished header in memory however long it grows; the receiver
    answers 431 once a request head passes 64 KiB, whether it arrives in one piece or trickles."""
    (part,) = make_parts(1)
    body = json.dumps({**envelope(part.provider_message_id, "READ"), "apikey": SECRET}).encode()
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nX-Padding: %s\r\n\r\n"
    status = _raw_request(receiver, head % (len(body), b"p" * 70_000), body)
    assert status.startswith(b"HTTP/1.1 431"), status
    # never finished: 40 KiB pieces of one header value, the head never completes
    import socket

    host, port = receiver.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /webhook HTTP/1.1\r\nX-Padding: ")
        answer = b""
        try:
            for _ in range(10):
                s.sendall(b"p" * 40_000)
                time.sleep(0.05)
        except OSError:
            pass  # closed on us, as it should be
        try:
            answer = s.recv(4096)
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert part_state(part.id) == (None, None, None)
    assert receiver.http.get("/healthz").status_code == 200


# -- end to end with the sandbox ------------------------------------------------------------------------


def test_sandbox_emits_and_receiver_records_delivered_and_read(receiver, clean_db) -> None:
    from clients.evolution import EvolutionClient
    from models import MessagePart
    from sandbox.testing import SandboxProcess

    ws, cols = f.workspace()
    ibx = f.inbox(ws, instance_name="acme-e2e")
    run = f.run(f.config(ws, ibx, cols["New"], cols["Contacted"]))
    leads = [f.lead(ws, cols["New"], phone=f"+5511987650{i:03d}") for i in range(2)]
    parts = [
        MessagePart.create(
            message=f.message(run, ld, status="sending"), inbox=ibx, idx=0, text=f"hello {ld.name}", status="pending"
        )
        for ld in leads
    ]
    # statuses start 300 ms after the accepted send, as a real phone's acks trail the send; the
    # test stores key.id right after the call, as the send actor does
    with (
        SandboxProcess(
            webhook_url=f"{receiver.url}/webhook",
            webhook_secret=SECRET,
            faults={"webhook_gap_ms": 300, "webhook_statuses": ["SERVER_ACK", "DELIVERY_ACK"]},
        ) as sb,
        EvolutionClient(sb.evolution_url, sb.evolution_key) as evo,
    ):
        expected = {}
        for part, ld, final in zip(parts, leads, ("delivered", "read")):
            if final == "read":
                sb.set_faults(webhook_statuses=["SERVER_ACK", "DELIVERY_ACK", "READ"])
            result = evo.send_text(ibx.instance_name, ld.phone, part.text)
            MessagePart.update(status="sent", sent_at=dt.datetime.now(dt.UTC), provider_message_id=result.key_id).where(
                MessagePart.id == part.id
            ).execute()
            expected[part.id] = final
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = {p.id: part_state(p.id)[0] for p in parts}
            if got == expected and sb.summary()["webhooks"].get("sent", 0) >= 5:
                break
            time.sleep(0.1)
        assert got == expected
        hooks = sb.summary()["webhooks"]
        assert hooks.get("sent") == 5 and not hooks.get("failed"), hooks
        keys = {e["key_id"] for e in sb.ledger()["sends"]}
        assert keys == {MessagePart.get_by_id(p.id).provider_message_id for p in parts}


# -- start-up --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"WEBHOOK_SECRET": ""}, "WEBHOOK_SECRET is empty"),
        ({"WEBHOOK_SECRET": SECRET, "WEBHOOK_PORT": "70000"}, "WEBHOOK_PORT=70000 is out of range"),
        ({"WEBHOOK_SECRET": SECRET, "WEBHOOK_HOST": "http://x/"}, "WEBHOOK_HOST"),
    ],
)
def test_refuses_to_start_with_bad_settings(services, env: dict[str, str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "webhook.py"], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


def test_settings_defaults_and_validation() -> None:
    from campaign.errors import ConfigError
    from campaign.settings import Settings

    s = Settings.from_env({})
    assert (s.webhook_host, s.webhook_port) == ("0.0.0.0", 8090)
    s = Settings.from_env({"WEBHOOK_HOST": "127.0.0.1", "WEBHOOK_PORT": "9000"})
    assert (s.webhook_host, s.webhook_port) == ("127.0.0.1", 9000)
    assert Settings.from_env({"WEBHOOK_HOST": "[::1]"}).webhook_host == "::1"
    for bad in ({"WEBHOOK_PORT": "0"}, {"WEBHOOK_PORT": "x"}, {"WEBHOOK_HOST": "a b"}):
        with pytest.raises(ConfigError, match="WEBHOOK_"):
            Settings.from_env(bad)


# -- last: the log of everything above ---------------------------------------------------------------------


def test_secret_never_logged_and_one_line_per_update(receiver) -> None:
    time.sleep(0.3)  # let the last lines reach the file
    text = receiver.log_path.read_text(errors="replace")
    assert SECRET not in text
    assert WRONG not in text
    updated = [ln for ln in text.splitlines() if "delivery READ recorded: part now read" in ln]
    assert updated and all(f" {k}=" in ln for ln in updated for k in ("run", "message", "part", "key_id"))
    assert "delivery DELIVERY_ACK unchanged: part already read" in text
    assert "missing or wrong webhook secret" in text  # rejections are logged, without the value


def test_replies_and_connection_changes_arrive_over_the_webhook_too(receiver, clean_db) -> None:
    """R-IN-1, E-30: messages.upsert and connection.update over HTTP run the consumer's handlers; the
    same upsert again (here, or from RabbitMQ) is a duplicate that changes nothing."""
    from campaign.inbound import handle
    from campaign.settings import get_settings
    from models import CampaignMessage, CampaignRun, Lead
    from tests.integration.campaign.inbound.test_handle import connection, upsert
    from tests.integration.pipeline_helpers import make_world

    w = make_world("hook")
    m, _other = w.add_leads(2)
    lead = Lead.get_by_id(m.lead_id)
    doc = upsert(w.inboxes[0].instance_name, lead.phone, "Oi, quero saber mais", key="HOOK-1")
    r = receiver.post(doc)
    assert r.status_code == 200 and r.json()["result"] == "reply" and r.json()["skipped"] == [m.id], r.text
    assert CampaignMessage.get_by_id(m.id).skip_reason == "replied"
    assert receiver.post(doc).json()["result"] == "duplicate"
    assert handle(doc, get_settings()).result == "duplicate"  # the same event from the other path
    r = receiver.post(connection(w.inboxes[0].instance_name, "close"))
    assert r.status_code == 200 and r.json()["paused"] == [w.run.id], r.text
    assert CampaignRun.get_by_id(w.run.id).pause_reason == "inbox_disconnected"
