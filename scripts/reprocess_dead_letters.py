#!/usr/bin/env python
"""List, requeue or purge the dead letters of the campaign pipeline (SPEC R-OPS-2).

    python scripts/reprocess_dead_letters.py                       # list (XQ copies + PostgreSQL records)
    python scripts/reprocess_dead_letters.py --queue campaign.send --older-than 2h
    python scripts/reprocess_dead_letters.py --requeue --dry-run   # what would change
    python scripts/reprocess_dead_letters.py --requeue --run 42
    python scripts/reprocess_dead_letters.py --purge --id 17

Exit codes: 0 ok, 1 some dead letters could not be handled, 2 bad arguments. The logic lives in
the package ``campaign/ops/dead_letters/`` (also reachable as ``python cli.py dead-letters``).
"""

from __future__ import annotations

import sys

from campaign.ops import dead_letters

if __name__ == "__main__":
    sys.exit(dead_letters.main())
