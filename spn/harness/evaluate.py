"""``python -m spn evaluate``: score a trained run with the field's protocols.

    python -m spn evaluate --run RUN_DIR --split test --json OUT.json [--pictures DIR]

The model and the data pipeline are rebuilt from ``RUN_DIR/config.json`` and the weights read
from ``RUN_DIR/checkpoint.pt`` (``weights_only=True``). Single-label datasets (wsolevaluation's
layout, the digits benchmark) follow wsolevaluation's protocol: the maps of the ground-truth
class, in float64, upsampled to the evaluation size as its ``inference.py`` does (OpenCV's
bicubic resize, reproduced to the last bit; ``--upsample bilinear`` is a named variant), give
MaxBoxAccV2 (IoU 0.3 / 0.5 / 0.7 and their mean); the map threshold that maximises MaxBoxAcc on
the ``val`` split (wsolevaluation's train-fullsup role) gives GT-known and top-1 localisation on
the evaluated split; the peak of the map plays the pointing game (TorchRay's protocol); PxAP
where the metadata has masks.
Pascal VOC (multi-label) gets the SPN paper's CorLoc (the mean-threshold box of each present
class) and the pointing game over (image, present class) queries, skipping classes whose boxes
are all "difficult" (TorchRay's rule). Under torchrun each process scores a shard of the split
(no padding) and the metrics are merged before rank 0 writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from spn import localize, metrics
from spn.models import Network

from .checkpoint import CheckpointError, load_checkpoint, write_json
from .config import ConfigError, RunConfig, build_dataset, build_mask_dataset, build_model
from .distributed import Context, setup, shard, teardown

__all__ = ["build_parser", "evaluate_run", "main", "scored_maps"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spn evaluate", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        metavar="RUN_DIR",
        required=True,
        help="a directory written by `spn train` (under torchrun: --run-dir; torchrun reads --run as its --run-path)",
    )
    parser.add_argument("--data", metavar="IMAGE_ROOT", help="override the run's image root")
    parser.add_argument("--metadata", metavar="META_ROOT", help="override the run's metadata root")
    parser.add_argument("--mask-root", metavar="DIR", help="override the run's mask root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threshold-split", default="val", help="split that picks the map threshold (default val)")
    parser.add_argument("--json", metavar="OUT.json", required=True)
    parser.add_argument("--pictures", metavar="DIR", help="write a grid of images, maps and boxes there")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.001, help="map threshold step (wsolevaluation: 0.001)")
    parser.add_argument(
        "--upsample", choices=("bicubic", "bilinear"), default="bicubic",
        help="how single-label maps reach the image size: bicubic (default) is wsolevaluation's cv2.resize "
        "INTER_CUBIC, bit-exact; bilinear (align_corners=False) is a variant",
    )  # fmt: skip
    parser.add_argument(
        "--pointing-radius", type=float, default=15.0,
        help="pointing-game radius in pixels of the evaluation size (TorchRay: 15, for ~500 px VOC images)",
    )  # fmt: skip
    parser.add_argument(
        "--difficult-flags", metavar="FILE",
        help="voc: the pointing game's difficult subset as TorchRay's list file (image id, 20 flags 0/1 per line); "
        "default: derived from the annotations by the excitation-backprop rule",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    context = setup(args.device)
    try:
        results = evaluate_run(
            args.run,
            split=args.split,
            threshold_split=args.threshold_split,
            data=args.data,
            metadata=args.metadata,
            mask_root=args.mask_root,
            pictures=args.pictures,
            batch_size=args.batch_size,
            workers=args.workers,
            interval=args.interval,
            upsample=args.upsample,
            pointing_radius=args.pointing_radius,
            context=context,
            difficult_flags=args.difficult_flags,
        )
        if context.is_main:
            write_json(args.json, results)
            headline = {key: results[key] for key in HEADLINES if results.get(key) is not None}
            print(json.dumps(headline, indent=1))
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"spn evaluate: error: {error}", file=sys.stderr)
        return 2
    finally:
        teardown(context)
    return 0


HEADLINES = (
    "top1_cls", "top5_cls", "max_box_acc_v2", "gt_known_loc", "top1_loc", "pointing_game", "pointing_game_difficult",
    "pxap", "corloc",
)  # fmt: skip


def load_run(run_dir: str | Path, **overrides: Any) -> tuple[RunConfig, Network]:
    """The run's config (with path overrides) and its trained model, in eval mode on the CPU."""
    config = RunConfig.load(run_dir)
    changes = {key: value for key, value in overrides.items() if value is not None}
    changes["out"] = str(run_dir)  # the run directory may have moved since training
    config = dataclasses.replace(config, **changes)
    if config.num_classes is None:
        raise ConfigError(f"{Path(run_dir) / 'config.json'}: num_classes is missing (the run never started training)")
    model = config.training_method().load_model(config, Path(run_dir), load_trained)
    return config, model.eval()


