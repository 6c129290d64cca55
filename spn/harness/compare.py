"""``python -m spn compare``: train and evaluate several variants over seeds, then tabulate.

    python -m spn compare --out benchmarks/results/digits --variants small_sp small_cam \\
        small_sp:released --seeds 0 1 2 --epochs 30

Each (variant, seed) is one ``spn train`` run in ``OUT/runs/<variant>-seed<seed>`` followed by
``spn evaluate`` on the test split; runs already finished are kept and a run that was
interrupted is resumed, so the command can be re-run after a kill. A variant is
``MODEL[:released][+METHOD[,KEY=VALUE...]]``: a model name, ``:released`` for SoftProposal
with ``spn.RELEASED``'s 20-step walk, and a training method with its options (``--method``
and ``--method-option`` of ``spn train``), e.g. ``small_cam+acol,delta=0.7``. Then
``OUT/results.json`` (every run) and ``OUT/results.md`` (mean +/- standard deviation over the
seeds of every metric and of the training time per epoch) are written, and the picture grid
of each variant's first seed is left in ``OUT/pictures``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spn.methods import MethodError, parse_options

from .checkpoint import CheckpointError, load_checkpoint, write_json, write_text
from .config import ConfigError, RunConfig
from .evaluate import HEADLINES, evaluate_run
from .train import run

__all__ = ["build_parser", "main", "parse_variant", "summarize"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spn compare", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--variants", nargs="+", default=["small_sp", "small_cam", "small_sp:released"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data", metavar="IMAGE_ROOT", help="default for digits: OUT/digits, generated once")
    parser.add_argument("--metadata", metavar="META_ROOT")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.001, help="map threshold step of the evaluation")
    parser.add_argument(
        "--upsample", choices=("bicubic", "bilinear"), default="bicubic",
        help="how the maps reach the image size (see spn evaluate): bicubic, wsolevaluation's, or bilinear",
    )  # fmt: skip
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 128], help="small_*: block widths")
    parser.add_argument(
        "--pointing-radius", type=float,
        help="pointing-game radius in pixels (default 15; digits: 15 scaled from 224 px to the image size)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    data: str | None = args.data
    if args.dataset == "digits" and data is None:
        from spn.data.digits import write_benchmark

        data = str(out / "digits")
        write_benchmark(data)
    radius = args.pointing_radius
    if radius is None:
        radius = 15.0 * _image_size(data) / 224 if args.dataset == "digits" else 15.0
    records = []
    try:
        for variant in args.variants:
            model, preset, method, options = parse_variant(variant)
            for seed in args.seeds:
                run_dir = out / "runs" / f"{_slug(variant)}-seed{seed}"
                config = RunConfig(
                    model=model, out=str(run_dir), dataset=args.dataset, data=data, metadata=args.metadata,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, workers=args.workers,
                    preset=preset, widths=tuple(args.widths), method=method, method_options=options,
                )  # fmt: skip
                if not _finished(run_dir, args.epochs):
                    print(f"== {variant}, seed {seed}: training", flush=True)
                    load = os.getloadavg()[0]
                    run(config, resume=(run_dir / "checkpoint.pt").exists())
                    write_json(run_dir / "load.json", {"load_average_1min": [load, os.getloadavg()[0]]})
                pictures = str(out / "pictures" / _slug(variant)) if seed == args.seeds[0] else None
                settings = {
                    "split": "test", "interval": args.interval, "pointing_radius": radius, "upsample": args.upsample
                }
                result = _cached_evaluation(run_dir, settings, pictures)
                if result is None:
                    print(f"== {variant}, seed {seed}: evaluating", flush=True)
                    result = evaluate_run(run_dir, pictures=pictures, **settings)
                    write_json(run_dir / "evaluation.json", {"settings": settings, "result": result})
                epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                result["seconds_per_epoch"] = statistics.median(line["seconds"] for line in epochs)
                result["train_seconds"] = sum(line["seconds"] for line in epochs)
                if (run_dir / "load.json").is_file():  # the machine's load while it trained (start, end)
                    result["load_average"] = json.loads((run_dir / "load.json").read_text())["load_average_1min"]
                result.update(variant=variant, seed=seed)
                records.append(result)
                write_json(out / "results.json", records)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"spn compare: error: {error}", file=sys.stderr)
        return 2
    table = summarize(records)
    write_json(out / "results.json", records)
    write_text(out / "results.md", table)
    print(table)
    return 0


def parse_variant(variant: str) -> tuple[str, str, str, dict[str, Any]]:
    """``"small_cam+acol,delta=0.7"`` -> ``("small_cam", "paper", "acol", {"delta": 0.7})``."""
    head, _, method_text = variant.partition("+")
    model, _, preset = head.partition(":")
    method, *option_items = method_text.split(",") if method_text else ["default"]
    try:
        options = parse_options(option_items)
    except MethodError as error:
        raise ConfigError(f"variant {variant!r}: {error}") from None
    return model, preset or "paper", method, options


def _slug(variant: str) -> str:
    """A directory name for a variant: ``small_cam+acol,delta=0.7`` -> ``small_cam-acol-delta0.7``."""
    return variant.replace(":", "-").replace("+", "-").replace(",", "-").replace("=", "")


def _cached_evaluation(run_dir: Path, settings: dict[str, Any], pictures: str | None) -> dict[str, Any] | None:
    """The run's earlier evaluation with the same settings, if it is newer than the checkpoint
    (and the picture grid asked for exists); None: evaluate again."""
    cache, checkpoint = run_dir / "evaluation.json", run_dir / "checkpoint.pt"
    if not cache.is_file() or cache.stat().st_mtime < checkpoint.stat().st_mtime:
        return None
    if pictures is not None and not (Path(pictures) / "test.png").is_file():
        return None
    saved = json.loads(cache.read_text())
    return dict(saved["result"]) if saved.get("settings") == settings else None


def _with_iou_columns(record: dict[str, Any]) -> dict[str, Any]:
    """``max_box_acc_v2_per_iou`` {"0.3": a, ...} as columns ``max_box_acc_v2@30``, ..."""
    per_iou = record.get("max_box_acc_v2_per_iou") or {}
    return {**record, **{f"max_box_acc_v2@{round(float(iou) * 100)}": value for iou, value in per_iou.items()}}


def _image_size(data: str | None) -> int:
    """The digits benchmark's image size, from its manifest."""
    manifest = json.loads((Path(str(data)) / "manifest.json").read_text())
    return int(manifest["config"]["image_size"])


