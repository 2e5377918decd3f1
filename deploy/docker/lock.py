"""Writes the lock files: every distribution of each install set pinned, with the sha256 of each of its files.

    make lock                         # python -m deploy.docker.lock: needs the package index (PyPI)
    make lock LOCK_ARGS=--upgrade     # also moves the unpinned (transitive) dependencies to their newest releases

The human-edited inputs stay `requirements*.txt` and the image sets of `deploy/docker/requirements/<image>.txt`;
each lock is what `uv pip compile --generate-hashes` resolves from them, for every platform at once (`--universal`:
Linux x86_64 and aarch64 alike, markers where they differ) on Python 3.11, with the hashes of every wheel and sdist
of each pinned release. Without --upgrade a release already in a lock stays (uv prefers the output file's pins).

- `requirements-dev.lock`: the local environment (`make setup`, CI): requirements-dev.txt, which includes the rest.
- `deploy/docker/requirements/protoc.lock`: grpcio-tools in the images' builder stage.
- `deploy/docker/requirements/<image>.lock`: what the image's Dockerfile installs; the TensorFlow images add the
  release of requirements-tf.txt (lipsync: tensorflow-cpu, plain tensorflow on aarch64 where tensorflow-cpu has no
  wheels, and tensorflow-serving-api without its dependencies;
  trainer: tensorflow[and-cuda], `trainer-cpu.lock` plain tensorflow for TENSORFLOW_EXTRAS=).

Every lock but the first is held to the versions of `requirements-dev.lock` (`-c`), so an image runs the very
releases the tests ran. The images and `make setup` install them with `pip install --require-hashes`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy import catalog
from deploy.local import REPO

PYTHON_VERSION = "3.11"
"""The Python of the images (python:3.11-slim) and of the local environment."""
REQUIREMENTS_DIR = catalog.DOCKER_DIR / "requirements"
DEV_LOCK = REPO / "requirements-dev.lock"
COMPILE_COMMAND = "make lock"
X86, AARCH64 = "platform_machine != 'aarch64'", "platform_machine == 'aarch64'"
NO_DEPS_HEADER = (
    "# Installed with --no-deps, its own dependencies left out of this lock (make lock):\n"
    "# tensorflow-serving-api would pull in the full tensorflow; tensorflow-cpu above provides the module.\n"
)


@dataclass(frozen=True)
class LockSet:
    """One install set: what it is resolved from and the lock it is written to."""

    lock: Path
    inputs: tuple[str, ...]
    """Requirement lines resolved together: `-r <file>` (relative to the repository) or `name==version`."""
    no_deps: tuple[str, ...] = ()
    """Requirements installed beside the set with `pip install --no-deps`, locked without their dependencies."""
    image: str | None = None
    """The image whose Dockerfile installs the lock, if any."""

    @property
    def constrained(self) -> bool:
        """Whether the set is held to the versions of requirements-dev.lock (every set but that one)."""
        return self.lock != DEV_LOCK


ENVIRONMENTS = {
    f"linux-{machine}": {
        "python_version": PYTHON_VERSION,
        "python_full_version": f"{PYTHON_VERSION}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": machine,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for machine in ("x86_64", "aarch64")
}
"""Where the locks install: the python:3.11 images and the local environment, on either architecture."""
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*(.+?))?\s*$")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    """One requirement of a lock or an input file."""

    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...] = ()
    no_deps: bool = False

    def applies(self, environment: str) -> bool:
        """Whether pip installs it in `environment` (a key of ENVIRONMENTS)."""
        from packaging.markers import Marker

        return self.marker is None or Marker(self.marker).evaluate(ENVIRONMENTS[environment])


def parse_pin(text: str) -> Entry:
    """`name==version [; marker]` as an Entry; ValueError for anything else."""
    match = PIN.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not `name==version [; marker]`: {text!r}")
    return Entry(canonical(match.group(1)), match.group(2), match.group(3))


def lock_entries(path: Path) -> list[Entry]:
    """A lock's requirements (continuation lines joined), those after the --no-deps header flagged.

    Raises:
        ValueError: a requirement without sha256 hashes, or not a pin.
    """
    entries, no_deps = [], False
    statements = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    for statement in statements:
        if statement.startswith(NO_DEPS_HEADER.splitlines()[0]):
            no_deps = True
        if not statement.strip() or statement.lstrip().startswith("#"):
            continue
        requirement, *hashes = re.split(r"\s+(?=--)", statement.strip())
        if not hashes or not all(HASH.fullmatch(h) for h in hashes):
            raise ValueError(f"{path.name}: a requirement without its sha256 hashes: {statement[:120]}")
        entries.append(dataclasses.replace(parse_pin(requirement), hashes=tuple(hashes), no_deps=no_deps))
    return entries


def installed(entries: list[Entry], environment: str) -> dict[str, str]:
    """What pip installs from a lock in one environment: each distribution once, at one version.

    Raises:
        ValueError: a distribution twice there.
    """
    chosen: dict[str, str] = {}
    for entry in entries:
        if entry.applies(environment):
            if entry.name in chosen:
                raise ValueError(f"{entry.name} twice for {environment}")
            chosen[entry.name] = entry.version
    return chosen


def canonical(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path, name: str) -> str:
    """The `name==version` line of a requirements file for one distribution."""
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if match and canonical(match.group(1)) == canonical(name):
            return f"{match.group(1)}=={match.group(2)}"
    raise SystemExit(f"{path.relative_to(REPO)} pins no {name}")


def lock_sets() -> list[LockSet]:
    """Every install set: the local environment's, the builder stage's and each image's."""
    tensorflow = pinned(REPO / "requirements-tf.txt", "tensorflow").split("==", 1)[1]
    serving_api = pinned(REPO / "requirements-tf.txt", "tensorflow-serving-api")
    sets = [
        LockSet(DEV_LOCK, ("-r requirements-dev.txt",)),
        # The builder stage of every image.
        LockSet(REQUIREMENTS_DIR / "protoc.lock", (pinned(REPO / "requirements-dev.txt", "grpcio-tools"),)),
    ]
    for image in catalog.IMAGES:
        base = f"-r {(REQUIREMENTS_DIR / f'{image.name}.txt').relative_to(REPO)}"
        lock = REQUIREMENTS_DIR / f"{image.name}.lock"
        if image.name == catalog.TRAINER:
            sets.append(LockSet(lock, (base, f"tensorflow[and-cuda]=={tensorflow}"), image=image.name))
            cpu_lock = REQUIREMENTS_DIR / f"{image.name}-cpu.lock"
            sets.append(LockSet(cpu_lock, (base, f"tensorflow=={tensorflow}"), image=image.name))
        elif image.tensorflow:
            # tensorflow-cpu has no aarch64 wheels; there plain tensorflow is the CPU build.
            cpu = (f"tensorflow-cpu=={tensorflow} ; {X86}", f"tensorflow=={tensorflow} ; {AARCH64}")
            sets.append(LockSet(lock, (base, *cpu), no_deps=(serving_api,), image=image.name))
        else:
            sets.append(LockSet(lock, (base,), image=image.name))
    return sets


