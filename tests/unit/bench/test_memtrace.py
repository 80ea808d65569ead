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


def test_small_tables_reach_what_the_router_builds() -> None:
    """``--small-tables`` lowers the defaults the router's tables are built with; a renamed
    parameter would otherwise leave a soak silently on production sizes."""
    from kvroute_router.kvevents import hashing, selfcheck, subscriber, tokenization
    from kvroute_router.plugins import prefix_approx

    saved = (dict(tokenization.PromptTokenizer.__init__.__kwdefaults__ or {}),
             dict(hashing.BlockHasher.__init__.__kwdefaults__ or {}),
             prefix_approx.ApproxPrefixIndex.__init__.__defaults__,
             dict(selfcheck.BlockHashSelfCheck.__init__.__kwdefaults__ or {}),
             subscriber.RECENT_DIGESTS)
    try:
        memtrace.shrink_tables()
        small = memtrace.SMALL_TABLES
        hasher = hashing.BlockHasher(hashing.BlockHashConfig(16))
        assert hasher.memo_blocks == small["block-hash memo blocks"]
        assert prefix_approx.ApproxPrefixIndex().max_blocks_per_endpoint == (
            small["approximate prefix history blocks per endpoint"])
        assert (tokenization.PromptTokenizer.__init__.__kwdefaults__ or {})["cache_tokens"] == (
            small["tokenizer cache tokens"])
        assert selfcheck.BlockHashSelfCheck("e", hasher)._known_max == (
            small["hash self-check digests"])
        recent_digests = subscriber.RECENT_DIGESTS
        assert recent_digests == small["KV-event recent digests per engine"]
    finally:
        (tokenization.PromptTokenizer.__init__.__kwdefaults__ or {}).update(saved[0])
        (hashing.BlockHasher.__init__.__kwdefaults__ or {}).update(saved[1])
        prefix_approx.ApproxPrefixIndex.__init__.__defaults__ = saved[2]
        (selfcheck.BlockHashSelfCheck.__init__.__kwdefaults__ or {}).update(saved[3])
        subscriber.RECENT_DIGESTS = saved[4]


def test_malloc_report_fits_each_column_after_the_warm_up(tmp_path: Path) -> None:
    mib = 2**20
    # RSS grows 1 MiB every 360 s (10 MiB/h) after a jump during the warm-up; the rest is flat.
    lines = [f"{t} {(100 + (50 if t >= 300 else 0) + t // 360) * mib} 1000 {20 * mib} "
             f"{5 * mib} {mib}" for t in range(0, 3601, 60)]
    (tmp_path / "malloc.log").write_text("\n".join(lines) + "\n")
    text = memtrace.report(tmp_path, top=3, from_s=300)
    rows = {line.split("|")[1].strip(): line.split("|")[4] for line in text.splitlines()
            if line.startswith("| ") and "column" not in line}
    assert 9.0 < float(rows["rss"].split()[0]) < 11.0
    assert float(rows["glibc_in_use"].split()[0]) == 0.0
    assert "fewer than two samples" in memtrace.report(tmp_path, top=3, from_s=9999)


def test_mallinfo_reads_this_process_allocator() -> None:
    info = memtrace._mallinfo()
    if info is None:  # not glibc >= 2.33: malloc.log then has zeros for glibc's columns
        return
    assert info.uordblks > 0
