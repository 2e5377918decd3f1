"""The fast elliptic dilation that texture and composite share gives cv2.dilate's pixels."""

import cv2
import numpy as np

from services.runtime.morphology import dilate_ellipse


def test_the_row_run_dilation_equals_cv2_dilate_by_the_ellipse():
    rng = np.random.default_rng(5)
    for radius in (1, 2, 5, 12, 24):
        mask = (rng.random((int(rng.integers(1, 90)), int(rng.integers(1, 90)))) < 0.02).astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        np.testing.assert_array_equal(dilate_ellipse(mask, radius), cv2.dilate(mask, kernel))
    mask = (rng.random((20, 30)) < 0.1).astype(np.uint8)
    unchanged = dilate_ellipse(mask, 0)
    np.testing.assert_array_equal(unchanged, mask)
    assert unchanged is not mask
