"""The torch path against a plain `torch.cdist` implementation: time, peak memory, accuracy.

Issue 9's targets, measured in one run on this machine (it is shared and noisy: the ratios, not
the absolute times, are what count):

* stationary forward at least 1.5x faster than plain cdist at (64, 512, 14, 14) and
  (16, 512, 28, 28), 2x at (16, 512, 64, 64);
* forward + backward at most 1.2x the forward with detach=True, 2.5x with detach=False (beside
  it, the floor: the forward plus the one product C V that any exact gradient needs, alone);
* SP at most 5% of a `small_sp` training step on 64 x 64 images (small_cam for comparison);
* extra memory O(B n K + one block) in the stationary mode; the k-step mode refuses a D over
  spn.graph.TRANSFER_BYTES.

What is timed, per case (B, K, H, W), float32 features torch.randn(...).relu() (seed 0):

* ``spn``: spn.soft_proposal(u, backend="torch"), the exact stationary state;
* ``plain-cdist``: the same formula as a user would write it: torch.cdist, the paper's Gaussian
  kernel (made once, outside the timing, as a module buffer would be), degrees, M = deg / sum,
  V = U * M; M under torch.no_grad for detach=True, autograd through everything for detach=False.

Passes: forward (no gradient), forward + backward of V with detach=True, and with detach=False;
and ``floor``: spn's forward followed by `product_floor`, the product C V (n^2 K multiply-adds)
that the exact gradient cannot avoid, by itself, with a dense C: what forward + backward would
cost if the backward were that product and nothing else.
Every timing is the median over interleaved rounds (each round times every implementation and
pass once, in the same order), after a warm-up; ratios are ratios of those medians. Beside them,
the quartiles of the same ratios taken round by round: their spread is this machine's noise.

Before anything is timed each implementation's M is compared with the float64 NumPy reference
(spn.reference) on the first images, and so is a plain float32 evaluation by direct differences
(the baseline of the accuracy contract: spn's error at most 2x its error plus 1e-6). A case whose
spn result breaks the contract stops the run; nothing is written.

Peak memory: each (implementation, pass) runs once more in a fresh subprocess, which resets its
peak resident size (writing 5 to /proc/self/clear_refs, Linux) after a warm-up on a tiny input,
then reports the peak (VmHWM) minus the resident size just before the call.

    python benchmarks/torch_path.py [--cases 14 28 64 train kstep] [--rounds 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spn  # noqa: E402
from spn import reference as R  # noqa: E402
from spn._io import unused_path, write_atomic  # noqa: E402

SHAPES = {"14": (64, 512, 14, 14), "28": (16, 512, 28, 28), "64": (16, 512, 64, 64)}
CHECKED_IMAGES = {"14": 4, "28": 2, "64": 1}


# ---------------------------------------------------------------------------------------
# the plain implementation


def paper_kernel(height: int, width: int, epsilon: float) -> torch.Tensor:
    """exp(-|p_a - p_b|^2 / (2 eps^2)), float32 (n, n)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).float()
    return torch.exp(-torch.cdist(positions, positions).square() / (2 * epsilon**2))


def plain_cdist(u: torch.Tensor, kernel: torch.Tensor, detach: bool = True):
    """The stationary mode with torch.cdist, float32: (V, M)."""
    batch, channels, height, width = u.shape
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        x = u.reshape(batch, channels, height * width).transpose(1, 2)
        deg = (torch.cdist(x, x) * kernel).sum(-1)
        proposal = (deg / deg.sum(-1, keepdim=True)).view(batch, height, width)
    return u * proposal.unsqueeze(1), proposal


def direct_float32(u: torch.Tensor, epsilon: float, rows_per_block: int = 16) -> np.ndarray:
    """M by direct differences in float32, block by block (the accuracy contract's baseline): (B, n)."""
    batch, channels, height, width = u.shape
    n = height * width
    kernel = paper_kernel(height, width, epsilon)
    maps = []
    for image in u.float().reshape(batch, channels, n):
        deg = torch.empty(n)
        for start in range(0, n, rows_per_block):
            block = image[:, start : start + rows_per_block, None] - image[:, None, :]
            deg[start : start + rows_per_block] = (
                block.square().sum(0).sqrt() * kernel[start : start + rows_per_block]
            ).sum(-1)
        maps.append((deg / deg.sum()).double().numpy())
    return np.stack(maps)


