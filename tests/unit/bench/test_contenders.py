"""Contender definitions: names agree with the CLI, commands are well formed, and the kvroute
configuration they write is a valid pool and RoutePolicy for the API models."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kvroute_api import InferencePool, RoutePolicy
from kvroute_api.route_policy import RoutePolicySpec
from kvroute_bench import arguments
from kvroute_bench.contenders import (
    CONTENDERS,
    KVROUTE_SCORING,
    Contender,
    EngineInfo,
    FleetInfo,
    kvroute_config,
)
from kvroute_bench.workloads import WORKLOADS

FLEET = FleetInfo(
    engines=[EngineInfo(f"engine-{i}", f"http://127.0.0.1:{8100 + i}",
                        f"tcp://127.0.0.1:{5557 + 10 * i}", f"tcp://127.0.0.1:{5558 + 10 * i}")
             for i in range(2)],
    model="kvroute-test-model", block_size=32, model_dir=Path("/models/test"))


def test_cli_names_match_the_registries() -> None:
    assert set(arguments.WORKLOAD_NAMES) == set(WORKLOADS)
    assert list(arguments.CONTENDER_NAMES) == CONTENDERS.names()


def test_engine_model_options_match_the_emulator() -> None:
    """``kvroute bench`` spells the engine model's choices and defaults itself (its parser
    imports only the standard library); they must be the emulator's."""
    from kvroute_emulator.model.engine import (
        DEFAULT_KV_ALLOCATION,
        KV_ALLOCATIONS,
        SCHEDULING_POLICIES,
    )

    parser = argparse.ArgumentParser()
    arguments.add_arguments(parser, "out")
    options = {a.dest: a for a in parser._actions}
    assert tuple(options["kv_allocation"].choices or ()) == KV_ALLOCATIONS
    assert options["kv_allocation"].default == DEFAULT_KV_ALLOCATION
    assert tuple(options["scheduling_policy"].choices or ()) == SCHEDULING_POLICIES


def test_cli_rejects_unknown_workloads() -> None:
    parser = argparse.ArgumentParser()
    arguments.add_arguments(parser, "out")
    assert parser.parse_args(["--workload", "chat,rag"]).workload == "chat,rag"
    with pytest.raises(SystemExit):
        parser.parse_args(["--workload", "chat,nope"])


def test_select_names_unknown_contenders() -> None:
    assert [c.name for c in CONTENDERS.select(["direct-rr"])] == ["direct-rr"]
    with pytest.raises(ValueError, match="unknown contender"):
        CONTENDERS.select(["direct-rr", "magic"])


@pytest.mark.parametrize("variant", sorted(KVROUTE_SCORING))
def test_kvroute_config_is_a_valid_pool_and_policy(variant: str) -> None:
    from kvroute_bench.contenders import KVROUTE_POLICY_EXTRA

    pool, policy = kvroute_config(FLEET, KVROUTE_SCORING[variant],
                                  KVROUTE_POLICY_EXTRA.get(variant))
    parsed_pool = InferencePool.model_validate(pool)
    parsed_policy = RoutePolicy.model_validate(policy)
    assert parsed_pool.spec.mode == "External"
    assert [s.type for s in parsed_policy.spec.scoring.scorers] == [
        s["type"] for s in KVROUTE_SCORING[variant]]


