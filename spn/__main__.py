"""`python -m spn COMMAND` (or the `spn` script): train, evaluate, demo, bench."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

__all__ = ["COMMANDS", "cli", "main"]

COMMANDS = {
    "train": ("spn.harness.train", "train a WSOL network (resumable; torchrun for several processes)"),
    "evaluate": ("spn.harness.evaluate", "score a trained run: wsolevaluation's protocol, pointing game, PxAP"),
    "compare": ("spn.harness.compare", "train and evaluate several variants over seeds; a mean +/- std table"),
    "demo": ("spn.demo", "the proposal map of an image, its eigs check and the walk's convergence"),
    "bench": ("spn.bench", "time the backends (forward, forward+backward), write a JSON record"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        out = sys.stdout if asked else sys.stderr  # help is output; a usage error is an error
        if argv and not asked:
            print(f"unknown command {argv[0]!r}", file=out)
        print("usage: python -m spn COMMAND [options]\n\ncommands:", file=out)
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:8s} {summary}", file=out)
        return 0 if asked else 2
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]))


def cli() -> NoReturn:
    """The `spn` script and `python -m spn`: main's status is the process's. Under torchrun the
    process ends as soon as the command returns, skipping the interpreter's shutdown, in which
    PyTorch's communication threads can abort it (spn.harness.distributed.end_process); main()
    called from Python returns, whatever the process group."""
    code = main()
    from spn.harness.distributed import end_process

    sys.exit(end_process(code))


if __name__ == "__main__":
    cli()