def _finished(run_dir: Path, epochs: int) -> bool:
    try:
        return int(load_checkpoint(run_dir / "checkpoint.pt")["epoch"]) >= epochs
    except CheckpointError:
        return False


def summarize(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per variant, ``mean +/- std`` over its seeds per column."""
    timings = ("seconds_per_epoch", "train_seconds")
    records = [_with_iou_columns(record) for record in records]
    ious = sorted({key for record in records for key in record if key.startswith("max_box_acc_v2@")})
    order = [key for key in HEADLINES if key != "max_box_acc_v2"]
    order[2:2] = [*ious, "max_box_acc_v2"]  # after top-1/top-5: box accuracy per IoU, then their mean
    columns = [key for key in (*order, *timings) if any(r.get(key) is not None for r in records)]
    lines = [
        "| variant | seeds | " + " | ".join(columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    variants = list(dict.fromkeys(record["variant"] for record in records))
    for variant in variants:
        rows = [record for record in records if record["variant"] == variant]
        cells = []
        for key in columns:
            values = [float(row[key]) for row in rows if row.get(key) is not None]
            if not values:
                cells.append("")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            scale, digits = (1.0, 1) if key in timings else (100.0, 1)
            cells.append(f"{statistics.fmean(values) * scale:.{digits}f} ± {spread * scale:.{digits}f}")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
    note = (
        "\nAccuracies in %, mean ± standard deviation over the seeds; seconds_per_epoch: the median"
        " epoch of a run; train_seconds: all its epochs (every step of a multi-step method).\n"
    )
    return "\n".join(lines) + "\n" + note
