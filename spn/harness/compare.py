"""``python -m spn compare``: train and evaluate several variants over seeds, then tabulate.

    python -m spn compare --out benchmarks/results/digits --variants small_sp small_cam \\
        small_sp:released --seeds 0 1 2 --epochs 30

Each (variant, seed) is one ``spn train`` run in ``OUT/runs/<variant>-seed<seed>`` followed by
``spn evaluate`` on the test split; runs already finished are kept and a run that was
interrupted is resumed, so the command can be re-run after a kill. A variant is a model name
with an optional ``:released`` (SoftProposal with ``spn.RELEASED``'s 20-step walk). Then
``OUT/results.json`` (every run) and ``OUT/results.md`` (mean +/- standard deviation over the
seeds of every metric and of the training time per epoch) are written, and the picture grid
of each variant's first seed is left in ``OUT/pictures``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint, write_json, write_text
from .config import ConfigError, RunConfig
from .evaluate import HEADLINES, evaluate_run
from .train import run

__all__ = ["build_parser", "main", "summarize"]


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
            model, _, preset = variant.partition(":")
            for seed in args.seeds:
                run_dir = out / "runs" / f"{variant.replace(':', '-')}-seed{seed}"
                config = RunConfig(
                    model=model, out=str(run_dir), dataset=args.dataset, data=data, metadata=args.metadata,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, workers=args.workers,
                    preset=preset or "paper", widths=tuple(args.widths),
                )  # fmt: skip
                if not _finished(run_dir, args.epochs):
                    print(f"== {variant}, seed {seed}: training", flush=True)
                    run(config, resume=(run_dir / "checkpoint.pt").exists())
                print(f"== {variant}, seed {seed}: evaluating", flush=True)
                pictures = str(out / "pictures" / variant.replace(":", "-")) if seed == args.seeds[0] else None
                result = evaluate_run(
                    run_dir, split="test", pictures=pictures, interval=args.interval, pointing_radius=radius
                )
                epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                result["seconds_per_epoch"] = statistics.median(line["seconds"] for line in epochs)
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
    columns = [key for key in (*HEADLINES, "seconds_per_epoch") if any(r.get(key) is not None for r in records)]
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
            scale, digits = (1.0, 1) if key == "seconds_per_epoch" else (100.0, 1)
            cells.append(f"{statistics.fmean(values) * scale:.{digits}f} ± {spread * scale:.{digits}f}")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
    note = "\nAccuracies in %, mean ± standard deviation over the seeds; seconds_per_epoch: median per run.\n"
    return "\n".join(lines) + "\n" + note
