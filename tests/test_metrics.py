"""Tests of spn.metrics. Every expected number is worked out by hand in the comments from
the metric's definition (for MaxBoxAcc: wsolevaluation's rules, see docs/metrics.md)."""

import numpy as np
import pytest
import torch

from spn.metrics import (
    BoxAccuracy,
    CorLoc,
    LocalizationAccuracy,
    ObjectEnergy,
    PointingGame,
    box_iou,
    corloc,
    evaluate,
    loc_accuracy,
    max_box_acc,
    max_box_acc_v2,
    normalize_scoremap,
    object_energy,
    point_box_distance,
    pointing_game,
    quantize_scoremap,
    threshold_cuts,
    wsol_boxes,
)

# ============================================================================ box IoU


def test_iou_pixel_inclusive_plus_one():
    # [0,0,9,9] has 10 x 10 = 100 pixels, [0,0,9,4] 10 x 5 = 50, all inside: 50 / 100
    np.testing.assert_allclose(box_iou([[0, 0, 9, 9]], [[0, 0, 9, 4]]), [[0.5]])
    # [0,0,1,1] and [1,1,2,2]: 4 pixels each, they share pixel (1, 1): 1 / (4 + 4 - 1) = 1/7
    np.testing.assert_allclose(box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]]), [[1 / 7]])


def test_iou_one_pixel_boxes():
    # the same pixel: 1 / 1; neighbouring pixels: nothing shared
    np.testing.assert_allclose(box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3], [4, 3, 4, 3]]), [[1.0, 0.0]])