def compile_lock(lock_set: LockSet, requirements: tuple[str, ...], *, no_deps: bool, extra: list[str]) -> str:
    """What `uv pip compile` resolves from the requirement lines, as a lock's text.

    The set's own requirements go through the lock file itself (`--output-file`: uv keeps the releases already
    there); those installed with --no-deps are resolved on their own, without a header, for appending.
    """
    relative = lock_set.lock.relative_to(REPO)
    command = [sys.executable, "-m", "uv", "pip", "compile", "-", "--quiet", "--universal"]
    command += ["--python-version", PYTHON_VERSION, "--generate-hashes", "--custom-compile-command", COMPILE_COMMAND]
    if lock_set.constrained:
        command += ["--constraint", str(DEV_LOCK.relative_to(REPO))]
    command += ["--no-deps", "--no-header"] if no_deps else ["--output-file", str(relative)]
    command += extra
    text = "".join(f"{line}\n" for line in requirements)
    result = subprocess.run(command, cwd=REPO, input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{relative}: uv pip compile failed\n{result.stderr}")
    return result.stdout if no_deps else lock_set.lock.read_text()


def write(lock_set: LockSet, extra: list[str]) -> None:
    """Resolve one set and write its lock."""
    text = compile_lock(lock_set, lock_set.inputs, no_deps=False, extra=extra)
    if lock_set.no_deps:
        text += NO_DEPS_HEADER + compile_lock(lock_set, lock_set.no_deps, no_deps=True, extra=extra)
        lock_set.lock.write_text(text)
    print(f"wrote {lock_set.lock.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    """Write every lock (the local environment's first: the others are held to its versions)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.docker.lock", description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="newest releases for what the inputs leave unpinned")
    args = parser.parse_args(argv)
    for lock_set in lock_sets():
        write(lock_set, ["--upgrade"] if args.upgrade else [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
