"""Dead-letter reprocessing (SPEC R-OPS-2, R-FAIL-3) on real RabbitMQ + PostgreSQL + the sandbox.

The end-to-end tests poison a step in the sandbox, let real ``dramatiq`` workers exhaust their
retries, and drive the real script as a subprocess. The others build dead letters the way the
engine does: the real DeadLetters middleware records the row and settles the message, and the
Dramatiq message is dead-lettered by RabbitMQ itself (published to the step's queue, then
rejected), so its XQ copy carries the real ``x-death`` header.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import dramatiq
import pika
import pytest

from campaign import dispatch, recovery, steps
from campaign.db import db
from campaign.errors import StepFailed
from campaign.ops import dead_letters, monitor, repairs
from campaign.settings import get_settings
from devtools.services import purge_queues, sandbox_env, start_worker, stop_worker
from models import CampaignMessage, CampaignRun, DeadLetter, Lead, MessagePart
from tests import ROOT
from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, make_world, run_counters
from tests.integration.workers import wait_for

SCRIPT = ROOT / "scripts" / "reprocess_dead_letters.py"
LONG_TEXT = (
    "Oi Ana, aqui é a Júlia da ACME e vi que vocês abriram a loja nova no Recife semana passada. "
    "A gente ajuda lojas a organizar o atendimento no WhatsApp sem perder nenhum cliente no caminho. "
    "Posso te mandar um resumo de dois minutos para você ver se faz sentido por aí?"
)


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def queues(clean_db):
    """The pipeline queues (declared, with .DQ/.XQ) emptied before and after the test."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    import actors

    assert isinstance(actors.broker, RabbitmqBroker)  # dead letters are RabbitMQ's .XQ queues
    for q in steps.QUEUES:
        actors.broker.declare_queue(q, ensure=True)
    names = tuple(sorted(actors.broker.get_declared_queues()))
    purge_queues(get_settings().rabbitmq_url, names)
    yield names
    purge_queues(get_settings().rabbitmq_url, names)


@pytest.fixture
def engine(queues, sb, tmp_path):
    """Real worker processes wired to the sandbox, fast backoffs, never disabling the inbox."""
    procs = []
    env = {
        **sandbox_env(sb),
        "MIN_BACKOFF_SECONDS": "0.05",
        "MAX_BACKOFF_SECONDS": "0.5",
        "MAX_ATTEMPTS": "3",
        # a poisoned send here is one the gateway never takes, not an outage to wait out
        # (E-23): every 5xx spends an attempt, so it reaches the dead letters in seconds
        "GATEWAY_OUTAGE_TOLERANCE_SECONDS": "0",
        "LEASE_SECONDS": "5",
        "SEND_TIMEOUT_SECONDS": "2",
    }

    class Engine:
        log = tmp_path / "worker.log"

        def start(self, processes: int = 1, threads: int = 4):
            procs.append(start_worker(processes=processes, threads=threads, extra_env=env, log_path=self.log))

        def tail(self) -> str:
            return self.log.read_text()[-4000:] if self.log.exists() else ""

    yield Engine()
    for proc in procs:
        stop_worker(proc)


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real script from the repository root, as an operator would."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _channel():
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    return conn, conn.channel()


def depths() -> dict[str, int]:
    """Ready messages of every pipeline queue and its XQ."""
    conn, ch = _channel()
    try:
        out = {}
        for q in steps.QUEUES:
            for name in (q, f"{q}.XQ"):
                out[name] = ch.queue_declare(queue=name, passive=True).method.message_count
        return out
    finally:
        conn.close()


