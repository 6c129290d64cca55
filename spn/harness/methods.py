"""Training methods: how a batch becomes a loss. ``--method NAME`` picks one from ``METHODS``.

A method is a callable ``(model, images, batch, config) -> (loss, logits)``. The default is
the classification loss every WSOL network trains with: cross-entropy on the image label, or
binary cross-entropy on the multi-hot labels of a multi-label dataset (Pascal VOC). Methods
with extra losses or heads (adversarial erasing, ACoL, SPA, ...) register here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["METHODS", "Method", "classification_loss"]

Method = Callable[[torch.nn.Module, torch.Tensor, Mapping[str, Any], Any], tuple[torch.Tensor, torch.Tensor]]


def classification_loss(
    model: torch.nn.Module, images: torch.Tensor, batch: Mapping[str, Any], config: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on ``batch["label"]`` (or BCE on ``batch["labels"]`` when present)."""
    logits = model(images)
    if "labels" in batch:
        target = batch["labels"].to(logits.device, logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target), logits
    return F.cross_entropy(logits, batch["label"].to(logits.device)), logits


METHODS: dict[str, Method] = {"default": classification_loss}
