"""Structured logs (SPEC R-OPS-6, T-SEC-1) without services: redaction and formatting; a full run's logs
are grepped in tests/integration/campaign/test_logs.py."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
import uuid

from hypothesis import assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign import logs
from campaign.settings import get_settings

# --------------------------------------------------------------------------------------------
# unit: redaction and formatting


def test_redactor_masks_configured_secrets_url_passwords_and_auth_values():
    r = logs.Redactor(["sk-or-v1-abcdef123456", "evo-key-987654"])
    text = (
        "POST with key sk-or-v1-abcdef123456 and apikey evo-key-987654; "
        "amqp://user:pa55word@mq:5672/vh Authorization: Bearer tok_live_1234567 "
        '{"apikey": "other-secret-value"} password=hunter2hunter'
    )
    out = r(text)
    for secret in (
        "sk-or-v1-abcdef123456",
        "evo-key-987654",
        "pa55word",
        "tok_live_1234567",
        "other-secret-value",
        "hunter2hunter",
    ):
        assert secret not in out, (secret, out)
    assert "amqp://user:***@mq:5672/vh" in out
    assert "POST with key ***" in out


def test_redactor_from_settings_covers_every_secret_setting():
    s = dataclasses.replace(
        get_settings(),
        openrouter_api_key="sk-or-xyz-111",
        evolution_api_key="evo-222-key",
        webhook_secret="hook-333-secret",
        database_url="postgresql://app:db%2Fpass44@h:5432/d",
        rabbitmq_url="amqp://app:mqpass55@h:5672/v",
    )
    r = logs.Redactor.from_settings(s)
    line = "sk-or-xyz-111 evo-222-key hook-333-secret db/pass44 db%2Fpass44 mqpass55"
    assert r(line) == " ".join(["***"] * 6)


def _format(
    record_msg: str,
    *args,
    exc: BaseException | None = None,
    json_lines: bool = False,
    redactor: logs.Redactor | None = None,
) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.StructuredFormatter(redactor, json_lines=json_lines))
    logger = logging.getLogger(f"test_logs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    with logs.log_context(actor="send_part", message=12, run=3):
        if exc is None:
            logger.info(record_msg, *args)
        else:
            try:
                raise exc
            except BaseException:
                logger.exception(record_msg, *args)
    return stream.getvalue().strip()


def test_formatter_puts_context_ids_in_the_line_and_quotes_values():
    line = _format("sent part %s of %s", 1, 2)
    assert line.startswith("ts=")
    assert " actor=send_part run=3 message=12 " in line
    assert line.endswith('msg="sent part 1 of 2"')


def test_formatter_json_lines_parse_and_redact_tracebacks():
    line = _format(
        "failed",
        exc=RuntimeError("boom with key sk-live-000111222"),
        json_lines=True,
        redactor=logs.Redactor(["sk-live-000111222"]),
    )
    doc = json.loads(line)
    assert doc["run"] == 3 and doc["message"] == 12 and doc["msg"] == "failed"
    assert "RuntimeError: boom with key ***" in doc["exc"]
    assert "sk-live-000111222" not in line


_SECRET_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="*"), min_size=4, max_size=24
).filter(lambda s: s.strip() == s and len(s.strip()) >= 4)


@hsettings(max_examples=200, deadline=None)
@given(secret=st.one_of(_SECRET_TEXT, _SECRET_TEXT.map(lambda s: s[:2] + '"\\\t' + s[2:])), json_lines=st.booleans())
def test_secret_with_quote_backslash_or_tab_is_masked_in_every_line_format(secret, json_lines):
    """Issue 23 item 8 (T-SEC-1, R-OPS-6): masking happens before JSON/logfmt quoting, so a secret
    containing '"', '\\' or a tab is masked too (it used to survive in its escaped form)."""
    # a secret inside the line's own words ('conn' of 'connecting') is rightly masked there too
    assume(all(secret not in words for words in ("connecting with ", " now", "refused ")))
    line = _format(
        "connecting with %s now",
        secret,
        exc=RuntimeError(f"refused {secret}"),
        json_lines=json_lines,
        redactor=logs.Redactor([secret]),
    )
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    assert secret not in line and escaped not in line, line
    assert "connecting with *** now" in (json.loads(line)["msg"] if json_lines else line)


def test_redactor_work_is_bounded_and_a_cut_never_leaves_the_head_of_a_secret(monkeypatch):
    """Issue 23 item 1 (R-OPS-5, R-OPS-6): a 250 KB value (the webhook's hostile ``instance``, a
    65 KB request line at DEBUG) used to go whole through the patterns, one of them quadratic on
    alphanumeric runs. The patterns now only ever see bounded text, and a token cut in two by the
    bound (a bearer token, a URL password the patterns would have masked) is dropped whole."""
    seen: list[int] = []

    class Spy:
        def __init__(self, pattern):
            self.pattern = pattern

        def sub(self, repl, text):
            seen.append(len(text))
            return self.pattern.sub(repl, text)

    monkeypatch.setattr(logs.Redactor, "_PATTERNS", tuple((Spy(p), r) for p, r in logs.Redactor._PATTERNS))
    limit = logs.MAX_VALUE_CHARS
    for straddler in ("Bearer tok_live_abcdefghijklmnop", "amqp://user:pa55word-long-one@mq:5672/vh"):
        for shift in range(1, len(straddler), 3):
            seen.clear()
            filler = "x" * 40 + " "
            msg = (filler * (limit // len(filler) + 1))[: limit - shift] + straddler + " " + "A" * 250_000
            line = _format("%s", msg)
            assert max(seen, default=0) <= limit + 200, max(seen)  # never the 250 KB
            assert len(line) < limit + 1000
            for head in ("tok_live_abc", "pa55word"):
                assert head not in line, (shift, line[-200:])
            assert "more chars cut]" in line
    seen.clear()
    line = _format("%s", "a" * 250_000)  # the alphanumeric run
    assert max(seen, default=0) <= limit + 200 and "a" * 100 not in line  # (no pattern may even run)
    seen.clear()
    line = _format("%s", "token " + "a" * 250_000)  # the same run where a pattern must look at it
    assert seen and max(seen) <= limit + 200 and "a" * 100 not in line


def test_redactor_masks_the_same_with_a_bound():
    """The bound changes nothing for ordinary text: same masks as before."""
    r = logs.Redactor(["sk-or-v1-abcdef123456"])
    text = "key sk-or-v1-abcdef123456 amqp://u:pw12345@h/v Bearer tok_live_1234567 apikey=abcdefgh"
    assert r(text, 10_000) == r(text) == "key *** amqp://u:***@h/v Bearer *** apikey=***"


def test_annotate_adds_to_the_bound_context_only():
    logs.annotate(run=99)  # nothing bound: a no-op, not an error
    assert logs.current_context() == {}
    token = logs.bind(actor="generate", message=5)
    try:
        logs.annotate(run=7, inbox=None)
        assert logs.current_context() == {"actor": "generate", "message": 5, "run": 7}
    finally:
        logs.unbind(token)
    assert logs.current_context() == {}


def test_configure_logging_is_basicconfig_polite_and_follows_the_live_stderr(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = []
        logs.configure_logging(get_settings())
        logs.configure_logging(get_settings())  # again: still one handler, its own replaced
        assert len(root.handlers) == 1 and getattr(root.handlers[0], "_campaign_engine", False)
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)  # swapped after configuration, as test runners do
        logging.getLogger("test_logs.live").warning("to the live stderr %s", 1)
        assert 'msg="to the live stderr 1"' in buf.getvalue()
        foreign = logging.StreamHandler(io.StringIO())
        root.handlers[:] = [foreign]
        logs.configure_logging(get_settings())  # someone else configured logging: left alone
        assert root.handlers == [foreign]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
