"""The triage actor in real ``dramatiq`` worker processes on RabbitMQ + PostgreSQL + the sandbox
(SPEC R-IN-5, E-37): published after the reply's commit, retried with the chain's policy, and when
the LLM keeps failing the keyword rules decide, the message lands in campaign.triage.XQ and its
dead letter is recorded in PostgreSQL."""

from __future__ import annotations

import pika
import pytest

import pipeline
from campaign import steps
from campaign.db import db
from campaign.inbound import handle
from campaign.settings import get_settings
from devtools.services import purge_queues, sandbox_env, start_worker, stop_worker
from models import CampaignMessage, DeadLetter, Lead, ReplyTriage
from tests.integration import factories as f
from tests.integration.campaign.inbound.test_handle import upsert
from tests.integration.pipeline_helpers import fast_settings, to_sending
from tests.integration.workers import wait_for


@pytest.fixture
def worker(clean_db, sb, tmp_path):
    import actors

    queues = tuple(sorted(actors.broker.get_declared_queues()))
    assert steps.TRIAGE_REPLY.queue in queues
    purge_queues(get_settings().rabbitmq_url, queues)
    env = {**sandbox_env(sb), "MIN_BACKOFF_SECONDS": "0.05", "MAX_BACKOFF_SECONDS": "0.5", "MAX_ATTEMPTS": "3"}
    log = tmp_path / "worker.log"
    proc = start_worker(processes=1, threads=2, extra_env=env, log_path=log)
    yield log
    stop_worker(proc)
    purge_queues(get_settings().rabbitmq_url, queues)


def _world(llm, evo):
    settings = fast_settings()
    ws, cols = f.workspace("acme", columns=("New", "Contacted", "Replied", "Hot"))
    ibx = f.inbox(ws, "sales-0", min_gap_seconds=0)
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], reply_column=cols["Replied"], triage_enabled=True)
    db.execute_sql(
        "INSERT INTO campaign_triage_columns (config_id, workspace_id, intent, column_id) VALUES (%s, %s, %s, %s)",
        (cfg.id, ws.id, "interested", cols["Hot"].id),
    )
    run = f.run(cfg, leads_total=1)
    lead = f.lead(ws, cols["New"])
    m = f.message(run, lead, inbox=ibx.id)
    to_sending(m.id, settings, llm)
    while CampaignMessage.get_by_id(m.id).status == "sending":
        pipeline.send_step(m.id, settings, evo)
    return settings, cols, ibx, Lead.get_by_id(lead.id)


def _xq_depth(queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(get_settings().rabbitmq_url))
    try:
        return conn.channel().queue_declare(queue=f"{queue}.XQ", passive=True).method.message_count
    finally:
        conn.close()


def test_a_reply_is_triaged_by_a_worker_right_after_its_commit(worker, sb, llm, evo):
    """R-IN-5: the reply handler publishes triage_reply after its commit; a worker classifies it
    (`interested`) and the lead lands in the mapped column within seconds, no sweep needed."""
    settings, cols, ibx, lead = _world(llm, evo)
    result = handle(upsert(ibx.instance_name, lead.phone, "Tenho interesse, me conta mais"), settings)
    assert result.triage_id is not None
    wait_for(
        lambda: ReplyTriage.get_by_id(result.triage_id).status != "pending",
        timeout=30,
        message=f"the triage to finish\n{worker.read_text()[-3000:]}",
    )
    row = ReplyTriage.get_by_id(result.triage_id)
    assert (row.status, row.intent) == ("done", "interested")
    assert Lead.get_by_id(lead.id).column_id == cols["Hot"].id


def test_e37_llm_down_for_good_keyword_rules_decide_and_the_dead_letter_is_kept(worker, sb, llm, evo):
    """E-37 / R-FAIL-3: every triage call answers 502: after MAX_ATTEMPTS the keyword rules decide
    (`other`), the lead goes to reply_column, the message is in campaign.triage.XQ and a
    dead_letters row (no campaign message) records it; nothing is pending."""
    settings, cols, ibx, lead = _world(llm, evo)
    sb.set_faults({"triage": {"always_status": 502}})
    result = handle(upsert(ibx.instance_name, lead.phone, "Tenho interesse"), settings)
    wait_for(
        lambda: DeadLetter.select().count() == 1,
        timeout=60,
        message=f"the dead letter\n{worker.read_text()[-3000:]}",
    )
    row = ReplyTriage.get_by_id(result.triage_id)
    assert (row.status, row.intent, row.attempts) == ("fallback", "other", 3)
    assert Lead.get_by_id(lead.id).column_id == cols["Replied"].id
    dead = DeadLetter.get()
    assert (dead.queue, dead.actor, dead.campaign_message_id) == ("campaign.triage", "triage_reply", None)
    assert dead.run_id == row.run_id
    wait_for(lambda: _xq_depth(steps.TRIAGE_REPLY.queue) == 1, timeout=10, message="the .XQ copy")
    assert sb.summary()["by_route"]["triage"] == {"always_502": 3}


def test_the_dead_letter_tool_lists_a_triage_dead_letter_and_replays_nothing(worker, sb, llm, evo, capsys):
    """R-OPS-2 / E-37: the triage dead letter is listed with its run and no campaign message (its
    argument is a reply_triage id), and --requeue resolves it without publishing: the keyword rules
    already decided the reply."""
    import argparse

    from campaign.ops import dead_letters

    settings, cols, ibx, lead = _world(llm, evo)
    sb.set_faults({"triage": {"always_status": 502}})
    handle(upsert(ibx.instance_name, lead.phone, "Tenho interesse"), settings)
    wait_for(lambda: DeadLetter.select().count() == 1, timeout=60, message="the dead letter")
    (item,) = dead_letters.collect([], include_resolved=False)
    assert item.campaign_message_id is None and item.run_id == ReplyTriage.get().run_id
    published: list = []
    parser = argparse.ArgumentParser()
    dead_letters.add_arguments(parser)
    code = dead_letters.run(
        parser.parse_args(["--requeue"]), get_settings(), publish=lambda q, a: published.append((q, a))
    )
    assert code == dead_letters.EXIT_OK and published == []
    dead = DeadLetter.get()
    assert dead.status == "resolved" and "keyword rules decided it" in (dead.note or "")
    assert capsys.readouterr()