# ---------------------------------------------------------------------------------------
# accuracy


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / expected.max())


def check(key: str, u: torch.Tensor, kernel: torch.Tensor) -> dict:
    """Errors of M against the float64 reference on the first images; raises if spn breaks its contract."""
    count = CHECKED_IMAGES[key]
    sample = u[:count]
    _, _, height, width = u.shape
    epsilon = spn.default_epsilon(height, width)
    started = time.perf_counter()
    expected = np.stack([R.stationary_state(image, epsilon) for image in sample.double().numpy()])
    reference_seconds = time.perf_counter() - started
    with torch.no_grad():
        ours = spn.soft_proposal(sample, backend="torch")[1].reshape(count, -1).double().numpy()
        plain = plain_cdist(sample, kernel)[1].reshape(count, -1).double().numpy()
        ours64 = spn.soft_proposal(sample.double(), backend="torch")[1].reshape(count, -1).numpy()
    errors = {
        "spn": relative_error(ours, expected),
        "spn-float64": relative_error(ours64, expected),
        "plain-cdist": relative_error(plain, expected),
        "plain-direct-float32": relative_error(direct_float32(sample, epsilon), expected),
    }
    bound = 2 * errors["plain-direct-float32"] + 1e-6
    if not errors["spn"] <= bound or not errors["spn-float64"] <= 1e-10:
        raise SystemExit(f"case {key}: spn's M breaks its accuracy contract ({errors}); nothing written")
    return {"images_checked": count, "reference_seconds": round(reference_seconds, 1), "relative_error_of_M": errors}


