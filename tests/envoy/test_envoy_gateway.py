"""The endpoint-picker path through a real Envoy: the chart's sidecar bootstrap in front of
the router's ext_proc and real vLLM-CPU engines, in both request body modes, with the official
OpenAI SDK as the client. No timing thresholds: assertions are about what the client got,
where requests went and what the router settled."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from kvroute_cli.localenvoy import LocalEnvoy, free_port

from tests.envoy.conftest import USD_PER_M, RouterProcess

pytestmark = pytest.mark.envoy

SERVED = "x-gateway-destination-endpoint-served"
TIMEOUT = 180.0


def client_for(gateway: LocalEnvoy, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                         timeout=TIMEOUT, default_headers=headers or None)


def budget_labels(policy: str, budget: str, **extra: str) -> dict[str, str]:
    return {"policy_namespace": "default", "policy": policy, "budget": budget,
            "tenant": "anonymous", **extra}


def test_completions_and_chat_streaming_and_not(gateway: LocalEnvoy, router: RouterProcess,
                                                unique_prompt: str) -> None:
    client = client_for(gateway)
    raw = client.completions.with_raw_response.create(
        model="chat", prompt=unique_prompt + "once upon a time", max_tokens=6,
        extra_body={"ignore_eos": True})
    assert raw.headers[SERVED] in router.engines
    completion = raw.parse()
    assert completion.model == router.model  # the router rewrote the served model name
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert isinstance(completion.choices[0].text, str)  # random weights may decode to ""

    chunks = list(client.completions.create(
        model="chat", prompt=unique_prompt + "streamed", max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    # Streamed through Envoy as SSE events: text chunk(s), then the usage chunk. (vLLM merges
    # tokens that queued up while its API server was busy, so on a loaded machine all six
    # tokens may arrive in one text event: count events, not tokens.)
    assert len(chunks) >= 2 and not chunks[-1].choices
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(isinstance(c.choices[0].text, str) for c in chunks if c.choices)

    chat = client.chat.completions.create(
        model="chat", max_tokens=5, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": unique_prompt + "hello"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 5

    stream = client.chat.completions.create(
        model="chat", max_tokens=7, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": unique_prompt + "stream to me"}])
    events = list(stream)
    assert len(events) > 2
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 7


def test_usage_from_the_response_stream_settles_the_budget(
        gateway: LocalEnvoy, router: RouterProcess, unique_prompt: str) -> None:
    """The engine's usage, read by the router from the response body Envoy streams through
    ext_proc, settles the budget exactly (0.01 USD per token in this pool)."""
    labels = budget_labels("chat", "metered")
    # Earlier tests' requests are settled (their streams closed) before counting from here.
    router.settled("kvroute_budget_in_flight", labels, lambda v: not v)
    spend_before = router.metric("kvroute_budget_spend_usd_total", labels) or 0.0
    out_before = router.metric("kvroute_budget_tokens_total", {**labels, "kind": "output"}) \
        or 0.0
    client = client_for(gateway)
    events = list(client.chat.completions.create(
        model="chat", max_tokens=9, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": unique_prompt + "count with me"}]))
    usage = events[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    plain = client.completions.create(model="chat", prompt=unique_prompt + "and again",
                                      max_tokens=3, extra_body={"ignore_eos": True})
    assert plain.usage is not None
    tokens = (usage.prompt_tokens + usage.completion_tokens
              + plain.usage.prompt_tokens + plain.usage.completion_tokens)
    out = router.settled("kvroute_budget_tokens_total", {**labels, "kind": "output"},
                         lambda v: v == out_before + 12)
    assert out == out_before + 12, router.log_tail()
    spent = tokens * USD_PER_M / 1e6
    spend = router.settled("kvroute_budget_spend_usd_total", labels,
                           lambda v: v == pytest.approx(spend_before + spent))
    assert spend == pytest.approx(spend_before + spent)


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


def test_immediate_responses_are_openai_errors(gateway: LocalEnvoy, router: RouterProcess,
                                               unique_prompt: str) -> None:
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        bad = http.post("/v1/completions", content=b'{"model": "chat", "prompt": ',
                        headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert error_of(bad)["code"] == "invalid_json"

        missing = http.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 2})
        assert missing.status_code == 400
        assert error_of(missing)["param"] == "messages"

        for i in range(3):  # the budget (1e-6 USD) refuses at once, or after one request
            shed = http.post("/v1/completions", json={
                "model": "strict", "max_tokens": 2, "prompt": f"{unique_prompt} costly {i}"})
            if shed.status_code != 200:
                break
        assert shed.status_code == 429, shed.text
        assert int(shed.headers["retry-after"]) >= 1
        assert error_of(shed)["code"] == "budget_exhausted"

        none = http.post("/v1/completions", json={"model": "nowhere", "max_tokens": 2,
                                                  "prompt": unique_prompt})
        assert none.status_code == 503  # GIE: no ready endpoint
        assert error_of(none)["type"]

        huge = b'{"model": "chat", "prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}'
        too_large = http.post("/v1/completions", content=huge,
                              headers={"content-type": "application/json"})
        assert too_large.status_code == 413
        assert error_of(too_large)["code"] == "request_too_large"

    # The SDK sees them as the typed OpenAI errors.
    with pytest.raises(openai.RateLimitError):
        client_for(gateway).completions.create(model="strict", prompt=unique_prompt,
                                               max_tokens=2)


def test_client_cannot_pick_the_pod_or_its_tenant(gateway: LocalEnvoy, router: RouterProcess,
                                                  unique_prompt: str) -> None:
    """A client-sent x-gateway-destination-endpoint and x-kvroute-* headers never reach the
    router: the request is routed (to a real engine) and billed as the anonymous tenant."""
    victim = budget_labels("chat", "metered", tenant="victim")
    client = client_for(gateway, **{
        "x-gateway-destination-endpoint": f"127.0.0.1:{free_port()}",
        "x-kvroute-tenant": "victim", "x-kvroute-priority": "critical"})
    raw = client.completions.with_raw_response.create(
        model="chat", prompt=unique_prompt + "who pays", max_tokens=2)
    assert raw.headers[SERVED] in router.engines
    labels = budget_labels("chat", "metered")
    assert router.settled("kvroute_budget_requests_total", labels,
                          lambda v: v is not None) is not None
    assert router.metric("kvroute_budget_requests_total", victim) is None
    assert router.metric("kvroute_budget_spend_usd_total", victim) is None


def test_pod_dying_before_the_first_byte(gateway: LocalEnvoy, router: RouterProcess,
                                         unique_prompt: str) -> None:
    """Envoy's ORIGINAL_DST cannot retry on another pod (it reads one ip:port), so a pod that
    dies before answering gives the client a clear 503 (OpenAI error, retry-after), and the
    router keeps that pod out of picks: the client's retry lands on a live engine."""
    client = client_for(gateway)
    dropped_log = router.log_path.parent / "dying.log"
    # The router holds a pod that failed before answering out of picks for a while (the 503
    # says so; the retry below relies on it). This test's run in the other body mode, against
    # the same router, made the dying pod fail: until the hold ends every try goes to the live
    # engine (20 tries take well under the hold with fast engines). Wait for it to end: every
    # endpoint healthy again but the "gone" pool's, which has nothing listening.
    for _ in range(300):
        health = router.health()
        if health["healthy_endpoints"] == health["endpoints"] - 1:
            break
        time.sleep(0.05)
    assert health["healthy_endpoints"] == health["endpoints"] - 1, health

    def dropped() -> int:
        return dropped_log.read_text().count("dropped") if dropped_log.exists() else 0

    failures = recovered = 0
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        for i in range(20):  # the pick is the router's: bounded tries until it chose the pod
            # A prompt of its own per try: no prefix affinity to either endpoint.
            before = dropped()
            response = http.post("/v1/completions", json={
                "model": "flaky", "max_tokens": 2,
                "prompt": f"[{uuid.uuid4().hex}] {unique_prompt} dying {i}"})
            if response.status_code == 200:
                if dropped() > before:  # the pod dropped it and the gateway still delivered
                    recovered += 1
                    break
                continue
            failures += 1
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.headers["x-kvroute-upstream-failure"] in {"UC", "URX", "UF"}
            error = error_of(response)
            assert error["code"] == "upstream_unavailable"
            assert router.dying_pod in error["message"]
            retried = client.completions.with_raw_response.create(
                model="flaky", prompt=f"{unique_prompt} retry {i}", max_tokens=2)
            assert retried.headers[SERVED] == router.engines[0]
            break
    # Never a hang or a 5xx other than the documented 503; measured: full-duplex answers the
    # 503 above, a BUFFERED request body can be replayed by Envoy, so the client may get 200.
    assert failures + recovered == 1, "the router never picked the dying pod"