def test_kvroute_command_writes_its_config_and_listens_on_loopback(tmp_path: Path) -> None:
    contender = CONTENDERS.select(["kvroute-precise"])[0]
    assert contender.command is not None
    argv = contender.command(FLEET, 18080, tmp_path)
    assert argv[argv.index("--port") + 1] == "18080"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "kvroute-test-model=/models/test" in argv
    docs = list(yaml.safe_load_all((tmp_path / "kvroute-precise.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["InferencePool", "RoutePolicy"]


def test_vllm_router_kv_aware_gets_every_engines_events(tmp_path: Path) -> None:
    contender = CONTENDERS.select(["vllm-router-kv"])[0]
    assert contender.command is not None and contender.env is not None
    argv = contender.command(FLEET, 30000, tmp_path)
    assert argv[argv.index("--policy") + 1] == "kv_aware"
    sources = [argv[i + 1] for i, a in enumerate(argv) if a == "--kv-event-source"]
    assert sources == [f"{e.url}={e.kv_events_endpoint}" for e in FLEET.engines]
    assert argv[argv.index("--kv-event-block-size") + 1] == "32"
    assert contender.env(FLEET) == {"VLLM_ROUTER_TOKENIZER": "/models/test"}


def test_direct_round_robin_starts_nothing(tmp_path: Path) -> None:
    running = CONTENDERS.select(["direct-rr"])[0].start(FLEET, tmp_path)
    assert running.process is None
    assert running.base_urls == [e.url for e in FLEET.engines]
    running.stop()


def test_direct_one_sends_everything_to_the_first_engine(tmp_path: Path) -> None:
    assert len(FLEET.engines) > 1
    running = CONTENDERS.select(["direct-one"])[0].start(FLEET, tmp_path)
    assert running.process is None
    assert running.base_urls == [FLEET.engines[0].url]


def test_process_group_cpu_counts_only_that_group(tmp_path: Path) -> None:
    from kvroute_bench.contenders import process_group_cpu_seconds

    ticks = os.sysconf("SC_CLK_TCK")

    def stat(pid: int, name: str, pgrp: int, utime: int, stime: int, cutime: int = 0) -> None:
        (tmp_path / str(pid)).mkdir()
        fields = ["S", "1", str(pgrp), "0", "0", "0", "0", "0", "0", "0", "0",
                  str(utime), str(stime), str(cutime), "0", "20"]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({name}) " + " ".join(fields) + "\n")

    stat(100, "router", 100, utime=3 * ticks, stime=ticks)
    stat(101, "worker (a) b", 100, utime=ticks, stime=0, cutime=ticks)  # odd name, same group
    stat(200, "other", 200, utime=50 * ticks, stime=0)
    (tmp_path / "self").mkdir()
    assert process_group_cpu_seconds(100, tmp_path) == pytest.approx(6.0)
    assert process_group_cpu_seconds(999, tmp_path) == 0.0
    assert math.isnan(process_group_cpu_seconds(100, tmp_path / "absent"))


def test_a_busy_router_process_group_shows_cpu_time() -> None:
    from kvroute_bench.contenders import RunningContender

    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.process_time() + 0.3\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)"],
                            start_new_session=True)
    running = RunningContender(["http://127.0.0.1:1"], busy)
    try:
        deadline = time.monotonic() + 20
        while running.cpu_seconds() < 0.25 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.cpu_seconds() >= 0.25
    finally:
        running.stop()
    assert RunningContender(["http://127.0.0.1:1"]).cpu_seconds() == 0.0


_FAKE_ROUTER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"data": [{"id": "%s"}]}' % sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _fake_router() -> Contender:
    def command(fleet: FleetInfo, port: int, workdir: Path) -> list[str]:
        return [sys.executable, "-c", _FAKE_ROUTER, str(port), fleet.model]
    return Contender("fake", "test", "a stand-in router answering /v1/models", command,
                     ready_timeout_s=30)


def test_replicas_are_independent_processes_on_their_own_ports(tmp_path: Path) -> None:
    from kvroute_bench.contenders import start_replicas

    running = start_replicas(_fake_router(), FLEET, tmp_path, replicas=3)
    try:
        assert len(running.base_urls) == 3 and len(set(running.base_urls)) == 3
        processes = [running.process, *(r.process for r in running.replicas)]
        assert all(p is not None and p.poll() is None for p in processes)
        assert len({p.pid for p in processes if p is not None}) == 3
        # Each copy logs apart; the first keeps the contender's plain log name.
        assert sorted(p.name for p in tmp_path.glob("fake*.log")) == [
            "fake-r1.log", "fake-r2.log", "fake.log"]
    finally:
        running.stop()
    assert all(p is not None and p.poll() is not None for p in processes)


