"""Evaluation reports: JSON with every number, and one self-contained HTML file with embedded PNG plots."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")  # before pyplot: no display, and safe in any thread

import matplotlib.pyplot as plt

from evaluation.sync import SyncResult
from services.runtime.errors import InvalidInput, NotFound

Figure = tuple[str, bytes]
"""(caption, PNG bytes)."""


# ---------------------------------------------------------------------------------------------------------
# JSON


def clean(value):
    """A JSON-safe copy: NaN / inf -> None, numpy scalars and arrays -> Python, Paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        return clean(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Mapping, path: str | os.PathLike) -> Path:
    """Write `clean(data)` as indented JSON (strict: no NaN) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2, allow_nan=False) + "\n")
    return path


def load_stage_timings(source: str | os.PathLike | Mapping) -> dict[str, float]:
    """Per-stage seconds from a timings JSON (a path or a parsed dict).

    Accepted: {"stages": {"texture": 12.3, ...}}, the same with {"seconds": 12.3} objects per stage, or a flat
    {"texture": 12.3, ...}. Keys whose value is not a number (or a {"seconds": n} object) are refused.

    Raises:
        NotFound: a missing file. InvalidInput: not JSON, or no / a non-numeric stage time.
    """
    if isinstance(source, Mapping):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise NotFound(f"timings file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"timings file {path} is not JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise InvalidInput(f"timings must be a JSON object, got {type(data).__name__}")
    stages = data.get("stages", data)
    if not isinstance(stages, Mapping) or not stages:
        raise InvalidInput('timings hold no stage (expected {"stages": {"name": seconds, ...}})')
    out: dict[str, float] = {}
    for name, value in stages.items():
        if isinstance(value, Mapping):
            value = value.get("seconds")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"stage {name!r} has no time in seconds >= 0 (got {value!r})")
        out[str(name)] = float(value)
    return out


# ---------------------------------------------------------------------------------------------------------
# plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_series(
    times: np.ndarray, series: Mapping[str, np.ndarray], *, ylabel: str, title: str, secondary: Mapping | None = None
) -> bytes:
    """Lines over time (seconds); `secondary` series go on a right-hand axis (e.g. an audio envelope)."""
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for name, values in series.items():
        ax.plot(times, values, label=name, linewidth=1.0 if name != "real" else 1.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        right = ax.twinx()
        for name, values in secondary.items():
            right.plot(times, values, label=name, color="0.6", linewidth=0.8, alpha=0.8)
        right.set_ylabel("dB")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_cross_correlation(curves: Mapping[str, SyncResult]) -> bytes:
    """Correlation against lag (frames) with each peak marked; positive lag = video behind audio."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, result in curves.items():
        (line,) = ax.plot(result.lags, result.correlation, marker=".", label=f"{name}: lag {result.lag_frames:+d}")
        ax.plot([result.lag_frames], [result.peak_correlation], "o", color=line.get_color(), markersize=8)
    ax.axvline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel("lag (frames; > 0 = video behind audio)")
    ax.set_ylabel("correlation")
    ax.set_title("mouth opening vs speech energy (1-8 Hz)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_lag_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, xlabel: str, title: str) -> bytes:
    """Correlation against lag (frames) for named (lags, correlation) curves, each peak marked."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, (lags, correlation) in curves.items():
        values = np.asarray(correlation, np.float64)
        if not np.isfinite(values).any():
            continue
        peak = int(np.nanargmax(values))
        (line,) = ax.plot(lags, values, marker=".", label=f"{name}: peak at {int(lags[peak]):+d}")
        ax.plot([lags[peak]], [values[peak]], "o", color=line.get_color(), markersize=8)
    ax.axvline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("correlation")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_stage_times(stages: Mapping[str, float]) -> bytes:
    """Horizontal bars of seconds per stage, largest on top."""
    names = sorted(stages, key=stages.get)
    values = [stages[n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.0))
    bars = ax.barh(names, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(f"time per stage (total {sum(values):.1f} s)")
    ax.set_xlim(0, max(values + [1e-9]) * 1.2)
    return _png(fig)


def strip_image(
    rows: Mapping[str, Sequence[tuple[int, np.ndarray]]], *, gap: int = 4, columns: int | None = None
) -> bytes:
    """One PNG: a row of BGR thumbnails per named video (e.g. target over output), frame numbers on top; with
    `columns`, each video's thumbnails wrap onto lines of that many."""
    if not rows or not any(rows.values()):
        raise InvalidInput("no frames for the strip")
    lines = []
    for name, all_thumbs in rows.items():
        step = columns or max(len(all_thumbs), 1)
        groups = [all_thumbs[i : i + step] for i in range(0, len(all_thumbs), step)]
        for thumbs in groups:
            _strip_line(lines, name, thumbs, gap)
    width = max(line.shape[1] for line in lines)
    lines = [cv2.copyMakeBorder(x, 0, gap, 0, width - x.shape[1], cv2.BORDER_CONSTANT, value=(255,) * 3) for x in lines]
    ok, png = cv2.imencode(".png", np.vstack(lines))
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
        raise InvalidInput("cannot encode the strip")
    return png.tobytes()


def _strip_line(lines: list[np.ndarray], name: str, thumbs: Sequence[tuple[int, np.ndarray]], gap: int) -> None:
    """Append one line of labelled thumbnails to `lines`."""
    tiles = []
    for index, thumb in thumbs:
        tile = cv2.copyMakeBorder(np.ascontiguousarray(thumb), 18, 0, 0, gap, cv2.BORDER_CONSTANT, value=(255,) * 3)
        cv2.putText(tile, f"{name} #{index}", (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    if tiles:
        height = max(t.shape[0] for t in tiles)
        tiles = [
            cv2.copyMakeBorder(t, 0, height - t.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=(255,) * 3) for t in tiles
        ]
        lines.append(np.hstack(tiles))


# ---------------------------------------------------------------------------------------------------------
# HTML


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in ("lags", "correlation", "per_frame"):  # curves: plotted, and in the JSON
                continue
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        for i, value in enumerate(data):
            rows.extend(_flatten(value, f"{prefix}[{i}]"))
    else:
        rows.append((prefix, data))
    return rows


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value) or "-"
    return str(value)


def render_html(
    title: str,
    data: Mapping,
    figures: Sequence[Figure],
    *,
    highlights: Sequence[tuple[str, object]] = (),
) -> str:
    """One self-contained HTML page: headline numbers, the figures (inline base64 PNG), then every number."""
    data = clean(data)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
        "figure{margin:1.5em 0}figcaption{color:#444;font-size:13px}img{max-width:100%}"
        ".hl td{font-size:15px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if highlights:
        parts.append("<table class='hl'>")
        for name, value in highlights:
            parts.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(_format(clean(value)))}</td></tr>")
        parts.append("</table>")
    for caption, png in figures:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("<h2>All numbers</h2><table>")
    for name, value in _flatten(data):
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(_format(value))}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_html(text: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
