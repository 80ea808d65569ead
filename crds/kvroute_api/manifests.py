"""Offline validation of kvroute manifests (``kvroute validate``).

Multi-document YAML is parsed; each kvroute.io document is validated against its model with
wire (camelCase) names only and unknown fields rejected, as the API server's strict field
validation does. Every problem is reported with the document, the field path, the bad value and
what would be valid. Documents of other API groups are skipped (they are not ours to judge).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import API_VERSION, GROUP, ResourceBase, RuleViolationError
from kvroute_api.route_policy import RoutePolicy

KIND_MODELS: dict[str, type[ResourceBase]] = {
    m.KIND: m for m in (InferencePool, RoutePolicy, CacheTier)
}


@dataclass(frozen=True)
class Problem:
    """One validation error of one document."""

    source: str
    document: str
    path: str
    value: Any
    message: str

    def render(self) -> str:
        shown = _short(self.value)
        where = f"{self.path}: " if self.path else ""
        value = f" (got {shown})" if shown is not None else ""
        return f"{self.source}: {self.document}: {where}{self.message}{value}"


@dataclass(frozen=True)
class Document:
    """A parsed manifest document and where it came from."""

    source: str
    index: int
    body: Any

    @property
    def label(self) -> str:
        if isinstance(self.body, dict):
            kind = self.body.get("kind", "?")
            metadata = self.body.get("metadata")  # any YAML value: not trusted to be a mapping
            name = metadata.get("name") if isinstance(metadata, dict) else None
            return f"{kind}/{name if name is not None else f'#{self.index}'}"
        return f"document #{self.index}"


def _short(value: Any) -> str | None:
    if value is _MISSING:
        return None
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_$-]+$")


def _path(loc: Iterable[int | str]) -> str:
    """``spec.pools[0].name``; a key that would not read back as one path part (empty, with
    dots, brackets or spaces) is shown quoted: ``spec[""]``, ``metadata["a.b"]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.match(str(part)):
            out += f"[{json.dumps(str(part))}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _lookup(body: Any, loc: Iterable[int | str]) -> Any:
    node = body
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _message(err: Any) -> str:
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field (not in the kvroute.io/v1alpha1 schema; check spelling and nesting)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch":
        return f"does not match the pattern {ctx.get('pattern')}"
    if kind == "value_error":
        return str(ctx.get("error", msg))
    return str(msg)


def _split_field_path(field_path: str) -> list[str]:
    return [part for part in field_path.split(".") if part]


def parse_documents(text: str, source: str) -> Iterator[Document]:
    """Yield the non-empty documents of a YAML stream."""
    for index, body in enumerate(yaml.safe_load_all(text)):
        if body is not None:
            yield Document(source=source, index=index, body=body)


def validate_document(doc: Document) -> tuple[ResourceBase | None, list[Problem]]:
    """Validate one document; documents of other API groups yield (None, [])."""
    body = doc.body
    if not isinstance(body, dict):
        return None, [Problem(doc.source, doc.label, "", body, "a manifest must be a mapping")]
    api_version = body.get("apiVersion")
    if not isinstance(api_version, str) or api_version.split("/")[0] != GROUP:
        return None, []
    kind = body.get("kind")
    if api_version != API_VERSION:
        return None, [Problem(doc.source, doc.label, "apiVersion", api_version,
                              f"unsupported version; use {API_VERSION}")]
    model = KIND_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [Problem(doc.source, doc.label, "kind", kind,
                              f"unknown kind; one of {', '.join(sorted(KIND_MODELS))}")]
    try:
        return model.model_validate(body, by_alias=True, by_name=False), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            violation = (err.get("ctx") or {}).get("error")
            if isinstance(violation, RuleViolationError) and violation.field_path:
                loc += tuple(_split_field_path(violation.field_path))
            value = _lookup(body, loc) if err["type"] != "missing" else _MISSING
            problems.append(Problem(doc.source, doc.label, _path(loc), value, _message(err)))
        return None, problems


def validate_paths(paths: Iterable[Path]) -> tuple[list[ResourceBase], list[Problem]]:
    """Validate every document of every file; unreadable or non-YAML files are problems too."""
    objects: list[ResourceBase] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            docs = list(parse_documents(path.read_text(encoding="utf-8"), str(path)))
        except OSError as exc:
            problems.append(Problem(str(path), "file", "", _MISSING, f"cannot read: {exc}"))
            continue
        except UnicodeDecodeError as exc:
            problems.append(Problem(str(path), "file", "", _MISSING,
                                    f"not UTF-8 text (byte {exc.start}); save the manifest as "
                                    "UTF-8"))
            continue
        except yaml.YAMLError as exc:
            problems.append(Problem(str(path), "file", "", _MISSING, f"invalid YAML: {exc}"))
            continue
        for doc in docs:
            obj, errs = validate_document(doc)
            problems.extend(errs)
            if obj is not None:
                objects.append(obj)
    return objects, problems


def load_objects(paths: Iterable[Path]) -> list[ResourceBase]:
    """Validated kvroute objects from manifest files; raises ValueError listing every problem."""
    objects, problems = validate_paths(paths)
    if problems:
        raise ValueError("invalid manifests:\n" + "\n".join(p.render() for p in problems))
    return objects
