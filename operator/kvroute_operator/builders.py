"""Pure builders of the Kubernetes objects an InferencePool owns: a Deployment of vLLM engines,
a headless Service and a PodDisruptionBudget.

No I/O happens here: the operator applies what these functions return, and ``kvroute render``
prints it, so review, GitOps diffs and the cluster see the same manifests. Each builder takes
the parsed pool (and its CacheTier, when it references one) and returns a plain dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from kvroute_api import API_VERSION
from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool

FIELD_MANAGER: Final = "kvroute-operator"
POOL_LABEL: Final = "kvroute.io/pool"
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": FIELD_MANAGER}

MODELS_DIR: Final = "/models"
S3_MODEL_DIR: Final = f"{MODELS_DIR}/model"
HF_HOME: Final = f"{MODELS_DIR}/hf-cache"
# Image of the init container that copies s3:// weights (the AWS CLI; `aws s3 sync`).
S3_INIT_IMAGE: Final = "amazon/aws-cli:2.27.50"

# Model loading can take many minutes: the startup probe allows this long before liveness
# takes over (periodSeconds x failureThreshold).
STARTUP_PERIOD_SECONDS: Final = 10
STARTUP_FAILURE_THRESHOLD: Final = 180  # 30 minutes
# Seconds a terminating engine keeps serving: the preStop pause lets routers and Services drop
# the pod first, then vLLM finishes its in-flight requests after SIGTERM.
PRESTOP_PAUSE_SECONDS: Final = 15
TERMINATION_GRACE_SECONDS: Final = 300
# A rollout that has made no progress for this long is reported as Degraded.
PROGRESS_DEADLINE_SECONDS: Final = 1800
KV_EVENTS_TOPIC_PREFIX: Final = "kv@"


@dataclass(frozen=True)
class Owner:
    """The owning object's identity, for ownerReferences (absent when rendering offline)."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "InferencePool", "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


def selector_labels(pool: InferencePool) -> dict[str, str]:
    """Labels that select a Managed pool's pods (the router and the Service select on them)."""
    return {POOL_LABEL: pool.metadata.name}


def selector_string(pool: InferencePool) -> str:
    """The pool's pod selector as a string, for ``status.selector`` (scale subresource, HPA)."""
    if pool.spec.mode == "External" and pool.spec.selector is not None:
        labels = pool.spec.selector.match_labels
    else:
        labels = selector_labels(pool)
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def common_labels(pool: InferencePool) -> dict[str, str]:
    """Labels on every child object and pod."""
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": pool.metadata.name,
        "app.kubernetes.io/component": "engine",
        **MANAGED_BY,
        **selector_labels(pool),
    }


def _metadata(pool: InferencePool, owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": pool.metadata.name, "labels": common_labels(pool)}
    if pool.metadata.namespace:
        meta["namespace"] = pool.metadata.namespace
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def _kv_events_config(pool: InferencePool) -> str:
    events = pool.spec.engine.kv_events
    # Kubernetes expands $(POD_NAME) in args from the container's env (downward API), so each
    # engine publishes under a topic naming its pod.
    return json.dumps({
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events.port}",
        "replay_endpoint": f"tcp://*:{events.replay_port}",
        "topic": f"{KV_EVENTS_TOPIC_PREFIX}$(POD_NAME)",
    }, separators=(",", ":"))


def _model_location(pool: InferencePool) -> str:
    source = pool.spec.model.source
    if source is None:
        raise ValueError(f"InferencePool {pool.metadata.name}: spec.model.source is required "
                         "for Managed pools (hf://, pvc:// or s3://)")
    scheme, _, rest = source.partition("://")
    if scheme == "hf":
        return rest
    if scheme == "pvc":
        _claim, _, path = rest.partition("/")
        return f"{MODELS_DIR}/{path}".rstrip("/")
    return S3_MODEL_DIR


def engine_args(pool: InferencePool, tier: CacheTier | None) -> list[str]:
    """The vLLM command-line arguments of one engine."""
    spec, engine = pool.spec, pool.spec.engine
    args = [
        "--model", _model_location(pool),
        "--served-model-name", spec.model.name,
        "--host", "0.0.0.0",
        "--port", str(engine.port),
        "--enable-prefix-caching",
        "--prefix-caching-hash-algo", engine.prefix_caching_hash_algo,
        "--block-size", str(engine.block_size),
        "--dtype", engine.dtype,
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
    ]
    if spec.model.revision and (spec.model.source or "").startswith("hf://"):
        args += ["--revision", spec.model.revision]
    if engine.quantization:
        args += ["--quantization", engine.quantization]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.max_num_seqs is not None:
        args += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.scheduling_policy == "Priority":  # vLLM's default is fcfs
        args += ["--scheduling-policy", "priority"]
    if engine.kv_events.enabled:
        args += ["--kv-events-config", _kv_events_config(pool)]
    if tier is not None and tier.spec.kv is not None:
        # vLLM's native CPU offloading (vLLM 0.32: --kv-offloading-size in GiB per replica,
        # summed over tensor-parallel ranks; --kv-offloading-backend native).
        args += ["--kv-offloading-size", f"{tier.spec.kv.cpu_offload_gib:g}",
                 "--kv-offloading-backend", "native"]
    return args + list(engine.extra_args)


