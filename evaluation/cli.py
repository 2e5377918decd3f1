"""Command line of the quality evaluation (sync, output, shape, resynth): each writes a JSON and an HTML report.

    python -m evaluation sync VIDEO [--audio AUDIO]
    python -m evaluation output OUT.mp4 --target TARGET.mp4 [--audio AUDIO] [--timings T.json] [--job ID]
    python -m evaluation shape --models-dir DIR --speaker NAME [--version N] --clip HELDOUT.mp4
        --train-video TRAIN.mp4 [--train-video ...]
    python -m evaluation resynth --speaker NAME --clip HELDOUT.mp4 --target TARGET.mp4 [--retiming]
        [--seconds S] [--out-video OUT.mp4]          (renders through the stack: `a2v up`)
    python -m evaluation resynth --clip HELDOUT.mp4 --rendered OUT.mp4 [--job ID]

Reports go to --json / --html (default out/eval/<name>-<command>.json / .html); progress goes to stderr, a
one-line summary to stdout. Exit status 0 on success, 1 with a one-line reason on bad input (missing file,
no face, undecodable video, too short to measure), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evaluation.sync import DEFAULT_MAX_LAG
from services.runtime.errors import A2VError, InvalidInput

DEFAULT_OUT = Path("out/eval")


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m evaluation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", type=Path, help="JSON report path (default out/eval/<name>-<command>.json)")
        p.add_argument("--html", type=Path, help="HTML report path (default out/eval/<name>-<command>.html)")
        p.add_argument("--no-html", action="store_true", help="write the JSON report only")
        p.add_argument("--timings", type=Path, help='stage timings JSON ({"stages": {"texture": 12.3, ...}})')
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    def lag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-lag", type=int, default=DEFAULT_MAX_LAG, help="lag range, frames (default 15)")

    p = sub.add_parser("sync", help="audio-visual lag of any video (ours or real footage)")
    p.add_argument("video", type=Path, help="the video whose mouth is measured against its audio")
    p.add_argument("--audio", type=Path, help="separate audio (time 0 = the video's time 0); default its own")
    lag(p)
    outputs(p)

    p = sub.add_parser("output", help="sync and image metrics of a rendered output against its target footage")
    p.add_argument("output", type=Path, help="the rendered mp4 (a2v run's output)")
    p.add_argument("--target", type=Path, required=True, help="the real target footage (same resolution)")
    p.add_argument("--audio", type=Path, help="the output's audio, if not its own track")
    p.add_argument("--strip-frames", type=int, default=6, help="frames in the target/output strip (default 6)")
    p.add_argument(
        "--job",
        help="the render job that made OUT: its report (frames synthesized, faded, kept; worst frames) and its "
        "retiming map, so re-timed renders are compared frame by frame with the target frames they show",
    )
    p.add_argument(
        "--no-artifacts",
        action="store_true",
        help="skip the artifact measure (foreign colour and edges per frame against the target frame; without "
        "--job, output frame i is compared with target frame i: a render made with --no-retiming)",
    )
    lag(p)
    outputs(p)

    p = sub.add_parser("shape", help="mouth-shape accuracy of a speaker model and baselines on a held-out clip")
    p.add_argument("--clip", type=Path, required=True, help="held-out video of the speaker")
    p.add_argument(
        "--models-dir", type=Path, help="models folder (<dir>/<speaker>/<version>/); omit for baselines only"
    )
    p.add_argument("--speaker", help="speaker name (required with --models-dir)")
    p.add_argument("--version", type=int, help="model version (default the latest)")
    p.add_argument("--train-video", type=Path, action="append", default=[], help="training video for ridge (repeat)")
    p.add_argument("--window-rows", type=int, default=20, help="ridge window half-width, 10 ms rows (default 20)")
    outputs(p)

    p = sub.add_parser(
        "resynth",
        help="lip accuracy: render a held-out clip's speech and compare the mouth with the clip's real one",
    )
    p.add_argument("--clip", type=Path, required=True, help="held-out video of the speaker, with its own speech")
    p.add_argument("--speaker", help="speaker model to render with (required unless --rendered / --job)")
    p.add_argument("--target", type=Path, help="video to render onto (required unless --rendered / --job)")
    p.add_argument("--rendered", type=Path, help="measure this existing render of the clip's audio instead")
    p.add_argument("--job", help="a finished render job: its predicted shapes (model row), and its video")
    p.add_argument("--out-video", type=Path, help="where the render goes (default out/eval/<clip>-resynth.mp4)")
    p.add_argument("--retiming", action="store_true", help="render with head-motion re-timing (default off)")
    p.add_argument("--seconds", type=float, help="render only the clip's first S seconds of speech (>= 2)")
    p.add_argument("--strip-frames", type=int, default=6, help="frame pairs in the real/render strip (default 6)")
    lag(p)
    outputs(p)
    return parser


def _default(name: str, command: str, suffix: str) -> Path:
    return DEFAULT_OUT / f"{name}-{command}{suffix}"


def run(args: argparse.Namespace) -> int:
    from evaluation import evaluate
    from evaluation.report import load_stage_timings

    progress = not args.quiet
    timings = load_stage_timings(args.timings) if args.timings else None
    if args.command == "sync":
        name = args.video.stem
        result = evaluate.evaluate_sync(args.video, audio=args.audio, max_lag=args.max_lag, progress=progress)
        s = result.video.sync
        summary = (
            f"{args.video.name}: lag {s.lag_frames:+d} frames ({s.lag_ms:+.0f} ms, > 0 = video behind audio), "
            f"peak correlation {s.peak_correlation:.3f}, confidence {s.confidence:.3f}"
        )
    elif args.command == "output":
        name = args.output.stem
        if args.strip_frames < 0:
            raise InvalidInput(f"--strip-frames must be >= 0, got {args.strip_frames}")
        job, frame_map = (None, None) if args.job is None else evaluate.render_job_report(args.job)
        result = evaluate.evaluate_output(
            args.output,
            args.target,
            audio=args.audio,
            max_lag=args.max_lag,
            strip_frames=args.strip_frames,
            progress=progress,
            artifacts=not args.no_artifacts,
            frame_map=frame_map,
            job=job,
        )
        rel = result.relative()
        s = result.output.sync
        lag = f"lag {s.lag_frames:+d} frames" if s is not None else f"no lag ({result.output.sync_error})"
        summary = (
            f"{args.output.name}: {lag}, sharpness x{rel['mouth_sharpness_ratio']:.2f}, "
            f"seam x{rel['seam_energy_ratio']:.2f}, silent flicker x{rel['flicker_silent_ratio']:.2f}, "
            f"mouth-opening spread x{rel['mouth_opening_spread_ratio']:.2f} of the target"
        )
        if result.artifacts is not None:
            a = result.artifacts.as_dict()
            summary += f"; artifacts p95 {a['p95']:.3f}, max {a['max']:.3f}, {len(a['flagged_frames'])} frames flagged"
        if result.artifacts_skipped is not None:
            summary += f"; artifacts not measured: {result.artifacts_skipped}"
        if job is not None:
            summary += (
                f"; job: {100 * job['synthesized_share']:.1f} % synthesized, {100 * job['faded_share']:.1f} % faded, "
                f"{100 * job['passthrough_share']:.1f} % the target's own mouth"
            )
    elif args.command == "resynth":
        from evaluation.resynth import evaluate_resynth

        name = args.clip.stem
        if args.strip_frames < 0:
            raise InvalidInput(f"--strip-frames must be >= 0, got {args.strip_frames}")
        if args.rendered is None and args.job is None and not (args.speaker and args.target):
            raise InvalidInput("give --speaker and --target to render, or --rendered OUT.mp4 (or --job ID)")
        result = evaluate_resynth(
            args.clip,
            speaker=args.speaker,
            target=args.target,
            rendered=args.rendered,
            out_video=args.out_video or _default(name, args.command, ".mp4"),
            job_id=args.job,
            retiming=args.retiming,
            seconds=args.seconds,
            max_lag=args.max_lag,
            strip_frames=args.strip_frames,
            progress=progress,
        )
        summary = result.summary()
    else:
        name = args.clip.stem
        model = None
        if args.models_dir is not None:
            if not args.speaker:
                raise InvalidInput("--speaker is required with --models-dir")
            from evaluation.shape import load_speaker_model

            model = load_speaker_model(args.models_dir, args.speaker, args.version)
        elif not args.train_video:
            raise InvalidInput("give --models-dir and --speaker, or --train-video for the baselines")
        result = evaluate.evaluate_shape(
            args.clip, model=model, train_videos=args.train_video, window_rows=args.window_rows, progress=progress
        )
        summary = f"{args.clip.name}: " + "; ".join(
            f"{n} error {s.landmark_error:.3f}, r {s.opening_correlation:.3f}"
            for n, s in result.evaluation.scores.items()
        )
    json_path = args.json or _default(name, args.command, ".json")
    html_path = None if args.no_html else (args.html or _default(name, args.command, ".html"))
    evaluate.write_reports(result, json_path=json_path, html_path=html_path, timings=timings)
    print(summary)
    print(f"report: {json_path}" + (f", {html_path}" if html_path else ""))
    return 0


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run one evaluation command; returns the exit status (0 ok, 1 bad input, 2 usage).

    `prog` names the command in usage messages (e.g. "a2v eval" when another CLI delegates here).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parser(prog).parse_args(argv)
    try:
        return run(args)
    except A2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
