"""Tests of spn.metrics. Every expected number is worked out by hand in the comments from
the metric's definition (for MaxBoxAcc: wsolevaluation's rules, see docs/metrics.md).

Every metric returns a ``MetricResult``: the headline in ``.value``, the number of images
(or queries) in ``.count``, per-class values in ``.per_class``, the rest in ``.details``.
The contract itself (one-shot == streamed, merge, state_dict, sync) is tested in
test_metrics_contract.py; wsolevaluation's own test cases and the OpenCV differential test
in test_wsol_exactness.py."""

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from spn.localize import boxes_from_maps, normalize_scoremap, quantize_scoremap, threshold_cuts, wsol_boxes
from spn.metrics import (
    BoxAccuracy,
    CorLoc,
    LocalizationAccuracy,
    MetricResult,
    ObjectEnergy,
    PointingGame,
    box_accuracy,
    corloc,
    evaluate,
    localization_accuracy,
    object_energy,
    pixel_box_iou,
    pointing_game,
)
from spn.metrics._geometry import linf_box_distance, pixel_distance

# ============================================================================ box IoU


def test_iou_pixel_inclusive_plus_one():
    # [0,0,9,9] has 10 x 10 = 100 pixels, [0,0,9,4] 10 x 5 = 50, all inside: 50 / 100
    np.testing.assert_allclose(pixel_box_iou([[0, 0, 9, 9]], [[0, 0, 9, 4]]), [[0.5]])
    # [0,0,1,1] and [1,1,2,2]: 4 pixels each, they share pixel (1, 1): 1 / (4 + 4 - 1) = 1/7
    np.testing.assert_allclose(pixel_box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]]), [[1 / 7]])


def test_iou_one_pixel_boxes():
    # the same pixel: 1 / 1; neighbouring pixels: nothing shared
    np.testing.assert_allclose(pixel_box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3], [4, 3, 4, 3]]), [[1.0, 0.0]])


