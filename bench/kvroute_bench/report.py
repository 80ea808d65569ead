"""The benchmark's outputs: a rich table on the terminal, a JSON file and PNG plots.

Plots use matplotlib's Agg backend (no display): a TTFT CDF per contender, and bars of TTFT
p90, output tokens/s and engine prefix-cache hit rate side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvroute_bench.harness import ContenderResult, to_json


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def _num(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def table(results: Sequence[ContenderResult], title: str) -> Table:
    t = Table(title=title)
    for column in ("contender", "TTFT p50 ms", "p90", "p99", "e2e p50 ms", "p99", "out tok/s",
                   "req/s", "errors", "prefix hit", "prefilled ktok", "imbalance req/prefill",
                   "router +ms", "router CPU ms/req"):
        t.add_column(column, justify="left" if column == "contender" else "right")
    for r in results:
        if r.skipped:
            t.add_row(r.name, *["-"] * 12, f"skipped: {r.skipped}"[:40])
            continue
        t.add_row(r.name, _ms(r.ttft_p50_s), _ms(r.ttft_p90_s), _ms(r.ttft_p99_s),
                  _ms(r.e2e_p50_s), _ms(r.e2e_p99_s), _num(r.output_tokens_per_s, 1),
                  _num(r.requests_per_s), str(r.errors), f"{r.prefix_hit_rate:.1%}",
                  _num(sum(r.computed_tokens_per_engine) / 1000, 1),
                  f"{_num(r.request_imbalance)}/{_num(r.prefill_imbalance)}",
                  _ms(r.router_added_s), _num(r.router_cpu_ms_per_request, 1))
    return t


def markdown_table(results: Sequence[ContenderResult]) -> str:
    """The same table as Markdown, for docs/benchmarks/README.md."""
    head = ("| contender | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms "
            "| out tok/s | req/s | errors | prefix hit | prefilled ktok | imbalance req / prefill "
            "| router +ms | router CPU ms/req |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * 12)
            continue
        lines.append(
            f"| {r.name} | {_ms(r.ttft_p50_s)} | {_ms(r.ttft_p90_s)} | {_ms(r.ttft_p99_s)} "
            f"| {_ms(r.e2e_p50_s)} | {_ms(r.e2e_p99_s)} | {_num(r.output_tokens_per_s, 1)} "
            f"| {_num(r.requests_per_s)} | {r.errors} | {r.prefix_hit_rate:.1%} "
            f"| {_num(sum(r.computed_tokens_per_engine) / 1000, 1)} "
            f"| {_num(r.request_imbalance)} / {_num(r.prefill_imbalance)} "
            f"| {_ms(r.router_added_s)} | {_num(r.router_cpu_ms_per_request, 1)} |")
    return "\n".join(lines)


def counters_markdown(results: Sequence[ContenderResult]) -> str:
    """kvroute's own counters over each contender's measured window, one list per contender
    (empty when no contender has any)."""
    parts = []
    for r in results:
        if r.router_counters:
            listed = ", ".join(f"`{key}` {value:,.0f}"
                               for key, value in sorted(r.router_counters.items()))
            parts.append(f"* {r.name}: {listed}")
    engines = ("\nEngine preemptions over the measured window (`vllm:num_preemptions_total`, "
               "every engine): "
               + ", ".join(f"{r.name} {r.engine_preemptions:,.0f}" for r in results) + "\n"
               if any(r.engine_preemptions for r in results) else "")
    if not parts:
        return engines
    return ("\nRouter counters over the measured window (summed over endpoints and replicas):\n\n"
            + "\n".join(parts) + "\n" + engines)


def plots(results: Sequence[ContenderResult], out_dir: Path, stem: str, title: str
          ) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if not r.skipped and r.ttfts_s]
    if not ran:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    cdf_path = out_dir / f"{stem}-ttft-cdf.png"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ran:
        n = len(r.ttfts_s)
        ax.step([t * 1000 for t in r.ttfts_s], [(i + 1) / n for i in range(n)], where="post",
                label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{title}: TTFT CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cdf_path, dpi=110)
    plt.close(fig)

    bars_path = out_dir / f"{stem}-summary.png"
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = [r.name for r in ran]
    panels: list[tuple[str, list[float]]] = [
        ("TTFT p90 (ms)", [r.ttft_p90_s * 1000 for r in ran]),
        ("output tokens/s", [r.output_tokens_per_s for r in ran]),
        ("engine prefix-cache hit rate (%)", [r.prefix_hit_rate * 100 for r in ran]),
    ]
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.barh(names, values, color="#4477aa")
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(bars_path, dpi=110)
    plt.close(fig)
    return [cdf_path, bars_path]


def load(path: Path) -> tuple[list[ContenderResult], dict[str, Any]]:
    """Results and metadata back from a JSON file written by :func:`write`."""
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(ContenderResult)}
    results = []
    for entry in data["contenders"]:
        values: dict[str, Any] = {k: (math.nan if v is None and k != "skipped" else v)
                                  for k, v in entry.items() if k in fields}
        results.append(ContenderResult(**values))
    return results, data["meta"]


def rerender(path: Path) -> list[Path]:
    """Rewrite the Markdown table and plots of ``path`` (after a change to the report)."""
    results, meta = load(path)
    stem = path.name.removesuffix(".json")
    title = f"{meta.get('workload', '?')} ({meta.get('engines', '?')} engines)"
    md_path = path.with_name(f"{stem}.md")
    md_path.write_text(markdown_table(results) + "\n" + counters_markdown(results))
    return [md_path, *plots(results, path.parent, stem, title)]


def write(results: Sequence[ContenderResult], meta: dict[str, Any], out_dir: Path, stem: str,
          console: Console) -> list[Path]:
    """Print the table; write JSON, Markdown table and plots under ``out_dir``."""
    title = f"{meta.get('workload', '?')} ({meta.get('engines', '?')} engines)"
    console.print(table(results, title))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(to_json(results, meta), indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown_table(results) + "\n" + counters_markdown(results))
    return [json_path, md_path, *plots(results, out_dir, stem, title)]


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        for written in rerender(Path(argument)):
            print(f"wrote {written}")
