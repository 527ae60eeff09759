"""Listening (SPEC §4.6a): replies stop the sequence, opt-outs stick, connection changes apply at
once, the conversation log holds both directions. Real PostgreSQL + the HTTP sandbox."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

import pipeline
from campaign.db import db
from campaign.inbound import handle
from campaign.ops import configfile, leads_import
from campaign.planner import plan_run
from models import CampaignMessage, CampaignRun, Inbox, Lead
from tests.integration import factories as f
from tests.integration.pipeline_helpers import assert_counters_match, fast_settings, make_world, parts_of, to_sending

_ids = itertools.count(1)


@pytest.fixture
def settings():
    return fast_settings()


def upsert(instance: str, phone: str, text: str | None = "Oi", *, key: str | None = None, **key_extra) -> dict:
    """A ``messages.upsert`` envelope as Evolution publishes it (SPEC §5)."""
    message = {"conversation": text} if text is not None else {"audioMessage": {"seconds": 4}}
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {
                "remoteJid": f"{phone.lstrip('+')}@s.whatsapp.net",
                "fromMe": False,
                "id": key or f"IN{next(_ids):012d}",
                **key_extra,
            },
            "pushName": "Lead",
            "status": "DELIVERY_ACK",
            "message": message,
            "messageType": "conversation" if text is not None else "audioMessage",
            "messageTimestamp": int(dt.datetime.now(dt.UTC).timestamp()),
            "source": "android",
        },
        "date_time": dt.datetime.now(dt.UTC).isoformat(),
        "sender": "5511999990000@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": "x",
    }


def connection(instance: str, state: str, at: dt.datetime | None = None) -> dict:
    """A ``connection.update`` envelope."""
    return {
        "event": "connection.update",
        "instance": instance,
        "data": {"instance": instance, "state": state, "statusReason": 200 if state == "open" else 428},
        "date_time": (at or dt.datetime.now(dt.UTC)).isoformat(),
    }


def _two_parts(w, settings, llm):
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    db.execute_sql("DELETE FROM message_parts WHERE message_id = %s", (m.id,))
    db.execute_sql(
        "INSERT INTO message_parts (message_id, inbox_id, idx, text) "
        "VALUES (%s, %s, 0, 'Olá!'), (%s, %s, 1, 'Tudo bem?')",
        (m.id, m.inbox_id, m.id, m.inbox_id),
    )
    return m


def _reply_world(name: str = "acme", **kw):
    w = make_world(name, split=True, max_parts=3, **kw)
    db.execute_sql(
        "UPDATE campaign_configs SET reply_column_id = %s WHERE id = %s", (w.cols["Replied"].id, w.config.id)
    )
    return w


def test_e27_reply_between_parts_stops_the_rest_and_moves_the_lead(clean_db, sb, llm, evo, settings):
    """E-27: part 1 went out, the lead answers: part 2 is never sent; the message is `sent` with
    part 2 `skipped`; the lead goes to reply_column; counters exact."""
    w = _reply_world()
    m = _two_parts(w, settings, llm)
    assert pipeline.send_step(m.id, settings, evo).sent
    lead = Lead.get_by_id(m.lead_id)
    result = handle(upsert(w.inboxes[0].instance_name, lead.phone, "Oi! Me conta mais"), settings)
    assert result.result == "reply" and result.ended == [m.id]
    assert pipeline.send_step(m.id, settings, evo).sent is False  # the delayed next part does nothing
    assert [p.status for p in parts_of(m.id)] == ["sent", "skipped"]
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.stop_reason) == ("sent", "replied")
    assert len(sb.ledger()["sends"]) == 1
    lead = Lead.get_by_id(m.lead_id)
    assert lead.column_id == w.cols["Replied"].id and lead.last_reply_at is not None and not lead.opted_out
    assert_counters_match(w.run.id)


def test_reply_skips_not_started_messages_in_every_campaign_and_logs_both_directions(clean_db, sb, llm, evo, settings):
    """R-IN-3/R-IN-6: a reply skips the lead's not-started messages of every campaign of the
    workspace (`replied`); the conversation holds the sent part and the reply, in order."""
    w = _reply_world()
    m = _two_parts(w, settings, llm)
    assert pipeline.send_step(m.id, settings, evo).sent
    other_cfg = f.config(w.ws, w.inboxes[0], w.cols["New"], w.cols["Contacted"], name="second")
    other_run = f.run(other_cfg)
    lead = Lead.get_by_id(m.lead_id)
    pending = f.message(other_run, lead)
    CampaignRun.update(leads_total=1).where(CampaignRun.id == other_run.id).execute()
    handle(upsert(w.inboxes[0].instance_name, lead.phone, "Quanto custa?", key="REPLY1"), settings)
    p = CampaignMessage.get_by_id(pending.id)
    assert (p.status, p.skip_reason) == ("skipped", "replied")
    assert_counters_match(other_run.id)
    log = db.execute_sql(
        """SELECT cm.direction, cm.text, cm.provider_message_id FROM conversation_messages cm
             JOIN conversations c ON c.id = cm.conversation_id WHERE c.lead_id = %s ORDER BY cm.id""",
        (lead.id,),
    ).fetchall()
    sent_key = parts_of(m.id)[0].provider_message_id
    assert log == [("out", "Olá!", sent_key), ("in", "Quanto custa?", "REPLY1")]
    assert CampaignMessage.get_by_id(m.id).conversation_id is not None


def test_e28_opt_out_phrases_opt_out_and_skip_everything(clean_db, sb, llm, evo, settings):
    """E-28: "PARE 🛑" opts the lead out (when and why kept), every not-started message of it in
    every campaign is skipped `opted_out`; a later re-import and `apply` never undo it."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    result = handle(upsert(w.inboxes[0].instance_name, lead.phone, "PARE!!! 🛑"), settings)
    assert result.result == "opt_out" and result.skipped == [m.id]
    lead = Lead.get_by_id(lead.id)
    assert lead.opted_out and lead.opted_out_at is not None and lead.opted_out_reason == "PARE!!! 🛑"
    assert (CampaignMessage.get_by_id(m.id).skip_reason) == "opted_out"
    assert_counters_match(w.run.id)
    # a re-import of the same phone and an apply of the workspace never undo the opt-out
    leads_import.import_text(f"name,phone\nNovo Nome,{lead.phone}\n", workspace=w.ws.name, column="New")
    configfile.apply_text(f'[workspaces.{w.ws.name}]\ncolumns = ["New", "Contacted", "Replied"]\n')
    lead = Lead.get_by_id(lead.id)
    assert lead.opted_out and lead.name == "Novo Nome"


