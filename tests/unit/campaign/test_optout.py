"""Opt-out intent by whole message (SPEC R-IN-4, E-28): the phrase table, positives and negatives."""

from __future__ import annotations

import pytest

from campaign.optout import is_opt_out, normalise, phrase_set

POSITIVES = [
    "PARE",
    "pare",
    "Pare!",
    "PARE!!! 🛑",
    "pare por favor",
    "Por favor, pare.",
    "ok pare",
    "PAAAARE",
    "pare pare pare",
    "parar",
    "Pode parar",
    "sair",
    "Quero sair",
    "Não quero mais",
    "nao quero mais 🙏",
    "NÃO QUERO MAIS RECEBER MENSAGENS",
    "não me mande mais mensagens",
    "remover",
    "Me remova",
    "me tire da lista",
    "descadastrar",
    "STOP",
    "Stop.",
    "stop please",
    "Unsubscribe",
    "remove me",
    "opt out",
    "leave me alone",
    "baja",
    "Dame de baja",
    "no me escribas más",
    "  sair  ",
    "SAIR 😡😡",
]

NEGATIVES = [
    "vamos parar de enrolar e fechar?",
    "Vamos parar de enrolar e fechar negócio?",
    "we have got to STOP this bill",
    "não me mande mais boletos",
    "Não quero",  # not interested is not "stop writing to me"
    "parabéns pela empresa",
    "para quando seria a entrega?",
    "Oi, tenho interesse",
    "Quanto custa?",
    "stopwatch",
    "sairei de férias amanhã, falamos depois",
    "",
    "🛑",
    "a" * 200,
]


@pytest.mark.parametrize("text", POSITIVES)
def test_e28_opt_out_phrases_are_recognised(text):
    """E-28: the built-in pt/en/es phrases, with accents, emoji, capitals and polite fillers."""
    assert is_opt_out(text)


@pytest.mark.parametrize("text", NEGATIVES)
def test_e28_sentences_with_stop_words_are_not_opt_outs(text):
    """E-28: the whole message decides, not a substring ("vamos parar de enrolar?")."""
    assert not is_opt_out(text)


def test_normalise_folds_case_accents_punctuation_emoji_and_long_repeats():
    assert normalise("  NÃO   quero MAIS!!! 🙅‍♀️ ") == "nao quero mais"
    assert normalise("PAAAARE") == "pare"
    assert normalise("correr") == "correr"  # real double letters stay


def test_workspace_phrases_replace_the_builtin_list():
    """R-IN-4: opt_out_phrases replaces the defaults (normalised the same way)."""
    phrases = phrase_set(["Chega de mensagens", "!!!"])
    assert phrases == frozenset({"chega de mensagens"})
    assert is_opt_out("chega de mensagens!", phrases)
    assert not is_opt_out("stop", phrases)