def load_trained(config: RunConfig) -> Network:
    """The model of ``config`` with the weights of ``config.out``'s checkpoint."""
    path = Path(config.out) / "checkpoint.pt"
    state = load_checkpoint(path)
    model = build_model(config, int(config.num_classes or 0))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit the model of config.json ({config.model}): {error}") from None
    return model


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    threshold_split: str = "val",
    data: str | None = None,
    metadata: str | None = None,
    mask_root: str | None = None,
    pictures: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    interval: float = 0.001,
    pointing_radius: float = 15.0,
    context: Context | None = None,
    difficult_flags: str | None = None,
    upsample: str = "bicubic",
) -> dict[str, Any]:
    """Score ``run_dir`` on ``split``; returns the dict written to ``OUT.json``. ``upsample``:
    how single-label maps are resized to the image (see `spn.models.upsample_maps`); Pascal
    VOC's pointing game always resizes bilinearly, as TorchRay."""
    if upsample not in ("bicubic", "bilinear"):
        raise ValueError(f"upsample must be 'bicubic' (wsolevaluation) or 'bilinear', got {upsample!r}")
    context = context or Context()
    config, model = load_run(run_dir, data=data, metadata=metadata, mask_root=mask_root)
    model = model.to(context.device)
    dataset = build_dataset(config, split, train=False)
    if config.dataset == "voc":
        results = _evaluate_multilabel(
            model, dataset, config, context, batch_size, workers, pointing_radius, difficult_flags
        )
    else:
        has_masks = bool(getattr(dataset, "has_masks", False))
        mask_set = dataset if has_masks else build_mask_dataset(config, split)
        box_set = None if has_masks else dataset
        threshold = None
        if box_set is not None:
            threshold_set = build_dataset(config, threshold_split, train=False)
            threshold = pick_threshold(model, threshold_set, context, batch_size, workers, interval, upsample)
        results = _evaluate_single_label(
            model, box_set, mask_set, config, context, batch_size, workers, interval, threshold, pointing_radius,
            upsample,
        )  # fmt: skip
        results.update(threshold=threshold, threshold_split=threshold_split if threshold is not None else None)
        results["upsample"] = upsample
    results.update(split=split, run=str(run_dir), model=config.model, method=config.method, preset=config.preset)
    results["pointing_radius"] = pointing_radius
    if pictures and context.is_main:
        from .pictures import write_grid

        shown = "bilinear" if config.dataset == "voc" else upsample  # as the maps were scored
        write_grid(model, dataset, Path(pictures) / f"{split}.png", context.device, results.get("threshold"),
                   upsample=shown)  # fmt: skip
    return results


def _loader(dataset: Any, context: Context, batch_size: int, workers: int) -> DataLoader:
    from spn.data import collate

    return DataLoader(Subset(dataset, shard(len(dataset), context)), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate)