def dead_letter_via_rabbitmq(body: bytes, queue: str) -> None:
    """Publish ``body`` to ``queue`` and reject it: RabbitMQ moves it to ``queue``.XQ (x-death header)."""
    before = depths()[f"{queue}.XQ"]
    conn, ch = _channel()
    try:
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        method = None
        for _ in range(100):
            method, _, got = ch.basic_get(queue, auto_ack=False)
            if method is not None:
                break
            time.sleep(0.02)
        assert method is not None and got == body, "the published message did not come back"
        ch.basic_nack(method.delivery_tag, requeue=False)
    finally:
        conn.close()
    # this very copy: a quorum queue dead-letters at-least-once, i.e. asynchronously
    wait_for(lambda: depths()[f"{queue}.XQ"] > before, timeout=5, message=f"{queue}.XQ to receive the message")


def kill_step(
    msg_id: int,
    actor: str,
    settings=None,
    *,
    error: str = "send_part: 3 attempts failed, last: 500",
    inbox_id: int | None = None,
) -> dramatiq.Message:
    """What a dead step leaves behind: DeadLetters' row + failed message, and the XQ copy."""
    from dramatiq.broker import MessageProxy

    import actors
    from actors.middleware import DeadLetters

    queue = repairs.REQUEUE_TARGETS[actor][1]
    args = (msg_id, inbox_id) if actor == "send_part" else (msg_id,)
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue,
        actor_name=actor,
        args=args,
        kwargs={},
        options={"retries": 2, "traceback": f"Traceback...\npipeline.StepFailed: {error}"},
    )
    proxy = MessageProxy(message)
    proxy.fail()
    DeadLetters(settings or fast_settings()).after_process_message(actors.broker, proxy, exception=StepFailed(error))
    dead_letter_via_rabbitmq(message.encode(), queue)
    return message


def message_in(
    world, status: str, *, text: str | None = None, parts: list[str] | None = None, sent_parts: int = 0
) -> CampaignMessage:
    """One message of ``world`` in ``status`` (with its text and parts, ``sent_parts`` of them sent)."""
    (m,) = world.add_leads(1)
    CampaignMessage.update(status=status, generated_text=text).where(CampaignMessage.id == m.id).execute()
    for i, part in enumerate(parts or []):
        sent = i < sent_parts
        MessagePart.create(
            message=m.id,
            inbox=m.inbox_id,
            idx=i,
            text=part,
            status="sent" if sent else "pending",
            sent_at=dt.datetime.now(dt.UTC) if sent else None,
            provider_message_id=f"KEY{uuid.uuid4().hex[:10]}" if sent else None,
        )
    return CampaignMessage.get_by_id(m.id)


def db_state() -> dict:
    """Every row the reprocessing could touch, for before/after comparisons."""
    out = {}
    for table in ("campaign_messages", "message_parts", "campaign_runs", "dead_letters", "leads"):
        out[table] = db.execute_sql(f"SELECT * FROM {table} ORDER BY id").fetchall()
    out["events"] = db.execute_sql("SELECT count(*) FROM campaign_events").fetchone()[0]
    return out


def _sends_by_text(sb) -> collections.Counter:
    return collections.Counter(s["text"] for s in sb.ledger()["sends"])


# --------------------------------------------------------------------------------------------
# end to end: real workers, poisoned sandbox, the real script


