"""mTLS in the deployment files, checked offline: k8s/components/secure (cert-manager) and deploy/compose.tls.yaml.

Every overlay that lists the component is rendered as test_manifests.py renders them; its Kubernetes objects are
validated there, and cert-manager's (not in kubernetes-validate) here against a schema of the fields we use. The
compose override is merged onto deploy/compose.yaml as compose merges files, and its certificate script runs with the
local openssl; the health check that the exec probes and compose run is tried against a real TLS server.
"""

from __future__ import annotations

import ast
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from deploy import catalog, healthcheck
from deploy.local import COMPONENTS
from deploy.pki import make_local_pki
from orchestrator.trainers import TRAINER_SERVICE
from services.runtime.clients import create_channel
from services.runtime.config import AuthConfig, ServerConfig, TlsConfig, parse_address
from services.runtime.security import (
    SCOPE_ADMIN,
    SCOPE_JOBS,
    Caller,
    Callers,
    ClientSecurity,
    parse_callers,
    required_scope,
)
from services.runtime.server import create_server
from tests.conftest import REPO
from tests.deploy.test_manifests import (
    COMPOSE,
    K8S,
    OVERLAYS,
    all_containers,
    compose,
    compose_env,
    env_of,
    find,
    of_kind,
    overlay_namespace,
    rendered,
    selects,
    workloads,
)
from tests.runtime.test_server import RETIMING, ScriptedRetiming
from tests.runtime.test_server import start as start_retiming

COMPONENT = "../../components/secure"
SECURE = [
    o
    for o in OVERLAYS
    if COMPONENT in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text()).get("components", [])
]
COMPOSE_TLS = REPO / "deploy" / "compose.tls.yaml"
PKI_SCRIPT = REPO / "deploy" / "compose-pki.sh"
TLS_FILES = {"A2V_TLS_CERT": "tls.crt", "A2V_TLS_KEY": "tls.key", "A2V_TLS_CA": "ca.crt"}
"""The A2V_TLS_ file settings and the file of a cert-manager Secret (or of the compose pki volume) each names."""
READY = "audio2video.test.v1.Ready"
ORCHESTRATOR = "orchestrator"

# -- cert-manager's objects: a schema of the fields used (strict, like the Kubernetes ones) ---------------------

_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"}
_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]
CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string"},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "uris": {"type": "array", "items": {"type": "string"}},
                "isCA": {"type": "boolean"},
                "usages": {"type": "array", "items": {"enum": _USAGES}, "uniqueItems": True},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    },
                },
                "issuerRef": _ISSUER_REF,
            },
        },
    },
}
ISSUER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,  # exactly one kind of issuer
            "properties": {
                "selfSigned": {"type": "object", "additionalProperties": False, "properties": {}},
                "ca": {
                    "type": "object",
                    "required": ["secretName"],
                    "additionalProperties": False,
                    "properties": {"secretName": {"type": "string"}},
                },
            },
        },
    },
}


