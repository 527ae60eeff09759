"""Is this reply a request to stop? Whole-message intent, not substrings (SPEC R-IN-4, E-28).

A reply opts the lead out when, after normalisation (case, accents, punctuation, emoji and repeated
letters folded away), the WHOLE message is one of the phrases, optionally wrapped in a few polite
or filler words ("por favor", "please", "ok", "obrigado", "já disse"). Anything longer is a sentence
that merely contains a stop word ("vamos parar de enrolar e fechar?", "we have got to STOP this
bill", "não me mande mais boletos") and is not an opt-out: the lead is still replying, and the
reply handling (stop on reply, R-IN-3) already ends the sequence. With triage on, the LLM's
``opt_out`` intent catches the free-form ones (R-IN-5).

A workspace may replace the built-in pt/en/es list with its own ``opt_out_phrases`` (normalised
the same way).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = ["DEFAULT_PHRASES", "FILLERS", "is_opt_out", "normalise", "phrase_set"]

#: Built-in phrases (pt, en, es), written naturally; they are normalised before matching.
DEFAULT_PHRASES: tuple[str, ...] = (
    # pt
    "pare",
    "para",
    "parar",
    "pode parar",
    "sair",
    "quero sair",
    "sai",
    "não quero mais",
    "não quero receber",
    "não quero mais receber",
    "não quero receber mensagens",
    "não quero mais receber mensagens",
    "não me mande mais",
    "não me mande mais mensagens",
    "não mande mais",
    "não mande mais mensagens",
    "não me envie mais",
    "não me envie mais mensagens",
    "não envie mais",
    "pare de mandar",
    "pare de mandar mensagem",
    "pare de mandar mensagens",
    "pare de me mandar mensagem",
    "pare de me mandar mensagens",
    "para de mandar mensagem",
    "para de mandar mensagens",
    "remover",
    "remova",
    "me remova",
    "me remove",
    "remove",
    "me tire da lista",
    "me tira da lista",
    "tire meu número",
    "tira meu número",
    "descadastrar",
    "descadastre",
    "me descadastre",
    "chega",
    "bloquear",
    "spam",
    # en
    "stop",
    "stop it",
    "unsubscribe",
    "remove me",
    "opt out",
    "optout",
    "stop messaging me",
    "stop texting me",
    "stop sending messages",
    "do not contact me",
    "dont contact me",
    "do not message me",
    "dont message me",
    "leave me alone",
    # es
    "baja",
    "darme de baja",
    "dame de baja",
    "de baja",
    "no quiero más",
    "no me escribas más",
    "no me escribas",
    "no me envíes más mensajes",
    "no me envíen más mensajes",
    "no más mensajes",
    "no mas",
    "eliminar",
    "elimíname",
    "detener",
    "basta",
    "cancelar suscripción",
)

#: Words that may wrap a phrase without changing its intent ("pare por favor", "ok, stop").
FILLERS: tuple[str, ...] = (
    "por favor",
    "porfavor",
    "pfv",
    "pf",
    "favor",
    "please",
    "pls",
    "plz",
    "ok",
    "okay",
    "obrigado",
    "obrigada",
    "obg",
    "grato",
    "grata",
    "thanks",
    "thank you",
    "gracias",
    "ja disse",
    "eu ja disse",
    "ja falei",
    "i said",
    "just",
    "ya",
    "por favor ya",
    "oi",
    "ola",
    "hi",
    "hola",
    "moço",
    "moca",
    "cara",
    "amigo",
    "amiga",
    "senhor",
    "senhora",
    "de novo",
    "again",
    "now",
    "agora",
    "ahora",
    "mesmo",
)

_NOT_WORD = re.compile(r"[^0-9a-z]+")
_REPEATS = re.compile(r"([a-z])\1{2,}")  # "paaaare" -> "pare", keeps real doubles ("correr")


def normalise(text: str) -> str:
    """Lower case, accents stripped, anything but letters and digits a single space, letters
    repeated three or more times folded to one ("PAAARE!!! 🛑" -> "pare")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    words = _NOT_WORD.sub(" ", plain).strip()
    return _REPEATS.sub(r"\1", words)


_FILLER_SET = frozenset(normalise(f) for f in FILLERS)
_MAX_FILLER_WORDS = max(len(f.split()) for f in _FILLER_SET)


def phrase_set(phrases: Iterable[str] | None = None) -> frozenset[str]:
    """The normalised phrases (the built-in list when ``phrases`` is None); empties dropped."""
    source = DEFAULT_PHRASES if phrases is None else phrases
    return frozenset(p for p in (normalise(x) for x in source) if p)


_DEFAULT_SET = phrase_set()


def _strip_fillers(words: list[str]) -> list[str]:
    """Remove filler words at either end ("ok pare por favor" -> "pare")."""
    changed = True
    while changed and words:
        changed = False
        for n in range(min(_MAX_FILLER_WORDS, len(words)), 0, -1):
            if " ".join(words[:n]) in _FILLER_SET and len(words) > n:
                words, changed = words[n:], True
                break
            if " ".join(words[-n:]) in _FILLER_SET and len(words) > n:
                words, changed = words[:-n], True
                break
    return words


def is_opt_out(text: str | None, phrases: frozenset[str] | None = None) -> bool:
    """Whether the whole reply asks to stop (R-IN-4). ``phrases`` from :func:`phrase_set`."""
    if not text:
        return False
    wanted = _DEFAULT_SET if phrases is None else phrases
    norm = normalise(text)
    if not norm or len(norm) > 80:  # a long message is a conversation, not a stop request
        return False
    if norm in wanted:
        return True
    core = " ".join(_strip_fillers(norm.split()))
    if core in wanted:
        return True
    # "pare pare pare", "stop stop": the same phrase repeated
    words = core.split()
    return len(set(words)) == 1 and words[0] in wanted
