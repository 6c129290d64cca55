"""Tests of spn.localize: peak points, foreground boxes. Expected values are worked out by
hand in the comments. (upsample_maps is a torch op of spn.models now: its own tests are in
test_upsample_maps.py; wsolevaluation's boxes are in test_metrics.py and
test_wsol_exactness.py.)"""

import numpy as np
import pytest
import torch

from spn.localize import boxes_from_maps, cell_centres, foreground_masks, peak_points
from spn.metrics import pointing_game
from spn.models import upsample_maps

# Rows x columns. Sum 6 + 6 + 3 + 3 = 18 over 20 pixels: mean 0.9, so the foreground
# (>= 0.9) is (1, 1), (2, 2), (2, 4), (3, 4).
SPARSE = np.array(
    [
        [0, 0, 0, 0, 0],
        [0, 6, 0, 0, 0],
        [0, 0, 6, 0, 3],
        [0, 0, 0, 0, 3],
    ],
    dtype=float,
)


# ----------------------------------------------------------------------------- points


def test_peak_ties_go_to_first_in_row_major_order():
    maps = np.array([[[0, 5, 5], [1, 2, 5]]], dtype=float)  # 5 at (0,1), (0,2), (1,2)
    np.testing.assert_array_equal(peak_points(maps), [[1.0, 0.0]])  # x = column 1, y = row 0


def test_peak_is_column_then_row():
    maps = np.zeros((2, 4, 5))
    maps[0, 2, 3] = 1.0  # row 2, column 3
    maps[1, 0, 0] = -2.0  # the maximum 0 first occurs at row 0, column 1
    np.testing.assert_array_equal(peak_points(maps), [[3.0, 2.0], [1.0, 0.0]])


def test_peak_cell_centre_in_image_coordinates():
    maps = np.zeros((1, 7, 7))
    maps[0, 6, 3] = 1.0
    # stride 224 / 7 = 32: x = (3 + 0.5) * 32 - 0.5 = 111.5, y = (6 + 0.5) * 32 - 0.5 = 207.5
    np.testing.assert_allclose(peak_points(maps, size=(224, 224)), [[111.5, 207.5]])


def test_cell_centres():
    # (index + 0.5) * 224 / 7 - 0.5: cell 0 -> 15.5, cell 3 -> 111.5, cell 6 -> 207.5
    np.testing.assert_allclose(cell_centres([0, 3, 6], 7, 224), [15.5, 111.5, 207.5])
    # 4 cells over 10 pixels (stride 2.5): (i + 0.5) * 2.5 - 0.5 = 0.75, 3.25, 5.75, 8.25
    np.testing.assert_allclose(cell_centres(np.arange(4), 4, 10), [0.75, 3.25, 5.75, 8.25])


def test_peak_cell_centre_non_square():
    maps = np.zeros((1, 2, 4))
    maps[0, 1, 2] = 1.0
    # image 10 rows x 40 columns: x stride 10, y stride 5
    # x = 2.5 * 10 - 0.5 = 24.5, y = 1.5 * 5 - 0.5 = 7.0
    np.testing.assert_allclose(peak_points(maps, size=(10, 40)), [[24.5, 7.0]])


def test_peak_of_a_border_cell_differs_between_the_two_routes():
    # The reviewer's example: a 7 x 7 map over a 224 x 224 image (stride 32), peak in cell (0, 0).
    maps = np.zeros((1, 7, 7))
    maps[0, 0, 0] = 1.0
    # cell centre: (0 + 0.5) * 32 - 0.5 = 15.5 in x and y
    np.testing.assert_allclose(peak_points(maps, size=(224, 224)), [[15.5, 15.5]])
    # align_corners=False: output pixel p samples input (p + 0.5) / 32 - 0.5, clamped to 0 for
    # p <= 15, so pixels 0..15 all hold 1.0 in both directions; the first maximum is (0, 0).
    # align_corners=True: pixel p samples p * 6 / 223, which is 0 only at p = 0: again (0, 0).
    for align_corners in (False, True):
        upsampled = upsample_maps(torch.from_numpy(maps), (224, 224), align_corners=align_corners)
        np.testing.assert_array_equal(peak_points(upsampled), [[0.0, 0.0]])
    # Pointing at box [25, 0, 50, 10] with the default 15 px (TorchRay's rule: Euclidean
    # distance to the nearest pixel of the box, strictly < 15): from (15.5, 15.5) the nearest
    # pixel is (25, 10): dx = 25 - 15.5 = 9.5, dy = 15.5 - 10 = 5.5,
    # sqrt(90.25 + 30.25) = 10.98 < 15: hit; from (0, 0) the nearest pixel is (25, 0), 25 away: miss.
    box = [[[25, 0, 50, 10]]]
    assert pointing_game(peak_points(maps, size=(224, 224)), box, [0], num_classes=1).value == 1.0
    upsampled = upsample_maps(torch.from_numpy(maps), (224, 224))
    assert pointing_game(peak_points(upsampled), box, [0], num_classes=1).value == 0.0


