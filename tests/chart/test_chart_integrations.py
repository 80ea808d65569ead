"""What kubernetes-validate cannot check (CRD-based kinds) checked structurally: ServiceMonitor,
PrometheusRule (every metric it names is one the router exports), the Grafana dashboard, the
GIE InferencePools for existing Gateways, the example pool and policy (validated with kvroute's
own API models). And the commands the chart runs parse with the real `kvroute` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from kvroute_api.manifests import parse_documents, validate_document
from kvroute_cli.main import build_parser
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.router_metrics import RouterMetrics
from prometheus_client import CollectorRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                              "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created")}


def exported_series() -> set[str]:
    """Every series name the router's metric classes can expose."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    BudgetMetrics(registry)
    KVEventMetrics(registry)
    return {family.name + suffix for family in registry.collect()
            for suffix in SUFFIXES.get(family.type, ("",))}


GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def parse_promql(expr: str) -> Any:
    """Parse with a real PromQL parser (Prometheus' grammar); ValueError when invalid. Grafana's
    interval variables become durations and template variables (``$policy``, inside label
    values) plain text first, as Grafana substitutes them before querying."""
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(re.sub(r"\$\{?(\w+)\}?", r"\1", expr))


def test_the_promql_check_rejects_broken_expressions() -> None:
    parse_promql('sum by (policy) (rate(kvroute_requests_total{policy=~"$policy"}'
                 "[$__rate_interval]))")
    for broken in ("sum(rate(x[5m])", "rate(x[5m]))(", "sum by (policy (x)", "rate(x[5q])",
                   "x > > 1"):
        with pytest.raises(ValueError):
            parse_promql(broken)


def kvroute_names(text: str) -> set[str]:
    return set(re.findall(r"\bkvroute_[a-z0-9_]+", text))


def test_service_monitor(render: Any, ci_values: Any) -> None:
    m = render(ci_values("monitoring"))
    sm = m.one("ServiceMonitor")
    svc = m.one("Service", "kvroute-router")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["kvroute-system"]}
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_prometheus_rule(render: Any, ci_values: Any) -> None:
    rule = render(ci_values("monitoring")).one("PrometheusRule")
    [group] = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {"KvrouteNoReadyEndpoints", "KvrouteBudgetExhausted",
                           "KvrouteKVEventHashMismatch", "KvrouteHighShedRate"}
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert "{{ $labels." in alert["annotations"]["summary"], name
        parse_promql(alert["expr"])
    assert alerts["KvrouteHighShedRate"]["labels"]["severity"] == "critical"
    assert alerts["KvrouteHighShedRate"]["expr"].rstrip().endswith("> 0.1")


def test_alerts_can_be_switched_off(render: Any) -> None:
    rule = render(sets={"monitoring.prometheusRule.enabled": True,
                        "monitoring.prometheusRule.budgetExhausted.enabled": False}
                  ).one("PrometheusRule")
    assert "KvrouteBudgetExhausted" not in {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}


def test_rule_and_dashboard_use_exported_metrics(render: Any, ci_values: Any) -> None:
    m = render(ci_values("monitoring"))
    rule_text = yaml.safe_dump(m.one("PrometheusRule"))
    dashboard_text = m.one("ConfigMap", "kvroute-dashboard")["data"]["kvroute.json"]
    used = kvroute_names(rule_text) | kvroute_names(dashboard_text)
    exported = exported_series()
    assert used, "no kvroute_ metric referenced"
    assert used <= exported, f"not exported by the router: {sorted(used - exported)}"
    documented = kvroute_names((REPO_ROOT / "docs" / "helm.md").read_text(encoding="utf-8"))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families <= documented, f"not listed in docs/helm.md: {sorted(families - documented)}"


def test_dashboard(render: Any, ci_values: Any) -> None:
    cm = render(ci_values("monitoring")).one("ConfigMap", "kvroute-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "kvroute"}
    dashboard = json.loads(cm["data"]["kvroute.json"])
    assert dashboard["uid"] == "kvroute-overview"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            parse_promql(target["expr"])


def test_gateway_inference_pools(render: Any, ci_values: Any) -> None:
    m = render(ci_values("envoy"))
    pools = {p["metadata"]["name"]: p for p in m.kind("InferencePool")}
    assert set(pools) == {"llama-8b-gie", "external-gie"}
    svc = m.one("Service", "kvroute-router")
    ext_proc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert ext_proc["appProtocol"] == "kubernetes.io/h2c"
    for pool in pools.values():
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        assert pool["metadata"]["namespace"] == svc["metadata"]["namespace"], (
            "GIE resolves endpointPickerRef in the pool's own namespace")
        ref = pool["spec"]["endpointPickerRef"]
        assert (ref["kind"], ref["name"], ref["port"]) == (
            "Service", "kvroute-router", {"number": ext_proc["port"]})
    first, second = pools["llama-8b-gie"]["spec"], pools["external-gie"]["spec"]
    assert first["selector"] == {"matchLabels": {"kvroute.io/pool": "llama-8b"}}
    assert first["targetPorts"] == [{"number": 8000}]
    assert first["endpointPickerRef"]["failureMode"] == "FailClose"
    assert second["selector"] == {"matchLabels": {"app": "vllm"}}
    assert second["targetPorts"] == [{"number": 8001}]
    assert second["endpointPickerRef"]["failureMode"] == "FailOpen"


def test_managed_pool_label_matches_operator() -> None:
    """The GIE selector uses the label the operator puts on a Managed pool's pods."""
    from kvroute_operator.builders import POOL_LABEL

    template = (REPO_ROOT / "charts/kvroute/templates/gateway/inferencepools.yaml").read_text(
        encoding="utf-8")
    assert f"{POOL_LABEL}: {{{{ $p.pool }}}}" in template


def test_examples_are_off_by_default(defaults: Any) -> None:
    assert not [d for d in defaults if d["apiVersion"].startswith("kvroute.io/")]


def test_examples_are_valid_kvroute_objects(render: Any, ci_values: Any) -> None:
    m = render(ci_values("monitoring"))
    ours = [d for d in m if d["apiVersion"] == "kvroute.io/v1alpha1"]
    assert {d["kind"] for d in ours} == {"InferencePool", "RoutePolicy"}
    text = yaml.safe_dump_all(ours)
    for doc in parse_documents(text, "chart examples"):
        obj, problems = validate_document(doc)
        assert not problems, [p.render() for p in problems]
        assert obj is not None and obj.metadata.namespace == "inference"


@pytest.mark.parametrize("component", ["operator", "router"])
def test_commands_parse_with_the_real_cli(helm: Any, ci_file: Path, component: str) -> None:
    """The args the chart passes are accepted by `kvroute <component>` as it is now."""
    manifests = helm.template(ci_file)
    deployments = [d for d in manifests.kind("Deployment")
                   if d["metadata"]["name"] == f"kvroute-{component}"]
    for dep in deployments:
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["kvroute"]
        try:
            args = build_parser().parse_args(container["args"])
        except SystemExit as exc:  # argparse reports on stderr and exits
            pytest.fail(f"kvroute rejects {container['args']}: exit {exc.code}")
        assert args.command == component