def test_e28_a_sentence_with_a_stop_word_is_a_reply_not_an_opt_out(clean_db, sb, llm, evo, settings):
    """E-28: "vamos parar de enrolar e fechar?" stops the sequence (a reply) but is NOT an opt-out."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    result = handle(upsert(w.inboxes[0].instance_name, lead.phone, "vamos parar de enrolar e fechar?"), settings)
    assert result.result == "reply"
    assert not Lead.get_by_id(lead.id).opted_out
    assert CampaignMessage.get_by_id(m.id).skip_reason == "replied"


def test_workspace_opt_out_phrases_replace_the_defaults(clean_db, sb, llm, evo, settings):
    """R-IN-4: a workspace's opt_out_phrases replace the built-in list."""
    w = _reply_world()
    db.execute_sql("UPDATE workspaces SET opt_out_phrases = %s WHERE id = %s", (["chega de mensagens"], w.ws.id))
    a, b = (Lead.get_by_id(m.lead_id) for m in w.add_leads(2))
    assert handle(upsert(w.inboxes[0].instance_name, a.phone, "Chega de mensagens!"), settings).result == "opt_out"
    assert handle(upsert(w.inboxes[0].instance_name, b.phone, "stop"), settings).result == "reply"


def test_e29_lid_addressed_reply_is_matched_by_remote_jid_alt(clean_db, sb, llm, evo, settings):
    """E-29: a LID chat (`@lid` + remoteJidAlt) finds its lead."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    env = upsert(w.inboxes[0].instance_name, lead.phone, "Oi")
    env["data"]["key"].update(
        remoteJid="123456789012345@lid",
        addressingMode="lid",
        remoteJidAlt=f"{lead.phone.lstrip('+')}@s.whatsapp.net",
    )
    result = handle(env, settings)
    assert result.result == "reply" and result.lead_id == lead.id
    assert CampaignMessage.get_by_id(m.id).skip_reason == "replied"


def test_brazilian_eight_digit_jid_finds_the_nine_digit_lead(clean_db, sb, llm, evo, settings):
    """R-IN-2: an old WhatsApp account keeps the 8-digit JID (55 11 8xxx-xxxx) of a lead imported
    with the ninth digit: the reply is still matched."""
    w = _reply_world()
    lead = f.lead(w.ws, w.cols["New"], phone="+5511987654321")
    result = handle(upsert(w.inboxes[0].instance_name, "+551187654321", "Oi"), settings)
    assert result.result == "reply" and result.lead_id == lead.id


def test_e30_the_same_upsert_twice_has_one_effect(clean_db, sb, llm, evo, settings):
    """E-30: the same messages.upsert delivered twice (and once more by the other path): one effect."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    env = upsert(w.inboxes[0].instance_name, lead.phone, "Oi", key="DUPE1")
    assert handle(env, settings).result == "reply"
    first_reply_at = Lead.get_by_id(lead.id).last_reply_at
    assert handle(env, settings).result == "duplicate"
    assert handle(dict(env), settings).result == "duplicate"
    assert Lead.get_by_id(lead.id).last_reply_at == first_reply_at
    n = db.execute_sql("SELECT count(*) FROM conversation_messages WHERE provider_message_id = 'DUPE1'").fetchone()
    assert n[0] == 1
    assert_counters_match(w.run.id)


