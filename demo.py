#!/usr/bin/env python3
"""``python demo.py``: the whole engine end to end (``make demo``). The demo lives in ``devtools.demo``."""

from __future__ import annotations

import sys

from devtools.demo import main

if __name__ == "__main__":
    sys.exit(main())