def test_replica_cpu_is_summed_over_every_copy() -> None:
    from kvroute_bench.contenders import RunningContender

    def busy() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c",
                                 "import time\nend = time.process_time() + 0.2\n"
                                 "while time.process_time() < end: pass\ntime.sleep(30)"],
                                start_new_session=True)

    running = RunningContender(["http://127.0.0.1:1"], busy())
    running.replicas.append(RunningContender(["http://127.0.0.1:2"], busy()))
    try:
        deadline = time.monotonic() + 20
        while running.cpu_seconds() < 0.35 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Either process alone stops at ~0.2 s: more than 0.35 s is both of them.
        assert running.cpu_seconds() >= 0.35
        assert running.replicas[0].cpu_seconds() < running.cpu_seconds()
    finally:
        running.stop()
    assert running.replicas[0].process is not None
    assert running.replicas[0].process.poll() is not None


def test_direct_contenders_ignore_replicas(tmp_path: Path) -> None:
    from kvroute_bench.contenders import start_replicas

    running = start_replicas(CONTENDERS.select(["direct-rr"])[0], FLEET, tmp_path, replicas=3)
    assert running.base_urls == [e.url for e in FLEET.engines] and not running.replicas
    with pytest.raises(ValueError, match="replicas"):
        start_replicas(CONTENDERS.select(["direct-rr"])[0], FLEET, tmp_path, replicas=0)


def test_replicated_results_are_named_apart() -> None:
    from kvroute_bench.cli import replica_name

    assert replica_name("kvroute-precise-load", 1) == "kvroute-precise-load"
    assert replica_name("kvroute-precise-load", 3) == "kvroute-precise-load x3"
    assert replica_name("kvroute-precise-load", 3, True) == "kvroute-precise-load x3 synced"


def test_synced_kvroute_replicas_are_pointed_at_the_shared_redis(tmp_path: Path) -> None:
    import dataclasses

    contender = CONTENDERS.select(["kvroute-precise-load"])[0]
    assert contender.command is not None
    assert "--replica-sync-redis-url" not in contender.command(FLEET, 30000, tmp_path)
    synced = dataclasses.replace(FLEET, replica_sync_url="redis://127.0.0.1:6390/0")
    argv = contender.command(synced, 30000, tmp_path)
    assert argv[argv.index("--replica-sync-redis-url") + 1] == "redis://127.0.0.1:6390/0"


def variant_spec(name: str) -> RoutePolicySpec:
    """The RoutePolicy spec the bench generates for the kvroute variant ``name``."""
    from kvroute_bench.contenders import KVROUTE_VARIANTS

    variant = KVROUTE_VARIANTS[name]
    return RoutePolicy.model_validate(
        kvroute_config(FLEET, variant.scoring, variant.policy or None)[1]).spec


def test_the_nosat_variant_only_lifts_the_queue_rule(tmp_path: Path) -> None:
    base, nosat = variant_spec("precise-load"), variant_spec("precise-load-nosat")
    assert nosat.admission.saturation_queue_depth == 100_000
    assert base.admission.saturation_queue_depth == 8
    assert nosat.scoring == base.scoring
    contender = CONTENDERS.select(["kvroute-precise-load-nosat"])[0]
    assert contender.command is not None
    contender.command(FLEET, 30000, tmp_path)
    written = list(yaml.safe_load_all((tmp_path / "kvroute-precise-load-nosat.yaml").read_text()))
    assert written[1]["spec"]["admission"] == {"saturationQueueDepth": 100_000}


