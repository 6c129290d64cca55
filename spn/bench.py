"""`python -m spn bench`: time Soft Proposal on the GPU and write a JSON record.

Before anything is timed, every backend's first result of every case is checked against
the float64 NumPy reference (`spn.reference`, one image at a time: the first and the last
image of the batch): the proposal map and the coupled features must be within `RTOL` (1e-3)
of the reference's largest value. float32 rounding stays orders of magnitude below that;
a wrong kernel, index or stopping rule does not. On a mismatch the benchmark says which
backend, mode, case and image, writes nothing and exits with status 1. Each backend is
compared with what it computes: ``paper`` with the exact stationary state, ``released``
with the reference's 20-step walk with tolerance 1e-4, ``plain-torch`` with the 20-step
walk, ``released-reimpl`` with the walk's state one step before the reference's stop (it
discards the step below the tolerance; a change within float32 rounding of the tolerance
may move its stop by one step, so the states one step either side are accepted too).

For each case (B, K, H = W) it times, in microseconds per image (the median of repeated
runs after a warm-up, measured with CUDA events), the forward pass and the forward plus
backward pass of:

* ``cupy``: this library's CUDA kernels (backend="cupy");
* ``torch``: this library's portable path (backend="torch");
* ``plain-torch``: a power iteration as a user would write it: torch.cdist, the Gaussian
  kernel, column normalisation and 20 batched matrix-vector products, autograd for the
  gradient;
* ``released-reimpl``: a re-implementation of the algorithm of the authors' released code:
  per image, D' built location by location, columns normalised, then up to 20 steps of
  y = D M - M with ||y|| copied to the host after each step, stopping below 1e-4,
  M = (M + y) / sum; eps = 0.15 * H * W; the gradient is the paper's Eq. 6 (M constant).

Modes of the library's backends: ``paper`` (the exact stationary state, eps = 0.15 sqrt(HW))
and ``released`` (spn.RELEASED: 20 steps, tolerance 1e-4, eps = 0.15 HW), each with the
paper's gradient (detach=True) and, with the suffix ``-exact``, the exact one.

For each timing it also records the peak extra GPU memory (torch.cuda.max_memory_allocated
minus what was allocated before) and, for the library's backends, the fraction of the
roofline reached, from this FLOP and byte model (per image, n = H * W, k = steps):

* distances by direct differences: 3 K n^2 FLOP (a subtraction and a multiply-add per
  channel and pair) for the stationary forward pass and for building D; the exact
  stationary backward pass walks them twice more (6 K n^2);
* the walk: 2 n^2 FLOP and 8 n^2 bytes (D in double) per step; building D writes and
  normalises it: 24 n^2 bytes; the exact k-step backward pass: about 8 k n^2 FLOP and
  8 (k + 6) n^2 bytes;
* the coupling and the paper's gradient: K n FLOP, 3 K n elements moved.

The attainable rate is min(peak FLOP/s, intensity * peak bandwidth) with the peaks of
`PEAKS` (FP32 without tensor cores, and memory bandwidth, from the vendors' data sheets),
matched by device name; an unknown device falls back to SMs * 128 FP32 lanes * 2 * clock
and 2 * memory clock * bus width, as CuPy reports them (documented, rough).

Finally, on the GPU, the host overhead of one call at (1, 512, 14): the wall time until
the call returns with the GPU idle, the GPU time by events, and the wall time of many
calls in a row between two synchronisations, per call; the overhead is the last minus
the GPU time.

The JSON record is rewritten after every case (a temporary file in the same folder, then
os.replace, so a reader never sees half a file): an interrupted run keeps the cases it
finished, with "complete": false; the last write sets "complete": true.

Options: --quick (fewer repetitions), --out PATH, --cases B,K,S [B,K,S ...],
--backends NAME [NAME ...], --device cuda|cpu (cpu times the torch backends on the CPU
with a wall clock, on the smaller `CPU_CASES` unless --cases is given, in about three
minutes on 2 cores; there is no GPU memory to report there).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spn._io import unused_path, write_atomic

__all__ = [
    "BACKENDS",
    "CASES",
    "CPU_CASES",
    "PEAKS",
    "RTOL",
    "Mismatch",
    "main",
    "measure",
    "model",
    "peak_entry",
    "peaks",
    "plain_power_iteration",
    "released_reimplementation",
    "roofline_fraction",
    "validate",
    "write_atomically",
]

CASES = ((64, 1024, 14), (64, 512, 28), (16, 512, 56), (1, 512, 14))
# --device cpu: the same map sizes with fewer images and channels (the default CASES took
# over 20 minutes there); about three minutes on 2 cores.
CPU_CASES = ((16, 512, 14), (4, 128, 28), (1, 64, 56))
OVERHEAD_CASE = (1, 512, 14)
BACKENDS = ("cupy", "torch", "plain-torch", "released-reimpl")
RTOL = 1e-3  # largest error allowed against the reference, relative to its largest value
VALIDATED_IMAGES = 2  # the first and the last image of each case's batch

# name substring -> (FP32 TFLOP/s without tensor cores, memory TB/s); the first match wins,
# so a name that contains another comes first (GH200 before H200 before H20, A100 before
# A10, L40S before L40 before L4); a test checks that every row is reachable.
# Data-sheet numbers (boost clocks).
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 51.2, 2.0),
    ("H100 NVL", 60.0, 3.9),
    ("H100", 67.0, 3.35),  # SXM5
    ("GH200", 67.0, 4.0),
    ("H200", 67.0, 4.8),
    ("H20", 44.0, 4.0),
    ("B200", 80.0, 8.0),
    ("A100-PCIE-40GB", 19.5, 1.555),
    ("A100-SXM4-40GB", 19.5, 1.555),
    ("A100", 19.5, 2.039),  # 80 GB
    ("A10G", 31.2, 0.6),
    ("A10", 31.2, 0.6),
    ("L40S", 91.6, 0.864),
    ("L40", 90.5, 0.864),
    ("L4", 30.3, 0.3),
    ("RTX 4090", 82.6, 1.008),
    ("RTX 3090", 35.6, 0.936),
    ("V100", 15.7, 0.9),
    ("T4", 8.1, 0.32),
)


# ---------------------------------------------------------------------------------------
# what is timed


def plain_power_iteration(u: torch.Tensor, epsilon: float, steps: int = 20):
    """The power iteration as a user would write it in torch: (coupled, M)."""
    batch, channels, height, width = u.shape
    n = height * width
    x = u.reshape(batch, channels, n).transpose(1, 2)  # (B, n, K)
    distances = torch.cdist(x, x)  # (B, n, n)
    rows, cols = torch.meshgrid(
        torch.arange(height, device=u.device), torch.arange(width, device=u.device), indexing="ij"
    )
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).to(u.dtype)
    kernel = torch.exp(-torch.cdist(positions, positions).square() / (2 * epsilon**2))
    weights = distances * kernel
    transfer = weights / weights.sum(1, keepdim=True).clamp_min(1e-30)  # columns sum to 1
    m = u.new_full((batch, n, 1), 1.0 / n)
    for _ in range(steps):
        m = torch.bmm(transfer, m)
        m = m / m.sum(1, keepdim=True)
    proposal = m.view(batch, height, width)
    return u * proposal.unsqueeze(1), proposal


def released_reimplementation(u: torch.Tensor, tolerance: float = 1e-4, max_iterations: int = 20):
    """The released code's algorithm, one image at a time: (coupled, M).

    As the released code: the spatial kernel is made once; then, for each image, one pass
    computes every pair's D'_ab = ||u_a - u_b|| L_ab by direct differences (the released code
    gives each pair a CUDA thread; `torch.cdist` without the matrix-product shortcut does the
    same in one launch), the columns are normalised, and up to 20 steps of y = D M - M run,
    each copying ||y|| to the host to test it against 1e-4. eps = 0.15 * H * W.
    M is a constant for autograd (the paper's Eq. 6), as in the released code.
    """
    batch, channels, height, width = u.shape
    n = height * width
    epsilon = 0.15 * height * width
    index = torch.arange(n, device=u.device)
    ys, xs = (index // width).to(u.dtype), (index % width).to(u.dtype)
    kernel = torch.exp(-((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2) / (2 * epsilon**2))
    maps = []
    with torch.no_grad():
        for b in range(batch):
            x = u[b].reshape(channels, n).t()[None]  # (1, n, K)
            weights = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")[0] * kernel
            transfer = weights / weights.sum(0, keepdim=True)
            m = u.new_full((n,), 1.0 / n)
            for _ in range(max_iterations):
                y = transfer @ m - m
                if y.norm().item() < tolerance:  # a host synchronisation per step
                    break
                m = m + y
                m = m / m.sum()
            maps.append(m)
    proposal = torch.stack(maps).view(batch, height, width)
    return u * proposal.unsqueeze(1), proposal


def _library_call(backend: str, mode: str):
    import spn

    options = dict(spn.RELEASED) if mode.startswith("released") else dict(spn.PAPER)
    detach = not mode.endswith("-exact")

    def call(u):
        return spn.soft_proposal(u, backend=backend, detach=detach, **options)

    return call


def _plans(backends):
    """(backend, mode, call) for every timing and every validation."""
    plans = []
    for backend in backends:
        if backend in ("cupy", "torch"):
            for mode in ("paper", "paper-exact", "released", "released-exact"):
                plans.append((backend, mode, _library_call(backend, mode)))
        elif backend == "plain-torch":
            plans.append((backend, "20-step-exact", lambda u: plain_power_iteration(u, 0.15 * u.shape[2] * u.shape[3])))
        elif backend == "released-reimpl":
            plans.append((backend, "released", released_reimplementation))
    return plans


# ---------------------------------------------------------------------------------------
# models and peaks


def model(mode: str, pass_: str, channels: int, n: int, steps: int = 20) -> tuple[float, float]:
    """(FLOP, bytes) per image of the library's algorithm, as documented above."""
    coupling_flop, coupling_bytes = channels * n, 3 * 4 * channels * n
    if mode.startswith("paper"):
        flop, moved = 3 * channels * n * n + coupling_flop, coupling_bytes
        if pass_ == "forward+backward":
            if mode.endswith("-exact"):
                flop += 6 * channels * n * n
                moved += 16 * channels * n * math.ceil(n / 64)
            else:
                flop, moved = flop + coupling_flop, moved + coupling_bytes
    else:
        flop = 3 * channels * n * n + 2 * steps * n * n + coupling_flop
        moved = 24 * n * n + 8 * steps * n * n + coupling_bytes
        if pass_ == "forward+backward":
            if mode.endswith("-exact"):
                flop += 6 * channels * n * n + 8 * steps * n * n
                moved += 8 * (steps + 6) * n * n
            else:
                flop, moved = flop + coupling_flop, moved + coupling_bytes
    return float(flop), float(moved)


def peak_entry(name: str) -> tuple[str, float, float] | None:
    """The first row of `PEAKS` whose key is in the device name, or None."""
    return next((row for row in PEAKS if row[0] in name), None)


def peaks(device_index: int | None) -> dict:
    """{'flops': FP32 FLOP/s, 'bytes': bytes/s, 'source': where the numbers come from}."""
    if device_index is None:
        return {"flops": None, "bytes": None, "source": "cpu: not modelled"}
    name = torch.cuda.get_device_name(device_index)
    row = peak_entry(name)
    if row is not None:
        key, tflops, tbytes = row
        return {"flops": tflops * 1e12, "bytes": tbytes * 1e12, "source": f"table entry {key!r}"}
    try:
        import cupy

        p = cupy.cuda.runtime.getDeviceProperties(device_index)
        flops = p["multiProcessorCount"] * 128 * 2 * p["clockRate"] * 1e3
        moved = 2 * p["memoryClockRate"] * 1e3 * p["memoryBusWidth"] / 8
        source = "estimate: SMs * 128 * 2 * clock, 2 * memory clock * bus"
        return {"flops": float(flops), "bytes": float(moved), "source": source}
    except Exception:  # no CuPy, or a runtime without these properties
        return {"flops": None, "bytes": None, "source": f"unknown device {name!r}"}


def roofline_fraction(flop: float, moved: float, seconds: float, peak: dict) -> float | None:
    if not peak["flops"] or not peak["bytes"] or seconds <= 0:
        return None
    attainable = min(peak["flops"], flop / moved * peak["bytes"]) if moved > 0 else peak["flops"]
    return flop / seconds / attainable


# ---------------------------------------------------------------------------------------
# timing


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], None]) -> float:
        """Seconds of one run of fn (CUDA events on the GPU, a wall clock on the CPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def _repetitions(first: float, quick: bool) -> int:
    budget, low, high = (0.3, 2, 5) if quick else (2.0, 5, 50)
    return int(max(low, min(high, budget / max(first, 1e-6))))


def measure(fn: Callable[[], None], timer: _Timer, quick: bool) -> tuple[float, int | None, int]:
    """(median seconds, peak extra bytes or None, repetitions) of fn after a warm-up."""
    fn()  # warm-up: compilation, caches, allocator
    timer.sync()
    peak = None
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first = timer.time(fn)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        first = timer.time(fn)
    reps = _repetitions(first, quick)
    times = [first] + [timer.time(fn) for _ in range(reps - 1)]
    return statistics.median(times), peak, reps


def _run_pass(call, u: torch.Tensor, grad: torch.Tensor, pass_: str) -> Callable[[], None]:
    if pass_ == "forward":

        def forward():
            with torch.no_grad():
                call(u)

        return forward

    x = u.detach().requires_grad_(True)

    def forward_backward():
        x.grad = None
        coupled, _ = call(x)[:2]
        torch.autograd.backward(coupled, grad)

    return forward_backward


def host_overhead(call, u: torch.Tensor, timer: _Timer, calls: int) -> dict:
    """Wall time of a call with the GPU idle, GPU time of a call, wall time per call in a row."""
    with torch.no_grad():
        call(u)
        timer.sync()
        walls, gpus = [], []
        for _ in range(calls):
            timer.sync()
            begin = time.perf_counter()
            call(u)
            walls.append(time.perf_counter() - begin)
            timer.sync()
            gpus.append(timer.time(lambda: call(u)))
        timer.sync()
        begin = time.perf_counter()
        for _ in range(calls):
            call(u)
        timer.sync()
        in_a_row = (time.perf_counter() - begin) / calls
    return {
        "host_us_per_call": statistics.median(walls) * 1e6,
        "device_us_per_call": statistics.median(gpus) * 1e6,
        "wall_us_per_call_in_a_row": in_a_row * 1e6,
        "overhead_us": max(0.0, in_a_row - statistics.median(gpus)) * 1e6,
    }


# ---------------------------------------------------------------------------------------
# validation against the float64 reference


class Mismatch(Exception):
    """A backend's result differs from the reference; the message says where and by how much."""


