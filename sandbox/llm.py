"""The sandbox's fake LLM: deterministic personalised Portuguese texts and sentence splits.

Lead data is read from the last user message, between ``<lead>`` and ``</lead>`` as ``key: value``
lines (leniently: without the delimiters the whole user message is scanned for such lines). The text
to split (JSON mode) is the content of ``<text>...</text>`` (or ``<message>``/``<mensagem>``) when
present, else the whole user message. Every choice is a function of a hash of the request, so the same
request always gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = [
    "user_text",
    "parse_lead",
    "generate_text",
    "split_source",
    "split_sentences",
    "split_parts",
    "max_parts_hint",
    "count_tokens",
    "request_digest",
    "is_triage",
    "triage_reply",
    "triage_intent",
    "TRIAGE_RULES",
]

_LEAD_RE = re.compile(r"<lead>(.*?)</lead>", re.IGNORECASE | re.DOTALL)
_TEXT_RE = re.compile(r"<(text|message|mensagem|texto)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_FIELD_RE = re.compile(r"^\s*[-*]?\s*([A-Za-z_][\w .-]{0,40}?)\s*[:=]\s*(.+?)\s*$")
_SENTENCE_RE = re.compile(r"(?<=[.!?…])\s+|\n\s*\n")
_MAX_PARTS_RES = (
    re.compile(r"max(?:imum)?[_ -]?parts?\s*[:=]?\s*(\d+)", re.IGNORECASE),
    re.compile(
        r"(?:at most|up to|no máximo|no maximo|até|ate)\s+(\d+)\s+(?:parts|partes|messages|mensagens|bubbles)",
        re.IGNORECASE,
    ),
)

_NAME_KEYS = ("name", "nome", "first_name", "firstname", "full_name", "lead_name", "contact")
_SKIP_KEYS = {"phone", "telefone", "celular", "whatsapp", "id", "lead_id", "email"}

_GREETINGS = (
    "Olá, {name}! Tudo bem?",
    "Oi, {name}, tudo certo por aí?",
    "Bom dia, {name}!",
    "E aí, {name}, como vai?",
    "Olá {name}, espero que esteja tudo bem.",
    "Oi {name}! Que bom falar com você.",
)
_ANONYMOUS_GREETINGS = ("Olá! Tudo bem?", "Oi, tudo certo por aí?", "Bom dia!")
#: a prompt that carries the conversation so far (a follow-up, R-SEQ-2) continues it, never greets anew
_FOLLOW_UP_GREETINGS = (
    "Oi {name}, passando para retomar nossa conversa.",
    "{name}, conseguiu ver minha última mensagem?",
    "Olá de novo, {name}! Só voltando aqui rapidinho.",
)
_ANONYMOUS_FOLLOW_UPS = ("Oi, passando para retomar nossa conversa.", "Conseguiu ver minha última mensagem?")
_CONVERSATION_OPEN = "<conversation>"
_FIELD_SENTENCES = (
    "Vi aqui que {key} é {value}, achei muito interessante.",
    "Sobre {key} ({value}), tenho uma ideia que pode ajudar.",
    "Notei que {key} é {value} e lembrei de você.",
)
_KNOWN_FIELD_SENTENCES = {
    "company": "Vi que você está na {value} e queria trocar uma ideia rápida.",
    "empresa": "Vi que você está na {value} e queria trocar uma ideia rápida.",
    "city": "Como estão as coisas em {value}?",
    "cidade": "Como estão as coisas em {value}?",
    "interest": "Lembrei do seu interesse em {value}.",
    "interesse": "Lembrei do seu interesse em {value}.",
    "product": "Temos novidades sobre {value} que podem te interessar.",
    "produto": "Temos novidades sobre {value} que podem te interessar.",
}
_FILLERS = (
    "Estou entrando em contato porque temos uma condição especial esta semana.",
    "Posso te mandar mais detalhes por aqui?",
    "Seria ótimo entender melhor o que você precisa.",
    "Fico à disposição para qualquer dúvida.",
    "Tenho certeza de que podemos te ajudar.",
    "Quando for um bom momento para conversarmos?",
)


def request_digest(obj: Any) -> int:
    """Stable 64-bit digest of a JSON-able object."""
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def user_text(messages: Any) -> str:
    """Text of the last user message (or of the last message of any role if none is "user")."""
    if not isinstance(messages, list) or not messages:
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    last = messages[-1]
    return _content_text(last.get("content")) if isinstance(last, dict) else ""


def all_text(messages: Any) -> str:
    """Every message's text, joined (for token counts and hints)."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))


def parse_lead(text: str) -> dict[str, str]:
    """``key: value`` lines between <lead> delimiters (or anywhere in the text), keys lower-cased."""
    match = _LEAD_RE.search(text)
    block = match.group(1) if match else text
    fields: dict[str, str] = {}
    for line in block.splitlines():
        m = _FIELD_RE.match(line)
        if m:
            key = m.group(1).strip().lower().replace(" ", "_")
            fields.setdefault(key, m.group(2).strip())
    return fields


def _first_name(fields: dict[str, str]) -> str | None:
    for key in _NAME_KEYS:
        value = fields.get(key)
        if value:
            first = value.split()[0].strip(",.;")
            return first[:1].upper() + first[1:] if first else None
    return None


