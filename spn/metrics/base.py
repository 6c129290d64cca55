"""The contract every metric follows: ``update`` / ``compute`` / ``reset`` / ``merge`` / ``sync``.

* ``update(predictions..., ground truth...)``: predictions first (maps, points or boxes,
  then ``pred_labels``), ground truth after (``gt_boxes`` or ``gt_masks``, then ``labels``:
  one class per image or query, then ``box_labels``: one class per ground-truth box). Every
  argument is checked before anything is counted, so an update that raises changes nothing.
* ``compute()`` returns a :class:`MetricResult`: the headline is always ``result.value``.
  It raises ``ValueError`` when nothing was evaluated: an empty data loader cannot pass for
  a score.
* Each metric has a one-shot function over one batch that returns what ``compute()`` does.
* ``merge(other)`` adds another instance's counts (same metric, same options) to this one;
  ``sync()`` does it across the processes of ``torch.distributed`` (every rank ends with
  the total). Give each sample to exactly one process: a sampler that pads the last
  batch by repeating samples (``DistributedSampler``'s default) would count them twice.
* ``state_dict()`` / ``load_state_dict()``: the counts as plain Python and NumPy values.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

__all__ = ["Metric", "MetricResult", "evaluate"]

M = TypeVar("M", bound="Metric")


@dataclass(frozen=True)
class MetricResult:
    """What every metric's ``compute()`` and one-shot function return.

    Attributes:
        name: the metric's name, e.g. ``"max_box_acc_v2"``, ``"pointing_game"``, ``"pxap"``.
        value: the headline number, a fraction in ``[0, 1]`` (papers print percentages).
        count: how many images (or queries) were evaluated.
        per_class: ``{class: value}`` where the field reports per-class values, else empty.
        details: everything else the metric reports (curves, per-IoU values, thresholds...).

    Example:
        >>> result = MetricResult("corloc", 0.5, 4, {0: 1.0, 1: 0.0})
        >>> float(result), result.to_dict()["per_class"]
        (0.5, {'0': 1.0, '1': 0.0})
    """

    name: str
    value: float
    count: int
    per_class: Mapping[int, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (keys as strings, NumPy values as Python numbers and lists)."""
        return {
            "name": self.name,
            "value": float(self.value),
            "count": int(self.count),
            "per_class": {str(key): float(value) for key, value in self.per_class.items()},
            "details": _jsonable(dict(self.details)),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Metric(ABC):
    """Base class of the streaming metrics (see the module docstring for the contract).

    A subclass defines ``_config()`` (the options that must match to merge), ``reset()``,
    ``update(...)``, ``compute()``, ``_state()`` (its counts) and ``_add_state(state)``.
    """

    name: str = "metric"

    @abstractmethod
    def reset(self) -> None:
        """Forget everything seen so far."""

    @abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one batch (predictions first, then ground truth)."""

    @abstractmethod
    def compute(self) -> MetricResult:
        """The result over everything added since the last ``reset``."""

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """The options that define the metric; two instances merge only when these are equal."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The counts, as plain values (picklable, so that ``sync`` can gather them)."""

    @abstractmethod
    def _add_state(self, state: Mapping[str, Any]) -> None:
        """Add counts of the form ``_state()`` returns to this instance's."""

    def state_dict(self) -> dict[str, Any]:
        """``{"metric", "config", "state"}``: everything needed to rebuild or merge the counts."""
        return {"metric": type(self).__name__, "config": self._config(), "state": copy.deepcopy(self._state())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the counts by those of ``state_dict`` (from an instance with the same options)."""
        self._check_compatible(state_dict)
        self.reset()
        self._add_state(state_dict["state"])

    def merge(self: M, other: M) -> M:
        """Add ``other``'s counts to this metric's (``other`` is unchanged); returns ``self``.

        Raises:
            ValueError: ``other`` is another metric or has other options.
        """
        if not isinstance(other, Metric):
            raise TypeError(f"can only merge another metric, got {type(other).__name__}")
        self._add_state(self._check_compatible(other.state_dict())["state"])
        return self

    def sync(self, group: Any = None) -> None:
        """Merge the counts of every process of ``torch.distributed`` (in rank order), so each
        rank can ``compute()`` the total. Without an initialised process group it does nothing.

        Every rank must call it (it is a collective). The counts travel with
        ``all_gather_object``, so any backend works (gloo on CPU, NCCL on GPUs).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self.state_dict(), group=group)
        for state_dict in gathered:
            self._check_compatible(state_dict)
        self.reset()
        for state_dict in gathered:
            self._add_state(state_dict["state"])

    def _check_compatible(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        if state_dict.get("metric") != type(self).__name__:
            raise ValueError(f"cannot merge a {state_dict.get('metric')} into a {type(self).__name__}")
        if state_dict.get("config") != self._config():
            raise ValueError(
                f"cannot merge {type(self).__name__} instances with different options: "
                f"{state_dict.get('config')} vs {self._config()}"
            )
        return state_dict

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({options})"


def check_evaluated(count: int, what: str) -> None:
    """Raise ``ValueError`` when a metric is computed with nothing evaluated."""
    if count == 0:
        raise ValueError(
            f"no images were evaluated ({what}): there is no score to compute; "
            "check that the data loader or list of batches is not empty"
        )


class ClassTally:
    """Correct / total counts per class; the mean over classes of their ratios."""

    def __init__(self) -> None:
        self.correct: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def add(self, classes: np.ndarray, is_correct: np.ndarray) -> None:
        for cls, ok in zip(classes.tolist(), np.asarray(is_correct, dtype=bool).tolist(), strict=True):
            self.total[cls] = self.total.get(cls, 0) + 1
            self.correct[cls] = self.correct.get(cls, 0) + int(ok)

    def add_counts(self, correct: Mapping[int, int], total: Mapping[int, int]) -> None:
        for cls, count in total.items():
            self.total[int(cls)] = self.total.get(int(cls), 0) + int(count)
            self.correct[int(cls)] = self.correct.get(int(cls), 0) + int(correct.get(cls, 0))

    def counts(self) -> dict[str, dict[int, int]]:
        return {"correct": dict(self.correct), "total": dict(self.total)}

    def per_class(self, num_classes: int | None = None) -> dict[int, float]:
        """``correct / total`` per class: the classes seen, or with ``num_classes`` every class
        ``0 .. num_classes - 1``, a class without samples counting 0 (TorchRay's rule)."""
        classes = sorted(self.total) if num_classes is None else range(num_classes)
        return {cls: self.correct.get(cls, 0) / max(self.total.get(cls, 0), 1) for cls in classes}

    @property
    def samples(self) -> int:
        return int(sum(self.total.values()))

    @property
    def hits(self) -> int:
        return int(sum(self.correct.values()))


def evaluate(metric: Metric, batches: Iterable[Sequence[Any] | Mapping[str, Any]]) -> MetricResult:
    """Feed every batch to ``metric.update`` and return ``metric.compute()``.

    A batch is a tuple of positional arguments or a dict of keyword arguments of ``update``.

    Example:
        >>> from spn.metrics import PointingGame
        >>> batches = [([[0.0, 0.0]], [[[0, 0, 1, 1]]], [1]), ([[50.0, 50.0]], [[[0, 0, 1, 1]]], [1])]
        >>> evaluate(PointingGame(num_classes=2), batches).per_class
        {0: 0.0, 1: 0.5}
    """
    for batch in batches:
        if isinstance(batch, Mapping):
            metric.update(**batch)
        else:
            metric.update(*batch)
    return metric.compute()
