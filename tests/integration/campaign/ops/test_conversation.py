"""``cli.py conversation LEAD`` (R-IN-6, R-OPS-1): a lead and everything said between it and the
engine, on every inbox, in time order.

The conversation is made by the real parts: the chain sends (sandbox over HTTP), Evolution's
envelopes go through ``campaign.inbound.handle`` (a receipt, a reply between two parts, an opt-out)."""

from __future__ import annotations

import datetime as dt

import pytest

import pipeline
from campaign.db import db
from campaign.errors import ConfigError
from campaign.inbound import handle
from campaign.ops import cli, conversation
from campaign.ops.conversation import LeadNotFound
from models import CampaignMessage, CampaignRun, Lead
from tests.integration import factories as f
from tests.integration.campaign.inbound.test_handle import upsert
from tests.integration.pipeline_helpers import claim, drive, fast_settings, make_world, parts_of

LONG_TEXT = "Olá, tudo bem? " + "Temos uma proposta para a sua empresa em Recife. " * 3 + "Podemos falar amanhã?"
SNEAKY = "Quanto custa? [bold red]grátis[/bold red] \x1b[2J\x1b]0;pwned\x07 fim"


def receipt(instance: str, key_id: str, status: str) -> dict:
    """A ``messages.update`` envelope for a part the engine sent."""
    return {
        "event": "messages.update",
        "instance": instance,
        "data": {"keyId": key_id, "remoteJid": "x@s.whatsapp.net", "fromMe": True, "status": status},
        "date_time": dt.datetime.now(dt.UTC).isoformat(),
    }


def _national(phone: str) -> str:
    """+5511912345678 -> "(11) 91234-5678": the way a Brazilian writes it."""
    digits = phone.removeprefix("+55")
    return f"({digits[:2]}) {digits[2:7]}-{digits[7:]}"


@pytest.fixture
def talked(clean_db, sb, llm, evo):
    """One lead written to by two campaigns on two inboxes: part 1 of 2+ on sales-0, a receipt for
    the one-part message on sales-1, a reply on sales-0 that stops the rest, an opt-out on sales-1.
    Another lead and an unknown number write too (never part of this lead's conversation)."""
    settings = fast_settings()
    w = make_world("conv", n_inboxes=2, split=True, max_parts=3)
    first, other = w.add_leads(2)
    lead = Lead.get_by_id(first.lead_id)
    second_cfg = f.config(w.ws, w.inboxes[1], w.cols["New"], w.cols["Contacted"], name="follow-up")
    second_run = f.run(second_cfg)
    second = f.message(second_run, lead, inbox=w.inboxes[1].id)
    CampaignRun.update(leads_total=1).where(CampaignRun.id == second_run.id).execute()
    one, two = (ib.instance_name for ib in w.inboxes)

    claim(first.id)
    pipeline.generate_step(first.id, settings, llm)
    CampaignMessage.update(generated_text=LONG_TEXT).where(CampaignMessage.id == first.id).execute()
    pipeline.split_step(first.id, settings, llm)
    assert pipeline.send_step(first.id, settings, evo).sent  # part 1 only
    claim(second.id)
    assert drive(second.id, settings, llm, evo) == "sent"
    (second_part,) = parts_of(second.id)
    assert second_part.provider_message_id is not None
    assert handle(receipt(two, second_part.provider_message_id, "DELIVERY_ACK"), settings).result == "updated"
    assert handle(upsert(one, lead.phone, SNEAKY), settings).result == "reply"
    assert handle(upsert(two, lead.phone, "PARE"), settings).result == "opt_out"
    assert handle(upsert(one, Lead.get_by_id(other.lead_id).phone, "Sou outro lead"), settings).result == "reply"
    assert handle(upsert(one, "+5511955554444", "Número desconhecido"), settings).result == "unknown_sender"
    parts = parts_of(first.id)
    assert [p.status for p in parts][:2] == ["sent", "skipped"]
    return w, Lead.get_by_id(lead.id), parts, second_part