def test_e31_reply_before_the_part_is_recorded_still_stops_the_rest(clean_db, sb, llm, evo, settings):
    """E-31: the reply arrives while part 1 is `sending` (Evolution accepted it, the worker has not
    recorded it): part 1 finishes `sent`, part 2 never goes out, the message ends `sent`."""
    w = _reply_world()
    m = _two_parts(w, settings, llm)
    lead = Lead.get_by_id(m.lead_id)
    seen: list = []

    def reply_mid_call() -> None:  # runs after `sending` committed, before the HTTP call
        seen.append(handle(upsert(w.inboxes[0].instance_name, lead.phone, "Oi?"), settings))

    out = pipeline.send_step(m.id, settings, evo, on_http=reply_mid_call)
    assert out.sent and seen[0].in_flight == [m.id]
    pipeline.send_step(m.id, settings, evo)  # the delayed next-part delivery
    assert [p.status for p in parts_of(m.id)] == ["sent", "skipped"]
    assert CampaignMessage.get_by_id(m.id).status == "sent"
    assert len(sb.ledger()["sends"]) == 1
    assert_counters_match(w.run.id)


def test_reply_while_the_only_part_is_in_flight_and_fails_sends_nothing_more(clean_db, sb, llm, evo, settings):
    """R-IN-3: the part in flight when the reply came is refused by the gateway (transient): it is
    not retried after the reply; the message ends skipped `replied`."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    # one part whatever the sandbox wrote (its text length follows the lead's factory name)
    db.execute_sql("DELETE FROM message_parts WHERE message_id = %s", (m.id,))
    db.execute_sql(
        "INSERT INTO message_parts (message_id, inbox_id, idx, text) VALUES (%s, %s, 0, 'Olá!')", (m.id, m.inbox_id)
    )
    lead = Lead.get_by_id(m.lead_id)
    sb.set_faults({"send": {"rate_500": 1.0}})

    def reply_mid_call() -> None:
        handle(upsert(w.inboxes[0].instance_name, lead.phone, "Oi?"), settings)

    try:
        pipeline.send_step(m.id, settings, evo, on_http=reply_mid_call)
    except Exception:  # the transient failure asks for a retry
        pass
    sb.set_faults({}, replace=True)
    pipeline.send_step(m.id, settings, evo)
    msg = CampaignMessage.get_by_id(m.id)
    assert (msg.status, msg.skip_reason) == ("skipped", "replied")
    assert [p.status for p in parts_of(m.id)] == ["skipped"]
    assert not [s for s in sb.ledger()["sends"] if s.get("status", 201) < 300]
    assert_counters_match(w.run.id)


def test_e32_unknown_group_broadcast_and_own_messages_change_no_lead(clean_db, sb, llm, evo, settings):
    """E-32: a number that is no lead, a group, status@broadcast and fromMe: no lead changes."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    inst = w.inboxes[0].instance_name
    stranger = upsert(inst, "+5511912345678", "Oi")
    group = upsert(inst, lead.phone, "Oi")
    group["data"]["key"]["remoteJid"] = "120363025246125486@g.us"
    group["data"]["key"]["participant"] = f"{lead.phone.lstrip('+')}@s.whatsapp.net"
    broadcast = upsert(inst, lead.phone, "Oi")
    broadcast["data"]["key"]["remoteJid"] = "status@broadcast"
    own = upsert(inst, lead.phone, "Oi")
    own["data"]["key"]["fromMe"] = True
    assert handle(stranger, settings).result == "unknown_sender"
    for env in (group, broadcast, own):
        assert isinstance(handle(env, settings), str)
    after = Lead.get_by_id(lead.id)
    assert after.last_reply_at is None and not after.opted_out
    assert CampaignMessage.get_by_id(m.id).status == "pending"
    unknown = db.execute_sql("SELECT count(*) FROM inbound_events WHERE outcome = 'unknown_sender'").fetchone()
    assert unknown[0] == 1


