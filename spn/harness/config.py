"""``RunConfig``: what a run is, recorded in ``RUN_DIR/config.json``, and how to rebuild it.

``spn evaluate`` rebuilds the model and the data pipeline from this file alone (paths can be
overridden when the data moved). Everything that changes the trained weights is here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import spn
from spn.methods import Method, MethodError, get_method
from spn.models import Network

__all__ = ["DATASETS", "MODELS", "ConfigError", "RunConfig", "build_dataset", "build_mask_dataset", "build_model"]

MODELS = ("small_sp", "small_cam", "vgg16_sp", "vgg16_cam", "resnet50_sp", "resnet50_cam")
DATASETS = ("wsol", "voc", "digits")
PRESETS = {"paper": spn.PAPER, "released": spn.RELEASED}


class ConfigError(ValueError):
    """A run configuration that cannot be built (says which field and why)."""


@dataclasses.dataclass
class RunConfig:
    """One training run. Field names are the command line's flags (``--batch-size`` ->
    ``batch_size``); defaults follow wsolevaluation's ``config.py`` where it has one."""

    model: str
    out: str
    dataset: str = "wsol"
    data: str | None = None
    metadata: str | None = None
    mask_root: str | None = None
    erased: str | None = None  # no flag: a folder of erasing masks for the training split (AE's steps)
    method: str = "default"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # --method-option KEY=VALUE
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.01
    lr_classifier_ratio: float | None = None  # None: 10 with pretrained backbone weights, else 1
    lr_decay_every: int = 30
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    workers: int = 0
    bf16: bool = False
    resize: int | None = None  # None: the dataset's default (256 for wsol/voc, native for digits)
    crop: int | None = None
    eval_size: int | None = None
    flip: bool | None = None  # None: True for wsol/voc, False for digits (digits are not mirror-symmetric)
    preset: str = "paper"  # SoftProposal options of *_sp models: spn.PAPER or spn.RELEASED
    widths: tuple[int, ...] = (32, 64, 128, 128)
    output_stride: int = 4
    norm: str = "batch"
    num_maps: int | None = 128
    dropout: float = 0.0
    backbone_weights: str | None = None
    digits_seed: int = 0
    train_split: str | None = None  # None: "trainval" for voc, "train" otherwise
    num_classes: int | None = None  # filled in from the data
    spn_version: str = spn.__version__

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if self.dataset != "digits" and self.data is None:
            raise ConfigError(
                f"--data IMAGE_ROOT is needed for --dataset {self.dataset} (only digits generates its own)"
            )
        self.method_options = dict(self.method_options)
        try:
            self.training_method()  # an unknown method or option fails here, before any work
        except MethodError as error:
            raise ConfigError(f"--method {self.method}: {error}") from None
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        for name in ("epochs", "batch_size", "lr_decay_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        self.widths = tuple(int(width) for width in self.widths)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown fields {unknown} (written by another spn version?)")
        try:
            return cls(**dict(values))
        except TypeError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json: is {run_dir} a run directory written by `spn train`?")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        return cls.from_dict(values, str(path))

    # ------------------------------------------------------------ derived values

    def training_method(self) -> Method:
        """The `spn.methods.Method` of ``--method`` with its ``--method-option`` values."""
        return get_method(self.method, self.method_options)

    @property
    def is_sp(self) -> bool:
        return self.model.endswith("_sp")

    def classifier_ratio(self) -> float:
        if self.lr_classifier_ratio is not None:
            return float(self.lr_classifier_ratio)
        return 10.0 if self.backbone_weights else 1.0

    def training_split(self) -> str:
        if self.train_split is not None:
            return self.train_split
        return "trainval" if self.dataset == "voc" else "train"

    def flips(self) -> bool:
        return (self.dataset != "digits") if self.flip is None else bool(self.flip)

    def data_root(self) -> Path:
        """The image root; for digits (no ``--data``) the benchmark generated inside the run."""
        if self.data is not None:
            return Path(self.data)
        return Path(self.out) / "digits"


