"""One store user per service, limited to its prefixes (issue 16, item 3): the policies against the code, the
deployment files against the policies, and the limits enforced by a real S3 server.

weed mini (the local S3 server) supports per-user identities with Read/Write actions per bucket prefix
(`-s3.config`), so the denial of another stage's prefix is tried on it for real. What it cannot express: a Deny
(MinIO's composite policy denies job.json, lease.json and cancel.json inside `jobs/`; on weed the composite user may
write all of `jobs/`), listing by prefix (both list the whole bucket by key name: HeadBucket needs it on MinIO), and
HeadBucket without a bucket-wide Read (so on weed a running service's reads are bucket-wide, its writes limited).
"""

import json
import re
import subprocess
import sys
import uuid

import pytest
import yaml

from deploy import store_users
from deploy.store_users import ACCESS, BUCKET, PROTECTED, minio_policy, weed_identities
from orchestrator.jobs import cancel_key, manifest_key
from orchestrator.leases import lease_key
from orchestrator.presign import UPLOADS_PREFIX
from services.lipsync.versions import reservation_key, version_prefix
from services.runtime.blobstore import BlobStore
from services.runtime.config import StoreConfig
from services.runtime.errors import FailedPrecondition
from tests.conftest import ACCESS_KEY, REPO, SECRET_KEY, SHARED_DATA, S3Server
from tests.deploy.kustomize import pod_specs, render

STAGE_SERVICERS = ("audio", "face", "lipsync", "retiming", "texture", "teeth", "composite")
DERIVED = re.compile(r"derive_(?:prefix|key)\(\s*f?\"([a-z/]+?)(?:/\{[^\"]*)?\"")


def written_by_code() -> dict[str, set[str]]:
    """The top-level prefixes each service's code writes under, read from the code itself."""
    written = {}
    for stage in STAGE_SERVICERS:
        source = (REPO / "services" / stage / "servicer.py").read_text()
        written[stage] = set(DERIVED.findall(source))
    # Finalize writes a job's named output inside the job's folder (orchestrator.jobs.output_key).
    written["composite"].add("jobs")
    written["orchestrator"] = {
        key.split("/")[0] for key in (manifest_key("j"), cancel_key("j"), lease_key("j"), f"{UPLOADS_PREFIX}/x")
    }
    written["trainer"] = {version_prefix("s", 1).split("/")[0], reservation_key("s", 1).split("/")[0]}
    written["modelsync"] = set()
    return written


def test_each_services_write_prefixes_are_exactly_what_its_code_writes():
    written = written_by_code()
    assert set(written) == set(ACCESS)
    assert written["face"] == {"analysis/face", "datasets"} and written["composite"] == {"composite", "output", "jobs"}
    for service, prefixes in written.items():
        assert set(ACCESS[service]["write"]) == prefixes, service


def test_each_service_reads_what_it_writes_and_no_stage_writes_anothers_prefix():
    for service, access in ACCESS.items():
        assert set(access["write"]) <= set(access["read"]), service  # results are looked up before recomputing
    stages = [s for s in ACCESS if s not in ("orchestrator", "composite")]
    for service in stages:
        for other in ACCESS:
            if other != service:
                assert not set(ACCESS[service]["write"]) & set(ACCESS[other]["write"]), (service, other)
    assert {s for s in ACCESS if "jobs" in ACCESS[s]["write"]} == {"orchestrator", "composite"}
    assert not any("models" in ACCESS[s]["write"] for s in ACCESS if s != "trainer")


def test_the_policy_documents_grant_each_service_its_prefixes_and_nothing_else():
    for service, access in ACCESS.items():
        document = json.loads((REPO / "deploy" / "minio" / "policies" / f"{service}.json").read_text())
        assert document == minio_policy(service)
        granted: dict[str, set[str]] = {"read": set(), "write": set()}
        for statement in document["Statement"]:
            assert all(action.startswith("s3:") and "*" not in action for action in statement["Action"])
            for resource in statement["Resource"]:
                assert resource.startswith(f"arn:aws:s3:::{BUCKET}")
            if statement["Sid"] == "Bucket":  # HeadBucket and listing: the bucket itself, no object
                assert statement["Resource"] == [f"arn:aws:s3:::{BUCKET}"]
                assert set(statement["Action"]) <= {
                    "s3:GetBucketLocation",
                    "s3:ListBucket",
                    "s3:ListBucketMultipartUploads",
                }
                continue
            if statement["Effect"] == "Deny":
                assert statement["Resource"] == [f"arn:aws:s3:::{BUCKET}/{key}" for key in PROTECTED[service]]
                continue
            kind = "write" if "s3:PutObject" in statement["Action"] else "read"
            assert kind == "write" or statement["Action"] == ["s3:GetObject"]
            granted[kind] |= {
                r.removeprefix(f"arn:aws:s3:::{BUCKET}/").removesuffix("/*") for r in statement["Resource"]
            }
        assert granted == {"read": set(access["read"]), "write": set(access["write"])}, service


