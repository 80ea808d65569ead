"""Puts the checkout's ``bench/`` folder on ``sys.path`` so ``kvroute_bench`` imports."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