def generate_text(messages: Any) -> str:
    """A friendly personalised text of 1-4 sentences, deterministic in the request messages; a
    prompt with a ``<conversation>`` block (a follow-up) gets a text that picks the conversation up."""
    text = user_text(messages)
    fields = parse_lead(text)
    digest = request_digest(messages)
    name = _first_name(fields)
    follow_up = _CONVERSATION_OPEN in text
    greetings = _FOLLOW_UP_GREETINGS if follow_up else _GREETINGS
    anonymous = _ANONYMOUS_FOLLOW_UPS if follow_up else _ANONYMOUS_GREETINGS
    if name:
        greeting = greetings[digest % len(greetings)].format(name=name)
    else:
        greeting = anonymous[digest % len(anonymous)]
    n_sentences = 1 + (digest >> 8) % 4
    pool: list[str] = []
    for i, (key, value) in enumerate(sorted(fields.items())):
        if key in _NAME_KEYS or key in _SKIP_KEYS or not value:
            continue
        value = value[:60]
        template = _KNOWN_FIELD_SENTENCES.get(key) or _FIELD_SENTENCES[(digest >> (16 + i)) % len(_FIELD_SENTENCES)]
        pool.append(template.format(key=key.replace("_", " "), value=value))
    start = (digest >> 24) % len(_FILLERS)
    pool.extend(_FILLERS[start:] + _FILLERS[:start])
    return " ".join([greeting, *pool[: n_sentences - 1]])


def split_source(messages: Any) -> str:
    """The text the engine asks to split."""
    text = user_text(messages)
    match = _TEXT_RE.search(text)
    return (match.group(2) if match else text).strip()


def max_parts_hint(messages: Any) -> int | None:
    """A "max parts: N" / "at most N parts" hint anywhere in the prompt, if any."""
    text = all_text(messages)
    for regex in _MAX_PARTS_RES:
        m = regex.search(text)
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return None


def split_sentences(text: str) -> list[str]:
    """Sentences and paragraphs of a text, empties dropped, nothing else lost."""
    return [s.strip() for s in _SENTENCE_RE.split(text.strip()) if s and s.strip()]


def split_parts(text: str, max_parts: int | None) -> list[str]:
    """Split on sentence boundaries, merging neighbours evenly so there are at most ``max_parts`` parts."""
    sentences = split_sentences(text)
    if not sentences:
        return []
    if not max_parts or len(sentences) <= max_parts:
        return sentences
    per, extra = divmod(len(sentences), max_parts)
    parts, i = [], 0
    for k in range(max_parts):
        n = per + (1 if k < extra else 0)
        parts.append(" ".join(sentences[i : i + n]))
        i += n
    return parts


def count_tokens(text: str) -> int:
    """Plausible token count (about 4 characters per token)."""
    return max(1, (len(text) + 3) // 4)


# -- reply triage (R-IN-5) --------------------------------------------------------------------------

_REPLY_RE = re.compile(r"<reply>(.*?)</reply>", re.IGNORECASE | re.DOTALL)

#: the sandbox's scripted classifier: the first rule with a keyword found in the reply (lower-cased,
#: as written) wins; none: ``other``. A reply that tries to instruct the model is data like any
#: other: it is classified ``other`` (a well-behaved model is not steered by it).
TRIAGE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("other", ("ignore your instructions", "ignore as instruções", "ignore previous", "system prompt")),
    (
        "opt_out",
        (
            "não me mandem",
            "nao me mandem",
            "não me envie",
            "pare de",
            "parem de",
            "me tire",
            "me remova",
            "descadastr",
            "unsubscribe",
            "stop messaging",
            "don't message",
            "do not message",
        ),
    ),
    (
        "out_of_office",
        (
            "férias",
            "ferias",
            "fora do escritório",
            "fora do escritorio",
            "ausente",
            "out of office",
            "on holiday",
            "on vacation",
            "resposta automática",
            "resposta automatica",
            "volto dia",
            "retorno dia",
        ),
    ),
    (
        "not_interested",
        (
            "não tenho interesse",
            "nao tenho interesse",
            "sem interesse",
            "não, obrigad",
            "nao, obrigad",
            "não preciso",
            "nao preciso",
            "not interested",
            "no thanks",
            "no, thanks",
        ),
    ),
    ("question", ("?",)),
    ("interested", ("tenho interesse", "interesse", "quero", "me conta", "sim", "interested", "yes", "bora")),
)


def is_triage(messages: Any) -> bool:
    """Whether a JSON-mode request is a reply triage (its user message holds a <reply> block)."""
    return _REPLY_RE.search(user_text(messages)) is not None


def triage_reply(messages: Any) -> str:
    """The reply text a triage request classifies (the <reply> block of the user message)."""
    match = _REPLY_RE.search(user_text(messages))
    return match.group(1).strip() if match else ""


def triage_intent(reply: str) -> str:
    """The scripted intent of a reply: the first matching rule of TRIAGE_RULES, else ``other``."""
    text = reply.lower()
    for intent, keywords in TRIAGE_RULES:
        if any(k in text for k in keywords):
            return intent
    return "other"


def system_text(messages: Any) -> str:
    """Every system message's text, joined (the ledger checks that a reply never lands there)."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(
        _content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "system"
    )