def test_iou_all_pairs_and_empty():
    ious = box_iou([[0, 0, 9, 9], [20, 20, 29, 29]], [[0, 0, 9, 4], [20, 20, 29, 29], [100, 100, 101, 101]])
    np.testing.assert_allclose(ious, [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_reversed_box_rejected():
    with pytest.raises(ValueError, match=r"x1 >= x0 and y1 >= y0"):
        box_iou([[5, 0, 4, 3]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"x1 >= x0 and y1 >= y0"):
        box_iou([[0, 0, 1, 1]], [[0, 3, 1, 2]])
    with pytest.raises(ValueError, match=r"\(m, 4\)"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        box_iou([[0, 0, np.nan, 1]], [[0, 0, 1, 1]])


# ============================================================================ pointing game

CORNER_BOX = [np.array([[10, 10, 20, 20]])]


def test_point_box_distance_euclidean_and_linf():
    # (31, 31) is 11 right and 11 below the corner (20, 20)
    np.testing.assert_allclose(point_box_distance([[31, 31]], CORNER_BOX[0]), [[np.sqrt(242)]])
    np.testing.assert_allclose(point_box_distance([[31, 31]], CORNER_BOX[0], "linf"), [[11.0]])
    np.testing.assert_allclose(point_box_distance([[15, 12]], CORNER_BOX[0]), [[0.0]])  # inside


def test_pointing_euclidean_and_released_differ_at_a_corner():
    # Euclidean distance sqrt(11^2 + 11^2) = 15.56 > 15: miss; L-inf 11 <= 15: hit
    assert pointing_game([[31, 31]], [0], CORNER_BOX)["accuracy"] == 0.0
    assert pointing_game([[31, 31]], [0], CORNER_BOX, norm="linf")["accuracy"] == 1.0
    assert pointing_game([[31, 31]], [0], CORNER_BOX, norm="released")["accuracy"] == 1.0


@pytest.mark.parametrize(
    "point, hit",
    [
        ((35.0, 15.0), True),  # 15 right of the edge x1 = 20: exactly the tolerance
        ((35.5, 15.0), False),  # 15.5
        ((29.0, 32.0), True),  # dx 9, dy 12: sqrt(81 + 144) = 15 exactly
        ((15.0, 15.0), True),  # inside
        ((-5.0, 15.0), True),  # 15 left of x0 = 10
    ],
)
def test_pointing_tolerance_is_inclusive(point, hit):
    assert pointing_game([point], [0], CORNER_BOX)["accuracy"] == float(hit)


def test_pointing_tolerance_parameter():
    # (22, 15) is 2 right of the box
    assert pointing_game([[22, 15]], [0], CORNER_BOX, tolerance=2)["accuracy"] == 1.0
    assert pointing_game([[22, 15]], [0], CORNER_BOX, tolerance=1.9)["accuracy"] == 0.0
    # a one-pixel box with no tolerance: only that pixel hits
    assert pointing_game([[5, 5], [6, 5]], [0, 0], [[[5, 5, 5, 5]]] * 2, tolerance=0)["per_class"] == {0: 0.5}


def test_pointing_mean_over_classes():
    points = [[15, 15], [100, 100], [12, 12]]
    classes = [0, 0, 1]
    boxes = [CORNER_BOX[0]] * 3
    result = pointing_game(points, classes, boxes)
    # class 0: 1 hit of 2 -> 0.5; class 1: 1 of 1 -> 1.0; mean 0.75 (pooled it would be 2/3)
    assert result["per_class"] == {0: 0.5, 1: 1.0}
    assert result["accuracy"] == pytest.approx(0.75)
    assert (result["hits"], result["queries"]) == (2, 3)


def test_pointing_counts_only_boxes_of_the_cued_class():
    boxes = [np.array([[10, 10, 20, 20], [200, 200, 210, 210]])]
    labels = [np.array([1, 0])]
    # the point is on the class-1 box, the query cues class 0: miss
    assert pointing_game([[15, 15]], [0], boxes, labels)["accuracy"] == 0.0
    assert pointing_game([[15, 15]], [1], boxes, labels)["accuracy"] == 1.0
    # class 2 has no box in the image: a miss
    assert pointing_game([[15, 15]], [2], boxes, labels)["accuracy"] == 0.0


def test_pointing_streaming_matches_one_shot_and_empty_batches():
    metric = PointingGame()
    metric.update(np.zeros((0, 2)), [], [])  # empty batch
    assert metric.compute()["accuracy"] == 0.0 and metric.compute()["queries"] == 0
    batches = [
        (torch.tensor([[15.0, 15.0]]), torch.tensor([0]), CORNER_BOX),
        ({"points": [[100, 100], [12, 12]], "cue_labels": [0, 1], "gt_boxes": CORNER_BOX * 2}),
    ]
    assert evaluate(metric, batches)["accuracy"] == pytest.approx(0.75)


def test_pointing_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        pointing_game([[1, 2, 3]], [0], CORNER_BOX)
    with pytest.raises(ValueError, match="one entry per image"):
        pointing_game([[1, 2]], [0], CORNER_BOX * 2)
    with pytest.raises(ValueError, match="cue_labels"):
        pointing_game([[1, 2]], [0, 1], CORNER_BOX)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game([[np.nan, 2]], [0], CORNER_BOX)
    with pytest.raises(ValueError, match="norm"):
        PointingGame(norm="l2")


# ============================================================================ CorLoc


def test_corloc_mean_over_classes():
    pred = [[[0, 0, 9, 9]], [[0, 0, 9, 9]], [[50, 50, 60, 60], [0, 0, 9, 9]]]
    gt = [[[0, 0, 9, 4]], [[0, 0, 9, 3]], [[0, 0, 9, 9]]]
    result = corloc(pred, [0, 0, 1], gt)
    # class 0: IoU 50/100 = 0.5 (correct: >=), IoU 40/100 = 0.4 (wrong) -> 0.5
    # class 1: the second predicted box matches exactly -> 1.0; mean 0.75 (pooled 2/3)
    assert result["per_class"] == {0: 0.5, 1: 1.0}
    assert result["corloc"] == pytest.approx(0.75)
    assert (result["correct"], result["queries"]) == (2, 3)


def test_corloc_uses_boxes_of_the_cued_class_only():
    gt = [np.array([[0, 0, 9, 9], [20, 20, 29, 29]])]
    labels = [np.array([1, 0])]
    assert corloc([[[0, 0, 9, 9]]], [0], gt, labels)["corloc"] == 0.0
    assert corloc([[[0, 0, 9, 9]]], [1], gt, labels)["corloc"] == 1.0


def test_corloc_no_prediction_is_wrong_and_streaming():
    metric = CorLoc()
    metric.update([np.zeros((0, 4))], [0], [[[0, 0, 9, 9]]])
    metric.update(np.array([[0, 0, 9, 9]]), np.array([0]), np.array([[0, 0, 9, 9]]))  # (B, 4) arrays
    metric.update([], [], [])
    assert metric.compute()["per_class"] == {0: 0.5}


def test_corloc_threshold():
    # IoU 0.4 passes at 0.4
    assert corloc([[[0, 0, 9, 9]]], [0], [[[0, 0, 9, 3]]], iou_threshold=0.4)["corloc"] == 1.0


# ============================================================================ MaxBoxAcc: building blocks


def test_normalize_and_quantize_like_wsolevaluation():
    np.testing.assert_allclose(normalize_scoremap(np.array([[2.0, 4.0, 3.0]])), [[0.0, 1.0, 0.5]])
    np.testing.assert_array_equal(normalize_scoremap(np.full((2, 2), 7.0)), np.zeros((2, 2)))  # constant -> 0
    # 255 * m truncated: 0.5 -> 127.5 -> 127, 0.999 -> 254.7 -> 254
    np.testing.assert_array_equal(quantize_scoremap(np.array([0.0, 0.5, 0.999, 1.0])), [0, 127, 254, 255])


def test_threshold_cuts_truncate():
    # int(t * 255): 0 -> 0, 0.5 -> 127.5 -> 127, 0.99 -> 252.45 -> 252; on an all-zero map every cut is 0
    np.testing.assert_array_equal(threshold_cuts(np.array([0.0, 0.5, 0.99]), 255), [0, 127, 252])
    np.testing.assert_array_equal(threshold_cuts(np.array([0.0, 0.5, 0.99]), 0), [0, 0, 0])


def test_wsol_boxes_strict_threshold_and_border_clipping():
    # 4 x 8 map: a 4 x 4 block of 0.5 (columns 0..3), one pixel of 1.0 at row 0, column 7.
    # uint8: block 127, pixel 255. Thresholds 0 and 0.5 -> cuts 0 and int(127.5) = 127.
    scoremap = np.zeros((4, 8))
    scoremap[:, 0:4] = 0.5
    scoremap[0, 7] = 1.0
    at_zero, at_half = wsol_boxes(scoremap, [0.0, 0.5])
    # cut 0: block (16 px) and pixel (1 px); the largest is the block, columns 0..3, rows 0..3:
    # (x, y, x + w, y + h) = (0, 0, 4, 4), then y1 clipped to H - 1 = 3 -> [0, 0, 4, 3]
    np.testing.assert_array_equal(at_zero, [[0, 0, 4, 3]])
    # cut 127: 127 > 127 is false (strict), only the pixel: (7, 0, 8, 1), x1 clipped to 7 -> [7, 0, 7, 1]
    np.testing.assert_array_equal(at_half, [[7, 0, 7, 1]])


def test_wsol_boxes_every_region_and_no_foreground():
    scoremap = np.zeros((4, 8))
    scoremap[:, 0:4] = 0.5
    scoremap[0, 7] = 1.0
    (both,) = wsol_boxes(scoremap, [0.0], multi_contour=True)
    np.testing.assert_array_equal(both, [[0, 0, 4, 3], [7, 0, 7, 1]])
    # a constant map normalises to zeros: no pixel > 0 at any cut -> the box [0, 0, 0, 0]
    for boxes in wsol_boxes(np.full((4, 8), 3.0), [0.0, 0.5], multi_contour=True):
        np.testing.assert_array_equal(boxes, [[0, 0, 0, 0]])


def test_wsol_largest_region_counts_the_area_inside_its_outline():
    # 8 x 14 map: a ring (border of a 5 x 5 square, 16 px, rows/columns 0..4) and a solid
    # 4 x 5 block (20 px, rows 0..3, columns 7..11). Inside its outline the ring covers 25 px,
    # more than 20, so it is the largest region, as with cv2.contourArea (16 vs 12).
    scoremap = np.zeros((8, 14))
    scoremap[0:5, 0:5] = 1.0
    scoremap[1:4, 1:4] = 0.0
    scoremap[0:4, 7:12] = 1.0
    (boxes,) = wsol_boxes(scoremap, [0.0])
    np.testing.assert_array_equal(boxes, [[0, 0, 5, 5]])  # ring: columns 0..4 -> x1 = 5, rows 0..4 -> y1 = 5


def test_wsol_largest_region_is_by_pixel_count():
    # documented difference from OpenCV: a 1 x 10 line (10 px, cv2.contourArea 0) against a
    # 2 x 2 square (4 px, contourArea 1). We keep the line: row 0, columns 0..9 ->
    # (0, 0, 9 + 1, 0 + 1) = [0, 0, 10, 1] (W = 12, H = 6: no clipping).
    scoremap = np.zeros((6, 12))
    scoremap[0, 0:10] = 1.0
    scoremap[3:5, 3:5] = 1.0
    (boxes,) = wsol_boxes(scoremap, [0.0])
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 1]])


def test_wsol_v2_boxes_holes_like_retr_tree():
    # 9 x 9 map: rows/columns 0..6 on, except the single pixel (3, 3).
    # outer contour: pixels 0..6 -> [0, 0, 7, 7]; hole contour: the pixels around (3, 3),
    # rows/columns 2..4 -> [2, 2, 5, 5]
    scoremap = np.zeros((9, 9))
    scoremap[0:7, 0:7] = 1.0
    scoremap[3, 3] = 0.0
    (with_holes,) = wsol_boxes(scoremap, [0.0], multi_contour=True)
    np.testing.assert_array_equal(with_holes, [[0, 0, 7, 7], [2, 2, 5, 5]])
    (without,) = wsol_boxes(scoremap, [0.0], multi_contour=True, include_holes=False)
    np.testing.assert_array_equal(without, [[0, 0, 7, 7]])


# ============================================================================ MaxBoxAcc / V2


def two_region_map() -> np.ndarray:
    """10 x 10: R1 = rows 2..4, columns 2..4 at 1.0 (9 px); R2 = rows 7..8, columns 6..9 at
    0.5 (8 px, on the right border). uint8: R1 255, R2 127. With interval 0.01, the cut at
    t = 0.49 is int(124.95) = 124 (R2 in), at t = 0.50 it is int(127.5) = 127 (R2 out)."""
    scoremap = np.zeros((10, 10))
    scoremap[2:5, 2:5] = 1.0
    scoremap[7:9, 6:10] = 0.5
    return scoremap


def test_max_box_acc_largest_region():
    # every threshold: the largest region is R1 (9 > 8 px) -> box (2, 2, 5, 5);
    # IoU with gt [2, 2, 4, 4] = 9 / 16 = 0.5625 >= 0.5 at every threshold
    metric = BoxAccuracy(version=1)
    metric.update(two_region_map()[None], [np.array([[2, 2, 4, 4]])])
    result = metric.compute()
    assert result["max_box_acc"] == 1.0
    assert result["box_acc"][0.5] == [1.0] * 100
    assert result["best_threshold"] == {0.5: 0.0}
    # the box of R2 is never the one chosen: gt on R2 -> IoU 0
    assert max_box_acc(two_region_map()[None], [[[6, 7, 9, 8]]]) == 0.0


def test_max_box_acc_v2_every_region_and_three_deltas():
    # gt = R2 exactly, [6, 7, 9, 8]. For t <= 0.49 the boxes include R2's (6, 7, min(10, 9), 9)
    # = [6, 7, 9, 9]: IoU = 8 / 12 = 0.667 (>= 0.3, >= 0.5, < 0.7). For t >= 0.5 only R1's box.
    metric = BoxAccuracy(version=2)
    metric.update(two_region_map()[None], [[[6, 7, 9, 8]]])
    result = metric.compute()
    assert result["per_iou"] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    assert result["max_box_acc"] == pytest.approx(2 / 3)
    assert result["box_acc"][0.5] == [1.0] * 50 + [0.0] * 50  # strict ">" on 127 at t = 0.5
    assert max_box_acc_v2(two_region_map()[None], [[[6, 7, 9, 8]]]) == pytest.approx(2 / 3)


def nested_map() -> np.ndarray:
    """10 x 10: rows/columns 0..5 at 0.5 with a core rows/columns 0..1 at 1.0.
    t <= 0.49: one region, pixels 0..5 -> box [0, 0, 6, 6]; t >= 0.5: the core -> [0, 0, 2, 2]."""
    scoremap = np.zeros((10, 10))
    scoremap[0:6, 0:6] = 0.5
    scoremap[0:2, 0:2] = 1.0
    return scoremap


def test_max_box_acc_is_max_over_thresholds_of_the_dataset_accuracy():
    maps = np.stack([nested_map(), nested_map()])
    # image 1, gt [0,0,5,5] (36 px): low t IoU 36/49 = 0.73 (right), high t 9/36 = 0.25 (wrong)
    # image 2, gt [0,0,2,2] (9 px): low t IoU 9/49 = 0.18 (wrong), high t 9/9 = 1 (right)
    # BoxAcc(t) = 1/2 for every t, so MaxBoxAcc = 0.5 (not the mean of per-image maxima, 1.0)
    gt = [[[0, 0, 5, 5]], [[0, 0, 2, 2]]]
    assert max_box_acc(maps, gt) == 0.5
    # streaming, in two batches with an empty one between, gives the same
    metric = BoxAccuracy(version=1)
    metric.update(torch.from_numpy(maps[:1]), gt[:1])
    metric.update(np.zeros((0, 10, 10)), [])
    metric.update(maps[1:], gt[1:])
    result = metric.compute()
    assert result["max_box_acc"] == 0.5 and result["images"] == 2
    assert result["box_acc"][0.5] == [0.5] * 100


def test_iou_equal_to_delta_is_correct():
    # region rows/columns 0..8 of a 20 x 20 map -> box (0, 0, 9, 9), 100 px under the +1 IoU;
    # gt [0, 0, 9, 4] is 50 px inside it: IoU exactly 0.5 -> correct (>=)
    scoremap = np.zeros((20, 20))
    scoremap[0:9, 0:9] = 1.0
    assert max_box_acc(scoremap[None], [[[0, 0, 9, 4]]]) == 1.0


def test_max_box_acc_interval():
    scoremap = np.zeros((4, 8))
    scoremap[:, 0:4] = 0.5
    scoremap[0, 7] = 1.0
    # thresholds [0, 0.5]: boxes [0,0,4,3] then [7,0,7,1] (see test_wsol_boxes_strict...);
    # gt [0,0,3,3]: IoU 16 / 20 = 0.8 at t = 0, 0 at t = 0.5
    result = evaluate(BoxAccuracy(version=1, interval=0.5), [(scoremap[None], [[[0, 0, 3, 3]]])])
    assert result["thresholds"] == [0.0, 0.5]
    assert result["box_acc"][0.5] == [1.0, 0.0]
    assert result["max_box_acc"] == 1.0


@pytest.mark.parametrize("value", [0.0, 5.0, -2.0])
def test_constant_and_all_zero_maps(value):
    maps = np.full((2, 10, 10), value)
    # no foreground at any threshold -> [0, 0, 0, 0], the top-left pixel under the +1 IoU:
    # gt [0,0,0,0] -> IoU 1 (right); gt [0,0,9,9] -> 1 / 100 (wrong)
    assert max_box_acc_v2(maps, [[[0, 0, 0, 0]], [[0, 0, 9, 9]]]) == 0.5
    assert max_box_acc(maps, [[[0, 0, 0, 0]], [[0, 0, 9, 9]]]) == 0.5


def test_one_pixel_regions_inside_and_at_the_corner():
    inside = np.zeros((10, 10))
    inside[3, 3] = 1.0
    # box (3, 3, 4, 4): IoU with the one-pixel gt [3,3,3,3] = 1 / 4 < 0.3
    assert max_box_acc_v2(inside[None], [[[3, 3, 3, 3]]]) == 0.0
    corner = np.zeros((10, 10))
    corner[9, 9] = 1.0
    # box (9, 9, min(10, 9), min(10, 9)) = [9, 9, 9, 9]: IoU 1
    assert max_box_acc_v2(corner[None], [[[9, 9, 9, 9]]]) == 1.0


def test_several_gt_boxes_and_none():
    # R1's box [2,2,5,5] vs gt [[6,7,9,8], [2,2,4,4]]: best IoU 9/16 -> right; no gt box -> wrong
    maps = np.stack([two_region_map(), two_region_map()])
    assert max_box_acc(maps, [np.array([[6, 7, 9, 8], [2, 2, 4, 4]]), np.zeros((0, 4))]) == 0.5


def test_box_accuracy_empty_and_bad_input():
    assert BoxAccuracy().compute()["max_box_acc"] == 0.0
    nan_map = np.zeros((1, 5, 5))
    nan_map[0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        max_box_acc(nan_map, [[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        max_box_acc(np.zeros((5, 5)), [[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="one entry per image"):
        max_box_acc(np.zeros((2, 5, 5)), [[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match=r"x1 >= x0"):
        max_box_acc(np.zeros((1, 5, 5)), [[[3, 0, 1, 1]]])
    with pytest.raises(ValueError, match="version"):
        BoxAccuracy(version=3)


# ============================================================================ GT-known / top-1


def test_gt_known_and_top1():
    pred = np.array([[0, 0, 9, 9]] * 3 + [[5, 5, 6, 6]])
    gt = [[[0, 0, 9, 9]], [[0, 0, 9, 4]], [[0, 0, 9, 3]], [[40, 40, 50, 50], [5, 5, 6, 6]]]
    # IoUs: 1, 0.5, 0.4, 1 (second gt) -> boxes right: 1, 2, 4 -> GT-known 3/4
    # classes right: 1, 3, 4 -> top-1 needs both: images 1 and 4 -> 2/4
    result = loc_accuracy(pred, gt, gt_labels=[1, 2, 0, 4], pred_labels=[1, 3, 0, 4])
    assert result == {"gt_known": 0.75, "top1": 0.5, "images": 4}
    assert loc_accuracy(list(pred), gt)["top1"] is None


def test_localization_accuracy_streaming_rules():
    metric = LocalizationAccuracy()
    metric.update([], [], [], [])
    metric.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], [1], [1])
    with pytest.raises(ValueError, match="every update"):
        metric.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]])
    with pytest.raises(ValueError, match="gt_labels"):
        LocalizationAccuracy().update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[1])
    assert metric.compute() == {"gt_known": 1.0, "top1": 1.0, "images": 1}


# ============================================================================ object energy


def test_object_energy_tiny_map():
    maps = np.array([[[1.0, 3.0], [0.0, 4.0]]])  # total 8
    # column 1: 3 + 4 = 7 -> 7/8
    assert object_energy(maps, [[[1, 0, 1, 1]]])["object_energy"] == pytest.approx(0.875)
    # a box reaching outside the image is cut to it: same
    assert object_energy(maps, [[[1, 0, 10, 10]]])["object_energy"] == pytest.approx(0.875)


def test_object_energy_counts_overlaps_once():
    maps = np.array([[[1.0, 3.0], [0.0, 4.0]]])
    # row 0 and column 1 overlap on (0, 1): union {(0,0), (0,1), (1,1)} = 1 + 3 + 4 = 8 -> 1.0
    # (counting (0, 1) twice would give 11/8)
    assert object_energy(maps, [[[0, 0, 1, 0], [1, 0, 1, 1]]])["object_energy"] == pytest.approx(1.0)


def test_object_energy_ignores_negative_values():
    maps = np.array([[[-4.0, 2.0], [1.0, 1.0]]])
    # non-negative energy 0 + 2 + 1 + 1 = 4; column 0 holds 0 + 1 -> 1/4
    assert object_energy(maps, [[[0, 0, 0, 1]]])["object_energy"] == pytest.approx(0.25)


@pytest.mark.parametrize("value", [0.0, 5.0, -1.0])
def test_object_energy_flat_maps_are_uniform(value):
    # 4 of 16 pixels in the box -> 0.25
    assert object_energy(np.full((1, 4, 4), value), [[[0, 0, 1, 1]]])["object_energy"] == pytest.approx(0.25)


def test_object_energy_rescales_to_the_image():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    # bilinear x2 (align_corners=False): each output row weighs input column 0 by 1, .75, .25, 0
    # and column 1 by 0, .25, .75, 1 (same for rows): total = 4 * 8 = 32. Right half (output
    # columns 2..3) weighs column 0 by .25 and column 1 by 1.75, rows by 2 each:
    # 2 * (0.25 * (1 + 0) + 1.75 * (3 + 4)) = 25 -> 25/32
    result = object_energy(maps, [[[2, 0, 3, 3]]], image_size=(4, 4))
    assert result["object_energy"] == pytest.approx(25 / 32)


def test_object_energy_mean_over_images_and_streaming():
    metric = ObjectEnergy()
    metric.update(np.array([[[1.0, 3.0], [0.0, 4.0]]]), [[[1, 0, 1, 1]]])  # 0.875
    metric.update(np.zeros((0, 2, 2)), [])
    metric.update(np.zeros((1, 4, 4)), [[[0, 0, 1, 1]]])  # 0.25
    result = metric.compute()
    assert result["per_image"] == pytest.approx([0.875, 0.25])
    assert result["object_energy"] == pytest.approx(0.5625)
    assert ObjectEnergy().compute()["object_energy"] == 0.0


def test_object_energy_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        object_energy(np.full((1, 2, 2), np.nan), [[[0, 0, 1, 1]]])
