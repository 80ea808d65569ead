"""The chart implements the trust model (docs/security.md): the router's gRPC ports are closed
to other pods by default, a caller-token Secret turns on authentication, trusted hops are
opt-in."""

from __future__ import annotations

from typing import Any


def _router_args(manifests: Any) -> list[str]:
    [container] = [c for c in manifests.deployment("router")["spec"]["template"]["spec"]
                   ["containers"] if c["name"] == "router"]
    args: list[str] = container["args"]
    return args


def test_the_grpc_ports_are_closed_to_other_pods_by_default(defaults: Any) -> None:
    policy = defaults.one("NetworkPolicy", "kvroute-router")
    selector = defaults.deployment("router")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert open_ports == {8080, 9090}  # proxy and metrics; not 9002 (ext_proc), 9003 (Pick)
    assert all("from" not in rule for rule in policy["spec"]["ingress"])
    args = _router_args(defaults)
    assert not any(a.startswith(("--trusted-proxy-cidr", "--ext-proc-trust-gateway-headers",
                                 "--grpc-tokens-dir")) for a in args)


def test_listed_peers_reach_the_grpc_ports_and_tokens_are_mounted(render: Any) -> None:
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gw"}}}
    m = render(sets={"router.networkPolicy.grpcFrom": [gateway],
                     "router.grpcAuth.secretName": "kvroute-callers",
                     "router.grpcAuth.extProc": True,
                     "router.trust.proxyCIDRs": ["10.1.0.0/16"],
                     "router.trust.extProcGatewayHeaders": True})
    rules = m.one("NetworkPolicy", "kvroute-router")["spec"]["ingress"]
    [grpc_rule] = [r for r in rules if "from" in r]
    assert grpc_rule["from"] == [gateway]
    assert {p["port"] for p in grpc_rule["ports"]} == {9002, 9003}
    args = _router_args(m)
    for flag in ("--trusted-proxy-cidr=10.1.0.0/16", "--ext-proc-trust-gateway-headers",
                 "--grpc-tokens-dir=/etc/kvroute/grpc-tokens", "--ext-proc-require-token"):
        assert flag in args
    pod = m.deployment("router")["spec"]["template"]["spec"]
    assert {"name": "grpc-tokens", "secret": {"secretName": "kvroute-callers"}} in pod["volumes"]


def test_the_network_policy_can_be_switched_off(render: Any) -> None:
    assert not render(sets={"router.networkPolicy.enabled": False}).kind("NetworkPolicy")