def _validated_images(batch: int) -> list[int]:
    return sorted({0, batch - 1})[:VALIDATED_IMAGES]


def _reference_maps(image: np.ndarray) -> dict[str, list[np.ndarray]]:
    """For one (K, H, W) float64 image, the reference maps (n,) that each kind of plan may
    match: one map each, or, for the released re-implementation, the walk's states one step
    either side of the one before the reference's stop."""
    from . import reference as R

    _, height, width = image.shape
    paper = R.stationary_state(image, R.default_epsilon(height, width))
    transfer = R.transfer_matrix(image, R.released_epsilon(height, width))
    released = R.power_iteration(transfer, 20, 1e-4)
    stop = released.steps if released.converged else 21  # the step at which the walk stops
    before = [R.power_iteration(transfer, t - 1).proposal for t in (stop - 1, stop, stop + 1) if 1 <= t <= 21]
    return {
        "paper": [paper],
        "released": [released.proposal],
        "20-step": [R.power_iteration(transfer, 20).proposal],
        "released-reimpl": before,
    }


def _reference_kind(backend: str, mode: str) -> str:
    if backend == "plain-torch":
        return "20-step"
    if backend == "released-reimpl":
        return "released-reimpl"
    return "paper" if mode.startswith("paper") else "released"


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    scale = float(np.abs(expected).max())
    error = float(np.abs(got - expected).max())
    if not math.isfinite(error):
        return math.inf
    return error / scale if scale > 0 else error


