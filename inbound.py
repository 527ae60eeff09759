"""The Evolution events consumer: ``python inbound.py`` (SPEC R-IN-1).

Consumes the queues Evolution API declares in RabbitMQ global mode
(``{EVOLUTION_EVENTS_PREFIX}.messages.upsert``, ``.messages.update``, ``.connection.update``) from
``EVOLUTION_EVENTS_RABBITMQ_URL`` and applies each event (replies, opt-outs, receipts, connection
changes) to the database; see :mod:`campaign.inbound.consumer`. Refuses to start, saying why,
while ``EVOLUTION_EVENTS_RABBITMQ_URL`` is empty. SIGTERM/SIGINT stop it cleanly (unacked events go
back to their queues). Several may run side by side: RabbitMQ shares the queues between them and
every effect is idempotent.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence

from campaign import metrics
from campaign.db import close_db, init_db
from campaign.errors import EngineError
from campaign.inbound.consumer import InboundConsumer
from campaign.logs import configure_logging
from campaign.process import serve_metrics, stop_on_signals
from campaign.settings import get_settings

log = logging.getLogger("inbound")

#: first stdout line once consuming (the demo and tests read it)
READY_PREFIX = "inbound consuming"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: consume until SIGTERM/SIGINT."""
    argparse.ArgumentParser(
        prog="inbound.py", description="Consume Evolution API's events (replies, receipts, connection changes)."
    ).parse_args(argv)
    try:
        settings = get_settings()
        consumer = InboundConsumer(settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    # the engine's broker (RABBITMQ_URL, publisher confirms): a reply of a triage campaign is
    # published to campaign.triage right after its commit (R-IN-5); the sweep is the safety net
    import actors  # noqa: F401

    init_db(settings, max_connections=4, application_name=f"campaign-inbound:{os.getpid()}")
    # R-OBS-1: the consumer's own tallies, read at scrape time (result names are a fixed vocabulary:
    # "<event queue>:<result>", "ignored", "poison")
    metrics.register_counts(
        metrics.INBOUND_CONSUMED,
        "Evolution events this consumer handled, by outcome (<event>:<result>, ignored, poison)",
        "outcome",
        lambda: dict(consumer.stats.by_result),
    )
    if not serve_metrics(settings):
        return 2
    stop_on_signals(consumer.stop)

    def announce() -> None:
        if consumer.ready.wait():
            print(f"{READY_PREFIX} {consumer.prefix}.* on exchange {consumer.exchange}", flush=True)

    threading.Thread(target=announce, name="inbound-ready", daemon=True).start()
    try:
        consumer.run()
    finally:
        close_db()
    return 0


if __name__ == "__main__":
    sys.exit(main())
