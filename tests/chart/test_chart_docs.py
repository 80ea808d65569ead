"""docs/helm.md's install section matches the chart: the command installs this chart under the
release name the rest of the page (Service and Deployment names) assumes, the example files it
applies exist and validate, and their namespace is created first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from kvroute_api.manifests import validate_paths

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "helm.md"


def install_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split("## Install", 1)[1].split("\n## ", 1)[0]


def commands(section: str) -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks
             for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_install_command_matches_chart() -> None:
    cmds = commands(install_section())
    helm_install = [c for c in cmds if c[:2] == ["helm", "install"]]
    assert helm_install == [["helm", "install", "kvroute", "charts/kvroute", "-n",
                             "kvroute-system", "--create-namespace"]]
    assert (REPO_ROOT / "charts" / "kvroute" / "Chart.yaml").is_file()


def test_names_in_the_doc_are_what_the_chart_creates(defaults: Any) -> None:
    section = install_section()
    for kind, name in (("Deployment", "kvroute-operator"), ("Deployment", "kvroute-router"),
                       ("Service", "kvroute-router")):
        defaults.one(kind, name)
        assert name in section
    for crd in defaults.kind("CustomResourceDefinition"):
        assert crd["metadata"]["name"] in section
    ports = {p["port"] for p in defaults.one("Service", "kvroute-router")["spec"]["ports"]}
    assert ports == {8080, 9002, 9003, 9090}
    for port in ports:
        assert str(port) in section


def test_applied_examples_exist_validate_and_have_their_namespace() -> None:
    cmds = commands(install_section())
    files = [REPO_ROOT / c[i + 1] for c in cmds if c[:2] == ["kubectl", "apply"]
             for i, arg in enumerate(c) if arg == "-f"]
    assert files, "the install section applies no example"
    objects, problems = validate_paths(files)
    assert not problems, [p.render() for p in problems]
    created = {c[3] for c in cmds if c[:3] == ["kubectl", "create", "namespace"]}
    created.add("kvroute-system")
    for obj in objects:
        assert obj.metadata.namespace in created, (
            f"{obj.KIND}/{obj.metadata.name} needs namespace {obj.metadata.namespace}, "
            "which the install section does not create")
