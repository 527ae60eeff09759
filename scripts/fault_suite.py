#!/usr/bin/env python3
"""Fault-injection suite (SPEC T-REL-1, E-14, E-15, E-16): ``make chaos`` or ``python scripts/fault_suite.py``.

Real RabbitMQ, PostgreSQL, ``dramatiq`` workers, scheduler and sandbox; seeded faults; a verdict
table; exit status 1 when any check fails. ``--ci`` is the small variant run by tests/integration/chaos/test_run.py.
The logic lives in the ``chaos`` package (chaos/run.py).
"""

from __future__ import annotations

import sys

from chaos.run import main

if __name__ == "__main__":
    sys.exit(main())
