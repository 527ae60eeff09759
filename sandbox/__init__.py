"""Sandbox provider: a real HTTP server speaking the OpenRouter and Evolution API protocols (SPEC §5).

Fault injection, latency, a ledger of every request and accepted send, Retry-After discipline and
optional ``messages.update`` webhooks. Run it with ``python -m sandbox --port 8765`` or, from tests,
demo and benchmarks, with :class:`sandbox.testing.SandboxProcess`.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CHAT_KEY", "DEFAULT_EVOLUTION_KEY", "READY_PREFIX"]

DEFAULT_CHAT_KEY = "sandbox-key"
DEFAULT_EVOLUTION_KEY = "sandbox-evo-key"
#: first stdout line of ``python -m sandbox``: "SANDBOX_READY http://host:port"
READY_PREFIX = "SANDBOX_READY"
