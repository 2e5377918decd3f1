"""Memory of a face analysis against the length of the video (prints only; issue 15).

Run: `python -m deploy.bench.face_memory [--video PATH]` (default: grid_s1_00, 5 minutes at 25 fps). The crops
go to a PNG frame archive on disk as they are made, as the face stage writes them; the process's resident and
peak memory are printed every minute of video, so a flat line shows that memory does not grow with length (a
10-minute target needs what a 1-minute one does), and the archive's bytes per frame show the scratch disk it
takes until stored.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from deploy.samples import SAMPLE_DATA
from services.face.core import LandmarkDetector, analyze_video
from services.runtime.frames import FramesWriter
from services.runtime.media import probe_video

MIB = 1 << 20


def resident_mib() -> float:
    """Current resident memory of this process, MiB (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return peak_mib()


def peak_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", type=Path, default=SAMPLE_DATA / "speakers" / "grid_s1" / "grid_s1_00.mp4")
    args = parser.parse_args()
    info = probe_video(args.video)
    minute = max(1, round(60 * info.fps))
    detector = LandmarkDetector()
    print(f"{args.video.name}: {info.width}x{info.height}, {info.frame_count} frames at {info.fps:.2f} fps")
    print(f"before: resident {resident_mib():.0f} MiB (interpreter, OpenCV, dlib and its models)")
    print(f"{'video':>8} {'frames':>7} {'resident MiB':>13} {'peak MiB':>9} {'archive kB/frame':>17} {'fps':>6}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="a2v-bench-face-") as folder:
        crops_path, masks_path = Path(folder) / "crops.zip", Path(folder) / "masks.zip"
        with (
            open(crops_path, "wb") as crop_file,
            open(masks_path, "wb") as mask_file,
            FramesWriter(crop_file) as crops,
            FramesWriter(mask_file) as masks,
        ):

            def keep(crop, mask) -> None:
                crops.add(crop)
                masks.add(mask)
                if crops.count % minute == 0:
                    crop_file.flush()
                    mask_file.flush()
                    stored = crop_file.tell() + mask_file.tell()
                    elapsed = time.perf_counter() - started
                    print(
                        f"{crops.count / info.fps / 60:>6.1f} m {crops.count:>7} {resident_mib():>13.0f} "
                        f"{peak_mib():>9.0f} {stored / crops.count / 1000:>17.1f} {crops.count / elapsed:>6.1f}",
                        flush=True,
                    )

            analysis = analyze_video(args.video, detector=detector, crop_sink=keep, max_duration_seconds=7200)
            crops.finish()
            masks.finish()
        stored = crops_path.stat().st_size + masks_path.stat().st_size
    print(
        f"done: {analysis.frame_count} frames, peak {peak_mib():.0f} MiB, archives {stored / MIB:.0f} MiB "
        f"({stored / analysis.frame_count / 1000:.1f} kB per frame), {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
