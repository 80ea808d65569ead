"""The CRDs generated from the models: committed copies up to date, structural schemas,
descriptions everywhere (kubectl explain), subresources, printer columns and CEL rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvroute_api import crdgen
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import ResourceBase
from kvroute_api.route_policy import RoutePolicy

KINDS = crdgen.KINDS


def _schema(kind: type[ResourceBase]) -> dict[str, Any]:
    schema: dict[str, Any] = crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_committed_crd_matches_models(kind: type[ResourceBase], repo_root: Path) -> None:
    committed = (repo_root / "crds" / crdgen.crd_filename(kind)).read_text(encoding="utf-8")
    assert committed == crdgen.crd_yaml(kind), "run `make crds` and commit crds/*.yaml"


def test_kvroute_crds_prints_all_three() -> None:
    docs = list(yaml.safe_load_all(crdgen.all_crds_yaml()))
    assert [d["spec"]["names"]["kind"] for d in docs] == [k.KIND for k in KINDS]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_every_property_has_a_type_and_description(kind: type[ResourceBase]) -> None:
    for path, node in _walk(_schema(kind)):
        if path.endswith("{}") or path.endswith("[]"):
            continue  # map values and list items are described by their parent field
        assert node.get("description"), f"{kind.KIND}{path} has no description"
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), \
            f"{kind.KIND}{path} has no type"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_schema_is_structural(kind: type[ResourceBase]) -> None:
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "title", "const", "$defs"}
    for path, node in _walk(_schema(kind)):
        assert not forbidden & node.keys(), f"{kind.KIND}{path}: {forbidden & node.keys()}"
        assert node.get("additionalProperties") is not False, path
        if "exclusiveMinimum" in node:
            assert isinstance(node["exclusiveMinimum"], bool) and "minimum" in node


def test_subresources_names_and_columns() -> None:
    for kind in KINDS:
        version = crdgen.crd(kind)["spec"]["versions"][0]
        names = crdgen.crd(kind)["spec"]["names"]
        assert version["subresources"]["status"] == {}
        assert names["categories"] == ["kvroute"]
        assert names["shortNames"] == list(kind.SHORT_NAMES)
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns[-1] == "Age" and len(columns) >= 4
    pool = crdgen.crd(InferencePool)["spec"]["versions"][0]
    assert pool["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert {c["name"] for c in pool["additionalPrinterColumns"]} >= {"Model", "Ready", "Cache-Hit"}


def test_printer_columns_point_at_real_fields() -> None:
    for kind in KINDS:
        props = _schema(kind)["properties"]
        for column in crdgen.PRINTER_COLUMNS[kind.KIND]:
            parts = column["jsonPath"].lstrip(".").split("[")[0].split(".")
            if parts[0] == "metadata":
                continue
            node = props[parts[0]]
            for part in parts[1:]:
                node = node["properties"][part]
            assert node["type"] in {"string", "integer", "number", "array"}, column


def test_cross_field_rules_are_rendered_as_cel() -> None:
    pool = _schema(InferencePool)["properties"]["spec"]
    rules = [r["rule"] for r in pool["x-kubernetes-validations"]]
    assert "self.mode != 'Managed' || has(self.model.source)" in rules
    autoscaling = pool["properties"]["autoscaling"]
    assert any("minReplicas <= self.maxReplicas" in r["rule"]
               for r in autoscaling["x-kubernetes-validations"])
    budget = _schema(RoutePolicy)["properties"]["spec"]["properties"]["budgets"]["items"]
    assert all(r["message"] for r in budget["x-kubernetes-validations"])


def test_hourly_price_without_throughput_is_refused() -> None:
    """A pool priced only per GPU hour used to cost $0 per token when it did not say its
    throughput; now the manifest is refused, naming the missing field."""
    import pydantic
    from kvroute_api.inference_pool import InferencePool

    body = {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"mode": "External", "model": {"name": "m"},
                     "endpoints": [{"address": "127.0.0.1:8000"}],
                     "cost": {"perGPUHourUSD": 2.0}}}
    with pytest.raises(pydantic.ValidationError, match="tokensPerSecondPerReplica"):
        InferencePool.model_validate(body, by_alias=True)
    body["spec"]["capacity"] = {"tokensPerSecondPerReplica": 1000}  # type: ignore[index]
    InferencePool.model_validate(body, by_alias=True)
