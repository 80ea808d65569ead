"""No API field that does nothing: every spec field of the three CRDs (walked from the pydantic
models, nested objects and list items included) must be read by the operator or the router, or
be listed in INFORMATIONAL with the reason it needs no reader.

"Read" means: the field's Python name is accessed as an attribute (``x.strong_share``), or its
JSON name appears as a string (``obj["spec"]["strongShare"]``), somewhere in
operator/kvroute_operator or router/kvroute_router (ASTs, comments and docstrings ignored). Names
shared by several models (``name``, ``enabled`` …) count as read when any of them is — this test
catches fields nobody ever touches, not every misuse.
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import ApiModel
from kvroute_api.route_policy import RoutePolicy
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
CODE = [ROOT / "operator" / "kvroute_operator", ROOT / "router" / "kvroute_router"]

INFORMATIONAL: dict[str, str] = {
    # path (Kind.spec.a.b, JSON names) -> why no code needs to read it
}

READ_INDIRECTLY: dict[str, str] = {
    # path -> where it is read in a way this scan does not follow (checked by hand)
    **{f"InferencePool.spec.tolerations{sub}": "operator builders.py: the whole list is "
       "serialised into the pod spec (Toleration.to_wire())"
       for sub in ("", ".key", ".operator", ".value", ".effect", ".tolerationSeconds")},
    **{f"RoutePolicy.spec.admission.priorityClasses.{sub}": "router budget/admission.py: "
       "Priority(chosen.name, chosen.priority, chosen.sheddable) after a dict lookup"
       for sub in ("priority", "sheddable")},
}

NOT_YET_READ: dict[str, str] = {
    # path -> the open work that will read it. The test fails when one of these starts being
    # read (delete the entry) and for any unread field not listed anywhere.
}


def _models(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType or origin in (list, dict, tuple):
        for arg in typing.get_args(annotation):
            yield from _models(arg)
    elif origin is typing.Annotated:
        yield from _models(typing.get_args(annotation)[0])


def spec_fields() -> list[tuple[str, str, str, str]]:
    """(path, model class, python name, json name) of every field under each kind's
    ``spec``."""
    out: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], path: str, seen: frozenset[type[BaseModel]]) -> None:
        for name, info in model.model_fields.items():
            alias = info.alias or name
            here = f"{path}.{alias}"
            out.append((here, model.__name__, name, alias))
            for sub in _models(info.annotation):
                if sub not in seen and issubclass(sub, ApiModel):
                    walk(sub, here, seen | {sub})

    for kind in (InferencePool, RoutePolicy, CacheTier):
        spec = kind.model_fields["spec"].annotation
        assert isinstance(spec, type)
        walk(spec, f"{kind.KIND}.spec", frozenset({spec}))
    return out


def _field_models() -> dict[str, set[type[BaseModel]]]:
    """python field name -> the API models that field holds (its type, list items)."""
    holds: dict[str, set[type[BaseModel]]] = {}

    def visit(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            for sub in _models(info.annotation):
                holds.setdefault(name, set()).add(sub)
                visit(sub, seen)

    seen: set[type[BaseModel]] = set()
    for kind in (InferencePool, RoutePolicy, CacheTier):
        visit(kind, seen)
    return holds


def reads() -> tuple[set[tuple[str, str]], set[str]]:
    """((model class name, python field name) pairs read, JSON strings in code).

    An attribute read ``V.f`` counts for model M when V is known to hold an M: V is ``X.g``
    where some API field ``g`` holds M; or a name assigned from such an expression, a loop
    variable over one, or a parameter/variable annotated with M's class name."""
    holds = _field_models()
    by_class = {m.__name__: m for models in holds.values() for m in models}
    by_class.update({k.__name__: k for k in (InferencePool, RoutePolicy, CacheTier)})
    read: set[tuple[str, str]] = set()
    strings: set[str] = set()

    def annotated(node: ast.expr | None) -> set[str]:
        if node is None:
            return set()
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in by_class} | \
            {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and n.value in by_class}

    trees = [ast.parse(path.read_text(encoding="utf-8")) for folder in CODE
             for path in folder.rglob("*.py") if "proto_gen" not in path.parts]
    # Attributes of the code's own classes that hold API models: dataclass/class fields
    # annotated with a model, and ``self.x = <param annotated with a model>`` in methods.
    members: dict[str, set[str]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.setdefault(item.target.id, set()).update(
                            annotated(item.annotation))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = {a.arg: annotated(a.annotation)
                          for a in [*node.args.args, *node.args.kwonlyargs]}
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Name):
                        for target in sub.targets:
                            if isinstance(target, ast.Attribute) and isinstance(
                                    target.value, ast.Name) and target.value.id == "self":
                                members.setdefault(target.attr, set()).update(
                                    params.get(sub.value.id, set()))
    for tree in trees:
            for scope in [tree, *[n for n in ast.walk(tree)
                                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]:
                names: dict[str, set[str]] = {}

                def holding(expr: ast.expr, names: dict[str, set[str]] = names) -> set[str]:
                    if isinstance(expr, ast.Attribute):
                        return {m.__name__ for m in holds.get(expr.attr, ())} | \
                            members.get(expr.attr, set())
                    if isinstance(expr, ast.Name):
                        return names.get(expr.id, set())
                    if isinstance(expr, ast.Subscript):
                        return holding(expr.value)
                    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) \
                            and expr.func.id in ("list", "sorted", "reversed", "enumerate"):
                        return holding(expr.args[0]) if expr.args else set()
                    if isinstance(expr, (ast.BoolOp,)):
                        return set().union(*(holding(v) for v in expr.values))
                    if isinstance(expr, ast.IfExp):
                        return holding(expr.body) | holding(expr.orelse)
                    return set()

                if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for arg in [*scope.args.args, *scope.args.kwonlyargs]:
                        names.setdefault(arg.arg, set()).update(annotated(arg.annotation))
                for _ in range(2):  # aliases of aliases
                    for node in ast.walk(scope):
                        if isinstance(node, ast.Assign):
                            for target in node.targets:
                                if isinstance(target, ast.Name):
                                    names.setdefault(target.id, set()).update(
                                        holding(node.value))
                        elif isinstance(node, ast.AnnAssign) and isinstance(node.target,
                                                                            ast.Name):
                            names.setdefault(node.target.id, set()).update(
                                annotated(node.annotation)
                                | (holding(node.value) if node.value else set()))
                        elif isinstance(node, (ast.For, ast.comprehension)):
                            target = node.target
                            if isinstance(target, ast.Tuple) and target.elts:
                                target = target.elts[-1]
                            if isinstance(target, ast.Name):
                                names.setdefault(target.id, set()).update(holding(node.iter))
                        elif isinstance(node, ast.NamedExpr):
                            names.setdefault(node.target.id, set()).update(holding(node.value))
                for node in ast.walk(scope):
                    if isinstance(node, ast.Attribute):
                        for model in holding(node.value):
                            read.add((model, node.attr))
                    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                        strings.add(node.value)
    return read, strings