def _entries(text: str) -> list[str]:
    """The header line of every conversation message (time, arrow, inbox, what)."""
    return [line for line in text.splitlines() if line[:2] == "20" and ("  →  " in line or "  ←  " in line)]


def test_prints_the_lead_and_both_directions_in_time_order(talked):
    """R-IN-6: every part sent and every reply, across inboxes, oldest first; for a part its
    campaign, run, index and delivery; for a reply what the engine did; the header says where the
    lead is, that it opted out (when, its words) and when it last replied."""
    w, lead, parts, second_part = talked
    conv = conversation.load_conversation(conversation.find_lead(str(lead.id)))
    assert conv.total == 4 and len(conv.entries) == 4
    text = conversation.render_text(conv)
    lines = text.splitlines()
    assert lines[0] == (f"lead {lead.id} · {lead.name} · {lead.phone} · workspace conv · column Contacted"), (
        "the header names the lead, its phone, workspace and column"
    )
    assert lead.opted_out_at is not None and lead.last_reply_at is not None
    assert lines[1] == f'  opted out {lead.opted_out_at:%Y-%m-%dT%H:%M:%SZ} saying "PARE"'
    assert lines[2] == f"  last reply {lead.last_reply_at:%Y-%m-%dT%H:%M:%SZ}"
    assert "conversation: 4 message(s) on 2 inbox(es) (sales-0, sales-1)" in text
    heads = [line.split("  ", 1)[1] for line in _entries(text)]
    n = len(parts)
    assert heads == [
        f"→  sales-0  first-touch run {w.run.id} · part 1/{n} · delivery not confirmed yet",
        f"→  sales-1  follow-up run {second_part.message.run_id} · part 1/1 · delivery delivered",
        "←  sales-0  reply: ended 1",
        "←  sales-1  opt_out",
    ]
    assert f"    {parts[0].text}" in lines and f"    {second_part.text}" in lines
    assert parts[1].text not in text  # the part the reply stopped was never said
    assert "Sou outro lead" not in text and "desconhecido" not in text
    for line in _entries(text):
        dt.datetime.strptime(line.split("  ", 1)[0], "%Y-%m-%dT%H:%M:%SZ")  # UTC ISO time first


def test_texts_are_printed_as_they_are_never_obeyed(talked):
    """Markup is printed literally; terminal control characters are shown escaped."""
    _, lead, _, _ = talked
    text = conversation.render_text(conversation.load_conversation(conversation.find_lead(lead.phone)))
    assert "    Quanto custa? [bold red]grátis[/bold red] \\x1b[2J\\x1b]0;pwned\\x07 fim" in text.splitlines()
    assert "\x1b" not in text and "\x07" not in text


def test_limit_shows_the_latest(talked):
    _, lead, _, _ = talked
    conv = conversation.load_conversation(conversation.find_lead(lead.phone), limit=2)
    assert conv.total == 4 and [e.direction for e in conv.entries] == ["in", "in"]
    text = conversation.render_text(conv)
    assert "conversation: 4 message(s) on 2 inbox(es) (sales-0, sales-1); the latest 2 shown (--limit)" in text
    assert [e.text for e in conv.entries][-1] == "PARE"
    for bad in (0, -1, conversation.MAX_LIMIT + 1):
        with pytest.raises(ConfigError, match="--limit must be a whole number from 1"):
            conversation.load_conversation(conv.lead, limit=bad)


def test_lead_by_id_or_phone_in_any_format(talked):
    """LEAD: an id, id:N, or a phone as import-leads reads it (E.164, national, digits, spaces)."""
    _, lead, _, _ = talked
    digits = lead.phone.lstrip("+")
    for ref in (
        str(lead.id),
        f"id:{lead.id}",
        f" {lead.phone} ",
        _national(lead.phone),
        digits,
        f"+{digits[:2]} {digits[2:4]} {digits[4:9]}-{digits[9:]}",
    ):
        assert conversation.find_lead(ref).id == lead.id, ref


