"""PxAP: pixel average precision (Choe et al., CVPR 2020; wsolevaluation's ``MaskEvaluator``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spn._convert import ArrayLike, MasksLike, as_map_batch
from spn.localize.wsol import normalize_scoremap

from ._inputs import as_mask
from .base import Metric, MetricResult, check_evaluated

__all__ = ["PxAP", "pxap"]


class PxAP(Metric):
    """Pixel average precision of maps against ground-truth masks, as wsolevaluation.

    For each image, the ground truth is the union of its instance masks (values ``> 0.5``);
    the pixels of its ignore mask that are not foreground are left out. Over the whole set,
    the maps' values at foreground and at background pixels are counted in histograms with
    the bins ``[0, i), [i, 2i), ..., [1 - i, 1), [1, 2), [2, 3]`` (``i = interval``); from the
    highest bin down these give the true and false positives of every threshold, so
    ``precision = tp / (tp + fp)`` and ``recall = tp / (tp + fn)``, and
    ``PxAP = sum_k precision_k * (recall_k - recall_{k-1})`` over the thresholds with a
    positive prediction: wsolevaluation's ``MaskEvaluator.compute`` (which prints it in %).

    Maps are min-max normalised per image first (:func:`spn.localize.normalize_scoremap`,
    wsolevaluation's inference step; ``normalize=False`` takes maps already in ``[0, 1]``).
    Masks must be at the maps' resolution (wsolevaluation resizes masks to 224 x 224 with
    nearest-neighbour interpolation).

    Args:
        interval: the threshold step (default 0.001, wsolevaluation's ``config.py``).
        normalize: min-max normalise each map (default True).

    Example:
        >>> maps = np.array([[[0.9, 0.8], [0.1, 0.0]]])
        >>> pxap(maps, [[[1, 0], [1, 0]]]).value  # ranks 0.9 (fg), 0.8 (bg), 0.1 (fg), 0.0 (bg)
        0.8333333333333333
    """

    name = "pxap"

    def __init__(self, interval: float = 0.001, normalize: bool = True) -> None:
        interval = float(interval)
        if not 0 < interval <= 1:
            raise ValueError(f"interval must lie in (0, 1], got {interval}")
        self.interval = interval
        self.normalize = bool(normalize)
        self.thresholds = np.arange(0, 1, interval)
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"interval": self.interval, "normalize": self.normalize}

    def reset(self) -> None:
        self.foreground_hist = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.background_hist = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.num_images = 0

    def update(self, maps: ArrayLike, gt_masks: MasksLike, ignore_masks: MasksLike | None = None) -> None:
        """Add a batch.

        Args:
            maps: ``(B, H, W)`` tensor or array.
            gt_masks: per image a ``(H, W)`` mask or ``(m_i, H, W)`` instance masks (their
                union is the foreground): a ``(B, H, W)`` array or a list of ``B`` arrays.
            ignore_masks: per image a ``(H, W)`` mask of pixels to leave out where they are
                not foreground, or None.
        """
        array = as_map_batch(maps, keep_float32=True)
        if len(gt_masks) != len(array):
            raise ValueError(f"gt_masks must hold one mask per map: expected {len(array)}, got {len(gt_masks)}")
        if ignore_masks is not None and len(ignore_masks) != len(array):
            raise ValueError(f"ignore_masks must hold one mask per map: expected {len(array)}, got {len(ignore_masks)}")
        foreground_hist = np.zeros_like(self.foreground_hist)
        background_hist = np.zeros_like(self.background_hist)
        for index, scoremap in enumerate(array):
            shape = (int(scoremap.shape[0]), int(scoremap.shape[1]))
            foreground = as_mask(gt_masks[index], shape, f"gt_masks[{index}]")
            ignored = np.zeros(shape, dtype=bool)
            if ignore_masks is not None and ignore_masks[index] is not None:
                ignored = as_mask(ignore_masks[index], shape, f"ignore_masks[{index}]") & ~foreground
            if self.normalize:
                scoremap = normalize_scoremap(scoremap)
            elif scoremap.size and (scoremap.min() < 0 or scoremap.max() > 1):
                raise ValueError(f"maps[{index}] must lie in [0, 1] with normalize=False")
            foreground_hist += np.histogram(scoremap[foreground], bins=self.edges)[0]
            background_hist += np.histogram(scoremap[~foreground & ~ignored], bins=self.edges)[0]
        self.foreground_hist += foreground_hist
        self.background_hist += background_hist
        self.num_images += len(array)

    def compute(self) -> MetricResult:
        """``value``: PxAP; ``details``: ``precision``, ``recall`` (from the highest threshold
        down) and ``thresholds``.

        Raises:
            ValueError: no image, or no foreground pixel in any image (AP is undefined).
        """
        check_evaluated(self.num_images, "PxAP saw no map")
        tp = self.foreground_hist[::-1].cumsum()
        fp = self.background_hist[::-1].cumsum()
        positives = int(self.foreground_hist.sum())
        if positives == 0:
            raise ValueError("PxAP is undefined: no image has a foreground pixel in its ground-truth mask")
        predicted = tp + fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / predicted
        recall = tp / positives
        has_prediction = predicted[1:] != 0
        value = float((precision[1:] * np.diff(recall))[has_prediction].sum())
        return MetricResult(
            name=self.name,
            value=value,
            count=int(self.num_images),
            details={
                "precision": np.where(predicted != 0, precision, 1.0).tolist(),
                "recall": recall.tolist(),
                "thresholds": self.edges[::-1][1:].tolist(),
            },
        )

    def _state(self) -> dict[str, Any]:
        return {
            "foreground_hist": self.foreground_hist.copy(),
            "background_hist": self.background_hist.copy(),
            "num_images": self.num_images,
        }

    def _add_state(self, state: Any) -> None:
        self.foreground_hist += np.asarray(state["foreground_hist"], dtype=np.int64)
        self.background_hist += np.asarray(state["background_hist"], dtype=np.int64)
        self.num_images += int(state["num_images"])


def pxap(
    maps: ArrayLike,
    gt_masks: MasksLike,
    ignore_masks: MasksLike | None = None,
    *,
    interval: float = 0.001,
    normalize: bool = True,
) -> MetricResult:
    """One-shot :class:`PxAP` over one batch (same arguments and result)."""
    metric = PxAP(interval=interval, normalize=normalize)
    metric.update(maps, gt_masks, ignore_masks)
    return metric.compute()


