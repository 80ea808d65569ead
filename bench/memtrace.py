"""Where a long-running router's Python heap grows: tracemalloc snapshots, attributed.

``run`` starts ``kvroute`` (the CLI, any sub-command; ``bench/soak.py --tracemalloc-every S``
uses it for the router) with ``tracemalloc`` tracing ``--frames`` frames, and writes a snapshot
into ``--out`` every ``--every`` seconds, after a full garbage collection (``snap-<t>.pickle``;
``traced.log`` has the traced total and the process RSS beside each). ``report`` compares
consecutive snapshots and prints, per interval, how fast each of the router's bounded tables
and everything else grew (MiB/h), then the allocating lines that grew most over the last
interval. Traced memory is the Python heap (and numpy's buffers); RSS growth beyond it is
native memory or the allocator's.

Snapshots stop the router for a moment and tracing slows it (~2x CPU) and adds its own memory,
so a traced run's RSS and latency say nothing; only the heap diff counts.

Every interval also appends to ``malloc.log`` what the allocators hold: RSS, Python's
allocated blocks, and glibc's ``mallinfo2`` over all its arenas (bytes in use, free bytes it
keeps, bytes in its own mmaps). ``--no-trace`` keeps only that (no tracemalloc, so RSS is the
router's own); ``--small-tables`` shrinks the router's bounded tables (tokenizer cache, block-hash
memo, approximate prefix history, digest maps) to a few thousand entries, so every table is
full within minutes and what RSS still does after that is not a table filling (soak.md, run 10).
``report`` prints, when ``malloc.log`` exists, the growth per hour of each of its columns from
``--from`` seconds on.

    python bench/memtrace.py run --every 250 --out DIR -- router --config ...
    python bench/memtrace.py run --no-trace --small-tables --every 60 --out DIR -- router ...
    python bench/memtrace.py report DIR [--from 420]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path

# The allocating file (any frame of the traceback) → the bounded table it fills.
TABLES: tuple[tuple[str, str], ...] = (
    ("kvevents/tokenization.py", "tokenizer cache (kv_tokenizer_cache_tokens, 4M tokens)"),
    ("kvevents/hashing.py", "block-hash memo (kv_hash_memo_blocks, 65,536 blocks)"),
    ("plugins/prefix_approx.py",
     "approximate prefix history (prefix_approx_history_blocks, 32,768/endpoint)"),
    ("kvevents/selfcheck.py", "hash self-check digests (4,096/engine)"),
    ("kvevents/subscriber.py", "KV-event recent digests (kv_recent_digests, 4,096/engine)"),
    ("kvevents/events.py", "KV-event recent digests (kv_recent_digests, 4,096/engine)"),
    ("aiohttp/payload.py", "aiohttp client request bodies"),
    ("aiohttp/client_reqrep.py", "aiohttp client request bodies"),
    ("memtrace.py", "(tracing itself)"),
    ("tracemalloc.py", "(tracing itself)"),
)


def table_of(traceback: tracemalloc.Traceback) -> str:
    files = [frame.filename.replace(os.sep, "/") for frame in traceback]
    for suffix, name in TABLES:
        if any(f.endswith("/" + suffix) for f in files):
            return name
    return "everything else"


# The columns of malloc.log, after the elapsed seconds (all in bytes but the block count).
MALLOC_COLUMNS = ("rss", "python_blocks", "glibc_in_use", "glibc_free_kept", "glibc_mmapped")


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33), summed over every arena."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo() -> _MallInfo2 | None:
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):  # not glibc, or older than 2.33
        return None
    function.restype = _MallInfo2
    info: _MallInfo2 = function()
    return info


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snapshots(out: Path, every_s: float, trace: bool) -> None:
    start = time.monotonic()
    while True:
        time.sleep(every_s)
        elapsed = time.monotonic() - start
        # Only what is reachable: cyclic garbage waiting for the next full collection would
        # otherwise count as growth (soak.md run 6: aiohttp client request objects grew
        # ~1.6 MiB/h between uncollected snapshots; after a full collection only the
        # in-flight requests' were alive).
        gc.collect()
        if trace:
            tracemalloc.take_snapshot().dump(str(out / f"snap-{int(elapsed):06d}.pickle"))
            traced, _ = tracemalloc.get_traced_memory()
            with (out / "traced.log").open("a") as log:
                log.write(f"{elapsed:.0f} s: traced {traced / 2**20:.1f} MiB, "
                          f"RSS {_rss_bytes() / 2**20:.1f} MiB\n")
        info = _mallinfo()
        glibc = (info.uordblks, info.fordblks, info.hblkhd) if info is not None else (0, 0, 0)
        with (out / "malloc.log").open("a") as log:
            log.write(" ".join(str(v) for v in (
                int(elapsed), _rss_bytes(), sys.getallocatedblocks(), *glibc)) + "\n")


# What --small-tables sets: each bounded table of the router a few thousand entries at most.
SMALL_TABLES = {"tokenizer cache tokens": 100_000, "block-hash memo blocks": 2_048,
                "approximate prefix history blocks per endpoint": 1_024,
                "KV-event recent digests per engine": 256, "hash self-check digests": 256}


def shrink_tables() -> None:
    """Lower the defaults the router builds its bounded tables with (no config exposes them:
    they are sized for production, which is what makes them fill slowly in a soak)."""
    from kvroute_router.kvevents import hashing, selfcheck, subscriber, tokenization
    from kvroute_router.plugins import prefix_approx

    kwdefaults = tokenization.PromptTokenizer.__init__.__kwdefaults__
    assert kwdefaults is not None and "cache_tokens" in kwdefaults
    kwdefaults["cache_tokens"] = SMALL_TABLES["tokenizer cache tokens"]
    kwdefaults = hashing.BlockHasher.__init__.__kwdefaults__
    assert kwdefaults is not None and "memo_blocks" in kwdefaults
    kwdefaults["memo_blocks"] = SMALL_TABLES["block-hash memo blocks"]
    prefix_approx.ApproxPrefixIndex.__init__.__defaults__ = (
        SMALL_TABLES["approximate prefix history blocks per endpoint"],)
    kwdefaults = selfcheck.BlockHashSelfCheck.__init__.__kwdefaults__
    assert kwdefaults is not None and "known_digests" in kwdefaults
    kwdefaults["known_digests"] = SMALL_TABLES["hash self-check digests"]
    subscriber.RECENT_DIGESTS = SMALL_TABLES["KV-event recent digests per engine"]


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.small_tables:
        shrink_tables()
    if not args.no_trace:
        tracemalloc.start(args.frames)
    threading.Thread(target=_snapshots, args=(args.out, args.every, not args.no_trace),
                     daemon=True).start()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.argv = ["kvroute", *command]
    runpy.run_module("kvroute_cli.main", run_name="__main__")


def malloc_report(path: Path, from_s: float) -> str:
    """Each ``malloc.log`` column's growth per hour (least squares) from ``from_s`` on."""
    rows = [[int(v) for v in line.split()] for line in path.read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if r[0] >= from_s]
    if len(rows) < 2:
        return f"{path}: fewer than two samples after {from_s:.0f} s"
    times = [r[0] / 3600 for r in rows]
    mean_t = sum(times) / len(times)
    spread = sum((t - mean_t) ** 2 for t in times)
    lines = [f"{path.name}: {len(rows)} samples, {rows[0][0]}-{rows[-1][0]} s", "",
             "| column | first | last | growth per hour |", "|---|---|---|---|"]
    for i, name in enumerate(MALLOC_COLUMNS, start=1):
        values = [r[i] for r in rows]
        mean_v = sum(values) / len(values)
        pairs = zip(times, values, strict=True)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in pairs) / spread
        unit, scale = ("blocks", 1.0) if name == "python_blocks" else ("MiB", 2.0**20)
        lines.append(f"| {name} | {values[0] / scale:,.1f} {unit} | {values[-1] / scale:,.1f} "
                     f"{unit} | {slope / scale:+,.1f} {unit}/h |")
    return "\n".join(lines)


