"""Picture grids for ``spn evaluate --pictures``: each image with its ground-truth class's map,
the predicted box (red: wsolevaluation's largest region at the evaluation's map threshold, or
the SPN paper's mean-threshold box when there is none) and the true boxes (green)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from spn import localize
from spn.models import Network

__all__ = ["write_grid"]

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@torch.no_grad()
def write_grid(
    model: Network,
    dataset: Any,
    path: Path,
    device: torch.device,
    threshold: float | None = None,
    count: int = 16,
    columns: int = 4,
    upsample: str = "bilinear",
) -> Path:
    """Write a ``count``-image grid (first images of ``dataset``) to ``path`` (PNG, atomic);
    images under 96 px are enlarged by an integer factor (nearest pixel) to stay legible. The
    maps reach the image size as ``upsample`` says, in float64 (as ``spn evaluate`` scores
    them, so that the red box is the one it scored)."""
    from spn import viz

    from .evaluate import scored_maps

    tiles = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        image = item["image"]
        classes = torch.tensor([item["label"]], device=device)
        response = scored_maps(model, image[None].to(device), classes, upsample)[1][0].cpu()
        if threshold is None:
            predicted = localize.boxes_from_maps(response[None])[0]
        else:
            predicted = [localize.wsol_boxes(response, [threshold])[0]]
        shown = (image * STD + MEAN).clamp(0, 1) if image.min() < 0 else image.clamp(0, 1)
        tiles.append(viz.show_localization(shown, response_map=response, pred_boxes=predicted[0],
                                           gt_boxes=item["boxes"].numpy()))
    if not tiles:
        raise ValueError("no image to draw")
    factor = max(1, 192 // max(tiles[0].shape[:2]))  # small images (digits: 64 px) enlarged, nearest pixel
    tiles = [tile.repeat(factor, 0).repeat(factor, 1) for tile in tiles]
    height, width, _ = tiles[0].shape
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (height + 2), columns * (width + 2), 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top, left = row * (height + 2), column * (width + 2)
        grid[top : top + height, left : left + width] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    viz.save_png(path, grid)
    return path
