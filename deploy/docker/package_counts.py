"""What each image carries: the distributions pip would install for it, counted (prints, asserts nothing).

    python -m deploy.docker.package_counts      # needs the package index (pip resolves without installing)

For every image of deploy/catalog.py it resolves what its Dockerfile installs (its requirement set, plus
`tensorflow-cpu` and `tensorflow-serving-api` for lipsync, `tensorflow[and-cuda]` for the trainer as its
default build argument has it) with `pip install --dry-run --ignore-installed --report`, and prints the count
and whether TensorFlow, the CUDA wheels and the Kubernetes client are among them. The first line is what every
image installed before the images got requirement sets of their own: all of requirements.txt and TensorFlow
with CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy import catalog
from deploy.local import REPO


def tensorflow_version() -> str:
    for line in (REPO / "requirements-tf.txt").read_text().splitlines():
        if line.startswith("tensorflow=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit("requirements-tf.txt pins no tensorflow")


def resolve(requirements: list[str]) -> set[str]:
    """Names of the distributions `pip install <requirements>` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed"]
        subprocess.run([*command, "--report", str(report), *requirements], check=True, cwd=REPO)
        installed = json.loads(report.read_text())["install"]
        return {item["metadata"]["name"].lower().replace("_", "-") for item in installed}


def image_requirements(image: catalog.Image, tensorflow: str) -> list[str]:
    files = ["-r", str(catalog.DOCKER_DIR / "requirements" / f"{image.name}.txt")]
    if image.name == catalog.TRAINER:
        return [*files, f"tensorflow[and-cuda]=={tensorflow}"]
    if image.tensorflow:  # the serving API goes in with --no-deps: one distribution more, nothing else
        return [*files, f"tensorflow-cpu=={tensorflow}"]
    return files


def main() -> int:
    tensorflow = tensorflow_version()
    # (image, distributions, those installed beside them with --no-deps: lipsync's tensorflow-serving-api)
    rows = [("every image, before", resolve(["-r", "requirements.txt", f"tensorflow[and-cuda]=={tensorflow}"]), 0)]
    for image in catalog.IMAGES:
        no_deps = int(image.tensorflow and image.name != catalog.TRAINER)
        rows.append((image.name, resolve(image_requirements(image, tensorflow)), no_deps))
    print(f"{'image':<22} {'packages':>8}  tensorflow  cuda  kubernetes")
    for name, names, no_deps in rows:
        has_tf = any(n in names for n in ("tensorflow", "tensorflow-cpu"))
        cuda = any(n.startswith("nvidia-") for n in names)
        print(f"{name:<22} {len(names) + no_deps:>8}  {'yes' if has_tf else 'no':>10}  {'yes' if cuda else 'no':>4}  "
              f"{'yes' if 'kubernetes' in names else 'no':>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
