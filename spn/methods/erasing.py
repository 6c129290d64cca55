r"""Offline adversarial erasing, AE (Wei et al., "Object Region Mining with Adversarial Erasing:
A Simple Classification to Semantic Segmentation Approach", CVPR 2017).

Step 1 trains a classifier on the training images. Step k + 1 trains a new classifier on the
images of step k with the region that classifier k mined erased: the CAM of each image's label
(on the un-augmented image at the training resolution, mapped back to the image), whose top
``fraction`` (20%) pixels are set to the training set's mean pixel. So the images of step k + 1
are the training images with the regions of steps 1..k erased. The localization map merges
the first ``merge`` (3) steps' maps: each step's CAM of the class on the (unerased) test image,
min-max normalised, element-wise maximum

.. math:: M_c = \max_{k \le 3} \frac{R^k_c - \min R^k_c}{\max R^k_c - \min R^k_c}.

(The paper merges the binary mined regions of steps 1..3 into a segmentation seed; the fourth
step mined background, so it stops at three. The maximum of normalised maps is the usual WSOL
reading of that union, and keeps a score map for the threshold sweep of the evaluation.)

The pieces: `top_fraction_mask`, `erase_pixels`, `mean_pixel`, `merge_maps`, `MergedCAMNetwork`,
`mine_regions` and `AdversarialErasing`, the ``spn train --method ae`` method whose `fit` runs
the steps into ``RUN_DIR/step{k}``. See ``docs/methods/ae.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from spn.data.erased import ErasedRegions, erase_pixels, mask_file, read_mask, write_mask
from spn.models import Network
from spn.models.heads import HeadOutput, HeadState, WSOLHead
from spn.models.maps import ClassSpec, resolve_classes, upsample_maps

from .acol import normalize_maps
from .base import Method, MethodError, barrier, process_rank

__all__ = [
    "AdversarialErasing",
    "MergedCAMNetwork",
    "erase_pixels",
    "mean_pixel",
    "merge_maps",
    "mine_regions",
    "top_fraction_mask",
]


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """The pixels of each map among its top ``fraction`` values.

    Each (h, w) map marks its ``floor(fraction * h * w + 0.5)`` largest values; at the
    boundary, equal values are taken in raster order (a stable sort), so the count is exact
    and the result deterministic. A constant map has nothing discriminative: it marks nothing.

    Args:
        maps: (..., h, w) real maps.
        fraction: in [0, 1].

    Returns:
        A bool tensor of the maps' shape.

    Shape:
        - Input: (..., h, w)
        - Output: (..., h, w)

    Example:
        >>> top_fraction_mask(torch.tensor([[1.0, 5.0], [3.0, 2.0]]), 0.5)
        tensor([[False,  True],
                [ True, False]])
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim < 2:
        raise ValueError(f"maps must be a tensor (..., h, w), got {getattr(maps, 'shape', type(maps))}")
    if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    flat = maps.detach().flatten(-2).double()
    count = math.floor(float(fraction) * flat.shape[-1] + 0.5)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, order[..., :count], True)
    if flat.shape[-1]:
        constant = flat.amax(dim=-1, keepdim=True) == flat.amin(dim=-1, keepdim=True)
        mask &= ~constant
    return mask.view(maps.shape)


def mean_pixel(paths: Sequence[str | os.PathLike[str]]) -> tuple[float, float, float]:
    """The mean RGB value (0-255) over every pixel of the images at ``paths`` (each pixel
    counts once, so large images weigh more), read as the loaders read them (Pillow, RGB)."""
    if not paths:
        raise ValueError("mean_pixel needs at least one image")
    total = np.zeros(3, dtype=np.float64)
    pixels = 0
    for path in paths:
        array = _read_rgb(Path(path))
        total += array.reshape(-1, 3).sum(axis=0, dtype=np.float64)
        pixels += array.shape[0] * array.shape[1]
    red, green, blue = (total / pixels).tolist()
    return red, green, blue


