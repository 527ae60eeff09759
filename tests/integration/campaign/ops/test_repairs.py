"""``python cli.py resolve MESSAGE --sent | --resend`` for in_doubt messages (SPEC R-FAIL-4), real services."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import uuid

import pytest

import pipeline
from campaign import dispatch, recovery
from campaign.db import db
from campaign.errors import RepairRefused
from campaign.ops import dead_letters, monitor, repairs
from campaign.settings import get_settings
from models import CampaignMessage, Lead, MessagePart
from tests import ROOT
from tests.integration.campaign.ops.test_dead_letters import LONG_TEXT, _Capture, depths, engine, queues  # noqa: F401  (fixtures)
from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, make_world, run_counters
from tests.integration.workers import wait_for


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real operator CLI, from the repository root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def parts_of(message_id: int) -> list[MessagePart]:
    return list(MessagePart.select().where(MessagePart.message == message_id).order_by(MessagePart.idx))


def in_doubt_message(world, evo, settings, texts: list[str], doubt_idx: int) -> CampaignMessage:
    """A message whose part ``doubt_idx`` was left 'sending' (a crash mid-call) and found by the send step."""
    (m,) = world.add_leads(1)
    CampaignMessage.update(status="sending", generated_text=" ".join(texts)).where(CampaignMessage.id == m.id).execute()
    for i, text in enumerate(texts):
        status = "sent" if i < doubt_idx else "sending" if i == doubt_idx else "pending"
        MessagePart.create(
            message=m.id,
            inbox=m.inbox_id,
            idx=i,
            text=text,
            status=status,
            attempt_id=uuid.uuid4() if status == "sending" else None,
            sent_at=pipeline_now() if status == "sent" else None,
            provider_message_id=f"KEY{uuid.uuid4().hex[:10]}" if status == "sent" else None,
        )
    out = pipeline.send_step(m.id, settings, evo)  # the real detection: never resent, in_doubt
    assert not out.sent
    msg = CampaignMessage.get_by_id(m.id)
    assert msg.status == "in_doubt", msg.status
    return msg


def pipeline_now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def _sends(sb) -> collections.Counter:
    return collections.Counter(s["text"] for s in sb.ledger()["sends"])


def test_resolve_sent_after_an_accepted_then_lost_send_continues_with_the_rest(engine, sb):  # noqa: F811
    """accept_then_hang: part 1 reached the sandbox but the answer was lost -> in_doubt; --sent finishes it."""
    w = make_world(split=True, max_parts=3, part_gap_min_seconds=0.2, part_gap_max_seconds=0.3)
    (m,) = w.add_leads(1)
    CampaignMessage.update(generated_text=LONG_TEXT).where(CampaignMessage.id == m.id).execute()
    sb.set_faults({"send": {"rate_accept_then_hang": 1.0, "hang_mode": "close"}})
    engine.start()
    dispatch.dispatch_due(get_settings())
    wait_for(
        lambda: CampaignMessage.get_by_id(m.id).status == "in_doubt",
        timeout=40,
        message=f"the lost send to make the message in_doubt\n{engine.tail()}",
    )
    parts = parts_of(m.id)
    assert len(parts) >= 2 and [p.status for p in parts] == ["in_doubt"] + ["pending"] * (len(parts) - 1)
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_in_doubt"], c["leads_processed"]) == ("completed", 1, 1)
    assert [s["text"] for s in sb.ledger()["sends"]] == [parts[0].text]  # it did reach the provider
    sb.set_faults({"send": {"rate_accept_then_hang": 0.0}})

    done = cli("resolve", str(m.id), "--sent")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in_doubt -> sending" in done.stdout and "#1 in_doubt->sent" in done.stdout
    assert "reopened" in done.stdout and f"publish send_part({m.id}, {m.inbox_id})" in done.stdout
    wait_for(
        lambda: CampaignMessage.get_by_id(m.id).status == "sent",
        timeout=30,
        message=f"the remaining parts\n{engine.tail()}",
    )
    sends = _sends(sb)
    assert sorted(sends.elements()) == sorted(p.text for p in parts)  # part 1 never resent, the rest once
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["Contacted"].id
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_sent"], c["leads_in_doubt"], c["leads_processed"]) == ("completed", 1, 0, 1)
    assert monitor.verify() == []

    again = cli("resolve", str(m.id), "--sent")
    assert again.returncode == 2 and f"message {m.id} is 'sent', not in_doubt" in again.stderr
    assert run_counters(w.run.id) == c


def test_resolve_sent_of_the_last_part_finishes_the_message_in_one_transaction(queues, sb, evo):  # noqa: F811
    s = fast_settings()
    w = make_world()
    m = in_doubt_message(w, evo, s, ["Olá, tudo bem por aí?"], doubt_idx=0)
    assert run_counters(w.run.id)["status"] == "completed"

    done = cli("resolve", str(m.id), "--sent")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in_doubt -> sent" in done.stdout and "publish" not in done.stdout
    msg = CampaignMessage.get_by_id(m.id)
    assert msg.status == "sent" and msg.sent_at is not None and msg.error_class is None
    assert [p.status for p in parts_of(m.id)] == ["sent"]
    assert Lead.get_by_id(m.lead_id).column_id == w.cols["Contacted"].id
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_sent"], c["leads_in_doubt"], c["leads_processed"]) == ("completed", 1, 0, 1)
    assert depths()["campaign.send"] == 0  # nothing to publish
    assert sb.ledger()["sends"] == []  # and nothing was sent: the operator said it arrived
    assert monitor.verify() == []


def test_resolve_resend_sends_the_doubtful_part_again_and_never_the_sent_one(queues, sb, evo):  # noqa: F811
    s = fast_settings()
    w = make_world()
    w.add_leads(1)  # another message still pending: the run stays running
    m = in_doubt_message(w, evo, s, ["Oi!", "Vi sua loja nova.", "Posso mandar um resumo?"], doubt_idx=1)
    before = run_counters(w.run.id)
    assert (before["status"], before["leads_in_doubt"]) == ("running", 1)

    done = cli("resolve", str(m.id), "--resend")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "#1 sent (kept)" in done.stdout and "#2 in_doubt->pending" in done.stdout
    assert depths()["campaign.send"] == 1  # send_part published through the real broker
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.error_class, msg.finished_at) == ("sending", None, None)
    assert [p.status for p in parts_of(m.id)] == ["sent", "pending", "pending"]
    c = run_counters(w.run.id)
    assert (c["leads_in_doubt"], c["leads_processed"]) == (0, 0)
    assert_counters_match(w.run.id)

    while pipeline.send_step(m.id, s, evo).sent:  # what the published send_part does, in process
        pass
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert sorted(_sends(sb).elements()) == ["Posso mandar um resumo?", "Vi sua loja nova."]
    assert_counters_match(w.run.id)
    assert run_counters(w.run.id)["leads_sent"] == 1


def test_resolve_reopens_a_completed_run_on_resend(queues, evo):  # noqa: F811
    s = fast_settings()
    w = make_world()
    m = in_doubt_message(w, evo, s, ["Olá, tudo bem por aí?"], doubt_idx=0)
    assert run_counters(w.run.id)["status"] == "completed"
    published: list = []
    out = _Out()
    with db.connection_context():
        code = dead_letters.resolve(
            m.id, "resend", get_settings(), out=out, publish=lambda q, a: published.append((q, a))
        )
    assert code == 0
    assert published == [("campaign.send", (m.id, m.inbox_id))]
    assert f"run {w.run.id} reopened" in out.text
    c = run_counters(w.run.id)
    assert (c["status"], c["leads_in_doubt"], c["leads_processed"]) == ("running", 0, 0)
    assert db.execute_sql("SELECT finished_at FROM campaign_runs WHERE id = %s", (w.run.id,)).fetchone()[0] is None

    # a publish lost after the commit: 'sending' with no part in flight is the sweep's to
    # re-enqueue once its hand-off deadline passed (not before: the publish may be on its way)
    swept: list = []
    recovery.recovery_sweep(s, publish=lambda q, args: swept.append((q, args)))
    assert swept == []
    db.execute_sql("UPDATE campaign_messages SET wake_at = now() - interval '1 second' WHERE id = %s", (m.id,))
    recovery.recovery_sweep(s, publish=lambda q, args: swept.append((q, args)))
    assert swept == [("campaign.send", [(m.id, m.inbox_id)])]


class _Out:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s


def test_refusals_and_double_invocation(queues, evo):  # noqa: F811
    s = fast_settings()
    w = make_world()
    m = in_doubt_message(w, evo, s, ["Olá, tudo bem por aí?"], doubt_idx=0)

    missing = cli("resolve", "987654321", "--sent")
    assert missing.returncode == 2 and "message 987654321 does not exist" in missing.stderr
    for bad in (["resolve", str(m.id)], ["resolve", str(m.id), "--sent", "--resend"], ["resolve", "x", "--sent"]):
        proc = cli(*bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
    assert CampaignMessage.get_by_id(m.id).status == "in_doubt"  # none of that touched it

    assert cli("resolve", str(m.id), "--resend").returncode == 0
    after_first = (run_counters(w.run.id), [p.status for p in parts_of(m.id)])
    second = cli("resolve", str(m.id), "--resend")
    assert second.returncode == 2 and "is 'sending', not in_doubt: nothing to resolve" in second.stderr
    assert (run_counters(w.run.id), [p.status for p in parts_of(m.id)]) == after_first
    assert_counters_match(w.run.id)


def test_two_operators_resolving_at_once_have_one_effect(queues, evo):  # noqa: F811
    s = fast_settings()
    w = make_world()
    m = in_doubt_message(w, evo, s, ["Oi!", "Tudo bem?"], doubt_idx=0)
    start = threading.Barrier(2, timeout=20)
    results: list = []

    def operator(outcome: str) -> None:
        with db.connection_context():
            start.wait()
            try:
                results.append(repairs.resolve_in_doubt(m.id, outcome, s))
            except RepairRefused as exc:
                results.append(exc)

    threads = [threading.Thread(target=operator, args=(o,)) for o in ("sent", "resend")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(type(r).__name__ for r in results) == ["Repair", "RepairRefused"]
    assert CampaignMessage.get_by_id(m.id).status == "sending"
    c = run_counters(w.run.id)
    assert (c["leads_in_doubt"], c["leads_processed"]) == (0, 0)
    assert_counters_match(w.run.id)


@pytest.mark.parametrize("outcome", ["sent", "resend"])
def test_resolve_in_a_run_paused_by_the_operator_keeps_the_pause(queues, evo, outcome):  # noqa: F811
    s = fast_settings()
    w = make_world()
    w.add_leads(1)
    m = in_doubt_message(w, evo, s, ["Oi!", "Tudo bem?"], doubt_idx=0)
    db.execute_sql("UPDATE campaign_runs SET status = 'paused', pause_reason = 'manual' WHERE id = %s", (w.run.id,))
    repair = repairs.resolve_in_doubt(m.id, outcome, s)
    assert run_counters(w.run.id)["status"] == "paused"
    assert any("paused (manual)" in n for n in repair.notes)
    assert repair.publish == ("campaign.send", (m.id, m.inbox_id))
    assert_counters_match(w.run.id)


# --------------------------------------------------------------------------------------------
# resolve --resend must never resend a part the provider is known to have accepted (R-PIPE-5)


def test_resolve_resend_refuses_a_part_evolution_accepted(queues, evo):  # noqa: F811
    """A send that answered after its part had been marked in_doubt keeps the provider's key id on
    the part (pipeline._record_sent_part: "keep the provider's id anyway"), and the webhook then
    records its delivery: proof it went out. ``resolve --resend`` ignored that proof and sent the
    part a second time. It must refuse, name the part and its key, and change nothing."""
    from models import CampaignMessage, MessagePart
    from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, make_world, run_counters

    s = fast_settings()
    w = make_world()
    w.add_leads(1)
    m = in_doubt_message(w, evo, s, ["Oi!", "Tudo bem?"], doubt_idx=0)
    part = MessagePart.get(MessagePart.message == m.id, MessagePart.idx == 0)
    assert part.status == "in_doubt"
    key = "KEYLATE" + uuid.uuid4().hex[:8]
    assert part.attempt_id is not None  # set when the send started
    pipeline._record_sent_part(part.id, part.attempt_id, key)  # the late answer of the interrupted send
    assert MessagePart.get_by_id(part.id).provider_message_id == key
    before = (
        run_counters(w.run.id),
        [(p.status, p.provider_message_id) for p in MessagePart.select().where(MessagePart.message == m.id)],
    )

    published: list = []
    with pytest.raises(RepairRefused) as refused:
        dead_letters.resolve(m.id, "resend", s, out=_Capture(), publish=lambda q, a: published.append((q, a)))
    assert "#1" in str(refused.value) and key in str(refused.value) and "--sent" in str(refused.value)
    assert published == []
    assert CampaignMessage.get_by_id(m.id).status == "in_doubt"
    assert (
        run_counters(w.run.id),
        [(p.status, p.provider_message_id) for p in MessagePart.select().where(MessagePart.message == m.id)],
    ) == before

    # --sent is the verdict the evidence supports: part 1 kept as sent, part 2 goes out
    repair = repairs.resolve_in_doubt(m.id, "sent", s)
    assert repair.publish == ("campaign.send", (m.id, m.inbox_id))
    assert [p.status for p in MessagePart.select().where(MessagePart.message == m.id).order_by(MessagePart.idx)] == [
        "sent",
        "pending",
    ]
    assert_counters_match(w.run.id)
