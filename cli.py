#!/usr/bin/env python3
"""``python cli.py …``: the operator CLI (R-OPS-1). The commands live in ``campaign.ops.cli``."""

from __future__ import annotations

import sys

from campaign.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