def grpc_deployments(objects):
    """(component, its Deployment, its main container) of every gRPC service of ours."""
    for component in COMPONENTS:
        deployment = find(objects, "Deployment", component.name)
        yield component, deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def tls_mount(deployment, container) -> tuple[str, str]:
    """(Secret name, mount path) of the certificate the container reads its A2V_TLS_ files from."""
    spec = deployment["spec"]["template"]["spec"]
    folder = os.path.dirname(env_of(container)["A2V_TLS_CERT"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount.get("readOnly") is True, deployment["metadata"]["name"]
    return volume["secret"]["secretName"], folder


def certificate_for(objects, secret: str) -> dict[str, Any]:
    (certificate,) = [c for c in of_kind(objects, "Certificate") if c["spec"]["secretName"] == secret]
    return certificate


def test_an_overlay_uses_the_secure_component():
    assert SECURE, "no overlay lists k8s/components/secure"
    component = yaml.safe_load((K8S / "components" / "secure" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert not of_kind(rendered("dev"), "Certificate")  # development stays plaintext


@pytest.mark.parametrize("overlay", SECURE)
def test_cert_manager_objects_validate_against_their_schema(overlay):
    objects = [o for o in rendered(overlay) if o["apiVersion"].startswith("cert-manager.io/")]
    assert {o["kind"] for o in objects} == {"Certificate", "Issuer"}
    for obj in objects:
        schema = CERTIFICATE_SCHEMA if obj["kind"] == "Certificate" else ISSUER_SCHEMA
        jsonschema.validate(obj, schema)
        assert obj["metadata"]["namespace"] == overlay_namespace(overlay)


@pytest.mark.parametrize("overlay", SECURE)
def test_every_grpc_deployment_mounts_its_certificate_and_takes_mtls(overlay):
    objects = rendered(overlay)
    assert find(objects, "ConfigMap", "a2v-config")["data"]["A2V_REFLECTION"] == "false"
    secrets = set()
    for component, deployment, container in grpc_deployments(objects):
        env = env_of(container)
        assert env["A2V_TLS"]["value"] == "1" and env["A2V_TLS_CLIENT_AUTH"]["value"] == "1", component.name
        secret, folder = tls_mount(deployment, container)
        for variable, file in TLS_FILES.items():
            assert env[variable]["value"] == f"{folder}/{file}", (component.name, variable)
        assert "A2V_TLS_SERVER_NAME" not in env, "it would replace the name of every service the pod dials"
        certificate = certificate_for(objects, secret)
        assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"]), component.name
        assert not certificate["spec"].get("isCA")
        secrets.add(secret)
    assert len(secrets) == len(COMPONENTS), "one certificate per service"


@pytest.mark.parametrize("overlay", SECURE)
def test_every_certificate_names_its_services_and_the_addresses_they_are_dialled_at(overlay):
    objects = rendered(overlay)
    namespace = overlay_namespace(overlay)
    config = find(objects, "ConfigMap", "a2v-config")["data"]
    for component, deployment, container in grpc_deployments(objects):
        names = set(certificate_for(objects, tls_mount(deployment, container)[0])["spec"]["dnsNames"])
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        services = [
            s["metadata"]["name"] for s in of_kind(objects, "Service") if selects(s["spec"]["selector"], labels)
        ]
        assert services, component.name
        for service in services:
            wanted = {service, f"{service}.{namespace}", f"{service}.{namespace}.svc"}
            assert wanted | {f"{service}.{namespace}.svc.cluster.local"} <= names, component.name
        host, _ = parse_address(config[f"A2V_{component.name.upper()}_ADDR"].removeprefix("dns:///"))
        assert host in names, f"{component.name} is dialled as {host}, which its certificate does not name"


@pytest.mark.parametrize("overlay", SECURE)
def test_no_probe_asks_a_tls_port_in_plaintext(overlay):
    objects = rendered(overlay)
    checked = 0
    for obj, spec, _ in workloads(objects):
        for container in all_containers(spec):
            env = env_of(container)
            if env.get("A2V_TLS", {}).get("value") != "1":
                continue
            port = parse_address(env["A2V_LISTEN"]["value"])[1]
            tls_ports = {port} | {p["name"] for p in container.get("ports", []) if p["containerPort"] == port}
            names = set(certificate_for(objects, tls_mount(obj, container)[0])["spec"]["dnsNames"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe, f"{obj['metadata']['name']}: no {kind}"
                for plain in ("grpc", "tcpSocket", "httpGet"):
                    assert probe.get(plain, {}).get("port") not in tls_ports, f"{obj['metadata']['name']}: {kind}"
                # The health check with the pod's own files, checking the server's name against its certificate.
                command = probe["exec"]["command"]
                assert command[0] == "env" and command[2:5] == ["python", "-m", "deploy.healthcheck"], command
                name = command[1].removeprefix("A2V_TLS_SERVER_NAME=")
                assert command[1].startswith("A2V_TLS_SERVER_NAME=") and name in names, command
                assert probe["timeoutSeconds"] >= 5, "a Python process per probe"
                checked += 1
    assert checked == 3 * len(COMPONENTS)


@pytest.mark.parametrize("overlay", SECURE)
def test_every_certificate_is_issued_by_an_issuer_of_the_render_down_to_a_self_signed_root(overlay):
    objects = rendered(overlay)
    issuers = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("Issuer", "ClusterIssuer")}
    certificates = of_kind(objects, "Certificate")
    by_secret = {c["spec"]["secretName"]: c for c in certificates}
    for certificate in certificates:
        seen = []
        while True:
            ref = certificate["spec"]["issuerRef"]
            issuer = issuers.get((ref.get("kind", "Issuer"), ref["name"]))
            assert issuer is not None, f"{certificate['metadata']['name']}: issuer {ref} is not in the render"
            if "selfSigned" in issuer["spec"]:
                break
            # A CA issuer signs with the key of a CA Certificate of the render, which has an issuer of its own.
            certificate = by_secret[issuer["spec"]["ca"]["secretName"]]
            assert certificate["spec"]["isCA"] is True
            assert certificate["metadata"]["name"] not in seen, "issuer loop"
            seen.append(certificate["metadata"]["name"])


@pytest.mark.parametrize("overlay", SECURE)
def test_the_exec_probe_passes_against_a_tls_server_with_a_certificate_naming_only_the_service(
    overlay, tmp_path, monkeypatch
):
    """As the kubelet runs it: the probe's command, the pod's env, a Secret's files that name the Service only."""
    objects = rendered(overlay)
    component, deployment, container = next(grpc_deployments(objects))
    command = container["readinessProbe"]["exec"]["command"]
    name = command[1].removeprefix("A2V_TLS_SERVER_NAME=")
    pki = make_local_pki(tmp_path, common_name=name, hosts=(name,))
    files = {"A2V_TLS_CERT": pki.cert_file, "A2V_TLS_KEY": pki.key_file, "A2V_TLS_CA": pki.ca_file}
    tls = TlsConfig(True, str(pki.cert_file), str(pki.key_file), str(pki.ca_file), client_auth=True)
    server, port = create_server(ServerConfig(service="test", tls=tls), [])
    server.start()
    try:
        server.set_serving(command[-1])
        env = {k: v["value"] for k, v in env_of(container).items() if "value" in v}
        env.update({k: str(v) for k, v in files.items()}, A2V_LISTEN=f"0.0.0.0:{port}")
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        # Without the server name the certificate does not match 127.0.0.1; without A2V_TLS the server refuses.
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        assert healthcheck.main([command[-1], "--timeout", "2"]) == 1
        monkeypatch.setenv("A2V_TLS_SERVER_NAME", name)
        assert healthcheck.main([command[-1], "--timeout", "2"]) == 0
        monkeypatch.setenv("A2V_TLS", "0")
        assert healthcheck.main([command[-1], "--timeout", "2"]) == 1
    finally:
        server.stop(0).wait()


# -- who may call what: the callers file (A2V_AUTH_TOKENS_FILE) -----------------------------------------------


def dialled_by_the_orchestrator(config: dict[str, str]) -> list[str]:
    """The gRPC services the orchestrator calls under `config` (a2v-config or compose's environment)."""
    services = [c.grpc_service for c in COMPONENTS if c.name != ORCHESTRATOR]
    if config.get("A2V_TRAINER") == "grpc":  # docker compose: the trainer service; Kubernetes: a Job, no gRPC
        services.append(TRAINER_SERVICE)
    return services


def check_least_scopes(callers: Callers, caller_of: dict[str, Caller], client: str, config: dict[str, str]) -> None:
    """The client certificate holds `jobs` only, the orchestrator each scope it dials with, the stages none.

    `caller_of` maps each service name (and `client`) to the caller its certificate is.
    """
    a2v = caller_of[client]
    assert a2v.allows(SCOPE_JOBS) and SCOPE_ADMIN not in a2v.scopes, a2v
    assert not any(a2v.allows(required_scope(f"/{c.grpc_service}/Any")) for c in COMPONENTS if c.name != ORCHESTRATOR)
    orchestrator = caller_of[ORCHESTRATOR]
    for service in dialled_by_the_orchestrator(config):
        assert orchestrator.allows(required_scope(f"/{service}/Any")), (service, orchestrator)
    assert SCOPE_ADMIN not in orchestrator.scopes and SCOPE_JOBS not in orchestrator.scopes, orchestrator
    for name, caller in caller_of.items():
        if name not in (client, ORCHESTRATOR):
            assert caller.scopes == frozenset(), f"{name}: no stage calls another of ours"
    named = {c.name for c in (*callers.by_identity.values(), *callers.by_token.values())}
    assert named == {c.name for c in caller_of.values()}, "a caller of no certificate of the deployment"
    assert not callers.by_token, "certificates only: a token here would be a secret in a ConfigMap or the repository"


def certificate_identities(certificate: dict[str, Any]) -> set[str]:
    """What a cert-manager Certificate's certificate will name: its CN, DNS names and URIs (the server's view)."""
    spec = certificate["spec"]
    return {*spec.get("dnsNames", ()), *spec.get("uris", ()), *([spec["commonName"]] if "commonName" in spec else [])}


def mounted_callers_file(objects, deployment, container) -> str:
    """The text of the callers file the container's A2V_AUTH_TOKENS_FILE names, from the mounted ConfigMap or Secret."""
    path = env_of(container)["A2V_AUTH_TOKENS_FILE"]["value"]
    folder, file = os.path.split(path)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert mount.get("readOnly") is True and "subPath" not in mount, "read-only, and updated when it changes"
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    if "configMap" in volume:
        return find(objects, "ConfigMap", volume["configMap"]["name"])["data"][file]
    raise AssertionError(f"{deployment['metadata']['name']}: the callers file is no mounted ConfigMap: {volume}")


def test_no_stage_holds_a_client_of_another_of_our_services():
    """Why the stages' certificates get no scope: a stage's code imports no gRPC stubs but its own service's.

    (Lipsync's stubs of TF Serving are not ours; the stages' shared library, services/runtime, dials only what its
    caller passes.)
    """
    for component in COMPONENTS:
        if component.name == ORCHESTRATOR:
            continue
        for path in (REPO / "services" / component.name).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("audio2video."):
                    package = node.module.split(".")[1]
                    stubs = [a.name for a in node.names if a.name.endswith("_pb2_grpc")]
                    assert not stubs or package == component.name, f"{path}: {node.module} {stubs}"


@pytest.mark.parametrize("overlay", SECURE)
def test_every_grpc_deployment_reads_one_mounted_callers_file(overlay):
    objects = rendered(overlay)
    texts = {mounted_callers_file(objects, d, c) for _, d, c in grpc_deployments(objects)}
    assert len(texts) == 1, "every server knows the same callers"
    parse_callers(texts.pop())


@pytest.mark.parametrize("overlay", SECURE)
def test_the_callers_file_names_the_certificates_of_the_render_with_least_scopes(overlay):
    objects = rendered(overlay)
    _, deployment, container = next(grpc_deployments(objects))
    callers = parse_callers(mounted_callers_file(objects, deployment, container))
    certificates = {c["metadata"]["name"]: certificate_identities(c) for c in of_kind(objects, "Certificate")}
    for identity in callers.by_identity:
        holders = [name for name, identities in certificates.items() if identity in identities]
        # One holder: an identity in two certificates would make both the same caller.
        assert len(holders) == 1, f"{identity!r} is named by the certificates {holders}"
    caller_of: dict[str, Caller] = {}
    for component, deployment, container in grpc_deployments(objects):
        certificate = certificate_for(objects, tls_mount(deployment, container)[0])
        (caller,) = {callers.by_identity[i] for i in certificate_identities(certificate) if i in callers.by_identity}
        caller_of[component.name] = caller
    client = "a2v-tls-client"
    (caller_of[client],) = {callers.by_identity[i] for i in certificates[client] if i in callers.by_identity}
    check_least_scopes(callers, caller_of, client, find(objects, "ConfigMap", "a2v-config")["data"])


# -- docker compose with TLS ---------------------------------------------------------------------------------


def _mount_target(entry: str | dict[str, Any]) -> str:
    return entry["target"] if isinstance(entry, dict) else entry.split(":")[1]


def merge_compose(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`docker compose -f base -f override` for the fields these files use (the compose spec's merge rules)."""

    def merge(a: Any, b: Any, key: str = "") -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            out = copy.deepcopy(a)
            for k, v in b.items():
                out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
            return out
        if key == "volumes" and isinstance(a, list) and isinstance(b, list):  # merged by mount target
            targets = {_mount_target(e): e for e in a}
            targets.update({_mount_target(e): e for e in b})
            return list(targets.values())
        return copy.deepcopy(b)  # command, entrypoint, healthcheck.test and scalars are replaced

    return merge(base, override)


def compose_tls() -> dict[str, Any]:
    return merge_compose(compose(), yaml.safe_load(COMPOSE_TLS.read_text()))


def test_compose_tls_override_names_only_existing_services_and_volumes():
    override = yaml.safe_load(COMPOSE_TLS.read_text())
    assert set(override["services"]) - {"pki"} <= set(compose()["services"]), "an override may not add half a service"
    merged = compose_tls()
    for name, service in merged["services"].items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in merged["services"], f"{name} depends on unknown {target}"
            assert condition["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
        for entry in service.get("volumes", []):
            source = entry["source"] if isinstance(entry, dict) else entry.split(":")[0]
            if not source.startswith("."):
                assert source in merged["volumes"], f"{name}: volume {source} is not declared"
            else:
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


def test_compose_tls_gives_every_grpc_service_its_own_certificate_folder_and_mtls():
    merged = compose_tls()["services"]
    pki = merged["pki"]
    assert pki["image"] == merged["orchestrator"]["image"] and pki["build"] == merged["orchestrator"]["build"]
    assert pki["restart"] == "no" and pki["read_only"] is True and pki["cap_add"] == ["CHOWN"]
    assert pki["entrypoint"][:2] == ["/bin/sh", "/setup/compose-pki.sh"]
    volume_path = pki["entrypoint"][2]
    assert f"pki:{volume_path}" in pki["volumes"] and "./compose-pki.sh:/setup/compose-pki.sh:ro" in pki["volumes"]
    grpc_services = [image.name for image in catalog.IMAGES if image.grpc_service] + [catalog.TRAINER]
    assert sorted(pki["command"]) == sorted({*grpc_services, "a2v"})
    for name in grpc_services:
        service = merged[name]
        env = compose_env(service)
        assert env["A2V_TLS"] == "1" and env["A2V_TLS_CLIENT_AUTH"] == "1", name
        assert env["A2V_REFLECTION"] == "false" and "A2V_TLS_SERVER_NAME" not in env, name
        mounts = [m for m in service["volumes"] if isinstance(m, dict) and m["source"] == "pki"]
        assert mounts == [
            {
                "type": "volume",
                "source": "pki",
                "target": "/etc/a2v/tls",
                "read_only": True,
                "volume": {"subpath": name},
            }
        ], name
        for variable, file in TLS_FILES.items():
            assert env[variable] == f"/etc/a2v/tls/{file}", (name, variable)
        assert service["depends_on"]["pki"] == {"condition": "service_completed_successfully"}, name
        # The health check is the plain one: it reads the same A2V_TLS_ settings, and the certificate names 127.0.0.1.
        assert service["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "deploy.healthcheck"], name
    for plaintext in ("model-sync", catalog.TF_SERVING, "minio", "setup"):
        assert "A2V_TLS" not in compose_env(merged[plaintext]), plaintext


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_compose_pki_script_makes_certificates_that_the_services_and_their_health_checks_accept(tmp_path, monkeypatch):
    pki = tmp_path / "pki"
    owner = {"A2V_PKI_OWNER": f"{os.getuid()}:{os.getgid()}"}
    run = [str(PKI_SCRIPT), str(pki), "audio", "orchestrator", "a2v"]
    made = subprocess.run(["sh", *run], env={**os.environ, **owner}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    for name in ("audio", "orchestrator", "a2v"):
        assert {p.name for p in (pki / name).iterdir()} == set(TLS_FILES.values()), name
        assert (pki / name / "tls.key").stat().st_mode & 0o077 == 0, "keys are private"
    stamps = {p: p.stat().st_mtime_ns for p in pki.rglob("*") if p.is_file()}
    again = subprocess.run(["sh", *run], env={**os.environ, **owner}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in stamps} == stamps, "valid ones are kept"

    env = {k: v for k, v in compose_env(compose_tls()["services"]["audio"]).items() if k.startswith("A2V_TLS")}
    env.update({variable: str(pki / "audio" / file) for variable, file in TLS_FILES.items()})
    tls = TlsConfig(True, env["A2V_TLS_CERT"], env["A2V_TLS_KEY"], env["A2V_TLS_CA"], client_auth=True)
    server, port = create_server(ServerConfig(service="test", tls=tls), [])
    server.start()
    try:
        server.set_serving(READY)
        for variable, value in {**env, "A2V_LISTEN": f"0.0.0.0:{port}"}.items():
            monkeypatch.setenv(variable, value)
        assert healthcheck.main([READY, "--timeout", "5"]) == 0  # compose's health check, over mTLS
        # `a2v` on the host: its own client certificate, the CA, the name localhost.
        monkeypatch.setenv("A2V_TLS_SERVER_NAME", "localhost")
        for variable, file in TLS_FILES.items():
            monkeypatch.setenv(variable, str(pki / "a2v" / file))
        assert healthcheck.main([READY, "--timeout", "5"]) == 0
        # No client certificate: mTLS refuses the connection.
        monkeypatch.setenv("A2V_TLS_CERT", "")
        assert healthcheck.main([READY, "--timeout", "2"]) == 1
    finally:
        server.stop(0).wait()


def compose_callers_file(service: dict[str, Any]) -> Path:
    """The host file of the callers file a compose service's A2V_AUTH_TOKENS_FILE names (a read-only bind mount)."""
    folder, file = os.path.split(compose_env(service)["A2V_AUTH_TOKENS_FILE"])
    (mount,) = [m for m in service["volumes"] if isinstance(m, dict) and m["target"] == folder]
    assert mount["type"] == "bind" and mount["read_only"] is True, mount
    return (COMPOSE.parent / mount["source"] / file).resolve()


def test_compose_tls_gives_every_grpc_service_the_same_mounted_callers_file():
    merged = compose_tls()["services"]
    grpc_services = [image.name for image in catalog.IMAGES if image.grpc_service] + [catalog.TRAINER]
    files = {compose_callers_file(merged[name]) for name in grpc_services}
    assert len(files) == 1, files
    parse_callers(files.pop().read_text())
    for plaintext in ("model-sync", catalog.TF_SERVING, "minio", "setup", "pki"):
        assert "A2V_AUTH_TOKENS_FILE" not in compose_env(merged[plaintext]), plaintext


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_compose_callers_name_the_certificates_the_pki_script_makes_with_least_scopes(tmp_path):
    """Each certificate as the servers see it (SANs and CN, read by the cryptography package) is its own caller."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    merged = compose_tls()["services"]
    names = merged["pki"]["command"]
    owner = {"A2V_PKI_OWNER": f"{os.getuid()}:{os.getgid()}"}
    made = subprocess.run(
        ["sh", str(PKI_SCRIPT), str(tmp_path), *names], env={**os.environ, **owner}, capture_output=True, timeout=300
    )
    assert made.returncode == 0, made.stdout + made.stderr
    callers = parse_callers(compose_callers_file(merged[ORCHESTRATOR]).read_text())
    identities: dict[str, set[str]] = {}
    for name in names:
        certificate = x509.load_pem_x509_certificate((tmp_path / name / "tls.crt").read_bytes())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cn = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        identities[name] = {str(n.value) for n in san} | set(cn)
    for identity in callers.by_identity:
        holders = [name for name, held in identities.items() if identity in held]
        assert len(holders) == 1, f"{identity!r} is named by the certificates of {holders}"
    caller_of = {}
    for name, held in identities.items():
        (caller_of[name],) = {callers.by_identity[i] for i in held if i in callers.by_identity}
    check_least_scopes(callers, caller_of, "a2v", compose_env(merged[ORCHESTRATOR]))

    # A real server as compose runs it (retiming's certificate and the callers file, mTLS): the orchestrator's
    # certificate may call it; a2v's and another stage's are refused for want of the scope.
    files = {variable: str(tmp_path / "retiming" / file) for variable, file in TLS_FILES.items()}
    tls = TlsConfig(True, files["A2V_TLS_CERT"], files["A2V_TLS_KEY"], files["A2V_TLS_CA"], client_auth=True)
    auth = AuthConfig(str(compose_callers_file(merged["retiming"])))
    server, port = start_retiming(ScriptedRetiming(tag=3), tls=tls, auth=auth)
    server.load_and_mark_serving()
    try:

        def retime(caller: str) -> retiming_pb2.RetimeResponse:
            own = {variable: str(tmp_path / caller / file) for variable, file in TLS_FILES.items()}
            mine = TlsConfig(True, own["A2V_TLS_CERT"], own["A2V_TLS_KEY"], own["A2V_TLS_CA"], server_name="localhost")
            channel = create_channel(f"127.0.0.1:{port}", [RETIMING], timeout_seconds=5, security=ClientSecurity(mine))
            with channel:
                stub = retiming_pb2_grpc.RetimingServiceStub(channel)
                return stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=1), timeout=5)

        assert retime(ORCHESTRATOR).output_frame_count == 3
        for caller in ("a2v", "composite"):
            with pytest.raises(grpc.RpcError) as refused:
                retime(caller)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller
            assert refused.value.details().startswith(f"caller {caller!r} lacks the scope 'stage:retiming'")
    finally:
        server.stop(0).wait()