def test_an_event_of_workspace_a_never_touches_workspace_b(clean_db, sb, llm, evo, settings):
    """T-SEC-1: the same phone is a lead in two workspaces; a reply to A's number touches A only."""
    a = _reply_world("acme")
    b = make_world("beta")
    (ma,) = a.add_leads(1)
    phone = Lead.get_by_id(ma.lead_id).phone
    lead_b = f.lead(b.ws, b.cols["New"], phone=phone)
    mb = f.message(b.run, lead_b)
    handle(upsert(a.inboxes[0].instance_name, phone, "PARE"), settings)
    assert Lead.get_by_id(ma.lead_id).opted_out
    assert not Lead.get_by_id(lead_b.id).opted_out and Lead.get_by_id(lead_b.id).last_reply_at is None
    assert CampaignMessage.get_by_id(mb.id).status == "pending"


def test_audio_reply_counts_as_a_reply_with_a_placeholder(clean_db, sb, llm, evo, settings):
    """R-IN-2: a non-text reply is a reply, recorded as "[audio]"."""
    w = _reply_world()
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    assert handle(upsert(w.inboxes[0].instance_name, lead.phone, None, key="AUDIO1"), settings).result == "reply"
    text = db.execute_sql("SELECT text FROM conversation_messages WHERE provider_message_id = 'AUDIO1'").fetchone()
    assert text == ("[audio]",)


