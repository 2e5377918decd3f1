"""One object-store user per service, limited to the key prefixes it reads and writes (issue 16, item 3).

`ACCESS` is the one source: which top-level prefixes each service reads and writes (taken from its code:
`derive_prefix("<kind>", ...)` in each stage's servicer, `models/` of the trainer, `jobs/` of the orchestrator;
tests/deploy/test_store_policies.py checks them against the code). From it come

- the MinIO IAM policy of each service, `deploy/minio/policies/<service>.json` (`mc admin policy create`), which
  `deploy/minio/setup-users.sh` installs for compose and the Kubernetes `store-users` component (whose ConfigMap
  carries the same documents);
- the SeaweedFS identities (`weed mini -s3.config`), the same prefixes as `Read:` / `Write:` actions (weed needs a
  bucket-wide Read for HeadBucket: see `weed_identities`).

`python -m deploy.store_users write` regenerates the policy files and the ConfigMap; the test fails when they
differ from `ACCESS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICY_DIR = REPO / "deploy" / "minio" / "policies"
SETUP_SCRIPT = REPO / "deploy" / "minio" / "setup-users.sh"
K8S_COMPONENT = REPO / "k8s" / "components" / "store-users"
POLICY_CONFIGMAP = K8S_COMPONENT / "policies.yaml"
BUCKET = "audio2video"
"""The bucket the documents name; setup-users.sh puts A2V_S3_BUCKET in its place."""

STAGE_OUTPUTS = ("audio", "analysis/face", "datasets", "lipsync", "retiming", "texture", "teeth", "composite", "output")

ACCESS: dict[str, dict[str, tuple[str, ...]]] = {
    # Jobs' manifests, leases and cancellations; the inputs it checks before accepting a job; the results it
    # presigns GETs for (a render's output/ or jobs/<id>/ video, a training's model card); the uploads it presigns
    # PUTs for (a presigned URL acts with its signer's rights).
    "orchestrator": {"read": ("jobs", "uploads", "output", "models"), "write": ("jobs", "uploads")},
    # Extract: the input audio (an upload) into audio/.
    "audio": {"read": ("uploads", "audio"), "write": ("audio",)},
    # Analyze: videos (uploads) into analysis/face/; BuildSpeakerDataset: analyses and audio features into datasets/.
    "face": {"read": ("uploads", "analysis/face", "audio", "datasets"), "write": ("analysis/face", "datasets")},
    # Predict: audio features and the speaker's model (PCA basis, normalization, card) into lipsync/.
    "lipsync": {"read": ("audio", "models", "lipsync"), "write": ("lipsync",)},
    # Retime: speech activity and the target's analysis into retiming/.
    "retiming": {"read": ("audio", "analysis/face", "retiming"), "write": ("retiming",)},
    # Synthesize: mouth shapes, the target's analysis and the retiming map into texture/.
    "texture": {"read": ("analysis/face", "lipsync", "retiming", "texture"), "write": ("texture",)},
    # SelectProxies / Enhance: the target's analysis, textures and mouth shapes into teeth/.
    "teeth": {"read": ("analysis/face", "lipsync", "retiming", "texture", "teeth"), "write": ("teeth",)},
    # Render / Finalize: everything a frame needs into composite/, the video into output/ or the job's folder.
    "composite": {
        "read": (
            *("uploads", "audio", "analysis/face", "lipsync", "retiming", "texture", "teeth", "composite", "output"),
            "jobs",
        ),
        "write": ("composite", "output", "jobs"),
    },
    # The LSTM trainer: a dataset in, a model version (and its reservation) out.
    "trainer": {"read": ("datasets", "models"), "write": ("models",)},
    # TF Serving's model sync: copies models/ to the serving volume, writes nothing to the store.
    "modelsync": {"read": ("models",), "write": ()},
}
PROTECTED = {"composite": ("jobs/*/job.json", "jobs/*/lease.json", "jobs/*/cancel.json")}
"""Keys a writer of `jobs/` other than the orchestrator must not replace: MinIO denies them explicitly (a job's
video goes inside its folder; orchestrator.jobs.output_key refuses these names too). weed mini has no Deny."""

READ_ACTIONS = ("s3:GetObject",)
WRITE_ACTIONS = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")


ACCESS_KEY_VARIABLES = {
    "orchestrator": "A2V_S3_ACCESS_KEY_ORCHESTRATOR",
    "audio": "A2V_S3_ACCESS_KEY_AUDIO",
    "face": "A2V_S3_ACCESS_KEY_FACE",
    "lipsync": "A2V_S3_ACCESS_KEY_LIPSYNC",
    "retiming": "A2V_S3_ACCESS_KEY_RETIMING",
    "texture": "A2V_S3_ACCESS_KEY_TEXTURE",
    "teeth": "A2V_S3_ACCESS_KEY_TEETH",
    "composite": "A2V_S3_ACCESS_KEY_COMPOSITE",
    "trainer": "A2V_S3_ACCESS_KEY_TRAINER",
    "modelsync": "A2V_S3_ACCESS_KEY_MODELSYNC",
}
"""Where compose and the setup job find each service's store user (default a2v-<service>)."""
SECRET_KEY_VARIABLES = {
    "orchestrator": "A2V_S3_SECRET_KEY_ORCHESTRATOR",
    "audio": "A2V_S3_SECRET_KEY_AUDIO",
    "face": "A2V_S3_SECRET_KEY_FACE",
    "lipsync": "A2V_S3_SECRET_KEY_LIPSYNC",
    "retiming": "A2V_S3_SECRET_KEY_RETIMING",
    "texture": "A2V_S3_SECRET_KEY_TEXTURE",
    "teeth": "A2V_S3_SECRET_KEY_TEETH",
    "composite": "A2V_S3_SECRET_KEY_COMPOSITE",
    "trainer": "A2V_S3_SECRET_KEY_TRAINER",
    "modelsync": "A2V_S3_SECRET_KEY_MODELSYNC",
}
"""Where compose and the setup job find each service's store secret."""


