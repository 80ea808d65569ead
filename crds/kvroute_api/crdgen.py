"""Generates the CustomResourceDefinition manifests from the pydantic models.

pydantic's JSON Schema is turned into a *structural* OpenAPI v3 schema as the API server wants
it: ``$ref`` inlined, ``anyOf [X, null]`` collapsed to X, JSON-Schema-only keywords (title,
const, numeric exclusive bounds) rewritten, ``additionalProperties: false`` dropped (the API
server prunes or, with strict field validation, rejects unknown fields itself), and each model's
cross-field :class:`~kvroute_api.meta.Rule` rendered as ``x-kubernetes-validations``.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import GROUP, VERSION, ResourceBase
from kvroute_api.route_policy import RoutePolicy

KINDS: tuple[type[ResourceBase], ...] = (InferencePool, RoutePolicy, CacheTier)

PRINTER_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "InferencePool": [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name",
         "description": "Served model name."},
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode",
         "description": "Managed or External."},
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas",
         "description": "Desired replicas."},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas",
         "description": "Replicas ready to serve."},
        {"name": "Cache-Hit", "type": "string", "jsonPath": ".status.prefixCacheHitRate",
         "description": "Engine-reported prefix-cache hit rate."},
        {"name": "Status", "type": "string",
         "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
         "description": "Reason of the Ready condition."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "RoutePolicy": [
        {"name": "Model", "type": "string", "jsonPath": ".spec.match.model",
         "description": "Model name the policy routes."},
        {"name": "Pools", "type": "string", "jsonPath": ".status.resolvedPools",
         "description": "Pools resolved and serving."},
        {"name": "Budget-Used", "type": "integer", "jsonPath": ".status.budgetUsedPercent",
         "description": "Highest usage of any budget, in percent."},
        {"name": "Accepted", "type": "string",
         "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
         "description": "Whether the policy is valid and in force."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "CacheTier": [
        {"name": "KV-Offload-GiB", "type": "number", "jsonPath": ".spec.kv.cpuOffloadGiB",
         "description": "CPU memory per replica for KV offload."},
        {"name": "Response", "type": "string", "jsonPath": ".spec.response.backend",
         "description": "Response-cache backend."},
        {"name": "Entries", "type": "integer", "jsonPath": ".status.entries",
         "description": "Response-cache entries."},
        {"name": "Hit-Rate", "type": "string", "jsonPath": ".status.hitRate",
         "description": "Response-cache hit rate."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}

_DROP = {"title", "additionalProperties_false", "discriminator", "examples"}


def _rules_by_def(model: type[BaseModel]) -> dict[str, list[dict[str, str]]]:
    """Map each nested model's JSON-schema definition name to its CEL rules."""
    found: dict[str, list[dict[str, str]]] = {}

    def visit(m: type[BaseModel]) -> None:
        if m.__name__ in found:
            return
        rules = getattr(m, "RULES", ())
        found[m.__name__] = [r.crd_entry() for r in rules]
        for field in m.model_fields.values():
            for arg in _model_types(field.annotation):
                visit(arg)

    visit(model)
    return found


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out.extend(_model_types(arg))
    return out


def _structural(node: Any, defs: dict[str, Any], rules: dict[str, list[dict[str, str]]]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs, rules) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        resolved = dict(defs[name])
        # Field-level keywords beside the $ref (description, default) win over the model's own.
        resolved.update({k: v for k, v in node.items() if k != "$ref"})
        inlined: dict[str, Any] = _structural(resolved, defs, rules)
        if rules.get(name):
            inlined["x-kubernetes-validations"] = rules[name]
        return inlined
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1:
            merged = dict(options[0])
            merged.update({k: v for k, v in node.items() if k not in ("anyOf", "default")})
            if node.get("default") is not None:
                merged["default"] = node["default"]
            return _structural(merged, defs, rules)
        raise ValueError(f"non-structural union in schema: {node}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, rules) for k, v in value.items()}
            continue
        out[key] = _structural(value, defs, rules)
    if out.get("type") == "object" and "properties" in out and "required" in out:
        out["required"] = sorted(out["required"])
    return out


class _ServerDefaults(GenerateJsonSchema):
    """Renders ``default_factory`` defaults too, so the API server fills in nested objects and
    lists exactly as the models do (CEL rules then see the same fields pydantic sees). A nested
    object defaults to ``{}``, whose own fields the API server then defaults one by one."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        return _wire_default(value)


def _wire_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {}
    if isinstance(value, list):
        return [v.model_dump(by_alias=True, exclude_none=True, mode="json")
                if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, dict) and not value:
        return NoDefault  # empty maps need no default; absent and {} mean the same
    return value


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, CEL rules included."""
    raw = model.model_json_schema(by_alias=True, mode="validation",
                                  schema_generator=_ServerDefaults)
    defs = raw.pop("$defs", {})
    rules = _rules_by_def(model)
    schema: dict[str, Any] = _structural(raw, defs, rules)
    if rules.get(model.__name__):
        schema["x-kubernetes-validations"] = rules[model.__name__]
    return schema


def crd(kind: type[ResourceBase]) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    fields = kind.model_fields
    spec_schema = openapi_schema(_model_types(fields["spec"].annotation)[0])
    status_schema = openapi_schema(_model_types(fields["status"].annotation)[0])
    spec_schema["description"] = fields["spec"].description
    status_schema["description"] = fields["status"].description
    root = {
        "type": "object",
        "description": (kind.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    subresources: dict[str, Any] = {"status": {}}
    if kind is InferencePool:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    plural = kind.PLURAL
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kvroute"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.KIND,
                "listKind": f"{kind.KIND}List",
                "plural": plural,
                "singular": kind.KIND.lower(),
                "shortNames": list(kind.SHORT_NAMES),
                "categories": ["kvroute"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": subresources,
                "additionalPrinterColumns": PRINTER_COLUMNS[kind.KIND],
            }],
        },
    }


HEADER = "# Generated by `kvroute crds` from crds/kvroute_api; do not edit by hand.\n"


def crd_yaml(kind: type[ResourceBase]) -> str:
    """One CRD as the YAML committed in ``crds/<plural>.yaml``."""
    return HEADER + yaml.safe_dump(crd(kind), sort_keys=False, width=100)


def all_crds_yaml() -> str:
    """All CRDs as one multi-document YAML stream."""
    return "---\n".join(crd_yaml(k) for k in KINDS)


def crd_filename(kind: type[ResourceBase]) -> str:
    return f"{GROUP}_{kind.PLURAL}.yaml"
