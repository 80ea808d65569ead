"""Cross-check of our load generator with one we did not write: NVIDIA's ``aiperf``.

The measured part of a trace is written as an aiperf ``single_turn`` dataset (prompt text,
output length, arrival timestamp in ms) and replayed with ``--fixed-schedule`` against the
same engines, rotating over them (``--url`` per engine, round-robin) — the ``direct-rr``
contender, driven by aiperf instead of our client. Engine caches are reset and warmed the same
way before it. Its TTFT and e2e percentiles are then read from aiperf's JSON export and set
beside ours for the same trace.

(``inference-perf``, the other candidate, requires Python >= 3.12 on PyPI, so it cannot share
the bench venv on this project's Python 3.11.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvroute_bench.client import request_body
from kvroute_bench.contenders import FleetInfo, resolve_executable
from kvroute_bench.workloads import TraceRequest


def write_dataset(requests: Sequence[TraceRequest], path: Path) -> Path:
    """``requests`` as aiperf single_turn JSONL, timestamps relative to the first (ms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = requests[0].arrival_s if requests else 0.0
    with path.open("w") as out:
        for r in requests:
            out.write(json.dumps({"type": "single_turn", "text": r.prompt,
                                  "output_length": r.max_tokens,
                                  "timestamp": round((r.arrival_s - start) * 1000.0, 3)}) + "\n")
    return path


def command(fleet: FleetInfo, dataset: Path, artifacts: Path, requests: int,
            bin_dirs: Sequence[Path]) -> list[str]:
    """The aiperf invocation replaying ``dataset`` over every engine in turn."""
    extra = {k: v for k, v in request_body(fleet.model, _probe()).items()
             if k in ("ignore_eos", "temperature")}
    argv = [resolve_executable("aiperf", bin_dirs), "profile",
            "--model", fleet.model, "--endpoint-type", "completions", "--streaming",
            "--custom-dataset-type", "single_turn", "--input-file", str(dataset),
            "--fixed-schedule", "--request-count", str(requests),
            "--artifact-dir", str(artifacts), "--ui-type", "none"]
    if fleet.model_dir is not None:
        argv += ["--tokenizer", str(fleet.model_dir)]
    for engine in fleet.engines:
        argv += ["--url", engine.url]
    argv += ["--extra-inputs", json.dumps(extra)]
    return argv


def _probe() -> TraceRequest:
    return TraceRequest(index=0, arrival_s=0.0, prompt="", max_tokens=1, group="",
                        shared_tokens=0)


def run(fleet: FleetInfo, warmup: Sequence[TraceRequest], requests: Sequence[TraceRequest],
        workdir: Path, bin_dirs: Sequence[Path], timeout_s: float) -> dict[str, Any]:
    """Reset and warm the engines as for direct-rr, then replay ``requests`` with aiperf;
    its TTFT/e2e percentiles (seconds) and run status."""
    import asyncio

    from kvroute_bench.client import run_trace
    from kvroute_bench.harness import reset_prefix_cache

    for engine in fleet.engines:
        reset_prefix_cache(engine.url)
    if warmup:
        asyncio.run(run_trace([e.url for e in fleet.engines], fleet.model, warmup))
    dataset = write_dataset(requests, workdir / "aiperf-dataset.jsonl")
    artifacts = workdir / "aiperf-artifacts"
    argv = command(fleet, dataset, artifacts, len(requests), bin_dirs)
    log = workdir / "aiperf.log"
    with log.open("wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                              check=False)
    result: dict[str, Any] = {"command": " ".join(argv[1:]), "returncode": proc.returncode,
                              "log": str(log)}
    export = next(iter(sorted(artifacts.rglob("profile_export_aiperf.json"))), None)
    if export is None:
        result["error"] = "aiperf wrote no profile_export_aiperf.json"
        return result
    result.update(read_export(json.loads(export.read_text())))
    return result


def _metric(data: dict[str, Any], *names: str) -> dict[str, Any] | None:
    for name in names:
        value = data.get(name)
        if isinstance(value, dict):
            return value
        records = data.get("records")
        if isinstance(records, dict) and isinstance(records.get(name), dict):
            found: dict[str, Any] = records[name]
            return found
    return None


def read_export(data: dict[str, Any]) -> dict[str, Any]:
    """TTFT and request-latency percentiles (converted to seconds) from aiperf's export."""
    out: dict[str, Any] = {}
    for key, names in (("ttft", ("time_to_first_token", "ttft")),
                       ("e2e", ("request_latency", "latency"))):
        metric = _metric(data, *names)
        if metric is None:
            continue
        scale = 0.001 if str(metric.get("unit", "ms")).lower() == "ms" else 1.0
        for stat in ("p50", "p90", "p99", "avg"):
            if isinstance(metric.get(stat), int | float):
                out[f"{key}_{stat}_s"] = float(metric[stat]) * scale
    count = _metric(data, "request_count")
    if count is not None and isinstance(count.get("avg"), int | float):
        out["requests"] = int(count["avg"])
    return out
