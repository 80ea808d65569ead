"""Fuzzing ``kvroute validate`` (issue 16), bounded: hypothesis mutates the shipped examples
(any field set to any YAML value, fields dropped, whole sections replaced) and feeds raw bytes
as files. Invariants: never a traceback (exit 0 or 1), and every problem names its document,
a reason, and — for a kvroute object that fails its schema — the field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kvroute_api.manifests import validate_paths
from kvroute_cli.main import main

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
DOCS = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(DOCS)))
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        # Walk down a random existing path, then set, drop or replace there.
        while True:
            keys = (list(node) if isinstance(node, dict)
                    else list(range(len(node))) if isinstance(node, list) else [])
            if not keys or draw(st.integers(0, 3)) == 0:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if not isinstance(child, (dict, list)) or not child:
                action = draw(st.sampled_from(["set", "drop"]))
                if action == "set":
                    node[key] = draw(VALUES)
                elif isinstance(node, dict):
                    del node[key]
                else:
                    node.pop(key)
                break
            node = child
        if isinstance(node, dict) and draw(st.booleans()):
            node[draw(st.text(max_size=10))] = draw(VALUES)
    return doc


def _check(path: Path) -> list[Any]:
    code = main(["validate", "-f", str(path)])  # raises on a traceback
    assert code in (0, 1)
    _, problems = validate_paths([path])
    assert (code == 1) == bool(problems)
    for problem in problems:
        assert problem.document and problem.message, problem
        rendered = problem.render()
        assert rendered.startswith(f"{path}: {problem.document}: ")
    return problems


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(doc={**DOCS[0], "": None})  # an empty key: the path was "" (no field named)
@example(doc={**DOCS[0], "metadata": {"name": "x", "a.b": 1}})
@given(doc=mutated())
def test_mutated_examples_never_crash_and_name_the_field(
        doc: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "manifest.yaml"
    try:
        path.write_text(yaml.safe_dump(doc))
    except (yaml.YAMLError, ValueError):  # not representable as YAML (e.g. a surrogate)
        return
    problems = _check(path)
    capsys.readouterr()
    body = yaml.safe_load(path.read_text())
    if (isinstance(body, dict) and body.get("apiVersion") == "kvroute.io/v1alpha1"
            and body.get("kind") in [d["kind"] for d in DOCS]):
        # A kvroute object that fails its schema: every problem names the field.
        assert all(p.path for p in problems), [p.render() for p in problems]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(raw=b"\x80")  # not UTF-8: was a UnicodeDecodeError traceback
@example(raw=b"apiVersion: kvroute.io/v1alpha1\nkind: RoutePolicy\nmetadata: 5\n")  # was a crash
@example(raw=b"apiVersion: kvroute.io\nmetadata: [1]\n")
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.sampled_from([b"\xff\xfe", b"- 1\n- 2", b"---\n...\n", b"~",
                                      b"apiVersion: kvroute.io/v1alpha1\nkind: RoutePolicy\n"
                                      b"metadata: 5\n",
                                      b"apiVersion: kvroute.io/v1alpha1\nkind: [a]\n"])))
def test_any_file_content_never_crashes(raw: bytes, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "raw.yaml"
    path.write_bytes(raw)
    _check(path)
    capsys.readouterr()
