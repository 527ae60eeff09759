"""What every long-running entry point (``scheduler.py``, ``inbound.py``, ``webhook.py``) does the
same way at start-up: serve ``/metrics`` or say why not, and stop cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from campaign import metrics
from campaign.db import close_db
from campaign.settings import Settings

__all__ = ["serve_metrics", "stop_on_signals"]

log = logging.getLogger(__name__)


def serve_metrics(settings: Settings) -> bool:
    """Serve this process's ``/metrics`` on METRICS_PORT (unset: nothing to do). False, after
    printing why on stderr and closing the database pool, when the port cannot be bound: the
    caller exits with code 2 (a start-up error), never runs unobserved."""
    try:
        metrics.serve(settings.metrics_port)
    except OSError as exc:
        print(f"error: cannot serve /metrics on METRICS_PORT={settings.metrics_port}: {exc}", file=sys.stderr)
        close_db()
        return False
    return True


def stop_on_signals(stop: Callable[[], object]) -> None:
    """Call ``stop`` (once per signal) on SIGTERM and SIGINT, logging which signal asked."""

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