def test_poisoned_send_is_dead_lettered_listed_and_requeued_once(engine, sb):
    w = make_world()
    (m,) = w.add_leads(1)
    sb.set_faults({"send": {"always_status": 500}})
    engine.start()
    dispatch.dispatch_due(get_settings())
    wait_for(
        lambda: DeadLetter.select().count() == 1 and depths()["campaign.send.XQ"] == 1,
        timeout=60,
        message="the poisoned send to reach campaign.send.XQ and dead_letters",
    )
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.error_class) == ("failed", "retries_exhausted")
    assert run_counters(w.run.id)["leads_failed"] == 1 and run_counters(w.run.id)["status"] == "completed"
    assert sb.ledger()["sends"] == []

    listed = script()
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if f" {m.id} " in ln)
    for word in ("campaign.send", "send_part", "both", "dead", "failed", "StepFailed"):
        assert word in line, (word, line)
    (row,) = json_lines(script("--json"))
    assert (row["campaign_message_id"], row["run_id"], row["where"], row["actor"]) == (
        m.id,
        w.run.id,
        "both",
        "send_part",
    )
    assert depths()["campaign.send.XQ"] == 1  # listing lost nothing

    sb.set_faults({"send": {"always_status": None}})
    done = script("--requeue")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "requeued" in done.stdout and "failed -> sending" in done.stdout and "reopened" in done.stdout
    wait_for(
        lambda: CampaignMessage.get_by_id(m.id).status == "sent",
        timeout=30,
        message=f"the requeued message to be sent\n{engine.tail()}",
    )
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["Contacted"].id
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_sent"], c["leads_failed"], c["leads_processed"]) == ("completed", 1, 0, 1)
    assert monitor.verify() == []
    assert DeadLetter.get().status == "requeued" and DeadLetter.get().resolved_at is not None
    assert depths()["campaign.send.XQ"] == 0

    again = script("--requeue")
    assert again.returncode == 0, again.stderr
    assert "no dead letters" in again.stdout
    time.sleep(1.5)  # anything wrongly published would be sent by now
    assert list(_sends_by_text(sb).values()) == [1]
    assert sb.summary()["duplicate_sends"] == 0
    assert monitor.verify() == []


def test_multi_part_message_poisoned_after_part_one_never_resends_it(engine, sb):
    """R-FAIL-5 / E-08 through a dead letter: part 1 went out, part 2 died; the requeue sends 2..N once."""
    w = make_world(split=True, max_parts=3, part_gap_min_seconds=2.0, part_gap_max_seconds=2.0)
    (m,) = w.add_leads(1)
    CampaignMessage.update(generated_text=LONG_TEXT).where(CampaignMessage.id == m.id).execute()
    engine.start()
    dispatch.dispatch_due(get_settings())
    wait_for(
        lambda: (
            MessagePart.select()
            .where(MessagePart.message == m.id, MessagePart.idx == 0, MessagePart.status == "sent")
            .exists()
        ),
        timeout=30,
        interval=0.02,
        message=f"part 1 to be sent\n{engine.tail()}",
    )
    sb.set_faults({"send": {"always_status": 500}})  # the next part is 2 s away
    wait_for(
        lambda: CampaignMessage.get_by_id(m.id).status == "failed" and depths()["campaign.send.XQ"] == 1,
        timeout=60,
        message=f"part 2 to die\n{engine.tail()}",
    )
    parts = [p.status for p in MessagePart.select().where(MessagePart.message == m.id).order_by(MessagePart.idx)]
    assert len(parts) >= 2 and parts[0] == "sent" and set(parts[1:]) == {"failed"}, parts
    first_part_text = MessagePart.get(MessagePart.message == m.id, MessagePart.idx == 0).text

    sb.set_faults({"send": {"always_status": None}})
    done = script("--requeue", "--run", str(w.run.id))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "#1 sent (kept)" in done.stdout and "#2 failed->pending" in done.stdout
    wait_for(
        lambda: CampaignMessage.get_by_id(m.id).status == "sent",
        timeout=40,
        message=f"the rest of the parts\n{engine.tail()}",
    )
    sends = _sends_by_text(sb)
    all_parts = [p.text for p in MessagePart.select().where(MessagePart.message == m.id).order_by(MessagePart.idx)]
    assert sends[first_part_text] == 1
    assert sorted(sends.elements()) == sorted(all_parts)  # every part exactly once, nothing else
    assert "".join(all_parts).replace(" ", "") == LONG_TEXT.replace(" ", "")
    assert script("--requeue").returncode == 0
    time.sleep(1.0)
    assert sum(_sends_by_text(sb).values()) == len(all_parts)
    assert_counters_match(w.run.id)
    assert monitor.verify() == []


# --------------------------------------------------------------------------------------------
# dry run, malformed and unknown dead letters


