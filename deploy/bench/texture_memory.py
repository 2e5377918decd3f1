"""Memory of texture synthesis against the length of the target (prints only; issue 15).

Run: `python -m deploy.bench.texture_memory [--clip PATH] [--minutes 10] [--frames 300]`. One shared clip is
analysed (face core, crops written to PNG frame archives as the face stage stores them), then looped into a
`--minutes` target (the clip's frames again and again, mouth shapes with a little noise so that candidates come
from every loop, as from a long real video). Each way of preparing that target runs in its own process, so each
peak resident memory is its own:

- memory: what the texture stage did before issue 15: the archives read whole, decoded into one stack and
  prepared in memory (`prepare_target`);
- spilled: the archives on disk read one frame at a time into a scratch file of records
  (`prepare_spilled_target`), and synthesis holding a bounded number of rows (`RowCache`).

Both then synthesize `--frames` output frames (chunks of 30, driven by the clip's own mouth shapes in reverse) on
one core (wall and CPU time: the CPU time is the steadier on a shared machine); the textures of the two are
compared bit for bit.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from deploy.bench.face_memory import MIB, peak_mib, resident_mib  # noqa: E402
from deploy.samples import SAMPLE_DATA  # noqa: E402

CHUNK = 30
DEFAULT_CLIP = SAMPLE_DATA / "speakers" / "obama" / "obama_clip2.mp4"


def analyse(clip: Path, folder: Path) -> int:
    """Analyse `clip` into folder/clip-{crops,masks}.zip and folder/clip.npz (+ geometry.pkl); its frame count."""
    from services.face.core import LandmarkDetector, analyze_video
    from services.runtime.frames import FramesWriter

    with (
        open(folder / "clip-crops.zip", "wb") as crop_file,
        open(folder / "clip-masks.zip", "wb") as mask_file,
        FramesWriter(crop_file) as crops,
        FramesWriter(mask_file) as masks,
    ):

        def keep(crop, mask) -> None:
            crops.add(crop)
            masks.add(mask)

        analysis = analyze_video(clip, detector=LandmarkDetector(), crop_sink=keep)
        crops.finish()
        masks.finish()
    np.savez(
        folder / "clip.npz",
        mouth=analysis.canonical_mouth,
        valid=analysis.face_valid,
        jaw=analysis.jaw,
        pose=analysis.head_pose,
        fps=np.float64(analysis.info.fps),
    )
    with open(folder / "geometry.pkl", "wb") as handle:
        pickle.dump(analysis.geometry, handle)
    return analysis.frame_count


def loop_archive(source: Path, target: Path, frames: int) -> None:
    """A frame archive of `frames` frames, the source's frames again and again (PNG bytes copied, not re-encoded)."""
    from services.runtime.frames import FRAMES_FORMAT, _member

    with zipfile.ZipFile(source) as archive:
        header = json.loads(archive.read("header.json"))
        count = header["shape"][0]
        pngs = [archive.read(f"{i:06d}.png") for i in range(count)]
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as out:
        for i in range(frames):
            out.writestr(_member(f"{i:06d}.png"), pngs[i % count])
        shape = [frames, *header["shape"][1:]]
        out.writestr(_member("header.json"), json.dumps({"format": FRAMES_FORMAT, "shape": shape, "dtype": "uint8"}))


