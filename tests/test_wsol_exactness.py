"""spn's WSOL numbers against the field's reference code.

1. Every box and mask case of wsolevaluation's own ``evaluation_test.py``, through spn's API
   (expected values copied from that file, which states them as facts about its code).
2. A differential test against OpenCV: ``oracle_boxes`` below follows wsolevaluation's box
   rule step by step with ``cv2`` (threshold, ``findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``,
   ``max`` by ``contourArea``, ``boundingRect``, clipping) and spn must agree on every map.
   OpenCV is a test dependency only (``opencv-python-headless`` in the ``test`` extra); in CI
   a missing OpenCV fails instead of skipping.
3. Streaming: MaxBoxAccV2's memory does not hold the boxes of every threshold at once.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import torch

from spn.localize import resize_boxes, wsol_boxes
from spn.metrics import BoxAccuracy, PxAP, box_accuracy, pixel_box_iou, pxap

if os.environ.get("CI"):
    import cv2  # CI installs the test extra: a missing OpenCV is a failure there, not a skip
else:
    cv2 = pytest.importorskip("cv2", reason="the OpenCV differential tests need opencv-python-headless")

# ============================================================ wsolevaluation's evaluation_test.py


def test_iou_degenerate_zero_boxes_are_one_pixel_each():
    # test_calculate_multiple_iou_shape_type_degenerate_zero: [0,0,0,0] vs [0,0,0,0] -> 1.0
    ious = pixel_box_iou(np.zeros((3, 4), dtype=int), np.zeros((5, 4), dtype=int))
    assert ious.shape == (3, 5) and ious.dtype == np.float64
    assert (ious == 1.0).all()


def test_iou_box_convention_reversed_box_raises():
    # test_calculate_multiple_iou_box_convention: [1,1,0,0] is not x0y0x1y1
    with pytest.raises(ValueError, match="x1 >= x0"):
        pixel_box_iou(np.array([[1, 1, 0, 0]]), np.array([[1, 1, 2, 2]]))


def test_iou_eye_boxes():
    boxes = np.array([[1, 1, 3, 3], [4, 4, 5, 5]])
    assert (pixel_box_iou(boxes, boxes) == np.eye(2)).all()


def test_iou_realistic_values():
    assert pixel_box_iou([[1, 2, 5, 6]], [[3, 1, 4, 5]])[0, 0] == pytest.approx(8 / 27, abs=1e-6)


def test_resize_bbox_cases():
    # wsolevaluation's resize_bbox(box, image_size=(w, h), resize_size=(w, h)); spn takes (H, W)
    assert resize_boxes([1, 2, 4, 3], size=(20, 10), new_size=(10, 35)).tolist() == [[3, 1, 14, 1]]
    assert resize_boxes([1, 2, 1, 2], size=(3, 3), new_size=(3, 3)).tolist() == [[1, 2, 1, 2]]


THRESHOLDS_02 = np.arange(0, 1, 0.2)


def first_boxes(scoremap, **options):
    return [boxes[0].tolist() for boxes in wsol_boxes(scoremap, THRESHOLDS_02, **options)]


def test_boxes_degenerate():
    assert first_boxes(np.zeros((3, 3))) == [[0, 0, 0, 0]] * 5


def test_boxes_unimodal():
    scoremap = np.array(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.4, 0.4, 0.4, 0.6],
            [0.0, 0.4, 1.0, 0.8, 0.6],
            [0.0, 0.4, 0.4, 0.4, 0.6],
        ]
    )
    assert first_boxes(scoremap) == [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]


MULTIMODAL = np.array(
    [
        [0.4, 0.0, 0.2, 0.2, 0.2],
        [0.4, 0.4, 0.0, 0.4, 0.0],
        [0.0, 0.0, 0.0, 0.4, 0.0],
        [1.0, 0.6, 0.8, 0.2, 0.2],
    ]
)


def test_boxes_multimodal():
    # The case spn failed with the pixel-count rule: at 0.2 wsolevaluation keeps the L of three
    # pixels top left (contour area 1/2) over the longer one-pixel-wide regions (area 0).
    assert first_boxes(MULTIMODAL) == [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]


def test_boxes_multimodal_pixel_count_variant_differs_at_02():
    # The named variant ranks by pixel count: at 0.2 (cut 51) the foreground is the L
    # {(0,0), (0,1), (1,1)}, the vertical run at column 3 rows 1..2 and the bottom row
    # (0,3), (1,3), (2,3): the bottom row and the column-3 run are 8-connected through
    # (2,3)-(3,2), 5 pixels, so that region's box [0, 1, 3, 3] grows by one to [0, 1, 4, 3].
    assert first_boxes(MULTIMODAL, largest="pixel_count")[1] == [0, 1, 4, 3]


def test_boxes_nan_raises():
    with pytest.raises(ValueError, match="NaN"):
        wsol_boxes(np.full((3, 3), np.nan), THRESHOLDS_02)


def test_smallest_disagreement_of_the_old_rule():
    # [[1, 1, 0, 1]]: two regions of contour area 0; OpenCV lists the right one first, so
    # wsolevaluation boxes pixel 3 ([3, 0, 3, 0]) and misses the ground truth [0, 0, 1, 0].
    scoremap = np.array([[[1.0, 1.0, 0.0, 1.0]]])
    assert wsol_boxes(scoremap[0], [0.5])[0].tolist() == [[3, 0, 3, 0]]
    assert box_accuracy(scoremap, [[[0, 0, 1, 0]]], version=1).value == 0.0
    assert box_accuracy(scoremap, [[[0, 0, 1, 0]]], version=1, largest="pixel_count").value == 1.0


@pytest.mark.parametrize("threshold", [-0.5, 1.5, np.nan, np.inf])
def test_thresholds_outside_unit_interval_raise(threshold):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wsol_boxes(np.eye(3), [0.0, threshold])


def test_threshold_one_is_allowed_and_gives_no_foreground():
    assert wsol_boxes(np.eye(3), [1.0])[0].tolist() == [[0, 0, 0, 0]]


# ----------------------------------------------------------------- wsolevaluation's MaskEvaluator


def scattered_mask(counts, seed, side=224):
    """A (side, side) mask with counts = (foreground, background) pixels scattered at random,
    every other pixel in the ignore region: (mask 0/1, ignore bool)."""
    foreground, background = counts
    order = np.random.default_rng(seed).permutation(side * side)
    mask = np.zeros(side * side, dtype=np.uint8)
    ignore = np.ones(side * side, dtype=bool)
    mask[order[:foreground]] = 1
    ignore[order[: foreground + background]] = False
    ignore[order[:foreground]] = True  # ignore boxes may cover foreground: foreground wins
    return mask.reshape(side, side), ignore.reshape(side, side)


# (foreground, background) pixel counts of the three OpenImages masks of the test file
MASK_COUNTS = [(43031, 7145), (833, 49342), (347, 13909)]


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("ignore_score", [0.0, 1.0])
def test_mask_perfect_scoremap(index, ignore_score):
    mask, ignore = scattered_mask(MASK_COUNTS[index], index)
    scoremap = mask.astype(np.float64)
    scoremap[ignore & (mask == 0)] = ignore_score
    assert pxap(scoremap[None], [mask], [ignore], interval=0.01).value == 1.0


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_mask_constant_scoremap_is_the_positive_fraction(index, value, normalize):
    foreground, background = MASK_COUNTS[index]
    mask, ignore = scattered_mask(MASK_COUNTS[index], index)
    result = pxap(np.full((1, 224, 224), value), [mask], [ignore], interval=0.01, normalize=normalize)
    assert result.value == pytest.approx(foreground / (foreground + background), abs=1e-3)


def test_mask_no_foreground_raises():
    with pytest.raises(ValueError, match="no image has a foreground pixel"):
        pxap(np.zeros((1, 8, 8)), [np.zeros((8, 8))])


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_mask_all_foreground_is_one(value):
    assert pxap(np.full((1, 8, 8), value), [np.ones((8, 8))]).value == pytest.approx(1.0)


def test_mask_nan_scoremap_raises():
    with pytest.raises(ValueError, match="NaN"):
        pxap(np.full((1, 8, 8), np.nan), [np.ones((8, 8))])


def test_pxap_hand_worked_ranking_and_instances():
    # values 4, 3, 2, 1 normalise to 1, 2/3, 1/3, 0; foreground (union of two instance masks)
    # at values 4 and 2: the ranking is fg, bg, fg, bg, so AP = 1 * 1/2 + 2/3 * 1/2 = 5/6.
    maps = np.array([[[4.0, 3.0], [2.0, 1.0]]])
    instances = np.array([[[1, 0], [0, 0]], [[0, 0], [1, 0]]])
    assert pxap(maps, [instances]).value == pytest.approx(5 / 6)
    # ignoring the background pixel of value 3 leaves fg, fg, bg: AP = 1
    assert pxap(maps, [instances], [np.array([[0, 1], [0, 0]])]).value == pytest.approx(1.0)


def test_pxap_streams_histograms_like_one_batch():
    rng = np.random.default_rng(3)
    maps = rng.random((6, 9, 7))
    masks = rng.random((6, 9, 7)) > 0.6
    metric = PxAP()
    for start in range(0, 6, 2):
        metric.update(torch.from_numpy(maps[start : start + 2]), masks[start : start + 2])
    assert metric.compute().value == pxap(maps, masks).value


# ======================================================================== OpenCV differential


def oracle_boxes(scoremap01, thresholds, multi_contour):
    """wsolevaluation's box rule, step by step with OpenCV, on a map already in [0, 1]."""
    height, width = scoremap01.shape
    image = (scoremap01 * 255).astype(np.uint8)
    result = []
    for threshold in thresholds:
        _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if len(contours) == 0:
            result.append([[0, 0, 0, 0]])
            continue
        if not multi_contour:
            contours = [max(contours, key=cv2.contourArea)]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        result.append(boxes)
    return result