def test_iou_all_pairs_and_empty():
    ious = pixel_box_iou([[0, 0, 9, 9], [20, 20, 29, 29]], [[0, 0, 9, 4], [20, 20, 29, 29], [100, 100, 101, 101]])
    np.testing.assert_allclose(ious, [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert pixel_box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_reversed_box_rejected():
    with pytest.raises(ValueError, match=r"x1 >= x0 and y1 >= y0"):
        pixel_box_iou([[5, 0, 4, 3]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"x1 >= x0 and y1 >= y0"):
        pixel_box_iou([[0, 0, 1, 1]], [[0, 3, 1, 2]])
    with pytest.raises(ValueError, match=r"\(m, 4\)"):
        pixel_box_iou([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        pixel_box_iou([[0, 0, np.nan, 1]], [[0, 0, 1, 1]])


# ============================================================================ pointing game
#
# Two protocols (spn.metrics.PointingGame):
# * "torchray" (default): a hit iff the Euclidean distance from the point to the nearest
#   integer pixel (x, y) of the box, x0 <= x <= x1 and y0 <= y <= y1, is STRICTLY less than
#   the tolerance; the value is the mean over ALL num_classes classes (a class without a
#   query counts 0).
# * "released" (the released SPN code): a hit iff the L-inf distance from the point to the
#   rectangle [x0, x1] x [y0, y1] is <= the tolerance; the mean over the classes seen.
# The old rule (Euclidean distance to the rectangle, <= tolerance) is gone: the tests that
# sat on its boundary are reworked below for both protocols.

CORNER_BOX = [np.array([[10, 10, 20, 20]])]


def test_point_box_distances_to_pixels_and_to_the_rectangle():
    # (31, 31) is 11 right and 11 below the corner pixel (20, 20)
    np.testing.assert_allclose(pixel_distance([[31, 31]], CORNER_BOX[0]), [[np.sqrt(242)]])
    np.testing.assert_allclose(linf_box_distance([[31, 31]], CORNER_BOX[0]), [[11.0]])
    # inside, on a pixel: 0 both ways
    np.testing.assert_allclose(pixel_distance([[15, 12]], CORNER_BOX[0]), [[0.0]])
    np.testing.assert_allclose(linf_box_distance([[15, 12]], CORNER_BOX[0]), [[0.0]])
    # inside, between four pixels: 0 to the rectangle, but sqrt(0.5^2 + 0.5^2) to the
    # nearest pixel centres (15, 12), (16, 12), (15, 13), (16, 13)
    np.testing.assert_allclose(pixel_distance([[15.5, 12.5]], CORNER_BOX[0]), [[np.sqrt(0.5)]])
    np.testing.assert_allclose(linf_box_distance([[15.5, 12.5]], CORNER_BOX[0]), [[0.0]])
    # a box whose columns 10.2 .. 10.8 hold no integer x has no pixel: infinitely far, even
    # from a point inside its rectangle (L-inf 0)
    assert pixel_distance([[10.5, 15.0]], [[10.2, 10, 10.8, 20]])[0, 0] == np.inf
    assert linf_box_distance([[10.5, 15.0]], [[10.2, 10, 10.8, 20]])[0, 0] == 0.0


def test_pointing_torchray_and_released_differ_at_a_corner():
    # torchray: the nearest pixel (20, 20) is sqrt(11^2 + 11^2) = 15.56 away, not < 15: miss;
    # released: L-inf 11 <= 15: hit
    assert pointing_game([[31, 31]], CORNER_BOX, [0], num_classes=1).value == 0.0
    assert pointing_game([[31, 31]], CORNER_BOX, [0], num_classes=1, protocol="released").value == 1.0


@pytest.mark.parametrize(
    "point, torchray_hit, released_hit",
    [
        # 15 right of the last column x1 = 20 (nearest pixel (20, 15)): exactly the tolerance,
        # a miss under torchray (15 < 15 is false), a hit under released (15 <= 15).
        # (The old Euclidean "<=" rule called it a hit.)
        ((35.0, 15.0), False, True),
        ((34.9, 15.0), True, True),  # 14.9
        ((35.5, 15.0), False, False),  # 15.5
        # dx 9, dy 12 from the corner pixel (20, 20): sqrt(81 + 144) = 15 exactly: torchray
        # miss (the old rule: hit); L-inf max(9, 12) = 12 <= 15: released hit
        ((29.0, 32.0), False, True),
        ((28.0, 31.0), True, True),  # dx 8, dy 11: sqrt(185) = 13.6; L-inf 11
        ((15.0, 15.0), True, True),  # inside
        ((-5.0, 15.0), False, True),  # 15 left of x0 = 10: torchray miss, released hit
        ((-4.0, 15.0), True, True),  # 14
        ((36.0, 15.0), False, False),  # 16
    ],
)
def test_pointing_tolerance_strict_under_torchray_inclusive_under_released(point, torchray_hit, released_hit):
    assert pointing_game([point], CORNER_BOX, [0], num_classes=1).value == float(torchray_hit)
    assert pointing_game([point], CORNER_BOX, [0], num_classes=1, protocol="released").value == float(released_hit)


def test_pointing_tolerance_parameter():
    # (22, 15) is 2 right of the box (nearest pixel (20, 15), L-inf 2)
    # released, inclusive: 2 <= 2 hit, 2 <= 1.9 miss
    assert pointing_game([[22, 15]], CORNER_BOX, [0], num_classes=1, radius=2, protocol="released").value == 1.0
    assert pointing_game([[22, 15]], CORNER_BOX, [0], num_classes=1, radius=1.9, protocol="released").value == 0.0
    # torchray, strict: 2 < 2 miss, 2 < 2.5 hit
    assert pointing_game([[22, 15]], CORNER_BOX, [0], num_classes=1, radius=2).value == 0.0
    assert pointing_game([[22, 15]], CORNER_BOX, [0], num_classes=1, radius=2.5).value == 1.0
    # a one-pixel box: released with no tolerance, only that pixel hits (0 <= 0; the
    # neighbour is 1 away) -> 1 of 2
    one_pixel = [[[5, 5, 5, 5]]] * 2
    points = [[5, 5], [6, 5]]
    result = pointing_game(points, one_pixel, [0, 0], num_classes=1, radius=0, protocol="released")
    assert result.per_class == {0: 0.5}
    # torchray with tolerance 0 accepts nothing (no distance is < 0); with tolerance 1 the
    # pixel itself (0 < 1) but not its neighbour (1 < 1 is false) -> 1 of 2
    assert pointing_game(points, one_pixel, [0, 0], num_classes=1, radius=0).per_class == {0: 0.0}
    assert pointing_game(points, one_pixel, [0, 0], num_classes=1, radius=1).per_class == {0: 0.5}


def test_pointing_mean_over_classes():
    points = [[15, 15], [100, 100], [12, 12]]
    labels = [0, 0, 1]
    boxes = [CORNER_BOX[0]] * 3
    # class 0: 1 hit of 2 -> 0.5; class 1: 1 of 1 -> 1.0; mean 0.75 (pooled it would be 2/3)
    result = pointing_game(points, boxes, labels, num_classes=2)
    assert isinstance(result, MetricResult) and result.name == "pointing_game"
    assert result.per_class == {0: 0.5, 1: 1.0}
    assert result.value == pytest.approx(0.75)
    assert (result.details["hits"], result.count) == (2, 3)
    # torchray averages over ALL num_classes classes: with 3 classes, class 2 has no query
    # and counts 0 -> (0.5 + 1.0 + 0.0) / 3 = 0.5
    result = pointing_game(points, boxes, labels, num_classes=3)
    assert result.per_class == {0: 0.5, 1: 1.0, 2: 0.0}
    assert result.value == pytest.approx(0.5)
    # released averages over the classes seen: still (0.5 + 1.0) / 2 = 0.75
    result = pointing_game(points, boxes, labels, num_classes=3, protocol="released")
    assert result.per_class == {0: 0.5, 1: 1.0}
    assert result.value == pytest.approx(0.75)


def test_pointing_counts_only_boxes_of_the_queried_class():
    boxes = [np.array([[10, 10, 20, 20], [200, 200, 210, 210]])]
    box_labels = [np.array([1, 0])]
    # the point is on the class-1 box, the query asks for class 0: miss
    result = pointing_game([[15, 15]], boxes, [0], box_labels, num_classes=3)
    assert result.per_class == {0: 0.0, 1: 0.0, 2: 0.0} and result.details["hits"] == 0
    # asking for class 1: hit. torchray: (0 + 1 + 0) / 3 classes = 1/3; released: 1 / 1
    result = pointing_game([[15, 15]], boxes, [1], box_labels, num_classes=3)
    assert result.per_class == {0: 0.0, 1: 1.0, 2: 0.0}
    assert result.value == pytest.approx(1 / 3)
    assert pointing_game([[15, 15]], boxes, [1], box_labels, num_classes=3, protocol="released").value == 1.0
    # class 2 has no box in the image: a miss
    result = pointing_game([[15, 15]], boxes, [2], box_labels, num_classes=3, protocol="released")
    assert result.per_class == {2: 0.0} and result.value == 0.0


def test_pointing_streaming_matches_one_shot_and_empty_batches():
    metric = PointingGame(num_classes=2)
    metric.update(np.zeros((0, 2)), [], [])  # an empty batch is fine, but it is no score
    with pytest.raises(ValueError, match="no images were evaluated"):
        metric.compute()
    batches: list[Any] = [
        (torch.tensor([[15.0, 15.0]]), CORNER_BOX, torch.tensor([0])),
        ({"points": [[100, 100], [12, 12]], "gt_boxes": CORNER_BOX * 2, "labels": [0, 1]}),
    ]
    # class 0: (15, 15) hit, (100, 100) miss -> 0.5; class 1: (12, 12) hit -> 1.0; mean 0.75
    result = evaluate(metric, batches)
    assert result.value == pytest.approx(0.75)
    assert result == pointing_game([[15, 15], [100, 100], [12, 12]], CORNER_BOX * 3, [0, 0, 1], num_classes=2)


def test_pointing_distance_below_one_pixel():
    # released: the distance is to the rectangle through pixel centres, [10, 20] x [10, 20]
    # (box columns 10..20: the last column covers x in [19.5, 20.5]). The point (20.5, 15)
    # is 0.5 away: a miss with tolerance 0, a hit with tolerance 0.5; (20, 15) is on it.
    def released(point, radius):
        return pointing_game([point], CORNER_BOX, [0], num_classes=1, radius=radius, protocol="released").value

    assert released([20.5, 15.0], 0) == 0.0
    assert released([20.5, 15.0], 0.5) == 1.0
    assert released([20.0, 15.0], 0) == 1.0
    assert released([15.5, 15.5], 0) == 1.0  # inside the rectangle

    # torchray: the distance is to the nearest integer pixel of the box. (20.5, 15): pixel
    # (20, 15), 0.5 away: 0.5 < 0.5 is false (miss), 0.5 < 0.6 (hit). (15.5, 15.5), inside
    # the box between four pixels: sqrt(0.5) = 0.7071 away: a miss at 0.7, a hit at 0.71.
    def torchray(point, radius):
        return pointing_game([point], CORNER_BOX, [0], num_classes=1, radius=radius).value

    assert torchray([20.5, 15.0], 0.5) == 0.0
    assert torchray([20.5, 15.0], 0.6) == 1.0
    assert torchray([15.5, 15.5], 0.7) == 0.0
    assert torchray([15.5, 15.5], 0.71) == 1.0


def test_pointing_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        pointing_game([[1, 2, 3]], CORNER_BOX, [0], num_classes=1)
    with pytest.raises(ValueError, match="one entry per image"):
        pointing_game([[1, 2]], CORNER_BOX * 2, [0], num_classes=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(1,\)"):
        pointing_game([[1, 2]], CORNER_BOX, [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game([[np.nan, 2]], CORNER_BOX, [0], num_classes=1)
    # a label outside [0, num_classes)
    with pytest.raises(ValueError, match=r"labels\[0\] = 2 is not a class index in \[0, 2\)"):
        pointing_game([[1, 2]], CORNER_BOX, [2], num_classes=2)
    with pytest.raises(ValueError, match="protocol"):
        PointingGame(num_classes=1, protocol="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        PointingGame(num_classes=0)
    with pytest.raises(ValueError, match="radius"):
        PointingGame(num_classes=1, radius=-1)


# ============================================================================ CorLoc


def test_corloc_mean_over_classes():
    pred = [[[0, 0, 9, 9]], [[0, 0, 9, 9]], [[50, 50, 60, 60], [0, 0, 9, 9]]]
    gt = [[[0, 0, 9, 4]], [[0, 0, 9, 3]], [[0, 0, 9, 9]]]
    result = corloc(pred, gt, [0, 0, 1], max_boxes=None)
    # any box counts: class 0: IoU 50/100 = 0.5 (correct: >=), IoU 40/100 = 0.4 (wrong) -> 0.5
    # class 1: the second predicted box matches exactly -> 1.0; mean 0.75 (pooled 2/3)
    assert result.name == "corloc"
    assert result.per_class == {0: 0.5, 1: 1.0}
    assert result.value == pytest.approx(0.75)
    assert (result.details["correct"], result.count) == (2, 3)
    # one box per query (the default): class 1's first box [50,50,60,60] misses [0,0,9,9]
    # (IoU 0) -> class 1: 0.0; mean (0.5 + 0.0) / 2 = 0.25
    result = corloc(pred, gt, [0, 0, 1])
    assert result.per_class == {0: 0.5, 1: 0.0}
    assert result.value == pytest.approx(0.25)
    assert (result.details["correct"], result.count) == (1, 3)


def test_corloc_and_gt_known_count_the_first_boxes_only():
    # The reviewer's example: per-component boxes come sorted by score; the best component
    # (value 5 at row 2, column 5) is not the object (gt: the value-1 pixel at (0, 0)).
    maps = np.zeros((1, 3, 6))
    maps[0, 0, 0] = 1.0
    maps[0, 2, 5] = 5.0
    boxes, _ = boxes_from_maps(maps, per_component=True)  # [[5,2,5,2], [0,0,0,0]]
    gt = [[[0, 0, 0, 0]]]
    # max_boxes=1: [5,2,5,2] vs [0,0,0,0] share nothing -> 0.0; None: [0,0,0,0] matches -> 1.0
    assert corloc(boxes, gt, [0]).value == 0.0
    assert corloc(boxes, gt, [0], max_boxes=None).value == 1.0
    assert localization_accuracy(boxes, gt).value == 0.0
    assert localization_accuracy(boxes, gt, max_boxes=None).value == 1.0
    # three boxes, the right one third: counted from max_boxes=3 on
    three = [[[20, 20, 29, 29], [40, 40, 49, 49], [0, 0, 9, 9]]]
    for max_boxes, expected in [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]:
        assert corloc(three, [[[0, 0, 9, 9]]], [0], max_boxes=max_boxes).value == expected
        assert localization_accuracy(three, [[[0, 0, 9, 9]]], max_boxes=max_boxes).value == expected
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_boxes"):
            CorLoc(max_boxes=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_boxes"):
            LocalizationAccuracy(max_boxes=bad)  # type: ignore[arg-type]


def test_corloc_one_pixel_boxes():
    # one-pixel boxes under the +1 convention: the same pixel -> IoU 1/1 (correct);
    # the neighbouring pixel -> IoU 0 (wrong); per class 1.0 and 0.0 -> mean 0.5
    result = corloc([[[3, 3, 3, 3]], [[4, 3, 4, 3]]], [[[3, 3, 3, 3]], [[3, 3, 3, 3]]], [0, 1])
    assert result.per_class == {0: 1.0, 1: 0.0}
    assert result.value == 0.5


def test_corloc_uses_boxes_of_the_queried_class_only():
    gt = [np.array([[0, 0, 9, 9], [20, 20, 29, 29]])]
    box_labels = [np.array([1, 0])]
    assert corloc([[[0, 0, 9, 9]]], gt, [0], box_labels).value == 0.0
    assert corloc([[[0, 0, 9, 9]]], gt, [1], box_labels).value == 1.0


def test_corloc_no_prediction_is_wrong_and_streaming():
    metric = CorLoc()
    metric.update([np.zeros((0, 4))], [[[0, 0, 9, 9]]], [0])
    metric.update(np.array([[0, 0, 9, 9]]), np.array([[0, 0, 9, 9]]), np.array([0]))  # (B, 4) arrays
    metric.update([], [], [])
    assert metric.compute().per_class == {0: 0.5}
    with pytest.raises(ValueError, match="no images were evaluated"):
        evaluate(CorLoc(), [([], [], [])])


def test_corloc_threshold():
    # IoU 0.4 passes at 0.4
    assert corloc([[[0, 0, 9, 9]]], [[[0, 0, 9, 3]]], [0], iou_threshold=0.4).value == 1.0


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


@pytest.mark.parametrize("largest", ["contour_area", "pixel_count"])
def test_wsol_boxes_strict_threshold_and_border_clipping(largest):
    # 4 x 8 map: a 4 x 4 block of 0.5 (columns 0..3), one pixel of 1.0 at row 0, column 7.
    # uint8: block 127, pixel 255. Thresholds 0 and 0.5 -> cuts 0 and int(127.5) = 127.
    scoremap = np.zeros((4, 8))
    scoremap[:, 0:4] = 0.5
    scoremap[0, 7] = 1.0
    at_zero, at_half = wsol_boxes(scoremap, [0.0, 0.5], largest=largest)
    # cut 0: block and pixel; the largest is the block under both rules (contour area
    # 3 x 3 = 9 against 0; 16 px against 1), columns 0..3, rows 0..3:
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


@pytest.mark.parametrize("largest", ["contour_area", "pixel_count"])
def test_wsol_largest_region_counts_the_area_inside_its_outline(largest):
    # 8 x 14 map: a ring (border of a 5 x 5 square, 16 px, rows/columns 0..4) and a solid
    # 4 x 5 block (20 px, rows 0..3, columns 7..11). Inside its outline the ring covers 25 px,
    # more than 20, so it is the largest region, as with cv2.contourArea (16 vs 12): the
    # ring's outer contour is the 4 x 4 square through its border pixel centres, the block's
    # the 3 x 4 rectangle.
    scoremap = np.zeros((8, 14))
    scoremap[0:5, 0:5] = 1.0
    scoremap[1:4, 1:4] = 0.0
    scoremap[0:4, 7:12] = 1.0
    (boxes,) = wsol_boxes(scoremap, [0.0], largest=largest)
    np.testing.assert_array_equal(boxes, [[0, 0, 5, 5]])  # ring: columns 0..4 -> x1 = 5, rows 0..4 -> y1 = 5


def test_wsol_largest_region_by_contour_area_or_by_pixel_count():
    # A 1 x 10 line (10 px, cv2.contourArea 0: the contour walks out and back) against a
    # 2 x 2 square (4 px, contourArea 1 x 1 = 1).
    scoremap = np.zeros((6, 12))
    scoremap[0, 0:10] = 1.0
    scoremap[3:5, 3:5] = 1.0
    # default, wsolevaluation's contour area: the square, rows 3..4, columns 3..4 ->
    # (3, 3, 3 + 2, 3 + 2) = [3, 3, 5, 5] (W = 12, H = 6: y1 = min(5, H - 1 = 5), no clipping)
    (boxes,) = wsol_boxes(scoremap, [0.0])
    np.testing.assert_array_equal(boxes, [[3, 3, 5, 5]])
    # pixel count (the named variant): the line, row 0, columns 0..9 ->
    # (0, 0, 9 + 1, 0 + 1) = [0, 0, 10, 1] (no clipping)
    (boxes,) = wsol_boxes(scoremap, [0.0], largest="pixel_count")
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 1]])

    # An L of 3 pixels (0, 0), (0, 1), (1, 1) as (row, column) [contour: the triangle through
    # their centres, area 1/2] against a later 1 x 6 line (row 4, columns 3..8, area 0).
    scoremap = np.zeros((6, 12))
    scoremap[0, 0] = scoremap[1, 0] = scoremap[1, 1] = 1.0
    scoremap[4, 3:9] = 1.0
    # contour area: the L, columns 0..1, rows 0..1 -> (0, 0, 2, 2)
    assert wsol_boxes(scoremap, [0.0])[0].tolist() == [[0, 0, 2, 2]]
    # pixel count: the line (6 > 3): (3, 4, 8 + 1, 4 + 1) = [3, 4, 9, 5] (H - 1 = 5)
    assert wsol_boxes(scoremap, [0.0], largest="pixel_count")[0].tolist() == [[3, 4, 9, 5]]

    # A 2 x 5 block (10 px, contour area 1 x 4 = 4; rows 0..1, columns 0..4) then a 3 x 3
    # block (9 px, contour area 2 x 2 = 4; rows 5..7, columns 6..8) on a 10 x 12 map.
    scoremap = np.zeros((10, 12))
    scoremap[0:2, 0:5] = 1.0
    scoremap[5:8, 6:9] = 1.0
    # contour area: a tie, 4 and 4, goes to the last region in scan order, the 3 x 3 block:
    # (6, 5, 6 + 3, 5 + 3) = [6, 5, 9, 8]
    assert wsol_boxes(scoremap, [0.0])[0].tolist() == [[6, 5, 9, 8]]
    # pixel count: 10 > 9, the 2 x 5 block: (0, 0, 0 + 5, 0 + 2) = [0, 0, 5, 2]
    assert wsol_boxes(scoremap, [0.0], largest="pixel_count")[0].tolist() == [[0, 0, 5, 2]]


def test_box_accuracy_follows_the_largest_rule():
    # The line-and-square map of the test above, gt = the square's wsolevaluation box
    # [3, 3, 5, 5]. Both regions are 1.0 (uint8 255 > int(255 t) for every t < 1), so at every
    # threshold: contour area boxes the square, IoU 1; pixel count boxes the line
    # [0, 0, 10, 1], rows 0..1 against rows 3..5: IoU 0.
    scoremap = np.zeros((6, 12))
    scoremap[0, 0:10] = 1.0
    scoremap[3:5, 3:5] = 1.0
    default = box_accuracy(scoremap[None], [[[3, 3, 5, 5]]], version=1)
    assert default.name == "max_box_acc"
    assert default.value == 1.0 and default.details["box_acc"][0.5] == [1.0] * 1000
    by_pixels = box_accuracy(scoremap[None], [[[3, 3, 5, 5]]], version=1, largest="pixel_count")
    assert by_pixels.value == 0.0 and by_pixels.details["box_acc"][0.5] == [0.0] * 1000


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


@pytest.mark.parametrize("largest", ["contour_area", "pixel_count"])
def test_wsol_largest_region_ties_go_to_the_last_region_like_opencv(largest):
    # OpenCV (4.14 and 5.0, checked) lists contours in reverse scan order and Python's max
    # keeps the first maximum of that list: of equal regions, the one whose first pixel
    # comes last in row-major order wins. 2 x 2 squares tie under both rules (contour area
    # 1 each, 4 px each).
    # Two 2 x 2 squares at rows/columns 1..2 and 6..7 of a 10 x 10 map: the second,
    # (6, 6, 6 + 2, 6 + 2) = [6, 6, 8, 8] (the first would be [1, 1, 3, 3]).
    scoremap = np.zeros((10, 10))
    scoremap[1:3, 1:3] = 1.0
    scoremap[6:8, 6:8] = 1.0
    assert wsol_boxes(scoremap, [0.0], largest=largest)[0].tolist() == [[6, 6, 8, 8]]
    # three squares, first pixels (1, 1), (1, 6), (6, 1) in scan order: the last, rows 6..7,
    # columns 1..2 -> [1, 6, 3, 8]
    scoremap = np.zeros((12, 12))
    scoremap[1:3, 1:3] = scoremap[1:3, 6:8] = scoremap[6:8, 1:3] = 1.0
    assert wsol_boxes(scoremap, [0.0], largest=largest)[0].tolist() == [[1, 6, 3, 8]]
    # scan order is by first pixel, row first: (row 1, column 6) comes before (row 2, column 1),
    # so the square at rows 2..3, columns 1..2 wins -> [1, 2, 3, 4]
    scoremap = np.zeros((10, 10))
    scoremap[1:3, 6:8] = scoremap[2:4, 1:3] = 1.0
    assert wsol_boxes(scoremap, [0.0], largest=largest)[0].tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("largest", ["contour_area", "pixel_count"])
def test_wsol_largest_region_tie_after_filling_holes(largest):
    # a solid 3 x 3 block (9 px, rows 1..3, columns 6..8) and, later in scan order, a 3 x 3
    # ring (8 px, rows 5..7, columns 1..3, hole at (6, 2)). Filled, both hold 9 px (OpenCV:
    # contour area 2 x 2 = 4 each), a tie, so the ring wins: (1, 5, 1 + 3, 5 + 3) = [1, 5, 4, 8].
    # Counting raw pixels instead (holes not filled) would pick the block, [6, 1, 9, 4].
    scoremap = np.zeros((11, 11))
    scoremap[1:4, 6:9] = 1.0
    scoremap[5:8, 1:4] = 1.0
    scoremap[6, 2] = 0.0
    assert wsol_boxes(scoremap, [0.0], largest=largest)[0].tolist() == [[1, 5, 4, 8]]


def test_float32_maps_are_normalised_in_float32():
    # wsolevaluation normalises in the map's dtype. float32(-0.2) = -0.20000000298023224.
    # float64: (x + 1) / 2 = 0.39999999850988388; * 255 = 101.99999962 -> 101.
    # float32: x + 1 = 0.79999999701976776 rounds to the nearest float32, 0.800000011920929
    # (neighbours 0.79999995231628418 and 0.800000011920929, 2^-24 apart); / 2 =
    # 0.4000000059604645; * 255 = 102.0000015 -> 102.
    m32 = np.array([[-1.0, -0.2, 1.0]], dtype=np.float32)
    m64 = m32.astype(np.float64)  # the same values, in float64
    assert normalize_scoremap(m32).dtype == np.float32
    assert normalize_scoremap(m64).dtype == np.float64
    assert normalize_scoremap(np.array([[1, 2]])).dtype == np.float64  # integers -> float64
    np.testing.assert_array_equal(quantize_scoremap(normalize_scoremap(m32)), [[0, 102, 255]])
    np.testing.assert_array_equal(quantize_scoremap(normalize_scoremap(m64)), [[0, 101, 255]])
    # t = 0.397: cut int(101.235) = 101. float32: 102 > 101, columns 1..2 -> (1, 0, min(3, 2),
    # min(1, 0)) = [1, 0, 2, 0]; float64: 101 > 101 is false, column 2 only -> [2, 0, 2, 0]
    assert wsol_boxes(m32, [0.397])[0].tolist() == [[1, 0, 2, 0]]
    assert wsol_boxes(torch.from_numpy(m32), [0.397])[0].tolist() == [[1, 0, 2, 0]]
    assert wsol_boxes(m64, [0.397])[0].tolist() == [[2, 0, 2, 0]]
    # Through BoxAccuracy, gt [1, 0, 2, 0], delta 0.7: [1, 0, 2, 0] has IoU 1, [2, 0, 2, 0]
    # 1 / 2. float32: columns 1..2 while cut <= 101, i.e. 255 t < 102, t <= 0.399: 400
    # thresholds. float64: while cut <= 100, 255 t < 101, t <= 0.396: 397 thresholds.
    cases: list[tuple[np.ndarray, int]] = [(m32, 400), (m64, 397)]
    for maps, ones in cases:
        metric = BoxAccuracy(version=1, iou_thresholds=(0.7,))
        metric.update(maps[None], [[[1, 0, 2, 0]]])
        assert metric.compute().details["box_acc"][0.7] == [1.0] * ones + [0.0] * (1000 - ones)


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e308), (np.float32, 3e38)])
def test_maps_whose_range_overflows(dtype, big):
    # max - min = 2 * big overflows (float64 max 1.8e308, float32 max 3.4e38). Halving is
    # exact: [-big/2, 0, big/2] -> shifted [0, big/2, big] / big = [0, 0.5, 1]; no warning.
    scoremap = np.array([[-big, 0.0, big]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized = normalize_scoremap(scoremap)
        # uint8 [0, 127, 255]. Cut <= 126 (t <= 0.498): columns 1..2 -> [1, 0, 2, 0];
        # cut >= 127: column 2 -> [2, 0, 2, 0]. Neither touches [0, 0, 0, 0] (a NaN map would
        # quantise to zeros, box [0, 0, 0, 0] and score 1.0 against it).
        assert box_accuracy(scoremap[None], [[[0, 0, 0, 0]]], version=1).value == 0.0
        assert box_accuracy(scoremap[None], [[[1, 0, 2, 0]]], version=1).value == 1.0
    assert normalized.dtype == dtype
    np.testing.assert_allclose(normalized, [[0.0, 0.5, 1.0]])


# ============================================================================ MaxBoxAcc / V2


def two_region_map() -> np.ndarray:
    """10 x 10: R1 = rows 2..4, columns 2..4 at 1.0 (9 px); R2 = rows 7..8, columns 6..9 at
    0.5 (8 px, on the right border). uint8: R1 255, R2 127. R2 is foreground while
    int(255 t) <= 126, i.e. 255 t < 127, t < 0.49804: with interval 0.001 that is
    t = 0.000 .. 0.498 (499 thresholds; t = 0.499 gives int(127.245) = 127, R2 out); with
    interval 0.01, t = 0.00 .. 0.49 (50 thresholds; t = 0.50 gives int(127.5) = 127)."""
    scoremap = np.zeros((10, 10))
    scoremap[2:5, 2:5] = 1.0
    scoremap[7:9, 6:10] = 0.5
    return scoremap


@pytest.mark.parametrize("largest", ["contour_area", "pixel_count"])
def test_max_box_acc_largest_region(largest):
    # every threshold: the largest region is R1 under both rules (contour area 2 x 2 = 4 >
    # R2's 1 x 3 = 3; 9 > 8 px) -> box (2, 2, 5, 5);
    # IoU with gt [2, 2, 4, 4] = 9 / 16 = 0.5625 >= 0.5 at every threshold
    metric = BoxAccuracy(version=1, largest=largest)
    metric.update(two_region_map()[None], [np.array([[2, 2, 4, 4]])])
    result = metric.compute()
    assert result.value == 1.0
    assert result.details["box_acc"][0.5] == [1.0] * 1000  # default interval 0.001: 1000 thresholds
    assert result.details["best_threshold"] == {0.5: 0.0}
    # the box of R2 is never the one chosen: gt on R2 -> IoU 0
    assert box_accuracy(two_region_map()[None], [[[6, 7, 9, 8]]], version=1, largest=largest).value == 0.0


def test_max_box_acc_v2_every_region_and_three_deltas():
    # gt = R2 exactly, [6, 7, 9, 8]. While R2 is foreground the boxes include R2's
    # (6, 7, min(10, 9), 9) = [6, 7, 9, 9]: IoU = 8 / 12 = 0.667 (>= 0.3, >= 0.5, < 0.7).
    # Above that only R1's box (IoU 0).
    metric = BoxAccuracy(version=2)
    metric.update(two_region_map()[None], [[[6, 7, 9, 8]]])
    result = metric.compute()
    assert result.name == "max_box_acc_v2"
    assert result.details["per_iou"] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    assert result.value == pytest.approx(2 / 3)
    assert result.details["box_acc"][0.5] == [1.0] * 499 + [0.0] * 501  # strict ">" on 127 from t = 0.499
    coarse = evaluate(BoxAccuracy(version=2, interval=0.01), [(two_region_map()[None], [[[6, 7, 9, 8]]])])
    assert coarse.details["box_acc"][0.5] == [1.0] * 50 + [0.0] * 50  # from t = 0.50
    # version 2 is the default of the one-shot function
    assert box_accuracy(two_region_map()[None], [[[6, 7, 9, 8]]]).value == pytest.approx(2 / 3)


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
    assert box_accuracy(maps, gt, version=1).value == 0.5
    # streaming, in two batches with an empty one between, gives the same
    metric = BoxAccuracy(version=1)
    metric.update(torch.from_numpy(maps[:1]), gt[:1])
    metric.update(np.zeros((0, 10, 10)), [])
    metric.update(maps[1:], gt[1:])
    result = metric.compute()
    assert result.value == 0.5 and result.count == 2
    assert result.details["box_acc"][0.5] == [0.5] * 1000


def test_fine_threshold_step_reaches_thresholds_a_coarse_one_skips():
    # The reviewer's example. Normalised (min 0, max 1) the map is unchanged; uint8:
    # background 3.5 -> 3, (0, 0) -> 0, square rows/columns 5..14 -> 4.5 -> 4, core rows/
    # columns 9..10 -> 255. Foreground "> cut": cut <= 2 -> everything but (0, 0), box
    # [0, 0, 19, 19]; cut 3 -> the square -> (5, 5, 15, 15); cut >= 4 -> the core ->
    # (9, 9, 11, 11). gt = the square [5, 5, 14, 14] (100 px): IoUs 100/400 = 0.25,
    # 100/121 = 0.83 and 9/100 = 0.09 (the core's box, 3 x 3 px, lies inside the gt).
    # Cut 3 needs 3 <= 255 t < 4, t in [0.01177, 0.01569): interval 0.01 jumps from
    # t = 0.01 (cut 2) to 0.02 (cut 5) and never sees it; interval 0.001 has t = 0.012
    # (cut int(3.06) = 3).
    scoremap = np.full((20, 20), 3.5 / 255)
    scoremap[0, 0] = 0.0
    scoremap[5:15, 5:15] = 4.5 / 255
    scoremap[9:11, 9:11] = 1.0
    gt = [[[5, 5, 14, 14]]]
    assert box_accuracy(scoremap[None], gt, version=1, interval=0.01).value == 0.0
    assert box_accuracy(scoremap[None], gt, version=1, interval=0.001).value == 1.0
    assert box_accuracy(scoremap[None], gt, version=1).value == 1.0  # 0.001 is the default
    result = evaluate(BoxAccuracy(version=1), [(scoremap[None], gt)])
    assert len(result.details["thresholds"]) == 1000 and result.details["thresholds"][12] == pytest.approx(0.012)
    assert result.details["best_threshold"] == {0.5: pytest.approx(0.012)}
    # only t = 0.012 .. 0.015 give cut 3 (t = 0.016: int(4.08) = 4)
    assert result.details["box_acc"][0.5] == [0.0] * 12 + [1.0] * 4 + [0.0] * 984


def test_iou_equal_to_delta_is_correct():
    # region rows/columns 0..8 of a 20 x 20 map -> box (0, 0, 9, 9), 100 px under the +1 IoU;
    # gt [0, 0, 9, 4] is 50 px inside it: IoU exactly 0.5 -> correct (>=)
    scoremap = np.zeros((20, 20))
    scoremap[0:9, 0:9] = 1.0
    assert box_accuracy(scoremap[None], [[[0, 0, 9, 4]]], version=1).value == 1.0


def test_max_box_acc_interval():
    scoremap = np.zeros((4, 8))
    scoremap[:, 0:4] = 0.5
    scoremap[0, 7] = 1.0
    # thresholds [0, 0.5]: boxes [0,0,4,3] then [7,0,7,1] (see test_wsol_boxes_strict...);
    # gt [0,0,3,3]: IoU 16 / 20 = 0.8 at t = 0, 0 at t = 0.5
    result = evaluate(BoxAccuracy(version=1, interval=0.5), [(scoremap[None], [[[0, 0, 3, 3]]])])
    assert result.details["thresholds"] == [0.0, 0.5]
    assert result.details["box_acc"][0.5] == [1.0, 0.0]
    assert result.value == 1.0


@pytest.mark.parametrize("value", [0.0, 5.0, -2.0])
def test_constant_and_all_zero_maps(value):
    maps = np.full((2, 10, 10), value)
    # no foreground at any threshold -> [0, 0, 0, 0], the top-left pixel under the +1 IoU:
    # gt [0,0,0,0] -> IoU 1 (right); gt [0,0,9,9] -> 1 / 100 (wrong)
    assert box_accuracy(maps, [[[0, 0, 0, 0]], [[0, 0, 9, 9]]]).value == 0.5
    assert box_accuracy(maps, [[[0, 0, 0, 0]], [[0, 0, 9, 9]]], version=1).value == 0.5


def test_one_pixel_regions_inside_and_at_the_corner():
    inside = np.zeros((10, 10))
    inside[3, 3] = 1.0
    # box (3, 3, 4, 4): IoU with the one-pixel gt [3,3,3,3] = 1 / 4 < 0.3
    assert box_accuracy(inside[None], [[[3, 3, 3, 3]]]).value == 0.0
    corner = np.zeros((10, 10))
    corner[9, 9] = 1.0
    # box (9, 9, min(10, 9), min(10, 9)) = [9, 9, 9, 9]: IoU 1
    assert box_accuracy(corner[None], [[[9, 9, 9, 9]]]).value == 1.0


def test_several_gt_boxes_and_none():
    # R1's box [2,2,5,5] vs gt [[6,7,9,8], [2,2,4,4]]: best IoU 9/16 -> right; no gt box -> wrong
    maps = np.stack([two_region_map(), two_region_map()])
    assert box_accuracy(maps, [np.array([[6, 7, 9, 8], [2, 2, 4, 4]]), np.zeros((0, 4))], version=1).value == 0.5


def test_box_accuracy_empty_and_bad_input():
    with pytest.raises(ValueError, match="no images were evaluated"):
        BoxAccuracy().compute()
    with pytest.raises(ValueError, match="no images were evaluated"):
        evaluate(BoxAccuracy(), [])  # an empty data loader is not a score of 0
    nan_map = np.zeros((1, 5, 5))
    nan_map[0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        box_accuracy(nan_map, [[[0, 0, 1, 1]]], version=1)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        box_accuracy(np.zeros((5, 5)), [[[0, 0, 1, 1]]], version=1)
    with pytest.raises(ValueError, match="one entry per image"):
        box_accuracy(np.zeros((2, 5, 5)), [[[0, 0, 1, 1]]], version=1)
    with pytest.raises(ValueError, match=r"x1 >= x0"):
        box_accuracy(np.zeros((1, 5, 5)), [[[3, 0, 1, 1]]], version=1)
    with pytest.raises(ValueError, match="version"):
        BoxAccuracy(version=3)
    with pytest.raises(ValueError, match="largest"):
        BoxAccuracy(version=1, largest="area")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="largest"):
        wsol_boxes(np.eye(3), [0.0], largest="area")  # type: ignore[arg-type]


# ============================================================================ GT-known / top-1


def test_gt_known_and_top1():
    pred = np.array([[0, 0, 9, 9]] * 3 + [[5, 5, 6, 6]])
    gt = [[[0, 0, 9, 9]], [[0, 0, 9, 4]], [[0, 0, 9, 3]], [[40, 40, 50, 50], [5, 5, 6, 6]]]
    # IoUs: 1, 0.5, 0.4, 1 (second gt) -> boxes right: 1, 2, 4 -> GT-known 3/4
    # classes right: 1, 3, 4 -> top-1 needs both: images 1 and 4 -> 2/4
    result = localization_accuracy(pred, gt, pred_labels=[1, 3, 0, 4], labels=[1, 2, 0, 4])
    assert result.name == "gt_known_loc"
    assert (result.value, result.details["top1_loc"], result.count) == (0.75, 0.5, 4)
    assert localization_accuracy(list(pred), gt).details["top1_loc"] is None


def test_localization_accuracy_streaming_rules():
    metric = LocalizationAccuracy()
    metric.update([], [], pred_labels=[], labels=[])
    metric.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[1], labels=[1])
    with pytest.raises(ValueError, match="every update"):
        metric.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]])
    with pytest.raises(ValueError, match="needs labels"):
        LocalizationAccuracy().update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[1])
    result = metric.compute()
    assert (result.value, result.details["top1_loc"], result.count) == (1.0, 1.0, 1)


def test_localization_accuracy_empty_predictions_and_empty_ground_truth():
    # image 1: no predicted box -> wrong; image 2: no ground-truth box -> wrong;
    # image 3: exact match -> right. GT-known 1/3; top-1 (all classes right) also 1/3.
    pred = [np.zeros((0, 4)), [[0, 0, 9, 9]], [[0, 0, 9, 9]]]
    gt = [[[0, 0, 9, 9]], np.zeros((0, 4)), [[0, 0, 9, 9]]]
    result = localization_accuracy(pred, gt, pred_labels=[0, 1, 2], labels=[0, 1, 2])
    assert result.value == pytest.approx(1 / 3)
    assert result.details["top1_loc"] == pytest.approx(1 / 3)
    assert result.count == 3
    with pytest.raises(ValueError, match="no images were evaluated"):
        LocalizationAccuracy().compute()
    with pytest.raises(ValueError, match="no images were evaluated"):
        localization_accuracy([], [])


def test_localization_accuracy_failed_update_changes_nothing():
    metric = LocalizationAccuracy()
    metric.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[1], labels=[1])  # right box, right class
    before = metric.compute()
    assert (before.value, before.details["top1_loc"], before.count) == (1.0, 1.0, 1)
    # pred_labels has 2 entries for 1 image: rejected, and nothing was counted
    with pytest.raises(ValueError, match="pred_labels"):
        metric.update([[50, 50, 60, 60]], [[[0, 0, 9, 9]]], pred_labels=[1, 2], labels=[1])
    assert metric.compute() == before
    # a fresh metric whose first update fails is not tied to top-1 afterwards
    fresh = LocalizationAccuracy()
    with pytest.raises(ValueError, match=r"labels must have shape \(1,\)"):
        fresh.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[1], labels=[1, 2])
    fresh.update([[0, 0, 9, 9]], [[[0, 0, 9, 9]]])  # no labels: allowed
    result = fresh.compute()
    assert (result.value, result.details["top1_loc"], result.count) == (1.0, None, 1)