def build_target(folder: Path, minutes: float) -> int:
    """Loop the analysed clip into a `minutes` target: archives and arrays; its frame count."""
    clip = np.load(folder / "clip.npz")
    count = len(clip["mouth"])
    frames = max(count, round(minutes * 60 * float(clip["fps"])))
    loops = -(-frames // count)
    rng = np.random.default_rng(0)
    mouth = np.concatenate([clip["mouth"]] * loops)[:frames]
    mouth = (mouth + rng.normal(0, 0.002, mouth.shape)).astype(np.float32)  # each loop's mouths a little apart
    np.savez(
        folder / "target.npz",
        mouth=mouth,
        valid=np.tile(clip["valid"], loops)[:frames],
        jaw=np.concatenate([clip["jaw"]] * loops)[:frames],
        pose=np.concatenate([clip["pose"]] * loops)[:frames],
    )
    loop_archive(folder / "clip-crops.zip", folder / "target-crops.zip", frames)
    loop_archive(folder / "clip-masks.zip", folder / "target-masks.zip", frames)
    return frames


def child(mode: str, folder: Path, frames: int, resident_rows: int) -> dict:
    """Prepare the looped target one way, synthesize `frames` output frames; the numbers as a dict."""
    import cv2

    from services.runtime.frames import FramesReader, decode_frames
    from services.texture.core import prepare_spilled_target, prepare_target, synthesize

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    target = np.load(folder / "target.npz")
    with open(folder / "geometry.pkl", "rb") as handle:
        geometry = pickle.load(handle)
    arrays = (target["mouth"], target["valid"])
    extra = {"jaw_lines": target["jaw"], "head_pose": target["pose"]}
    baseline = resident_mib()
    started = time.perf_counter()
    if mode == "memory":
        # As the servicer did: each archive read whole (store.get_bytes), decoded into one stack, prepared.
        crops = decode_frames((folder / "target-crops.zip").read_bytes())
        masks = decode_frames((folder / "target-masks.zip").read_bytes())
        bank = prepare_target(*arrays, crops, masks, geometry, **extra)
        del crops, masks  # the bank holds views of them
    else:
        spill = Path(tempfile.mkdtemp(prefix="a2v-bench-spill-", dir=folder))
        with (
            FramesReader(str(folder / "target-crops.zip")) as crops,
            FramesReader(str(folder / "target-masks.zip")) as masks,
        ):
            bank = prepare_spilled_target(*arrays, crops, masks, geometry, str(spill), **extra)
    prepared = time.perf_counter() - started
    prepare_peak = peak_mib()
    clip = np.load(folder / "clip.npz")
    drive = np.ascontiguousarray(clip["mouth"][clip["valid"]][::-1])
    frames = min(frames, len(drive))
    synthesize(bank, drive, 0, 4, resident_rows=resident_rows)  # warm up
    digest = hashlib.sha256()
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, frames, CHUNK):
        chunk = synthesize(bank, drive, start, min(start + CHUNK, frames), resident_rows=resident_rows)
        digest.update(chunk.textures.tobytes())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "mode": mode,
        "target_frames": bank.frame_count,
        "baseline_mib": baseline,
        "prepare_s": prepared,
        "prepare_peak_mib": prepare_peak,
        "bank_mib": bank.nbytes / MIB,
        "spill_mib": bank.spill.disk_bytes / MIB if bank.spill is not None else 0.0,
        "frames": frames,
        "ms_per_frame": 1e3 * elapsed / frames,
        "cpu_ms_per_frame": 1e3 * cpu / frames,
        "peak_mib": peak_mib(),
        "textures_sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the looped target")
    parser.add_argument("--frames", type=int, default=300, help="output frames synthesized")
    parser.add_argument("--resident-rows", type=int, default=128, help="rows a spilled synthesis holds")
    parser.add_argument("--modes", default="memory,spilled", help="comma-separated: memory, spilled")
    parser.add_argument("--work", type=Path, help="keep the analysis and the looped target in this folder (reused)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.frames, args.resident_rows)))
        return
    with tempfile.TemporaryDirectory(prefix="a2v-bench-texture-") as name:
        folder = Path(name)
        if args.work is not None:
            folder = args.work
            folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if not (folder / "clip.npz").is_file():
            count = analyse(args.clip, folder)
            print(f"analysed {args.clip.name}: {count} frames in {time.perf_counter() - started:.0f} s")
        frames = build_target(folder, args.minutes)
        stored = sum((folder / f"target-{kind}.zip").stat().st_size for kind in ("crops", "masks"))
        print(
            f"looped target: {frames} frames ({args.minutes:g} min), archives {stored / MIB:.0f} MiB; "
            f"synthesizing {args.frames} output frames in chunks of {CHUNK} on one core"
        )
        header = f"{'mode':>8} {'start MiB':>10} {'prepare s':>10} {'after prepare MiB':>18} {'bank MiB':>9}"
        print(f"{header} {'spill MiB':>10} {'ms/frame':>9} {'CPU ms/frame':>13} {'peak RSS MiB':>13}")
        digests = set()
        for mode in args.modes.split(","):
            command = [sys.executable, "-m", "deploy.bench.texture_memory", "--child", mode, "--folder", str(folder)]
            command += ["--frames", str(args.frames), "--resident-rows", str(args.resident_rows)]
            run = subprocess.run(command, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                print(f"{mode:>8} failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            digests.add(r["textures_sha256"])
            print(
                f"{mode:>8} {r['baseline_mib']:>10.0f} {r['prepare_s']:>10.1f} {r['prepare_peak_mib']:>18.0f} "
                f"{r['bank_mib']:>9.0f} {r['spill_mib']:>10.0f} {r['ms_per_frame']:>9.2f} "
                f"{r['cpu_ms_per_frame']:>13.2f} {r['peak_mib']:>13.0f}",
                flush=True,
            )
        if len(digests) > 1:
            print("the textures differ between the modes")
        elif digests:
            print("textures identical across the modes")


if __name__ == "__main__":
    main()
