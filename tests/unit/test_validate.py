"""`kvroute validate`: every example is valid; broken manifests exit 1 and name the document,
the field path, the bad value and what would be valid."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvroute_cli.main import main

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _load(name: str) -> dict[str, Any]:
    path = next(p for p in EXAMPLES if p.name == name)
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _run(tmp_path: Path, doc: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(doc if isinstance(doc, list) else [doc]))
    code = main(["validate", "-f", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


def test_examples_are_valid_through_the_console_script() -> None:
    assert len(EXAMPLES) >= 5
    args = [sys.executable, "-m", "kvroute_cli.main", "validate"]
    for path in EXAMPLES:
        args += ["-f", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid") >= 5


def test_multi_document_file_and_foreign_documents(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    code, err = _run(tmp_path, [_load("cachetier.yaml"), foreign, _load("pool-llama-8b.yaml")],
                     capsys)
    assert code == 0, err


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


def _drop(doc: dict[str, Any], path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]
    return doc


POOL = "pool-llama-8b.yaml"
POLICY = "routepolicy-two-pools.yaml"

CASES = [
    # (example, mutation, expected field path, words the message must contain)
    (POOL, lambda d: _set(d, "spec.engine.blockSizes", 16), "spec.engine.blockSizes",
     "unknown field"),
    (POOL, lambda d: _set(d, "spec.replicas", "two"), "spec.replicas", "valid integer"),
    (POOL, lambda d: _set(d, "spec.replicas", 5000), "spec.replicas", "less than or equal"),
    (POOL, lambda d: _set(d, "spec.engine.prefixCachingHashAlgo", "md5"),
     "spec.engine.prefixCachingHashAlgo", "'sha256_cbor'"),
    (POOL, lambda d: _set(d, "spec.model.source", "http://example.com/x"), "spec.model.source",
     "pattern"),
    (POOL, lambda d: _set(d, "spec.autoscaling.minReplicas", 9),
     "spec.autoscaling.minReplicas", "minReplicas must be less than or equal to maxReplicas"),
    (POOL, lambda d: _drop(d, "spec.model.source"), "spec.model.source",
     "Managed pools need spec.model.source"),
    (POOL, lambda d: _set(d, "spec.mode", "External"), "spec",
     "External pools need spec.selector or spec.endpoints"),
    (POOL, lambda d: _set(d, "spec.engine.tensorParallelSize", 2),
     "spec.engine.tensorParallelSize", "must not exceed resources.gpus"),
    (POOL, lambda d: _set(d, "spec.cost", {}), "spec.cost", "at least one of"),
    (POOL, lambda d: _set(d, "spec.engine.extraArgs", ["--scheduling-policy", "priority"]),
     "spec.engine.extraArgs", "spec.engine.schedulingPolicy"),
    (POOL, lambda d: _set(d, "spec.model.name", None), "spec.model.name", "valid string"),
    (POLICY, lambda d: _set(d, "spec.budgets", [{"name": "b", "tenant": "t"}]),
     "spec.budgets[0]", "a budget needs at least one limit"),
    (POLICY, lambda d: _set(d, "spec.pools", [{"name": "a"}, {"name": "a"}]), "spec.pools",
     "each pool may be listed only once"),
    (POLICY, lambda d: _set(d, "spec.scoring.scorers", [{"type": "magic"}]),
     "spec.scoring.scorers[0].type", "'prefix-precise'"),
    (POLICY, lambda d: _set(d, "spec.admission.defaultPriorityClass", "gold"),
     "spec.admission.defaultPriorityClass", "must name one of priorityClasses"),
    (POLICY, lambda d: _set(d, "apiVersion", "kvroute.io/v2"), "apiVersion",
     "unsupported version"),
    (POLICY, lambda d: _set(d, "kind", "RoutePolicies"), "kind", "unknown kind"),
    (POLICY, lambda d: _set(d, "spec.match.max_prompt_tokens", 3),
     "spec.match.max_prompt_tokens", "unknown field"),
]


@pytest.mark.parametrize(("example", "mutate", "path", "words"), CASES,
                         ids=[f"{c[2]}:{c[3][:30]}" for c in CASES])
def test_invalid_manifest_names_field_and_reason(
        example: str, mutate: Any, path: str, words: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    doc = mutate(_load(example))
    code, err = _run(tmp_path, doc, capsys)
    assert code == 1
    name = doc["metadata"]["name"]
    lines = [line for line in err.splitlines() if f": {path}: " in line]
    assert lines, f"no error for {path} in:\n{err}"
    assert any(words in line for line in lines), err
    assert all(f"/{name}: " in line for line in lines)


def test_bad_value_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, _set(_load(POOL), "spec.replicas", -3), capsys)
    assert code == 1
    assert "spec.replicas: Input should be greater than or equal to 0 (got -3)" in err


def test_unreadable_and_non_yaml_files(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    assert main(["validate", "-f", str(bad), "-f", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "cannot read" in err