def test_skip_if_replied_keeps_a_replied_lead_out_of_planning_until_it_is_moved(clean_db, settings):
    """R-IN-3: a lead that replied after entering the source column is not planned (skip_if_replied,
    the default); a person moving it into the column again makes it eligible; the flag off plans it."""
    ws, cols = f.workspace("plan")
    ibx = f.inbox(ws, "s1")
    cfg = f.config(ws, ibx, cols["New"], cols["Contacted"], name="c1")
    replied = f.lead(ws, cols["New"])
    quiet = f.lead(ws, cols["New"])
    db.execute_sql(
        """UPDATE leads SET column_changed_at = now() - interval '1 hour',
                            last_reply_at = now() - interval '30 minutes' WHERE id = %s""",
        (replied.id,),
    )
    run = plan_run(cfg.id, manual=True)
    planned = {m.lead_id for m in CampaignMessage.select().where(CampaignMessage.run == run.id)}
    assert planned == {quiet.id}
    # the flag off: a replied lead is planned
    loose = f.config(ws, ibx, cols["New"], cols["Contacted"], name="loose", skip_if_replied=False)
    loose_run = plan_run(loose.id, manual=True)
    assert replied.id in {m.lead_id for m in CampaignMessage.select().where(CampaignMessage.run == loose_run.id)}
    # moved out and back by a person: column_changed_at (kept by the trigger) is after the reply
    Lead.update(column=cols["Contacted"]).where(Lead.id == replied.id).execute()
    Lead.update(column=cols["New"]).where(Lead.id == replied.id).execute()
    assert Lead.get_by_id(replied.id).column_changed_at > Lead.get_by_id(replied.id).last_reply_at
    cfg2 = f.config(ws, ibx, cols["New"], cols["Contacted"], name="c2")
    run2 = plan_run(cfg2.id, manual=True)
    assert replied.id in {m.lead_id for m in CampaignMessage.select().where(CampaignMessage.run == run2.id)}


def test_connection_close_pauses_at_once_and_open_resumes(clean_db, sb, llm, evo, settings):
    """R-IN-7, E-07: connection.update close pauses the inbox's runs; open resumes them."""
    w = _reply_world()
    w.add_leads(1)
    inst = w.inboxes[0].instance_name
    res = handle(connection(inst, "close"), settings)
    assert res.paused == [w.run.id]
    run = CampaignRun.get_by_id(w.run.id)
    assert (run.status, run.pause_reason) == ("paused", "inbox_disconnected")
    assert Inbox.get_by_id(w.inboxes[0].id).connection_state == "close"
    res = handle(connection(inst, "open"), settings)
    assert res.resumed == [w.run.id]
    assert CampaignRun.get_by_id(w.run.id).status == "running"


def test_r_in_8_an_older_connection_event_never_undoes_a_newer_observation(clean_db, sb, llm, evo, settings):
    """R-IN-8: a late `open` observed before the `close` already stored is ignored."""
    w = _reply_world()
    inst = w.inboxes[0].instance_name
    now = dt.datetime.now(dt.UTC)
    assert handle(connection(inst, "close", now), settings).result == "updated"
    assert handle(connection(inst, "open", now - dt.timedelta(seconds=5)), settings).result == "stale"
    assert Inbox.get_by_id(w.inboxes[0].id).connection_state == "close"
    assert CampaignRun.get_by_id(w.run.id).status == "paused"


