"""RABBITMQ_QUEUE_TYPE=quorum on the real RabbitMQ (R-SCALE-1), each test on its own vhost.

Queue types are read back from RabbitMQ itself (``rabbitmqctl list_queues -p VHOST name type``),
not from what the broker believes it declared.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pika
import pytest

from campaign import dispatch
from campaign.db import db
from campaign.settings import Settings, get_settings
from devtools.services import (
    create_vhost,
    delete_vhost,
    rabbitmqctl,
    rabbitmqctl_command,
    start_worker,
    stop_worker,
)
from tests.integration import factories as f
from tests.integration.conftest import RUN
from tests.integration.pipeline_helpers import assert_counters_match, run_counters
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.workers import quorum_engine_on, wait_for

RABBIT_BASE_URL = RUN.rabbit_base_url
RABBITMQCTL = rabbitmqctl_command()
RUN_ID = RUN.name


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
    url = create_vhost(name, RABBIT_BASE_URL)
    try:
        yield name, url
    finally:
        delete_vhost(name)


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
    assert proc.poll() == 3, log.read_text()[-3000:]
    assert "RABBITMQ_QUEUE_TYPE=quorum" in log.read_text() and "most likely a classic queue" in log.read_text()


def test_scheduler_refuses_to_start_on_queues_of_the_other_type(vhost, tmp_path):
    """``python scheduler.py`` exits with code 2 naming the queue and the way out, before it takes
    the leader lock or runs a job."""
    from tests import ROOT

    name, url = vhost
    broker_on(url, "quorum").ensure_queues()
    env = {**os.environ, "RABBITMQ_URL": url, "RABBITMQ_QUEUE_TYPE": "classic", "METRICS_PORT": ""}
    done = subprocess.run(
        [sys.executable, "scheduler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RABBITMQ_QUEUE_TYPE=classic" in done.stderr and "most likely a quorum queue" in done.stderr
    assert f"vhost {name!r}" in done.stderr and "guest:guest" not in done.stderr
    assert set(queue_types(name).values()) == {"quorum"}  # nothing was changed


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
    name, url = vhost
    log = tmp_path / "worker.log"
    with quorum_engine_on(url, sb, log, monkeypatch):
        yield name, log


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


# --------------------------------------------------------------------------------------------
# R-SCALE-2: several nodes in RABBITMQ_URL. The "node" that dies is a TCP proxy in front of the
# real RabbitMQ (tests/tcp_proxy.py): the clients' side of a failover, on one machine. Losing a
# real node of a cluster (replication, T-REL-3) needs the 3-node cluster of devtools.
# --------------------------------------------------------------------------------------------

RABBIT_PORT = urlsplit(RABBIT_BASE_URL).port or 5672


def nodes(proxy: TcpProxy, url: str) -> str:
    """RABBITMQ_URL naming the proxy first, then the real node (same credentials and vhost)."""
    parts = urlsplit(url)
    first = urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"))
    return f"{first};{url}"


@pytest.fixture
def failover_engine(clean_db, sb, vhost, tmp_path, monkeypatch):
    """Workers and this process's publisher on quorum queues, RABBITMQ_URL = proxy;real node."""
    name, url = vhost
    proxy = TcpProxy(RABBIT_PORT)
    log = tmp_path / "worker.log"
    try:
        with quorum_engine_on(nodes(proxy, url), sb, log, monkeypatch, HANDOFF_GRACE_SECONDS="3"):
            yield proxy, log
    finally:
        proxy.kill()


def _dispatch_pending(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while db.execute_sql("SELECT count(*) FROM campaign_messages WHERE status = 'pending'").fetchone()[0]:
        assert time.monotonic() < deadline, "dispatch did not drain"
        dispatch.dispatch_due(get_settings())
        time.sleep(0.2)


def test_workers_and_publisher_move_to_the_next_node_when_theirs_dies_mid_run(failover_engine, sb):
    """R-SCALE-2 (client side): the node every process is connected to dies mid-run; workers and the
    dispatcher reconnect to the next node of RABBITMQ_URL: nothing lost, no part sent twice,
    every message final."""
    proxy, log = failover_engine

    ws, cols = f.workspace("acme")
    # paced (~250 parts at >= 0.04 s: the run lasts ~10 s), so the node dies with the run under way
    # whatever the machine's speed: unpaced, a fast engine finished before the kill and the test
    # proved nothing
    ibx = f.inbox(ws, "sales", min_gap_seconds=0.04)
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], split_enabled=True, max_parts=3)
    run = f.run(cfg)
    total = 120
    for _ in range(total):
        f.message(run, f.lead(ws, cols["New"]))
    run.leads_total = total
    run.save()
    _dispatch_pending()
    wait_for(lambda: len(sb.ledger()["sends"]) >= 20, timeout=60, message="the run to be under way")
    assert proxy.accepted >= 2, "the worker did not connect through the first node"

    def terminal() -> bool:
        return not db.execute_sql(
            "SELECT count(*) FROM campaign_messages WHERE status NOT IN ('sent', 'failed', 'skipped', 'in_doubt')"
        ).fetchone()[0]

    proxy.kill()
    assert not terminal(), "the run was over before the node died: the scenario tested nothing"

    try:
        wait_for(terminal, timeout=180, interval=0.25, message="every message to be terminal")
    except AssertionError:
        raise AssertionError(f"not terminal; worker log tail:\n{log.read_text()[-4000:]}") from None
    c = run_counters(run.id)
    assert c["status"] == "completed", c
    assert_counters_match(run.id)
    statuses = dict(db.execute_sql("SELECT status, count(*) FROM campaign_messages GROUP BY 1").fetchall())
    assert set(statuses) <= {"sent", "in_doubt"} and sum(statuses.values()) == total, statuses
    sends = sb.ledger()["sends"]
    counts = collections.Counter((s["number"], s["text"]) for s in sends)
    assert [k for k, n in counts.items() if n > 1] == [] and sb.summary()["duplicate_sends"] == 0
    sent_parts = db.execute_sql("SELECT provider_message_id FROM message_parts WHERE status = 'sent'").fetchall()
    assert sorted(r[0] for r in sent_parts) == sorted(s["key_id"] for s in sends if s["outcome"] == "ok")
    assert "Restarting consumer" in log.read_text()  # the workers did lose their node


