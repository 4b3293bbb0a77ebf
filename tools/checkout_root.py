"""Puts the checkout's root first on ``sys.path``: the test harness (``harness/``) is in no install.

A tool that uses the harness imports this module before it: ``import checkout_root  # noqa: F401``.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
