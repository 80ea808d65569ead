"""A rate sweep: one workload's trace offered at several arrival rates, every contender at each.

Below saturation every contender carries the offered load, so throughput cannot tell routers
apart; past it, the one that wastes less engine time (less prefill, less queueing behind a
hot pod) completes more. ``kvroute bench --workload W --rate R1,R2,...`` runs the same
seeded prompts at each rate (only the arrival times scale) and this module puts the per-rate
results side by side: achieved output tokens/s and requests/s, TTFT p90, and *goodput*, the
requests per second that met a TTFT objective (``--slo-ttft``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvroute_bench.harness import ContenderResult


@dataclass(frozen=True)
class SweepPoint:
    """One contender at one offered rate."""

    contender: str
    offered_rate: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p90_s: float
    goodput_per_s: float
    slo_attainment: float
    errors: int


def point(result: ContenderResult, offered_rate: float, slo_ttft_s: float) -> SweepPoint:
    """Summarise one contender's run at one rate. Goodput counts the measured requests whose
    TTFT met the objective, over the measured window (failed requests never meet it)."""
    met = sum(1 for t in result.ttfts_s if t <= slo_ttft_s)
    total = result.requests
    window = result.window_s
    return SweepPoint(
        contender=result.name, offered_rate=offered_rate,
        requests_per_s=result.requests_per_s, output_tokens_per_s=result.output_tokens_per_s,
        ttft_p90_s=result.ttft_p90_s,
        goodput_per_s=(met / window) if window > 0 else math.nan,
        slo_attainment=(met / total) if total else math.nan, errors=result.errors)


def collect(runs: Sequence[tuple[float, Sequence[ContenderResult]]], slo_ttft_s: float
            ) -> list[SweepPoint]:
    """Points for every (rate, results) pair; skipped contenders are left out."""
    return [point(r, rate, slo_ttft_s) for rate, results in runs for r in results
            if not r.skipped]


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def markdown(points: Sequence[SweepPoint], slo_ttft_s: float) -> str:
    rates = sorted({p.offered_rate for p in points})
    names = list(dict.fromkeys(p.contender for p in points))
    by_key = {(p.contender, p.offered_rate): p for p in points}
    lines = [f"Goodput = requests/s with TTFT ≤ {slo_ttft_s * 1000:.0f} ms; cells: "
             "goodput req/s · out tok/s · TTFT p90 ms (errors)", "",
             "| contender | " + " | ".join(f"{r:g} req/s offered" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for name in names:
        cells = []
        for rate in rates:
            p = by_key.get((name, rate))
            if p is None:
                cells.append("-")
                continue
            errors = f" ({p.errors} err)" if p.errors else ""
            cells.append(f"{_fmt(p.goodput_per_s, 2)} · {_fmt(p.output_tokens_per_s, 1)} · "
                         f"{_fmt(p.ttft_p90_s * 1000, 0)}{errors}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(points: Sequence[SweepPoint], title: str) -> Table:
    t = Table(title=title)
    for column in ("contender", "offered req/s", "req/s", "goodput req/s", "SLO met",
                   "out tok/s", "TTFT p90 ms", "errors"):
        t.add_column(column, justify="left" if column == "contender" else "right")
    for p in sorted(points, key=lambda q: (q.contender, q.offered_rate)):
        t.add_row(p.contender, f"{p.offered_rate:g}", _fmt(p.requests_per_s, 2),
                  _fmt(p.goodput_per_s, 2), _fmt(p.slo_attainment * 100, 0) + "%",
                  _fmt(p.output_tokens_per_s, 1), _fmt(p.ttft_p90_s * 1000, 0), str(p.errors))
    return t


def plot(points: Sequence[SweepPoint], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for name in dict.fromkeys(p.contender for p in points):
        mine = sorted((p for p in points if p.contender == name), key=lambda p: p.offered_rate)
        rates = [p.offered_rate for p in mine]
        axes[0].plot(rates, [p.goodput_per_s for p in mine], marker="o", label=name)
        axes[1].plot(rates, [p.output_tokens_per_s for p in mine], marker="o", label=name)
        axes[2].plot(rates, [p.ttft_p90_s * 1000 for p in mine], marker="o", label=name)
    for ax, label in zip(axes, ("goodput (req/s within the TTFT objective)",
                                "output tokens/s", "TTFT p90 (ms, log)"), strict=True):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(points: Sequence[SweepPoint], meta: dict[str, Any], out_dir: Path, stem: str,
          slo_ttft_s: float, console: Console) -> list[Path]:
    """Print the sweep table; write ``<stem>-sweep.{json,md,png}``."""
    title = f"{meta.get('workload', '?')} rate sweep ({meta.get('engines', '?')} engines)"
    console.print(table(points, title))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}-sweep.json"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
              for k, v in vars(p).items()} for p in points]
    json_path.write_text(json.dumps({"meta": meta, "slo_ttft_s": slo_ttft_s, "points": clean},
                                    indent=1) + "\n")
    md_path = out_dir / f"{stem}-sweep.md"
    md_path.write_text(markdown(points, slo_ttft_s) + "\n")
    return [json_path, md_path, plot(points, out_dir / f"{stem}-sweep.png", title)]