def test_a_reply_racing_the_next_send_never_lets_a_part_out_after_it(clean_db, sb, llm, evo, settings):
    """R-IN-3, DESIGN #7: 1,000 tries of a reply and the send of the next part of the same lead's
    message, started together. Whichever commits first wins: the part was already in flight (it
    finishes, nothing after it), or the reply skipped it (it never reaches the gateway). Never a
    part sent that is recorded skipped, never a message left open, counters exact."""
    import concurrent.futures
    import threading

    tries = 1000
    w = _reply_world()
    msgs = w.add_leads(tries)
    inst = w.inboxes[0].instance_name
    ids = [m.id for m in msgs]
    # every message `sending` with two parts; part 0 of the even ones already out
    db.execute_sql("UPDATE campaign_messages SET status = 'sending', generated_text = 'x' WHERE id = ANY(%s)", (ids,))
    db.execute_sql(
        """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, sent_at, provider_message_id)
           SELECT m.id, m.inbox_id, p.idx, 'm' || m.id || '-p' || p.idx,
                  CASE WHEN p.idx = 0 AND m.id %% 2 = 0 THEN 'sent' ELSE 'pending' END,
                  CASE WHEN p.idx = 0 AND m.id %% 2 = 0 THEN now() END,
                  CASE WHEN p.idx = 0 AND m.id %% 2 = 0 THEN 'pre-' || m.id END
             FROM campaign_messages m, (VALUES (0), (1)) AS p(idx) WHERE m.id = ANY(%s)""",
        (ids,),
    )
    db.execute_sql(  # the split step creates the conversation the parts are logged in
        """INSERT INTO conversations (workspace_id, lead_id, inbox_id)
           SELECT %s, lead_id, inbox_id FROM campaign_messages WHERE id = ANY(%s)""",
        (w.ws.id, ids),
    )
    phones = dict(
        db.execute_sql(
            "SELECT m.id, l.phone FROM campaign_messages m JOIN leads l ON l.id = m.lead_id WHERE m.id = ANY(%s)",
            (ids,),
        ).fetchall()
    )

    def send(mid: int, gate: threading.Barrier) -> None:
        with db.connection_context():
            gate.wait()
            pipeline.send_step(mid, settings, evo)

    replied_at: dict[int, dt.datetime] = {}

    def reply(mid: int, gate: threading.Barrier) -> None:
        with db.connection_context():
            gate.wait()
            handle(upsert(inst, phones[mid], "Oi!", key=f"race-{mid}"), settings)
        replied_at[mid] = dt.datetime.now(dt.UTC)  # the reply has committed by now

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for chunk in range(0, tries, 4):
            futures = []
            for mid in ids[chunk : chunk + 4]:
                gate = threading.Barrier(2)
                futures += [pool.submit(send, mid, gate), pool.submit(reply, mid, gate)]
            for fut in futures:
                fut.result()
    # drain: the next-part deliveries of messages whose part was in flight at the reply
    for mid in ids:
        for _ in range(3):
            if CampaignMessage.get_by_id(mid).status != "sending":
                break
            pipeline.send_step(mid, settings, evo)
    sent_texts = {s["text"] for s in sb.ledger(limit=100_000)["sends"]}
    rows = db.execute_sql(
        """SELECT p.message_id, p.idx, p.text, p.status, p.sending_at FROM message_parts p
            WHERE p.message_id = ANY(%s)""",
        (ids,),
    ).fetchall()
    for mid, idx, text, status, sending_at in rows:
        if status == "skipped":
            assert text not in sent_texts, f"message {mid} part {idx} was skipped by the reply but went out"
        else:
            assert status == "sent", (mid, idx, status)
            # claimed (committed `sending`) before the reply committed: in flight at the reply
            assert sending_at is None or sending_at <= replied_at[mid], f"message {mid} part {idx} sent after the reply"
    assert sum(1 for r in rows if r[3] == "skipped") > tries // 4  # the reply won often: the race is real
    statuses = dict(db.execute_sql("SELECT id, status FROM campaign_messages WHERE id = ANY(%s)", (ids,)).fetchall())
    assert set(statuses.values()) <= {"sent", "skipped"}, statuses
    # a message ends `sent` exactly when a part of it went out
    out = {r[0] for r in rows if r[3] == "sent"}
    assert {mid for mid, st in statuses.items() if st == "sent"} == out
    assert_counters_match(w.run.id)