def build_model(config: RunConfig, num_classes: int) -> Network:
    """The network of ``config`` with ``num_classes`` outputs (weights as initialised, or the
    backbone's from ``--backbone-weights``; never downloaded): the ``--model`` network as
    ``--method`` builds on it (`spn.methods.Method.build`)."""
    return config.training_method().build(_base_model(config, num_classes), config)


def _base_model(config: RunConfig, num_classes: int) -> Network:
    from spn import models

    if config.model.startswith("small"):
        options: dict[str, Any] = {
            "widths": config.widths,
            "output_stride": config.output_stride,
            "norm": config.norm,
            "dropout": config.dropout,
        }
        if config.backbone_weights:
            raise ConfigError("--backbone-weights is for vgg16_* and resnet50_* models; small_* train from scratch")
        if config.is_sp:
            return models.small_sp(num_classes, config.num_maps, proposal_options=PRESETS[config.preset], **options)
        return models.small_cam(num_classes, config.num_maps, **options)
    weights, dropout, proposal = config.backbone_weights, config.dropout, PRESETS[config.preset]
    if config.model == "vgg16_sp":
        return models.vgg16_sp(num_classes, backbone_state_dict=weights, dropout=dropout, proposal_options=proposal)
    if config.model == "vgg16_cam":
        return models.vgg16_cam(num_classes, backbone_state_dict=weights, dropout=dropout)
    if config.model == "resnet50_sp":
        return models.resnet50_sp(num_classes, backbone_state_dict=weights, dropout=dropout, proposal_options=proposal)
    return models.resnet50_cam(num_classes, backbone_state_dict=weights, dropout=dropout)


def build_dataset(config: RunConfig, split: str, train: bool) -> Any:
    """The dataset of ``split`` with the training or the evaluation transforms of ``config``;
    the training split's images erased by ``config.erased``'s masks when it names a folder
    (`spn.data.erased`; set by adversarial erasing's steps), with training or evaluation
    transforms alike (the steps mine regions on the images they train on)."""
    from spn import data

    erased = None
    if config.erased is not None and split == config.training_split():
        if config.dataset == "voc":
            raise ConfigError("erased training images (adversarial erasing) are not supported for --dataset voc")
        erased = data.ErasedRegions(config.erased)
    if config.dataset == "voc":
        voc = getattr(data, "VOCDataset", None)
        if voc is None:
            raise ConfigError("--dataset voc: the Pascal VOC loader is not in this version of spn yet")
        return voc(config.data_root(), split, **_transform_options(config, train, default=(256, 224)))
    if config.dataset == "digits":
        root = config.data_root()
        metadata = Path(config.metadata) if config.metadata else root / "metadata"
        return data.WSOLDataset(root / "images", metadata, split, **_transform_options(config, train, default=None),
                                mask_root=root / "masks", erased=erased)
    return data.WSOLDataset(
        config.data_root(),
        Path(config.metadata) if config.metadata else config.data_root() / "metadata",
        split,
        mask_root=config.mask_root,
        erased=erased,
        **_transform_options(config, train, default=(256, 224)),
    )


def build_mask_dataset(config: RunConfig, split: str) -> Any | None:
    """The dataset with the masks of ``split`` for PxAP, when the data has one: the digits
    benchmark writes its masks as a second metadata root beside the boxes' one; a wsol
    dataset whose localization lists masks (OpenImages) is its own mask dataset."""
    from spn import data

    if config.dataset != "digits":
        return None
    root = config.data_root()
    return data.WSOLDataset(
        root / "images", root / "metadata_masks", split, mask_root=root / "masks",
        **_transform_options(config, False, default=None),
    )  # fmt: skip


def _transform_options(config: RunConfig, train: bool, default: tuple[int, int] | None) -> dict[str, Any]:
    resize = config.resize if config.resize is not None else (default[0] if default else None)
    crop = config.crop if config.crop is not None else (default[1] if default else None)
    eval_size = config.eval_size if config.eval_size is not None else crop
    if train:
        options: dict[str, Any] = {"train": True, "flip": config.flips()}
        if resize is not None:
            options["resize"] = (resize, resize)
        if crop is not None:
            options["crop"] = (crop, crop)
        return options
    return {"train": False} if eval_size is None else {"train": False, "resize": (eval_size, eval_size)}