def user_name(service: str) -> str:
    """The store user (access key) of a service by default."""
    return f"a2v-{service}"


def dev_credentials(service: str) -> dict[str, str]:
    """A service's local-development credentials (compose defaults, the dev overlay's Secret): never for production."""
    return {"A2V_S3_ACCESS_KEY": user_name(service), "A2V_S3_SECRET_KEY": f"a2v-{service}-local-secret-key"}


def _objects(prefixes, bucket: str) -> list[str]:
    return [f"arn:aws:s3:::{bucket}/{prefix}/*" for prefix in prefixes]


def minio_policy(service: str, bucket: str = BUCKET) -> dict:
    """The IAM policy document of a service: its prefixes only.

    Listing is allowed on the bucket as a whole: HeadBucket (each service checks its bucket at start) authorizes as
    s3:ListBucket and carries no s3:prefix, so a prefix condition would refuse it. Listing shows key names, never
    content.
    """
    access = ACCESS[service]
    statements = [
        {
            "Sid": "Bucket",
            "Effect": "Allow",
            "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
        },
        {"Sid": "Read", "Effect": "Allow", "Action": list(READ_ACTIONS), "Resource": _objects(access["read"], bucket)},
    ]
    if access["write"]:
        statements.append(
            {
                "Sid": "Write",
                "Effect": "Allow",
                "Action": list(WRITE_ACTIONS),
                "Resource": _objects(access["write"], bucket),
            }
        )
    if service in PROTECTED:
        statements.append(
            {
                "Sid": "NotTheOrchestratorsRecords",
                "Effect": "Deny",
                "Action": list(WRITE_ACTIONS),
                "Resource": [f"arn:aws:s3:::{bucket}/{key}" for key in PROTECTED[service]],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def policy_text(service: str) -> str:
    return json.dumps(minio_policy(service), indent=2) + "\n"


def weed_identities(
    credentials: dict[str, tuple[str, str]],
    bucket: str,
    *,
    admin: tuple[str, str] | None = None,
    bucket_read: bool = True,
    also: dict[str, tuple[str, ...]] | None = None,
):
    """SeaweedFS `-s3.config` JSON: each service's access key with Read/Write actions on its prefixes.

    `credentials` maps a service to (access key, secret); `admin` is the set-up identity (bucket creation, tests);
    `also` gives a service the prefixes of others besides its own (the local stack's orchestrator runs the trainer as
    its child process, with its credentials).
    weed authorizes HeadBucket (each of our services checks its bucket at start) as a Read of the whole bucket, and
    has no narrower action for it: with `bucket_read` (what a running service needs) reads are bucket-wide and only
    writes keep to the prefixes; without it both do, and `BlobStore.ensure_bucket` is refused.
    """
    identities = []
    if admin:
        identities.append(
            {
                "name": "admin",
                "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        )
    for service, (access_key, secret) in credentials.items():
        taken = (service, *(also or {}).get(service, ()))
        reads = dict.fromkeys(prefix for s in taken for prefix in ACCESS[s]["read"])
        writes = dict.fromkeys(prefix for s in taken for prefix in ACCESS[s]["write"])
        actions = [f"List:{bucket}"]
        actions += [f"Read:{bucket}"] if bucket_read else [f"Read:{bucket}/{prefix}/*" for prefix in reads]
        actions += [f"Write:{bucket}/{prefix}/*" for prefix in writes]
        identities.append(
            {"name": service, "credentials": [{"accessKey": access_key, "secretKey": secret}], "actions": actions}
        )
    return {"identities": identities}


def configmap_text() -> str:
    """The Kubernetes ConfigMap of the store-users component: every policy and the setup script."""
    lines = [
        "# Generated by `python -m deploy.store_users write` from deploy/store_users.py (ACCESS): do not edit.",
        "# Each service's MinIO policy and the script that creates the users (deploy/minio/setup-users.sh).",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: a2v-store-policies",
        "  labels:",
        "    app.kubernetes.io/name: store-users",
        "    app.kubernetes.io/component: object-store",
        "    app.kubernetes.io/part-of: audio2video",
        "data:",
    ]
    files = {f"{service}.json": policy_text(service) for service in ACCESS}
    files["setup-users.sh"] = SETUP_SCRIPT.read_text()
    for name, text in files.items():
        lines.append(f"  {name}: |")
        lines.extend(f"    {line}" if line else "" for line in text.rstrip("\n").split("\n"))
    return "\n".join(lines) + "\n"


def expected_files() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {POLICY_DIR / f"{service}.json": policy_text(service) for service in ACCESS}
    files[POLICY_CONFIGMAP] = configmap_text()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.store_users", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["write", "check"])
    args = parser.parse_args(argv)
    stale = [path for path, text in expected_files().items() if not path.exists() or path.read_text() != text]
    if args.command == "check":
        for path in stale:
            print(f"stale: {path.relative_to(REPO)}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(stale)} changed file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
