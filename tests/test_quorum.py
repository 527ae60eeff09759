"""RABBITMQ_QUEUE_TYPE=quorum on the real RabbitMQ (R-SCALE-1), each test on its own vhost.

Queue types are read back from RabbitMQ itself (``rabbitmqctl list_queues -p VHOST name type``),
not from what the broker believes it declared.
"""

from __future__ import annotations

import collections
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import dramatiq
import pika
import pytest

from campaign import dispatch
from campaign.db import db
from campaign.settings import Settings, get_settings, reset_settings
from tests import factories as f
from tests.conftest import RABBIT_BASE_URL, RABBITMQCTL, RUN_ID, _rabbitmqctl, _with_path
from tests.pipeline_helpers import assert_counters_match, run_counters
from tests.workers import start_worker, stop_worker, wait_for


def queue_types(vhost: str) -> dict[str, str]:
    """{queue: type} of ``vhost`` as RabbitMQ reports it (rabbitmqctl retried: the CLI's own
    connection to the node can fail under load)."""
    cmd = [*RABBITMQCTL, "list_queues", "-q", "--no-table-headers", "-p", vhost, "name", "type"]
    for attempt in range(3):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return dict(line.split("\t")[:2] for line in done.stdout.splitlines() if "\t" in line)
        time.sleep(1 + attempt)
    raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture
def vhost(services) -> Iterator[tuple[str, str]]:
    """(name, RABBITMQ_URL) of a fresh vhost, deleted afterwards."""
    name = f"{RUN_ID}_q{uuid.uuid4().hex[:6]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name, _with_path(RABBIT_BASE_URL, quote(name, safe=""))
    finally:
        _rabbitmqctl("delete_vhost", name)


def engine_queues() -> list[str]:
    """Every queue the engine's actors use (steps, campaign.notify, campaign.system)."""
    import actors

    return sorted(actors.broker.get_declared_queues())


def broker_on(url: str, queue_type: str):
    from actors.broker import build_broker

    broker = build_broker(Settings(rabbitmq_url=url, rabbitmq_queue_type=queue_type))
    for name in engine_queues():
        broker.declare_queue(name)
    return broker


def test_quorum_declares_every_engine_queue_and_its_dq_and_xq_as_quorum(vhost):
    name, url = vhost
    broker = broker_on(url, "quorum")
    try:
        declared = broker.ensure_queues()
    finally:
        broker.close()
    assert {"campaign.notify", "campaign.system"} <= set(declared)
    assert len(declared) >= 5, declared  # the chain's steps as well
    expected = {q: "quorum" for base in declared for q in (base, f"{base}.DQ", f"{base}.XQ")}
    assert queue_types(name) == expected


def test_classic_stays_classic_by_default(vhost):
    name, url = vhost
    assert Settings().rabbitmq_queue_type == "classic"
    broker = broker_on(url, Settings().rabbitmq_queue_type)
    try:
        declared = broker.ensure_queues()
    finally:
        broker.close()
    assert set(queue_types(name).values()) == {"classic"}
    assert len(queue_types(name)) == 3 * len(declared)


@pytest.mark.parametrize(("existing", "wanted"), [("classic", "quorum"), ("quorum", "classic")])
def test_existing_queue_of_the_other_type_is_a_clear_startup_error(vhost, existing, wanted):
    from actors.broker import QueueTypeMismatch

    name, url = vhost
    old = broker_on(url, existing)
    old.ensure_queues()
    old.close()
    new = broker_on(url, wanted)
    try:
        with pytest.raises(QueueTypeMismatch) as err:
            new.ensure_queues()
    finally:
        new.close()
    text = str(err.value)
    first = engine_queues()[0]
    assert repr(first) in text and repr(name) in text, text
    assert f"RABBITMQ_QUEUE_TYPE={wanted}" in text and f"a {existing} queue" in text
    assert "delete_queue" in text and "README" in text
    assert "guest:guest" not in text
    assert set(queue_types(name).values()) == {existing}  # nothing was changed


def test_worker_refuses_to_start_on_queues_of_the_other_type(vhost, tmp_path):
    """``dramatiq actors`` exits (code 3) naming the queue instead of retrying forever."""
    name, url = vhost
    broker_on(url, "classic").ensure_queues()
    log = tmp_path / "worker.log"
    proc = start_worker(
        processes=1, threads=1, extra_env={"RABBITMQ_URL": url, "RABBITMQ_QUEUE_TYPE": "quorum"}, log_path=log
    )
    try:
        proc.wait(60)
    finally:
        stop_worker(proc)
    assert proc.returncode == 3, log.read_text()[-3000:]
    assert "RABBITMQ_QUEUE_TYPE=quorum" in log.read_text() and "most likely a classic queue" in log.read_text()


