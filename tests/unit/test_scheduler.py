"""scheduler.py without services: its jobs are data with stable ids (a restart never doubles a job)."""

from __future__ import annotations

import scheduler
from campaign.settings import get_settings


def test_job_specs_have_stable_ids():
    ids = [j.id for j in scheduler.job_specs(get_settings())]
    assert ids == [
        "plan_due_runs",
        "dispatch_due",
        "window_guard",
        "recovery_sweep",
        "inbox_health",
        "pool_failover",
        "alerts",
    ]
