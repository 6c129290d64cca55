"""The round trip every method must survive through the harness, shared by the method tests:
`spn train` for 2 epochs, `spn evaluate` of that run, and a run stopped after 1 epoch and
resumed to 2 that ends with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from spn.__main__ import main as spn_main
from spn.harness.checkpoint import load_checkpoint

SCORES = ("top1_cls", "max_box_acc_v2", "gt_known_loc", "top1_loc", "pointing_game", "pxap")


def torchrun(*arguments: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGUMENTS` (one thread a process), its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def train_method(data: Path, out: Path, epochs: int, method: str, *options: str) -> int:
    """`spn train` of small_cam with `method` on the digits benchmark at `data`; `options` are
    further command-line arguments (later ones win: --batch-size, --widths, --method-option...)."""
    return spn_main([
        "train", "--dataset", "digits", "--data", str(data), "--model", "small_cam", "--method", method,
        "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.05", "--widths", "8", "16", "--out", str(out),
        *options,
    ])  # fmt: skip


def round_trip(data: Path, tmp_path: Path, method: str, *options: str) -> tuple[list[dict], dict]:
    """Train 2 epochs, evaluate, train 1 epoch and resume to 2; checks the evaluation's method
    and scores and that the resumed weights equal the straight run's. Returns the straight
    run's metrics.jsonl lines and its weights, for the method's own checks."""
    whole, part, result_path = tmp_path / "whole", tmp_path / "part", tmp_path / "eval.json"
    assert train_method(data, whole, 2, method, *options) == 0
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]

    command = ["evaluate", "--run", str(whole), "--split", "test", "--json", str(result_path), "--interval", "0.05"]
    assert spn_main(command) == 0
    result = json.loads(result_path.read_text())
    assert result["method"] == method
    for key in SCORES:
        assert 0.0 <= result[key] <= 1.0, key

    assert train_method(data, part, 1, method, *options) == 0
    assert train_method(data, part, 2, method, *options, "--resume") == 0
    state, resumed = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["model"].keys() == state["model"].keys()
    part_lines = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in part_lines] == [1, 2]  # the resumed run appends its epoch once
    for key, value in state["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)
    return lines, state["model"]
