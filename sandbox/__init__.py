"""Sandbox provider: a real HTTP server speaking the OpenRouter and Evolution API protocols (SPEC §5).

Fault injection, latency, a ledger of every request and accepted send, Retry-After discipline, and
Evolution's events (receipts, ``send.message``, scripted and automatic inbound replies, connection
changes) published over a webhook and/or to RabbitMQ the way Evolution's global mode does. Run it with
``python -m sandbox --port 8765 [--webhook-url URL] [--events-amqp-url amqp://... --events-exchange
evolution --events-prefix evolution]`` or, from tests, demo and benchmarks, with
:class:`sandbox.testing.SandboxProcess`.

Modules: ``server`` (HTTP routes, control API), ``config`` (the fault document), ``ledger``,
``events`` (payload shapes, envelopes, the timing bus), ``webhook`` and ``amqp`` (the sinks),
``replies`` (scripted inbound messages and automatic replies), ``llm`` (the fake model), ``testing``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CHAT_KEY", "DEFAULT_EVOLUTION_KEY", "READY_PREFIX"]

DEFAULT_CHAT_KEY = "sandbox-key"
DEFAULT_EVOLUTION_KEY = "sandbox-evo-key"
#: first stdout line of ``python -m sandbox``: "SANDBOX_READY http://host:port"
READY_PREFIX = "SANDBOX_READY"