def random_scoremaps(count, seed):
    """Maps of the kinds that occur: noise, smoothed noise, blobs, few levels, lines; float32
    and float64, already in [0, 1] (as wsolevaluation receives them)."""
    rng = np.random.default_rng(seed)
    maps = []
    for index in range(count):
        height, width = rng.integers(1, 40, size=2)
        kind = index % 5
        if kind == 0:
            values = rng.random((height, width))
        elif kind == 1:
            values = rng.random((height, width))
            for _ in range(3):
                values = (values + np.roll(values, 1, 0) + np.roll(values, 1, 1)) / 3
        elif kind == 2:
            yy, xx = np.mgrid[:height, :width]
            values = np.zeros((height, width))
            for _ in range(rng.integers(1, 5)):
                cy, cx, s = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.5, 6)
                values += rng.random() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        elif kind == 3:
            values = rng.integers(0, 4, size=(height, width)) / 3.0
        else:
            values = (rng.random((height, width)) < 0.15) * rng.random((height, width))
        values = values - values.min()
        if values.max() > 0:
            values = values / values.max()
        maps.append(values.astype(np.float32) if index % 2 else values)
    return maps


@pytest.mark.parametrize("multi_contour", [False, True], ids=["MaxBoxAcc", "MaxBoxAccV2"])
def test_boxes_equal_opencv_on_random_maps(multi_contour):
    thresholds = np.arange(0, 1, 0.01)
    compared = 0
    for scoremap in random_scoremaps(300, seed=11 + multi_contour):
        expected = oracle_boxes(scoremap, thresholds, multi_contour)
        got = wsol_boxes(scoremap, thresholds, multi_contour=multi_contour)
        for threshold, want, have in zip(thresholds, expected, got, strict=True):
            if multi_contour:  # OpenCV's contour order is not a contract: compare as sets
                want, have = sorted(map(tuple, want)), sorted(map(tuple, have.tolist()))
            else:
                have = have.tolist()
            assert have == want, f"map {scoremap.shape} {scoremap.dtype}, threshold {threshold}"
            compared += 1
    assert compared == 300 * len(thresholds)


