r"""I2C: inter-image communication (Zhang et al., ECCV 2020), ``spn train --method i2c``.

Training batches hold same-class pairs (`PairSampler`: ``batch_size / 2`` classes x 2 images).
In each image, *object seeds* are feature vectors at a few positions where the normalised
ground-truth class map is high (`object_seeds`, `seed_features`). Two consistency terms are
added to the cross-entropy:

- stochastic consistency (`stochastic_consistency`): the L2 distance between the seed
  features of the two images of a pair, seed j with seed j;
- global consistency (`global_consistency`): the L2 distance between a pair's centre (the
  mean of its seed features) and a running centre :math:`c_k` of its class, kept in buffers of
  `I2CHead` and updated after each step (`update_centres`) by
  :math:`c_k \leftarrow (1 - \eta_k) c_k + \eta_k \bar f_k` with
  :math:`\eta_k = \exp(-0.002\, n_k)`, :math:`n_k` the updates class k has had so far.

Loss: :math:`\text{CE} + 0.008\, L_{SCC} + 0.001\, L_{GCC}` (the authors' training script).
Localization maps are those of the wrapped head (CAM or SPN); I2C changes only training.
Defaults and deliberate differences from the authors' code (xiaomengyc/I2C) are listed in
``docs/methods/i2c.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from spn.models.heads import HeadOutput, HeadState, WSOLHead
from spn.models.maps import ClassSpec, class_response_maps

from .base import Method, MethodError, MethodOutput, Step, process_count, process_rank

__all__ = [
    "I2C",
    "I2CHead",
    "I2COutput",
    "PairSampler",
    "global_consistency",
    "normalize_maps",
    "object_seeds",
    "pair_centres",
    "seed_features",
    "stochastic_consistency",
    "update_centres",
]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of a batch to [0, 1]; a constant map becomes all ones.

    A constant map says nothing about where the object is, so every position is equally an
    object position (and `object_seeds` may pick any of them).

    Args:
        maps: (B, h, w) maps.

    Returns:
        (B, h, w) maps in [0, 1], in the maps' floating dtype.

    Example:
        >>> normalize_maps(torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]))
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]],
        <BLANKLINE>
                [[1.0000, 1.0000],
                 [1.0000, 1.0000]]])
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape (B, h, w), got {tuple(maps.shape)}")
    flat = maps.flatten(1) if maps.is_floating_point() else maps.flatten(1).float()
    if flat.shape[1] == 0:
        raise ValueError(f"maps must have at least one position, got shape {tuple(maps.shape)}")
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    normed = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(flat))
    return normed.view(maps.shape)


def object_seeds(
    maps: torch.Tensor,
    num_seeds: int = 3,
    threshold: float = 0.7,
    min_pixels: int = 30,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions of object seeds: a random choice among the high positions of each map.

    The seed region of a map is where its min-max normalised value (`normalize_maps`) is
    above ``threshold``; when that region has fewer than ``min_pixels`` positions, where it
    is above ``threshold`` times the normalised map's maximum (the authors' rule; their
    maps being normalised, it rarely changes anything). ``num_seeds`` positions are drawn from
    the region without replacement; a region smaller than that is used whole, cyclically in a
    random order (so seeds repeat). The region is never empty: the maximum is 1 > threshold.

    Args:
        maps: (B, h, w) class maps (e.g. the ground-truth class's CAM); not differentiated.
        num_seeds: seeds per map (the authors': 3).
        threshold: in [0, 1) (the authors': 0.7).
        min_pixels: the region size below which the relative threshold applies (the authors': 30).
        generator: the random generator (default: torch's global one).
        keys: (B, h * w) random keys in [0, 1) that order each region (default: drawn from
            ``generator``; given, e.g. this process's rows of a global batch's keys).

    Returns:
        (B, num_seeds) int64 flat indices into ``h * w`` (row-major).

    Example:
        >>> maps = torch.tensor([[[0.0, 0.1], [0.9, 1.0]]])
        >>> sorted(object_seeds(maps, num_seeds=2)[0].tolist())
        [2, 3]
    """
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"num_seeds must be an int >= 1, got {num_seeds!r}")
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
        raise ValueError(f"min_pixels must be an int >= 0, got {min_pixels!r}")
    normed = normalize_maps(maps.detach()).flatten(1)
    above = normed > threshold
    relative = threshold * normed.amax(dim=1)
    absolute = torch.full_like(relative, float(threshold))
    cut = torch.where(above.sum(dim=1) >= min_pixels, absolute, relative)
    region = normed > cut[:, None]
    if keys is None:
        keys = torch.rand(normed.shape, generator=generator, device=normed.device)
    elif keys.shape != normed.shape:
        raise ValueError(f"keys must have shape {tuple(normed.shape)} (B, h * w), got {tuple(keys.shape)}")
    keys = torch.where(region, keys.to(normed.device), torch.full_like(normed, -1.0))
    order = keys.argsort(dim=1, descending=True)  # the region first, in a random order
    size = region.sum(dim=1, keepdim=True).clamp_min(1)
    return order.gather(1, torch.arange(num_seeds, device=order.device)[None] % size)


