"""Composite, issue 14: a chin cut by the frame's edge. Closing the mouth moves the chin up, so the jaw correction reads
pixels from below it; where that is past the frame's bottom edge it must not replicate the edge row (vertical streaks
under the chin, seen on hdtf_edmarkey_512 whose chin runs past the frame): the field falls to 0 at the edge."""

from __future__ import annotations

import cv2
import numpy as np

from services.composite.render import JAW_MOVING, composite_frame, correct_jaw, jaw_taper
from services.runtime.canonical import DEFAULT_GEOMETRY, LowerFaceWarp

SIZE = 256


def cut_face(chin_y: float) -> tuple[np.ndarray, np.ndarray]:
    """A SIZE² frame whose rows are a ramp (blue = row index: where a pixel was read from is visible) with a skin face
    on it, and its landmarks: the template scaled to 200 px, the chin (point 8) at `chin_y`."""
    template = DEFAULT_GEOMETRY.template.astype(np.float64)
    landmarks = template * 200.0 + np.array([28.0, chin_y - 200.0 * template[8, 1]])
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    frame[..., 0] = np.arange(SIZE, dtype=np.uint8)[:, None]
    frame[..., 1] = 90
    frame[..., 2] = 60
    outline = np.round(landmarks[:17] * 16).astype(np.int32)
    skin = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(skin, [outline], 1, lineType=cv2.LINE_8, shift=4)
    frame[..., 1] = np.where(skin > 0, 150, 90)
    frame[..., 2] = np.where(skin > 0, 200, 60)
    return frame, landmarks


def closing(landmarks: np.ndarray, amount: float = 0.08) -> tuple[LowerFaceWarp, np.ndarray]:
    warp = LowerFaceWarp(landmarks.astype(np.float32), DEFAULT_GEOMETRY)
    delta = np.zeros((len(JAW_MOVING), 2))
    delta[:, 1] = -amount * jaw_taper(DEFAULT_GEOMETRY.template)
    return warp, delta


def test_a_chin_past_the_bottom_edge_closes_without_streaks():
    frame, landmarks = cut_face(chin_y=SIZE + 6)  # the chin 6 px below the frame
    warp, delta = closing(landmarks)
    out, moved, shift = correct_jaw(frame, landmarks, warp, delta)
    assert shift > 10  # the chin was asked to move up 16 px
    chin_x = int(round(landmarks[8, 0]))
    for x in (chin_x - 20, chin_x, chin_x + 20):
        column = out[:, x, 0].astype(int)  # the row each output pixel was read from
        # Nothing is read past the frame: the edge row is shown once at most, not replicated upwards.
        assert (column >= SIZE - 1).sum() <= 1, column[-30:]
        # The read rows increase downwards: the field stretches, it never folds.
        assert (np.diff(column[SIZE // 2 :]) >= 0).all(), column[-30:]
    # Well above the edge the chin region still moves up (it reads from below).
    y = int(round(moved[5, 1])) - 10
    assert out[y, chin_x, 0] > y + 3


def test_a_face_inside_the_frame_moves_as_before():
    frame, landmarks = cut_face(chin_y=170)
    warp, delta = closing(landmarks)
    out, _, shift = correct_jaw(frame, landmarks, warp, delta)
    assert shift > 10
    # Far from the edges, the field is the plain one: the chin's rows read the rows about `shift` below them.
    chin_x = int(round(landmarks[8, 0]))
    y = int(round(landmarks[8, 1] - shift))
    assert abs(int(out[y, chin_x, 0]) - landmarks[8, 1]) <= 3


def test_composite_of_a_cut_chin_shows_no_edge_row_under_it():
    frame, landmarks = cut_face(chin_y=SIZE + 6)
    warp = LowerFaceWarp(landmarks.astype(np.float32), DEFAULT_GEOMETRY)
    texture, mask = warp.to_crop(frame)
    mean_jaw = warp.canonical[:17].copy()
    mean_jaw[JAW_MOVING, 1] -= 0.08 * jaw_taper(DEFAULT_GEOMETRY.template)  # the candidates' chin is higher
    result = composite_frame(frame, landmarks, texture, geometry=DEFAULT_GEOMETRY, mean_jaw=mean_jaw, texture_mask=mask)
    assert result.composited and result.jaw_shift_px > 10
    bottom = result.image[SIZE - 12 :, :, 0].astype(int)
    assert (bottom >= SIZE - 1).sum() <= SIZE, "the edge row was replicated upwards"
