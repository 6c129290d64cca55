"""Class response maps: choosing the classes, the batched weighted sum, upsampling.

A WSOL head exposes per-channel activation maps A (B, K, h, w) and a classifier weight
W (N, K); the response map of class c is R_c = sum_k W[c, k] A_k (CAM: A = U; SPN: A = U * M).
Everything here works on a whole batch at once, with one einsum and no loop over classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from spn._convert import check_size

__all__ = ["ClassSelector", "ClassSpec", "class_response_maps", "resolve_classes", "top_k", "upsample_maps"]

ClassSelector = Callable[[torch.Tensor], torch.Tensor]
ClassSpec = Literal["all", "predicted"] | torch.Tensor | ClassSelector
"""Which classes to map: ``"all"``, ``"predicted"`` (argmax of the logits), a LongTensor of
class indices (B,) or (B, k), or a callable logits (B, N) -> LongTensor, e.g. `top_k(5)`."""


def top_k(k: int) -> ClassSelector:
    """A class selector for the k highest-scoring classes of each image, best first.

    Args:
        k: how many classes, 1 <= k <= N.

    Returns:
        A callable logits (B, N) -> LongTensor (B, k), equal to ``logits.topk(k, dim=1).indices``.

    Example:
        >>> logits = torch.tensor([[0.1, 2.0, 1.0], [3.0, 0.0, 1.0]])
        >>> top_k(2)(logits)
        tensor([[1, 2],
                [0, 2]])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k needs an int k >= 1, got {k!r}")

    def select(logits: torch.Tensor) -> torch.Tensor:
        if k > logits.shape[1]:
            raise ValueError(f"top_k({k}) asked for more classes than the {logits.shape[1]} there are")
        return logits.topk(k, dim=1).indices

    select.__name__ = f"top_k({k})"
    return select


