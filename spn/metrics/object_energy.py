"""Object energy (SPN paper, Zhu et al. ICCV 2017, section 4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from spn._convert import ArrayLike, BoxesLike, as_map_batch, check_size

from ._geometry import box_union_mask
from ._inputs import as_box_list, batch_size_of
from .base import Metric, MetricResult, check_evaluated

__all__ = ["ObjectEnergy", "object_energy"]


def energy_share(energy_map: np.ndarray, inside: np.ndarray) -> float:
    """Share of the non-negative energy of ``energy_map`` on the ``inside`` pixels.

    The map is clipped at 0 and normalised to sum 1; a map with no positive energy counts as
    uniform (its share is the fraction of pixels inside). A sum that overflows is avoided by
    dividing by the maximum first, so the share stays exact.
    """
    energy = np.clip(energy_map, 0.0, None)
    with np.errstate(over="ignore"):
        total = energy.sum()
    if not np.isfinite(total):
        energy = energy / energy.max()
        total = energy.sum()
    if total <= 0:
        return float(inside.mean())
    return float(energy[inside].sum() / total)


class ObjectEnergy(Metric):
    """Object energy: the share of a map's energy inside the ground-truth boxes, averaged over images.

    Each map (a proposal map or a response map) is resized to ``size`` (bilinear,
    :func:`spn.models.upsample_maps`, on the maps' device before they become NumPy) when
    ``size`` is given, clipped at 0 and normalised to sum 1; its object energy is the sum over
    the pixels inside the union of the ground-truth boxes (a pixel covered by several boxes
    counts once). A map with no positive energy counts as uniform.

    Args:
        size: the image size ``(H, W)`` to resize maps to, or None when maps are at image size.

    Example:
        >>> object_energy(np.array([[[1.0, 3.0], [0.0, 4.0]]]), [[[1, 0, 1, 1]]]).value
        0.875
    """

    name = "object_energy"

    def __init__(self, size: Sequence[int] | None = None) -> None:
        self.size = None if size is None else check_size(size)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"size": self.size}

    def reset(self) -> None:
        self.shares: list[float] = []

    def update(self, maps: ArrayLike, gt_boxes: BoxesLike) -> None:
        """Add maps ``(B, h, w)`` and ground-truth boxes (``B`` arrays ``(m_i, 4)`` in image pixels)."""
        box_list = as_box_list(gt_boxes, batch_size_of(maps, "maps"))
        if self.size is not None:
            from spn.models.maps import upsample_maps

            tensor = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(as_map_batch(maps))
            if tensor.ndim == 3 and tuple(tensor.shape[1:]) != self.size and len(tensor):
                maps = upsample_maps(tensor.double(), self.size)
        array = as_map_batch(maps)
        shares = [
            energy_share(energy_map, box_union_mask(boxes, *energy_map.shape))
            for energy_map, boxes in zip(array, box_list, strict=True)
        ]
        self.shares.extend(shares)

    def compute(self) -> MetricResult:
        """``value``: the mean over images; ``details``: ``per_image`` shares, in update order
        (merged instances' shares follow this one's, so ``sync`` gives rank order).

        Raises:
            ValueError: no image was added.
        """
        check_evaluated(len(self.shares), "ObjectEnergy saw no map")
        return MetricResult(
            name=self.name,
            value=math.fsum(self.shares) / len(self.shares),  # exact sum: independent of merge order
            count=len(self.shares),
            details={"per_image": list(self.shares)},
        )

    def _state(self) -> dict[str, Any]:
        return {"shares": list(self.shares)}

    def _add_state(self, state: Any) -> None:
        self.shares.extend(float(share) for share in state["shares"])


def object_energy(maps: ArrayLike, gt_boxes: BoxesLike, *, size: Sequence[int] | None = None) -> MetricResult:
    """One-shot :class:`ObjectEnergy` over one batch (same arguments and result)."""
    metric = ObjectEnergy(size=size)
    metric.update(maps, gt_boxes)
    return metric.compute()
