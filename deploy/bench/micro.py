"""Fast cores against their naive references, one process on one core: `python -m deploy.bench.micro NAME --json OUT`.

`deploy.bench.end_to_end` runs each in a process of its own, so pinning to one CPU, single-threaded BLAS and the
clip analysis stay out of the benchmark's own process. NAME is one of BENCHMARKS; the JSON written is
the dict the stage's `reference_comparison` returns, plus `seconds` (the run's wall time).
"""

from __future__ import annotations

import os

# Before numpy loads: one BLAS thread, so the numbers are per core.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BENCHMARKS = {
    # name: (module, settings short enough for `a2v bench`: about 10-30 s each on one core)
    "texture": ("deploy.bench.texture", {"frames": 60, "reference_frames": 15, "chunk": 30}),
    "retiming": ("deploy.bench.retiming", {"audio_seconds": 60.0, "target_seconds": 300.0, "repeats": 3}),
}


def run(name: str) -> dict:
    """The named stage's `reference_comparison(**settings)` on one core, with its wall time added."""
    module, settings = BENCHMARKS[name]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    started = time.perf_counter()
    numbers = importlib.import_module(module).reference_comparison(**settings)
    return {**numbers, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.bench.micro", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--json", type=Path, required=True, help="where to write the numbers")
    args = parser.parse_args(argv)
    numbers = run(args.name)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
