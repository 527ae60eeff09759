"""Lead data as text: the prompt's data block and the fallback template (SPEC R-PIPE-1, T-SEC-1).

Both rules live here, below the pipeline and ``apply``, so that the step that uses them and the
command that validates them can never disagree.

**The data block.** Lead fields go into the user message between ``<lead>`` and ``</lead>``, and
they are data: no value may produce the closing delimiter, nor anything a model would read as one.
Removing ``<lead>`` tags cannot promise that (one pass turns ``</le</lead>ad>`` into ``</lead>``;
``< /lead>``, fullwidth ``＜／ｌｅａｄ＞`` and zero-width characters slip past any pattern), so every
value is *escaped* instead, by :func:`data_value`:

1. NFKC normalisation (``unicodedata``): fullwidth and other compatibility forms become the ASCII
   they look like (``＜`` and ``﹤`` become ``<``, which step 4 then escapes);
2. format characters (category Cf: zero-width space and joiners, BOM, bidi overrides) and lone
   surrogates are dropped; control characters and line/paragraph separators become spaces and
   whitespace runs collapse, so a value stays on its own ``key: value`` line;
3. the value is cut to its limit;
4. ``<`` and ``>`` are written ``&lt;`` and ``&gt;``.

After that a value holds no ``<`` at all, whatever came in. ``&`` is left alone on purpose: a
company called "Silva & Filhos" must reach the model as itself, and ``&lt;`` in the data can only
ever mean the text "&lt;", never a delimiter. The block is also capped: at most
``MAX_PROMPT_FIELDS`` custom fields (by key order), ``MAX_FIELD_VALUE_CHARS`` per value and
``MAX_LEAD_BLOCK_CHARS`` in all; what does not fit is left out and counted on a last line.

**The fallback template** (``fallback_template`` of a campaign, sent when the LLM fails for good)
follows Python's format-string syntax as parsed by :class:`string.Formatter`, restricted to what
:func:`render_template` implements: ``{field}`` (a lead field name: letters, digits, ``_``; unknown
fields render empty) and ``{{`` / ``}}`` for literal braces. Conversions (``{name!r}``), format
specs (``{name:>10}``), positional or empty fields (``{0}``, ``{}``), attribute and index access
and unbalanced braces are :class:`TemplateError`, and ``apply`` refuses them by rendering the
template with :func:`check_template`, the same code the pipeline renders with.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from campaign.errors import TemplateError

__all__ = [
    "MAX_PROMPT_FIELDS",
    "MAX_FIELD_KEY_CHARS",
    "MAX_FIELD_VALUE_CHARS",
    "MAX_LEAD_BLOCK_CHARS",
    "OPEN",
    "CLOSE",
    "data_value",
    "lead_block",
    "CONVERSATION_OPEN",
    "CONVERSATION_CLOSE",
    "MAX_HISTORY_MESSAGE_CHARS",
    "MAX_HISTORY_CHARS",
    "conversation_block",
    "TemplateError",
    "template_fields",
    "render_template",
    "check_template",
]

OPEN, CLOSE = "<lead>", "</lead>"
MAX_PROMPT_FIELDS = 20  # custom fields in one prompt (the name comes on top)
MAX_FIELD_KEY_CHARS = 60
MAX_FIELD_VALUE_CHARS = 300
MAX_LEAD_BLOCK_CHARS = 4_000  # the whole block, escapes included

CONVERSATION_OPEN, CONVERSATION_CLOSE = "<conversation>", "</conversation>"
MAX_HISTORY_MESSAGE_CHARS = 500  # one conversation message in a prompt
MAX_HISTORY_CHARS = 4_000  # the whole conversation block: the oldest messages give way first

_ESCAPES = str.maketrans({"<": "&lt;", ">": "&gt;"})
_SPACE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Zs"})
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def data_value(value: Any, limit: int = MAX_FIELD_VALUE_CHARS) -> str:
    """``value`` as one line of prompt data: normalised, on one line, cut to ``limit``, ``<``/``>`` escaped."""
    # a cut before normalising bounds the work on a huge value; x4 leaves room for what step 2 drops
    text = unicodedata.normalize("NFKC", str(value)[: limit * 4])
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cf", "Cs"):  # invisible format characters; lone surrogates cannot be sent
            continue
        kept.append(" " if category in _SPACE_CATEGORIES else char)
    text = " ".join("".join(kept).split())[:limit]
    return text.translate(_ESCAPES)


def lead_block(name: str | None, fields: Mapping[Any, Any] | None) -> str:
    """The ``<lead>`` … ``</lead>`` block: the name, then the custom fields by key, within the caps."""
    lines = [f"name: {data_value(name or '')}"]
    size = len(lines[0])
    left_out = 0
    for key, value in sorted((fields or {}).items(), key=lambda kv: str(kv[0])):
        if value in (None, ""):
            continue
        line = f"{data_value(key, MAX_FIELD_KEY_CHARS)}: {data_value(value)}"
        if len(lines) > MAX_PROMPT_FIELDS or size + 1 + len(line) > MAX_LEAD_BLOCK_CHARS:
            left_out += 1
            continue
        lines.append(line)
        size += 1 + len(line)
    if left_out:
        lines.append(f"({left_out} more field(s) left out)")
    return f"{OPEN}\n" + "\n".join(lines) + f"\n{CLOSE}"


def conversation_block(messages: Sequence[Mapping[str, Any]] | None) -> str:
    """The ``<conversation>`` … ``</conversation>`` block of a follow-up's prompt (R-SEQ-2): one line
    per message, oldest first, ``us:`` for what the engine sent and ``lead:`` for what the lead
    wrote, each text escaped like a lead field (:func:`data_value`) and cut to
    ``MAX_HISTORY_MESSAGE_CHARS``. Past ``MAX_HISTORY_CHARS`` the OLDEST lines are left out (the
    latest exchange matters most) and counted on the first line. Empty string for no messages."""
    if not messages:
        return ""
    lines: list[str] = []
    size = 0
    for msg in reversed(messages):  # newest first while filling, so the oldest are the ones cut
        who = "us" if msg.get("direction") == "out" else "lead"
        line = f"{who}: {data_value(msg.get('text') or '', MAX_HISTORY_MESSAGE_CHARS)}"
        if size + 1 + len(line) > MAX_HISTORY_CHARS:
            break
        lines.append(line)
        size += 1 + len(line)
    lines.reverse()
    left_out = len(messages) - len(lines)
    if left_out:
        lines.insert(0, f"({left_out} earlier message(s) left out)")
    return f"{CONVERSATION_OPEN}\n" + "\n".join(lines) + f"\n{CONVERSATION_CLOSE}"


def _parse(template: str) -> Iterator[tuple[str, str | None]]:
    """(literal text, field name or None) pairs; TemplateError for anything but ``{field}``/``{{``/``}}``."""
    try:
        items = list(string.Formatter().parse(template))
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(f"{exc} (write {{{{ or }}}} for a literal brace)") from None
    for literal, field, spec, conversion in items:
        if field is not None:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if conversion is not None:
                raise TemplateError(
                    f"placeholder {shown}: conversions (!r, !s, !a) are not supported; write {{{field}}}"
                )
            if spec:
                raise TemplateError(f"placeholder {shown}: format specs are not supported; write {{{field}}}")
            if not _FIELD_NAME.fullmatch(field):
                raise TemplateError(
                    f"placeholder {shown} is not a lead field name (letters, digits and _, e.g. {{name}})"
                )
        yield literal, field


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order (TemplateError when it is not a valid template)."""
    return [field for _, field in _parse(template) if field is not None]


def render_template(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{field}`` replaced by ``values[field]`` ("" when missing)."""
    out: list[str] = []
    for literal, field in _parse(template):
        out.append(literal)
        if field is not None:
            out.append(values.get(field, ""))
    return "".join(out)


def check_template(template: str, fields: Iterable[str] = ("name", "first_name")) -> str:
    """Render ``template`` as the pipeline would, with sample values; TemplateError when it cannot be."""
    sample = {f: f"<{f}>" for f in (*fields, *template_fields(template))}
    return render_template(template, sample)