def resolve_classes(logits: torch.Tensor, classes: ClassSpec) -> torch.Tensor | None:
    """Turn a class specification into class indices for each image.

    Args:
        logits: (B, N) scores of the batch.
        classes: ``"all"``, ``"predicted"``, a LongTensor (B,) or (B, k), or a callable
            logits -> LongTensor (B,) or (B, k), such as `top_k`.

    Returns:
        None for ``"all"``; otherwise an int64 tensor on the logits' device, (B,) for
        ``"predicted"`` and 1-D indices, (B, k) for 2-D indices.

    Raises:
        TypeError: a plain int, a float or bool tensor, or an unknown kind of specification.
        ValueError: an unknown string, a wrong shape, or an index outside [0, N).

    Example:
        >>> logits = torch.tensor([[0.1, 2.0, 1.0], [3.0, 0.0, 1.0]])
        >>> resolve_classes(logits, "predicted")
        tensor([1, 0])
    """
    batch, num_classes = logits.shape
    if isinstance(classes, str):
        if classes == "all":
            return None
        if classes == "predicted":
            return logits.detach().argmax(dim=1)
        raise ValueError(f"classes must be 'all', 'predicted', a LongTensor or a callable, got {classes!r}")
    if callable(classes) and not isinstance(classes, torch.Tensor):
        with torch.no_grad():
            chosen = classes(logits.detach())
        source = f"the class selector {getattr(classes, '__name__', classes)!r}"
    elif isinstance(classes, torch.Tensor):
        chosen, source = classes, "classes"
    else:
        hint = " (for one class c in every image pass torch.full((B,), c))" if isinstance(classes, int) else ""
        raise TypeError(
            f"classes must be 'all', 'predicted', a LongTensor (B,) or (B, k), or a callable; "
            f"got {type(classes).__name__}{hint}"
        )
    integer = isinstance(chosen, torch.Tensor) and not (
        chosen.dtype.is_floating_point or chosen.dtype.is_complex or chosen.dtype == torch.bool
    )
    if not integer:
        kind = chosen.dtype if isinstance(chosen, torch.Tensor) else type(chosen).__name__
        raise TypeError(f"{source} must hold integer class indices, got {kind}")
    if chosen.dim() not in (1, 2) or chosen.shape[0] != batch:
        raise ValueError(f"{source} must have shape ({batch},) or ({batch}, k), got {tuple(chosen.shape)}")
    chosen = chosen.to(device=logits.device, dtype=torch.long)
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= num_classes):
        low, high = int(chosen.min()), int(chosen.max())
        raise ValueError(f"{source} must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return chosen


def class_response_maps(activations: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    r"""R_c = sum_k weight[c, k] * activations_k for the chosen classes of each image, batched.

    Args:
        activations: per-channel maps A, (B, K, h, w).
        weight: classifier weight W, (N, K) (an ``nn.Linear``'s ``weight``); no bias.
        classes: None for all classes, or int64 indices (B,) or (B, k) from `resolve_classes`.

    Returns:
        Maps in the activations' dtype: (B, N, h, w) for None, (B, h, w) for (B,) indices,
        (B, k, h, w) for (B, k) indices. Differentiable in both inputs.

    Shape:
        - activations: (B, K, h, w)
        - weight: (N, K)
        - output: (B, N | k, h, w) or (B, h, w)

    Example:
        >>> a, w = torch.rand(2, 4, 3, 3), torch.rand(5, 4)
        >>> class_response_maps(a, w, None).shape
        torch.Size([2, 5, 3, 3])
        >>> class_response_maps(a, w, torch.tensor([0, 4])).shape
        torch.Size([2, 3, 3])
    """
    weight = weight.to(activations.dtype)
    if classes is None:
        return torch.einsum("nk,bkhw->bnhw", weight, activations)
    chosen = weight[classes if classes.dim() == 2 else classes[:, None]]  # (B, k, K)
    maps = torch.einsum("bck,bkhw->bchw", chosen, activations)
    return maps[:, 0] if classes.dim() == 1 else maps


def upsample_maps(
    maps: torch.Tensor, size: Sequence[int], align_corners: bool = False, mode: str = "bilinear"
) -> torch.Tensor:
    """Resize maps ``(B, h, w) -> (B, H, W)`` (or ``(B, C, h, w) -> (B, C, H, W)``), bilinearly
    by default.

    Bilinear: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=align_corners)``
    on the maps' device (TorchRay's pointing game resizes so). Bicubic: OpenCV's
    ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)``, to the last bit for float64 maps (float32
    ones within about 1e-6 of the range: OpenCV's float32 path computes differently), the
    resize of wsolevaluation's ``inference.py`` (which hands it float64 maps), used by
    ``spn evaluate`` for the WSOL benchmarks: the cubic kernel with a = -0.75 at half-integer
    pixel centres, the border replicated, each output coordinate and its four weights computed
    in float32 as OpenCV does,
    then the rows and the columns each summed in the maps' dtype, columns first, in OpenCV's
    order (``torch``'s own bicubic computes the weights in the input's precision and differs
    by up to 5e-6 of the map's range where the scale is not an integer). The two conventions
    place the map's cells differently in the image (column ``j`` of ``w`` shown; rows likewise):

    * ``align_corners=False`` (default, current PyTorch and OpenCV): the map is ``h x w``
      cells tiling the image, so cell ``j`` takes its value exactly at its centre
      ``(j + 0.5) * W / w - 0.5`` (:func:`spn.localize.cell_centres`; 15.5, 47.5, ... for 7
      cells over 224 pixels). Pixels beyond the outermost centres are clamped to the border
      cell's value, so a peak in a border cell becomes a plateau of half a stride.
    * ``align_corners=True``: cell ``j`` lands on image coordinate ``j * (W - 1) / (w - 1)``,
      so the corner cells land on the corner pixels and nothing is clamped. This is what
      ``F.upsample(mode="bilinear")`` did in PyTorch <= 0.3, which the released SPN code used:
      pass True to reproduce its maps and points.

    With ``w == 1`` (or ``h == 1``) both give a constant row (column).

    Args:
        maps: tensor of shape ``(B, h, w)`` or ``(B, C, h, w)``; NumPy arrays go through
            ``torch.from_numpy`` first (no copy).
        size: ``(H, W)``, the output (image) size.
        align_corners: see above; bicubic takes False only.
        mode: ``"bilinear"`` or ``"bicubic"`` (cubic interpolation overshoots: a map of
            values in [0, 1] can come out slightly outside it).

    Returns:
        A tensor on the maps' device (integer maps become float32).

    Shape:
        - Input: :math:`(B, h, w)` or :math:`(B, C, h, w)`.
        - Output: :math:`(B, H, W)` or :math:`(B, C, H, W)`.

    Example:
        >>> upsample_maps(torch.tensor([[[1.0, 3.0]]]), (1, 4))
        tensor([[[1.0000, 1.5000, 2.5000, 3.0000]]])
        >>> upsample_maps(torch.tensor([[[1.0, 3.0]]]), (1, 4), align_corners=True)
        tensor([[[1.0000, 1.6667, 2.3333, 3.0000]]])
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(
            f"upsample_maps is a torch operation and takes a tensor, got {type(maps).__name__}; "
            "wrap a NumPy array with torch.from_numpy(array) (no copy)"
        )
    height, width = check_size(size)
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    if mode == "bicubic" and align_corners:
        raise ValueError("mode='bicubic' is OpenCV's INTER_CUBIC, which has no align_corners=True")
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must have shape (B, h, w) or (B, C, h, w), got shape {tuple(maps.shape)}")
    tensor = maps if maps.is_floating_point() else maps.float()
    stacked = tensor if tensor.ndim == 4 else tensor[:, None]
    if stacked.shape[0] == 0 or stacked.shape[1] == 0:
        resized = stacked.new_zeros((*stacked.shape[:2], height, width))
    elif mode == "bicubic":
        resized = _opencv_cubic(stacked, height, width)
    else:
        resized = F.interpolate(stacked, size=(height, width), mode="bilinear", align_corners=bool(align_corners))
    return resized if tensor.ndim == 4 else resized[:, 0]


def _cubic_taps(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's INTER_CUBIC taps along one axis: the source indices (n_out, 4), clamped to the
    map (the border replicated), and their weights (n_out, 4) in ``dtype``. The source
    coordinate ``(j + 0.5) * (n_in / n_out) - 0.5`` (the ratio as 1 / (n_out / n_in) in
    double) is rounded to float32, and the weights of its fraction t are the cubic
    convolution kernel with a = -0.75, evaluated in float32 in OpenCV's form; the fourth is
    1 minus the other three."""
    scale = 1.0 / (n_out / n_in)
    position = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    start = torch.floor(position)
    t = position - start  # float32 throughout, as OpenCV's float arithmetic
    a = -0.75
    t1, u = t + 1.0, 1.0 - t
    w0 = ((a * t1 - 5.0 * a) * t1 + 8.0 * a) * t1 - 4.0 * a
    w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    w2 = ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0
    w3 = 1.0 - w0 - w1 - w2
    index = (start.long()[:, None] + torch.arange(-1, 3)).clamp_(0, n_in - 1)
    return index.to(device), torch.stack([w0, w1, w2, w3], 1).to(dtype=dtype, device=device)


def _opencv_cubic(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width) as cv2.resize(INTER_CUBIC): columns, then rows,
    each output the sum of its four taps from the first to the last, in the maps' dtype."""
    columns, column_weights = _cubic_taps(maps.shape[-1], width, maps.dtype, maps.device)
    rows, row_weights = _cubic_taps(maps.shape[-2], height, maps.dtype, maps.device)
    across = maps[..., columns[:, 0]] * column_weights[:, 0]
    for k in range(1, 4):
        across = across + maps[..., columns[:, k]] * column_weights[:, k]
    out = across[..., rows[:, 0], :] * row_weights[:, 0, None]
    for k in range(1, 4):
        out = out + across[..., rows[:, k], :] * row_weights[:, k, None]
    return out