def test_dead_letter_tool_and_status_connect_to_the_next_node(vhost):
    """R-SCALE-2: the first node of RABBITMQ_URL is down: the dead-letter tool and `status` use the next."""
    from campaign.ops.dead_letters import XqBrowser
    from campaign.ops.monitor import queue_depths

    name, url = vhost
    proxy = TcpProxy(RABBIT_PORT)
    proxy.kill()
    settings = Settings(rabbitmq_url=nodes(proxy, url), rabbitmq_queue_type="quorum")
    broker = broker_on(url, "quorum")
    broker.ensure_queues()
    broker.close()
    with XqBrowser(settings) as browser:
        assert browser.browse(["campaign.send"]) == []
    depths, error = queue_depths(settings)
    assert error is None and depths["campaign.send.XQ"] == 0


def test_inbound_consumer_moves_to_the_next_node_when_its_node_dies(clean_db, services):
    """R-SCALE-2: inbound.py's consumer loses its node, reconnects to the next and keeps applying events."""
    import dataclasses
    import json
    import threading

    from campaign.inbound.consumer import InboundConsumer
    from models import CampaignRun, Lead
    from tests.integration.campaign.inbound.test_handle import upsert
    from tests.integration.pipeline_helpers import make_world

    proxy = TcpProxy(RABBIT_PORT)
    settings = dataclasses.replace(
        get_settings(),
        evolution_events_rabbitmq_url=nodes(proxy, services["RABBITMQ_URL"]),
        evolution_events_exchange="evolution_failover",
        evolution_events_prefix=f"evofo{uuid.uuid4().hex[:6]}",
    )
    consumer = InboundConsumer(settings)
    t = threading.Thread(target=consumer.run, name="inbound-failover", daemon=True)
    t.start()
    try:
        assert consumer.ready.wait(15), "consumer did not start"
        assert proxy.accepted == 1
        proxy.kill()
        wait_for(lambda: consumer.stats.reconnects >= 1 and consumer.ready.is_set(), timeout=30, message="a reconnect")
        w = make_world("failover")
        msgs = w.add_leads(5)
        conn = pika.BlockingConnection(pika.URLParameters(services["RABBITMQ_URL"]))
        ch = conn.channel()
        ch.confirm_delivery()
        for m in msgs:
            doc = upsert(w.inboxes[0].instance_name, Lead.get_by_id(m.lead_id).phone, "Oi", key=f"FO-{m.id}")
            ch.basic_publish(settings.evolution_events_exchange, doc["event"], json.dumps(doc).encode())
        conn.close()
        wait_for(
            lambda: CampaignRun.get_by_id(w.run.id).leads_skipped == 5, timeout=30, message="the 5 replies applied"
        )
    finally:
        consumer.stop()
        t.join(15)
        if not proxy.killed:
            proxy.kill()


def test_a_publish_refused_for_seconds_is_retried_until_the_queue_takes_it(vhost):
    """The broker nacks publishes (as a quorum queue does while it elects a new leader after a node
    died): Dramatiq's 6 immediate attempts would give up; the engine's broker keeps retrying with
    backoff (PUBLISH_RETRY_SECONDS) and the message lands once the queue accepts again. Real
    RabbitMQ: a policy max-length 0 + overflow reject-publish makes it nack every publish."""
    import threading

    from actors.broker import PUBLISH_RETRY_SECONDS

    name, url = vhost
    broker = broker_on(url, "quorum")
    try:
        queue = "campaign.system"
        broker.ensure_queues()
        rabbitmqctl(
            "set_policy", "-p", name, "--apply-to", "queues", "refuse", f"^{queue}$",
            '{"max-length": 0, "overflow": "reject-publish"}',
        )  # fmt: skip
        wait_for(lambda: "refuse" in rabbitmqctl("list_queues", "-p", name, "name", "policy"), timeout=30)
        lifted = threading.Timer(3.0, rabbitmqctl, args=("clear_policy", "-p", name, "refuse"))
        started = time.monotonic()
        lifted.start()
        try:
            message = broker.enqueue(
                dramatiq.Message(queue_name=queue, actor_name="ping", args=("x",), kwargs={}, options={})
            )
        finally:
            lifted.join()
        took = time.monotonic() - started
        assert took >= 2.5, f"the publish was accepted after {took:.1f} s while the policy refused it"
        assert took < PUBLISH_RETRY_SECONDS
        assert broker.get_queue_message_counts(queue)[0] == 1
        assert message.queue_name == queue

        # refused for longer than the retry budget: the publish fails loudly (the sweep re-publishes)
        rabbitmqctl(
            "set_policy", "-p", name, "--apply-to", "queues", "refuse", f"^{queue}$",
            '{"max-length": 0, "overflow": "reject-publish"}',
        )  # fmt: skip
        wait_for(lambda: "refuse" in rabbitmqctl("list_queues", "-p", name, "name", "policy"), timeout=30)
        broker.publish_retry_seconds = 1.0
        with pytest.raises(dramatiq.errors.ConnectionClosed):
            broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="ping", args=("y",), kwargs={}, options={}))
    finally:
        broker.close()
