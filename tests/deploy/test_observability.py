"""The observability component (k8s/components/observability), TF Serving's metrics and the Grafana dashboard."""

import json
import re

import pytest
import yaml
from prometheus_client import REGISTRY

import orchestrator.metrics  # noqa: F401 (registers the orchestrator's metrics)
import services.runtime.telemetry  # noqa: F401 (registers every service's metrics)
from deploy.local import COMPONENTS
from tests.deploy.kustomize import render
from tests.deploy.test_manifests import K8S, METRICS_PORT, OVERLAYS, find, of_kind, overlay_namespace, rendered

DASHBOARD = K8S.parent / "deploy" / "grafana" / "audio2video.json"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "count", "le", "without", "on"}


def annotations(deployment) -> dict:
    return deployment["spec"]["template"]["metadata"].get("annotations", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_pod_is_scraped_on_its_metrics_port(overlay):
    objects = rendered(overlay)
    for component in COMPONENTS:
        wanted = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/path": "/metrics",
        }
        assert annotations(find(objects, "Deployment", component.name)) == wanted, component.name
    tfserving = annotations(find(objects, "Deployment", "tfserving"))
    assert (
        tfserving["prometheus.io/path"] == "/monitoring/prometheus/metrics"
        and tfserving["prometheus.io/port"] == "8501"
    )
    config = yaml.safe_load(find(objects, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"own_namespace": True}}]
    targets = {rule.get("target_label") for rule in job["relabel_configs"]}
    assert {"__address__", "__metrics_path__", "namespace", "pod"} <= targets  # what the adapter's rule maps


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_send_traces_to_the_collector(overlay):
    objects = rendered(overlay)
    endpoint = find(objects, "ConfigMap", "a2v-config")["data"]["A2V_OTLP_ENDPOINT"]
    host, port = endpoint.rsplit(":", 1)
    service = find(objects, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    collector = yaml.safe_load(find(objects, "ConfigMap", "otel-collector-config")["data"]["config.yaml"])
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{port}")
    assert collector["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_texture_hpas_custom_metric_is_served_by_the_adapter_in_the_overlays_namespace(overlay):
    objects = rendered(overlay)
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(find(objects, "ConfigMap", "prometheus-adapter-config")["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric]
    assert (
        rule["seriesQuery"].startswith("grpc_server_in_flight{") and 'grpc_method="Synthesize"' in rule["seriesQuery"]
    )
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    api = find(objects, "APIService", "v1beta1.custom.metrics.k8s.io")
    assert api["spec"]["service"] == {
        "name": "prometheus-adapter",
        "namespace": overlay_namespace(overlay),
        "port": 443,
    }
    adapter = find(objects, "Deployment", "prometheus-adapter")["spec"]["template"]["spec"]["containers"][0]
    assert "--prometheus-url=http://prometheus:9090/" in adapter["args"]


def test_the_component_is_a_kustomize_component_used_by_every_overlay():
    component = yaml.safe_load((K8S / "components" / "observability" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert "../../components/observability" in kustomization["components"]
    assert not of_kind(render(K8S / "base"), "APIService")  # the base alone has none of it


def exported_metric_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name} | {sample.name for sample in family.samples}
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_the_dashboard_queries_metrics_the_services_export():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("jobs", "real-time factor", "latency", "texture", "errors", "queue"):
        assert topic in titles, topic
    exported = exported_metric_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", target["expr"])
            for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
                if name in PROMQL_WORDS or name.startswith(":tensorflow:") or name.replace(".", "").isdigit():
                    continue
                if name.startswith(("grpc_method", "grpc_code", "stage", "state", "pod", "direction", "model_name")):
                    continue
                assert name in exported, (panel["title"], name)