def validate(plans, u: torch.Tensor, case: tuple[int, int, int]) -> None:
    """Check every plan's first result on `u` against the float64 reference, one image at a
    time (the first and the last of the batch); raise Mismatch at the first that differs."""
    images = _validated_images(u.shape[0])
    features = u.detach().double().cpu().numpy()
    references = {b: _reference_maps(features[b]) for b in images}
    for backend, mode, call in plans:
        with torch.no_grad():
            coupled, proposal = call(u)[:2]
        coupled = coupled.detach().double().cpu().numpy()
        proposal = proposal.detach().double().cpu().numpy()
        for b in images:
            expected = references[b][_reference_kind(backend, mode)]
            got = proposal[b].reshape(-1)
            errors = [_relative_error(got, m) for m in expected]
            best = int(np.argmin(errors))
            where = f"backend {backend!r}, mode {mode!r}, case B,K,S = {','.join(map(str, case))}, image {b}"
            if not errors[best] <= RTOL:
                raise Mismatch(
                    f"{where}: the proposal map differs from the float64 reference (spn.reference) by "
                    f"{errors[best]:.3g} of its largest value (allowed: {RTOL:g})"
                )
            coupled_expected = features[b] * expected[best].reshape(features.shape[2:])
            error = _relative_error(coupled[b], coupled_expected)
            if not error <= RTOL:
                raise Mismatch(
                    f"{where}: the coupled features differ from U * M of the reference by {error:.3g} "
                    f"of their largest value (allowed: {RTOL:g})"
                )


