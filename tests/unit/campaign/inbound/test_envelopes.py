"""Evolution event envelopes (SPEC §5): every shape parses to an event, a reason, or an
EnvelopeError naming the field — never another exception, never an unbounded field (T-SEC-1)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.inbound.envelopes import (
    MAX_TEXT_LENGTH,
    ConnectionChange,
    DeliveryUpdate,
    EnvelopeError,
    InboundMessage,
    parse_envelope,
    phone_candidates,
)

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
_ANY_TEXT = st.text(max_size=40) | st.builds(lambda c, n: c * n, st.sampled_from("5a@:é\x00"), st.integers(200, 3000))


def _upsert(**over: Any) -> dict:
    key = {"remoteJid": "5511999990001@s.whatsapp.net", "fromMe": False, "id": "ABC123"}
    key.update(over.pop("key", {}))
    data = {"key": key, "message": {"conversation": "Oi"}, "messageType": "conversation", "messageTimestamp": 1}
    data.update(over.pop("data", {}))
    return {"event": "messages.upsert", "instance": "acme-1", "data": data, **over}


@hsettings(max_examples=400, deadline=None)
@given(
    event=st.sampled_from(["messages.upsert", "MESSAGES_UPSERT", "connection.update", "messages.update"]) | _ANY_TEXT,
    instance=st.none() | _ANY_TEXT | _JSON,
    data=_JSON,
    key=st.dictionaries(
        st.sampled_from(["remoteJid", "fromMe", "id", "addressingMode", "remoteJidAlt", "participant"]),
        _JSON | _ANY_TEXT,
    ),
    message=_JSON,
    state=_JSON | st.sampled_from(["open", "close", "connecting"]),
    date_time=_JSON | st.sampled_from(["2026-11-29T10:00:00.000Z", "not a date", 1764410000000]),
)
def test_fuzzed_envelopes_parse_or_fail_with_a_clear_error(event, instance, data, key, message, state, date_time):
    """T-SEC-1, R-IN-1: fuzzed messages.upsert / connection.update envelopes (AMQP or HTTP body)."""
    docs = [
        {"event": event, "instance": instance, "data": data, "date_time": date_time},
        {"event": event, "instance": instance, "data": {"key": key, "message": message}, "date_time": date_time},
        {"event": event, "instance": instance, "data": {"state": state, "instance": instance}, "date_time": date_time},
    ]
    for doc in docs:
        try:
            out = parse_envelope(doc)
        except EnvelopeError as exc:
            assert 0 < len(str(exc)) < 300
            continue
        assert isinstance(out, (DeliveryUpdate, InboundMessage, ConnectionChange, str))
        if isinstance(out, InboundMessage):
            assert out.phone_digits.isdigit() and 8 <= len(out.phone_digits) <= 15
            assert len(out.text) <= MAX_TEXT_LENGTH and len(out.key_id) <= 256 and len(out.instance) <= 200
        if isinstance(out, ConnectionChange):
            assert out.state in ("open", "close", "connecting")


def test_e29_lid_chat_uses_remote_jid_alt():
    """E-29: `@lid` with remoteJidAlt -> the phone of remoteJidAlt; without it: ignored with a reason."""
    out = parse_envelope(
        _upsert(key={"remoteJid": "98765@lid", "addressingMode": "lid", "remoteJidAlt": "5511988887777@s.whatsapp.net"})
    )
    assert isinstance(out, InboundMessage) and out.phone_digits == "5511988887777"
    reason = parse_envelope(_upsert(key={"remoteJid": "98765@lid"}))
    assert isinstance(reason, str) and "remoteJidAlt" in reason


def test_e32_groups_broadcasts_and_own_messages_are_ignored():
    """E-32: a group, status@broadcast, a newsletter and fromMe are acknowledged and ignored."""
    for key in (
        {"remoteJid": "1203630@g.us", "participant": "5511999990001@s.whatsapp.net"},
        {"remoteJid": "status@broadcast"},
        {"remoteJid": "1203630@newsletter"},
        {"fromMe": True},
    ):
        assert isinstance(parse_envelope(_upsert(key=key)), str), key


def test_texts_and_placeholders():
    """R-IN-2: conversation, extendedTextMessage.text, and a placeholder naming other types."""
    assert parse_envelope(_upsert()).text == "Oi"
    ext = _upsert(
        data={"message": {"extendedTextMessage": {"text": "link aqui"}}, "messageType": "extendedTextMessage"}
    )
    assert parse_envelope(ext).text == "link aqui"
    audio = _upsert(data={"message": {"audioMessage": {"seconds": 3}}, "messageType": "audioMessage"})
    assert (parse_envelope(audio).text, parse_envelope(audio).is_text) == ("[audio]", False)
    doc = _upsert(data={"message": {"documentWithCaptionMessage": {}}, "messageType": "documentWithCaptionMessage"})
    assert parse_envelope(doc).text == "[document]"


def test_connection_update_time_is_the_envelope_date_time():
    """R-IN-8: the observation time comes from `date_time` (ISO or epoch ms)."""
    env = {"event": "connection.update", "instance": "acme-1", "data": {"state": "close"}}
    iso = parse_envelope({**env, "date_time": "2026-11-29T10:00:00.000Z"})
    assert iso.at == dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC)
    ms = parse_envelope({**env, "date_time": 1764410400000})
    assert ms.at == dt.datetime.fromtimestamp(1764410400, dt.UTC)


def test_brazilian_ninth_digit_candidates():
    """R-IN-2: an 8-digit BR mobile JID also tries the 9-digit form, and the reverse."""
    assert phone_candidates("551188887777") == ["+551188887777", "+5511988887777"]
    assert phone_candidates("5511988887777") == ["+5511988887777", "+551188887777"]
    assert phone_candidates("14155550100") == ["+14155550100"]