def test_opt_out_reply_is_sent_once_through_the_inbox_it_came_in_on(clean_db, sb, llm, evo, settings):
    """R-IN-4: the workspace's opt_out_reply goes out once: the sweep enqueues it, the job claims the
    lead before the call, a second job or sweep sends nothing; the conversation logs it."""
    from campaign import recovery
    from campaign.inbound.notify import send_opt_out_reply

    w = _reply_world()
    db.execute_sql("UPDATE workspaces SET opt_out_reply = 'Pronto, não enviaremos mais.' WHERE id = %s", (w.ws.id,))
    (m,) = w.add_leads(1)
    lead = Lead.get_by_id(m.lead_id)
    handle(upsert(w.inboxes[0].instance_name, lead.phone, "sair"), settings)
    db.execute_sql("UPDATE leads SET opted_out_at = now() - interval '1 minute' WHERE id = %s", (lead.id,))
    swept: list = []
    recovery.recovery_sweep(settings, publish=lambda q, args: swept.append((q, args)))
    assert ("campaign.notify", [(lead.id,)]) in swept
    assert send_opt_out_reply(lead.id, settings, evo) == "sent"
    assert send_opt_out_reply(lead.id, settings, evo) == "not_due"
    swept.clear()
    recovery.recovery_sweep(settings, publish=lambda q, args: swept.append((q, args)))
    assert not [s for s in swept if s[0] == "campaign.notify"]
    confirmations = [s for s in sb.ledger()["sends"] if s["text"].startswith("Pronto")]
    assert len(confirmations) == 1 and confirmations[0]["number"].endswith(lead.phone.lstrip("+"))
    row = db.execute_sql("SELECT action FROM conversation_messages WHERE direction = 'out'").fetchall()
    assert row == [("opt_out_reply",)]


def test_r_in_8_a_connection_event_hours_off_the_clock_counts_as_observed_now(clean_db, sb, llm, evo, settings):
    """R-IN-8: Evolution stamps date_time with its LOCAL time and a "Z": an event 3 hours "old" right
    after a health poll is not discarded as stale; it is taken as observed now."""
    from campaign.inboxes import store_state

    w = _reply_world()
    store_state(w.inboxes[0].id, "open")  # a health poll just now
    res = handle(
        connection(w.inboxes[0].instance_name, "close", dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)), settings
    )
    assert res.result == "updated" and Inbox.get_by_id(w.inboxes[0].id).connection_state == "close"


