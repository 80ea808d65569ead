"""``bench/memtrace.py``: growth is attributed to the router's bounded tables by the files in an
allocation's traceback, and ``report`` turns real snapshots into MiB/h per table."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import memtrace


def traceback(*files: str) -> tracemalloc.Traceback:
    return tracemalloc.Traceback(tuple((f, 1) for f in files))


def test_an_allocation_belongs_to_the_table_any_of_its_frames_names() -> None:
    router = "/src/router/kvroute_router"
    assert memtrace.table_of(traceback(f"{router}/kvevents/hashing.py")).startswith(
        "block-hash memo")
    assert memtrace.table_of(traceback(f"{router}/proxy/server.py",
                                       "/venv/aiohttp/payload.py")) == (
        "aiohttp client request bodies")
    assert memtrace.table_of(traceback("/src/elsewhere.py")) == "everything else"


def test_report_shows_the_growth_between_snapshots(tmp_path: Path) -> None:
    kept: list[bytes] = []
    tracemalloc.start(2)
    try:
        tracemalloc.take_snapshot().dump(str(tmp_path / "snap-000010.pickle"))
        kept.extend(bytes(1024) for _ in range(2048))  # 2 MiB that stay
        tracemalloc.take_snapshot().dump(str(tmp_path / "snap-000020.pickle"))
    finally:
        tracemalloc.stop()
    text = memtrace.report(tmp_path, top=3)
    assert "| table | 10-20 s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| everything else"))
    # 2 MiB in 10 s is ~720 MiB/h (the test's own small allocations add a little).
    assert 700 < float(row.split("|")[2]) < 800
    assert "test_memtrace.py" in text  # the line that allocated is named
    assert memtrace.report(tmp_path / "none", top=3).endswith("fewer than two snapshots")
