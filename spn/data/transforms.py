"""The few image transforms of WSOL training and evaluation (Pillow and torch; no torchvision).

Training: resize, random crop, random horizontal flip (wsolevaluation: 256 -> 224 crop, flip).
Evaluation: resize only (boxes and masks are mapped by the same resize, never cropped).
Random draws come from torch's global generator, so ``torch.manual_seed`` decides them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "random_crop", "random_flip", "resize", "to_tensor"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def resize(image: Image.Image, size: tuple[int, int], nearest: bool = False) -> Image.Image:
    """``image`` resized to ``size = (H, W)`` (bilinear, or nearest for masks)."""
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)


def to_tensor(image: Image.Image, normalize: bool = True) -> torch.Tensor:
    """An RGB image as a float32 ``(3, H, W)`` tensor in [0, 1], ImageNet-normalised by default."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if normalize:
        tensor = (tensor - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return tensor


def random_crop(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A random ``size = (h, w)`` crop of a ``(C, H, W)`` tensor (the whole tensor when it fits)."""
    height, width = tensor.shape[-2:]
    crop_h, crop_w = min(size[0], height), min(size[1], width)
    top = int(torch.randint(0, height - crop_h + 1, ()))
    left = int(torch.randint(0, width - crop_w + 1, ()))
    return tensor[..., top : top + crop_h, left : left + crop_w]


def random_flip(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor mirrored left-right with probability 1/2."""
    return tensor.flip(-1) if bool(torch.rand(()) < 0.5) else tensor
