"""The Envoy sidecar's generated bootstrap: parsed into envoy.config.bootstrap.v3.Bootstrap with
xds-protos (every typed_config resolved to its message type, unknown fields rejected), and
checked structurally: ext_proc to the router on loopback, an ORIGINAL_DST cluster keyed on
x-gateway-destination-endpoint, the client's copy of that header stripped first."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

# Importing these registers their messages in protobuf's default pool, which is where
# json_format resolves the "@type" of each Any.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

REGISTERED = (ext_proc_pb2, header_mutation_pb2, health_check_pb2, router_pb2,
              http_connection_manager_pb2, http_protocol_options_pb2)
HCM = http_connection_manager_pb2.HttpConnectionManager
Mode = processing_mode_pb2.ProcessingMode


def bootstrap_of(manifests: Any) -> tuple[dict[str, Any], bootstrap_pb2.Bootstrap]:
    cm = manifests.one("ConfigMap", "kvroute-router-envoy")
    raw = yaml.safe_load(cm["data"]["envoy.yaml"])
    return raw, json_format.ParseDict(raw, bootstrap_pb2.Bootstrap())


def unpack_hcm(listener: Any) -> Any:
    [chain] = listener.filter_chains
    [network_filter] = chain.filters
    hcm = HCM()
    assert network_filter.typed_config.Unpack(hcm)
    return hcm


def test_no_envoy_by_default(defaults: Any) -> None:
    assert not [c for c in defaults.kind("ConfigMap") if c["metadata"]["name"].endswith("envoy")]
    [c] = defaults.deployment("router")["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "router"


@pytest.mark.parametrize("values", ["envoy", "ha"])
def test_bootstrap_parses_into_envoy_protos(render: Any, ci_values: Any, values: str) -> None:
    raw, boot = bootstrap_of(render(ci_values(values)))
    # Round trip: nothing was dropped (ParseDict rejects unknown fields; this catches
    # values that parse but mean something else).
    back = json_format.MessageToDict(boot, preserving_proto_field_name=True)
    assert {c["name"] for c in back["static_resources"]["clusters"]} == {
        "kvroute_ext_proc", "original_destination"}
    assert [listener["name"] for listener in raw["static_resources"]["listeners"]] == [
        "inference", "health"]


def test_ext_proc_and_original_dst(render: Any, ci_values: Any) -> None:
    manifests = render(ci_values("envoy"))
    _, boot = bootstrap_of(manifests)
    listeners = {lst.name: lst for lst in boot.static_resources.listeners}
    clusters = {c.name: c for c in boot.static_resources.clusters}

    hcm = unpack_hcm(listeners["inference"])
    names = [f.name for f in hcm.http_filters]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_proc",
                     "envoy.filters.http.router"]
    mutation = header_mutation_pb2.HeaderMutation()
    assert hcm.http_filters[0].typed_config.Unpack(mutation)
    # A client picks neither the pod nor its tenant/priority: the destination header and every
    # x-kvroute-* header are removed before ext_proc sees the request.
    [remove, remove_kvroute] = mutation.mutations.request_mutations
    assert remove.remove == "x-gateway-destination-endpoint"
    assert remove_kvroute.remove_on_match.key_matcher.prefix == "x-kvroute-"

    ext_proc = ext_proc_pb2.ExternalProcessor()
    assert hcm.http_filters[1].typed_config.Unpack(ext_proc)
    assert ext_proc.grpc_service.envoy_grpc.cluster_name == "kvroute_ext_proc"
    assert ext_proc.failure_mode_allow is False
    mode = ext_proc.processing_mode
    assert mode.request_header_mode == Mode.SEND
    assert mode.request_body_mode == Mode.BUFFERED  # ci/envoy-values.yaml
    assert mode.response_body_mode == Mode.STREAMED
    # Only a request the router picked for goes to ORIGINAL_DST (without the header Envoy
    # would connect to the request's own destination: itself); the rest get a 503.
    [route, no_pick] = hcm.route_config.virtual_hosts[0].routes
    assert route.route.cluster == "original_destination"
    [has_pick] = route.match.headers
    assert (has_pick.name, has_pick.present_match) == ("x-gateway-destination-endpoint", True)
    assert route.route.timeout.ToSeconds() == 0, "streams must not be cut by a route timeout"
    assert [h.header.key for h in route.response_headers_to_add] == [
        "x-gateway-destination-endpoint-served"]
    assert no_pick.direct_response.status == 503
    assert ext_proc.metadata_options.forwarding_namespaces.untyped == [
        "envoy.lb.subset_hint", "envoy.lb"]

    ext = clusters["kvroute_ext_proc"]
    [lb] = ext.load_assignment.endpoints[0].lb_endpoints
    address = lb.endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 9002)
    http2 = http_protocol_options_pb2.HttpProtocolOptions()
    assert ext.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(http2)
    assert http2.explicit_http_config.HasField("http2_protocol_options"), "gRPC needs HTTP/2"

    dst = clusters["original_destination"]
    assert dst.type == dst.ORIGINAL_DST
    assert dst.lb_policy == dst.CLUSTER_PROVIDED
    assert dst.original_dst_lb_config.use_http_header is True
    assert dst.original_dst_lb_config.http_header_name == "x-gateway-destination-endpoint"

    admin = boot.admin.address.socket_address
    assert admin.address == "127.0.0.1", "the admin interface must not be reachable off-pod"


def test_full_duplex_modes_send_trailers(defaults: Any, render: Any) -> None:
    """Envoy rejects FULL_DUPLEX_STREAMED bodies unless the trailers are sent too."""
    _, boot = bootstrap_of(render(sets={"router.envoy.enabled": True}))
    hcm = unpack_hcm(next(x for x in boot.static_resources.listeners if x.name == "inference"))
    ext_proc = ext_proc_pb2.ExternalProcessor()
    assert hcm.http_filters[1].typed_config.Unpack(ext_proc)
    mode = ext_proc.processing_mode
    assert mode.request_body_mode == Mode.FULL_DUPLEX_STREAMED
    assert mode.request_trailer_mode == Mode.SEND
    assert mode.response_body_mode == Mode.FULL_DUPLEX_STREAMED
    assert mode.response_trailer_mode == Mode.SEND


def test_sidecar_wiring(render: Any, ci_values: Any) -> None:
    manifests = render(ci_values("envoy"))
    dep = manifests.deployment("router")
    pod = dep["spec"]["template"]["spec"]
    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    assert envoy["args"][:2] == ["--config-path", "/etc/envoy/envoy.yaml"]
    assert {"name": "envoy-config", "mountPath": "/etc/envoy", "readOnly": True} in \
        envoy["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "envoy-config")
    assert volume["configMap"]["name"] == "kvroute-router-envoy"
    health = next(lst for lst in bootstrap_of(manifests)[1].static_resources.listeners
                  if lst.name == "health")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-health"}
    assert {"name": "envoy-health", "containerPort": health.address.socket_address.port_value,
            "protocol": "TCP"} in envoy["ports"]
    # A changed bootstrap rolls the pods.
    assert len(dep["spec"]["template"]["metadata"]["annotations"]["checksum/envoy-config"]) == 64
    svc = manifests.one("Service", "kvroute-router")
    assert {"name": "envoy-http", "port": 8088, "targetPort": "envoy-http", "protocol": "TCP",
            "appProtocol": "http"} in svc["spec"]["ports"]


def test_fail_open_forwards_to_the_backend(render: Any) -> None:
    """FailOpen: ext_proc failures let the request through, and a request without a pick goes
    to router.envoy.failOpenBackend (round robin over its DNS answers)."""
    _, boot = bootstrap_of(render(sets={
        "router.envoy.enabled": True, "router.envoy.failureMode": "FailOpen",
        "router.envoy.requestBodyMode": "BUFFERED", "router.envoy.responseBodyMode": "STREAMED",
        "router.envoy.failOpenBackend": "llama-8b.models.svc:8000"}))
    hcm = unpack_hcm(next(x for x in boot.static_resources.listeners if x.name == "inference"))
    ext_proc = ext_proc_pb2.ExternalProcessor()
    assert hcm.http_filters[1].typed_config.Unpack(ext_proc)
    assert ext_proc.failure_mode_allow is True
    [_, no_pick] = hcm.route_config.virtual_hosts[0].routes
    assert no_pick.route.cluster == "fail_open"
    backend = next(c for c in boot.static_resources.clusters if c.name == "fail_open")
    address = backend.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "llama-8b.models.svc", 8000)


def test_local_replies_are_openai_errors(render: Any) -> None:
    """Envoy's own error replies (pod failed before answering, body too large, no pick) carry
    OpenAI error bodies; the router's immediate responses are left as they are."""
    _, boot = bootstrap_of(render(sets={"router.envoy.enabled": True}))
    inference = next(x for x in boot.static_resources.listeners if x.name == "inference")
    assert inference.per_connection_buffer_limit_bytes.value == 32 * 1024 * 1024
    hcm = unpack_hcm(inference)
    mappers = hcm.local_reply_config.mappers
    assert set(mappers[0].filter.response_flag_filter.flags) == {"UF", "UH", "URX", "UC", "UO"}
    assert [m.filter.status_code_filter.comparison.value.default_value
            for m in mappers[1:]] == [413, 500]
    for mapper in mappers:
        error = mapper.body_format_override.json_format["error"]
        assert set(error) == {"message", "type", "param", "code"}


def test_fail_open_refused_in_full_duplex_mode(render: Any, helm_error: Any) -> None:
    """Envoy 1.40 ignores failure_mode_allow in FULL_DUPLEX_STREAMED mode (tests/envoy
    measured a 500): the chart refuses that combination, saying what to set."""
    with pytest.raises(helm_error, match="requestBodyMode=BUFFERED"):
        render(sets={"router.envoy.enabled": True, "router.envoy.failureMode": "FailOpen"})