GOOD_MAP = np.zeros((1, 4, 4))
GOOD_MAP[0, 1, 1] = 1.0
TWO_MAPS = np.concatenate([GOOD_MAP] * 2)
REVERSED_SECOND = [[[1, 1, 1, 1]], [[3, 0, 1, 1]]]  # the second image's box has x1 < x0


@pytest.mark.parametrize(
    "make_metric, good, bad",
    [
        # box labels for 2 boxes where the image has 1
        (
            lambda: PointingGame(num_classes=1),
            ([[1, 1]], [[[0, 0, 2, 2]]], [0]),
            ([[1, 1]], [[[0, 0, 2, 2]]], [0], [[0, 1]]),
        ),
        (CorLoc, ([[[0, 0, 2, 2]]], [[[0, 0, 2, 2]]], [0]), ([[[0, 0, 2, 2]]], [[[0, 0, 2, 2]]], [0], [[0, 1]])),
        # the second image's ground truth is a reversed box
        (lambda: BoxAccuracy(interval=0.5), (GOOD_MAP, [[[1, 1, 1, 1]]]), (TWO_MAPS, REVERSED_SECOND)),
        (ObjectEnergy, (GOOD_MAP, [[[1, 1, 1, 1]]]), (TWO_MAPS, REVERSED_SECOND)),
        (LocalizationAccuracy, ([[0, 0, 2, 2]], [[[0, 0, 2, 2]]]), ([[1, 1, 1, 1]] * 2, REVERSED_SECOND)),
    ],
    ids=["pointing", "corloc", "box_accuracy", "object_energy", "localization"],
)
def test_failed_update_leaves_every_metric_unchanged(make_metric, good, bad):
    metric = make_metric()
    metric.update(*good)
    before = metric.compute()
    with pytest.raises(ValueError):
        metric.update(*bad)
    assert metric.compute() == before