def test_generated_files_are_up_to_date():
    stale = [path for path, text in store_users.expected_files().items() if path.read_text() != text]
    assert stale == [], "run: python -m deploy.store_users write"


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_kubernetes_gives_each_workload_its_own_store_user_and_the_setup_job_every_policy(overlay):
    objects = render(REPO / "k8s" / "overlays" / overlay)
    configmap = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "a2v-store-policies")
    for service in ACCESS:
        assert json.loads(configmap["data"][f"{service}.json"]) == minio_policy(service)
    assert configmap["data"]["setup-users.sh"] == store_users.SETUP_SCRIPT.read_text()
    own = {"tfserving": "modelsync"}
    root_holders = set()
    for obj in objects:
        for spec in pod_specs(obj):
            name = obj["metadata"]["name"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
                from_keys = [e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e]
                secrets |= {v["secretKeyRef"]["name"] for v in from_keys if "secretKeyRef" in v} & {"a2v-s3"}
                if "a2v-s3" in secrets:
                    root_holders.add(name)
                elif any(s.startswith("a2v-s3-") for s in secrets):
                    assert secrets == {f"a2v-s3-{own.get(name, name)}"}, (name, container["name"])
    assert root_holders == {"minio", "store-users"}
    job = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "store-users")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "/policies/setup-users.sh"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    for service in ACCESS:
        assert refs[store_users.SECRET_KEY_VARIABLES[service]] == {
            "name": f"a2v-s3-{service}",
            "key": "A2V_S3_SECRET_KEY",
        }
        assert refs[store_users.ACCESS_KEY_VARIABLES[service]] == {
            "name": f"a2v-s3-{service}",
            "key": "A2V_S3_ACCESS_KEY",
        }


def test_compose_gives_each_service_its_own_store_user_made_by_the_setup_service():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]
    names = {"model-sync": "modelsync"}
    for name, service in compose.items():
        if name in ("minio", "setup", "tfserving"):
            continue
        env = service["environment"]
        own = names.get(name, name).upper()
        assert env["A2V_S3_ACCESS_KEY"].startswith(f"${{A2V_S3_ACCESS_KEY_{own}:-"), name
        assert env["A2V_S3_SECRET_KEY"].startswith(f"${{A2V_S3_SECRET_KEY_{own}:-"), name
    setup = compose["setup"]
    assert "/bin/sh /setup/setup-users.sh" in setup["command"][0]
    assert "./minio/policies:/policies:ro" in setup["volumes"]
    for service in ACCESS:
        assert store_users.SECRET_KEY_VARIABLES[service] in setup["environment"]
    script = store_users.SETUP_SCRIPT.read_text()
    for command in ("mc admin user add", "mc admin policy create", "mc admin policy attach"):
        assert command in script


# -- enforced by a real S3 server --------------------------------------------------------------------------


class WeedWithUsers(S3Server):
    """The session's kind of S3 server, with one identity per service from deploy/store_users.py."""

    def __init__(self, root, credentials, *, bucket_read: bool) -> None:
        super().__init__(root)
        self.credentials = credentials
        self.bucket_read = bucket_read

    def start(self) -> None:
        import tests.conftest as conftest

        config = self.root / "s3-identities.json"
        document = weed_identities(
            self.credentials, "a2v-test", admin=(ACCESS_KEY, SECRET_KEY), bucket_read=self.bucket_read
        )
        config.write_text(json.dumps(document))
        plain = conftest.weed_command
        conftest.weed_command = lambda *args: [*plain(*args), f"-s3.config={config}"]
        try:
            super().start()
        finally:
            conftest.weed_command = plain


