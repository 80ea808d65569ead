"""values.schema.json rejects what would otherwise render silently wrong: unknown keys (typos)
at every level, wrong types, values out of range. The chart's own defaults pass it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kvroute"

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    # (--set-json overrides, text expected in helm's error)
    ({"routr": {}}, "Additional property routr is not allowed"),
    ({"router.replcas": 3}, "Additional property replcas is not allowed"),
    ({"router.envoy.enabeld": True}, "Additional property enabeld is not allowed"),
    ({"monitoring.prometheusRule.highShedRate.treshold": 0.1},
     "Additional property treshold is not allowed"),
    ({"router.replicas": "three"}, "router.replicas"),
    ({"router.replicas": 0}, "router.replicas"),
    ({"crds.enabled": "yes"}, "crds.enabled"),
    ({"router.ports.http": 70000}, "router.ports.http"),
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces.0"),
    ({"watchNamespaces": ["team-*"]}, "watchNamespaces.0"),
    ({"router.envoy.requestBodyMode": "STREAMING"}, "router.envoy.requestBodyMode"),
    ({"router.podDisruptionBudget.maxUnavailable": "half"}, "maxUnavailable"),
    ({"monitoring.prometheusRule.highShedRate.threshold": 5}, "threshold"),
    ({"operator.prometheusUrl": "prometheus:9090"}, "operator.prometheusUrl"),
    ({"gateway.inferencePools": [{"name": "x", "failureMode": "Closed"}]}, "failureMode"),
    ({"image.pullPolicy": "Sometimes"}, "image.pullPolicy"),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES,
                         ids=[f"{key}={json.dumps(value)}" for sets, _ in BAD_VALUES
                              for key, value in list(sets.items())[:1]])
def test_bad_value_is_rejected(render: Any, helm_error: type[Exception], sets: dict[str, Any],
                               message: str) -> None:
    with pytest.raises(helm_error) as caught:
        render(sets=sets)
    text = str(caught.value)
    assert "values don't meet the specifications of the schema" in text, text
    assert message in text, text


def test_template_level_checks(render: Any, helm_error: type[Exception]) -> None:
    """Rules JSON Schema cannot express fail the render with a message naming the values."""
    with pytest.raises(helm_error, match="minReplicas"):
        render(sets={"router.autoscaling.enabled": True, "router.autoscaling.minReplicas": 5,
                     "router.autoscaling.maxReplicas": 2})
    with pytest.raises(helm_error, match=r"set pool .* or matchLabels"):
        render(sets={"gateway.inferencePools": [{"name": "x"}]})
    with pytest.raises(helm_error, match=r"needs router\.enabled"):
        render(sets={"router.enabled": False,
                     "gateway.inferencePools": [{"name": "x", "pool": "p"}]})


def _leaves(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    return [path]


def test_schema_covers_every_default() -> None:
    """Every key in values.yaml is declared in the schema (else the defaults would fail)."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    defs = schema["definitions"]
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def lookup(node: dict[str, Any], key: str) -> dict[str, Any] | None:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties")
        if props is None:  # a free-form map (labels, nodeSelector, resources' requests, ...)
            return {}
        return props.get(key)

    for leaf in _leaves(values):
        node: dict[str, Any] | None = schema
        for key in leaf.split("."):
            assert node is not None
            node = lookup(node, key)
            assert node is not None, f"values.yaml key {leaf} is not in values.schema.json"
            if node == {}:
                break


def test_values_are_documented() -> None:
    """Every key of values.yaml has a comment right above it, or sits inside a map whose key
    has one (e.g. the requests/limits of a documented `resources:`)."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def commented(n: int) -> bool:
        return n > 0 and lines[n - 1].strip().startswith("#")

    undocumented = []
    for n, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^[A-Za-z][\w.-]*:", stripped) or commented(n):
            continue
        parent = next((k for k in range(n - 1, -1, -1)
                       if lines[k].strip() and not lines[k].strip().startswith("#")
                       and indent(lines[k]) < indent(line)), None)
        if parent is not None and commented(parent):
            continue
        undocumented.append(f"line {n + 1}: {stripped}")
    assert not undocumented, "values.yaml keys without a comment:\n" + "\n".join(undocumented)
