"""What each image carries: the distributions its lock installs, counted (prints, asserts nothing).

    python -m deploy.docker.package_counts      # offline: reads deploy/docker/requirements/<image>.lock

For every image of deploy/catalog.py it reads the lock its Dockerfile installs with `pip install --require-hashes`
(the trainer's default build, `tensorflow[and-cuda]`; lipsync's tensorflow-serving-api, installed with --no-deps,
counted too) as pip would install it on Linux x86_64 and aarch64, and prints the count and whether TensorFlow, the
CUDA wheels and the Kubernetes client are among them. Before the images got requirement sets of their own, every
image installed 97 distributions (docs/SECURITY.md).
"""

from __future__ import annotations

from deploy import catalog
from deploy.docker import lock


def image_distributions(image: catalog.Image, environment: str) -> dict[str, str]:
    """Name -> version of what the image's lock installs in `environment` (a key of `lock.ENVIRONMENTS`)."""
    return lock.installed(lock.lock_entries(lock.REQUIREMENTS_DIR / f"{image.name}.lock"), environment)


def main() -> int:
    print(f"{'image':<14} {'platform':<16} {'packages':>8}  tensorflow  cuda  kubernetes")
    for image in catalog.IMAGES:
        for environment in lock.ENVIRONMENTS:
            names = image_distributions(image, environment)
            has_tf = any(n in names for n in ("tensorflow", "tensorflow-cpu"))
            cuda = any(n.startswith("nvidia-") for n in names)
            print(f"{image.name:<14} {environment:<16} {len(names):>8}  {'yes' if has_tf else 'no':>10}  "
                  f"{'yes' if cuda else 'no':>4}  {'yes' if 'kubernetes' in names else 'no':>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
