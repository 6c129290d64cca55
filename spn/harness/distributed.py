"""Data-parallel runs under ``torchrun`` with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

``torchrun --nproc-per-node N -m spn train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` starts the process group from them (a plain ``python -m spn``
run is a world of one). Training shards each epoch's permutation with ``DistributedSampler``
and full batches only, so N processes with batch ``B / N`` each take the same steps as one
process with batch ``B`` (DDP averages the gradients). Evaluation shards without padding
(:func:`shard`) and merges the metrics with ``Metric.sync``, so no sample counts twice. Only
rank 0 writes files.

A process that started a process group ends with :func:`end_process` (the ``spn`` script and
``python -m spn`` do): with torch 2.13, gloo's worker threads outlive ``destroy_process_group``
once a ``DistributedDataParallel`` wrapper was built, and a worker that drops the last
reference to a finished collective's tensor while the interpreter shuts down cannot take the
GIL and aborts the whole process (``terminate called without an active exception``: about 1
two-process run in 100 on a loaded machine, after every file was written; torchrun then
reports the run as failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["Context", "end_process", "setup", "shard", "teardown"]

# Whether setup started a process group in this process (see end_process).
_started = False


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(device: str | None = None) -> Context:
    """The process's place in the run, starting the process group under ``torchrun``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun each
            process takes GPU ``LOCAL_RANK``.
    """
    global _started
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        _started = True
    return Context(rank=rank, world_size=world_size, device=target)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> int:
    """End the process with ``code`` if :func:`setup` started a process group in it.

    There it flushes the logs and the standard streams and calls ``os._exit(code)``, skipping
    the interpreter's shutdown, during which PyTorch's communication threads can abort the
    process (see the module's docstring). Call it last, after :func:`teardown`: every file is
    written (atomically) by then, and nothing is left for the shutdown to do.

    Args:
        code: the process's exit status.

    Returns:
        ``code``, in a process without a process group started by :func:`setup` (elsewhere it
        does not return).
    """
    if not _started:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more can reach it
            stream.flush()
    os._exit(code)


def shard(length: int, context: Context) -> list[int]:
    """This process's indices of ``range(length)`` for evaluation: every ``world_size``-th from
    ``rank``, without the padding ``DistributedSampler`` adds, so that each sample is scored
    exactly once over all processes (shards may differ in size by one)."""
    return list(range(context.rank, length, context.world_size))
