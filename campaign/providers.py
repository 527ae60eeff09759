"""What the chain needs of its providers, as Protocols: the real httpx clients (``clients/``), the
sandbox-backed ones in tests and any fake satisfy them (DESIGN: clients are typed, never Any)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Completion(Protocol):
    """One chat completion."""

    text: str
    total_tokens: int | None


class LLM(Protocol):
    """An OpenRouter-compatible chat API (``clients.openrouter.OpenRouterClient``)."""

    def chat(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        json_mode: bool = ...,
    ) -> Completion:
        """One completion, or a classified ProviderError."""
        ...


class SendResult(Protocol):
    """An accepted send."""

    key_id: str


class Messenger(Protocol):
    """An Evolution-API-compatible WhatsApp gateway (``clients.evolution.EvolutionClient``)."""

    def send_text(self, instance: str, number: str, text: str) -> SendResult:
        """Send one text, or raise a classified ProviderError (AmbiguousSend when the outcome is unknown)."""
        ...

    def connection_state(self, instance: str) -> str:
        """The instance's connection state ("open", "close", "connecting", ...)."""
        ...