# Envoy 1.40 does not fail open in FULL_DUPLEX_STREAMED mode (measured: 500 whatever
# failure_mode_allow says), so the chart requires BUFFERED request bodies for FailOpen.
FAIL_OPEN = {"router.envoy.failureMode": "FailOpen", "router.envoy.requestBodyMode": "BUFFERED",
             "router.envoy.responseBodyMode": "STREAMED"}


def test_router_down_fail_close_and_fail_open(envoy_with: Any, router: RouterProcess,
                                              unique_prompt: str) -> None:
    """values.yaml: FailClose → the request fails at once (5xx, OpenAI error body); FailOpen →
    forwarded unpicked to failOpenBackend, or a 503 when none is set."""
    nothing = free_port()  # the router is down: nothing listens on its ext_proc port
    closed = envoy_with({}, ext_proc_port=nothing)
    with httpx.Client(timeout=TIMEOUT) as http:
        response = http.post(f"{closed.url}/v1/completions", json={
            "model": "chat", "prompt": unique_prompt, "max_tokens": 2})
        assert response.status_code == 500
        assert error_of(response)["code"] == "router_unavailable"

        open_ = envoy_with({**FAIL_OPEN, "router.envoy.failOpenBackend": router.engines[1]},
                           ext_proc_port=nothing)
        # Unpicked and unmodified: the client must name the served model.
        response = http.post(f"{open_.url}/v1/completions", json={
            "model": router.model, "prompt": unique_prompt, "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2

        nowhere = envoy_with(FAIL_OPEN, ext_proc_port=nothing)
        response = http.post(f"{nowhere.url}/v1/completions", json={
            "model": "chat", "prompt": unique_prompt, "max_tokens": 2})
        assert response.status_code == 503
        assert error_of(response)["code"] == "router_unavailable"


def _with_subset(addresses: list[str]) -> Any:
    """Insert a set_metadata filter that puts GIE's subset hint in the request's metadata
    (what a gateway does), before ext_proc."""

    def edit(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(1, {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3"
                         ".Config",
                "metadata": [{"metadata_namespace": "envoy.lb.subset_hint", "value": {
                    "x-gateway-destination-endpoint-subset": addresses}}]}})

    return edit


def test_subset_hint_is_honoured(envoy_with: Any, router: RouterProcess,
                                 unique_prompt: str) -> None:
    only = router.engines[1]
    hinted = envoy_with({}, edit=_with_subset([only]))
    client = client_for(hinted)
    for i in range(4):
        raw = client.completions.with_raw_response.create(
            model="chat", prompt=f"{unique_prompt} subset {i}", max_tokens=2)
        assert raw.headers[SERVED] == only
    outside = envoy_with({}, edit=_with_subset([f"127.0.0.1:{free_port()}"]))
    with httpx.Client(timeout=TIMEOUT) as http:
        response = http.post(f"{outside.url}/v1/completions", json={
            "model": "chat", "prompt": unique_prompt, "max_tokens": 2})
    assert response.status_code == 503, response.text  # GIE: none of the subset eligible
    assert json.loads(response.text)["error"]["type"]


def test_grpc_health_liveness_and_readiness(router: RouterProcess) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{router.ext_proc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "readiness",
                        "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
