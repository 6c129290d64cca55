"""``python -m spn train``: train a WSOL network, resumably, on one process or under torchrun.

    python -m spn train --dataset digits --model small_sp --epochs 10 --out runs/sp
    python -m spn train --data IMAGE_ROOT --metadata META_ROOT --model vgg16_cam \\
        --backbone-weights vgg16.pth --epochs 40 --out runs/cam
    torchrun --nproc-per-node 2 -m spn train ...       # data parallel (gloo on CPU, NCCL on GPUs)

Writes ``RUN_DIR/config.json`` (everything needed to rebuild the model and the data),
``RUN_DIR/metrics.jsonl`` (one line per epoch) and ``RUN_DIR/checkpoint.pt`` (model,
optimizer, scheduler and epoch, after every epoch), each atomically. ``--resume`` continues
from the checkpoint; a run killed at any point (even ``kill -9``) loses at most the epoch it
was in, and a resumed run ends with the same weights as an uninterrupted one: every random
draw of an epoch (the data order, each sample's augmentation, dropout) is seeded from
``(--seed, epoch)`` and the sample's index, not from what happened before.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spn._io import remove_stale_temporaries
from spn.methods import METHODS, Step, parse_options

from .checkpoint import CheckpointError, append_jsonl, load_checkpoint, save_checkpoint, write_json
from .config import DATASETS, MODELS, ConfigError, RunConfig, build_dataset, build_model
from .distributed import Context, setup, teardown

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spn train", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", metavar="IMAGE_ROOT", help="image root (digits: where to write the benchmark)")
    parser.add_argument("--metadata", metavar="META_ROOT", help="metadata root (default IMAGE_ROOT/metadata)")
    parser.add_argument("--mask-root", metavar="DIR", help="root of the mask PNGs (default IMAGE_ROOT)")
    parser.add_argument("--dataset", choices=DATASETS, default="wsol", help="metadata layout (default wsol)")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--method", choices=list(METHODS), default="default", help="training method (default: CE)")
    parser.add_argument(
        "--method-option", dest="method_options", action="append", default=[], metavar="KEY=VALUE",
        help="an option of --method (repeatable; see docs/methods.md), e.g. --method-option delta=0.7",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the backbone (default 0.01)")
    parser.add_argument(
        "--lr-classifier-ratio", type=float, help="head lr / backbone lr (default 10 with --backbone-weights, else 1)"
    )
    parser.add_argument("--lr-decay-every", type=int, default=30, help="lr x 0.1 every N epochs (default 30)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="RUN_DIR", required=True)
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default 0: this process)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    parser.add_argument(
        "--preset", choices=("paper", "released"), default="paper", help="SoftProposal options of *_sp models"
    )
    parser.add_argument("--resize", type=int, help="training resize (default 256; digits: native size)")
    parser.add_argument("--crop", type=int, help="training random crop (default 224; digits: native size)")
    parser.add_argument("--eval-size", type=int, help="evaluation resize (default: the crop size)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no random horizontal flip")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 128], help="small_*: block widths")
    parser.add_argument("--output-stride", type=int, default=4, help="small_*: feature map stride (default 4)")
    parser.add_argument("--norm", choices=("batch", "group", "none"), default="batch", help="small_*: normalisation")
    parser.add_argument("--num-maps", type=int, default=128, help="small_*: channels of the head's 3x3 conv")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--backbone-weights", metavar="FILE", help="torchvision-layout weights (never downloaded)")
    parser.add_argument("--digits-seed", type=int, default=0, help="digits: the benchmark's generation seed")
    parser.add_argument("--train-split", help="the split to train on (default trainval for voc, else train)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args).copy()
    resume, device = options.pop("resume"), options.pop("device")
    options["widths"] = tuple(options["widths"])
    try:
        options["method_options"] = parse_options(options["method_options"])
        config = RunConfig(**options)
    except (ConfigError, ValueError) as error:
        print(f"spn train: error: {error}", file=sys.stderr)
        return 2
    context = setup(device)
    try:
        run(config, resume=resume, context=context)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"spn train: error: {error}", file=sys.stderr)
        return 2
    finally:
        teardown(context)
    return 0


def run(config: RunConfig, resume: bool = False, context: Context | None = None) -> dict[str, Any]:
    """Train ``config`` (resuming from ``config.out``'s checkpoint when ``resume``); returns the
    last epoch's record. Everything is checked before the first step: the run directory, the
    checkpoint, the data (a validation pass over the metadata), the model. A multi-stage
    method (`spn.methods.Method.fit`) runs one such training per stage."""
    context = context or Context()

    def train(stage_config: RunConfig, stage_resume: bool) -> dict[str, Any]:
        return _train(stage_config, stage_resume, context)

    return config.training_method().fit(config, resume, train, context.device)


def _train(config: RunConfig, resume: bool, context: Context) -> dict[str, Any]:
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    state: dict[str, Any] | None = None
    if context.is_main:  # a run killed while writing a file leaves its temporary beside it
        remove_stale_temporaries(out)
    if resume:
        state = load_checkpoint(checkpoint_path)
        _check_same_run(config, state, checkpoint_path)
    elif checkpoint_path.exists():
        raise ConfigError(
            f"{out} already holds a run ({checkpoint_path}); pass --resume to continue it, or choose another --out"
        )
    if config.batch_size % context.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the {context.world_size} processes")

    if config.dataset == "digits" and config.data is None and context.is_main:
        from spn.data.digits import write_benchmark

        write_benchmark(config.data_root(), seed=config.digits_seed)
    context.barrier()
    dataset = build_dataset(config, config.training_split(), train=True)
    num_classes = int(dataset.num_classes)
    if config.num_classes is not None and config.num_classes != num_classes:
        raise ConfigError(f"the data has {num_classes} classes, the run was made for {config.num_classes}")
    config = dataclasses.replace(config, num_classes=num_classes)

    torch.manual_seed(config.seed)
    model = build_model(config, num_classes).to(context.device)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=0.1)
    start_epoch = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{checkpoint_path}: does not fit --model {config.model}: {error}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
    if context.is_main:
        write_json(out / "config.json", config.to_dict())
    network: torch.nn.Module = model
    if context.distributed:
        network = torch.nn.parallel.DistributedDataParallel(model)

    method = config.training_method()
    items = SeededItems(dataset, config.seed)
    per_process = config.batch_size // context.world_size
    sampler: Any = method.sampler(
        list(dataset.labels), seed=config.seed, num_replicas=context.world_size, rank=context.rank,
        batch_size=per_process,
    )  # fmt: skip
    if sampler is None:
        sampler = DistributedSampler(
            items, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed, drop_last=True
        )
    if len(sampler) < per_process:
        raise ConfigError(f"the training split has {len(items)} images, fewer than one batch of {config.batch_size}")
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        items.epoch = epoch
        torch.manual_seed(mix(config.seed, epoch, -1))  # dropout and anything else drawn in the step
        loader = DataLoader(
            items,
            batch_size=per_process,
            sampler=sampler,
            num_workers=config.workers,
            collate_fn=_collate(),
            drop_last=True,
        )
        totals = train_epoch(network, loader, optimizer, method, config, context, epoch)
        scheduler.step()
        names = sorted(totals)
        flat = torch.stack([totals[name] for name in names])
        if context.distributed:
            torch.distributed.all_reduce(flat)
        sums = dict(zip(names, flat.tolist(), strict=True))
        seen = sums.pop("images")
        record = {
            "epoch": epoch + 1,
            "loss": sums.pop("loss") / max(seen, 1),
            "train_acc": sums.pop("correct") / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "images": int(seen),
        }
        record.update({f"loss_{name}": value / max(seen, 1) for name, value in sums.items()})
        if context.is_main:
            save_checkpoint(
                checkpoint_path,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": json_config(config),
                },
            )
            append_jsonl(out / "metrics.jsonl", record, keep=_EarlierEpochs(epoch))
            if not _interactive():
                print(
                    f"epoch {epoch + 1}/{config.epochs}  loss {record['loss']:.4f}  acc {record['train_acc']:.3f}  "
                    f"{record['seconds']:.1f} s",
                    flush=True,
                )
        context.barrier()
    return record


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    method: Any,
    config: RunConfig,
    context: Context,
    epoch: int,
) -> dict[str, torch.Tensor]:
    """One pass over ``loader``; returns this process's sums over its images: ``loss``,
    ``correct``, ``images`` and each named part of the method's loss (float64 scalars)."""
    model.train()
    zero = torch.zeros((), dtype=torch.float64)
    totals: dict[str, torch.Tensor] = {"loss": zero.clone(), "correct": zero.clone(), "images": zero.clone()}
    progress = _progress(loader, context, f"epoch {epoch + 1}/{config.epochs}")
    step = Step(epoch, config.epochs)
    for batch in progress:
        images = batch["image"].to(context.device, non_blocking=True)
        with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, logits, parts = method.loss(model, images, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count = len(images)
        correct = 0
        if "labels" not in batch:
            correct = int((logits.detach().argmax(1).cpu() == batch["label"]).sum())
        totals["loss"] += float(loss.detach()) * count
        totals["correct"] += correct
        totals["images"] += count
        for name, value in parts.items():
            totals.setdefault(name, zero.clone())
            totals[name] += float(value) * count
        if hasattr(progress, "set_postfix"):
            seen = float(totals["images"])
            loss_text, acc_text = f"{float(totals['loss']) / seen:.4f}", f"{float(totals['correct']) / seen:.3f}"
            progress.set_postfix(loss=loss_text, acc=acc_text)
    return totals


class SeededItems(Dataset):
    """Items whose random draws (crops, flips) are seeded by ``(seed, epoch, index)``.

    So a sample's augmentation does not depend on which worker or process loads it, nor on
    what was drawn before: one process and N processes, or a run and its resumed copy, see
    the same augmented images. Torch's global generator is restored after each item.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(self.seed, self.epoch, index))
            return self.dataset[index]


class _EarlierEpochs:
    """Keeps the metrics.jsonl lines of epochs before ``epoch`` (later ones are from a killed run
    that the resumed one redoes)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, line: dict[str, Any]) -> bool:
        return int(line.get("epoch", 0)) <= self.epoch


def mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def json_config(config: RunConfig) -> str:
    import json

    return json.dumps(config.to_dict(), sort_keys=True)


def _check_same_run(config: RunConfig, state: dict[str, Any], path: Path) -> None:
    import json

    saved = json.loads(state.get("config", "{}"))
    mine = json.loads(json_config(config))  # both through JSON: tuples become lists on both sides
    # what may change between a run and its resumption: how long, how fast, where the data is
    free = {"epochs", "workers", "data", "metadata", "mask_root", "erased", "num_classes", "out"}
    differing = sorted(key for key in set(saved) | set(mine) if key not in free and saved.get(key) != mine.get(key))
    if (saved.get("erased") is None) != (mine.get("erased") is None):  # its folder may move, not come or go
        differing.append("erased")
    if differing:
        details = ", ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {mine.get(key)!r} now" for key in differing)
        raise CheckpointError(f"{path}: the checkpoint is of another run ({details})")
    if int(state.get("epoch", 0)) > config.epochs:
        raise CheckpointError(f"{path}: already trained {state['epoch']} epochs, more than --epochs {config.epochs}")


def _optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    head = [parameter for name, parameter in model.named_parameters() if name.startswith("head.")]
    backbone = [parameter for name, parameter in model.named_parameters() if not name.startswith("head.")]
    groups = [
        {"params": backbone, "lr": config.lr},
        {"params": head, "lr": config.lr * config.classifier_ratio()},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _collate() -> Any:
    from spn.data import collate

    return collate


def _interactive() -> bool:
    return sys.stderr.isatty()


def _progress(loader: Iterable[Any], context: Context, description: str) -> Any:
    if context.is_main and _interactive():
        from tqdm import tqdm

        return tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    return loader