def _raw_dramatiq(actor: str, args: list) -> bytes:
    return dramatiq.Message(
        queue_name="campaign.send", actor_name=actor, args=tuple(args), kwargs={}, options={}
    ).encode()


def test_dry_run_changes_nothing_and_bad_xq_messages_are_listed_and_skipped(queues):
    s = fast_settings()
    w = make_world()
    m = message_in(
        w, "sending", text="Olá, tudo bem? Uma mensagem.", parts=["Olá, tudo bem?", "Uma mensagem."], sent_parts=1
    )
    good = kill_step(m.id, "send_part", s, inbox_id=m.inbox_id)
    dead_letter_via_rabbitmq(b"\x00\xffnot json at all", "campaign.send")
    dead_letter_via_rabbitmq(_raw_dramatiq("no_such_actor", [m.id, m.inbox_id]), "campaign.send")
    dead_letter_via_rabbitmq(_raw_dramatiq("send_part", []), "campaign.send")
    # well formed, but no row: the worker could not record it (its message was never failed)
    dead_letter_via_rabbitmq(_raw_dramatiq("send_part", [m.id, m.inbox_id]), "campaign.send")
    assert depths()["campaign.send.XQ"] == 5
    before, before_q = db_state(), depths()

    listed = script()
    assert listed.returncode == 0, listed.stderr
    for text in ("malformed: not JSON", "unknown actor 'no_such_actor'", "malformed: no args", "no dead_letters row"):
        assert text in listed.stdout, (text, listed.stdout)
    rows = json_lines(script("--json"))
    assert len(rows) == 5 and sum(r["where"] == "XQ" for r in rows) == 4
    assert {r["where"] for r in rows if r["key"] == good.message_id} == {"both"}

    for mode in ("--requeue", "--purge"):
        dry = script(mode, "--dry-run")
        # a requeue cannot take the four bad ones (exit 1); a purge can (it records them)
        assert dry.returncode == (1 if mode == "--requeue" else 0), dry.stdout + dry.stderr
        assert "DRY RUN" in dry.stdout
        assert db_state() == before and depths() == before_q, mode
    dry = script("--requeue", "--dry-run", "--id", good.message_id)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert (
        f"would requeue: message {m.id}: failed -> sending; parts #1 sent (kept), #2 failed->pending; "
        f"run {w.run.id}: processed 1->0, failed 1->0, status completed->running"
    ) in dry.stdout
    assert f"publish send_part({m.id}, {m.inbox_id}) to campaign.send" in dry.stdout
    assert db_state() == before and depths() == before_q

    done = script("--requeue")
    assert done.returncode == 1  # the four bad ones could not be requeued
    assert done.stdout.count("would skip") == 0 and done.stdout.count(": skipped: not requeued") == 4
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    assert depths() == {**before_q, "campaign.send.XQ": 4, "campaign.send": 1}  # published, good copy acked

    raw = next(r for r in rows if r["problem"] == "malformed: not JSON")
    purged = script("--purge", "--id", raw["key"])
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert depths()["campaign.send.XQ"] == 3
    record = DeadLetter.get(DeadLetter.dramatiq_message_id == raw["key"])
    assert record.status == "purged" and "not JSON" in (record.error_message or "")


# --------------------------------------------------------------------------------------------
# purge, filters, arguments


