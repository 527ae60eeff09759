#!/usr/bin/env python3
"""Fault-injection suite (SPEC T-REL-1, E-14, E-15, E-16): ``make chaos`` or ``python scripts/chaos.py``.

Real RabbitMQ, PostgreSQL, ``dramatiq`` workers, scheduler and sandbox; seeded faults; a verdict
table; exit status 1 when any check fails. ``--ci`` is the small variant run by tests/test_chaos.py.
The logic lives in the ``chaos`` package (chaos/run.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chaos.run import main  # noqa: E402  (after the path fix: run from anywhere)

if __name__ == "__main__":
    sys.exit(main())
