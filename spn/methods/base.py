"""The contract of a WSOL training method: a head, a loss, a sampler, its stages.

A method is how a network is trained and how its localization maps are made. The harness
(``spn train --method NAME``, ``spn evaluate``) talks to every method through `Method`, and
each method's pieces (heads, losses) are plain modules and functions that a user can also
drop into a training loop of their own.

Hooks, each with a default that gives plain classification training (CAM, SPN):

- `Method.build` turns the network of ``--model`` into the method's network, e.g. by
  replacing its head (ACoL's two branches, DANet's divergent maps). The result must stay a
  `spn.models.Network`: ``forward_with_maps`` gives the maps that ``spn evaluate`` scores.
- `Method.loss` turns a batch into a loss. It calls the model **through** ``model(...)``
  (the model may be wrapped in DistributedDataParallel, which only synchronises gradients of
  calls through its forward); a head that needs the labels during training gets them as
  ``model(images, target=labels)``.
- `Method.sampler` may replace the shuffled sampler (I2C trains on same-class pairs).
- `Method.fit` may run several trainings (offline adversarial erasing), and
  `Method.load_model` rebuilds what ``spn evaluate`` scores from the run directory.

State a method keeps across steps (running class centres, ...) lives in buffers of its head,
so it is checkpointed and resumed with the weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.utils.data import Sampler

    from spn.models import Network

__all__ = ["Classification", "Method", "MethodError", "MethodOutput", "Step", "classification_loss", "parse_options"]


class MethodError(ValueError):
    """A method that cannot be built or run as configured (says which option and why)."""


class MethodOutput(NamedTuple):
    """What `Method.loss` returns.

    Attributes:
        loss: the scalar to minimise.
        logits: (B, N) class scores of the batch (for the training accuracy).
        parts: named scalar terms of the loss (detached), logged per epoch.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Step:
    """Where in training a loss is computed: ``epoch`` counts from 0 of ``epochs``."""

    epoch: int
    epochs: int


def process_rank() -> int:
    """This process's rank under torch.distributed (0 without it): the one that writes files."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def process_count() -> int:
    """The number of processes under torch.distributed (1 without it)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def barrier() -> None:
    """Wait for every process under torch.distributed (nothing without it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def classification_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Cross-entropy on ``batch["label"]``, or BCE on the multi-hot ``batch["labels"]`` (VOC)."""
    if "labels" in batch:
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.device, logits.dtype))
    return F.cross_entropy(logits, batch["label"].to(logits.device))


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["delta=0.6", "name=x"]`` -> ``{"delta": 0.6, "name": "x"}`` (values read as JSON, else text)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MethodError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


class Method:
    """Base class of training methods; the defaults train a classifier with cross-entropy.

    Subclasses set ``name`` and ``defaults`` (every option with its default value; the
    options a user passes with ``--method-option KEY=VALUE`` must be among them and are
    converted to the default's type) and override the hooks they need.

    Args:
        **options: overrides of ``defaults``.
    """

    name: ClassVar[str] = "default"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise MethodError(f"method {self.name!r} has no option {unknown[0]!r} (its options: {known})")
        merged = dict(self.defaults)
        for key, value in options.items():
            merged[key] = _convert(self.name, key, value, self.defaults[key])
        self.options = merged

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    # ------------------------------------------------------------------ hooks

    def build(self, network: Network, config: Any) -> Network:
        """The method's network, made from the ``--model`` network (default: unchanged)."""
        return network

    def loss(self, model: torch.nn.Module, images: torch.Tensor, batch: Mapping[str, Any], step: Step) -> MethodOutput:
        """The training loss of one batch (default: classification loss of ``model(images)``)."""
        logits = model(images)
        loss = classification_loss(logits, batch)
        return MethodOutput(loss, logits, {"cls": loss.detach()})

    def sampler(
        self, labels: Sequence[int], *, seed: int, num_replicas: int, rank: int, batch_size: int
    ) -> Sampler[int] | None:
        """A training sampler (``set_epoch`` is called each epoch when it has one); None: the
        harness's shuffled DistributedSampler."""
        return None

    def fit(
        self,
        config: Any,
        resume: bool,
        train: Callable[..., dict[str, Any]],
        device: torch.device | None = None,
    ) -> dict[str, Any]:
        """Run the training of ``config``; ``train(config, resume)`` is one ordinary training
        run (the harness's), on ``device`` (the run's; for work between stages). Multi-stage
        methods call ``train`` once per stage (default: once)."""
        return train(config, resume)

    def load_model(self, config: Any, run_dir: Path, build: Callable[[Any], Network]) -> Network:
        """The trained network ``spn evaluate`` scores; ``build(config)`` is the harness's
        model-from-config-and-checkpoint (default: that)."""
        return build(config)


class Classification(Method):
    """Plain classification training (the default): what CAM and SPN train with."""

    name = "default"


def _convert(method: str, key: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind in (int, float, str):
            converted = kind(value)
            if kind is int and isinstance(value, float) and value != converted:
                raise ValueError(value)
            return converted
        if kind in (tuple, list):
            return kind(value)
    except (TypeError, ValueError):
        raise MethodError(
            f"method {method!r}: option {key} must be a {kind.__name__} (like its default {default!r}), got {value!r}"
        ) from None
    return value
