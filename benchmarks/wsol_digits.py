"""SPN vs CAM (and the seed methods) on the offline digits benchmark: the measurement of
``make benchmark``.

    python benchmarks/wsol_digits.py --out benchmarks/results/wsol_digits

1. ``spn compare`` trains every variant over the seeds with the same budget (model, widths,
   epochs, batch, learning rate), evaluates each run on the test split with the wsolevaluation
   protocol and tabulates mean +/- std (``OUT/results.md``, ``OUT/results.json``); a killed
   run is resumed by running the command again.
2. Then, to show *why* a method localizes as it does, where each run's ground-truth-class map
   peaks on the test images that carry their own class's distractor patch: on the digit (its
   mask), on the distractor patch, or elsewhere; and the share of the min-max normalised map's
   mass inside the digit's box and inside the patch. The patch is known exactly because the
   benchmark is regenerated in memory from its manifest (its content hash is checked).
3. ``OUT/benchmark.md``: both tables, the settings, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spn.data.digits import DigitsBenchmark, content_hash, generate
from spn.harness import compare
from spn.harness.checkpoint import write_json, write_text
from spn.harness.config import build_dataset
from spn.harness.evaluate import load_run, scored_maps

DEFAULT_VARIANTS = [
    "small_sp", "small_cam", "small_sp:released",  # SPN (exact stationary state, the released walk), CAM
    "small_cam+ae", "small_cam+acol", "small_cam+spa,start_epoch=3",
    "small_cam+i2c", "small_cam+danet", "small_cam+icl",
]  # fmt: skip
# SPA's restricted activation starts at 20% of the schedule, as in the authors' CUB scripts (20 of 100 epochs).


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/wsol_digits", metavar="DIR")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="see `spn compare --help`")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.001, help="map threshold step (wsolevaluation: 0.001)")
    parser.add_argument(
        "--report-only", action="store_true",
        help="train and evaluate nothing: tabulate the runs already in OUT/results.json (e.g. after a stopped run)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    load_before = os.getloadavg()
    command = [
        "--out", str(out), "--variants", *args.variants, "--seeds", *map(str, args.seeds),
        "--epochs", str(args.epochs), "--widths", *map(str, args.widths), "--lr", str(args.lr),
        "--batch-size", str(args.batch_size), "--interval", str(args.interval),
    ]  # fmt: skip
    if not args.report_only:
        status = compare.main(command)
        if status:
            return status
    records = json.loads((out / "results.json").read_text())
    write_text(out / "results.md", compare.summarize(records))
    diagnostics = [
        dict(variant=record["variant"], seed=record["seed"], **distractor_diagnostics(Path(record["run"])))
        for record in records
    ]
    write_json(out / "diagnostics.json", diagnostics)
    elapsed = time.perf_counter() - started
    environment = {
        "wall_seconds_this_invocation": elapsed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/wsol_digits.py", *sys.argv[1:]]),
    }
    write_json(out / "environment.json", environment)
    report = render(out, diagnostics, environment)
    write_text(out / "benchmark.md", report)
    print(report)
    return 0


def distractor_diagnostics(run_dir: Path, batch_size: int = 100) -> dict[str, float]:
    """Where the ground-truth-class maps of a run peak, on test images with their own class's
    distractor: rates of peaks on the digit's mask / on the patch / elsewhere, and the mean
    shares of the min-max normalised map's mass inside the digit's box and the patch's box."""
    config, model = load_run(run_dir)
    root = config.data_root()
    manifest = json.loads((root / "manifest.json").read_text())
    splits = generate(DigitsBenchmark.from_dict(manifest["config"]), seed=int(manifest["seed"]))
    if content_hash(splits) != manifest["content_sha256"]:
        raise RuntimeError(f"{root}: regenerated benchmark differs from its manifest (other NumPy/scikit-learn?)")
    test = splits["test"]
    position = {path: k for k, path in enumerate(test.ids)}
    dataset = build_dataset(config, "test", train=False)  # the evaluation's own preprocessing
    chosen = [
        i
        for i, path in enumerate(dataset.paths)
        if test.distractor_labels[position[path]] == test.labels[position[path]]
    ]
    peaks = {"digit": 0, "distractor": 0, "elsewhere": 0}
    digit_mass: list[float] = []
    patch_mass: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(chosen), batch_size):
            items = [dataset[i] for i in chosen[start : start + batch_size]]
            images = torch.stack([item["image"] for item in items])
            labels = torch.tensor([item["label"] for item in items])
            _, maps = scored_maps(model, images, labels)  # the maps the evaluation scores
            for k, item in enumerate(items):
                g = position[item["path"]]
                score = maps[k].numpy()
                y, x = np.unravel_index(int(score.argmax()), score.shape)
                x0, y0, x1, y1 = (int(v) for v in test.distractor_boxes[g])
                if test.masks[g][y, x]:
                    peaks["digit"] += 1
                elif x0 <= x <= x1 and y0 <= y <= y1:
                    peaks["distractor"] += 1
                else:
                    peaks["elsewhere"] += 1
                low, high = score.min(), score.max()
                normed = (score - low) / (high - low) if high > low else np.zeros_like(score)
                total = normed.sum()
                bx0, by0, bx1, by1 = (int(v) for v in test.boxes[g])
                digit_mass.append(normed[by0 : by1 + 1, bx0 : bx1 + 1].sum() / total if total > 0 else 0.0)
                patch_mass.append(normed[y0 : y1 + 1, x0 : x1 + 1].sum() / total if total > 0 else 0.0)
    count = max(len(chosen), 1)
    return {
        "images": len(chosen),
        "peak_on_digit": peaks["digit"] / count,
        "peak_on_distractor": peaks["distractor"] / count,
        "peak_elsewhere": peaks["elsewhere"] / count,
        "mass_in_digit_box": float(np.mean(digit_mass)) if digit_mass else 0.0,
        "mass_in_distractor_box": float(np.mean(patch_mass)) if patch_mass else 0.0,
    }


def render(out: Path, diagnostics: list[dict[str, Any]], environment: dict[str, Any]) -> str:
    """``benchmark.md``: the metrics table of ``spn compare``, the diagnostics, the settings."""
    keys = ["peak_on_digit", "peak_on_distractor", "peak_elsewhere", "mass_in_digit_box", "mass_in_distractor_box"]
    lines = [
        "| variant | seeds | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for variant in dict.fromkeys(row["variant"] for row in diagnostics):
        rows = [row for row in diagnostics if row["variant"] == variant]
        cells = []
        for key in keys:
            values = [100 * float(row[key]) for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
    metrics = (out / "results.md").read_text()
    return (
        "# Digits benchmark\n\n## Metrics (test split, wsolevaluation protocol)\n\n"
        + metrics
        + "\n## Where the ground-truth-class maps peak (test images with their own class's distractor, %)\n\n"
        + "\n".join(lines)
        + "\n\n## Run\n\n```json\n"
        + json.dumps(environment, indent=2)
        + "\n```\n"
    )


if __name__ == "__main__":
    sys.exit(main())