def test_peak_of_the_last_cell_depends_on_align_corners():
    maps = np.zeros((1, 7, 7))
    maps[0, 0, 6] = 1.0  # row 0, column 6 (the right border)
    # cell centre x = 6.5 * 32 - 0.5 = 207.5, y = 15.5
    np.testing.assert_allclose(peak_points(maps, size=(224, 224)), [[207.5, 15.5]])
    # align_corners=False: column p samples (p + 0.5) / 32 - 0.5: p = 207 -> 5.984375 (value
    # 0.984375), p = 208 -> 6.015625, clamped to 6 (value 1.0), and so on up to 223; rows
    # 0..15 are clamped to row 0. First maximum: column 208, row 0.
    tensor = torch.from_numpy(maps)
    np.testing.assert_array_equal(peak_points(upsample_maps(tensor, (224, 224))), [[208.0, 0.0]])
    # align_corners=True: column p samples p * 6 / 223, which reaches 6 only at p = 223
    # (p = 222 -> 5.973, value 0.973); row 0 samples 0. Maximum at (223, 0), the released
    # code's point (PyTorch <= 0.3 bilinear upsampling aligned corners).
    upsampled = upsample_maps(tensor, (224, 224), align_corners=True)
    np.testing.assert_array_equal(peak_points(upsampled), [[223.0, 0.0]])


def test_peak_accepts_tensors_and_empty_batches():
    maps = torch.zeros(1, 3, 3)
    maps[0, 1, 2] = 2.0
    np.testing.assert_array_equal(peak_points(maps), [[2.0, 1.0]])
    assert peak_points(np.zeros((0, 3, 3))).shape == (0, 2)


def test_peak_of_constant_map_is_top_left():
    np.testing.assert_array_equal(peak_points(np.full((1, 3, 4), 7.0)), [[0.0, 0.0]])


# ----------------------------------------------------------------------------- boxes


def test_one_box_around_all_foreground():
    boxes, scores = boxes_from_maps(SPARSE[None])
    # foreground columns 1..4, rows 1..3; mean of the map over it 18 / 4 = 4.5
    np.testing.assert_array_equal(boxes[0], [[1, 1, 4, 3]])
    np.testing.assert_allclose(scores[0], [4.5])


def test_components_are_eight_connected_and_sorted_by_score():
    boxes, scores = boxes_from_maps(SPARSE[None], per_component=True)
    # (1,1)-(2,2) touch diagonally: one component, box x 1..2, y 1..2, mean 6;
    # (2,4)-(3,4): box x 4..4, y 2..3, mean 3. With 4-connectivity there would be 3.
    np.testing.assert_array_equal(boxes[0], [[1, 1, 2, 2], [4, 2, 4, 3]])
    np.testing.assert_allclose(scores[0], [6.0, 3.0])


def test_components_four_connected_like_the_released_code():
    # 4-connectivity (scipy's default structure, as the released localize_from_map): the
    # diagonal pair (1,1)-(2,2) splits. Components in row-major order of first pixels:
    # (1,1) box x 1..1, y 1..1, mean 6; (2,2) box [2,2,2,2], mean 6; (2,4)-(3,4) [4,2,4,3],
    # mean 3. Sorted by score, equal scores keep that order.
    boxes, scores = boxes_from_maps(SPARSE[None], per_component=True, connectivity=4)
    np.testing.assert_array_equal(boxes[0], [[1, 1, 1, 1], [2, 2, 2, 2], [4, 2, 4, 3]])
    np.testing.assert_allclose(scores[0], [6.0, 6.0, 3.0])
    # 8 (the default) joins the diagonal pair: 2 components (see the test above)
    assert len(boxes_from_maps(SPARSE[None], per_component=True, connectivity=8)[0][0]) == 2
    with pytest.raises(ValueError, match="connectivity"):
        boxes_from_maps(SPARSE[None], per_component=True, connectivity=6)


