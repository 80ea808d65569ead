"""Builders -> golden YAML per example, validated offline with kubernetes-validate (strict
schemas of Kubernetes 1.33), and the flags the issue requires are present.

Regenerate the golden files after an intended change with
``KVROUTE_UPDATE_GOLDEN=1 python -m pytest tests/unit/operator/test_operator_builders.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kvroute_api.inference_pool import InferencePool
from kvroute_api.manifests import load_objects
from kvroute_operator.builders import Owner, build_children
from kvroute_operator.render import rendered_children, to_yaml

KUBERNETES_VERSION = "1.33.0"
GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "operator"
CASES = {
    "pool-llama-8b": ["pool-llama-8b.yaml", "cachetier.yaml"],
    "pool-llama-70b-tp": ["pool-llama-70b-tp.yaml"],
    "pool-local-external": ["pool-local-external.yaml"],
}


def rendered(examples_dir: Path, files: list[str]) -> list[dict[str, Any]]:
    return rendered_children(load_objects(examples_dir / f for f in files))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, examples_dir: Path) -> None:
    text = to_yaml(rendered(examples_dir, CASES[case]))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KVROUTE_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing {path}; run with KVROUTE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{path} differs; see the module docstring"


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate(case: str, examples_dir: Path) -> None:
    for manifest in rendered(examples_dir, CASES[case]):
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def args_of(deployment: dict[str, Any]) -> list[str]:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert isinstance(args, list)
    return args


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_managed_pool_carries_every_flag(examples_dir: Path) -> None:
    deployment, service, pdb = rendered(examples_dir, CASES["pool-llama-8b"])
    args = args_of(deployment)
    assert flag(args, "--model") == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag(args, "--served-model-name") == "llama-3.1-8b-instruct"
    assert "--enable-prefix-caching" in args
    assert flag(args, "--prefix-caching-hash-algo") == "sha256_cbor"
    assert flag(args, "--block-size") == "16"
    assert flag(args, "--max-model-len") == "16384"
    assert flag(args, "--max-num-seqs") == "128"
    assert flag(args, "--kv-offloading-size") == "64"
    events = json.loads(flag(args, "--kv-events-config"))
    assert events["endpoint"] == "tcp://*:5557"
    assert events["replay_endpoint"] == "tcp://*:5558"
    assert "$(POD_NAME)" in events["topic"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
    assert pod["metadata"]["labels"]["kvroute.io/pool"] == "llama-8b"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["spec"]["clusterIP"] == "None"
    assert pdb["spec"]["maxUnavailable"] == 1


def test_pvc_and_tensor_parallel(examples_dir: Path) -> None:
    deployment = rendered(examples_dir, CASES["pool-llama-70b-tp"])[0]
    args = args_of(deployment)
    assert flag(args, "--model") == "/models/llama-3.3-70b-instruct-fp8"
    assert flag(args, "--tensor-parallel-size") == "4"
    assert flag(args, "--quantization") == "fp8"
    assert args[-1] == "--enable-chunked-prefill"  # extra args verbatim, last
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "model-store",
                                                       "readOnly": True}} in volumes


def test_s3_source_uses_an_init_container(examples_dir: Path) -> None:
    (pool,) = load_objects([examples_dir / "pool-llama-70b-tp.yaml"])
    body = pool.to_wire()
    body["spec"]["model"]["source"] = "s3://weights/llama-70b"
    body["spec"]["model"]["s3CredentialsSecretRef"] = {"name": "s3-creds"}
    pool = InferencePool.model_validate(body)
    deployment = build_children(pool, owner=Owner(name="llama-70b", uid="u-1"))[0]
    spec = deployment["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert "s3://weights/llama-70b" in init["command"]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert flag(args_of(deployment), "--model") == "/models/model"
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_external_pool_deploys_nothing(examples_dir: Path) -> None:
    assert rendered(examples_dir, CASES["pool-local-external"]) == []


def test_priority_scheduling_reaches_the_engines(examples_dir: Path) -> None:
    objects = load_objects([examples_dir / "pool-llama-8b.yaml"])
    (pool,) = [o for o in objects if isinstance(o, InferencePool)]
    assert "--scheduling-policy" not in args_of(rendered_children([pool])[0])  # vLLM's fcfs
    pool.spec.engine.scheduling_policy = "Priority"
    assert flag(args_of(rendered_children([pool])[0]), "--scheduling-policy") == "priority"