def test_box_accuracy_equals_an_opencv_evaluation():
    """MaxBoxAcc and MaxBoxAccV2 end to end against wsolevaluation's accumulation over OpenCV
    boxes (best IoU per threshold, fraction of images >= delta, max over thresholds)."""
    rng = np.random.default_rng(5)
    maps = [m for m in random_scoremaps(60, seed=7) if m.shape[0] > 3 and m.shape[1] > 3]
    gts = []
    for scoremap in maps:
        height, width = scoremap.shape
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        gts.append([[x0, y0, rng.integers(x0, width), rng.integers(y0, height)]])
    thresholds = np.arange(0, 1, 0.01)
    for version, deltas in ((1, (0.5,)), (2, (0.3, 0.5, 0.7))):
        correct = np.zeros((len(deltas), len(thresholds)))
        for scoremap, gt in zip(maps, gts, strict=True):
            for t, boxes in enumerate(oracle_boxes(scoremap, thresholds, version == 2)):
                best = pixel_box_iou(boxes, gt).max()
                correct[:, t] += best >= np.array(deltas)
        expected = float(np.mean((correct / len(maps)).max(axis=1)))
        metric = BoxAccuracy(version, interval=0.01)
        for scoremap, gt in zip(maps, gts, strict=True):  # maps of different sizes: one image per update
            metric.update(scoremap[None], [gt])
        assert metric.compute().value == expected


# ======================================================================== streaming memory


def test_max_box_acc_v2_memory_does_not_hold_every_threshold():
    scoremap = np.random.default_rng(0).random((1, 160, 160))
    # boxes of all cuts together (what concatenating before the IoU step held)
    total_boxes = sum(len(boxes) for boxes in wsol_boxes(scoremap[0], np.arange(0, 1, 1 / 256), multi_contour=True))
    budget = 24 * scoremap.nbytes  # a few copies of the map, labels and one cut's boxes
    assert total_boxes * 4 * 8 * 4 > budget  # holding them (and their IoU rows) would break it
    metric = BoxAccuracy(2)
    tracemalloc.start()
    try:
        metric.update(scoremap, [[[10, 10, 100, 100]]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < budget, f"peak {peak / 1e6:.1f} MB over the budget {budget / 1e6:.1f} MB"