def _scenario(rng, name: str):
    """A workspace whose leads stand everywhere a reply can find them: not-started messages in two
    runs, a message mid-parts (part sent, next pending), one with its part in flight, one sending
    with nothing out yet, finished ones, opted-out leads; two inboxes; a reply column on one run."""
    import uuid

    ws, cols = f.workspace(name)
    inboxes = [f.inbox(ws, f"{name}-in-{k}", min_gap_seconds=0) for k in range(2)]
    first = f.config(ws, inboxes[0], cols["New"], cols["Contacted"], reply_column_id=cols["Replied"].id)
    second = f.config(ws, inboxes[1], cols["Contacted"], cols["Replied"])
    runs = [f.run(first), f.run(second)]
    leads = []
    for k in range(14):
        lead = f.lead(ws, rng.choice([cols["New"], cols["Contacted"], cols["Replied"]]), opted_out=k % 7 == 6)
        leads.append(lead)
        for run in runs:
            shape = rng.choice(["none", "pending", "queued", "mid", "flight", "sending0", "sent", "skipped"])
            if shape == "none":
                continue
            status = {"mid": "sending", "flight": "sending", "sending0": "sending"}.get(shape, shape)
            m = f.message(
                run,
                lead,
                status=status,
                skip_reason="too_late" if status == "skipped" else None,
                sent_at=dt.datetime.now(dt.UTC) if status == "sent" else None,
                generated_text="x" if status in ("sending", "sent") else None,
            )
            parts = {"mid": ["sent", "pending"], "flight": ["sending", "pending"], "sending0": ["pending", "pending"]}
            for idx, part_status in enumerate(parts.get(shape, ["sent"] if status == "sent" else [])):
                db.execute_sql(
                    """INSERT INTO message_parts (message_id, inbox_id, idx, text, status, attempt_id, sent_at,
                                                  provider_message_id)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                    (
                        m.id,
                        m.inbox_id,
                        idx,
                        f"part {idx}",
                        part_status,
                        str(uuid.uuid4()) if part_status == "sending" else None,
                        dt.datetime.now(dt.UTC) if part_status == "sent" else None,
                        f"{name}-out-{m.id}-{idx}" if part_status == "sent" else None,
                    ),
                )
    for run in runs:
        db.execute_sql(
            """UPDATE campaign_runs r SET leads_total = (SELECT count(*) FROM campaign_messages WHERE run_id = r.id),
                      leads_sent = (SELECT count(*) FROM campaign_messages WHERE run_id = r.id AND status = 'sent'),
                      leads_skipped = (SELECT count(*) FROM campaign_messages
                                        WHERE run_id = r.id AND status = 'skipped'),
                      leads_processed = (SELECT count(*) FROM campaign_messages
                                          WHERE run_id = r.id AND status IN ('sent', 'skipped'))
                WHERE id = %s""",
            (run.id,),
        )
    return ws, inboxes, leads


_SNAPSHOT = {
    "messages": """SELECT id, status, skip_reason, stop_reason, error_class, finished_at IS NOT NULL,
                          conversation_id IS NOT NULL FROM campaign_messages ORDER BY id""",
    "parts": "SELECT id, status, error_message FROM message_parts ORDER BY id",
    "runs": """SELECT id, status, leads_total, leads_processed, leads_sent, leads_skipped, finished_at IS NOT NULL
                 FROM campaign_runs ORDER BY id""",
    "leads": """SELECT id, column_id, opted_out, opted_out_reason, opted_out_at IS NOT NULL, last_reply_at IS NOT NULL
                  FROM leads ORDER BY id""",
    "conversations": "SELECT lead_id, inbox_id FROM conversations ORDER BY 1, 2",
    "log": """SELECT inbox_id, provider_message_id, direction, text, action FROM conversation_messages
               ORDER BY 1, 2""",
    "gates": "SELECT inbox_id, provider_message_id, outcome, lead_id FROM inbound_events ORDER BY 1, 2",
    "events": "SELECT lead_id, step, level, text, details::text FROM campaign_events ORDER BY 1, 2, 3, 4, 5",
}


def test_replies_applied_together_end_as_one_by_one(clean_db, settings):
    """R-IN-2..4, E-27..E-32, T-PERF-6: the consumer applies a batch's replies together (one
    statement per step for all of them). For 40 random batches (replies, opt-outs, audio, a lead
    twice or three times, duplicates of one key, unknown senders, an unknown instance) over leads in
    every state, the results and every row end exactly as applying them one by one."""
    import random

    from campaign.inbound import InboundMessage, apply_message, apply_messages, parse_envelope

    rng = random.Random(2014)
    texts = ["Oi, tenho interesse", "pare", "Não quero mais", "vamos parar de enrolar e fechar?", None, "STOP!!"]
    for round_no in range(40):
        db.execute_sql("TRUNCATE workspaces, leads, inbound_events, campaign_events RESTART IDENTITY CASCADE")
        ws, inboxes, leads = _scenario(rng, f"eq{round_no}")
        docs: list[dict] = []
        for _ in range(rng.randint(1, 16)):
            if docs and rng.random() < 0.15:
                docs.append(rng.choice(docs))  # a duplicate of an earlier event
                continue
            phone = rng.choice(leads).phone if rng.random() < 0.9 else "+5511987650000"
            inst = rng.choice(inboxes).instance_name if rng.random() < 0.95 else "nobody-here"
            docs.append(upsert(inst, phone, rng.choice(texts)))
        batch = [parse_envelope(d) for d in docs]
        assert all(isinstance(m, InboundMessage) for m in batch)
        msgs = [m for m in batch if isinstance(m, InboundMessage)]

        def state() -> dict:
            return {k: db.execute_sql(sql).fetchall() for k, sql in _SNAPSHOT.items()}

        with db.atomic() as txn:
            together = [r.__dict__ for r in apply_messages(msgs, settings)]
            after_together = state()
            txn.rollback()
        with db.atomic() as txn:
            alone = [apply_message(m, settings).__dict__ for m in msgs]
            after_alone = state()
            txn.rollback()
        assert together == alone, f"round {round_no}"
        for k in _SNAPSHOT:
            assert after_together[k] == after_alone[k], f"round {round_no}: {k} differ"
