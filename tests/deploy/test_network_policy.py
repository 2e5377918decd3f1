"""The NetworkPolicies (k8s/base/network-policy.yaml and the observability component's), evaluated offline.

A small evaluator follows the NetworkPolicy semantics (a pod selected by no policy of a direction is open in that
direction; policies add up; a connection needs the source's egress and the destination's ingress) over the pods
each overlay renders, so the test asks questions such as "can the lipsync pod open TF Serving's gRPC port".
The traffic the services need is derived from what they are configured to call (a2v-config, the credentials).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from deploy.local import COMPONENTS
from services.runtime.config import parse_address
from tests.deploy.test_manifests import K8S, OVERLAYS, all_containers, env_of, find, of_kind, rendered, workloads

STAGES = [c.name for c in COMPONENTS if c.name != "orchestrator"]
OBSERVABILITY = (K8S / "components" / "observability").is_dir()


@dataclass(frozen=True)
class Peer:
    """A pod (namespace and labels, named container ports) or, with namespace None, an address outside the cluster."""

    name: str
    namespace: str | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ports: dict[str, int] = field(default_factory=dict, hash=False)
    namespace_labels: dict[str, str] = field(default_factory=dict, hash=False)


OUTSIDE = Peer("outside", None)
DNS = Peer(
    "kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53}, {"kubernetes.io/metadata.name": "kube-system"}
)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: dict[str, Any], peer: Peer, namespace: str) -> bool:
    assert "ipBlock" not in rule_peer, "ipBlock peers are not modelled"
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not matches(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != namespace:
        return False
    return matches(rule_peer.get("podSelector", {}), peer.labels)


def port_matches(rule: dict[str, Any], target: Peer, port: int, protocol: str) -> bool:
    if not rule.get("ports"):
        return True
    for item in rule["ports"]:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None or wanted == port or (isinstance(wanted, str) and target.ports.get(wanted) == port):
            return True
        if isinstance(wanted, int) and wanted <= port <= item.get("endPort", wanted):
            return True
    return False


def direction_allows(policies, subject: Peer, other: Peer, target: Peer, port: int, protocol: str, kind: str) -> bool:
    """Whether `subject`'s policies of `kind` (Ingress, Egress) let it talk with `other` (`target` holds the port)."""
    if subject.namespace is None:
        return True  # outside the cluster: not ours to police
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_matches(p, other, subject.namespace) for p in peers):
                continue
            if port_matches(rule, target, port, protocol):
                return True
    return False