def _env(pool: InferencePool) -> list[dict[str, Any]]:
    model = pool.spec.model
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_HOME", "value": HF_HOME},
    ]
    if (model.source or "").startswith("hf://"):
        if model.hf_token_secret_ref is not None:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": model.hf_token_secret_ref.name, "key": model.hf_token_secret_ref.key}}})
    else:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    env += [{"name": e.name, "value": e.value} for e in pool.spec.engine.env]
    return env


def _resources(pool: InferencePool) -> dict[str, Any]:
    res = pool.spec.resources
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus > 0:
        amounts[res.gpu_resource_name] = str(res.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _model_volumes(pool: InferencePool) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                 list[dict[str, Any]]]:
    """(volumes, engine mounts, init containers) for the model source."""
    source = pool.spec.model.source or ""
    scheme, _, rest = source.partition("://")
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    if scheme == "pvc":
        claim = rest.partition("/")[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim,
                                                                   "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODELS_DIR, "readOnly": True})
        volumes.append({"name": "hf-cache", "emptyDir": {}})
        mounts.append({"name": "hf-cache", "mountPath": HF_HOME})
    else:
        volumes.append({"name": "model", "emptyDir": {}})
        mounts.append({"name": "model", "mountPath": MODELS_DIR})
    if scheme == "s3":
        copier: dict[str, Any] = {
            "name": "fetch-model",
            "image": S3_INIT_IMAGE,
            "command": ["aws", "s3", "sync", "--only-show-errors", source, S3_MODEL_DIR],
            "volumeMounts": [{"name": "model", "mountPath": MODELS_DIR}],
        }
        creds = pool.spec.model.s3_credentials_secret_ref
        if creds is not None:
            copier["envFrom"] = [{"secretRef": {"name": creds.name}}]
        init.append(copier)
    return volumes, mounts, init


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def build_deployment(pool: InferencePool, tier: CacheTier | None = None,
                     owner: Owner | None = None) -> dict[str, Any]:
    """The Deployment of a Managed pool's vLLM engines."""
    spec, engine = pool.spec, pool.spec.engine
    volumes, mounts, init = _model_volumes(pool)
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                 "sizeLimit": spec.resources.shared_memory}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    ports: list[dict[str, Any]] = [{"name": "http", "containerPort": engine.port,
                                    "protocol": "TCP"}]
    if engine.kv_events.enabled:
        ports += [
            {"name": "kv-events", "containerPort": engine.kv_events.port, "protocol": "TCP"},
            {"name": "kv-replay", "containerPort": engine.kv_events.replay_port,
             "protocol": "TCP"},
        ]
    container: dict[str, Any] = {
        "name": "vllm",
        "image": engine.image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": engine_args(pool, tier),
        "env": _env(pool),
        "ports": ports,
        "resources": _resources(pool),
        "volumeMounts": mounts,
        "startupProbe": _probe("/health", STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _probe("/health", 5, 3),
        "livenessProbe": _probe("/health", 10, 6),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_PAUSE_SECONDS}}},
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        pod_spec["initContainers"] = init
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, owner),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(pool)},
            # One extra replica while rolling: never fewer ready engines than asked for.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            "template": {
                "metadata": {
                    "labels": common_labels(pool),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(engine.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(pool: InferencePool, owner: Owner | None = None) -> dict[str, Any]:
    """The headless Service: DNS names for the engines and their KV-event ports."""
    engine = pool.spec.engine
    ports: list[dict[str, Any]] = [{"name": "http", "port": engine.port, "targetPort": "http",
                                    "protocol": "TCP"}]
    if engine.kv_events.enabled:
        ports += [
            {"name": "kv-events", "port": engine.kv_events.port, "targetPort": "kv-events",
             "protocol": "TCP"},
            {"name": "kv-replay", "port": engine.kv_events.replay_port,
             "targetPort": "kv-replay", "protocol": "TCP"},
        ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, owner),
        "spec": {"clusterIP": "None", "selector": selector_labels(pool), "ports": ports,
                 "publishNotReadyAddresses": False},
    }


def build_pod_disruption_budget(pool: InferencePool,
                                owner: Owner | None = None) -> dict[str, Any]:
    """At most one engine voluntarily disrupted (drained node, eviction) at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool, owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(pool)}},
    }


def build_children(pool: InferencePool, tier: CacheTier | None = None,
                   owner: Owner | None = None) -> list[dict[str, Any]]:
    """Every object the operator applies for the pool (none for External pools)."""
    if pool.spec.mode != "Managed":
        return []
    return [build_deployment(pool, tier, owner), build_service(pool, owner),
            build_pod_disruption_budget(pool, owner)]
