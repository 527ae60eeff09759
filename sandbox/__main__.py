"""``python -m sandbox``: run the sandbox provider until SIGTERM/SIGINT.

Evolution's events (see sandbox.events) go to the webhook (``--webhook-url``, or ``webhook_url`` in the
faults) and, with ``--events-amqp-url``, to RabbitMQ as Evolution's global mode publishes them
(``--events-exchange``, ``--events-prefix``). The ``--events-*`` options default to the environment
variables ``SANDBOX_EVENTS_AMQP_URL``, ``SANDBOX_EVENTS_EXCHANGE``, ``SANDBOX_EVENTS_PREFIX`` (their own
names, so a sandbox never picks up the engine's settings for the real broker).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from sandbox import READY_PREFIX
from sandbox.config import FaultError
from sandbox.server import make_server

logger = logging.getLogger("sandbox")


def _faults_arg(value: str) -> dict[str, Any]:
    """--faults takes inline JSON or @path/to/file.json."""
    text = open(value[1:], encoding="utf-8").read() if value.startswith("@") else value
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("--faults must be a JSON object")
    return doc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on stdout)")
    p.add_argument("--faults", type=_faults_arg, default=None, help="JSON object or @file (see sandbox.config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws and ids (replayable runs)")
    p.add_argument("--webhook-url", default=None, help="POST Evolution events here (webhook_events in the faults)")
    p.add_argument("--webhook-secret", default=None, help="sent as the envelope's apikey")
    p.add_argument(
        "--events-amqp-url",
        default=os.environ.get("SANDBOX_EVENTS_AMQP_URL") or None,
        help="publish events to this RabbitMQ as Evolution's global mode does (amqp_events in the faults)",
    )
    p.add_argument(
        "--events-exchange",
        default=os.environ.get("SANDBOX_EVENTS_EXCHANGE") or "evolution",
        help="topic exchange of the events (Evolution's RABBITMQ_EXCHANGE_NAME; default evolution)",
    )
    p.add_argument(
        "--events-prefix",
        default=os.environ.get("SANDBOX_EVENTS_PREFIX", "evolution"),
        help="queues are {prefix}.{event} (Evolution's RABBITMQ_PREFIX_KEY; empty: just {event}; default evolution)",
    )
    p.add_argument(
        "--events-amqp-retry-seconds",
        type=float,
        default=30.0,
        help="an event not published within this long (broker away) is counted failed and dropped",
    )
    p.add_argument(
        "--events-amqp-publishers",
        type=int,
        default=4,
        help="publisher connections (each waits for its confirms; a quorum queue confirms a few hundred/s each)",
    )
    p.add_argument("--chat-key", default=None, help="expected OpenRouter Bearer key (default sandbox-key)")
    p.add_argument("--evolution-key", default=None, help="expected Evolution apikey (default sandbox-evo-key)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until a signal arrives."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = make_server(
            args.host,
            args.port,
            faults=args.faults,
            seed=args.seed,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            chat_key=args.chat_key,
            evolution_key=args.evolution_key,
            events_amqp_url=args.events_amqp_url,
            events_exchange=args.events_exchange,
            events_prefix=args.events_prefix,
            events_amqp_retry_seconds=args.events_amqp_retry_seconds,
            events_amqp_publishers=args.events_amqp_publishers,
        )
    except FaultError as exc:
        print(f"invalid --faults: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad events URL or exchange
        print(f"invalid --events-* option: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="sandbox-serve", daemon=True
    )
    thread.start()
    print(f"{READY_PREFIX} {server.url}", flush=True)
    logger.info("sandbox listening on %s (seed %s)", server.url, args.seed)
    while not stop.wait(0.5):
        pass
    server.app.close()  # wakes sleeping/hanging requests
    server.shutdown()
    server.server_close()
    thread.join(2.0)
    logger.info("sandbox stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