def merge_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise maximum of the min-max normalised maps (`spn.methods.acol.normalize_maps`).

    Example:
        >>> merge_maps([torch.tensor([[[0.0, 2.0, 1.0]]]), torch.tensor([[[4.0, 0.0, 0.0]]])])
        tensor([[[1.0000, 1.0000, 0.5000]]])
    """
    if not maps:
        raise ValueError("merge_maps needs at least one map tensor")
    merged = normalize_maps(maps[0])
    for other in maps[1:]:
        if other.shape != maps[0].shape:
            raise ValueError(f"maps to merge must share a shape, got {tuple(maps[0].shape)} and {tuple(other.shape)}")
        merged = torch.maximum(merged, normalize_maps(other))
    return merged


class _MergeHead(WSOLHead):
    """Runs every network on the images; logits of the first, `merge_maps` of their maps."""

    def __init__(self, networks: Sequence[Network]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("MergedCAMNetwork needs at least one network")
        self.networks = nn.ModuleList(networks)
        self.in_channels = 3
        self.num_classes = networks[0].num_classes
        if any(network.num_classes != self.num_classes for network in networks):
            raise ValueError("the merged networks must have the same number of classes")

    def compute(self, features: torch.Tensor) -> HeadState:
        logits, maps, _ = self.forward_with_maps(features, classes="all", size=None)
        return HeadState(logits, maps, None)

    def map_weight(self) -> torch.Tensor:
        return torch.eye(self.num_classes)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        return self.networks[0](features)

    def forward_with_maps(
        self, features: torch.Tensor, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        networks = cast("list[Network]", list(self.networks))
        first = networks[0].forward_with_maps(features, classes=classes, size=size)
        chosen = resolve_classes(first.logits, classes)
        same: ClassSpec = "all" if chosen is None else chosen
        maps = [first.maps] + [net.forward_with_maps(features, classes=same, size=size).maps for net in networks[1:]]
        return HeadOutput(first.logits, merge_maps(maps), None)


class MergedCAMNetwork(Network):
    """A `spn.models.Network` over the classifiers of AE's steps: the first one's logits, and
    `merge_maps` of every network's maps of the same classes (chosen from the first one's
    logits for ``"predicted"`` or a selector).

    Args:
        networks: the steps' networks, first step first.

    Example:
        >>> from spn.models import small_cam
        >>> net = MergedCAMNetwork([small_cam(3, widths=(8, 8)), small_cam(3, widths=(8, 8))]).eval()
        >>> logits, maps, _ = net.forward_with_maps(torch.rand(2, 3, 32, 32), classes=torch.tensor([0, 2]))
        >>> logits.shape, maps.shape, bool(maps.max() <= 1)
        (torch.Size([2, 3]), torch.Size([2, 32, 32]), True)
    """

    def __init__(self, networks: Sequence[Network]) -> None:
        super().__init__(nn.Identity(), _MergeHead(networks))

    @property
    def networks(self) -> nn.ModuleList:
        head = self.head
        assert isinstance(head, _MergeHead)
        return head.networks


@torch.no_grad()
def mine_regions(
    network: Network, dataset: Any, fraction: float, device: torch.device | str = "cpu", batch_size: int = 32
) -> Iterator[tuple[int, np.ndarray]]:
    """For each item of ``dataset`` (evaluation transforms: the un-augmented image at the
    training resolution), the region ``network`` mines: the CAM of the item's label, resized
    bilinearly to the original image size ``item["size"]``, its `top_fraction_mask`.

    Yields:
        ``(index, mask)`` with ``mask`` a bool (H, W) array, in the dataset's order.
    """
    from spn.data import collate

    network = network.eval().to(device)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        images = batch["image"].to(device)
        maps = network.forward_with_maps(images, classes=batch["label"].to(device), size=None).maps.float()
        for offset, size in enumerate(batch["size"]):
            full = upsample_maps(maps[offset : offset + 1], (int(size[0]), int(size[1])))[0]
            yield start + offset, top_fraction_mask(full.cpu(), fraction).numpy()


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class AdversarialErasing(Method):
    """``spn train --method ae``: ``steps`` classifiers, each trained on the images its
    predecessors' regions were erased from; evaluated with `MergedCAMNetwork`.

    Options (``--method-option KEY=VALUE``):
        steps: how many classifiers to train (3; the paper trained 4 and kept 3).
        fraction: the share of each image's pixels, those of the top CAM values, that a step
            erases (0.2, the paper's "top 20%").
        merge: how many of the first steps' maps the localization map merges (3, the paper's).

    Run directory: ``RUN_DIR/step{k}`` is step k's ordinary run (config, metrics, checkpoint);
    ``RUN_DIR/erased/step{k}`` what step k >= 2 erases from the training images
    (`spn.data.erased`: a 1-bit PNG mask per image, the union of the regions steps 1..k-1 mined,
    and an ``erasing.json`` manifest with the fill; written to a temporary folder and renamed
    into place), applied as the images are read: no copy of the training set;
    ``RUN_DIR/config.json``, ``RUN_DIR/metrics.jsonl`` (every step's epochs, each line with its
    ``step``) and ``RUN_DIR/checkpoint.pt`` (a marker with ``epoch`` 0 while the steps run; at
    the end the last step's checkpoint with ``ae_steps``).

    Example:
        >>> AdversarialErasing(steps=2).options
        {'steps': 2, 'fraction': 0.2, 'merge': 3}
    """

    name = "ae"
    defaults: ClassVar[dict[str, Any]] = {"steps": 3, "fraction": 0.2, "merge": 3}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for key in ("steps", "merge"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"method 'ae': option {key} must be a positive int, got {value!r}")
        fraction = self.options["fraction"]
        if not 0.0 < float(fraction) < 1.0:
            raise MethodError(
                f"method 'ae': option fraction must lie in (0, 1) (a share of the pixels), got {fraction}"
            )
        self.options["fraction"] = float(fraction)

    # ----------------------------------------------------------------- hooks

    def build(self, network: Network, config: Any) -> Network:
        """Each step trains the ``--model`` network unchanged (a CAM classifier)."""
        _check_single_label(config)
        return network

    def fit(
        self,
        config: Any,
        resume: bool,
        train: Callable[..., dict[str, Any]],
        device: torch.device | None = None,
    ) -> dict[str, Any]:
        """Train the steps into ``RUN_DIR/step{k}``, resuming at the step and epoch a killed
        run was in; mine the erasing masks between steps (on ``device``, the run's) and write
        the top-level run files."""
        self._device = device if device is not None else _device()
        from spn._io import remove_stale_temporaries
        from spn.harness.checkpoint import load_checkpoint, save_checkpoint, write_json
        from spn.harness.config import ConfigError
        from spn.harness.train import json_config

        _check_single_label(config)
        out = Path(config.out)
        marker = out / "checkpoint.pt"
        if resume:
            load_checkpoint(marker)  # a missing or foreign checkpoint is named here
        elif marker.exists() or (out / "step1" / "checkpoint.pt").exists():
            raise ConfigError(
                f"{out} already holds a run ({marker}); pass --resume to continue it, or choose another --out"
            )
        barrier()  # every process has looked before the marker appears
        if process_rank() == 0:  # the temporaries of a run killed while writing its top-level files
            remove_stale_temporaries(out)
        if not resume and process_rank() == 0:
            save_checkpoint(marker, {"epoch": 0, "ae_step": 0, "config": json_config(config)})
        for step in range(1, self.options["steps"]):  # step k + 1's images were mined after step k's epochs
            path = out / f"step{step}" / "checkpoint.pt"
            if resume and path.exists() and _erased_dir(out, step + 1).is_dir():
                saved = json.loads(load_checkpoint(path).get("config", "{}")).get("epochs")
                if saved is not None and int(saved) != int(config.epochs):
                    raise ConfigError(
                        f"{path}: AE step {step} was run with --epochs {saved}; the next steps' images were mined "
                        f"from it, so an AE run resumes with the same --epochs, not {config.epochs}"
                    )
        data_root = config.data_root()
        if config.dataset == "digits" and config.data is None:
            if process_rank() == 0:
                from spn.data.digits import write_benchmark

                write_benchmark(data_root, seed=config.digits_seed)
            barrier()
        record: dict[str, Any] = {}
        num_classes = config.num_classes
        for step in range(1, self.options["steps"] + 1):
            if step > 1 and process_rank() == 0:
                self._write_erased(config, step)
            barrier()
            step_config = self.step_config(config, step)
            step_checkpoint = Path(step_config.out) / "checkpoint.pt"
            record = train(step_config, step_checkpoint.exists())
            num_classes = json.loads((Path(step_config.out) / "config.json").read_text())["num_classes"]
            if process_rank() == 0:
                top = dataclasses.replace(config, num_classes=num_classes)
                write_json(out / "config.json", top.to_dict())
                self._write_metrics(out, step)
            barrier()
        if process_rank() == 0:
            final = load_checkpoint(Path(self.step_config(config, self.options["steps"]).out) / "checkpoint.pt")
            final.pop("format", None)
            final["ae_steps"] = self.options["steps"]
            final["config"] = json_config(dataclasses.replace(config, num_classes=num_classes))
            save_checkpoint(marker, final)
        barrier()
        return record

    def load_model(self, config: Any, run_dir: Path, build: Callable[[Any], Network]) -> Network:
        """`MergedCAMNetwork` of the first ``min(merge, steps)`` steps (each finished); for one
        step's own run (``spn evaluate --run RUN_DIR/step{k}``), that step's classifier alone."""
        from spn.harness.checkpoint import CheckpointError, load_checkpoint

        marker = load_checkpoint(run_dir / "checkpoint.pt")
        if "ae_step" not in marker and "ae_steps" not in marker:  # written by a step, not by fit
            return build(config)
        networks = []
        for step in range(1, min(self.options["merge"], self.options["steps"]) + 1):
            step_config = self.step_config(dataclasses.replace(config, out=str(run_dir)), step)
            path = Path(step_config.out) / "checkpoint.pt"
            done = int(load_checkpoint(path).get("epoch", 0))
            if done < config.epochs:
                raise CheckpointError(
                    f"{path}: AE step {step} has trained {done} of {config.epochs} epochs: "
                    "finish the run (spn train ... --resume) before evaluating it"
                )
            networks.append(build(step_config))
        return MergedCAMNetwork(networks)

    # ----------------------------------------------------------------- steps

    def step_config(self, config: Any, step: int) -> Any:
        """The `spn.harness.config.RunConfig` of step ``step`` (1-based) of the AE run ``config``:
        ``out`` = ``RUN_DIR/step{k}``; from step 2 on the training images are erased by
        ``RUN_DIR/erased/step{k}``'s masks (``erased``)."""
        out = Path(config.out)
        changes: dict[str, Any] = {"out": str(out / f"step{step}"), "data": str(config.data_root())}
        if step > 1:
            changes["erased"] = str(_erased_dir(out, step))
        return dataclasses.replace(config, **changes)

    def _write_erased(self, config: Any, step: int) -> None:
        """Write the erasing masks of ``step`` (>= 2): the union of step ``step - 1``'s masks and the
        region its classifier mines on its own (erased) images; atomically, once."""
        from spn.harness.checkpoint import write_json
        from spn.harness.config import build_dataset
        from spn.harness.evaluate import load_trained

        out = Path(config.out)
        target = _erased_dir(out, step)
        if target.is_dir():
            if not (target / "masks").is_dir():
                raise MethodError(
                    f"{target}: holds erased image copies, written by an older spn; this version keeps masks "
                    "there: train the AE run anew (a new --out)"
                )
            return
        for stale in out.glob(f"erased/.step{step}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        previous = self.step_config(config, step - 1)
        previous_config = json.loads((Path(previous.out) / "config.json").read_text())
        previous = dataclasses.replace(previous, num_classes=previous_config["num_classes"])
        dataset = build_dataset(previous, previous.training_split(), train=False)  # step - 1's images
        if step == 2:
            fill_mean = mean_pixel([dataset.image_root / path for path in dataset.paths])
        else:
            fill_mean = _manifest_mean(_erased_dir(out, 2) / "erasing.json")
        fill = [math.floor(value + 0.5) for value in fill_mean]
        earlier = ErasedRegions(_erased_dir(out, step - 1)) if step > 2 else None
        network = load_trained(previous)
        temporary = out / "erased" / f".step{step}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        mined_pixels = 0
        erased_pixels = 0
        total_pixels = 0
        try:
            temporary.mkdir(parents=True)
            device = getattr(self, "_device", None) or _device()  # the run's (set by fit), else the default
            for index, mask in mine_regions(network, dataset, self.options["fraction"], device):
                path = dataset.paths[index]
                region = mask | read_mask(earlier.mask_path(path)) if earlier is not None else mask
                write_mask(mask_file(temporary, path), region)
                mined_pixels += int(mask.sum())
                erased_pixels += int(region.sum())
                total_pixels += mask.size
            write_json(temporary / "erasing.json", {
                "step": step, "from": f"step{step - 1}", "fraction": self.options["fraction"],
                "mean_pixel": list(fill_mean), "fill": fill, "images": len(dataset),
                "mined_share": mined_pixels / max(total_pixels, 1),
                "erased_share": erased_pixels / max(total_pixels, 1),
            })  # fmt: skip
            if hasattr(os, "sync"):  # POSIX: the masks on disk before the folder appears (power loss)
                os.sync()
            os.rename(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _write_metrics(self, out: Path, last: int) -> None:
        from spn.harness.checkpoint import write_text

        lines = []
        for step in range(1, last + 1):
            path = out / f"step{step}" / "metrics.jsonl"
            if path.is_file():
                for line in path.read_text().splitlines():
                    if line.strip():
                        lines.append(json.dumps({**json.loads(line), "step": step}, sort_keys=True))
        write_text(out / "metrics.jsonl", "".join(f"{line}\n" for line in lines))


def _manifest_mean(manifest: Path) -> tuple[float, float, float]:
    """The training images' mean pixel that step 2's manifest recorded (later steps fill with it)."""
    try:
        values = json.loads(manifest.read_text()).get("mean_pixel")
        red, green, blue = (float(value) for value in values)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise MethodError(
            f"{manifest}: 'mean_pixel' must be three numbers (the training images' mean RGB): {error}"
        ) from None
    return red, green, blue


def _erased_dir(out: Path, step: int) -> Path:
    return out / "erased" / f"step{step}"


def _check_single_label(config: Any) -> None:
    if getattr(config, "dataset", None) == "voc":
        raise MethodError("method 'ae' erases the region of each image's one label; multi-label VOC is not supported")