@torch.no_grad()
def scored_maps(
    model: Network, images: torch.Tensor, classes: torch.Tensor, upsample: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the maps of ``classes`` (B,) at the images' size, float64, on the images'
    device: as wsolevaluation's inference, the map at the feature resolution goes to float64
    (t2n), then is resized (cv2.resize, INTER_CUBIC: ``upsample="bicubic"``). What
    ``spn evaluate`` scores, its pictures draw and the digits benchmark's diagnostics read."""
    from spn.models import upsample_maps

    out = model.forward_with_maps(images, classes=classes, size=None)
    return out.logits, upsample_maps(out.maps.double(), tuple(images.shape[-2:]), mode=upsample)


def _ground_truth_maps(
    model: Network, batch: dict[str, Any], device: torch.device, upsample: str
) -> tuple[Any, torch.Tensor]:
    """Logits (float32) and the ground-truth class's maps (float64) of a batch, on the CPU."""
    logits, maps = scored_maps(model, batch["image"].to(device), batch["label"].to(device), upsample)
    return logits.float().cpu(), maps.cpu()


def pick_threshold(
    model: Network, dataset: Any, context: Context, batch_size: int, workers: int, interval: float,
    upsample: str = "bicubic",
) -> float:
    """The map threshold of best MaxBoxAcc (largest region, IoU 0.5) on ``dataset``."""
    metric = metrics.BoxAccuracy(version=1, interval=interval)
    for batch in _loader(dataset, context, batch_size, workers):
        _, maps = _ground_truth_maps(model, batch, context.device, upsample)
        metric.update(maps, batch["boxes"])
    metric.sync()
    return float(metric.compute().details["best_threshold"][0.5])


def _evaluate_single_label(
    model: Network,
    box_set: Any | None,
    mask_set: Any | None,
    config: RunConfig,
    context: Context,
    batch_size: int,
    workers: int,
    interval: float,
    threshold: float | None,
    pointing_radius: float = 15.0,
    upsample: str = "bicubic",
) -> dict[str, Any]:
    """Classification and box metrics over ``box_set`` (at ``threshold`` for GT-known / top-1
    localisation), PxAP over ``mask_set``; classification from the mask set when there are no boxes."""
    num_classes = int(config.num_classes or 1)
    results: dict[str, Any] = {"metrics": {}}
    classification = box_set if box_set is not None else mask_set
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 correct, top-5 correct, images
    if box_set is not None:
        box_accuracy = metrics.BoxAccuracy(version=2, interval=interval)
        localization = metrics.LocalizationAccuracy()
        pointing = metrics.PointingGame(num_classes=num_classes, radius=pointing_radius)
        for batch in _loader(box_set, context, batch_size, workers):
            logits, maps = _ground_truth_maps(model, batch, context.device, upsample)
            ranked = _count_classification(counts, logits, batch["label"])
            box_accuracy.update(maps, batch["boxes"])
            at_threshold = [localize.wsol_boxes(m, [float(threshold or 0.0)])[0] for m in maps]
            localization.update(at_threshold, batch["boxes"], pred_labels=ranked[:, 0], labels=batch["label"])
            pointing.update(localize.peak_points(maps), batch["boxes"], batch["label"])
        for metric in (box_accuracy, localization, pointing):
            metric.sync()
        box, loc, game = box_accuracy.compute(), localization.compute(), pointing.compute()
        results.update(
            max_box_acc_v2=box.value,
            max_box_acc_v2_per_iou={str(key): value for key, value in box.details["per_iou"].items()},
            gt_known_loc=loc.value,
            top1_loc=loc.details["top1_loc"],
            pointing_game=game.value,
        )
        for result in (box, loc, game):
            results["metrics"][result.name] = result.to_dict()
        results["metrics"]["max_box_acc_v2"]["details"].pop("box_acc", None)  # the curves: large
    if mask_set is not None:
        pixel_ap = metrics.PxAP(interval=interval)
        for batch in _loader(mask_set, context, batch_size, workers):
            logits, maps = _ground_truth_maps(model, batch, context.device, upsample)
            if classification is mask_set:
                _count_classification(counts, logits, batch["label"])
            pixel_ap.update(maps, batch["mask"], batch["ignore"])
        pixel_ap.sync()
        pxap = pixel_ap.compute()
        results["pxap"] = pxap.value
        results["metrics"]["pxap"] = {key: value for key, value in pxap.to_dict().items() if key != "details"}
    if context.distributed:
        torch.distributed.all_reduce(counts)
    top1, top5, images = counts.tolist()
    results.update(
        images=int(images), top1_cls=top1 / images, top5_cls=top5 / images if num_classes >= 5 else None
    )
    return results


def _count_classification(counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Add top-1 and top-5 hits and the image count to ``counts``; returns the top-k ranking."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    counts += torch.tensor(
        [(ranked[:, 0] == labels).sum(), (ranked == labels[:, None]).any(1).sum(), len(labels)], dtype=torch.float64
    )
    return ranked


def _evaluate_multilabel(
    model: Network,
    dataset: Any,
    config: RunConfig,
    context: Context,
    batch_size: int,
    workers: int,
    pointing_radius: float,
    difficult_flags: str | None,
) -> dict[str, Any]:
    """Pascal VOC, as the SPN paper's Table 1: the pointing game over all (image, present
    class) queries and over the *difficult* subset, and CorLoc. The pointing game runs at the
    original image resolution (each class map upsampled from the feature map to the image's
    own size, the boxes as annotated), as TorchRay does, so the radius is in original pixels."""
    from spn.data.voc import ebp_difficult_flags, read_difficult_flags
    from spn.models import upsample_maps

    num_classes = int(config.num_classes or 1)
    pointing = metrics.PointingGame(num_classes=num_classes, radius=pointing_radius)
    pointing_difficult = metrics.PointingGame(num_classes=num_classes, radius=pointing_radius)
    corloc = metrics.CorLoc()
    flags = read_difficult_flags(difficult_flags, dataset.ids) if difficult_flags else ebp_difficult_flags(dataset)
    counts = torch.zeros(2, dtype=torch.float64)  # top-scoring class present, images
    for batch in _loader(dataset, context, batch_size, workers):
        images = batch["image"].to(context.device)
        with torch.no_grad():
            out = model.forward_with_maps(images, classes="all", size=None)
        logits, feature_maps = out.logits.float().cpu(), out.maps.double().cpu()
        maps = upsample_maps(feature_maps, tuple(images.shape[-2:])).numpy()
        present = batch["labels"] > 0
        counts += torch.tensor([present[torch.arange(len(images)), logits.argmax(1)].sum(), len(images)])
        for index in range(len(images)):
            boxes, box_labels = batch["boxes"][index], batch["box_labels"][index]
            difficult = batch["difficult"][index]
            item = int(batch["index"][index])
            annotation = dataset.annotations[item]
            original_boxes = torch.tensor(annotation["boxes"], dtype=torch.float64)
            original_labels = torch.tensor(annotation["labels"], dtype=torch.int64)
            image_flags = flags.get(dataset.ids[item])
            for cls in torch.nonzero(present[index]).flatten().tolist():
                of_class = box_labels == cls
                if bool(difficult[of_class].all()):
                    continue  # TorchRay skips a query whose boxes are all difficult
                original_map = upsample_maps(feature_maps[index, cls][None], tuple(annotation["size"])).numpy()
                point = localize.peak_points(original_map)
                pointing.update(point, [original_boxes], [cls], [original_labels])
                if image_flags is not None and image_flags[cls]:
                    pointing_difficult.update(point, [original_boxes], [cls], [original_labels])
                class_map = maps[index, cls][None]
                predicted, _ = localize.boxes_from_maps(class_map)
                corloc.update(predicted, [boxes], [cls], [box_labels])
    if context.distributed:
        torch.distributed.all_reduce(counts)
    pointing.sync()
    pointing_difficult.sync()
    corloc.sync()
    difficult_result = pointing_difficult.compute().value if pointing_difficult.tally.samples else None
    return {
        "images": int(counts[1]),
        "top1_cls": float(counts[0] / counts[1]),
        "pointing_game": pointing.compute().value,
        "pointing_game_difficult": difficult_result,
        "difficult_subset": difficult_flags or "EBP rule (spn.data.voc.ebp_difficult_flags)",
        "corloc": corloc.compute().value,
        "max_box_acc_v2": None,
        "gt_known_loc": None,
        "top1_loc": None,
    }


