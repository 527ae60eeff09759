"""T-PERF-6 inbound: events/s applied by ``python inbound.py`` and reply-to-stop latency, under a send load.

    .venv/bin/python bench/bench_inbound.py [--burst 4000] [--rounds 3] [--rate 500] [--seconds 20]
                                            [--reply-share 0.2] [--send-rate 20] [--quick]

Real RabbitMQ + PostgreSQL (this run's own vhost and database) and the engine's consumer as
production runs it: the ``python inbound.py`` process (its own interpreter and GIL: the
benchmark's publisher and pollers neither slow it down nor flatter it, and its settings, logging
and connection pool are the real ones), consuming the quorum queues Evolution declares in
RabbitMQ global mode. Events are published the way Evolution publishes them: to the durable
topic exchange ``evolution``, routing key = the event name, no publisher confirms.

All the while the engine sends: the sandbox, real ``dramatiq`` workers and the real
``scheduler.py`` dispatching a running campaign (``--send-rate`` messages/s falling due, one or
two parts each, 20 inboxes), so the consumer's transactions meet the workers' on the same tables
and rows (message_parts, campaign_messages, campaign_runs, leads, conversations). Every lead had a
message sent yesterday (a campaign with a reply column) and has a follow-up pending for tomorrow;
90 % of the campaign being sent goes to leads that never reply (the load stays steady), 10 % to
leads that do (replies land on messages queued, being generated or mid-send, and on that run's
counters).

The event mix (``--reply-share``, default 20 % ``messages.upsert``): replies from distinct leads
(10 % of them opt-out phrases, some sentences with a stop word inside), 10 % re-published
duplicates, 5 % second replies of a lead that already answered; the rest ``messages.update``
receipts (SERVER_ACK / DELIVERY_ACK / READ, repeats and downgrades, 1 % ERROR) for yesterday's
parts and, in order, for the parts the workers have just sent. Evolution's real stream for an
outreach campaign is mostly receipts (two or three per part sent) against replies from 5-30 %
of the leads: 20 % replies is a heavy day; ``--reply-share 1`` is replies only.

Phases, on the same services and under the same send load; both consumers run throughout:

1. capacity, ``--rounds`` times alternated, medians: ``--burst`` events published as fast as the
   publisher goes, events/s from the first publish to the last event applied --
   a. the reference (``bench/bare_inbound.py``): a bare pika consumer on one quorum queue doing
      one single-row INSERT + commit per event and acking each: done at the n-th row;
   b. the engine: done when a sentinel reply and a sentinel receipt, published last on their
      queues, are applied (each queue is FIFO and applied in order: all before them are);
2. the engine at the target rate: ``--rate`` events/s for ``--seconds``; for every first reply of
   a lead, reply-to-stop latency = publish -> the lead's pending follow-up seen ``skipped`` in
   PostgreSQL (polled every 20 ms on the committed state: an upper bound by up to one poll).

Afterwards every effect is checked: one gate row and one conversation row per distinct reply,
the follow-up of every replying lead skipped (``replied`` / ``opted_out``) and no other, every
receipted part at the highest status published, ``verify`` clean (counters = rows), no poison.
A run that loses the broker (another job on this shared machine restarting RabbitMQ) is
measured again (``--retries``).

Target (SPEC §7 T-PERF-6): >= 500 events/s applied AND p99 reply-to-stop <= 1 s at 500 events/s,
under the send load. The reference says what one commit per event costs on this machine in the
same run (absolute figures here are noisy: the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import random
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psycopg2

from bench import bare_inbound
from bench.common import (
    ROOT,
    BenchServices,
    Workers,
    World,
    add_leads,
    create_config,
    create_run,
    create_world,
    db_now,
    engine_env,
    header,
    median,
    percentile,
    q,
    q1,
    result_line,
    row,
    verdict,
)
from campaign.optout import is_opt_out
from devtools.services import wait_until

TARGET_RATE = 500.0  # events/s applied
TARGET_P99_S = 1.0  # reply-to-stop
POLL_S = 0.02
PROBE_WINDOW = 64
EXCHANGE = "evolution"
PREFIX = "evolution"
BARE_QUEUE = "bench.bare.events"
STATUSES = ("SERVER_ACK", "DELIVERY_ACK", "READ")
RANK = {s: i + 1 for i, s in enumerate(STATUSES)}
DB_STATUS = {"SERVER_ACK": "server_ack", "DELIVERY_ACK": "delivered", "READ": "read"}
REPLY_TEXTS = (
    "Oi, tenho interesse",
    "Quanto custa?",
    "Pode me ligar amanhã de manhã?",
    "Me manda mais detalhes, por favor",
    "vamos parar de enrolar e fechar?",  # a stop word inside a sentence: a reply, not an opt-out
    "👍",
)
OPT_OUT_TEXTS = ("pare", "PARE!", "não quero mais", "stop", "Descadastrar")


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Fixture:
    """What the events point at (ids of this run's database)."""

    world: World
    instance_of: dict[int, str]  # inbox id -> instance name
    leads: list[tuple[int, str, str]]  # (lead id, phone digits, instance of its inbox)
    history: list[tuple[str, str]]  # (key id, instance) of yesterday's sent parts
    sentinels: list[tuple[str, str]]  # history parts no other receipt touches: one closes each engine phase
    configs: dict[str, int]
    repliers: int  # leads[:repliers] reply during the benchmark; the others are only written to
    runs: dict[str, int] = field(default_factory=dict)


def seed(n_leads: int, n_inboxes: int, *, sentinels: int, repliers: int) -> Fixture:
    """Leads with yesterday's message sent (1 part) and tomorrow's follow-up pending, in bulk."""
    world = create_world("inbound", n_inboxes)
    replied_col = q1(
        "INSERT INTO columns (workspace_id, name, position) VALUES (%s, 'Replied', 2) RETURNING id", (world.ws_id,)
    )
    cfg = {
        name: create_config(world, name, world.inbox_ids[0], split=True, max_parts=2)
        for name in ("history", "follow-up", "sending")
    }
    q("UPDATE campaign_configs SET reply_column_id = %s WHERE id = %s", (replied_col, cfg["history"]))
    lead_ids = add_leads(world, n_leads, two_parts=False)
    inboxes = [world.inbox_ids[i % n_inboxes] for i in range(n_leads)]
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    runs = {
        "history": create_run(cfg["history"], status="completed", run_date=yesterday),
        "follow-up": create_run(cfg["follow-up"]),
    }
    q(
        """WITH m AS (
               INSERT INTO campaign_messages (run_id, lead_id, inbox_id, status, scheduled_at, sent_at, finished_at)
               SELECT %s, t.lead, t.inbox, 'sent', now() - interval '1 day', now() - interval '1 day',
                      now() - interval '1 day'
                 FROM unnest(%s::bigint[], %s::bigint[]) AS t(lead, inbox) RETURNING id, inbox_id)
           INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sent_at, provider_message_id)
           SELECT id, inbox_id, 0, 'Olá! Tudo bem?', 'sent', now() - interval '1 day', 'HIST' || id FROM m""",
        (runs["history"], lead_ids, inboxes),
    )
    q(
        """UPDATE campaign_runs SET leads_total = %s, leads_processed = %s, leads_sent = %s,
                  finished_at = now() - interval '1 day' WHERE id = %s""",
        (n_leads, n_leads, n_leads, runs["history"]),
    )
    q(
        """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
           SELECT %s, t.lead, t.inbox, now() + interval '1 day'
             FROM unnest(%s::bigint[], %s::bigint[]) AS t(lead, inbox)""",
        (runs["follow-up"], lead_ids, inboxes),
    )
    q("UPDATE campaign_runs SET leads_total = %s WHERE id = %s", (n_leads, runs["follow-up"]))
    instance_of = dict(q("SELECT id, instance_name FROM inboxes WHERE workspace_id = %s", (world.ws_id,)))
    rows = q(
        """SELECT l.id, regexp_replace(l.phone, '\\D', '', 'g'), p.provider_message_id, p.inbox_id
             FROM leads l JOIN campaign_messages m ON m.lead_id = l.id AND m.run_id = %s
             JOIN message_parts p ON p.message_id = m.id ORDER BY l.id""",
        (runs["history"],),
    )
    leads = [(lead, phone, instance_of[inbox]) for lead, phone, _, inbox in rows]
    parts = [(key, instance_of[inbox]) for _, _, key, inbox in rows]
    return Fixture(world, instance_of, leads, parts[sentinels:], parts[:sentinels], cfg, repliers, runs)


def schedule_sends(fx: Fixture, n: int, rate: float, rng: random.Random, start_in: float = 2.0) -> int:
    """A running campaign of ``n`` messages, one falling due every 1/``rate`` s: 90 % to leads that
    never reply (the load stays steady), 10 % to leads that do (replies meet the campaign being
    sent: its run row, its messages in flight)."""
    run_id = create_run(fx.configs["sending"])
    fx.runs["sending"] = run_id
    quiet = [lead for lead, _, _ in fx.leads[fx.repliers :]]
    talkers = [lead for lead, _, _ in fx.leads[: fx.repliers]]
    chosen = rng.sample(talkers, min(n // 10, len(talkers))) + rng.sample(quiet, min(n - n // 10, len(quiet)))
    rng.shuffle(chosen)
    inbox = {lead: inst for lead, _, inst in fx.leads}
    by_instance = {v: k for k, v in fx.instance_of.items()}
    t0 = db_now() + dt.timedelta(seconds=start_in)
    q(
        """INSERT INTO campaign_messages (run_id, lead_id, inbox_id, scheduled_at)
           SELECT %s, t.lead, t.inbox, t.at
             FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[]) AS t(lead, inbox, at)""",
        (
            run_id,
            chosen,
            [by_instance[inbox[lead]] for lead in chosen],
            [t0 + dt.timedelta(seconds=i / rate) for i in range(len(chosen))],
        ),
    )
    q("UPDATE campaign_runs SET leads_total = %s WHERE id = %s", (len(chosen), run_id))
    return run_id


# --------------------------------------------------------------------------------------------
# events


@dataclass
class Event:
    """One body to publish; ``probe`` = the lead whose first reply this is (its stop is timed)."""

    routing_key: str
    body: bytes
    probe: int | None = None


def upsert(instance: str, phone: str, key: str, text: str) -> bytes:
    """A ``messages.upsert`` as Evolution publishes it (v2, RabbitMQ global mode)."""
    now = dt.datetime.now(dt.UTC)
    return json.dumps(
        {
            "event": "messages.upsert",
            "instance": instance,
            "data": {
                "key": {"remoteJid": f"{phone}@s.whatsapp.net", "fromMe": False, "id": key},
                "pushName": "Lead",
                "status": "DELIVERY_ACK",
                "message": {"conversation": text},
                "messageType": "conversation",
                "messageTimestamp": int(now.timestamp()),
                "instanceId": instance,
                "source": "android",
            },
            "destination": "rabbitmq",
            "date_time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "sender": "5511999990000@s.whatsapp.net",
            "server_url": "http://evolution:8080",
            "apikey": "bench-apikey",
        }
    ).encode()


def update(instance: str, key: str, status: str) -> bytes:
    """A ``messages.update`` receipt as Evolution publishes it."""
    return json.dumps(
        {
            "event": "messages.update",
            "instance": instance,
            "data": {
                "keyId": key,
                "remoteJid": "5511987654321@s.whatsapp.net",
                "fromMe": True,
                "status": status,
                "instanceId": instance,
            },
            "destination": "rabbitmq",
            "date_time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "sender": "5511987654321@s.whatsapp.net",
            "server_url": "http://evolution:8080",
            "apikey": "bench-apikey",
        }
    ).encode()


class LiveParts:
    """Receipts, in order, for the parts the workers have just sent (polled at most every 0.5 s)."""

    def __init__(self, fx: Fixture) -> None:
        self.fx = fx
        self.after = 0
        self.pending: deque[tuple[str, str, str]] = deque()  # (key, instance, status)
        self._last = 0.0

    def refresh(self) -> None:
        if time.monotonic() - self._last < 0.5 or "sending" not in self.fx.runs:
            return
        self._last = time.monotonic()
        for part_id, key, inbox in q(
            """SELECT p.id, p.provider_message_id, p.inbox_id FROM message_parts p
                 JOIN campaign_messages m ON m.id = p.message_id
                WHERE m.run_id = %s AND p.status = 'sent' AND p.id > %s ORDER BY p.id""",
            (self.fx.runs["sending"], self.after),
        ):
            self.after = max(self.after, part_id)
            self.pending.extend((key, self.fx.instance_of[inbox], s) for s in STATUSES)


class EventSource:
    """The event mix, made as it is published (live receipts need the latest sent parts)."""

    def __init__(self, fx: Fixture, rng: random.Random, reply_share: float, *, dry: bool = False) -> None:
        self.fx, self.rng, self.reply_share, self.dry = fx, rng, reply_share, dry
        # the reference's events spend nothing: they never reach the engine's tables
        leads = list(fx.leads[: fx.repliers])
        rng.shuffle(leads)
        self.fresh: deque[tuple[int, str, str]] = deque(leads)
        self.live = LiveParts(fx)
        self.bodies: list[bytes] = []  # first replies, re-published as duplicates
        self.answered: list[tuple[int, str, str]] = []
        self.reply_keys: set[str] = set()
        self.expect_stop: dict[int, str] = {}  # lead -> replied | opted_out
        self.expect_status: dict[str, str] = {}  # part key -> highest status published
        self.counts: dict[str, int] = {}
        self._n = 0

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def next(self) -> Event:
        if self.rng.random() < self.reply_share:
            return self._reply()
        return self._receipt()

    def first_reply(self) -> Event:
        """A reply of a lead that has not answered yet (its stop is timed)."""
        if not self.fresh:
            raise SystemExit("error: the benchmark ran out of leads that have not replied: raise --leads")
        lead, phone, instance = self.fresh.popleft() if not self.dry else self.rng.choice(self.fresh)
        self._n += 1
        opt_out = self.rng.random() < 0.10
        text = self.rng.choice(OPT_OUT_TEXTS if opt_out else REPLY_TEXTS)
        key = f"BENCHIN{lead}x{self._n}"
        body = upsert(instance, phone, key, text)
        self._count("reply (opt-out)" if opt_out else "reply")
        self.bodies.append(body)
        self.answered.append((lead, phone, instance))
        if self.dry:
            return Event("messages.upsert", body)
        self.reply_keys.add(key)
        self.expect_stop[lead] = "opted_out" if is_opt_out(text) else "replied"
        return Event("messages.upsert", body, probe=lead)

    def _reply(self) -> Event:
        x = self.rng.random()
        if x < 0.10 and self.bodies:
            self._count("reply duplicate")
            return Event("messages.upsert", self.rng.choice(self.bodies))
        if x < 0.15 and self.answered:
            lead, phone, instance = self.rng.choice(self.answered)
            self._n += 1
            key = f"BENCHIN{lead}x{self._n}"
            self.reply_keys.add(key)
            self._count("reply (second)")
            return Event("messages.upsert", upsert(instance, phone, key, self.rng.choice(REPLY_TEXTS)))
        return self.first_reply()

    def _receipt(self) -> Event:
        self.live.refresh()
        if self.live.pending and self.rng.random() < 0.5:
            key, instance, status = self.live.pending.popleft()
            self._count("receipt (live part)")
        else:
            key, instance = self.rng.choice(self.fx.history)
            status = "ERROR" if self.rng.random() < 0.01 else self.rng.choice(STATUSES)
            self._count("receipt (yesterday's part)")
        if status in RANK and RANK[status] > RANK.get(self.expect_status.get(key, ""), 0):
            self.expect_status[key] = status
        return Event("messages.update", update(instance, key, status))


# --------------------------------------------------------------------------------------------
# processes and probes


class Consumer:
    """A consumer process (``inbound.py`` or the reference) that prints a ready line on stdout."""

    def __init__(self, cmd: list[str], env: dict[str, str], ready: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf, deadline = b"", time.monotonic() + 60
        while ready.encode() not in buf:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"error: {' '.join(cmd)} did not start: {log_path.read_text()[-2000:]}")
            if sel.select(0.2):
                buf += os.read(self.proc.stdout.fileno(), 4096)
        sel.close()

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used so far (/proc/<pid>/stat)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> str:
        """SIGTERM (a clean stop: the consumer finishes its batch); its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.log_path.read_text(errors="replace")


class StopProbe(threading.Thread):
    """Polls PostgreSQL every 20 ms for the follow-ups of the leads that replied: publish -> skipped.

    Primary-key lookups of the follow-ups of the oldest ``PROBE_WINDOW`` replies still waiting
    (the consumer applies a queue in order: younger ones cannot be done first, and a backlog does
    not make every poll heavier), on a connection of its own; the time the polls take is printed
    (load the consumer shares the machine with).
    """

    def __init__(self, dsn: str, follow_up: dict[int, int]) -> None:
        super().__init__(name="stop-probe", daemon=True)
        self.dsn, self.follow_up = dsn, follow_up  # lead -> its follow-up message
        self.lock = threading.Lock()
        self.waiting: dict[int, tuple[int, float, str]] = {}  # message -> (lead, published at, phase)
        self.latencies: dict[str, list[float]] = {}
        self.polls = 0
        self.poll_seconds = 0.0
        self.halt = threading.Event()

    def add(self, lead: int, at: float, phase: str) -> None:
        with self.lock:
            self.waiting[self.follow_up[lead]] = (lead, at, phase)

    def outstanding(self) -> int:
        with self.lock:
            return len(self.waiting)

    def run(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        try:
            while not self.halt.is_set():
                with self.lock:  # the oldest first: the consumer applies each queue in order
                    ids = list(itertools.islice(self.waiting, PROBE_WINDOW))
                started = time.monotonic()
                if ids:
                    with conn.cursor() as cur:
                        cur.execute(
                            "SELECT id FROM campaign_messages WHERE id = ANY(%s) AND status = 'skipped'", (ids,)
                        )
                        done = [r[0] for r in cur.fetchall()]
                    self.polls += 1
                    self.poll_seconds += time.monotonic() - started
                    with self.lock:
                        for mid in done:
                            _, at, phase = self.waiting.pop(mid)
                            # the snapshot was taken at `started`: the commit came before it
                            self.latencies.setdefault(phase, []).append(started - at)
                self.halt.wait(max(0.0, POLL_S - (time.monotonic() - started)))
        finally:
            conn.close()


class Publisher:
    """One AMQP connection publishing as Evolution does (no confirms, default properties)."""

    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()

    def send(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.channel.basic_publish(exchange, routing_key, body)

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except pika.exceptions.AMQPError:
            pass  # the broker went away (restarted by another job): nothing left to close


@dataclass
class Phase:
    """One measured stream of events."""

    name: str
    events: int
    first_publish: float
    last_publish: float
    done: float
    db_window: tuple[dt.datetime, dt.datetime]
    cpu: float = float("nan")  # CPU seconds the consumer process used in the phase
    sends: tuple[int, float] = (0, 0.0)  # parts the send load sent meanwhile, and per second

    @property
    def rate(self) -> float:
        return self.events / (self.done - self.first_publish)

    @property
    def publish_rate(self) -> float:
        return self.events / max(self.last_publish - self.first_publish, 1e-9)


def publish_stream(
    pub: Publisher,
    exchange: str,
    n: int,
    make: Callable[[], Event],
    rate: float | None,
    on_probe: Callable[[int, float], None] | None = None,
) -> tuple[float, float]:
    """Publish ``n`` events, as fast as possible or at ``rate``/s; (first, last) publish times."""
    start = time.monotonic()
    first = last = start
    for i in range(n):
        if rate is not None:
            due = start + i / rate
            while (now := time.monotonic()) < due:
                time.sleep(min(due - now, 0.005))
        ev = make()
        last = time.monotonic()
        if i == 0:
            first = last
        pub.send(exchange, ev.routing_key, ev.body)
        if ev.probe is not None and on_probe is not None:
            on_probe(ev.probe, last)
    return first, last


def wait_done(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 20 ms; the time of the first poll that saw ``predicate`` true (its start)."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        if predicate():
            return started
        if started > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (was RabbitMQ restarted? rerun)")
        time.sleep(max(0.0, POLL_S - (time.monotonic() - started)))


def engine_phase(
    name: str,
    n: int,
    rate: float | None,
    pub: Publisher,
    src: EventSource,
    probe: StopProbe,
    sentinel: tuple[str, str],
) -> Phase:
    """``n`` events of the mix, then a sentinel reply and a sentinel receipt (last on each queue)."""
    src.live.refresh()
    t_db0 = db_now()
    first, _ = publish_stream(pub, EXCHANGE, n, src.next, rate, lambda lead, at: probe.add(lead, at, name))
    closing = src.first_reply()
    sentinel_key = json.loads(closing.body)["data"]["key"]["id"]
    last = time.monotonic()
    pub.send(EXCHANGE, closing.routing_key, closing.body)
    assert closing.probe is not None
    probe.add(closing.probe, last, name)
    pub.send(EXCHANGE, "messages.update", update(sentinel[1], sentinel[0], "READ"))
    src.expect_status[sentinel[0]] = "READ"

    def applied() -> bool:
        return bool(
            q1(
                """SELECT (SELECT count(*) FROM inbound_events
                          WHERE provider_message_id = %s AND outcome <> 'received')
                        + (SELECT count(*) FROM message_parts
                            WHERE provider_message_id = %s AND delivery_status = 'read') = 2""",
                (sentinel_key, sentinel[0]),
            )
        )

    done = wait_done(applied, max(120.0, n / 50), f"the {name} events to be applied")
    return Phase(name, n + 2, first, last, done, (t_db0, db_now()))


def reference_phase(n: int, pub: Publisher, src: EventSource) -> Phase:
    """``n`` events through the bare consumer; done when it has committed ``n`` rows."""
    before = q1("SELECT coalesce(max(id), 0) FROM bench_inbound_bare")  # one row per event, no gaps
    t_db0 = db_now()
    first, last = publish_stream(pub, bare_inbound.EXCHANGE, n, src.next, None)
    done = wait_done(
        lambda: q1("SELECT coalesce(max(id), 0) FROM bench_inbound_bare") >= before + n,
        max(120.0, n / 50),
        "the reference consumer",
    )
    return Phase("reference", n, first, last, done, (t_db0, db_now()))


def with_cpu(consumer: Consumer, run: Callable[[], Phase]) -> Phase:
    """Run a phase; note the CPU the consumer process spent in it."""
    before = consumer.cpu_seconds()
    phase = run()
    phase.cpu = consumer.cpu_seconds() - before
    return phase


def sends_in(window: tuple[dt.datetime, dt.datetime]) -> tuple[int, float]:
    """Parts the workers sent in the window (database clock) and the rate."""
    n = q1("SELECT count(*) FROM message_parts WHERE sent_at BETWEEN %s AND %s", window)
    return n, n / max((window[1] - window[0]).total_seconds(), 1e-9)


# --------------------------------------------------------------------------------------------
# checks


def check_effects(src: EventSource, fx: Fixture) -> list[str]:
    """Everything the events should have done, done exactly once; the problems found."""
    from campaign.ops import monitor

    problems = []
    keys = sorted(src.reply_keys)
    gate = dict(
        q("SELECT outcome, count(*) FROM inbound_events WHERE provider_message_id = ANY(%s) GROUP BY 1", (keys,))
    )
    if sum(gate.values()) != len(keys) or set(gate) - {"reply", "opt_out"}:
        problems.append(f"gate rows {gate} for {len(keys)} distinct replies")
    logged = q1(
        "SELECT count(*) FROM conversation_messages WHERE direction = 'in' AND provider_message_id = ANY(%s)", (keys,)
    )
    if logged != len(keys):
        problems.append(f"{logged} inbound conversation rows for {len(keys)} distinct replies")
    stopped = dict(
        q(
            "SELECT lead_id, skip_reason FROM campaign_messages WHERE run_id = %s AND status <> 'pending'",
            (fx.runs["follow-up"],),
        )
    )
    if stopped != src.expect_stop:
        wrong = {k for k in stopped.keys() | src.expect_stop.keys() if stopped.get(k) != src.expect_stop.get(k)}
        problems.append(f"{len(wrong)} follow-ups not stopped as their lead's reply says (e.g. lead {min(wrong)})")
    expect = src.expect_status
    off = q1(
        """SELECT count(*) FROM unnest(%s::text[], %s::text[]) AS t(key, status)
             LEFT JOIN message_parts p ON p.provider_message_id = t.key
            WHERE p.delivery_status IS DISTINCT FROM t.status""",
        (list(expect), [DB_STATUS[s] for s in expect.values()]),
    )
    if off:
        problems.append(f"{off} of {len(expect)} receipted parts not at the highest status published")
    findings = monitor.verify()
    if findings:
        problems.append(f"verify: {len(findings)} finding(s), e.g. {findings[0]}")
    return problems


def consumer_stats(log_text: str) -> str:
    """The consumer's own count, from its last ``inbound: stopped (Stats(...))`` line."""
    found = re.findall(r"stopped \((Stats\(.*?\}\))\)", log_text)
    return found[-1] if found else "(no stats line in the consumer log)"


def figures(lat: list[float]) -> str:
    """p50 / p95 / p99 / max in ms."""
    if not lat:
        return "no samples"
    ms = [1000 * x for x in lat]
    return (
        f"p50 {percentile(ms, 50):.0f} ms, p95 {percentile(ms, 95):.0f} ms, "
        f"p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms ({len(ms)} replies)"
    )


# --------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burst", type=int, default=4000, help="events of each capacity phase (reference and engine)")
    p.add_argument("--rounds", type=int, default=3, help="reference/engine capacity rounds, alternated; medians")
    p.add_argument("--rate", type=float, default=TARGET_RATE, help="events/s of the paced phase (default: the target)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the paced phase")
    p.add_argument("--warmup", type=int, default=300, help="untimed events first, per consumer")
    p.add_argument("--reply-share", type=float, default=0.2, help="share of messages.upsert in the mix (default 0.2)")
    p.add_argument("--send-rate", type=float, default=20.0, help="campaign messages falling due per second")
    p.add_argument("--inboxes", type=int, default=20)
    p.add_argument("--processes", type=int, default=1, help="dramatiq worker processes of the send load")
    p.add_argument("--threads", type=int, default=8, help="threads per worker process")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--retries", type=int, default=2, help="attempts measured again after the broker went away")
    p.add_argument("--quick", action="store_true", help="1 round of 1,500 events, 8 s paced phase")
    p.add_argument("--logdir", type=Path, default=None, help="keep the consumer, worker and scheduler logs here")
    args = p.parse_args()
    if args.quick:
        args.burst, args.rounds = min(args.burst, 1500), 1
        args.seconds, args.warmup = min(args.seconds, 8.0), min(args.warmup, 200)
    if args.burst < 100 or args.rounds < 1 or args.rate <= 0 or args.seconds <= 0 or not 0 < args.reply_share <= 1:
        p.error("--burst must be >= 100, --rounds >= 1, --rate and --seconds > 0, --reply-share in (0, 1]")
    return args


def main() -> int:
    """Run the benchmark and print the figures."""
    args = parse_args()
    paced = int(args.rate * args.seconds)
    events = args.warmup + args.rounds * args.burst + paced
    repliers = int(args.reply_share * events) + 200
    # seconds the send load must cover, generously: capacity phases at >= 150 events/s
    budget = 60 + 2 * args.rounds * args.burst / 150 + 2 * args.seconds
    n_sends = int(args.send_rate * budget)
    n_leads = repliers + n_sends - n_sends // 10
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-inbound-"))
    logdir.mkdir(parents=True, exist_ok=True)
    header(
        "T-PERF-6 inbound: python inbound.py vs a bare pika consumer, under a send load",
        f"{args.rounds} round(s) of {args.burst}-event bursts, then {args.rate:.0f} events/s for {args.seconds:.0f} s; "
        f"{args.reply_share:.0%} replies; send load {args.send_rate:.0f} msg/s over {args.inboxes} inboxes "
        f"({args.processes} x {args.threads} worker threads, scheduler.py, sandbox); {n_leads} leads; logs in {logdir}",
    )
    from sandbox.testing import SandboxProcess

    for attempt in range(args.retries + 1):
        try:
            with BenchServices("inbound") as svc, SandboxProcess(seed=1) as sb:
                env = engine_env(
                    sb, DISPATCH_INTERVAL_SECONDS="0.2", EVOLUTION_EVENTS_RABBITMQ_URL=svc.env["RABBITMQ_URL"]
                )
                svc.set_env(env)
                from campaign.db import db

                db.connect(reuse_if_open=True)
                fx = seed(n_leads, args.inboxes, sentinels=args.rounds + 2, repliers=repliers)
                print(
                    f"   seeded {n_leads} leads, each with yesterday's message sent and a follow-up pending; "
                    f"{repliers} of them reply during the run",
                    flush=True,
                )
                out = measure(args, random.Random(args.seed), fx, svc.env, env, logdir, paced, n_sends)
                db.close()
            return report(args, out)
        except (pika.exceptions.AMQPError, TimeoutError) as exc:
            # another job on this shared machine restarting RabbitMQ mid-measurement loses the
            # publisher's unconfirmed events and stalls the phase: the figures would mean nothing
            what = str(exc).splitlines()[0] if str(exc) else ""
            if attempt == args.retries:
                print(f"error: no clean measurement in {attempt + 1} attempt(s): {type(exc).__name__}: {what}")
                return 2
            print(f"   attempt {attempt + 1} abandoned ({type(exc).__name__}: {what}); measuring again", flush=True)
    return 2


@dataclass
class Outcome:
    """Everything main prints."""

    refs: list[Phase]
    bursts: list[Phase]
    paced: Phase
    probe: StopProbe
    counts: dict[str, int]
    problems: list[str]
    stats: str
    statuses: dict[str, int]


class SendLoad:
    """The campaign being sent meanwhile: real workers, ``scheduler.py`` dispatching, the sandbox."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], logdir: Path) -> None:
        self.workers = Workers(
            ["actors"], processes=args.processes, threads=args.threads, env=env, log_path=logdir / "worker.log"
        ).start()
        self._log = open(logdir / "scheduler.log", "wb")
        self.scheduler = subprocess.Popen(
            [sys.executable, "scheduler.py"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_sending(self, run_id: int) -> None:
        wait_until(
            lambda: q1(
                """SELECT count(*) FROM message_parts p JOIN campaign_messages m ON m.id = p.message_id
                    WHERE m.run_id = %s AND p.status = 'sent'""",
                (run_id,),
            ),
            timeout=120,
            what="the send load to start sending",
            on_timeout=lambda: "\n" + self.workers.log_tail(),
        )

    def stop(self, *, drain: bool) -> bool:
        """Stop dispatching, let the messages in flight finish (``drain``), stop the workers;
        whether nothing was left in flight."""
        self.scheduler.terminate()
        try:
            self.scheduler.wait(30)
        except subprocess.TimeoutExpired:
            self.scheduler.kill()
            self.scheduler.wait(10)
        self._log.close()
        try:
            if drain:
                wait_until(
                    lambda: (
                        not q1(
                            """SELECT count(*) FROM campaign_messages
                            WHERE status IN ('queued', 'generating', 'splitting', 'sending')"""
                        )
                    ),
                    timeout=120,
                    what="the send load's messages in flight to finish",
                )
            return drain
        except TimeoutError:
            return False
        finally:
            self.workers.stop()


def measure(
    args: argparse.Namespace,
    rng: random.Random,
    fx: Fixture,
    svc_env: dict[str, str],
    env: dict[str, str],
    logdir: Path,
    paced: int,
    n_sends: int,
) -> Outcome:
    """Under the send load: reference and engine bursts alternated, then the paced phase; the checks."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    load = SendLoad(args, env, logdir)
    measured = False
    try:
        load.wait_sending(schedule_sends(fx, n_sends, args.send_rate, rng))
        print("   send load running; starting both consumers", flush=True)
        pub = Publisher(svc_env["RABBITMQ_URL"])
        bare = Consumer(
            [
                sys.executable,
                "-m",
                "bench.bare_inbound",
                svc_env["RABBITMQ_URL"],
                BARE_QUEUE,
                svc_env["DATABASE_URL"],
                "--prefetch",
                full_env.get("INBOUND_PREFETCH", "200"),
            ],
            full_env,
            bare_inbound.READY_LINE,
            logdir / "bare.log",
        )
        inbound = Consumer([sys.executable, "inbound.py"], full_env, "inbound consuming", logdir / "inbound.log")
        src = EventSource(fx, rng, args.reply_share)
        ref_src = EventSource(fx, random.Random(args.seed + 1), args.reply_share, dry=True)
        follow_ups = dict(q("SELECT lead_id, id FROM campaign_messages WHERE run_id = %s", (fx.runs["follow-up"],)))
        probe = StopProbe(svc_env["DATABASE_URL"], follow_ups)
        probe.start()
        sentinels = iter(fx.sentinels)
        refs: list[Phase] = []
        bursts: list[Phase] = []
        try:
            reference_phase(args.warmup, pub, ref_src)
            engine_phase("warm-up", args.warmup, None, pub, src, probe, next(sentinels))
            for r in range(args.rounds):
                refs.append(with_cpu(bare, lambda: reference_phase(args.burst, pub, ref_src)))
                bursts.append(
                    with_cpu(inbound, lambda: engine_phase("burst", args.burst, None, pub, src, probe, next(sentinels)))
                )
                print(
                    f"   round {r + 1}: reference {refs[-1].rate:.0f} events/s, engine {bursts[-1].rate:.0f} events/s",
                    flush=True,
                )
            paced_phase = with_cpu(
                inbound, lambda: engine_phase("paced", paced, args.rate, pub, src, probe, next(sentinels))
            )
            wait_until(lambda: probe.outstanding() == 0, timeout=60, what="every reply's stop to be seen")
            measured = True
        finally:
            probe.halt.set()
            bare.stop()
            stats = consumer_stats(inbound.stop())
            pub.close()
    finally:
        drained = load.stop(drain=measured)
    for phase in (*refs, *bursts, paced_phase):
        phase.sends = sends_in(phase.db_window)
    problems = check_effects(src, fx)
    if not drained:
        problems.append("the send load's messages in flight did not finish within 120 s")
    if "poison=0" not in stats:
        problems.append(f"the consumer recorded poison events: {stats}")
    statuses = dict(
        q("SELECT status, count(*) FROM campaign_messages WHERE run_id = %s GROUP BY 1", (fx.runs["sending"],))
    )
    return Outcome(refs, bursts, paced_phase, probe, src.counts, problems, stats, statuses)


def _rate_line(label: str, phases: list[Phase]) -> None:
    rates = [p.rate for p in phases]
    cpu = sum(p.cpu for p in phases) / sum(p.events for p in phases)
    sends = [p.sends[1] for p in phases]
    row(
        label,
        f"{median(rates):7.0f} events/s  (rounds: {', '.join(f'{r:.0f}' for r in rates)}; published at "
        f"{median([p.publish_rate for p in phases]):.0f}/s; consumer CPU {1000 * cpu:.2f} ms/event; "
        f"send load {median(sends):.1f} parts/s meanwhile)",
    )


def report(args: argparse.Namespace, out: Outcome) -> int:
    """Print the figures and the verdict; the exit status."""
    lat = out.probe.latencies.get("paced", [])
    p99 = percentile(lat, 99)
    ref_rate = median([p.rate for p in out.refs])
    rate = median([p.rate for p in out.bursts])
    rate_ok = rate >= TARGET_RATE
    # the paced phase kept up: everything applied within the target latency of the last publish
    lag = out.paced.done - out.paced.last_publish
    p99_ok = bool(lat) and p99 <= TARGET_P99_S and lag <= TARGET_P99_S
    paced_sends = out.paced.sends
    load_ok = all(p.sends[0] > 0 for p in [*out.refs, *out.bursts, out.paced])
    ok = rate_ok and p99_ok and load_ok and not out.problems
    print()
    row("event mix (engine)", ", ".join(f"{k} {v}" for k, v in sorted(out.counts.items())))
    _rate_line("reference: bare pika consumer, 1 commit/event", out.refs)
    _rate_line("engine: python inbound.py, burst", out.bursts)
    row("ratio engine / reference (medians)", f"{rate / ref_rate:7.2f}")
    row(f"target: >= {TARGET_RATE:.0f} events/s applied", verdict(rate_ok))
    row(
        f"engine: paced at {args.rate:.0f}/s for {args.seconds:.0f} s",
        f"{out.paced.rate:7.0f} events/s applied ({out.paced.events} events, the last applied {1000 * lag:.0f} ms "
        f"after the last publish; consumer CPU {1000 * out.paced.cpu / out.paced.events:.2f} ms/event; "
        f"send load {paced_sends[1]:.1f} parts/s meanwhile)",
    )
    row("reply-to-stop, paced phase", figures(lat))
    row("reply-to-stop, bursts (queued behind the burst)", figures(out.probe.latencies.get("burst", [])))
    row(
        "stop probe (its own load on the machine)",
        f"{out.probe.polls} polls, {1000 * out.probe.poll_seconds / max(out.probe.polls, 1):.1f} ms each on average",
    )
    row(f"target: p99 reply-to-stop <= {TARGET_P99_S * 1000:.0f} ms at {args.rate:.0f}/s", verdict(p99_ok))
    row("consumer's own count", out.stats)
    row("send-load campaign", str(out.statuses))
    row("effects checked (gates, log, stops, receipts, verify)", "; ".join(out.problems) or "all exact")
    if not load_ok:
        row("send load", "NOT SENDING during a phase: the figures are not under load")
    row("T-PERF-6", verdict(ok))
    result_line(
        "T-PERF-6",
        {
            "reference_events_s": round(ref_rate, 1),
            "engine_events_s": round(rate, 1),
            "ratio": round(rate / ref_rate, 3),
            "rounds": args.rounds,
            "reply_share": args.reply_share,
            "paced_rate": args.rate,
            "paced_events_s": round(out.paced.rate, 1),
            "paced_lag_ms": round(1000 * lag, 1),
            "stop_p50_ms": round(1000 * percentile(lat, 50), 1),
            "stop_p95_ms": round(1000 * percentile(lat, 95), 1),
            "stop_p99_ms": round(1000 * p99, 1),
            "stop_max_ms": round(1000 * max(lat), 1) if lat else None,
            "replies_timed": len(lat),
            "send_parts_s_paced": round(paced_sends[1], 1),
            "problems": out.problems,
            "pass": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
