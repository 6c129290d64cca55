"""`python -m spn COMMAND`: demo, bench."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("spn.demo", "the proposal map of an image, its eigs check and the walk's convergence"),
    "bench": ("spn.bench", "time the backends (forward, forward+backward), write a JSON record"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m spn COMMAND [options]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:8s} {summary}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