def test_lookup_errors_name_what_is_wrong(talked):
    """An unknown id or phone, an invalid phone, an unknown workspace, a lead of another workspace:
    each a clear error saying which."""
    w, lead, _, _ = talked
    f.workspace("other")
    with pytest.raises(LeadNotFound, match=r"^no lead with id 987654, and '987654' is no phone either \(invalid phone"):
        conversation.find_lead("987654")
    with pytest.raises(
        LeadNotFound, match=r"no lead with phone \+5511933332222 \(normalised from '\(11\) 93333-2222'\)"
    ):
        conversation.find_lead("(11) 93333-2222")
    with pytest.raises(LeadNotFound, match="LEAD 'Maria' is neither a lead id nor a valid phone"):
        conversation.find_lead("Maria")
    with pytest.raises(LeadNotFound, match=r"workspace 'nope' does not exist \(workspaces: conv, other\)"):
        conversation.find_lead(lead.phone, workspace="nope")
    with pytest.raises(LeadNotFound, match=f"lead {lead.id} is in workspace 'conv', not 'other'"):
        conversation.find_lead(str(lead.id), workspace="other")
    with pytest.raises(LeadNotFound, match="LEAD is empty"):
        conversation.find_lead("  ")
    with pytest.raises(ConfigError, match="--region 'XX' is not a phone region"):
        conversation.find_lead(lead.phone, region="XX")


def test_a_phone_in_several_workspaces_lists_the_choices(talked):
    """The same phone is a lead of two workspaces: the error lists both; --workspace picks one."""
    _, lead, _, _ = talked
    ws2, cols2 = f.workspace("beta")
    twin = f.lead(ws2, cols2["New"], name="Gêmeo", phone=lead.phone)
    with pytest.raises(LeadNotFound) as exc:
        conversation.find_lead(_national(lead.phone))
    assert str(exc.value) == (
        f"the phone {lead.phone} is a lead in 2 workspaces (workspace 'beta': lead {twin.id} (Gêmeo); "
        f"workspace 'conv': lead {lead.id} ({lead.name})): give --workspace NAME"
    )
    assert conversation.find_lead(lead.phone, workspace="beta").id == twin.id
    assert conversation.find_lead(lead.phone, workspace="conv").id == lead.id
    empty = conversation.render_text(conversation.load_conversation(conversation.find_lead(str(twin.id))))
    assert empty.splitlines()[1:] == [
        "  not opted out",
        "  last reply never",
        "no conversation yet: the engine has not written to this lead and it has not written in",
    ]


def test_digits_that_are_an_id_and_a_phone_ask_which(talked):
    """Digits alone are tried as an id, then as a phone: when both find a different lead the
    error says how to choose (id:N or the + phone)."""
    w, _, _, _ = talked
    by_id = Lead.create(id=5511933332222, workspace=w.ws, column=w.cols["New"], name="Id", phone="+5511911112222")
    by_phone = f.lead(w.ws, w.cols["New"], name="Phone", phone="+5511933332222")
    with pytest.raises(LeadNotFound, match=r"write id:5511933332222 for the id, or \+5511933332222 for the phone"):
        conversation.find_lead("5511933332222")
    assert conversation.find_lead("id:5511933332222").id == by_id.id
    assert conversation.find_lead("+5511933332222").id == by_phone.id


def test_cli_prints_it_and_errors_exit_2(talked, capsys):
    _, lead, _, _ = talked
    assert cli.main(["conversation", _national(lead.phone), "--limit", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"lead {lead.id} · ") and "the latest 3 shown (--limit)" in out and err == ""
    assert len(_entries(out)) == 3
    db.execute_sql("INSERT INTO workspaces (name) VALUES ('gamma')")
    assert cli.main(["conversation", "+5511933332222", "--workspace", "gamma"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: no lead with phone +5511933332222 in workspace 'gamma'\n"
    assert cli.main(["conversation", str(lead.id), "--limit", "0"]) == 2
    assert "error: --limit must be a whole number from 1 to 10000, got 0" in capsys.readouterr().err
