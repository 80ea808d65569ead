"""Budget sweep of ``kvroute eval routing`` over several seeds: accuracy vs budget per method and
order (random, adversarial = difficulty-sorted, benefit-sorted) on the shared RouteLLM
correctness data, the margin of kvroute-batch over the budget-holding baselines with 95 %
confidence intervals across seeds, the ranking quality of the estimators, and a budget-safe
per-query threshold as an extra reference curve. Writes ``docs/benchmarks/batch-routing.md``,
``batch-routing.png`` (accuracy vs budget), ``batch-routing-spend.png`` (accuracy vs actual
mean spend) and ``batch-routing-margins.png``.

    python bench/routing_eval.py [--data ../shared/data/routellm/correctness.csv.gz] [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from kvroute_cli.evaluation.estimators import split_examples
from kvroute_cli.evaluation.offline import (
    METHODS,
    ORDERS,
    EvalConfig,
    MethodResult,
    PreparedData,
    RankingQuality,
    budget_safe_threshold,
    evaluate,
    evaluate_threshold,
    prepare,
    ranking_quality,
)
from kvroute_router.batching.quality import load_labelled_csv
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
SAFE = "budget-safe threshold"  # extra curve, docs only (not a `kvroute eval routing` method)


@dataclass
class Run:
    """One estimator's results: per seed, order and budget, every method (plus SAFE)."""

    estimator: str
    results: dict[tuple[int, str, float], dict[str, MethodResult]] = field(default_factory=dict)
    ranking: dict[int, RankingQuality] = field(default_factory=dict)
    settings: dict[int, str] = field(default_factory=dict)
    loo_auc: dict[int, float] = field(default_factory=dict)
    prepare_s: dict[int, float] = field(default_factory=dict)
    solver_s: list[float] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/routellm/"
                                                             "correctness.csv.gz"))
    parser.add_argument("--cost-weak", type=float, default=0.1)
    parser.add_argument("--cost-strong", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (split and order)")
    parser.add_argument("--estimator", default="minilm", help="the estimator under test")
    parser.add_argument("--compare", default="hashed",
                        help="a second estimator run alongside ('' for none)")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = load_labelled_csv(args.data)
    estimators = [args.estimator] + ([args.compare] if args.compare else [])
    runs = {name: Run(name) for name in estimators}
    for seed in range(args.seeds):
        train, test = split_examples(rows, test_fraction=0.3, seed=seed)
        for name in estimators:
            run = runs[name]
            began = time.perf_counter()
            data = prepare(train, test, estimator=name)
            run.prepare_s[seed] = time.perf_counter() - began
            run.ranking[seed] = ranking_quality(data)
            if data.tuning is not None:
                best = data.tuning.best
                run.settings[seed] = (f"k={best.k}, power={best.weight_power:g}, "
                                      f"prior={best.prior_strength:g}")
                run.loo_auc[seed] = data.tuning.auc
            _sweep(run, data, args, seed)
            print(f"seed {seed} {name}: AUC {run.ranking[seed].auc:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    wall_s = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_run = runs[args.estimator]
    _plot_budget(main_run, out / "batch-routing.png", args)
    _plot_spend(main_run, out / "batch-routing-spend.png", args)
    _plot_margins(runs, out / "batch-routing-margins.png", args)
    (out / "batch-routing.md").write_text(
        _markdown(runs, args, len(train), len(test), wall_s), encoding="utf-8")
    print(f"wrote {out / 'batch-routing.md'} and plots in {wall_s:.0f} s")
    return 0


def _sweep(run: Run, data: PreparedData, args: argparse.Namespace, seed: int) -> None:
    for order in ORDERS:
        for budget in BUDGETS:
            config = EvalConfig(cost_weak=args.cost_weak, cost_strong=args.cost_strong,
                                budget=budget, batch_size=args.batch_size, order=order,
                                seed=seed)
            report = evaluate(data, config)
            methods = dict(report.methods)
            methods[SAFE] = evaluate_threshold(data, config, budget_safe_threshold(data, config))
            run.results[(seed, order, budget)] = methods
            run.solver_s += report.solver_seconds.get("kvroute-batch", [])


def _seeds(run: Run) -> list[int]:
    return sorted({seed for seed, _, _ in run.results})


def _values(run: Run, order: str, budget: float, method: str, what: str = "accuracy",
            ) -> list[float]:
    return [getattr(run.results[(seed, order, budget)][method], what) for seed in _seeds(run)]


def _ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t over seeds)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values))
    return mean, float(half)