def test_every_spec_field_is_read_or_informational() -> None:
    read, strings = reads()
    unread = [path for path, model, name, alias in spec_fields()
              if path not in INFORMATIONAL and path not in READ_INDIRECTLY
              and (model, name) not in read and not (alias != name and alias in strings)]
    now_read = sorted(set(NOT_YET_READ) - set(unread))
    assert not now_read, f"now read: delete from NOT_YET_READ: {now_read}"
    unread = [path for path in unread if path not in NOT_YET_READ]
    assert not unread, ("spec fields nothing reads (use them, remove them, or list them in "
                        "INFORMATIONAL with a reason):\n  " + "\n  ".join(unread))


def test_informational_entries_exist() -> None:
    paths = {path for path, _, _, _ in spec_fields()}
    for listed in (INFORMATIONAL, READ_INDIRECTLY, NOT_YET_READ):
        assert not set(listed) - paths


def test_docs_api_lists_every_top_level_spec_field() -> None:
    """docs/api.md's "Spec fields" table names every top-level spec field of the three kinds
    (a field added to the API without a line there fails here)."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [path for path, _, _, alias in spec_fields() if path.count(".") == 2
               and f"| {path.split('.')[0]} | `{alias}` |" not in text]
    assert not missing, f"add to docs/api.md's Spec fields table: {missing}"