def check_on_hard_data() -> dict:
    """The issue's hard inputs at (2, 512, 14, 14): a common offset of 1000, near-identical vectors."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(2, 512, 14, 14, generator=generator)
    inputs = {"offset-1000": 1000 + base, "near-identical": 1 + 1e-3 * base}
    out = {}
    kernel = paper_kernel(14, 14, spn.default_epsilon(14, 14))
    for name, u in inputs.items():
        expected = np.stack([R.stationary_state(image, spn.default_epsilon(14, 14)) for image in u.double().numpy()])
        with torch.no_grad():
            ours = spn.soft_proposal(u, backend="torch")[1].reshape(2, -1).double().numpy()
            plain = plain_cdist(u, kernel)[1].reshape(2, -1).double().numpy()
        out[name] = {
            "spn": relative_error(ours, expected),
            "plain-cdist": relative_error(plain, expected),
            "plain-direct-float32": relative_error(direct_float32(u, spn.default_epsilon(14, 14)), expected),
        }
    return out


# ---------------------------------------------------------------------------------------
# timing


def passes(u: torch.Tensor, kernel: torch.Tensor, grad: torch.Tensor) -> dict:
    """name -> a callable that runs one pass."""
    leaf = u.clone().requires_grad_()

    def backward(coupled):
        leaf.grad = None
        coupled.backward(grad)

    def ours(detach):
        return lambda: backward(spn.soft_proposal(leaf, detach=detach, backend="torch")[0])

    def plain(detach):
        return lambda: backward(plain_cdist(leaf, kernel, detach=detach)[0])

    def forward(function):
        def run():
            with torch.no_grad():
                function()

        return run

    return {
        ("spn", "forward"): forward(lambda: spn.soft_proposal(u, backend="torch")),
        ("plain-cdist", "forward"): forward(lambda: plain_cdist(u, kernel)),
        ("spn", "forward+backward detach=True"): ours(True),
        ("plain-cdist", "forward+backward detach=True"): plain(True),
        ("spn", "forward+backward detach=False"): ours(False),
        ("plain-cdist", "forward+backward detach=False"): plain(False),
    }


def product_floor(u: torch.Tensor):
    """The product that any exact gradient needs, alone: (C V)_a = sum_b C_ab v_b with C dense
    (n x n per image), n^2 K multiply-adds, as one batched GEMM per chunk of images (C random,
    made once, outside the timing). The forward's distances take half as many (the upper
    triangle of V^T V), so forward + this product bounds what forward + backward can cost."""
    batch, channels, height, width = u.shape
    n = height * width
    chunk = max(1, min(batch, (1 << 26) // (n * n)))  # C of at most 64M elements
    coefficients = torch.rand(chunk, n, n, generator=torch.Generator().manual_seed(2))
    vectors = u.reshape(batch, channels, n)

    def run():
        for start in range(0, batch, chunk):
            part = vectors[start : start + chunk]
            torch.bmm(part, coefficients[: part.shape[0]])

    return run


def interleaved(functions: dict, rounds: int) -> dict:
    for function in functions.values():
        function()  # warm-up
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {
        name: {"median": statistics.median(values), "all": [round(v, 4) for v in values]}
        for name, values in times.items()
    }


# ---------------------------------------------------------------------------------------
# memory, in fresh subprocesses

CHILD = r"""
import json, re, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import torch_path as B
torch.manual_seed(0)
u = torch.randn(*{shape}).relu()
kernel = B.paper_kernel({shape}[2], {shape}[3], B.spn.default_epsilon({shape}[2], {shape}[3]))
grad = torch.randn(*{shape})
run = B.passes(u, kernel, grad)[({implementation!r}, {pass_!r})]
# Load the libraries and lazy state (MKL, the custom operators' first call) on a tiny input first.
small = torch.randn({shape}[0], {shape}[1], 4, 4).relu()
B.passes(small, B.paper_kernel(4, 4, 0.6), torch.randn_like(small))[({implementation!r}, {pass_!r})]()
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
run()
print(json.dumps({{"extra_bytes": status("VmHWM") - before, "input_bytes": u.numel() * 4}}))
"""


def peak_memory(shape, implementation: str, pass_: str) -> dict:
    code = CHILD.format(
        root=str(ROOT), bench=str(Path(__file__).parent), shape=tuple(shape), implementation=implementation, pass_=pass_
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# cases


def stationary_case(key: str, rounds: int, memory: bool) -> dict:
    shape = SHAPES[key]
    torch.manual_seed(0)
    u = torch.randn(*shape).relu()
    kernel = paper_kernel(shape[2], shape[3], spn.default_epsilon(shape[2], shape[3]))
    grad = torch.randn(*shape)
    record = {"shape": list(shape), "check": check(key, u, kernel)}
    functions = passes(u, kernel, grad)
    spn_forward, product = functions[("spn", "forward")], product_floor(u)

    def floor():
        spn_forward()
        product()

    functions[("floor", "spn forward + the product C V alone")] = floor
    timed = interleaved(functions, rounds)
    median = {name: value["median"] for name, value in timed.items()}
    forward = median[("spn", "forward")]
    record["seconds"] = {f"{impl} | {pass_}": value for (impl, pass_), value in timed.items()}
    record["ratios"] = {
        "plain-cdist forward / spn forward": median[("plain-cdist", "forward")] / forward,
        "spn fwd+bwd detach=True / spn forward": median[("spn", "forward+backward detach=True")] / forward,
        "spn fwd+bwd detach=False / spn forward": median[("spn", "forward+backward detach=False")] / forward,
        "floor: (spn forward + C V alone) / spn forward": median[("floor", "spn forward + the product C V alone")]
        / forward,
        "plain-cdist fwd+bwd detach=True / spn fwd+bwd detach=True": median[
            ("plain-cdist", "forward+backward detach=True")
        ]
        / median[("spn", "forward+backward detach=True")],
        "plain-cdist fwd+bwd detach=False / spn fwd+bwd detach=False": median[
            ("plain-cdist", "forward+backward detach=False")
        ]
        / median[("spn", "forward+backward detach=False")],
    }
    # The spread: each ratio taken within each round (both passes timed moments apart), quartiles
    # over the rounds. On a shared machine a ratio's median moves between runs by about as much.
    per_round = {name: value["all"] for name, value in timed.items()}
    record["per_round_ratio_quartiles"] = {
        name: [round(q, 3) for q in statistics.quantiles([a / b for a, b in zip(*pair, strict=True)], n=4)]
        for name, pair in {
            "plain-cdist forward / spn forward": (per_round[("plain-cdist", "forward")], per_round[("spn", "forward")]),
            "spn fwd+bwd detach=True / spn forward": (
                per_round[("spn", "forward+backward detach=True")],
                per_round[("spn", "forward")],
            ),
            "spn fwd+bwd detach=False / spn forward": (
                per_round[("spn", "forward+backward detach=False")],
                per_round[("spn", "forward")],
            ),
        }.items()
    }
    if memory:
        record["peak_extra_bytes"] = {
            f"{impl} | {pass_}": peak_memory(shape, impl, pass_) for impl, pass_ in timed if impl != "floor"
        }
    return record


def training_case(rounds: int, batch: int = 64, size: int = 64) -> dict:
    """small_sp and small_cam training steps on size x size images, and SP alone at their U's shape."""
    from spn.models import small_cam, small_sp

    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    steps = {}
    for name, constructor in (("small_sp", small_sp), ("small_cam", small_cam)):
        model = constructor(10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

        steps[name] = step
    probe = small_sp(10)
    with torch.no_grad():
        units = probe.head.conv(probe.backbone(images))
    leaf = units.clone().requires_grad_()
    grad = torch.randn_like(units)

    def sp_alone():
        leaf.grad = None
        spn.soft_proposal(leaf)[0].backward(grad)

    steps["SoftProposal fwd+bwd at U's shape"] = sp_alone
    timed = interleaved(steps, rounds)
    median = {name: value["median"] for name, value in timed.items()}
    return {
        "images": [batch, 3, size, size],
        "U": list(units.shape),
        "seconds": timed,
        "SP share of a small_sp step": median["SoftProposal fwd+bwd at U's shape"] / median["small_sp"],
        "small_sp step / small_cam step": median["small_sp"] / median["small_cam"],
    }


def k_step_case(rounds: int, memory: bool) -> dict:
    """spn.RELEASED (20 steps, tolerance 1e-4) at (16, 512, 28, 28), and the budget's refusal at (20, 512, 64, 64)
    float64 (D would take 2.5 GiB)."""
    shape = (16, 512, 28, 28)
    torch.manual_seed(0)
    u = torch.randn(*shape).relu()

    def released():
        with torch.no_grad():
            spn.soft_proposal(u, backend="torch", **spn.RELEASED)

    def stationary():
        with torch.no_grad():
            spn.soft_proposal(u, backend="torch")

    timed = interleaved({"released": released, "stationary": stationary}, rounds)
    record = {"shape": list(shape), "seconds": timed}
    big = torch.zeros(20, 512, 64, 64, dtype=torch.float64)
    try:
        spn.soft_proposal(big, **spn.RELEASED)
        record["refusal at (20, 512, 64, 64) float64"] = "not refused"
    except RuntimeError as error:
        record["refusal at (20, 512, 64, 64) float64"] = str(error)
    return record


def _commit() -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it; None outside git."""

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if changed else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["14", "28", "64", "train", "kstep"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    record = {
        "benchmark": "torch_path",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": _commit(),
        "rounds": args.rounds,
        "load_average_at_start": list(__import__("os").getloadavg()),
        # glibc's allocator settings, if any: with the defaults, large tensors are fresh mmaps whose
        # pages the kernel zeroes on first touch (see docs/soft_proposal.md section 6)
        "malloc_environment": {k: v for k, v in __import__("os").environ.items() if k.startswith("MALLOC_")},
        "hard_inputs_relative_error_of_M": check_on_hard_data(),
        "cases": {},
    }
    print(json.dumps(record["hard_inputs_relative_error_of_M"], indent=1))
    # by default a new file: a second run the same day does not replace the first's record
    out = (
        Path(args.out)
        if args.out
        else unused_path(Path(__file__).parent / "results" / f"torch_path_{record['date']}.json")
    )
    for key in args.cases:
        if key in SHAPES:
            # (16, 512, 64, 64) takes ~30 s a round on 2 cores: a third of the rounds there.
            rounds = args.rounds if key != "64" else max(3, args.rounds // 3)
            result = stationary_case(key, rounds, not args.no_memory)
        elif key == "train":
            result = training_case(args.rounds)
        elif key == "kstep":
            result = k_step_case(max(3, args.rounds // 3), not args.no_memory)
        else:
            raise SystemExit(f"unknown case {key}")
        record["cases"][key] = result
        print(key, json.dumps({k: v for k, v in result.items() if k not in ("seconds",)}, indent=1, default=str))
        for name, value in result.get("seconds", {}).items():
            print(f"  {name}: {value['median']:.4f} s")
    record["load_average_at_end"] = list(__import__("os").getloadavg())
    data = (json.dumps(record, indent=1, default=str) + "\n").encode()
    write_atomic(out, lambda file: file.write(data))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