def seed_features(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The feature vectors at seed positions.

    Args:
        features: (B, C, h, w).
        indices: (B, n) flat indices into ``h * w`` (from `object_seeds`).

    Returns:
        (B, n, C): ``out[b, j] = features[b, :, indices[b, j] // w, indices[b, j] % w]``.

    Example:
        >>> feats = torch.arange(8.0).view(1, 2, 2, 2)
        >>> seed_features(feats, torch.tensor([[3, 0]]))
        tensor([[[3., 7.],
                 [0., 4.]]])
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
    batch, channels = features.shape[:2]
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise ValueError(f"indices must have shape ({batch}, n), got {tuple(indices.shape)}")
    flat = features.flatten(2)
    gathered = flat.gather(2, indices[:, None, :].expand(batch, channels, indices.shape[1]))
    return gathered.transpose(1, 2)


def _check_pairs(seeds: torch.Tensor) -> None:
    if seeds.dim() != 3:
        raise ValueError(f"seed features must have shape (B, n, C), got {tuple(seeds.shape)}")
    if seeds.shape[0] % 2 or seeds.shape[0] == 0:
        raise ValueError(f"the batch must hold same-class pairs (2i, 2i+1): an even B > 0, got B={seeds.shape[0]}")


def stochastic_consistency(seeds: torch.Tensor) -> torch.Tensor:
    r"""Stochastic consistency: mean L2 distance between paired images' seed features.

    :math:`L_{SCC} = \frac{1}{P n} \sum_{i < P} \sum_{j < n} \| s_{2i, j} - s_{2i+1, j} \|_2`
    for a batch of P pairs (images 2i and 2i + 1 share a class) with n seeds each.

    Args:
        seeds: (B, n, C) seed features (`seed_features`), B even.

    Returns:
        A scalar.

    Example:
        >>> seeds = torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]]])
        >>> stochastic_consistency(seeds)
        tensor(5.)
    """
    _check_pairs(seeds)
    return torch.linalg.vector_norm(seeds[0::2] - seeds[1::2], dim=-1).mean()


def pair_centres(seeds: torch.Tensor) -> torch.Tensor:
    """The centre of each pair: the mean of its two images' seed features, (B/2, C).

    Example:
        >>> pair_centres(torch.tensor([[[0.0], [2.0]], [[4.0], [6.0]]]))
        tensor([[3.]])
    """
    _check_pairs(seeds)
    pairs, seeds_per_image, channels = seeds.shape[0] // 2, seeds.shape[1], seeds.shape[2]
    return seeds.reshape(pairs, 2 * seeds_per_image, channels).mean(dim=1)


def global_consistency(
    centres_of_pairs: torch.Tensor,
    centres: torch.Tensor,
    counts: torch.Tensor,
    labels: torch.Tensor,
    known_pairs: torch.Tensor | float | None = None,
) -> torch.Tensor:
    r"""Global consistency: mean L2 distance between each pair's centre and its class's running centre.

    :math:`L_{GCC} = \frac{1}{|V|} \sum_{i \in V} \| \bar f_i - c_{k_i} \|_2`, over the pairs
    V whose class has a running centre already (``counts[k] > 0``); 0 when there is none.
    The running centres are constants here (no gradient).

    Args:
        centres_of_pairs: (P, C) pair centres (`pair_centres`).
        centres: (N, C) running class centres.
        counts: (N,) how many updates each class centre has had.
        labels: (P,) the class of each pair.
        known_pairs: what to divide the sum by instead of ``|V|`` of this batch (`I2CHead`
            under torch.distributed: the global batch's ``|V|`` over the processes' count, so
            that DDP's average of the processes' gradients is the global mean's).

    Returns:
        A scalar (differentiable in ``centres_of_pairs``).

    Example:
        >>> centres, counts = torch.tensor([[0.0, 0.0], [9.0, 9.0]]), torch.tensor([1, 0])
        >>> global_consistency(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), centres, counts, torch.tensor([0, 1]))
        tensor(5.)
    """
    if centres_of_pairs.dim() != 2 or labels.shape != centres_of_pairs.shape[:1]:
        raise ValueError(
            "expected pair centres (P, C) and labels (P,), "
            f"got {tuple(centres_of_pairs.shape)} and {tuple(labels.shape)}"
        )
    known = counts[labels] > 0
    distances = torch.linalg.vector_norm(centres_of_pairs - centres[labels].detach().to(centres_of_pairs.dtype), dim=-1)
    kept = torch.where(known, distances, torch.zeros_like(distances))
    if known_pairs is None:
        return kept.sum() / known.sum().clamp_min(1)
    return kept.sum() / torch.as_tensor(known_pairs, dtype=kept.dtype, device=kept.device).clamp_min(1e-30)


@torch.no_grad()
def update_centres(
    centres: torch.Tensor,
    counts: torch.Tensor,
    centres_of_pairs: torch.Tensor,
    labels: torch.Tensor,
    rate: float = 0.002,
    sync: bool = True,
) -> None:
    r"""Update running class centres in place: :math:`c_k \leftarrow (1 - \eta_k) c_k + \eta_k \bar f_k`.

    :math:`\bar f_k` is the mean of the centres of the batch's pairs of class k and
    :math:`\eta_k = \exp(-\text{rate}\cdot n_k)` with :math:`n_k` = ``counts[k]`` before the
    update (so a class's first update sets its centre); ``counts[k]`` then grows by 1. Each
    class present in the batch is updated once. Under ``torch.distributed`` (when ``sync``)
    the sums are all-reduced first, so every process updates with the whole global batch.

    Args:
        centres: (N, C) running centres (modified).
        counts: (N,) integer update counts (modified).
        centres_of_pairs: (P, C) pair centres (`pair_centres`); not differentiated.
        labels: (P,) the class of each pair.
        rate: the decay rate of eta (the authors': 0.002).
        sync: all-reduce over the processes when torch.distributed is initialised.

    Example:
        >>> centres, counts = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
        >>> update_centres(centres, counts, torch.tensor([[4.0], [2.0]]), torch.tensor([1, 1]))
        >>> centres.flatten().tolist(), counts.tolist()
        ([0.0, 3.0], [0, 1])
    """
    num_classes = centres.shape[0]
    sums = torch.zeros_like(centres).index_add_(0, labels, centres_of_pairs.detach().to(centres.dtype))
    seen = torch.zeros(num_classes, dtype=centres.dtype, device=centres.device)
    seen.index_add_(0, labels, torch.ones_like(labels, dtype=centres.dtype))
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(seen)
    present = seen > 0
    eta = torch.exp(-float(rate) * counts.to(centres.dtype))[:, None]
    means = sums / seen.clamp_min(1)[:, None]
    centres.copy_(torch.where(present[:, None], (1 - eta) * centres + eta * means, centres))
    counts.add_(present.to(counts.dtype))


class I2COutput(NamedTuple):
    """What `I2CHead` returns in training (given the labels).

    Attributes:
        logits: (B, N) class scores.
        stochastic: the stochastic consistency term (`stochastic_consistency`).
        global_: the global consistency term (`global_consistency`).
    """

    logits: torch.Tensor
    stochastic: torch.Tensor
    global_: torch.Tensor


class I2CHead(WSOLHead):
    """A WSOL head (CAM, SPN, ...) with I2C's object seeds and running class centres.

    Given the labels of a batch of same-class pairs, ``head(features, labels)`` returns the
    wrapped head's logits and the two consistency terms, with seeds taken from the
    ground-truth class's map of the wrapped head and seed features from the head's input
    ``features`` (the backbone's, as the authors do); in training mode it then updates the
    running centres (buffers ``centres`` (N, C) and ``counts`` (N,), checkpointed). Without
    labels, and for maps (``forward_with_maps``), it is the wrapped head unchanged.

    Args:
        inner: the head to wrap.
        num_seeds, seed_threshold, min_seed_pixels: see `object_seeds`.
        centre_rate: see `update_centres`.

    Shape:
        - features: (B, C, h, w)
        - labels: (B,), with ``labels[2i] == labels[2i + 1]``
        - Output: (B, N) logits, or `I2COutput` given labels

    Example:
        >>> from spn.models import CAMHead
        >>> head = I2CHead(CAMHead(8, num_classes=3))
        >>> out = head(torch.rand(4, 8, 5, 5), torch.tensor([2, 2, 0, 0]))
        >>> out.logits.shape, out.stochastic.shape, head.counts.tolist()
        (torch.Size([4, 3]), torch.Size([]), [1, 0, 1])
    """

    centres: torch.Tensor
    counts: torch.Tensor

    def __init__(
        self,
        inner: WSOLHead,
        *,
        num_seeds: int = 3,
        seed_threshold: float = 0.7,
        min_seed_pixels: int = 30,
        centre_rate: float = 0.002,
    ) -> None:
        super().__init__()
        if not isinstance(inner, WSOLHead):
            raise TypeError(f"inner must be a WSOLHead, got {type(inner).__name__}")
        object_seeds(torch.zeros(1, 1, 1), num_seeds, seed_threshold, min_seed_pixels)  # validates the options
        if not float(centre_rate) >= 0:
            raise ValueError(f"centre_rate must be >= 0, got {centre_rate!r}")
        self.inner = inner
        self.in_channels = inner.in_channels
        self.num_classes = inner.num_classes
        self.num_seeds, self.seed_threshold, self.min_seed_pixels = num_seeds, float(seed_threshold), min_seed_pixels
        self.centre_rate = float(centre_rate)
        self.register_buffer("centres", torch.zeros(self.num_classes, self.in_channels))
        self.register_buffer("counts", torch.zeros(self.num_classes, dtype=torch.long))

    def compute(self, features: torch.Tensor) -> HeadState:
        return self.inner.compute(features)

    def map_weight(self) -> torch.Tensor:
        return self.inner.map_weight()

    def forward_with_maps(
        self, features: torch.Tensor, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        return self.inner.forward_with_maps(features, classes=classes, size=size)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        if target is None:
            return self.inner(features)
        labels = _pair_labels(target, features.shape[0], self.num_classes)
        state = self.inner.compute(features)
        with torch.no_grad():
            maps = class_response_maps(state.activations.detach(), self.inner.map_weight().detach(), labels)
            if maps.shape[-2:] != features.shape[-2:]:
                size = features.shape[-2:]
                maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            keys = _shard_keys(maps.shape[0], maps[0].numel(), maps.device)
            indices = object_seeds(maps, self.num_seeds, self.seed_threshold, self.min_seed_pixels, keys=keys)
        seeds = seed_features(features, indices)
        centres_of_pairs = pair_centres(seeds)
        stochastic = stochastic_consistency(seeds)
        global_ = global_consistency(
            centres_of_pairs, self.centres, self.counts, labels[0::2], _known_pairs(self.counts, labels[0::2])
        )
        if self.training:
            update_centres(self.centres, self.counts, centres_of_pairs, labels[0::2], self.centre_rate)
        return I2COutput(state.logits, stochastic, global_)


def _known_pairs(counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Under torch.distributed, the global batch's pairs whose class has a centre over the
    processes' count (the divisor of `global_consistency` that makes DDP's averaged gradient the
    global mean's: processes hold different numbers of such pairs); None in one process."""
    if process_count() == 1:
        return None
    known = (counts[labels] > 0).sum().to(torch.float64)
    torch.distributed.all_reduce(known)
    return (known / process_count()).clamp_min(1.0 / process_count())


def _shard_keys(batch: int, positions: int, device: torch.device) -> torch.Tensor:
    """The object seeds' random keys (batch, positions) of this process's share of the global
    batch: every process draws the keys of the whole global batch (the processes' global random
    streams stay in step: the harness seeds them alike) and keeps the rows of its own images, so
    that the processes together draw what one process with the global batch would."""
    count, rank = process_count(), process_rank()
    keys = torch.rand((count * batch, positions), device=device)
    return keys[rank * batch : (rank + 1) * batch]


def _pair_labels(target: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"I2C's labels must be an integer tensor (B,), got {getattr(target, 'dtype', type(target))}")
    if target.shape != (batch,):
        raise ValueError(f"I2C's labels must have shape ({batch},), got {tuple(target.shape)}")
    if batch == 0 or batch % 2:
        raise ValueError(f"I2C trains on same-class pairs: the batch size must be even and > 0, got {batch}")
    labels = target.long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"I2C's labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not bool((labels[0::2] == labels[1::2]).all()):
        raise ValueError(
            "I2C trains on same-class pairs: images 2i and 2i+1 of a batch must share their label "
            f"(got {labels.tolist()}); use I2C.sampler / PairSampler"
        )
    return labels


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PairSampler(Sampler[int]):
    """Indices in batches of same-class pairs, sharded over processes.

    Each epoch (``set_epoch``), the images of every class are shuffled and cut into pairs (an
    odd one out waits for another epoch; a class of one image is never drawn); each global batch
    of ``batch_size * num_replicas`` indices is pairs of distinct classes (when there are that
    many classes with pairs left; otherwise classes repeat as evenly as possible), taken from
    the classes with the most pairs left, ties broken at random. Process r takes the r-th
    ``batch_size`` indices of each global batch (whole pairs), so the processes of a step
    together train on the batch that one process with ``batch_size * num_replicas`` would, and
    no image appears twice in an epoch. The order depends only on ``(seed, epoch)``.

    Args:
        labels: the class of each dataset index.
        batch_size: indices per batch of one process (even).
        seed: the shuffling seed.
        num_replicas, rank: processes and this one's rank.

    Example:
        >>> sampler = PairSampler([0, 1, 0, 1, 2, 2], batch_size=4, seed=0)
        >>> len(sampler), len(set(sampler))
        (4, 4)
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be an even int >= 2 (pairs of images), got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
        self.labels = [int(label) for label in labels]
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            by_class.setdefault(label, []).append(index)
        self._classes = sorted(by_class)
        self._members = [by_class[label] for label in self._classes]
        pairs = sum(len(members) // 2 for members in self._members)
        if pairs == 0:
            raise ValueError("no class has two images: same-class pairs cannot be drawn")
        self.batch_size, self.seed = batch_size, int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batches_per_replica = pairs // (batch_size // 2 * self.num_replicas)  # global batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_replica * self.batch_size

    def batches(self) -> list[list[int]]:
        """Every global batch of this epoch, in order (process r's share of each: see __iter__)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        queues: list[list[tuple[int, int]]] = []
        for members in self._members:
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            queues.append([(shuffled[2 * i], shuffled[2 * i + 1]) for i in range(len(members) // 2)])
        left = torch.tensor([len(queue) for queue in queues], dtype=torch.float64)
        size = self.batch_size * self.num_replicas
        per_batch = size // 2
        batches: list[list[int]] = []
        for _ in range(self.batches_per_replica):
            batch: list[int] = []
            while len(batch) < size:
                available = int((left > 0).sum())
                if available == 0:  # cannot happen: batches_per_replica counts the pairs
                    raise RuntimeError("PairSampler ran out of pairs")
                take = min(per_batch - len(batch) // 2, available)
                priority = left + torch.rand(len(queues), generator=generator, dtype=torch.float64)
                priority[left == 0] = -1.0
                for class_index in priority.topk(take).indices.tolist():
                    batch.extend(queues[class_index][int(len(queues[class_index]) - left[class_index])])
                    left[class_index] -= 1
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[int]:
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return iter([index for batch in self.batches() for index in batch[share]])


class I2C(Method):
    """I2C training (`I2CHead`, `PairSampler`): CE + scc_weight * SCC + gcc_weight * GCC.

    Options (defaults: the authors' ``scripts/train.sh`` and model code): ``scc_weight``
    (0.008), ``gcc_weight`` (0.001), ``num_seeds`` (3), ``seed_threshold`` (0.7),
    ``min_seed_pixels`` (30), ``centre_rate`` (0.002).

    Example:
        >>> I2C(scc_weight="0.01").options["scc_weight"]
        0.01
    """

    name = "i2c"
    defaults: ClassVar[dict[str, Any]] = {
        "scc_weight": 0.008,
        "gcc_weight": 0.001,
        "num_seeds": 3,
        "seed_threshold": 0.7,
        "min_seed_pixels": 30,
        "centre_rate": 0.002,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("scc_weight", "gcc_weight", "centre_rate"):
            if not o[key] >= 0:
                raise MethodError(f"method 'i2c': option {key} must be >= 0, got {o[key]!r}")
        if o["num_seeds"] < 1:
            raise MethodError(f"method 'i2c': option num_seeds must be >= 1, got {o['num_seeds']!r}")
        if not 0 <= o["seed_threshold"] < 1:
            raise MethodError(f"method 'i2c': option seed_threshold must be in [0, 1), got {o['seed_threshold']!r}")
        if o["min_seed_pixels"] < 0:
            raise MethodError(f"method 'i2c': option min_seed_pixels must be >= 0, got {o['min_seed_pixels']!r}")

    def build(self, network: Any, config: Any) -> Any:
        from spn.models import Network

        if getattr(config, "dataset", None) == "voc":
            raise MethodError("method 'i2c' needs single-label data (same-class pairs); --dataset voc is multi-label")
        o = self.options
        head = I2CHead(
            network.head,
            num_seeds=o["num_seeds"],
            seed_threshold=o["seed_threshold"],
            min_seed_pixels=o["min_seed_pixels"],
            centre_rate=o["centre_rate"],
        )
        return Network(network.backbone, head)

    def loss(self, model: torch.nn.Module, images: torch.Tensor, batch: Mapping[str, Any], step: Step) -> MethodOutput:
        if "labels" in batch:
            raise MethodError("method 'i2c' needs single-label data (same-class pairs); this dataset is multi-label")
        labels = batch["label"].to(images.device)
        out = model(images, target=labels)
        cls = F.cross_entropy(out.logits, labels)
        loss = cls + self.options["scc_weight"] * out.stochastic + self.options["gcc_weight"] * out.global_
        parts = {"cls": cls.detach(), "scc": out.stochastic.detach(), "gcc": out.global_.detach()}
        return MethodOutput(loss, out.logits, parts)

    def sampler(
        self, labels: Sequence[int], *, seed: int, num_replicas: int, rank: int, batch_size: int
    ) -> Sampler[int] | None:
        if batch_size % 2:
            raise MethodError(f"method 'i2c' trains on same-class pairs: the per-process batch size must be even, "
                              f"got {batch_size}")  # fmt: skip
        return PairSampler(labels, batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