def test_the_ab_variants_change_one_thing_each() -> None:
    base = variant_spec("precise-load")
    assert base.admission.saturation_kv_utilization == 1.0
    kv95 = variant_spec("precise-load-kv95")
    assert kv95.admission.saturation_kv_utilization == 0.95
    assert kv95.scoring == base.scoring
    queue = variant_spec("precise-queue")
    assert [s.type for s in queue.scoring.scorers] == ["prefix-precise", "queue-depth"]
    assert queue.admission == base.admission
    nohead = variant_spec("precise-load-nohead").admission
    assert (nohead.saturation_queue_depth, nohead.saturation_kv_utilization) == (100_000, 1.0)
    for depth in (16, 32):
        variant = variant_spec(f"precise-load-q{depth}")
        assert variant.admission.saturation_queue_depth == depth
        assert variant.scoring == base.scoring


def test_kvroute_ab_variants_run_only_when_named() -> None:
    from kvroute_bench.contenders import default_contenders

    names = default_contenders()
    kvroute = [n for n in names if n.startswith("kvroute-")]
    assert kvroute == ["kvroute-approx", "kvroute-precise", "kvroute-precise-load",
                       "kvroute-precise-cost"]


def test_the_asyncio_variant_only_changes_the_routers_event_loop(tmp_path: Path) -> None:
    assert variant_spec("precise-cost-asyncio") == variant_spec("precise-cost")
    argvs = {}
    for name in ("kvroute-precise-cost", "kvroute-precise-cost-asyncio"):
        contender = CONTENDERS.select([name])[0]
        assert contender.command is not None
        argvs[name] = contender.command(FLEET, 30000, tmp_path)
    assert "--event-loop" not in argvs["kvroute-precise-cost"]  # the router's default, uvloop
    asyncio_argv = argvs["kvroute-precise-cost-asyncio"]
    assert asyncio_argv[asyncio_argv.index("--event-loop") + 1] == "asyncio"
    assert [a for a in asyncio_argv if a not in ("--event-loop", "asyncio")] == [
        a.replace("kvroute-precise-cost.yaml", "kvroute-precise-cost-asyncio.yaml")
        for a in argvs["kvroute-precise-cost"]]


def test_real_engines_serve_the_render_route_vllm_router_kv_aware_needs() -> None:
    """Without ``--enable-scale-out`` vLLM answers ``/v1/completions/render`` with 403 and
    vllm-router's kv_aware then routes with no token ids (seen with strace on real engines):
    the peer must meet engines started as its users start them."""
    from kvroute_bench.cli import local_engine_args

    assert "--enable-scale-out" in local_engine_args(0)
    assert local_engine_args(384)[:2] == ["--num-gpu-blocks-override", "384"]


def test_real_engines_publish_kv_events_under_vllms_default_topic(tmp_path: Path) -> None:
    """vllm-router's ``--kv-event-source`` subscribes to the topic ``""`` only and drops every
    frame under another one: engines that set ``"topic": "kv"`` left kv_aware without a single
    KV event in every run before 2026-12-04 (emulated-fleet.md, round 8)."""
    import json

    from kvroute_cli.localengines import LocalEngine, LocalEngineFleet

    fleet = LocalEngineFleet(count=1, workdir=tmp_path)
    engine = LocalEngine(index=0, port=8000, kv_events_port=5557, replay_port=5558,
                         log_path=tmp_path / "engine-0.log")
    argv = fleet.command(engine, tmp_path / "model", sys.executable)
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config.get("topic", "") == ""
    assert config["endpoint"] == "tcp://*:5557" and config["enable_kv_cache_events"]


def test_process_cpu_seconds_reads_this_process_and_grows_with_work() -> None:
    from kvroute_bench.contenders import process_cpu_seconds

    before = process_cpu_seconds(os.getpid())
    started = time.process_time()
    while time.process_time() - started < 0.2:  # bounded busy work: ~20 clock ticks
        sum(range(10_000))
    after = process_cpu_seconds(os.getpid())
    assert 0.0 <= before < after
    with pytest.raises(FileNotFoundError):
        process_cpu_seconds(2**22 + 7)  # above Linux's pid_max: no such process
