"""The lip-accuracy command's rules, read from the resynthesis and output reports (the stack run itself is
`make lip-accuracy`: it trains on minutes of footage, too long for the suite)."""

from __future__ import annotations

import pytest

from evaluation.lip_accuracy import CASES, free_speech_rules, main, resynth_rules


def resynth_report(*, r=0.82, amplitude=1.05, lag=1, inner=0.012, outer=0.02, speaker_mean=(0.02, 0.03)) -> dict:
    return {
        "rows": {
            "render": {
                "opening": {"r_lag0": r, "amplitude_ratio": amplitude},
                "landmarks": {"inner": inner, "outer": outer},
            }
        },
        "audio_to_mouth_lag": {"rendered_minus_real_frames": lag},
        "baselines": {
            "speaker_mean_shape": None if speaker_mean is None else {"inner": speaker_mean[0], "outer": speaker_mean[1]}
        },
    }


def test_held_out_rules_follow_the_thresholds_of_the_case():
    grid, obama = CASES["grid"], CASES["obama"]
    rules = {rule.name: rule for rule in resynth_rules(grid, resynth_report())}
    assert rules["held-out: opening r at lag 0"].holds is True and rules["held-out: opening r at lag 0"].value == 0.82
    assert rules["held-out: opening amplitude, x real"].holds is True
    assert rules["held-out: audio-to-mouth lag - real's, frames"].holds is True
    inner, outer = (
        rules["held-out: inner lip error, x speaker's mean shape"],
        rules["held-out: outer lip error, x speaker's mean shape"],
    )
    assert inner.value == pytest.approx(0.6) and inner.holds is True  # at the limit: met
    assert outer.value == pytest.approx(2 / 3) and outer.holds is False
    # The same render against obama's threshold (0.5) and against grid's (0.8).
    r = 0.79
    assert resynth_rules(obama, resynth_report(r=r))[0].holds is True
    assert resynth_rules(grid, resynth_report(r=r))[0].holds is False
    failing = resynth_rules(grid, resynth_report(amplitude=1.2, lag=-2))
    assert [rule.holds for rule in failing[1:3]] == [False, False]
    assert "NOT MET" in failing[1].line() and "wanted 0.85-1.15" in failing[1].line()


def test_what_was_not_measured_is_said_so_not_passed():
    rules = resynth_rules(CASES["grid"], resynth_report(r=float("nan"), lag=None, speaker_mean=None))
    by_name = {rule.name: rule for rule in rules}
    assert by_name["held-out: opening r at lag 0"].holds is None
    assert by_name["held-out: audio-to-mouth lag - real's, frames"].holds is None
    assert by_name["held-out: inner lip error, x speaker's mean shape"].holds is None
    assert "not measured" in by_name["held-out: opening r at lag 0"].line()
    assert by_name["held-out: opening amplitude, x real"].holds is True


def test_free_speech_rules_compare_with_the_target():
    report = {"relative": {"mouth_opening_spread_ratio": 0.9, "lag_minus_target_lag_frames": -1}}
    spread, lag = free_speech_rules(CASES["grid"], report)
    assert (spread.value, spread.holds) == (0.9, True) and (lag.value, lag.holds) == (-1.0, True)
    report = {"relative": {"mouth_opening_spread_ratio": 0.78, "lag_minus_target_lag_frames": None}}
    spread, lag = free_speech_rules(CASES["grid"], report)
    assert spread.holds is False and lag.holds is None


def test_the_cases_train_and_hold_out_different_clips(tmp_path, capsys):
    for case in CASES.values():
        assert case.speaker.startswith("lipacc-")  # a user's own models are never retrained
        assert case.held_out not in case.train and case.target in case.train
    assert CASES["grid"].free_speech and not CASES["obama"].free_speech  # obama_clip1's own lag is ~5 frames
    assert main(["--cases", "grid,nobody"]) == 2
    assert "unknown case(s) nobody" in capsys.readouterr().err
    assert main(["--cases", "grid", "--data", str(tmp_path)]) == 1
    assert "sample data missing" in capsys.readouterr().err
