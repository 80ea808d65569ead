"""The chart's CRDs are the repository's CRDs: files/crds/*.yaml are byte-for-byte copies of
crds/*.yaml, and the rendered CustomResourceDefinitions equal them semantically (the template
adds Helm's labels and, with crds.keep, the keep annotation, nothing else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT / "crds"
COPIES = REPO_ROOT / "charts" / "kvroute" / "files" / "crds"


def test_chart_carries_identical_copies() -> None:
    source = {p.name: p.read_bytes() for p in SOURCE.glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in COPIES.glob("*.yaml")}
    assert source, "no CRDs in crds/"
    assert copies.keys() == source.keys(), (
        f"chart CRDs {sorted(copies)} != crds/ {sorted(source)}: cp crds/*.yaml {COPIES}/")
    stale = [name for name in source if copies[name] != source[name]]
    assert not stale, f"out of date in the chart: {stale}; run: cp crds/*.yaml {COPIES}/"


def _strip_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = yaml.safe_load(yaml.safe_dump(crd))
    meta = crd["metadata"]
    for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        meta["labels"].pop(key, None)
    meta.get("annotations", {}).pop("helm.sh/resource-policy", None)
    if meta.get("annotations") == {}:
        del meta["annotations"]
    return crd


def test_rendered_crds_equal_sources(defaults: Any) -> None:
    rendered = {d["metadata"]["name"]: d for d in defaults.kind("CustomResourceDefinition")}
    sources = {d["metadata"]["name"]: d
               for p in sorted(SOURCE.glob("*.yaml"))
               for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d}
    assert rendered.keys() == sources.keys()
    for name, source in sources.items():
        assert _strip_chart_metadata(rendered[name]) == source, name


def test_crds_kept_on_uninstall_by_default(defaults: Any, render: Any) -> None:
    for crd in defaults.kind("CustomResourceDefinition"):
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for crd in render(sets={"crds.keep": False}).kind("CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_crds_can_be_left_out(render: Any) -> None:
    assert not render(sets={"crds.enabled": False}).kind("CustomResourceDefinition")