def test_purge_and_filters(queues):
    s = fast_settings()
    w1 = make_world("one")
    w2 = make_world("two")
    gen = message_in(w1, "generating")
    snd = message_in(w2, "sending", text="Olá, uma mensagem.", parts=["Olá, uma mensagem."])
    kill_step(gen.id, "generate", s)
    kill_step(snd.id, "send_part", s, inbox_id=snd.inbox_id)
    gen_row = DeadLetter.get(DeadLetter.campaign_message == gen.id)
    snd_row = DeadLetter.get(DeadLetter.campaign_message == snd.id)
    db.execute_sql("UPDATE dead_letters SET created_at = now() - interval '3 hours' WHERE id = %s", (gen_row.id,))

    def ids(*args: str) -> set[int]:
        proc = script("--json", *args)
        assert proc.returncode == 0, proc.stderr
        return {r["campaign_message_id"] for r in json_lines(proc)}

    assert ids() == {gen.id, snd.id}
    via_cli = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "dead-letters", "--json", "--actor", "generate"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert via_cli.returncode == 0 and [r["campaign_message_id"] for r in json_lines(via_cli)] == [gen.id]
    assert ids("--queue", "campaign.generate") == {gen.id}
    assert ids("--queue", "campaign.send.XQ") == {snd.id}
    assert ids("--actor", "send_part") == {snd.id}
    assert ids("--run", str(w1.run.id)) == {gen.id}
    assert ids("--older-than", "2h") == {gen.id}
    assert ids("--newer-than", "1h30m") == {snd.id}
    assert ids("--id", str(snd_row.id)) == {snd.id}
    assert ids("--id", gen_row.dramatiq_message_id) == {gen.id}
    assert ids("--run", "999999") == set()
    for bad in (
        ["--older-than", "2 hours"],
        ["--queue", "campaign.nope"],
        ["--actor", "finalize"],
        ["--dry-run"],
        ["--requeue", "--purge"],
        ["--run", "x"],
        ["--older-than", "1h", "--newer-than", "1h"],
    ):
        proc = script(*bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "error" in proc.stderr, bad
    missing = script("--id", "424242")
    assert missing.returncode == 1 and "--id 424242: no such dead letter" in missing.stderr

    counters_before = run_counters(w1.run.id)
    purged = script("--purge", "--queue", "campaign.generate")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert DeadLetter.get_by_id(gen_row.id).status == "purged"
    assert CampaignMessage.get_by_id(gen.id).status == "failed"
    assert run_counters(w1.run.id) == counters_before
    assert depths()["campaign.generate.XQ"] == 0 and depths()["campaign.send.XQ"] == 1
    assert ids() == {snd.id}
    assert ids("--all") == {gen.id, snd.id}
    # a purged one is history: requeueing it by id publishes nothing
    again = script("--requeue", "--id", str(gen_row.id))
    assert again.returncode == 0 and "already purged" in again.stdout
    assert CampaignMessage.get_by_id(gen.id).status == "failed" and depths()["campaign.generate"] == 0


def test_expired_xq_copy_is_still_listed_and_requeued_from_postgresql(queues):
    s = fast_settings()
    w = make_world()
    m = message_in(w, "splitting", text=LONG_TEXT)
    kill_step(m.id, "split", s)
    conn, ch = _channel()  # RabbitMQ's 7-day TTL, at test speed
    ch.queue_purge("campaign.split.XQ")
    conn.close()
    (row,) = json_lines(script("--json"))
    assert (row["where"], row["campaign_message_id"], row["status"]) == ("DB", m.id, "dead")
    published: list = []
    with db.connection_context():
        args = _args("--requeue")
        assert dead_letters.run(args, get_settings(), publish=lambda q, a: published.append((q, a))) == 0
    assert published == [("campaign.split", (m.id,))]
    assert CampaignMessage.get_by_id(m.id).status == "splitting"


def _args(*argv: str):
    import argparse

    p = argparse.ArgumentParser()
    dead_letters.add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# requeue rules (in process, publisher captured)


def test_requeue_of_a_message_that_completed_since_publishes_nothing(queues, sb, llm, evo):
    from tests.integration.pipeline_helpers import claim, drive

    s = fast_settings()
    w = make_world()
    (m,) = w.add_leads(1)
    claim(m.id)
    assert drive(m.id, s, llm, evo) == "sent"
    # a dead duplicate delivery of the send step, after the message had completed
    kill_step(m.id, "send_part", s, inbox_id=m.inbox_id)
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    before = run_counters(w.run.id)
    published: list = []
    out = _Capture()
    assert (
        dead_letters.run(_args("--requeue"), get_settings(), out=out, publish=lambda q, a: published.append((q, a)))
        == 0
    )
    assert published == []
    assert "resolved" in out.text and "nothing published" in out.text and "'sent'" in out.text
    row = DeadLetter.get()
    assert row.status == "resolved" and row.resolved_at is not None
    assert "moved on" in db.execute_sql("SELECT note FROM dead_letters WHERE id = %s", (row.id,)).fetchone()[0]
    assert run_counters(w.run.id) == before
    assert depths()["campaign.send.XQ"] == 0 and depths()["campaign.send"] == 0
    assert len(sb.ledger()["sends"]) == 1


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s


@pytest.mark.parametrize(
    "actor,status,text,parts,target,queue",
    [
        ("generate", "generating", None, None, "queued", "campaign.generate"),
        ("split", "splitting", LONG_TEXT, None, "splitting", "campaign.split"),
        ("send_part", "sending", "Olá! Tudo bem?", ["Olá!", "Tudo bem?"], "sending", "campaign.send"),
    ],
)
def test_lost_publish_after_commit_is_recovered_by_the_sweep(queues, actor, status, text, parts, target, queue):
    """Each target status is re-enqueued by recovery.recovery_sweep when the publish fails (R-FAIL-8)."""
    s = fast_settings()
    w = make_world()
    m = message_in(w, status, text=text, parts=parts)
    kill_step(m.id, actor, s, inbox_id=m.inbox_id)
    assert CampaignMessage.get_by_id(m.id).status == "failed"

    def broken(q, a):
        raise ConnectionError("broker down")

    out = _Capture()
    assert dead_letters.run(_args("--requeue"), get_settings(), out=out, publish=broken) == 1
    assert "PUBLISH FAILED" in out.text and "recovery sweep" in out.text
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.attempts, msg.error_class, msg.finished_at) == (target, 0, None, None)
    assert DeadLetter.get().status == "requeued"
    assert depths()[f"{queue}.XQ"] == 1  # kept until the publish is known to be done
    assert_counters_match(w.run.id)
    assert run_counters(w.run.id)["status"] == "running"

    swept: list = []
    sweep_settings = fast_settings(lease_seconds=1, max_backoff_seconds=1.0)
    recovery.recovery_sweep(sweep_settings, publish=lambda q, args: swept.append((q, args)))
    assert swept == []  # within its hand-off grace: the publish may still be on its way
    db.execute_sql("UPDATE campaign_messages SET wake_at = now() - interval '1 second' WHERE id = %s", (m.id,))
    recovery.recovery_sweep(sweep_settings, publish=lambda q, args: swept.append((q, args)))
    expected_args = (m.id, m.inbox_id) if queue == "campaign.send" else (m.id,)
    assert swept == [(queue, [expected_args])]

    # the next --requeue only removes the stale XQ copy
    published: list = []
    out = _Capture()
    assert (
        dead_letters.run(_args("--requeue"), get_settings(), out=out, publish=lambda q, a: published.append((q, a)))
        == 0
    )
    assert published == [] and "stale XQ copy removed" in out.text
    assert depths()[f"{queue}.XQ"] == 0


