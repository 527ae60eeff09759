"""R-OBS-1 on real services: every process's /metrics after a run through the sandbox.

Real worker processes (2, Dramatiq's multiprocess Prometheus middleware), webhook.py receiving the
sandbox's receipts and replies, inbound.py, and the active scheduler computing the database
gauges: each engine metric equals its row count, and no scrape carries a high-cardinality label.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from campaign import metrics
from campaign.db import db
from campaign.ops.monitor import queue_names
from campaign.settings import get_settings
from devtools.services import purge_queues, start_worker, stop_worker
from tests.integration import factories as f
from tests.integration.workers import wait_for

ROOT = Path(__file__).resolve().parents[2]  # the repository
SECRET = "whsec-metrics-test"

#: labels Dramatiq's middleware and prometheus_client's default collectors use (all bounded)
LIBRARY_LABELS = {"queue_name", "actor_name", "le", "implementation", "major", "minor", "patchlevel", "version"}
LIBRARY_LABELS |= {"generation"}
# Dramatiq's dramatiq_delayed_messages_inprogress is a multiprocess gauge in "all" mode: one series
# per worker process (pid), bounded by the processes a worker runs
LIBRARY_LABELS |= {"pid"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape_text(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    r.raise_for_status()
    return r.text


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _pick(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v for (n, k), v in samples.items() if n == name and all(dict(k).get(a) == b for a, b in labels.items())}


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),
        text=True,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_answering(port: int, proc: Any, log: Path, timeout: float = 60) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"process exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return bool(_scrape_text(port))
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, interval=0.2, message=f"/metrics on :{port}")


def _rows(sql: str) -> list[tuple]:
    return list(db.execute_sql(sql).fetchall())


@pytest.fixture
def stack(clean_db, sb, tmp_path):
    """Workers + webhook + inbound consumer, all with metrics on; the scheduler is started by the test."""
    import actors

    settings = get_settings()
    queues = tuple(sorted(actors.broker.get_declared_queues()))
    purge_queues(settings.rabbitmq_url, queues)
    procs: list[Any] = []  # subprocess.Popen, and the workers' devtools.services.Workers
    ports = {name: _free_port() for name in ("worker", "webhook", "inbound", "scheduler")}
    engine_env = {
        "OPENROUTER_BASE_URL": sb.openrouter_url,
        "OPENROUTER_API_KEY": sb.chat_key,
        "EVOLUTION_API_URL": sb.evolution_url,
        "EVOLUTION_API_KEY": sb.evolution_key,
        "WEBHOOK_SECRET": SECRET,
        "MIN_BACKOFF_SECONDS": "0.05",
        "MAX_BACKOFF_SECONDS": "1",
        "MAX_ATTEMPTS": "3",
        "LEASE_SECONDS": "5",
        "SEND_TIMEOUT_SECONDS": "2",
    }
    prom_db = tmp_path / "prom"
    prom_db.mkdir()
    worker = start_worker(
        processes=2,
        threads=4,
        log_path=tmp_path / "worker.log",
        extra_env={
            **engine_env,
            "METRICS_PORT": "0",  # turns the middleware on; the workers serve on dramatiq_prom_port
            "dramatiq_prom_port": str(ports["worker"]),
            "dramatiq_prom_host": "127.0.0.1",
            "dramatiq_prom_db": str(prom_db),
        },
    )
    procs.append(worker)
    webhook = _spawn(
        ["webhook.py", "--host", "127.0.0.1", "--port", "0"],
        {**engine_env, "METRICS_PORT": str(ports["webhook"])},
        tmp_path / "webhook.log",
    )
    procs.append(webhook)
    inbound = _spawn(
        ["inbound.py"],
        {**engine_env, "METRICS_PORT": str(ports["inbound"]), "EVOLUTION_EVENTS_RABBITMQ_URL": settings.rabbitmq_url},
        tmp_path / "inbound.log",
    )
    procs.append(inbound)
    line = webhook.stdout.readline() if webhook.stdout else ""
    assert "webhook listening on" in line, (tmp_path / "webhook.log").read_text()[-3000:]

    class Stack:
        env = engine_env
        port = ports
        prom = prom_db
        logs = tmp_path
        webhook_url = line.split()[-1].rstrip("/") + "/webhook"

        def start_scheduler(self) -> subprocess.Popen:
            proc = _spawn(["scheduler.py"], {**engine_env, "METRICS_PORT": str(ports["scheduler"])}, tmp_path / "s.log")
            procs.append(proc)
            return proc

    yield Stack()
    for proc in procs:
        if proc is worker:
            stop_worker(proc)
        else:
            _stop(proc)
    purge_queues(settings.rabbitmq_url, queues)


def test_metrics_equal_row_counts_after_a_run_with_faults_and_no_label_is_high_cardinality(stack, sb):
    """R-OBS-1: sent / failed / skipped messages, sent parts, replies, dead letters and the scheduler's
    leader flag as scraped equal PostgreSQL's rows; the workers' endpoint sums both processes; every
    endpoint answers and carries bounded labels only (no lead, phone, message id or text)."""
    ws, cols = f.workspace("acme")
    ibx = f.inbox(ws, "sales-1", min_gap_seconds=0)
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="first-touch")
    run = f.run(cfg)
    leads = [f.lead(ws, cols["New"]) for _ in range(10)]
    for ld in leads:
        f.message(run, ld)
    run.leads_total = len(leads)
    run.save()
    bad = [ld.phone.lstrip("+") for ld in leads[:2]]  # fault: two numbers are not on WhatsApp -> failed
    sb.set_faults(
        invalid_numbers=bad,
        send={"rate_500": 0.2},  # fault: transient gateway errors, retried
        webhook_url=stack.webhook_url,
        webhook_secret=SECRET,
        webhook_events=["messages.update", "messages.upsert"],
        replies={"rate": 0.5, "after_part": 1, "delay_ms": 50},
    )
    scheduler = stack.start_scheduler()  # dispatches the run and computes the database gauges
    _wait_answering(stack.port["scheduler"], scheduler, stack.logs / "s.log")

    def terminal() -> bool:
        return not _rows(
            "SELECT 1 FROM campaign_messages WHERE status NOT IN ('sent', 'failed', 'skipped', 'in_doubt') LIMIT 1"
        )

    wait_for(terminal, timeout=120, interval=0.5, message="every message terminal")
    replies_expected = sum(1 for s in sb.ledger()["sends"] if s["outcome"] == "ok")
    assert replies_expected >= 4  # 8 good numbers, some replying: the run really went through

    def settled() -> bool:  # replies stop arriving (each replying lead replies once)
        n = _rows("SELECT count(*) FROM inbound_events")[0][0]
        time.sleep(1.5)
        return n > 0 and n == _rows("SELECT count(*) FROM inbound_events")[0][0]

    wait_for(settled, timeout=60, interval=0.1, message="replies to settle")
    settled_at = time.time()

    def refreshed_after() -> bool:
        got = _pick(_samples(_scrape_text(stack.port["scheduler"])), "campaign_metrics_refreshed_timestamp_seconds")
        return bool(got) and next(iter(got.values())) > settled_at

    wait_for(refreshed_after, timeout=40, interval=0.5, message="a refresh of the database gauges")
    scraped = _samples(_scrape_text(stack.port["scheduler"]))

    # messages by status: exactly the rows, label set for label set
    rows = _rows("""SELECT m.status, count(*) FROM campaign_messages m GROUP BY 1""")  # one workspace, one campaign
    got = {dict(k)["status"]: v for k, v in _pick(scraped, "campaign_messages").items()}
    assert got == {status: float(n) for status, n in rows}
    assert got.get("failed") == 2.0
    failed_reasons = _pick(scraped, "campaign_messages_ended", outcome="failed")
    assert sum(failed_reasons.values()) == 2.0 and all(dict(k)["reason"] for k in failed_reasons)
    # parts by status, sent first
    parts = dict(_rows("SELECT status, count(*) FROM message_parts GROUP BY 1"))
    got_parts = {dict(k)["status"]: v for k, v in _pick(scraped, "campaign_message_parts").items()}
    assert got_parts == {s: float(n) for s, n in parts.items()} and got_parts["sent"] >= 1
    # replies / opt-outs per inbox and outcome
    inbound = dict(_rows("SELECT outcome, count(*) FROM inbound_events GROUP BY 1"))
    got_inbound = {dict(k)["outcome"]: v for k, v in _pick(scraped, "campaign_inbound_events", inbox="sales-1").items()}
    assert got_inbound == {o: float(n) for o, n in inbound.items()}
    # the inbox's pacing and health
    assert _pick(scraped, "campaign_inbox_parts_sent_last_hour", inbox="sales-1") == {
        (("inbox", "sales-1"), ("workspace", "acme")): float(parts["sent"])
    }
    assert sum(_pick(scraped, "campaign_inbox_connection_state", inbox="sales-1").values()) == 1.0
    # dead letters, in doubt, stuck: the rows (none here) and nothing invented
    assert (
        sum(_pick(scraped, "campaign_dead_letters").values())
        == _rows("SELECT count(*) FROM dead_letters WHERE status = 'dead'")[0][0]
    )
    assert _pick(scraped, "campaign_messages_stuck") == {(): 0.0}
    # queue depths for every pipeline queue; the R-OPS-4 alert kinds; the leader and its heartbeat
    assert {dict(k)["queue"] for k in _pick(scraped, "campaign_queue_messages")} == set(queue_names())
    assert {dict(k)["alert"] for k in _pick(scraped, "campaign_alerts")} == set(metrics.ALERT_KINDS)
    assert _pick(scraped, "campaign_scheduler_leader") == {(): 1.0}
    beat = _pick(scraped, "campaign_scheduler_heartbeat_timestamp_seconds")[()]
    assert abs(time.time() - beat) < 60

    # the webhook counted the sandbox's receipts and replies (every one answered 200)
    webhook = _samples(_scrape_text(stack.port["webhook"]))
    assert sum(_pick(webhook, "campaign_webhook_requests_total", outcome="200").values()) >= inbound["reply"]
    # the inbound consumer answers (its tallies are a counter family, empty here: nothing on its queues)
    inbound_text = _scrape_text(stack.port["inbound"])
    assert "campaign_inbound_consumed" in inbound_text and "process_cpu_seconds_total" in inbound_text

    # the workers: one endpoint, the sum of both processes' files (multiprocess mode)
    workers = _samples(_scrape_text(stack.port["worker"]))
    pids = {m.group(1) for p in stack.prom.iterdir() if (m := re.search(r"_(\d+)\.db$", p.name))}
    assert len(pids) >= 2, sorted(p.name for p in stack.prom.iterdir())
    sends_done = sum(_pick(workers, "dramatiq_messages_total", actor_name="send_part").values())
    assert sends_done >= parts["sent"] + 2  # every sent part, plus the failed sends at least

    # no scrape carries a lead, a phone, a message id or a text
    phones = {ld.phone.lstrip("+") for ld in leads}
    texts = {t for (t,) in _rows("SELECT generated_text FROM campaign_messages WHERE generated_text IS NOT NULL")}
    for name, samples in (("scheduler", scraped), ("webhook", webhook), ("workers", workers)):
        for (_metric, labels), _value in samples.items():
            for label, value in labels:
                assert label in metrics.LABELS | LIBRARY_LABELS, f"{name}: unexpected label {label}={value!r}"
                assert not re.search(r"\d{8,}", value), f"{name}: {label}={value!r} looks like a phone or an id"
                assert value not in phones and value not in texts, f"{name}: {label} carries lead data"
    for metric, _labels in scraped:
        assert metric.startswith(("campaign_", "process_", "python_")), metric


def test_a_standby_scheduler_exports_no_database_gauge(clean_db, tmp_path):
    """R-OBS-1: only the leader exports the database gauges, so a sum over every scheduler never
    counts twice; the standby says it is not the leader."""
    ports = [_free_port(), _free_port()]
    env = {"EVOLUTION_API_URL": "http://127.0.0.1:9"}
    first = _spawn(["scheduler.py"], {**env, "METRICS_PORT": str(ports[0])}, tmp_path / "s1.log")
    try:
        _wait_answering(ports[0], first, tmp_path / "s1.log")
        wait_for(
            lambda: _pick(_samples(_scrape_text(ports[0])), "campaign_messages_stuck"),
            timeout=30,
            message="the leader's first refresh",
        )
        second = _spawn(["scheduler.py"], {**env, "METRICS_PORT": str(ports[1])}, tmp_path / "s2.log")
        try:
            _wait_answering(ports[1], second, tmp_path / "s2.log")
            standby = _samples(_scrape_text(ports[1]))
            assert _pick(standby, "campaign_scheduler_leader") == {(): 0.0}
            assert not [n for (n, _k) in standby if n.startswith("campaign_") and n != "campaign_scheduler_leader"]
            leader = _samples(_scrape_text(ports[0]))
            assert _pick(leader, "campaign_scheduler_leader") == {(): 1.0}
        finally:
            _stop(second)
    finally:
        _stop(first)


def test_metrics_port_taken_is_a_clear_start_up_error(clean_db, tmp_path):
    """R-OBS-1: a METRICS_PORT another process holds stops the scheduler with the variable named."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "scheduler.py"],
            cwd=ROOT,
            env={**os.environ, "METRICS_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and f"METRICS_PORT={port}" in proc.stderr, proc.stderr[-2000:]


def test_every_endpoint_answers_while_rabbitmq_is_down_and_after_it_is_back(clean_db, sb, tmp_path):
    """R-OBS-1: a scrape during a RabbitMQ outage gets an answer from every process (workers'
    multiprocess endpoint, scheduler, inbound consumer, webhook), and the processes are still
    there when the broker is back. The broker is a node of our own (devtools.rabbit_cluster, one
    node on its own ports and data directory), killed with SIGKILL: the machine's node, which
    other test runs share, is never touched."""
    import shutil
    import tempfile

    from devtools.rabbit_cluster import Cluster, free_port_block

    node_dir = Path(tempfile.mkdtemp(prefix="ce-test-metrics-rmq-"))  # /tmp: reachable by the rabbitmq user
    rmq = Cluster(node_dir, free_port_block(1), size=1)
    procs: list[Any] = []
    worker: Any = None
    try:
        rmq.start()
        url = rmq.url()
        ports = {name: _free_port() for name in ("worker", "webhook", "inbound", "scheduler")}
        env = {
            "RABBITMQ_URL": url,
            "EVOLUTION_EVENTS_RABBITMQ_URL": url,
            "OPENROUTER_BASE_URL": sb.openrouter_url,
            "OPENROUTER_API_KEY": sb.chat_key,
            "EVOLUTION_API_URL": sb.evolution_url,
            "EVOLUTION_API_KEY": sb.evolution_key,
            "WEBHOOK_SECRET": SECRET,
        }
        prom_db = tmp_path / "prom"
        prom_db.mkdir()
        worker = start_worker(
            processes=2,
            threads=2,
            log_path=tmp_path / "worker.log",
            extra_env={
                **env,
                "METRICS_PORT": "0",
                "dramatiq_prom_port": str(ports["worker"]),
                "dramatiq_prom_host": "127.0.0.1",
                "dramatiq_prom_db": str(prom_db),
            },
        )
        logs = {name: tmp_path / f"{name}.log" for name in ("webhook", "inbound", "scheduler")}
        commands = {"webhook": ["webhook.py", "--host", "127.0.0.1", "--port", "0"], "inbound": ["inbound.py"]}
        commands["scheduler"] = ["scheduler.py"]
        by_name = {
            name: _spawn(command, {**env, "METRICS_PORT": str(ports[name])}, logs[name])
            for name, command in commands.items()
        }
        procs.extend(by_name.values())
        for name, proc in by_name.items():
            _wait_answering(ports[name], proc, logs[name])

        def worker_answers() -> bool:  # 200 with an empty body until a worker process has counted something
            try:
                return httpx.get(f"http://127.0.0.1:{ports['worker']}/metrics", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(worker_answers, timeout=60, message="the workers' /metrics")
        wait_for(
            lambda: "campaign_queue_messages" in _scrape_text(ports["scheduler"]),
            timeout=60,
            message="the scheduler's queue depth gauges",
        )

        rmq.kill_node(rmq.nodes[0])
        down_until = time.monotonic() + 8
        scrapes = 0
        while time.monotonic() < down_until:
            for name, port in ports.items():
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)  # raises when refused or > 5 s
                assert answer.status_code == 200, f"{name} /metrics answered {answer.status_code} during the outage"
                assert name == "worker" or "campaign_" in answer.text, f"{name} /metrics lost the engine's metrics"
                scrapes += 1
            time.sleep(0.5)
        assert scrapes >= 4 * len(ports)
        for name, proc in by_name.items():
            assert proc.poll() is None, f"{name} exited during the outage:\n{logs[name].read_text()[-3000:]}"

        rmq.start_node(rmq.nodes[0])
        rmq.await_node(rmq.nodes[0])
        for name, port in ports.items():
            assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200, name
        for name, proc in by_name.items():
            assert proc.poll() is None, f"{name} exited after the outage:\n{logs[name].read_text()[-3000:]}"
    finally:
        for proc in procs:
            _stop(proc)
        if worker is not None:
            stop_worker(worker)
        rmq.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
