"""campaign.text: the split answer is parsed without ever trusting rewritten text, and the local split
is deterministic and lossless (R-PIPE-2, E-12). No services."""

from __future__ import annotations

import pytest

from campaign.text import _norm, local_split, parse_split_answer


@pytest.mark.parametrize(
    "answer,expected",
    [
        ('{"messages": ["Olá Ana!", "Tudo bem?"]}', ["Olá Ana!", "Tudo bem?"]),
        ('```json\n{"messages": ["Olá Ana!", "Tudo bem?"]}\n```', ["Olá Ana!", "Tudo bem?"]),
        (
            'Claro! Aqui está: {"messages": ["Olá Ana!", "", "Tudo bem?"]} Espero ter ajudado.',
            ["Olá Ana!", "Tudo bem?"],
        ),
        ('["Olá", "Ana!", "Tudo", "bem?"]', ["Olá", "Ana!", "Tudo bem?"]),
        ('{"messages": ["Olá Ana!", "Tudo ótimo?"]}', None),  # rewritten text: never trusted
        ("not json at all", None),
        ('{"messages": [1, 2]}', None),
        ("", None),
    ],
)
def test_parse_split_answer(answer, expected):
    assert parse_split_answer(answer, "Olá Ana! Tudo bem?", 3) == expected


def test_local_split_is_deterministic_and_lossless():
    text = (
        "Oi Carla, tudo bem? Vi que a sua loja em Recife cresceu muito este ano. "
        "Trabalhamos com empresas como a sua há dez anos.\n\nPodemos conversar quinze minutos amanhã? "
        "Acho que temos algo útil para você."
    )
    parts = local_split(text, 3)
    assert parts == local_split(text, 3)
    assert 2 <= len(parts) <= 3
    assert _norm("".join(parts)) == _norm(text)
    assert local_split("Curto.", 3) == ["Curto."]
