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

    python bench/memtrace.py run --every 250 --out DIR -- router --config ...
    python bench/memtrace.py report DIR
"""

from __future__ import annotations

import argparse
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


def _snapshots(out: Path, every_s: float) -> None:
    start = time.monotonic()
    while True:
        time.sleep(every_s)
        elapsed = time.monotonic() - start
        # Only what is reachable: cyclic garbage waiting for the next full collection would
        # otherwise count as growth (soak.md run 6: aiohttp client request objects grew
        # ~1.6 MiB/h between uncollected snapshots; after a full collection only the
        # in-flight requests' were alive).
        gc.collect()
        tracemalloc.take_snapshot().dump(str(out / f"snap-{int(elapsed):06d}.pickle"))
        traced, _ = tracemalloc.get_traced_memory()
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        rss = pages * os.sysconf("SC_PAGE_SIZE")
        with (out / "traced.log").open("a") as log:
            log.write(f"{elapsed:.0f} s: traced {traced / 2**20:.1f} MiB, "
                      f"RSS {rss / 2**20:.1f} MiB\n")


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(args.frames)
    threading.Thread(target=_snapshots, args=(args.out, args.every), daemon=True).start()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.argv = ["kvroute", *command]
    runpy.run_module("kvroute_cli.main", run_name="__main__")


def report(folder: Path, top: int) -> str:
    paths = sorted(folder.glob("snap-*.pickle"))
    if len(paths) < 2:
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    start = sub.add_parser("run", help="run kvroute ARGS with tracemalloc snapshots")
    start.add_argument("--every", type=float, default=300.0, help="seconds between snapshots")
    start.add_argument("--out", type=Path, required=True)
    start.add_argument("--frames", type=int, default=2, help="traceback frames kept")
    start.add_argument("command", nargs=argparse.REMAINDER, help="-- kvroute arguments")
    rep = sub.add_parser("report", help="attribute the growth between snapshots")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if args.part == "run":
        run(args)
    else:
        print(report(args.folder, args.top))


if __name__ == "__main__":
    main()
