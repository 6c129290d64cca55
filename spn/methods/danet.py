r"""DANet: Divergent Activation (Xue et al., ICCV 2019).

- **Discrepant divergent activation (DDA)**: every class has K maps (a 1x1 conv to N x K
  channels, class-major: channel ``c * K + k``); the class map is their mean and the class
  score its spatial mean. The K maps of the ground-truth class are pushed apart by the
  cosine loss :math:`L_{cos} = \frac{1}{B P} \sum_b \sum_{i<j} |\cos(A_i, A_j)|` over the P
  pairs of the maps taken (`cosine_discrepancy`); the authors take a random 1.5 K of the
  ground-truth class's maps of all levels, upsampled to the largest level
  (`divergent_activation_loss`).
- **Hierarchical divergent activation (HDA)**: one such head per level of a class hierarchy,
  the coarsest on the shallowest feature level (CUB: 11 orders on conv3, 37 families on conv4,
  200 species on conv5); loss :math:`0.5 \sum_l CE_l + \alpha L_{cos}`, alpha = 0.01; the
  localization map is the sum over the levels of each level's top class map (mean of the
  ReLU'd K maps), upsampled to the largest level.

The hierarchy is a file (`read_hierarchy`). Defaults from the authors' code and CUB scripts
(github.com/xuehaolan/DANet, ``models/vgg/vgg_DA.py``, ``scripts/train_DA_cub.sh``); see
``docs/methods/danet.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spn._io import write_atomic
from spn.models import FeatureLevels, HeadOutput, HeadState, Network, WSOLHead, resolve_classes, upsample_maps
from spn.models.maps import ClassSpec

from .base import Method, MethodError, MethodOutput, Step, barrier, process_rank

__all__ = [
    "DANet",
    "DANetHead",
    "DANetTrainOutput",
    "DivergentLevel",
    "HierarchyError",
    "cosine_discrepancy",
    "divergent_activation_loss",
    "read_hierarchy",
]

_COS_EPS = 1e-8  # the authors': cos = <a, b> / sqrt(|a|^2 |b|^2 + 1e-8)


class HierarchyError(MethodError):
    """A class hierarchy file that cannot be read (says file:line and why)."""


def read_hierarchy(path: str | os.PathLike[str], num_classes: int | None = None) -> torch.Tensor:
    """Read a class hierarchy: one CSV line per class, ``class,parent,grandparent,...``.

    Every line has the class index first, then its ancestors, finest first (the digits
    benchmark's ``hierarchy.txt`` is ``digit,parity,loops``). All fields are integers >= 0;
    every line has the same number of fields; each class 0..N-1 appears exactly once (in any
    order); the labels of each ancestor level are 0..M-1, every one used. The levels need
    not nest (the digits' parity and loop count do not). Blank lines are skipped.

    Args:
        path: the file.
        num_classes: N to check the classes against (None: N = the number of lines).

    Returns:
        int64 (L, N): row 0 is 0..N-1, row l the level-l ancestor of each class (L - 1
        ancestor levels, finest first).

    Raises:
        HierarchyError: a missing file, or a bad line, naming ``file:line``.

    Example:
        >>> import tempfile, pathlib
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "h.txt"
        >>> _ = file.write_text("0,0\\n1,1\\n2,0\\n")
        >>> read_hierarchy(file)
        tensor([[0, 1, 2],
                [0, 1, 0]])
    """
    file = Path(path)
    if not file.is_file():
        raise HierarchyError(f"{file}: no such hierarchy file (CSV lines 'class,parent,...', finest first)")
    rows: dict[int, list[int]] = {}
    width: int | None = None
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        where = f"{file}:{number}"
        fields = [field.strip() for field in text.split(",")]
        try:
            values = [int(field) for field in fields]
        except ValueError:
            raise HierarchyError(f"{where}: expected integers 'class,parent,...', got {text!r}") from None
        if any(value < 0 for value in values):
            raise HierarchyError(f"{where}: indices must be >= 0, got {text!r}")
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise HierarchyError(f"{where}: {len(values)} fields, but earlier lines have {width}")
        if values[0] in rows:
            raise HierarchyError(f"{where}: class {values[0]} is listed twice")
        rows[values[0]] = values
    if not rows or width is None:
        raise HierarchyError(f"{file}: empty hierarchy file")
    expected = len(rows) if num_classes is None else num_classes
    missing = sorted(set(range(expected)) - set(rows))
    extra = sorted(set(rows) - set(range(expected)))
    if missing or extra:
        raise HierarchyError(
            f"{file}: must list classes 0..{expected - 1} once each; "
            + (f"missing {missing[:5]}" if missing else f"unknown {extra[:5]}")
        )
    table = torch.tensor([rows[index] for index in range(expected)], dtype=torch.long).T.contiguous()
    for level in range(1, width):
        used = set(table[level].tolist())
        gaps = sorted(set(range(max(used) + 1)) - used)
        if gaps:
            raise HierarchyError(f"{file}: field {level + 1} (ancestor level {level}) never uses label(s) {gaps[:5]}")
    return table


def cosine_discrepancy(maps: torch.Tensor, per_pair: bool = True) -> torch.Tensor:
    r"""Mean absolute cosine similarity between the maps of each image (DANet's :math:`L_{cos}`).

    :math:`\frac{1}{B P} \sum_b \sum_{i<j} |\cos(A_{b,i}, A_{b,j})|` with P = M(M-1)/2 pairs
    and :math:`\cos(a, b) = \langle a, b\rangle / \sqrt{|a|^2 |b|^2 + 10^{-8}}` (maps
    flattened). ``per_pair=False`` takes the absolute value of each image's sum over its pairs
    instead, as the released code does.

    Args:
        maps: (B, M, h, w), M >= 2 (fewer: the loss is 0).
        per_pair: absolute value per pair (default) or of each image's sum (the released code).

    Returns:
        The scalar loss.

    Shape:
        - maps: (B, M, h, w)
        - output: ()

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> cosine_discrepancy(torch.stack([a, b, a])[None])  # pairs: 0, 1, 0
        tensor(0.3333)
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor (B, M, h, w), got {getattr(maps, 'shape', type(maps))}")
    batch, count = maps.shape[:2]
    if count < 2 or batch == 0:
        return maps.sum() * 0.0
    flat = maps.flatten(2)
    dots = flat @ flat.transpose(1, 2)  # (B, M, M)
    squares = torch.diagonal(dots, dim1=1, dim2=2)
    cosine = dots / torch.sqrt(squares[:, :, None] * squares[:, None, :] + _COS_EPS)
    upper = torch.triu(torch.ones(count, count, dtype=torch.bool, device=maps.device), diagonal=1)
    pairs = count * (count - 1) / 2
    if per_pair:
        return cosine.abs()[:, upper].sum() / (batch * pairs)
    return cosine[:, upper].sum(dim=1).abs().sum() / (batch * pairs)


def divergent_activation_loss(
    level_maps: Sequence[torch.Tensor],
    level_labels: Sequence[torch.Tensor],
    sampled: int | None = None,
    per_pair: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DANet's cosine loss over the ground-truth classes' K maps of every level.

    Each level's maps of its label are upsampled (bilinear, align_corners=True, as the
    authors) to the largest level's size and stacked (L * K maps, the levels in the given
    order); ``sampled`` of them, drawn at random (the same for the whole batch), go to
    `cosine_discrepancy`.

    Args:
        level_maps: per level (B, N_l, K, h_l, w_l) raw multi-maps.
        level_labels: per level (B,) labels.
        sampled: how many maps to draw (the authors: 1.5 K); None or >= L * K: all.
        per_pair: see `cosine_discrepancy`.
        generator: for the draw (None: torch's global one).

    Returns:
        The scalar loss.

    Example:
        >>> maps = [torch.randn(2, 3, 4, 8, 8), torch.randn(2, 5, 4, 4, 4)]
        >>> labels = [torch.tensor([0, 2]), torch.tensor([4, 1])]
        >>> divergent_activation_loss(maps, labels, sampled=6).shape
        torch.Size([])
    """
    if len(level_maps) != len(level_labels) or not level_maps:
        raise ValueError(f"need one label tensor per level, got {len(level_maps)} levels, {len(level_labels)} labels")
    sizes = [tuple(maps.shape[-2:]) for maps in level_maps]
    largest = max(sizes, key=lambda hw: hw[0] * hw[1])
    chosen = []
    for maps, labels in zip(level_maps, level_labels, strict=True):
        if maps.dim() != 5 or labels.shape != (maps.shape[0],):
            raise ValueError(f"level maps must be (B, N, K, h, w) with labels (B,), got {tuple(maps.shape)}, "
                             f"{tuple(labels.shape)}")  # fmt: skip
        mine = maps[torch.arange(maps.shape[0], device=maps.device), labels.to(maps.device).long()]  # (B, K, h, w)
        if tuple(mine.shape[-2:]) != largest:
            mine = F.interpolate(mine, size=largest, mode="bilinear", align_corners=True)
        chosen.append(mine)
    stacked = torch.cat(chosen, dim=1)
    total = stacked.shape[1]
    if sampled is not None and sampled < total:
        if sampled < 0:
            raise ValueError(f"sampled must be >= 0, got {sampled}")
        pick = torch.randperm(total, generator=generator)[:sampled].to(stacked.device)
        stacked = stacked[:, pick]
    return cosine_discrepancy(stacked, per_pair)


class DivergentLevel(nn.Module):
    """One DANet level: ``convs`` 3x3 convs + ReLU of ``width`` channels, then a 1x1 conv to
    ``num_classes * maps_per_class`` channels, viewed as (B, N, K, h, w) (class-major). The
    convs start as the authors' (Xavier-uniform weights, zero biases).

    Args:
        in_channels: channels of the level's features.
        num_classes: N of the level.
        maps_per_class: K.
        width: channels of the 3x3 convs.
        convs: how many (the authors: 2, their fc6 and fc7; 0: the 1x1 conv on the features).

    Example:
        >>> DivergentLevel(8, 3, 4, width=16)(torch.rand(2, 8, 5, 5)).shape
        torch.Size([2, 3, 4, 5, 5])
    """

    def __init__(self, in_channels: int, num_classes: int, maps_per_class: int, width: int, convs: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
            channels = width
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes * maps_per_class, kernel_size=1)
        self.num_classes = num_classes
        self.maps_per_class = maps_per_class
        for module in self.modules():  # the authors' initialisation of their added layers
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.convs(features))
        return out.view(out.shape[0], self.num_classes, self.maps_per_class, *out.shape[-2:])


class DANetTrainOutput(NamedTuple):
    """What `DANetHead` returns when given the labels.

    Attributes:
        logits: (B, N) of the finest level (the classes).
        level_logits: per level, coarsest first, (B, N_l); the last is ``logits``.
        level_maps: per level, coarsest first, the raw multi-maps (B, N_l, K, h_l, w_l).
        level_labels: per level, coarsest first, the labels (B,) (the targets' ancestors).
    """

    logits: torch.Tensor
    level_logits: tuple[torch.Tensor, ...]
    level_maps: tuple[torch.Tensor, ...]
    level_labels: tuple[torch.Tensor, ...]


class DANetHead(WSOLHead):
    """DANet's head: a `DivergentLevel` per hierarchy level on the feature levels.

    Level l of the hierarchy (coarsest first) reads feature level l (shallowest first); a
    feature level larger than the last one is max-pooled 2x2 first (stride 2, ceil mode; the
    authors take conv3 and conv4 after their pooling: 28, 14, 14 at 224 px). The hierarchy is a buffer
    (checkpointed with the weights).

    Args:
        in_channels: channels of each feature level, shallowest first.
        hierarchy: int64 (L, N) from `read_hierarchy` (row 0 the classes, then ancestors,
            finest first), or None for a single level.
        num_classes: N (checked against the hierarchy).
        maps_per_class: K (the authors: 8).
        width: channels of each level's 3x3 convs.
        convs: 3x3 convs per level (the authors: 2).
        coarse_maps: which class of a coarse level is added to the map: ``"top"`` (the
            authors: that level's prediction of the same rank) or ``"ancestor"`` (the
            ancestor of the mapped class).

    Shape:
        - Input: a list of L feature maps (B, C_l, h_l, w_l), shallowest first (one tensor
          for L = 1)
        - Output: logits (B, N); `DANetTrainOutput` when given ``target``

    Example:
        >>> hierarchy = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
        >>> head = DANetHead([8, 16], hierarchy, num_classes=4, maps_per_class=2, width=8).eval()
        >>> feats = [torch.rand(2, 8, 8, 8), torch.rand(2, 16, 4, 4)]
        >>> logits, maps, _ = head.forward_with_maps(feats, classes=torch.tensor([1, 3]), size=(16, 16))
        >>> logits.shape, maps.shape
        (torch.Size([2, 4]), torch.Size([2, 16, 16]))
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hierarchy: torch.Tensor | None,
        num_classes: int,
        maps_per_class: int = 8,
        width: int = 128,
        convs: int = 2,
        coarse_maps: str = "top",
    ) -> None:
        super().__init__()
        if hierarchy is None:
            hierarchy = torch.arange(num_classes)[None]
        if hierarchy.dim() != 2 or hierarchy.shape[1] != num_classes:
            raise ValueError(f"hierarchy must be (L, {num_classes}), got {tuple(hierarchy.shape)}")
        if not torch.equal(hierarchy[0].cpu(), torch.arange(num_classes)):
            raise ValueError("hierarchy row 0 must be the classes 0..N-1")
        if len(in_channels) != hierarchy.shape[0]:
            raise ValueError(
                f"{hierarchy.shape[0]} hierarchy levels need as many feature levels, got {len(in_channels)}"
            )
        if coarse_maps not in ("top", "ancestor"):
            raise ValueError(f"coarse_maps must be 'top' or 'ancestor', got {coarse_maps!r}")
        if maps_per_class < 1:
            raise ValueError(f"maps_per_class must be >= 1, got {maps_per_class}")
        # coarsest first: row L-1 of the hierarchy is the coarsest level
        self.register_buffer("ancestors", hierarchy.flip(0).long().contiguous())
        counts = [int(row.max()) + 1 for row in self.ancestors]
        self.levels = nn.ModuleList(
            DivergentLevel(channels, count, maps_per_class, width, convs)
            for channels, count in zip(in_channels, counts, strict=True)
        )
        self.in_channels = int(in_channels[-1])
        self.num_classes = num_classes
        self.maps_per_class = maps_per_class
        self.coarse_maps = coarse_maps

    ancestors: torch.Tensor

    def _multimaps(self, features: Any) -> list[torch.Tensor]:
        levels = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(levels) != len(self.levels):
            raise ValueError(f"DANetHead has {len(self.levels)} levels, got {len(levels)} feature maps")
        last = levels[-1].shape[-2:]
        outputs = []
        for level, head in zip(levels, self.levels, strict=True):
            if level.shape[-2] > last[0] or level.shape[-1] > last[1]:
                level = F.max_pool2d(level, 2, ceil_mode=True)
            outputs.append(head(level))
        return outputs

    def forward(self, features: Any, target: torch.Tensor | None = None) -> Any:
        multimaps = self._multimaps(features)
        level_logits = tuple(maps.mean(dim=(2, 3, 4)) for maps in multimaps)
        if target is None:
            return level_logits[-1]
        labels = tuple(row[target.to(row.device).long()] for row in self.ancestors)
        return DANetTrainOutput(level_logits[-1], level_logits, tuple(multimaps), labels)

    def compute(self, features: Any) -> HeadState:
        multimaps = self._multimaps(features)
        return HeadState(multimaps[-1].mean(dim=(2, 3, 4)), F.relu(multimaps[-1]).mean(2), None)

    def map_weight(self) -> torch.Tensor:
        return torch.eye(self.num_classes, device=self.ancestors.device)

    def forward_with_maps(
        self, features: Any, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        """Logits and the maps of the chosen classes: each level's class map (mean of its K
        ReLU'd maps), upsampled to the largest level (bilinear, align_corners=True), summed
        over the levels; ``classes`` and ``size`` as in `WSOLHead.forward_with_maps`. With
        ``coarse_maps="top"``, the j-th chosen class of an image takes the j-th best class of
        every coarser level (its best for ``"all"`` and 1-D indices)."""
        multimaps = self._multimaps(features)
        level_logits = [maps.mean(dim=(2, 3, 4)) for maps in multimaps]
        logits = level_logits[-1]
        chosen = resolve_classes(logits, classes)
        batch = logits.shape[0]
        index = torch.arange(self.num_classes, device=logits.device).expand(batch, -1) if chosen is None else chosen
        index = index if index.dim() == 2 else index[:, None]  # (B, k)
        sizes = [tuple(maps.shape[-2:]) for maps in multimaps]
        largest = max(sizes, key=lambda hw: hw[0] * hw[1])
        rows = torch.arange(batch, device=logits.device)[:, None]
        total: torch.Tensor | None = None
        for depth, (maps, scores) in enumerate(zip(multimaps, level_logits, strict=True)):
            class_maps = F.relu(maps).mean(dim=2)  # (B, N_l, h, w)
            if depth == len(multimaps) - 1:
                picked = index
            elif self.coarse_maps == "ancestor":
                picked = self.ancestors[depth][index]
            else:
                order = scores.detach().argsort(dim=1, descending=True)
                ranks = torch.arange(index.shape[1], device=logits.device).clamp(max=scores.shape[1] - 1)
                if chosen is None or chosen.dim() == 1:
                    ranks = torch.zeros_like(ranks)
                picked = order[:, ranks]
            level = class_maps[rows, picked]  # (B, k, h, w)
            if tuple(level.shape[-2:]) != largest:
                level = F.interpolate(level, size=largest, mode="bilinear", align_corners=True)
            total = level if total is None else total + level
        assert total is not None
        maps_out = total[:, 0] if chosen is not None and chosen.dim() == 1 else total
        if size is not None:
            maps_out = upsample_maps(maps_out, size)
        return HeadOutput(logits, maps_out, None)


class DANet(Method):
    """DANet in the harness: the backbone returns its last L stages (L = the hierarchy's
    levels, 1 without one), the head is a `DANetHead`, the loss is
    ``level_weight * sum_l CE_l + alpha * L_cos``.

    The hierarchy: ``hierarchy=PATH`` (see `read_hierarchy`); ``"auto"`` (default) takes the
    digits benchmark's ``hierarchy.txt`` on ``--dataset digits`` and a single level otherwise;
    ``"none"`` a single level. Training keeps a copy in the run directory
    (``RUN_DIR/hierarchy.txt``), which resuming and ``spn evaluate`` read, so that the run does
    not depend on the file staying where it was (or on the directory it was named from).
    """

    name = "danet"
    defaults: ClassVar[dict[str, Any]] = {
        "hierarchy": "auto",
        "maps_per_class": 8,  # --num_maps
        "alpha": 0.01,  # --cos_alpha
        "level_weight": 0.5,  # the 0.5 of each level's CE in get_loss
        "sample_ratio": 1.5,  # int(num_maps * 3 / 2) maps in the cosine loss
        "per_pair": True,  # |cos| per pair (the statement); False: |sum| per image (the released code)
        "width": 0,  # channels of the levels' 3x3 convs; 0: the model's --num-maps (else its head's input)
        "convs": 2,  # 3x3 convs per level (fc6, fc7)
        "coarse_maps": "top",  # coarse levels' map: their top class (the authors) or "ancestor"
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["maps_per_class"] < 1:
            raise MethodError(f"method 'danet': option maps_per_class must be >= 1, got {o['maps_per_class']}")
        for key in ("alpha", "level_weight", "sample_ratio"):
            if not (math.isfinite(o[key]) and o[key] >= 0):
                raise MethodError(f"method 'danet': option {key} must be a finite number >= 0, got {o[key]!r}")
        for key in ("width", "convs"):
            if o[key] < 0:
                raise MethodError(f"method 'danet': option {key} must be >= 0, got {o[key]}")
        if o["coarse_maps"] not in ("top", "ancestor"):
            raise MethodError(
                f"method 'danet': option coarse_maps must be 'top' or 'ancestor', got {o['coarse_maps']!r}"
            )
        if not o["hierarchy"]:
            raise MethodError("method 'danet': option hierarchy must be 'auto', 'none' or a file path")

    def hierarchy_path(self, config: Any) -> Path | None:
        """The hierarchy file of ``config`` (None: a single level): the run's own copy once
        training has made it, else the file the option names."""
        kept = self.kept_hierarchy(config)
        if kept is not None and kept.is_file():
            return kept
        return self.named_hierarchy(config)

    @staticmethod
    def kept_hierarchy(config: Any) -> Path | None:
        """Where a run keeps the hierarchy it trained with: ``RUN_DIR/hierarchy.txt``."""
        out = getattr(config, "out", None)
        return Path(out) / "hierarchy.txt" if out else None

    def named_hierarchy(self, config: Any) -> Path | None:
        """The hierarchy file the option names (None: a single level)."""
        value = str(self.options["hierarchy"])
        if value == "none":
            return None
        if value == "auto":
            if getattr(config, "dataset", None) == "digits":
                return Path(config.data_root()) / "hierarchy.txt"
            return None
        return Path(value)

    def fit(
        self, config: Any, resume: bool, train: Callable[..., dict[str, Any]], device: torch.device | None = None
    ) -> dict[str, Any]:
        """Train as usual, first copying the hierarchy file into the run directory (checked
        first: a bad file is named as the user gave it). A resumed run reads its copy; a run
        directory that already holds a checkpoint is not touched here (the harness refuses to
        start a second run there)."""
        kept, named = self.kept_hierarchy(config), self.named_hierarchy(config)
        if kept is None:
            return train(config, resume)
        fresh = not resume and not (kept.parent / "checkpoint.pt").exists()
        # copied on a fresh start, and for a run made before runs kept theirs
        source = named if named is not None and (fresh or not kept.is_file()) else None
        if source is not None:
            read_hierarchy(source)  # in every process: a bad file stops them all, none waits below
        if process_rank() == 0:  # one writer under torchrun; the others wait for it
            if fresh and named is None:
                kept.unlink(missing_ok=True)  # a single level: no copy of an earlier attempt may stay
            elif source is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                data = source.read_bytes()
                write_atomic(kept, lambda file: file.write(data))
        barrier()
        return train(config, resume)

    def build(self, network: Network, config: Any) -> Network:
        if getattr(config, "dataset", None) == "voc":
            raise MethodError("method 'danet' needs single-label data (its hierarchy maps one class to its ancestors)")
        num_classes = network.num_classes
        path = self.hierarchy_path(config)
        hierarchy = None if path is None else read_hierarchy(path, num_classes)
        levels = 1 if hierarchy is None else int(hierarchy.shape[0])
        try:
            backbone = FeatureLevels(network.backbone, levels)
        except (TypeError, ValueError) as error:
            raise MethodError(
                f"method 'danet': a {levels}-level hierarchy needs {levels} feature levels: {error}"
            ) from None
        width = int(self.options["width"]) or int(getattr(config, "num_maps", None) or network.head.in_channels)
        head = DANetHead(
            backbone.out_channels, hierarchy, num_classes, self.options["maps_per_class"], width,
            self.options["convs"], self.options["coarse_maps"],
        )  # fmt: skip
        return Network(backbone, head)

    def loss(self, model: nn.Module, images: torch.Tensor, batch: Any, step: Step) -> MethodOutput:
        if "labels" in batch:
            raise MethodError("method 'danet' needs single-label data (batch['label'])")
        labels = batch["label"].to(images.device)
        out = model(images, target=labels)
        losses = [
            F.cross_entropy(logits, target) for logits, target in zip(out.level_logits, out.level_labels, strict=True)
        ]
        sampled = int(self.options["sample_ratio"] * self.options["maps_per_class"])
        cos = divergent_activation_loss(out.level_maps, out.level_labels, sampled, self.options["per_pair"])
        total = self.options["level_weight"] * sum(losses) + self.options["alpha"] * cos
        parts = {"cls": losses[-1].detach(), "cos": cos.detach()}
        for depth, value in enumerate(losses[:-1]):
            parts[f"cls_level{depth}"] = value.detach()
        return MethodOutput(total, out.logits, parts)