# ============================================================================ object energy


def test_object_energy_tiny_map():
    maps = np.array([[[1.0, 3.0], [0.0, 4.0]]])  # total 8
    # column 1: 3 + 4 = 7 -> 7/8
    result = object_energy(maps, [[[1, 0, 1, 1]]])
    assert result.name == "object_energy"
    assert result.value == pytest.approx(0.875)
    # a box reaching outside the image is cut to it: same
    assert object_energy(maps, [[[1, 0, 10, 10]]]).value == pytest.approx(0.875)


def test_object_energy_counts_overlaps_once():
    maps = np.array([[[1.0, 3.0], [0.0, 4.0]]])
    # row 0 and column 1 overlap on (0, 1): union {(0,0), (0,1), (1,1)} = 1 + 3 + 4 = 8 -> 1.0
    # (counting (0, 1) twice would give 11/8)
    assert object_energy(maps, [[[0, 0, 1, 0], [1, 0, 1, 1]]]).value == pytest.approx(1.0)


def test_object_energy_ignores_negative_values():
    maps = np.array([[[-4.0, 2.0], [1.0, 1.0]]])
    # non-negative energy 0 + 2 + 1 + 1 = 4; column 0 holds 0 + 1 -> 1/4
    assert object_energy(maps, [[[0, 0, 0, 1]]]).value == pytest.approx(0.25)


