"""The demo's metrics (R-OBS-1/2): where they are, and one dashboard panel's numbers in the summary.

The demo serves its own process's ``/metrics`` (the engine's counters of its in-process workers,
scheduler and listeners, and the database gauges) on a free local port, as ``scheduler.py``
does on ``METRICS_PORT``. At the end it computes the database gauges once, as the active
scheduler does on its interval, scrapes its own endpoint like Prometheus would, and renders the
Grafana dashboard's "Messages by status" panel (``sum by (status) (campaign_messages)``) from the
scrape, checked against the rows: a panel that disagrees with the database fails the demo.
"""

from __future__ import annotations

import collections
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["DemoMetrics", "PANEL_TITLE", "PANEL_EXPR"]

PANEL_TITLE = "Messages by status"
PANEL_EXPR = "sum by (status) (campaign_messages)"


class DemoMetrics:
    """Serve /metrics for the demo process; summarise one panel at the end."""

    def __init__(self) -> None:
        self.url: str | None = None

    def start(self, console: Any) -> None:
        from campaign import metrics

        port = metrics.serve(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{port}/metrics"
        console.print(
            f"      metrics: {self.url} (Prometheus text: the engine's counters and, once computed, its "
            "database gauges; `docker compose --profile monitoring up` scrapes the same names into Grafana)",
            markup=False,
        )

    def summary(self, console: Any, run_ids: list[int]) -> tuple[dict[str, Any], list[str]]:
        """({url, panel, values}, mismatches): the panel from a scrape, compared with the rows."""
        from campaign import metrics
        from campaign.db import db

        if self.url is None:
            return {}, []
        with db.connection_context():
            metrics.refresh()  # what the active scheduler does every 15 s
            rows = dict(
                db.execute_sql(
                    "SELECT status, count(*) FROM campaign_messages WHERE run_id = ANY(%s) GROUP BY status", (run_ids,)
                ).fetchall()
            )
        text = httpx.get(self.url, timeout=10).text
        panel: collections.Counter[str] = collections.Counter()
        for family in text_string_to_metric_families(text):
            if family.name != "campaign_messages":
                continue
            for sample in family.samples:
                if sample.name == "campaign_messages" and sample.value:
                    panel[sample.labels["status"]] += int(sample.value)
        shown = " · ".join(f"{status} {n}" for status, n in sorted(panel.items())) or "(no series)"
        console.print(f"dashboard panel {PANEL_TITLE!r} ({PANEL_EXPR}) from {self.url}: {shown}", markup=False)
        mismatches = []
        if dict(panel) != {status: n for status, n in rows.items() if n}:
            mismatches.append(f"metrics: panel {PANEL_TITLE!r} shows {dict(panel)}, the rows say {rows}")
        return {"url": self.url, "panel": PANEL_TITLE, "expr": PANEL_EXPR, "values": dict(panel)}, mismatches
