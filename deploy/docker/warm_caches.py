"""Build-time warm-up of numba's on-disk cache, so a container does not JIT-compile librosa per start.

librosa compiles its numba kernels on first use (~13-18 s cold, ~1.5 s from the cache). An image
whose code runs librosa calls this once while building, as the user the service runs as, with
`NUMBA_CACHE_DIR` set to the folder the running container will read (see audio.Dockerfile; the
Kubernetes pod copies it to a writable volume, compose mounts a volume that Docker seeds from it).
With librosa not installed it does nothing, so the step stays valid whatever requirements.txt holds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def main() -> int:
    if importlib.util.find_spec("librosa") is None:
        print("warm_caches: librosa is not installed; nothing to warm")
        return 0
    if not os.environ.get("NUMBA_CACHE_DIR"):
        print("warm_caches: set NUMBA_CACHE_DIR to the folder the container will read", file=sys.stderr)
        return 1
    import librosa
    import numpy as np

    start = time.perf_counter()
    rate = 16000
    tone = (0.1 * np.sin(2 * np.pi * 220.0 * np.arange(rate) / rate)).astype(np.float32)
    # Each call compiles (and caches) the kernels behind it: STFT magnitudes and phases, peak
    # picking, Viterbi decoding, LPC.
    librosa.feature.mfcc(y=tone, sr=rate, n_mfcc=13)
    librosa.onset.onset_detect(y=tone, sr=rate)
    librosa.pyin(tone[:4096], fmin=80.0, fmax=400.0, sr=rate)
    librosa.lpc(tone, order=8)
    print(f"warm_caches: numba cache in {os.environ['NUMBA_CACHE_DIR']} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
