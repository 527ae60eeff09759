"""Structured logs (SPEC R-OPS-6): one ``key=value`` line per event, ids from context, secrets masked.

Every entry point (CLI, scheduler, webhook, scripts, demo) calls :func:`configure_logging`; a
``dramatiq`` worker process, whose handlers the dramatiq CLI already set up, gets the same
formatter through :func:`install_on_existing_handlers` (called when ``actors`` is imported).

A line looks like (logfmt, greppable and parseable; ``LOG_FORMAT=json`` gives one JSON object)::

    ts=2026-11-22T10:00:01.234Z level=info logger=steps pid=812 actor=send_part run=3 message=1207 \
step=send_part outcome=done ms=41 msg="step done"

Context fields (``run``, ``message``, ``actor``, ``dramatiq_id``...) come from a context variable
that the worker middleware binds per message and the pipeline annotates once it knows the run, so
library code logs plain messages and still gets the ids.

Secrets never reach a log line: every value of a record (message, arguments, context fields,
traceback) passes through :class:`Redactor` BEFORE it is quoted for logfmt or JSON, so a secret
containing ``"``, ``\\`` or a tab is masked as it is, not missed in its escaped form. The redactor
masks the configured API keys, the webhook secret, passwords inside URLs and ``Bearer``/``apikey``
values wherever they appear. Its work is linear in the text and bounded: a value longer than
``MAX_VALUE_CHARS`` (a traceback: ``MAX_TRACE_CHARS``) is cut after the configured secrets are
masked and before the patterns run, at a whitespace boundary so no head of a secret survives the
cut. One hostile request (a 250 KB field, a 65 KB request line) costs the same as a short one.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from campaign.settings import Settings

__all__ = [
    "configure_logging",
    "install_on_existing_handlers",
    "bind",
    "annotate",
    "log_context",
    "current_context",
    "Redactor",
    "StructuredFormatter",
    "MAX_VALUE_CHARS",
    "MAX_TRACE_CHARS",
]

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_context", default=None)

#: context keys printed first, in this order; others follow alphabetically
_ORDER = ("actor", "run", "message", "part", "inbox", "step", "outcome", "ms", "dramatiq_id")
MASK = "***"


def current_context() -> dict[str, Any]:
    """The fields bound to the current thread/task (a copy)."""
    return dict(_CONTEXT.get() or {})


def bind(**fields: Any) -> contextvars.Token:
    """Start a new context with ``fields`` (the worker middleware does this per message)."""
    return _CONTEXT.set({k: v for k, v in fields.items() if v is not None})


def unbind(token: contextvars.Token) -> None:
    """Restore the context that was current before :func:`bind`."""
    _CONTEXT.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the current context (e.g. ``run`` once a step has loaded its message)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return  # outside a bound unit of work: nothing to annotate (callers log ids explicitly)
    ctx.update({k: v for k, v in fields.items() if v is not None})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields bound for the duration of the block (nested blocks extend the outer context)."""
    token = _CONTEXT.set({**current_context(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


#: longest message or context value a line carries (the rest is cut, see :meth:`Redactor.__call__`)
MAX_VALUE_CHARS = 8_192
#: longest traceback or stack a line carries
MAX_TRACE_CHARS = 65_536


def _cut(text: str, limit: int) -> str:
    """``text`` shortened to at most ``limit`` characters plus a note; a token split by the cut is
    dropped whole (it may be the head of a URL password or a bearer token the patterns would mask)."""
    head = text[:limit]
    if not text[limit].isspace() and not head[-1].isspace():
        kept = head.rsplit(None, 1)
        head = kept[0] if len(kept) == 2 else ""
    return f"{head}…[{len(text) - len(head)} more chars cut]"


class Redactor:
    """Masks secret values and secret-looking patterns in text, in time linear in its length.

    Every pattern starts on a literal (``://``, ``bearer``, ``apikey``...) or, for a URL's scheme,
    only where a scheme can begin (not inside a run of scheme characters): a long alphanumeric run
    is scanned once, not once per position (that made a 60 KB run cost 2 s under the GIL).
    """

    _PATTERNS = (
        # scheme://user:password@host -> scheme://user:***@host
        (
            re.compile(r"(?<![A-Za-z0-9+.-])(?P<pre>[A-Za-z][A-Za-z0-9+.-]*+://[^\s:/@]++:)[^\s@/]++(?P<post>@)"),
            r"\g<pre>***\g<post>",
        ),
        (re.compile(r"(?i)(?P<pre>bearer\s++)[A-Za-z0-9._~+/=-]{6,}+"), r"\g<pre>***"),
        (
            re.compile(
                r"""(?i)(?P<pre>["']?(?:apikey|api_key|api-key|secret|password|token)["']?\s*+[:=]\s*+["']?)"""
                r"""[^\s"',}&]{4,}+"""
            ),
            r"\g<pre>***",
        ),
    )

    #: the literal every pattern above starts on: a text without any of them is left as it is
    _TRIGGER = re.compile(r"(?i)://|bearer|apikey|api_key|api-key|secret|password|token")

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()) -> None:
        # longest first, so a secret containing another is masked whole; very short values would
        # mask ordinary words, so they are left to the patterns
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The secrets of ``settings``: API keys, webhook secret, passwords in the service URLs."""
        from urllib.parse import unquote, urlsplit

        values = [settings.openrouter_api_key, settings.evolution_api_key, settings.webhook_secret]
        for url in (settings.database_url, settings.rabbitmq_url):
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            if password:
                values += [password, unquote(password)]
        return cls(values)

    def __call__(self, text: str, limit: int | None = None) -> str:
        """``text`` with every secret masked; cut to about ``limit`` characters when one is given.

        The configured secrets are replaced in the whole text first (plain substring search), so
        the cut can never leave half of one behind; the patterns then run on the bounded text.
        """
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if limit is not None and len(text) > limit:
            text = _cut(text, limit)
        if self._TRIGGER.search(text) is None:  # no pattern can match (most values): one scan, not three
            return text
        for pattern, repl in self._PATTERNS:
            text = pattern.sub(repl, text)
        return text


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class StructuredFormatter(logging.Formatter):
    """logfmt (default) or JSON lines with the context fields and every secret masked."""

    def __init__(self, redactor: Redactor | None = None, *, json_lines: bool = False) -> None:
        super().__init__()
        self.redact = redactor or Redactor()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        if record.threadName and record.threadName != "MainThread":
            fields["thread"] = record.threadName
        ctx = getattr(record, "ctx", None)
        if ctx is None:
            ctx = current_context()
        for key in _ORDER:
            if key in ctx:
                fields[key] = ctx[key]
        for key in sorted(k for k in ctx if k not in _ORDER and k not in fields):
            fields[key] = ctx[key]
        fields["msg"] = record.getMessage()
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        # masked value by value BEFORE quoting: JSON and logfmt escape '"', '\\' and tabs, and a
        # secret containing one would no longer be found in the quoted line
        for key, value in fields.items():
            if key not in ("ts", "level") and value is not None and not isinstance(value, (int, float, bool)):
                fields[key] = self.redact(str(value), MAX_TRACE_CHARS if key in ("exc", "stack") else MAX_VALUE_CHARS)
        if self.json_lines:
            line = json.dumps(fields, ensure_ascii=False, default=str)
        else:
            line = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        # and the whole (bounded) line once more: a key=value pair can look like a secret as a pair
        return self.redact(line)


class _ContextFilter(logging.Filter):
    """Freezes the context onto the record in the thread that logged it (handlers may run elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "ctx"):
            record.ctx = current_context()
        return True


def _formatter(settings: Settings) -> StructuredFormatter:
    return StructuredFormatter(Redactor.from_settings(settings), json_lines=settings.log_format == "json")


def _quiet_noisy_libraries() -> None:
    # httpx logs every request at INFO (thousands per run); pika logs connection chatter at INFO
    for name in ("httpx", "httpcore", "pika", "apscheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)


class TextSink(Protocol):
    """Where text goes: ``sys.stderr`` / ``sys.stdout``, a file, or an object that forwards or captures it."""

    def write(self, text: str, /) -> object: ...


class _EngineHandler(logging.StreamHandler):
    """The handler ``configure_logging`` installs, marked so that a second call replaces only it."""

    _campaign_engine = True


class _CurrentStderr(_EngineHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners and the demo swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ assigns it; the live sys.stderr is always used


def configure_logging(settings: Settings, *, level: str | int | None = None, stream: TextSink | None = None) -> None:
    """Entry points: one stderr handler with the structured formatter.

    Like ``logging.basicConfig``, it leaves logging alone when someone else already configured
    it (a test runner, an application embedding the CLI); calling it again replaces only the
    handler it installed itself.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_campaign_engine", False)]:
        root.removeHandler(handler)
    _quiet_noisy_libraries()
    if root.handlers:
        return
    handler = _EngineHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(_formatter(settings))
    handler.addFilter(_ContextFilter())
    root.addHandler(handler)
    root.setLevel(level or settings.log_level)


def install_on_existing_handlers(settings: Settings) -> None:
    """Worker processes: put the structured formatter on the handlers the dramatiq CLI set up."""
    formatter = _formatter(settings)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, _ContextFilter) for f in handler.filters):
            handler.addFilter(_ContextFilter())
    _quiet_noisy_libraries()
