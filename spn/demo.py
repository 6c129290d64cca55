"""`python -m spn demo`: Soft Proposal on the pixels of one image.

With raw colour as the features, SP is a graph-based saliency: a location weighs the
colour differences to its surroundings, and the random walk gathers confidence where an
image region differs from the rest. The demo prints how the closed-form stationary state
agrees with SciPy's eigenvector and how fast the paper's iteration converges to it, then
writes the proposal map over the image as a PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def builtin_image(size: int = 160) -> np.ndarray:
    """A deterministic test picture: a red disc and a blue square on a textured green field."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.25 + 0.1 * y, 0.45 + 0.1 * x, 0.2 + 0.05 * x * y], axis=-1)
    image += rng.normal(0.0, 0.04, image.shape)
    disc = (x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.15**2
    image[disc] = [0.85, 0.15, 0.1]
    square = (np.abs(x - 0.72) < 0.09) & (np.abs(y - 0.7) < 0.09)
    image[square] = [0.15, 0.2, 0.8]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def load_image(path: str | None, size: int) -> np.ndarray:
    if path is None:
        return builtin_image(size)
    from PIL import Image

    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        return np.asarray(picture)


def pixel_features(image: np.ndarray, cell: int) -> torch.Tensor:
    """Mean colour of each cell x cell block: (1, 3, H / cell, W / cell) float64 in [0, 1]."""
    h, w = (image.shape[0] // cell) * cell, (image.shape[1] // cell) * cell
    pixels = torch.from_numpy(image[:h, :w]).permute(2, 0, 1)[None].double() / 255.0
    return torch.nn.functional.avg_pool2d(pixels, cell)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image file (default: a built-in picture)")
    parser.add_argument("--out", default="out/demo.png", help="where to write the overlay PNG")
    parser.add_argument("--size", type=int, default=160, help="long side of the image in pixels")
    parser.add_argument("--cell", type=int, default=4, help="pixels per feature-map cell")
    parser.add_argument("--epsilon", type=float, default=None, help="kernel width in cells (default 0.15 sqrt(HW))")
    args = parser.parse_args(argv)

    from spn import reference
    import spn
    from spn import viz

    image = load_image(args.image, args.size)
    features = pixel_features(image, args.cell)
    _, k, h, w = features.shape
    print(f"image: {args.image or 'built-in'}, {image.shape[1]} x {image.shape[0]} px; features: mean RGB of "
          f"{args.cell} x {args.cell} cells, K x H x W = {k} x {h} x {w}")

    spn.soft_proposal(features, epsilon=args.epsilon)  # warm-up: torch's first call sets up its thread pool
    start = time.perf_counter()
    _, proposal = spn.soft_proposal(features, epsilon=args.epsilon)
    closed_ms = (time.perf_counter() - start) * 1e3
    stationary = proposal[0].reshape(-1).numpy()

    start = time.perf_counter()
    transfer = reference.transfer_matrix(features[0].numpy(), args.epsilon)
    eigenvector = reference.stationary_eigs(transfer)
    eigs_ms = (time.perf_counter() - start) * 1e3
    print(f"stationary state, closed form deg / sum(deg) (spn): {closed_ms:.1f} ms; "
          f"D and its eigenvector (reference + scipy eigs): {eigs_ms:.1f} ms")
    print(f"  max |difference| = {np.abs(stationary - eigenvector).max():.2e}, while M itself is ~{1 / (h * w):.1e}")

    print("random walk M <- D M from the uniform start:")
    print("   step   ||M_t - M_t-1||_2   ||M_t - M*||_2")
    m, previous = np.full(h * w, 1.0 / (h * w)), None
    reached = None
    for step in range(1, 51):
        previous, m = m, transfer @ m
        change = np.linalg.norm(m - previous)
        if reached is None and change < 1e-4:
            reached = step
        if step in (1, 2, 3, 5, 10, 20, 50):
            print(f"   {step:4d}   {change:17.3e}   {np.linalg.norm(m - stationary):14.3e}")
    print(f"the released code's stopping rule (change < 1e-4) stops at step {reached}" if reached
          else "the walk did not reach a change below 1e-4 in 50 steps")

    picture = viz.overlay(image[: h * args.cell, : w * args.cell], proposal[0].numpy(), alpha=0.5)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_png(out, np.concatenate([image[: h * args.cell, : w * args.cell], picture], axis=1))
    print(f"wrote {out} (left: the image; right: the proposal map over it)")
    return 0