def test_requeue_resumes_a_run_paused_for_error_threshold_and_keeps_other_pauses(queues):
    s = fast_settings(error_threshold_min_processed=1, error_threshold_ratio=0.1)
    w = make_world()
    a = message_in(w, "generating")
    w.add_leads(1)  # a second message, still pending: the run is not done
    kill_step(a.id, "generate", s)
    c = run_counters(w.run.id)
    assert (c["status"], c["pause_reason"]) == ("paused", "error_threshold")
    published: list = []
    out = _Capture()
    assert (
        dead_letters.run(_args("--requeue"), get_settings(), out=out, publish=lambda q, a_: published.append((q, a_)))
        == 0
    )
    assert f"run {w.run.id} resumed (it was paused: error_threshold)" in out.text
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_failed"], c["leads_processed"]) == ("running", 0, 0)
    assert published == [("campaign.generate", (a.id,))]

    # a manual pause is the operator's: kept, and said so
    b = CampaignMessage.get(CampaignMessage.id != a.id)
    CampaignMessage.update(status="generating").where(CampaignMessage.id == b.id).execute()
    kill_step(b.id, "generate", fast_settings())
    CampaignRun.update(status="paused", pause_reason="manual").where(CampaignRun.id == w.run.id).execute()
    out = _Capture()
    assert dead_letters.run(_args("--requeue"), get_settings(), out=out, publish=lambda q, a_: None) == 0
    assert "stays paused (manual)" in out.text
    assert run_counters(w.run.id)["status"] == "paused"
    assert_counters_match(w.run.id)