def allowed(policies, source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
    return direction_allows(policies, source, destination, destination, port, protocol, "Egress") and direction_allows(
        policies, destination, source, destination, port, protocol, "Ingress"
    )


class Cluster:
    """The pods of one rendered overlay, and its policies."""

    def __init__(self, overlay: str):
        objects = rendered(overlay)
        self.objects = objects
        self.namespace = find(objects, "ConfigMap", "a2v-config")["metadata"]["namespace"]
        namespace_labels = {"kubernetes.io/metadata.name": self.namespace}
        self.policies = of_kind(objects, "NetworkPolicy")
        self.pods: dict[str, Peer] = {}
        for _obj, spec, labels in workloads(objects):
            ports = {
                p["name"]: p["containerPort"] for c in all_containers(spec) for p in c.get("ports", []) if "name" in p
            }
            name = labels["app.kubernetes.io/name"]
            self.pods[name] = Peer(name, self.namespace, dict(labels), ports, namespace_labels)
        self.config = find(objects, "ConfigMap", "a2v-config")["data"]

    def resolve(self, address: str) -> tuple[Peer, int]:
        """The pod behind a Service address `host:port` (or dns:///host:port) and the container port it reaches."""
        host, port = parse_address(address.removeprefix("dns:///"))
        service = find(self.objects, "Service", host.split(".")[0])
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
        (pod,) = [p for p in self.pods.values() if matches({"matchLabels": service["spec"]["selector"]}, p.labels)]
        target = service_port.get("targetPort", port)
        return pod, pod.ports[target] if isinstance(target, str) else target

    def allowed(self, source: str | Peer, destination: str | Peer, port: int, protocol: str = "TCP") -> bool:
        source = self.pods[source] if isinstance(source, str) else source
        destination = self.pods[destination] if isinstance(destination, str) else destination
        return allowed(self.policies, source, destination, port, protocol)


@pytest.fixture(scope="module", params=OVERLAYS)
def cluster(request) -> Cluster:
    return Cluster(request.param)


def test_every_pod_is_denied_by_default_both_ways(cluster):
    (deny,) = [p for p in cluster.policies if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    stranger = Peer("stranger", cluster.namespace, {"app.kubernetes.io/name": "stranger"}, {"http": 8080})
    for pod in cluster.pods.values():
        assert not cluster.allowed(stranger, pod, 8080) and not cluster.allowed(pod, stranger, 8080), pod.name


def test_every_pod_can_look_names_up_and_nothing_else_outside(cluster):
    for pod in cluster.pods.values():
        assert cluster.allowed(pod, DNS, 53, "UDP") and cluster.allowed(pod, DNS, 53, "TCP"), pod.name
        assert not cluster.allowed(pod, OUTSIDE, 80), pod.name
        assert not cluster.allowed(pod, Peer("elsewhere", "other", {"k8s-app": "kube-dns"}), 53, "UDP"), pod.name


def test_only_the_orchestrator_takes_calls_from_outside_the_namespace(cluster):
    port = parse_address(cluster.config["A2V_ORCHESTRATOR_ADDR"])[1]
    assert cluster.allowed(OUTSIDE, "orchestrator", port)
    outside_pod = Peer("client", "other", {"app.kubernetes.io/name": "orchestrator"}, {})
    assert cluster.allowed(outside_pod, "orchestrator", port)
    for pod in cluster.pods.values():
        for port in pod.ports.values():
            if pod.name == "orchestrator" and port == parse_address(cluster.config["A2V_ORCHESTRATOR_ADDR"])[1]:
                continue
            if pod.name == "prometheus-adapter":
                continue  # the API server's aggregation layer calls it (below)
            assert not cluster.allowed(OUTSIDE, pod, port), (pod.name, port)
            assert not cluster.allowed(outside_pod, pod, port), (pod.name, port)


def test_the_orchestrator_reaches_every_stage_it_is_configured_to_call_and_the_kubernetes_api(cluster):
    for stage in STAGES:
        pod, port = cluster.resolve(cluster.config[f"A2V_{stage.upper()}_ADDR"])
        assert pod.name == stage and cluster.allowed("orchestrator", pod, port), stage
    assert cluster.config["A2V_TRAINER"] == "kubernetes"
    assert cluster.allowed("orchestrator", OUTSIDE, 443) and cluster.allowed("orchestrator", OUTSIDE, 6443)


def test_stages_take_calls_from_the_orchestrator_only_and_call_no_other_stage(cluster):
    for stage in STAGES:
        pod, port = cluster.resolve(cluster.config[f"A2V_{stage.upper()}_ADDR"])
        callers = {name for name in cluster.pods if cluster.allowed(name, pod, port)}
        assert callers == {"orchestrator"}, stage
        for other in STAGES + ["orchestrator"]:
            if other != stage:
                other_port = cluster.resolve(cluster.config[f"A2V_{other.upper()}_ADDR"])[1]
                assert not cluster.allowed(stage, other, other_port), (stage, other)
        assert not cluster.allowed(stage, OUTSIDE, 443), stage


def test_every_pod_holding_the_store_credentials_reaches_the_store_and_no_other_does(cluster):
    store, port = cluster.resolve(cluster.config["A2V_S3_ENDPOINT"])
    assert store.name == "minio"
    users = set()
    for _obj, spec, labels in workloads(cluster.objects):
        for container in all_containers(spec):
            secrets = {r["secretRef"]["name"] for r in container.get("envFrom", []) if "secretRef" in r}
            secrets |= {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in env_of(container).values()
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            if any(name == "a2v-s3" or name.startswith("a2v-s3-") for name in secrets):  # shared or its own user
                users.add(labels["app.kubernetes.io/name"])
    users.discard("minio")
    assert {"orchestrator", "trainer", "tfserving", *STAGES} <= users
    for pod in cluster.pods.values():
        if pod.name != "minio":
            assert cluster.allowed(pod, store, port) == (pod.name in users), pod.name
    assert not any(cluster.allowed(pod, store, 9001) for pod in cluster.pods.values())
    assert not any(cluster.allowed("minio", pod, p) for pod in cluster.pods.values() for p in pod.ports.values())


def test_tf_serving_is_called_by_the_lipsync_stage_only(cluster):
    pod, port = cluster.resolve(cluster.config["A2V_TFSERVING_ADDR"])
    assert pod.name == "tfserving"
    assert {name for name in cluster.pods if cluster.allowed(name, pod, port)} == {"lipsync"}


def test_the_trainer_is_called_by_no_one_and_calls_only_the_store(cluster):
    trainer = cluster.pods["trainer"]
    for pod in cluster.pods.values():
        for port in pod.ports.values():
            if pod.name not in ("minio", "otel-collector"):
                assert not cluster.allowed(trainer, pod, port), pod.name
    assert not any(cluster.allowed(pod, trainer, 50058) for pod in cluster.pods.values())


@pytest.mark.skipif(not OBSERVABILITY, reason="no observability component")
def test_prometheus_scrapes_every_metrics_port_and_nothing_else_does(cluster):
    scraped = [pod for pod in cluster.pods.values() if "metrics" in pod.ports] + [cluster.pods["tfserving"]]
    for pod in scraped:
        port = pod.ports["metrics"] if "metrics" in pod.ports else pod.ports["http"]
        assert cluster.allowed("prometheus", pod, port), pod.name
        others = {name for name in cluster.pods if name != "prometheus" and cluster.allowed(name, pod, port)}
        assert others == set(), (pod.name, others)
    assert cluster.allowed("prometheus", OUTSIDE, 443)  # pod discovery through the Kubernetes API


@pytest.mark.skipif(not OBSERVABILITY, reason="no observability component")
def test_the_custom_metrics_path_is_open_from_the_api_server_through_the_adapter_to_prometheus(cluster):
    adapter = cluster.pods["prometheus-adapter"]
    assert cluster.allowed(OUTSIDE, adapter, adapter.ports["https"])
    url = next(
        a
        for c in find(cluster.objects, "Deployment", "prometheus-adapter")["spec"]["template"]["spec"]["containers"]
        for a in c.get("args", [])
        if a.startswith("--prometheus-url=")
    )
    prometheus, port = cluster.resolve(url.split("//", 1)[1].rstrip("/"))
    assert {name for name in cluster.pods if cluster.allowed(name, prometheus, port)} == {"prometheus-adapter"}


@pytest.mark.skipif(not OBSERVABILITY, reason="no observability component")
def test_every_service_sending_traces_reaches_the_collector(cluster):
    collector, port = cluster.resolve(cluster.config["A2V_OTLP_ENDPOINT"])
    for name in ["orchestrator", "tfserving", "trainer", *STAGES]:
        assert cluster.allowed(name, collector, port), name
    assert not cluster.allowed(OUTSIDE, collector, port)
    assert not any(cluster.allowed(collector, pod, p) for pod in cluster.pods.values() for p in pod.ports.values())


def test_policies_are_in_the_base_and_listed():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "network-policy.yaml" in base["resources"]


def test_reflection_is_off_in_production_and_on_in_development():
    assert find(rendered("gpu"), "ConfigMap", "a2v-config")["data"]["A2V_REFLECTION"] == "false"
    assert "A2V_REFLECTION" not in find(rendered("dev"), "ConfigMap", "a2v-config")["data"]
