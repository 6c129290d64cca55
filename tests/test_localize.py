"""Tests of spn.localize: peak points, foreground boxes, upsampling. Expected values are
worked out by hand in the comments."""

import numpy as np
import pytest
import torch

from spn.localize import boxes_from_maps, foreground_masks, peak_points, upsample_maps
from spn.metrics import pointing_game

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
    np.testing.assert_allclose(peak_points(maps, image_size=(224, 224)), [[111.5, 207.5]])


def test_peak_cell_centre_non_square():
    maps = np.zeros((1, 2, 4))
    maps[0, 1, 2] = 1.0
    # image 10 rows x 40 columns: x stride 10, y stride 5
    # x = 2.5 * 10 - 0.5 = 24.5, y = 1.5 * 5 - 0.5 = 7.0
    np.testing.assert_allclose(peak_points(maps, image_size=(10, 40)), [[24.5, 7.0]])


def test_peak_of_a_border_cell_differs_between_the_two_routes():
    # The reviewer's example: a 7 x 7 map over a 224 x 224 image (stride 32), peak in cell (0, 0).
    maps = np.zeros((1, 7, 7))
    maps[0, 0, 0] = 1.0
    # cell centre: (0 + 0.5) * 32 - 0.5 = 15.5 in x and y
    np.testing.assert_allclose(peak_points(maps, image_size=(224, 224)), [[15.5, 15.5]])
    # align_corners=False: output pixel p samples input (p + 0.5) / 32 - 0.5, clamped to 0 for
    # p <= 15, so pixels 0..15 all hold 1.0 in both directions; the first maximum is (0, 0).
    # align_corners=True: pixel p samples p * 6 / 223, which is 0 only at p = 0: again (0, 0).
    for align_corners in (False, True):
        upsampled = upsample_maps(maps, (224, 224), align_corners=align_corners)
        np.testing.assert_array_equal(peak_points(upsampled), [[0.0, 0.0]])
    # Pointing at box [25, 0, 50, 10] with the default 15 px (Euclidean): from (15.5, 15.5)
    # dx = 25 - 15.5 = 9.5, dy = 15.5 - 10 = 5.5, sqrt(90.25 + 30.25) = 10.98 <= 15: hit;
    # from (0, 0) dx = 25 > 15: miss.
    box = [[[25, 0, 50, 10]]]
    assert pointing_game(peak_points(maps, image_size=(224, 224)), [0], box)["accuracy"] == 1.0
    assert pointing_game(peak_points(upsample_maps(maps, (224, 224))), [0], box)["accuracy"] == 0.0


def test_peak_of_the_last_cell_depends_on_align_corners():
    maps = np.zeros((1, 7, 7))
    maps[0, 0, 6] = 1.0  # row 0, column 6 (the right border)
    # cell centre x = 6.5 * 32 - 0.5 = 207.5, y = 15.5
    np.testing.assert_allclose(peak_points(maps, image_size=(224, 224)), [[207.5, 15.5]])
    # align_corners=False: column p samples (p + 0.5) / 32 - 0.5: p = 207 -> 5.984375 (value
    # 0.984375), p = 208 -> 6.015625, clamped to 6 (value 1.0), and so on up to 223; rows
    # 0..15 are clamped to row 0. First maximum: column 208, row 0.
    np.testing.assert_array_equal(peak_points(upsample_maps(maps, (224, 224))), [[208.0, 0.0]])
    # align_corners=True: column p samples p * 6 / 223, which reaches 6 only at p = 223
    # (p = 222 -> 5.973, value 0.973); row 0 samples 0. Maximum at (223, 0), the released
    # code's point (PyTorch <= 0.3 bilinear upsampling aligned corners).
    np.testing.assert_array_equal(peak_points(upsample_maps(maps, (224, 224), align_corners=True)), [[223.0, 0.0]])


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
    for a, b, expected in zip(boxes_np, boxes_t, [[[1, 1, 4, 3]], [[0, 0, 4, 3]]]):
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)


def test_empty_batch():
    boxes, scores = boxes_from_maps(np.zeros((0, 4, 4)), per_component=True)
    assert boxes == [] and scores == []


# ----------------------------------------------------------------------------- upsampling


def test_upsample_bilinear_half_pixel():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    out = upsample_maps(maps, (4, 4))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 4)
    # align_corners=False: output columns sample input x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
    # row 0 -> [1, 0.75*1 + 0.25*3, 0.25*1 + 0.75*3, 3] = [1, 1.5, 2.5, 3]
    # row 1 = 0.75 * row0 + 0.25 * [0, 1, 3, 4] = [0.75, 1.375, 2.625, 3.25]
    np.testing.assert_allclose(out[0, 0].numpy(), [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(out[0, 1].numpy(), [0.75, 1.375, 2.625, 3.25])


def test_upsample_align_corners():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    out = upsample_maps(maps, (4, 4), align_corners=True)
    # align_corners=True: output index p samples input p * (2 - 1) / (4 - 1) = p / 3:
    # row 0 -> [1, 1 + 2/3, 1 + 4/3, 3]; row 3 = input row 1 -> [0, 4/3, 8/3, 4]
    np.testing.assert_allclose(out[0, 0].numpy(), [1.0, 5 / 3, 7 / 3, 3.0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 3].numpy(), [0.0, 4 / 3, 8 / 3, 4.0], rtol=1e-6)
    # row 1 samples input row 1/3: 2/3 of row 0 + 1/3 of row 1 -> column 0: 2/3 * 1 + 0 = 2/3
    assert out[0, 1, 0].item() == pytest.approx(2 / 3)


def test_upsample_numpy_in_numpy_out_and_empty():
    out = upsample_maps(np.ones((2, 3, 3)), (5, 7))
    assert isinstance(out, np.ndarray) and out.shape == (2, 5, 7)
    np.testing.assert_allclose(out, 1.0)
    assert upsample_maps(torch.zeros(0, 3, 3), (5, 5)).shape == (0, 5, 5)


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
    with pytest.raises(ValueError, match=r"image_size"):
        peak_points(np.zeros((1, 3, 3)), image_size=(0, 5))
    with pytest.raises(ValueError, match="threshold"):
        foreground_masks(np.zeros((1, 3, 3)), threshold="median")
    with pytest.raises(ValueError, match="score"):
        boxes_from_maps(SPARSE[None], per_component=True, score="median")
    with pytest.raises(TypeError, match="real numbers"):
        peak_points(np.zeros((1, 3, 3), dtype=bool))
