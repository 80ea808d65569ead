"""Every cross-field rule exists twice — a Python predicate in the models and a CEL expression in
the CRD. Evaluate both (CEL with the cel-python interpreter) on the same valid and broken
objects and require the same verdict, so what `kvroute validate` accepts is what the API server
accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from kvroute_api import crdgen
from kvroute_api.meta import ApiModel, Rule
from pydantic import BaseModel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for sub in crdgen._model_types(field.annotation):
            _models(sub, seen)


def _all_rule_models() -> list[type[ApiModel]]:
    seen: set[type[BaseModel]] = set()
    for kind in crdgen.KINDS:
        _models(kind, seen)
    return sorted((m for m in seen if issubclass(m, ApiModel) and m.RULES),
                  key=lambda m: m.__name__)


def _objects_of(model: type[ApiModel], node: Any, out: list[dict[str, Any]]) -> None:
    """Collect every sub-document of the examples that parses as ``model``."""
    if isinstance(node, dict):
        try:
            model.model_validate(node, by_alias=True, by_name=False)
            out.append(node)
        except Exception:
            pass
        for value in node.values():
            _objects_of(model, value, out)
    elif isinstance(node, list):
        for value in node:
            _objects_of(model, value, out)


def _cel(rule: Rule, obj: dict[str, Any]) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule.cel))
    return bool(program.evaluate({"self": json_to_cel(obj)}))


def _lenient(model: type[ApiModel], obj: dict[str, Any]) -> ApiModel:
    saved = model.RULES
    model.RULES = ()
    try:
        return model.model_validate(obj, by_alias=True, by_name=False)
    finally:
        model.RULES = saved


def _mutations(model: type[ApiModel], obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Variants likely to break rules: drop each key, keep only required keys, duplicate, empty
    or truncate each list, zero a field of every list element, flip nested booleans (alone and
    with lists truncated), inflate numbers, flip enums."""
    required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
    out = [{k: v for k, v in obj.items() if k in required}]
    for key, value in obj.items():
        dropped = {k: v for k, v in obj.items() if k != key}
        out.append(dropped)
        if isinstance(value, list) and value:
            out.append({**obj, key: value + value})  # duplicates
            out.append({**obj, key: []})
            out.append({**obj, key: value[:1]})
            if isinstance(value[0], dict):  # the same field changed in every element
                for field, first in value[0].items():
                    if isinstance(first, (int, float)) and not isinstance(first, bool):
                        out.append({**obj, key: [{**e, field: 0} for e in value]})
                    if first == "primary":
                        out.append({**obj, key: [{**e, field: "fallback"} for e in value]})
        if isinstance(value, dict):
            for field, inner in value.items():
                if isinstance(inner, bool):
                    flipped = {**obj, key: {**value, field: not inner}}
                    out.append(flipped)
                    for other, items in obj.items():  # and with one element left in lists
                        if isinstance(items, list) and len(items) > 1:
                            out.append({**flipped, other: items[:1]})
        if isinstance(value, int) and not isinstance(value, bool):
            out.append({**obj, key: value * 100})
        if key == "extraArgs":  # a flag only the API's own field may set
            out.append({**obj, key: [*value, "--scheduling-policy=priority"]})
        if value == "Managed":
            out.append({**obj, key: "External"})
        if value == "Header":
            out.append({**obj, key: "APIKey"})
        if value == "memory":
            out.append({**obj, key: "redis"})
    return out


@pytest.mark.parametrize("model", _all_rule_models(), ids=lambda m: m.__name__)
def test_cel_and_python_agree(model: type[ApiModel]) -> None:
    docs = [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    objects: list[dict[str, Any]] = []
    _objects_of(model, docs, objects)
    assert objects, f"no example contains a {model.__name__}: add one to examples/"
    checked = 0
    verdicts: dict[str, set[bool]] = {rule.cel: set() for rule in model.RULES}
    for base in objects:
        for candidate in [base, *_mutations(model, copy.deepcopy(base))]:
            try:
                lenient = _lenient(model, candidate)
            except Exception:
                continue
            # CEL sees the object as the API server stores it: defaults applied.
            stored = lenient.model_dump(by_alias=True, exclude_none=True, mode="json")
            for rule in model.RULES:
                python_ok = rule.check(lenient)
                assert _cel(rule, stored) == python_ok, (rule.cel, stored)
                verdicts[rule.cel].add(python_ok)
                checked += 1
    assert checked
    # Parity on failure is tested only for a rule some mutation breaks: every rule must be seen
    # both holding and broken.
    for cel, seen in verdicts.items():
        assert seen == {True, False}, f"{model.__name__}: no example or mutation {seen} {cel}"