def report(folder: Path, top: int, from_s: float = 0.0) -> str:
    paths = sorted(folder.glob("snap-*.pickle"))
    malloc = folder / "malloc.log"
    if len(paths) < 2:
        if malloc.exists():
            return malloc_report(malloc, from_s)
        return f"{folder}: fewer than two snapshots"
    rows: list[tuple[int, int, dict[str, float]]] = []
    last: list[tracemalloc.StatisticDiff] = []
    previous = tracemalloc.Snapshot.load(str(paths[0]))
    before = int(paths[0].stem.split("-")[1])
    for path in paths[1:]:
        snapshot = tracemalloc.Snapshot.load(str(path))
        now = int(path.stem.split("-")[1])
        last = snapshot.compare_to(previous, "traceback")
        grown: dict[str, float] = {}
        for diff in last:
            name = table_of(diff.traceback)
            grown[name] = grown.get(name, 0.0) + diff.size_diff
        hours = max(1, now - before) / 3600
        rows.append((before, now, {k: v / 2**20 / hours for k, v in grown.items()}))
        previous, before = snapshot, now
    names = sorted({n for _, _, g in rows for n in g}, key=lambda n: -rows[-1][2].get(n, 0.0))
    lines = ["Python heap growth by table, MiB/h (tracemalloc, consecutive snapshots):", "",
             "| table | " + " | ".join(f"{a}-{b} s" for a, b, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{g.get(name, 0.0):+.1f}"
                                                  for _, _, g in rows) + " |")
    lines.append("| **all traced** | " + " | ".join(f"**{sum(g.values()):+.1f}**"
                                                   for _, _, g in rows) + " |")
    lines += ["", f"Largest growth over the last interval ({rows[-1][0]}-{rows[-1][1]} s):", ""]
    for diff in last[:top]:
        where = " ← ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                           for f in reversed(diff.traceback))
        lines.append(f"* {diff.size_diff / 1024:+.1f} KiB ({diff.count_diff:+d} blocks, "
                     f"{diff.size / 2**20:.2f} MiB now): {where}")
    if malloc.exists():
        lines += ["", malloc_report(malloc, from_s)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    start = sub.add_parser("run", help="run kvroute ARGS with tracemalloc snapshots")
    start.add_argument("--every", type=float, default=300.0, help="seconds between snapshots")
    start.add_argument("--out", type=Path, required=True)
    start.add_argument("--frames", type=int, default=2, help="traceback frames kept")
    start.add_argument("--no-trace", action="store_true",
                       help="no tracemalloc: only malloc.log (RSS, allocators) every --every s")
    start.add_argument("--small-tables", action="store_true",
                       help="shrink the router's bounded tables so they fill within minutes")
    start.add_argument("command", nargs=argparse.REMAINDER, help="-- kvroute arguments")
    rep = sub.add_parser("report", help="attribute the growth between snapshots")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--top", type=int, default=12)
    rep.add_argument("--from", dest="from_s", type=float, default=0.0,
                     help="malloc.log: fit the growth from this second on (after warm-up)")
    args = parser.parse_args(argv)
    if args.part == "run":
        run(args)
    else:
        print(report(args.folder, args.top, args.from_s))


if __name__ == "__main__":
    main()