@pytest.mark.parametrize("score, expected", [("sum", [12.0, 6.0]), ("max", [6.0, 3.0]), ("mean", [6.0, 3.0])])
def test_component_scores(score, expected):
    _, scores = boxes_from_maps(SPARSE[None], per_component=True, score=score)
    np.testing.assert_allclose(scores[0], expected)


def test_components_sorted_by_score_not_position():
    maps = np.zeros((1, 3, 6))
    maps[0, 0, 0] = 1.0  # first in row-major order, lower score
    maps[0, 2, 5] = 5.0
    boxes, scores = boxes_from_maps(maps, per_component=True)
    np.testing.assert_array_equal(boxes[0], [[5, 2, 5, 2], [0, 0, 0, 0]])
    np.testing.assert_allclose(scores[0], [5.0, 1.0])


def test_threshold_ratio_of_mean_and_of_max():
    # ratio 5 of the mean: >= 4.5 keeps the two 6s only
    np.testing.assert_array_equal(boxes_from_maps(SPARSE[None], ratio=5.0)[0][0], [[1, 1, 2, 2]])
    # 0.5 of the max: >= 3 keeps all four; 0.6 of the max: >= 3.6 keeps the 6s
    np.testing.assert_array_equal(boxes_from_maps(SPARSE[None], "max", 0.5)[0][0], [[1, 1, 4, 3]])
    np.testing.assert_array_equal(boxes_from_maps(SPARSE[None], "max", 0.6)[0][0], [[1, 1, 2, 2]])


def test_threshold_is_inclusive():
    maps = np.array([[[0.0, 1.0, 2.0]]])  # mean 1: ">=" keeps 1 and 2
    np.testing.assert_array_equal(foreground_masks(maps), [[[False, True, True]]])


@pytest.mark.parametrize("value", [0.0, 2.0, -3.0])
def test_constant_map_is_all_foreground(value):
    boxes, scores = boxes_from_maps(np.full((1, 3, 4), value))
    np.testing.assert_array_equal(boxes[0], [[0, 0, 3, 2]])  # x1 = W - 1, y1 = H - 1
    np.testing.assert_allclose(scores[0], [value])


def test_no_foreground_gives_no_box():
    # constant 2 with ratio 1.5: nothing reaches 3
    for per_component in (False, True):
        boxes, scores = boxes_from_maps(np.full((1, 3, 4), 2.0), ratio=1.5, per_component=per_component)
        assert boxes[0].shape == (0, 4) and scores[0].shape == (0,)


def test_one_pixel_box_at_the_border():
    maps = np.zeros((1, 3, 3))
    maps[0, 2, 2] = 9.0  # mean 1: only the corner pixel
    for per_component in (False, True):
        boxes, _ = boxes_from_maps(maps, per_component=per_component)
        np.testing.assert_array_equal(boxes[0], [[2, 2, 2, 2]])


def test_boxes_batched_and_from_tensors():
    maps = np.stack([SPARSE, np.full((4, 5), 1.0)])
    boxes_np, _ = boxes_from_maps(maps)
    boxes_t, _ = boxes_from_maps(torch.from_numpy(maps).float())
    for a, b, expected in zip(boxes_np, boxes_t, [[[1, 1, 4, 3]], [[0, 0, 4, 3]]], strict=True):
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)


def test_empty_batch():
    boxes, scores = boxes_from_maps(np.zeros((0, 4, 4)), per_component=True)
    assert boxes == [] and scores == []


# ----------------------------------------------------------------------------- bad input


def test_nan_map_rejected_with_clear_error():
    maps = np.zeros((2, 3, 3))
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN"):
        peak_points(maps)
    with pytest.raises(ValueError, match="NaN"):
        boxes_from_maps(torch.from_numpy(maps))


def test_infinite_map_rejected():
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        foreground_masks(maps)


def test_wrong_shapes_rejected():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        peak_points(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        peak_points(np.zeros((1, 3, 3)), size=(0, 5))
    with pytest.raises(ValueError, match="threshold"):
        foreground_masks(np.zeros((1, 3, 3)), threshold="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score"):
        boxes_from_maps(SPARSE[None], per_component=True, score="median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="real numbers"):
        peak_points(np.zeros((1, 3, 3), dtype=bool))