@pytest.mark.parametrize("value", [0.0, 5.0, -1.0])
def test_object_energy_flat_maps_are_uniform(value):
    # 4 of 16 pixels in the box -> 0.25
    assert object_energy(np.full((1, 4, 4), value), [[[0, 0, 1, 1]]]).value == pytest.approx(0.25)


def test_object_energy_rescales_to_the_image():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    # bilinear x2 (align_corners=False): each output row weighs input column 0 by 1, .75, .25, 0
    # and column 1 by 0, .25, .75, 1 (same for rows): total = 4 * 8 = 32. Right half (output
    # columns 2..3) weighs column 0 by .25 and column 1 by 1.75, rows by 2 each:
    # 2 * (0.25 * (1 + 0) + 1.75 * (3 + 4)) = 25 -> 25/32
    result = object_energy(maps, [[[2, 0, 3, 3]]], size=(4, 4))
    assert result.value == pytest.approx(25 / 32)
    # the same through the streaming metric, from a NumPy array
    metric = ObjectEnergy(size=(4, 4))
    metric.update(maps.numpy(), [[[2, 0, 3, 3]]])
    assert metric.compute().value == pytest.approx(25 / 32)


def test_object_energy_mean_over_images_and_streaming():
    metric = ObjectEnergy()
    metric.update(np.array([[[1.0, 3.0], [0.0, 4.0]]]), [[[1, 0, 1, 1]]])  # 0.875
    metric.update(np.zeros((0, 2, 2)), [])
    metric.update(np.zeros((1, 4, 4)), [[[0, 0, 1, 1]]])  # 0.25
    result = metric.compute()
    assert result.details["per_image"] == pytest.approx([0.875, 0.25])
    assert result.value == pytest.approx(0.5625)
    assert result.count == 2
    with pytest.raises(ValueError, match="no images were evaluated"):
        ObjectEnergy().compute()


def test_object_energy_one_pixel_box():
    maps = np.array([[[1.0, 3.0], [0.0, 4.0]]])  # total 8
    # the one-pixel box [1, 1, 1, 1] holds (row 1, column 1) = 4 -> 4/8
    assert object_energy(maps, [[[1, 1, 1, 1]]]).value == pytest.approx(0.5)


def test_object_energy_sum_beyond_float64():
    # four pixels of 1e308: the sum 4e308 overflows; divided by the maximum first they are
    # 1, 1, 1, 1, so a one-pixel box holds 1/4 (an overflowing sum would give 1e308 / inf = 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = object_energy(np.full((1, 2, 2), 1e308), [[[0, 0, 0, 0]]])
    assert result.value == pytest.approx(0.25)


def test_object_energy_rejects_nan_and_bad_sizes():
    with pytest.raises(ValueError, match="NaN"):
        object_energy(np.full((1, 2, 2), np.nan), [[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        ObjectEnergy(size=(0, 4))
