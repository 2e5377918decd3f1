"""Reports: stage timings input, JSON cleaning, plots and the self-contained HTML page."""

import base64
import json
import math
import re

import numpy as np
import pytest

from evaluation import report
from evaluation.sync import cross_correlation
from services.runtime.errors import InvalidInput, NotFound

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def images_in(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


@pytest.mark.parametrize(
    "data",
    [
        {"stages": {"texture": 12.3, "face": 2}},
        {"stages": {"texture": {"seconds": 12.3}, "face": {"seconds": 2, "frames": 900}}},
        {"texture": 12.3, "face": 2.0},
    ],
)
def test_stage_timings_in_every_accepted_layout(data, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    assert report.load_stage_timings(path) == {"texture": 12.3, "face": 2.0}
    assert report.load_stage_timings(data) == {"texture": 12.3, "face": 2.0}


def test_bad_stage_timings(tmp_path):
    with pytest.raises(NotFound):
        report.load_stage_timings(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not JSON"):
        report.load_stage_timings(tmp_path / "bad.json")
    for data, message in [
        ({"stages": {}}, "no stage"),
        ({"stages": {"face": "fast"}}, "'face'"),
        ({"stages": {"face": -1}}, ">= 0"),
        ({"stages": {"face": True}}, "'face'"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            report.load_stage_timings(data)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="JSON object"):
        report.load_stage_timings(tmp_path / "list.json")


def test_clean_makes_strict_json():
    data = {"a": math.nan, "b": np.float32(1.5), "c": np.arange(3), "d": [math.inf, (1, np.int64(2))], 3: None}
    assert report.clean(data) == {"a": None, "b": 1.5, "c": [0, 1, 2], "d": [None, [1, 2]], "3": None}
    json.dumps(report.clean(data), allow_nan=False)


def test_the_html_page_embeds_every_plot_and_lists_every_number(tmp_path):
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(300)
    sync = cross_correlation(signal, np.roll(signal, -2), fps=30.0)
    thumbs = [(i, rng.integers(0, 256, (80, 60 + 10 * i, 3), dtype=np.uint8)) for i in range(3)]
    figures = [
        (
            "opening",
            report.plot_series(
                np.arange(300) / 30,
                {"real": signal, "model": 0.5 * signal},
                ylabel="x",
                title="t",
                secondary={"energy": signal},
            ),
        ),
        ("xcorr", report.plot_cross_correlation({"clip": sync})),
        ("stages", report.plot_stage_times({"face": 7.0, "texture": 12.3})),
        ("strip", report.strip_image({"target": thumbs, "output": thumbs[:2]})),
    ]
    data = {"sync": sync.as_dict(), "ratio": math.nan, "nested": {"list": [1.0, 2.0]}}
    page = report.render_html("Eval <report>", data, figures, highlights=[("lag", sync.lag_frames)])
    pngs = images_in(page)
    assert len(pngs) == 4 and all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert "<title>Eval &lt;report&gt;</title>" in page
    assert "<td>sync.lag_frames</td><td>2</td>" in page and "<td>ratio</td><td>n/a</td>" in page
    assert "sync.correlation" not in page  # curves are plotted, not tabulated
    path = report.write_html(page, tmp_path / "sub" / "r.html")
    assert path.read_text() == page
    written = report.write_json(data, tmp_path / "sub" / "r.json")
    assert json.loads(written.read_text())["ratio"] is None


def test_the_strip_needs_frames():
    with pytest.raises(InvalidInput, match="no frames"):
        report.strip_image({"output": []})