def test_dead_letters_reach_the_quorum_xq_and_the_tool_browses_them_twice(vhost):
    """A message rejected on a quorum step queue is dead-lettered (at least once) to its .XQ;
    the dead-letter tool reads it, gives it back, and reads it again."""
    from campaign.ops.dead_letters import XqBrowser

    name, url = vhost
    broker = broker_on(url, "quorum")
    broker.ensure_queues()
    queue = next(
        q for q in engine_queues() if q.startswith("campaign.") and q not in ("campaign.notify", "campaign.system")
    )
    msg: dramatiq.Message = dramatiq.Message(
        queue_name=queue, actor_name="generate", args=(123,), kwargs={}, options={}
    )
    broker.enqueue(msg)
    broker.close()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    method: Any = wait_for(lambda: ch.basic_get(queue=queue, auto_ack=False)[0], timeout=10, message="the message")
    ch.basic_nack(method.delivery_tag, requeue=False)
    wait_for(
        lambda: ch.queue_declare(queue=f"{queue}.XQ", passive=True).method.message_count == 1,
        timeout=10,
        message="the dead letter in the XQ",
    )
    conn.close()
    settings = Settings(rabbitmq_url=url, rabbitmq_queue_type="quorum")
    for _ in range(3):  # each browse gives the copy back: it is still there the next time
        with XqBrowser(settings) as browser:
            found = browser.browse([queue])
        assert [(m.queue, m.key) for m in found] == [(queue, msg.message_id)]


@pytest.fixture
def quorum_engine(clean_db, sb, vhost, tmp_path, monkeypatch):
    """This process's broker and real worker processes on a quorum vhost."""
    from actors.broker import setup_broker

    name, url = vhost
    monkeypatch.setenv("RABBITMQ_URL", url)
    monkeypatch.setenv("RABBITMQ_QUEUE_TYPE", "quorum")
    reset_settings()
    previous = dramatiq.get_broker()
    broker = setup_broker(get_settings())
    env = {
        "OPENROUTER_BASE_URL": sb.openrouter_url,
        "OPENROUTER_API_KEY": sb.chat_key,
        "EVOLUTION_API_URL": sb.evolution_url,
        "EVOLUTION_API_KEY": sb.evolution_key,
        "MIN_BACKOFF_SECONDS": "0.05",
        "MAX_BACKOFF_SECONDS": "1",
        "LEASE_SECONDS": "5",
        "SEND_TIMEOUT_SECONDS": "2",
    }
    log = tmp_path / "worker.log"
    proc = start_worker(processes=1, threads=4, extra_env=env, log_path=log)
    try:
        yield name, log
    finally:
        stop_worker(proc)
        broker.close()
        dramatiq.set_broker(previous)
        monkeypatch.undo()
        reset_settings()


def test_pipeline_runs_on_quorum_queues(quorum_engine, sb):
    """Workers send a campaign through the sandbox with every queue a quorum queue: each part once."""
    name, log = quorum_engine
    ws, cols = f.workspace("acme")
    ibx = f.inbox(ws, "sales", min_gap_seconds=0)
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], split_enabled=True, max_parts=3)
    run = f.run(cfg)
    for _ in range(30):
        f.message(run, f.lead(ws, cols["New"]))
    run.leads_total = 30
    run.save()
    deadline = time.monotonic() + 60
    while db.execute_sql("SELECT count(*) FROM campaign_messages WHERE status = 'pending'").fetchone()[0]:
        assert time.monotonic() < deadline, "dispatch did not drain"
        dispatch.dispatch_due(get_settings())
        time.sleep(0.2)

    def terminal() -> bool:
        return not db.execute_sql(
            "SELECT count(*) FROM campaign_messages WHERE status NOT IN ('sent', 'failed', 'skipped', 'in_doubt')"
        ).fetchone()[0]

    try:
        wait_for(terminal, timeout=120, interval=0.25, message="every message to be terminal")
    except AssertionError:
        raise AssertionError(f"not terminal; worker log tail:\n{log.read_text()[-4000:]}") from None
    c = run_counters(run.id)
    assert c["status"] == "completed" and c["leads_sent"] == 30, c
    assert_counters_match(run.id)
    sends = sb.ledger()["sends"]
    counts = collections.Counter((s["number"], s["text"]) for s in sends)
    assert [k for k, n in counts.items() if n > 1] == [] and sb.summary()["duplicate_sends"] == 0
    types = queue_types(name)
    assert types and set(types.values()) == {"quorum"}, types
