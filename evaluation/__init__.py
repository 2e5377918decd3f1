"""Quality evaluation: mouth-shape accuracy, model-free audio-visual sync, and image metrics of rendered outputs.

Python API (files in, frozen results out; `as_dict()` is the JSON report):
    evaluate.evaluate_sync(video, audio=None)               lag of any video against its (or a separate) audio
    evaluate.evaluate_output(output, target, audio=None)    sync + mouth sharpness, seam energy, silent flicker
    evaluate.evaluate_shape(clip, model=..., train_videos=) model vs mean-shape and ridge on a held-out clip
    resynth.evaluate_resynth(clip, speaker=, target=, out_video=)  lip accuracy: a held-out clip's speech
                                                            rendered through the stack vs its real mouth
    evaluate.write_reports(result, json_path=, html_path=, timings=)
Pure metrics: `sync` (envelope, cross-correlation), `image` (regions, sharpness, seam, flicker), `shape`
(scores, baselines, `load_speaker_model`), `lips` (the lip meter: opening r / lag / amplitude, aligned lip
landmarks, loudness floor, mean-shape baseline). Command line: `python -m evaluation` (cli.main).
"""