# ---------------------------------------------------------------------------------------
# the record


def write_atomically(path: Path, record: dict) -> None:
    """Write `record` as JSON to `path`: a temporary file in the same folder, then os.replace,
    so that `path` always holds a whole record (the previous one until the new one is complete)."""
    data = (json.dumps(record, indent=2) + "\n").encode()
    write_atomic(path, lambda file: file.write(data))


# ---------------------------------------------------------------------------------------
# command line


def _parse_case(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.split(r"[,x ]+", text.strip()) if p]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a case is B,K,S (batch, channels, map side), got {text!r}")
    return parts[0], parts[1], parts[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spn bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON record (default benchmarks/results/<date>_<device>.json)"
    )
    parser.add_argument("--cases", type=_parse_case, nargs="+", default=None, metavar="B,K,S", help="cases to time")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None, help="backends to time")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the torch backends on the CPU")
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status: 0, 1 when a backend's result differs from
    the reference (nothing is written), 2 when there is no GPU to time."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # ConvergenceWarning of the 20-step walks
        return _main(args)


def _inputs(case: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The features (uniform in [0, 1), float32) and the output gradient of a case, seeded by the case."""
    batch, channels, side = case
    generator = torch.Generator().manual_seed(batch * 1000003 + channels * 101 + side)
    u = torch.rand(batch, channels, side, side, generator=generator).to(device)
    grad = torch.randn(batch, channels, side, side, generator=generator).to(device)
    return u, grad


def _main(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                "spn bench: no CUDA device is visible to torch, so the GPU backends cannot be timed. "
                "Run it on a machine with a GPU, or pass --device cpu to time the torch backends on the CPU.",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
        backends = list(args.backends or BACKENDS)
        from . import cuda

        if "cupy" in backends and not cuda.is_available():
            print(
                "spn bench: CuPy is not installed, skipping backend 'cupy' (pip install 'spn-wsol[cuda12]')",
                file=sys.stderr,
            )
            backends.remove("cupy")
        peak = peaks(device.index)
        cases = args.cases or list(CASES)
    else:
        device = torch.device("cpu")
        device_name = f"cpu-{platform.processor() or platform.machine()}"
        backends = [b for b in (args.backends or BACKENDS) if b != "cupy"]
        peak = peaks(None)
        cases = args.cases or list(CPU_CASES)
    timer = _Timer(device)
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None

    plans = _plans(backends)
    for case in cases:  # every result is checked before anything is timed or written
        u, _ = _inputs(case, device)
        try:
            validate(plans, u, case)
        except Mismatch as error:
            print(f"spn bench: {error}. Nothing was written.", file=sys.stderr)
            return 1
        del u
    print(f"checked {len(plans)} backend modes on {len(cases)} cases against the float64 reference", flush=True)

    date = _dt.date.today().isoformat()
    # by default a new file: a second run the same day does not replace the first's record
    out = args.out or unused_path(Path("benchmarks") / "results" / f"{date}_{_slug(device_name)}.json")
    records: list[dict] = []
    overhead: list[dict] = []
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "cupy": cupy_version,
        "date": date,
        "python": platform.python_version(),
        "peaks": peak,
        "validated": {"reference": "spn.reference (float64)", "rtol": RTOL, "images": "first and last of each batch"},
        "complete": False,
        "cases": records,
        "host_overhead": overhead,
    }
    for batch, channels, side in cases:
        u, grad = _inputs((batch, channels, side), device)
        n = side * side
        for backend, mode, call in plans:
            for pass_ in ("forward", "forward+backward"):
                if pass_ == "forward" and backend in ("cupy", "torch") and mode.endswith("-exact"):
                    continue  # without autograd the forward pass does not depend on detach
                seconds, extra, reps = measure(_run_pass(call, u, grad, pass_), timer, args.quick)
                record = {
                    "batch": batch,
                    "channels": channels,
                    "height": side,
                    "width": side,
                    "mode": mode,
                    "pass": pass_,
                    "backend": backend,
                    "us_per_image": seconds * 1e6 / batch,
                    "peak_extra_bytes": extra,
                    "repetitions": reps,
                }
                if backend in ("cupy", "torch"):
                    flop, moved = model(mode, pass_, channels, n)
                    record["model_flop_per_image"] = flop
                    record["model_bytes_per_image"] = moved
                    record["roofline_fraction"] = roofline_fraction(flop, moved, seconds / batch, peak)
                records.append(record)
                fraction = record.get("roofline_fraction")
                print(
                    f"{batch:>4} {channels:>5} {side:>3}x{side:<3} {backend:>16} {mode:>15} {pass_:>17}: "
                    f"{record['us_per_image']:>12.1f} us/image"
                    + (f"  peak +{extra / 2**20:,.1f} MiB" if extra is not None else "")
                    + (f"  {fraction:.1%} of roofline" if fraction is not None else ""),
                    flush=True,
                )
        del u, grad
        write_atomically(out, result)  # the cases so far, "complete": false

    b, k, s = OVERHEAD_CASE
    u = torch.rand(b, k, s, s, device=device)
    for backend, mode, call in _plans([x for x in backends if x in ("cupy", "torch") and timer.cuda]):
        if mode.endswith("-exact"):
            continue
        entry = {"batch": b, "channels": k, "height": s, "width": s, "backend": backend, "mode": mode}
        entry.update(host_overhead(call, u, timer, 10 if args.quick else 100))
        overhead.append(entry)
        print(
            f"host overhead {backend:>6} {mode:>8} at {b},{k},{s}: {entry['overhead_us']:.1f} us/call "
            f"(call returns after {entry['host_us_per_call']:.1f} us, GPU {entry['device_us_per_call']:.1f} us)"
        )

    result["complete"] = True
    write_atomically(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