def _margin(run: Run, order: str, budget: float, method: str, baseline: str,
            ) -> tuple[float, float]:
    ours = _values(run, order, budget, method)
    theirs = _values(run, order, budget, baseline)
    return _ci([100 * (a - b) for a, b in zip(ours, theirs, strict=True)])


CURVES = ("always-weak", "random", "per-query-threshold", "per-query-cutoff", SAFE,
          "kvroute-batch", "kvroute-robust", "oracle")


def _style(name: str) -> str:
    if name.startswith("kvroute"):
        return "-o"
    if name == "oracle":
        return "--"
    if name == SAFE:
        return ":s"
    return "-."


def _plot_budget(run: Run, path: Path, args: argparse.Namespace) -> None:
    figure, axes = plt.subplots(1, len(ORDERS), figsize=(6 * len(ORDERS), 4.8), sharey=True)
    for axis, order in zip(axes, ORDERS, strict=True):
        for name in CURVES:
            means = [100 * statistics.fmean(_values(run, order, b, name)) for b in BUDGETS]
            axis.plot(BUDGETS, means, _style(name), label=name, markersize=4)
        strong = 100 * statistics.fmean(_values(run, order, BUDGETS[0], "always-strong"))
        axis.axhline(strong, color="grey", linewidth=0.8, linestyle=":",
                     label=f"always-strong (cost {args.cost_strong})")
        axis.set_title(f"{order} order")
        axis.set_xlabel(f"budget B (average cost per request; weak {args.cost_weak}, "
                        f"strong {args.cost_strong})")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"accuracy, % (mean of {len(_seeds(run))} seeds)")
    axes[-1].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Accuracy vs per-batch budget, estimator {run.estimator} "
                    "(per-query-threshold and the budget-safe threshold do not hold B per batch)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_spend(run: Run, path: Path, args: argparse.Namespace) -> None:
    figure, axes = plt.subplots(1, len(ORDERS), figsize=(6 * len(ORDERS), 4.8), sharey=True)
    for axis, order in zip(axes, ORDERS, strict=True):
        for name in CURVES:
            spend = [statistics.fmean(_values(run, order, b, name, "mean_cost")) for b in BUDGETS]
            accuracy = [100 * statistics.fmean(_values(run, order, b, name)) for b in BUDGETS]
            axis.plot(spend, accuracy, _style(name), label=name, markersize=4)
        axis.set_title(f"{order} order")
        axis.set_xlabel("actual mean cost per request")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"accuracy, % (mean of {len(_seeds(run))} seeds)")
    axes[-1].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Accuracy vs actual spend, estimator {run.estimator} (budgets "
                    f"{BUDGETS[0]}-{BUDGETS[-1]}; each point one budget)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_margins(runs: dict[str, Run], path: Path, args: argparse.Namespace) -> None:
    figure, axes = plt.subplots(1, len(ORDERS), figsize=(6 * len(ORDERS), 4.4), sharey=True)
    for axis, order in zip(axes, ORDERS, strict=True):
        for offset, (name, run) in enumerate(runs.items()):
            for baseline, marker in (("per-query-cutoff", "o"), ("random", "s")):
                points = [_margin(run, order, b, "kvroute-batch", baseline) for b in BUDGETS]
                shift = 0.006 * (2 * offset + (baseline == "random") - 1.5)
                axis.errorbar([b + shift for b in BUDGETS], [p[0] for p in points],
                              yerr=[p[1] for p in points], marker=marker, capsize=3,
                              linestyle="-" if name == next(iter(runs)) else ":",
                              label=f"{name}: vs {baseline}")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_title(f"{order} order")
        axis.set_xlabel("budget B")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("kvroute-batch minus baseline, accuracy points (95 % CI)")
    axes[-1].legend(fontsize=7)
    figure.suptitle("Margin of kvroute-batch at equal per-batch budget, mean ± 95 % CI over "
                    "seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _summary(runs: dict[str, Run], args: argparse.Namespace) -> list[str]:
    """Plain statements with the numbers behind them (computed, not hand-written)."""
    run = next(iter(runs.values()))
    lines = ["## Summary", ""]
    for order in ORDERS:
        for baseline in ("per-query-cutoff", "random"):
            margins = [_margin(run, order, b, "kvroute-batch", baseline) for b in BUDGETS]
            significant = sum(1 for mean, half in margins if mean - half > 0)
            lines.append(
                f"- `{order}` order, kvroute-batch vs {baseline} at equal per-batch budget "
                f"(estimator `{run.estimator}`): {min(m for m, _ in margins):+.2f} to "
                f"{max(m for m, _ in margins):+.2f} points over the {len(BUDGETS)} budgets; "
                f"95 % CI above zero at {significant} of {len(BUDGETS)}.")
    budget = 0.3
    cells = {name: (100 * statistics.fmean(_values(run, "adversarial", budget, name)),
                    statistics.fmean(_values(run, "adversarial", budget, name, "mean_cost")),
                    max(_values(run, "adversarial", budget, name, "max_batch_cost")))
             for name in ("random", "per-query-threshold", "per-query-cutoff", SAFE,
                          "kvroute-batch")}
    described = "; ".join(f"{name} {acc:.1f} % at mean cost {cost:.3f} (worst batch "
                          f"{worst:.2f})" for name, (acc, cost, worst) in cells.items())
    lines += [
        f"- Adversarial order, B = {budget}: {described}.",
        "- At equal *actual mean spend* (batch-routing-spend.png) kvroute-batch does not win "
        "under adversarial or benefit-sorted order: per-query-cutoff leaves the budget of "
        "easy batches unspent and so reaches its (lower) accuracy with less money, and "
        "per-query-threshold moves money from easy to hard batches, which a per-batch budget "
        "forbids. kvroute-batch's advantage is that it uses each batch's budget well while "
        "never exceeding it; it is the best method among those that hold every batch's budget.",
        "",
    ]
    return lines


def _fmt_ci(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.2f} ± {pair[1]:.2f}"


def _markdown(runs: dict[str, Run], args: argparse.Namespace, train: int, test: int,
              wall_s: float) -> str:
    main_run = next(iter(runs.values()))
    seeds = _seeds(main_run)
    lines = [
        "# Batch-level routing under a budget",
        "",
        f"Produced by `python bench/routing_eval.py --seeds {args.seeds}` (weak cost "
        f"{args.cost_weak}, strong cost {args.cost_strong}, batch size {args.batch_size}, "
        f"seeds {seeds[0]}-{seeds[-1]}, estimator `{args.estimator}`"
        + (f", compared with `{args.compare}`" if args.compare else "") + "); each cell for one "
        "seed is `kvroute eval routing --train ../shared/data/routellm/correctness.csv.gz "
        f"--cost-weak {args.cost_weak} --cost-strong {args.cost_strong} --budget B "
        f"--batch-size {args.batch_size} --order ORDER --seed SEED --estimator "
        f"{args.estimator} --json`. Whole sweep: {wall_s / 60:.1f} min on "
        f"{platform.machine()} with 2 CPU cores shared with other jobs (MiniLM embeddings "
        "served from the disk cache after the first run).",
        "",
        f"Data: RouteLLM per-prompt correctness (GSM8K + MMLU; Mixtral-8x7B weak, GPT-4 "
        f"strong), contaminated rows excluded; each seed splits it into {train} train / {test} "
        "test prompts and also seeds the arrival order. The seed varies both, so the "
        "confidence intervals cover split and order.",
        "",
        "Budget B is the average cost each batch may spend per request. `max` is the highest "
        "per-request cost of any batch over all seeds: above B (⚠) means the method broke a "
        "batch's budget. Accuracy in %, mean over seeds.",
        "",
        *_summary(runs, args),
        "## Estimators: ranking quality on test",
        "",
        "Predicted benefit P(strong) - P(weak) against the truth: AUC for \"weak wrong and "
        "strong right\" (the prompts where the strong call pays), Spearman and Pearson "
        "correlation with strong_correct - weak_correct. kNN settings (k, similarity power, "
        "prior strength) chosen per seed by leave-one-out AUC on train only.",
        "",
        "| estimator | test AUC | Spearman | Pearson | train LOO AUC | prepare s/seed | "
        "settings chosen per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        auc = _ci([run.ranking[s].auc for s in seeds])
        spearman = _ci([run.ranking[s].spearman for s in seeds])
        pearson = _ci([run.ranking[s].pearson for s in seeds])
        loo = (f"{statistics.fmean(run.loo_auc.values()):.3f}" if run.loo_auc else "-")
        prep = statistics.fmean(run.prepare_s.values())
        settings = "; ".join(f"{s}: {run.settings[s]}" for s in seeds if s in run.settings)
        lines.append(f"| {name} | {auc[0]:.3f} ± {auc[1]:.3f} | {spearman[0]:.3f} ± "
                     f"{spearman[1]:.3f} | {pearson[0]:.3f} ± {pearson[1]:.3f} | {loo} | "
                     f"{prep:.0f} | {settings} |")
    lines += ["", "## Margins at equal per-batch budget", "",
              "kvroute-batch minus each budget-holding baseline, accuracy points, mean ± 95 % "
              "CI (Student t over seeds). Every method in these columns holds every batch's "
              "budget (checked: their `max` never exceeds B).", ""]
    for order in ORDERS:
        header = "| B |"
        rule = "|---|"
        for name in runs:
            header += f" {name}: vs per-query-cutoff | {name}: vs random |"
            rule += "---|---|"
        lines += [f"### {order} order", "", header, rule]
        for budget in BUDGETS:
            cells = []
            for run in runs.values():
                cells.append(_fmt_ci(_margin(run, order, budget, "kvroute-batch",
                                             "per-query-cutoff")))
                cells.append(_fmt_ci(_margin(run, order, budget, "kvroute-batch", "random")))
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        lines.append("")
    columns = (*METHODS, SAFE)
    for name, run in runs.items():
        lines += [f"## Accuracy per method — estimator `{name}`", ""]
        for order in ORDERS:
            lines += [f"### {order} order", "",
                      "| B | " + " | ".join(columns) + " |",
                      "|---|" + "---|" * len(columns)]
            for budget in BUDGETS:
                cells = []
                for method in columns:
                    accuracy = 100 * statistics.fmean(_values(run, order, budget, method))
                    worst = max(_values(run, order, budget, method, "max_batch_cost"))
                    flag = " ⚠" if worst > budget + 1e-9 else ""
                    cells.append(f"{accuracy:.1f} (max {worst:.2f}){flag}")
                lines.append(f"| {budget} | " + " | ".join(cells) + " |")
            lines.append("")
        if run.solver_s:
            lines += [f"Solver time per batch of {args.batch_size} (HiGHS MILP, kvroute-batch, "
                      f"{len(run.solver_s)} solves): median "
                      f"{1000 * statistics.median(run.solver_s):.1f} ms, p99 "
                      f"{1000 * float(np.quantile(run.solver_s, 0.99)):.1f} ms.", ""]
    lines += [
        f"`{SAFE}` (docs only, not a `kvroute eval routing` method): the per-query gain "
        "threshold raised until no *training* batch, in the same order and batch size, would "
        "have exceeded B (and never below the affordable-share threshold); it is then applied "
        "to test without a ledger, so it can still break a test batch's budget.",
        "",
        "![accuracy vs budget](batch-routing.png)",
        "",
        "![accuracy vs actual spend](batch-routing-spend.png)",
        "",
        "![margins with 95 % CI](batch-routing-margins.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
