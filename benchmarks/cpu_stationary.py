"""CPU time and peak memory of the torch path's stationary mode on a large batch.

Issue target: (B, K, H, W) = (16, 512, 64, 64) float32 runs on a 2-core, 24 GiB machine in
well under a minute and about 2 GiB of peak memory, without a (B, n, n, K) tensor.

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss)
belongs to that case alone; "extra" is the peak minus the resident size just before the
call (torch, the input and the gradient buffer already allocated). Times are medians.

    python benchmarks/cpu_stationary.py [--shape 16 512 64 64] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spn._io import unused_path, write_atomic  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
import spn
b, k, h, w = {shape}
torch.manual_seed(0)
features = torch.randn(b, k, h, w).relu()       # ReLU features: many identical zero vectors
grad = torch.randn(b, k, h, w) if {backward} else None
if grad is not None:
    features.requires_grad_()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
start = time.perf_counter()
coupled, proposal = spn.soft_proposal(features, detach={detach}, backend="torch")
if grad is not None:
    coupled.backward(grad)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "peak_bytes": peak, "extra_bytes": peak - before}}))
"""


def run_case(shape, backward: bool, detach: bool, repeats: int) -> dict:
    root = str(ROOT)
    runs = []
    for _ in range(repeats):
        code = CHILD.format(root=root, shape=tuple(shape), backward=backward, detach=detach)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "pass": "forward+backward" if backward else "forward",
        "detach": detach,
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "seconds_all": [round(r["seconds"], 3) for r in runs],
        "peak_extra_bytes_max": max(r["extra_bytes"] for r in runs),
        "peak_rss_bytes_max": max(r["peak_bytes"] for r in runs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 512, 64, 64], metavar=("B", "K", "H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=None, help="JSON record (default benchmarks/results/cpu_stationary_<date>.json)"
    )
    args = parser.parse_args(argv)
    import torch

    cases = []
    for backward, detach in ((False, True), (True, True), (True, False)):
        case = run_case(args.shape, backward, detach, args.repeats)
        cases.append(case)
        print(
            f"{case['pass']:17s} detach={detach!s:5s}  median {case['seconds_median']:7.2f} s  "
            f"peak extra {case['peak_extra_bytes_max'] / 2**30:5.2f} GiB  "
            f"(peak RSS {case['peak_rss_bytes_max'] / 2**30:5.2f} GiB)"
        )
    record = {
        "benchmark": "cpu_stationary",
        "shape": args.shape,
        "dtype": "float32",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "repeats": args.repeats,
        "cases": cases,
    }
    # by default a new file: a second run the same day does not replace the first's record
    out = (
        Path(args.out)
        if args.out
        else unused_path(Path(__file__).parent / "results" / f"cpu_stationary_{record['date']}.json")
    )
    data = (json.dumps(record, indent=2) + "\n").encode()
    write_atomic(out, lambda file: file.write(data))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