@pytest.fixture(scope="module")
def weed_users(tmp_path_factory):
    """Strict identities: reads and writes kept to each service's prefixes (HeadBucket then refused on weed)."""
    credentials = {service: (f"a2v-{service}", f"{service}-secret-{uuid.uuid4().hex[:12]}") for service in ACCESS}
    server = WeedWithUsers(tmp_path_factory.mktemp("s3-users"), credentials, bucket_read=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def as_service(server: WeedWithUsers, service: str) -> BlobStore:
    access_key, secret = server.credentials[service]
    return BlobStore.from_config(
        StoreConfig(endpoint=server.endpoint, access_key=access_key, secret_key=secret, bucket="a2v-test")
    )


def test_a_stages_store_user_is_denied_another_stages_prefix(weed_users):
    admin = BlobStore.from_config(weed_users.config())
    tag = uuid.uuid4().hex[:8]
    admin.put_bytes(f"texture/{tag}/textures.npz", b"texture's")
    audio = as_service(weed_users, "audio")
    assert audio.put_bytes(f"audio/{tag}/result.json", b"{}").key == f"audio/{tag}/result.json"
    assert audio.get_bytes(f"audio/{tag}/result.json") == b"{}"
    for denied in (
        lambda: audio.put_bytes(f"analysis/face/{tag}/manifest.json", b"not audio's"),  # face's prefix
        lambda: audio.get_bytes(f"texture/{tag}/textures.npz"),  # texture's prefix
        lambda: audio.put_bytes(f"jobs/{tag}/job.json", b"{}"),  # the orchestrator's records
        lambda: audio.put_bytes(f"models/x/1/{tag}", b"{}"),  # the trainer's models
    ):
        with pytest.raises(FailedPrecondition, match="AccessDenied"):
            denied()
    texture = as_service(weed_users, "texture")
    for denied in (
        lambda: texture.get_bytes(f"audio/{tag}/result.json"),  # not an input of texture synthesis
        lambda: texture.put_bytes(f"audio/{tag}/result.json", b"overwritten"),
    ):
        with pytest.raises(FailedPrecondition, match="AccessDenied"):
            denied()
    modelsync = as_service(weed_users, "modelsync")
    with pytest.raises(FailedPrecondition, match="AccessDenied"):
        modelsync.put_bytes(f"models/x/1/{tag}", b"{}")
    assert (
        not admin.exists(f"analysis/face/{tag}/manifest.json") and admin.get_bytes(f"audio/{tag}/result.json") == b"{}"
    )


def test_the_orchestrators_user_signs_uploads_only_under_uploads(weed_users):
    """A presigned URL acts with its signer's rights: the orchestrator's user can sign uploads, not stage outputs."""
    import urllib3

    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
    from orchestrator.presign import Presigner, PresignSettings
    from services.runtime.keys import sha256_bytes

    config = StoreConfig(
        endpoint=weed_users.endpoint,
        access_key=weed_users.credentials["orchestrator"][0],
        secret_key=weed_users.credentials["orchestrator"][1],
        bucket="a2v-test",
    )
    presigner = Presigner(BlobStore.from_config(config), config, PresignSettings(seconds=60))
    data = uuid.uuid4().bytes
    signed = presigner.upload("alice", pb.UploadTarget(sha256=sha256_bytes(data), size_bytes=len(data)))
    http = urllib3.PoolManager()
    assert http.request("PUT", signed.url, body=data, headers=dict(signed.headers)).status == 200
    admin = BlobStore.from_config(weed_users.config())
    assert admin.get_bytes(signed.object.key) == data
    # The same signature machinery for a stage's prefix: the store refuses the orchestrator's user there.
    from orchestrator.presign import presign_v4

    url = presign_v4(
        "PUT",
        f"http://{weed_users.endpoint}",
        "a2v-test",
        f"texture/{uuid.uuid4().hex}/x.npz",
        access_key=config.access_key,
        secret_key=config.secret_key,
        region="us-east-1",
        expires_seconds=60,
        headers={"Content-Length": str(len(data))},
    )
    assert http.request("PUT", url, body=data, headers={"Content-Length": str(len(data))}).status == 403


def test_as_the_local_stack_runs_them_a_service_finds_its_bucket_and_still_writes_only_its_prefixes(tmp_path):
    credentials = {"face": ("a2v-face", f"face-secret-{uuid.uuid4().hex[:12]}")}
    server = WeedWithUsers(tmp_path, credentials, bucket_read=True)
    server.start()
    try:
        BlobStore.from_config(server.config()).ensure_bucket()
        face = as_service(server, "face")
        face.ensure_bucket()  # what every service does at start (HeadBucket)
        face.put_bytes("analysis/face/x/manifest.json", b"{}")
        with pytest.raises(FailedPrecondition, match="AccessDenied"):
            face.put_bytes("texture/x/textures.npz", b"not face's")
    finally:
        server.stop()


@pytest.mark.slow  # a whole local stack (~60 s)
def test_the_local_stack_with_store_users_runs_each_service_as_its_own_weed_identity(stack_env):
    """A2V_STORE_USERS=1 a2v up: every service finds its bucket and writes with its own identity; an outside caller
    with no store credentials uploads through the orchestrator (its user signs uploads/ only)."""
    env = {**stack_env, "A2V_STORE_USERS": "1"}
    up = subprocess.run([sys.executable, "-m", "deploy.local", "up"], cwd=REPO, env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    identities = json.loads((REPO / env["A2V_STACK_DIR"] / "s3-identities.json").read_text())["identities"]
    assert {i["name"] for i in identities} == {"admin", *ACCESS}
    audio = SHARED_DATA / "audio" / "arctic_sentence_4s.wav"
    request = json.dumps({"audio": {"key": f"@{audio}"}, "outputFrameRate": {"numerator": 30, "denominator": 1}})
    outsider = {k: v for k, v in env.items() if k not in ("A2V_S3_ACCESS_KEY", "A2V_S3_SECRET_KEY")}
    call = [sys.executable, "-m", "orchestrator.cli", "stage", "audio", "Extract", "--request", request]
    done = subprocess.run(call, cwd=REPO, env=outsider, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["features"]["object"]["key"].startswith("audio/")