def test_concurrent_requeues_of_one_dead_letter_have_one_effect(queues):
    """Two operators at once: the row lock lets one requeue; the other finds it done."""
    import threading

    s = fast_settings()
    w = make_world()
    m = message_in(w, "generating")
    kill_step(m.id, "generate", s)
    published: list = []
    codes: list = []
    both_listed = threading.Barrier(2, timeout=20)

    def operator() -> None:
        with db.connection_context():
            items = dead_letters.collect([], include_resolved=False)
            both_listed.wait()  # both saw it 'dead' before either acts
            codes.append([dead_letters.requeue(items, s, None, publish=lambda q, a: published.append(a))])

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    actions = sorted(o.action for batch in codes for outcomes in batch for o in outcomes)
    assert actions == ["requeued", "stale"], actions
    assert published == [(m.id,)]
    assert_counters_match(w.run.id)


# --------------------------------------------------------------------------------------------
# XQ browsing: a missing XQ must not cost the messages already held (delivery tags are per channel)


def _xq_depth(name: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    try:
        return conn.channel().queue_declare(queue=name, passive=True).method.message_count
    finally:
        conn.close()


def test_missing_xq_between_two_browsed_ones_never_acks_another_dead_letter(queues):
    """campaign.split.XQ missing (deleted by hand, or never declared on a fresh broker): the browser
    used to re-open its channel, which silently returned the generate copies it held AND restarted
    the delivery tags at 1, so acking the generate copy removed the send copy instead: a dead letter
    lost for good (this one had no PostgreSQL row to fall back on)."""
    gen_body = _raw_dramatiq("generate", [424201])
    send_body = _raw_dramatiq("send_part", [424202, 7])
    dead_letter_via_rabbitmq(gen_body, "campaign.generate")
    dead_letter_via_rabbitmq(send_body, "campaign.send")
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    try:
        conn.channel().queue_delete("campaign.split.XQ")
        try:
            browser = dead_letters.XqBrowser(get_settings()).open()
            try:
                got = browser.browse(steps.QUEUES)
                assert sorted(m.actor or "" for m in got) == ["generate", "send_part"]
                (gen,) = [m for m in got if m.actor == "generate"]
                browser.ack(gen)  # what --purge/--requeue of the generate dead letter does
            finally:
                browser.close()
            depths = (_xq_depth("campaign.generate.XQ"), _xq_depth("campaign.send.XQ"))
            assert depths == (0, 1), f"generate.XQ, send.XQ = {depths}: expected the acked copy gone, the other kept"
        finally:
            import actors
            from actors.broker import EngineRabbitmqBroker

            # put it back as the engine declares it (quorum under RABBITMQ_QUEUE_TYPE=quorum)
            assert isinstance(actors.broker, EngineRabbitmqBroker)
            conn.channel().queue_declare("campaign.split.XQ", durable=True, arguments=actors.broker.xq_arguments())
    finally:
        conn.close()
