"""`python -m spn demo`: Soft Proposal on the pixels of one image.

With raw colour as the features, SP is a graph-based saliency: a location weighs the
colour differences to its surroundings, and the random walk gathers confidence where an
image region differs from the rest. The demo prints how the closed-form stationary state
agrees with SciPy's eigenvector and how fast the paper's iteration converges to it, then
writes a PNG: the image, the proposal map in its own panel with a colour bar, and the map
over a grey copy of the image. It needs matplotlib and Pillow: pip install 'spn-wsol[pictures]'.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CMAP",
    "builtin_image",
    "figure",
    "grey",
    "load_image",
    "main",
    "map_over_image",
    "pixel_features",
    "save_figure",
]

CMAP = "inferno"  # perceptually uniform and monotone in lightness: brighter always means more


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
        return np.array(picture)  # a writable copy (torch.from_numpy wants one)


def grey(image: np.ndarray) -> np.ndarray:
    """Luma of an RGB ``uint8`` image (ITU-R BT.601 weights), as ``uint8`` ``(H, W)``."""
    return np.round(image[..., :3] @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)


def map_over_image(image: np.ndarray, proposal: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``proposal`` (any size) in :data:`CMAP` over a grey copy of ``image``: the image's own
    colours cannot be mistaken for the map's, and the brighter a pixel, the higher ``M`` there.
    The map is min-max scaled (see :func:`spn.viz.overlay`). Returns ``uint8`` ``(H, W, 3)``."""
    from spn import viz

    return viz.overlay(grey(image), proposal, cmap=CMAP, alpha=alpha)


def pixel_features(image: np.ndarray, cell: int) -> torch.Tensor:
    """Mean colour of each cell x cell block: (1, 3, H / cell, W / cell) float64 in [0, 1]."""
    h, w = (image.shape[0] // cell) * cell, (image.shape[1] // cell) * cell
    pixels = torch.from_numpy(image[:h, :w]).permute(2, 0, 1)[None].double() / 255.0
    return torch.nn.functional.avg_pool2d(pixels, cell)


def figure(image: np.ndarray, proposal: np.ndarray, cell: int, title: str = "Soft Proposal") -> Figure:
    """The demo's picture: the image; the proposal map ``M`` in its own panel; ``M`` over a grey
    copy of the image; one colour bar for both maps, beside the overlay, in units of the uniform
    map ``1 / (H W)``.

    ``image`` is ``uint8`` ``(cell h, cell w, 3)``, ``proposal`` the ``(h, w)`` map. Needs
    matplotlib and Pillow.
    """
    from spn import viz

    viz._require_pictures("the demo's picture")
    from matplotlib.figure import Figure

    h, w = proposal.shape
    relative = proposal * (h * w)  # 1 = the uniform map, > 1 = more than its share
    low, high = float(relative.min()), float(relative.max())
    blended = map_over_image(image, relative)  # min-max scaled: the colour bar's [low, high] fits it too

    picture = Figure(figsize=(11.5, 3.9), layout="constrained")
    panels = picture.subplots(1, 3)
    extent = (-0.5, w * cell - 0.5, h * cell - 0.5, -0.5)  # the map's cells tile the image
    panels[0].imshow(image)
    panels[0].set_title("image")
    shown = panels[1].imshow(relative, cmap=CMAP, vmin=low, vmax=high, extent=extent, interpolation="nearest")
    panels[1].set_title(f"proposal map M ({h} x {w} cells)")
    panels[2].imshow(blended)
    panels[2].set_title("M over the image (grey)")
    for panel in panels:
        panel.set_xticks([])
        panel.set_yticks([])
    bar = picture.colorbar(shown, ax=panels[1:], shrink=0.9)
    bar.set_label("M x HW  (1 = uniform; brighter = more salient)")
    picture.suptitle(title)
    return picture


def save_figure(
    out: str | Path, image: np.ndarray, proposal: np.ndarray, cell: int, title: str = "Soft Proposal"
) -> Path:
    """Write :func:`figure` as a PNG: beside ``out`` under a temporary name, then renamed into
    place, so ``out`` never holds a half-written picture."""
    from spn import viz

    picture = figure(image, proposal, cell, title)
    return viz._write_atomically(out, lambda temporary: picture.savefig(temporary, format="png", dpi=100))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spn demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--image", help="an image file (default: a built-in picture)")
    parser.add_argument("--out", default="out/demo.png", help="where to write the PNG")
    parser.add_argument("--size", type=int, default=160, help="long side of the image in pixels")
    parser.add_argument("--cell", type=int, default=4, help="pixels per feature-map cell")
    parser.add_argument("--epsilon", type=float, default=None, help="kernel width in cells (default 0.15 sqrt(HW))")
    args = parser.parse_args(argv)

    import spn
    from spn import reference, viz

    try:  # say what is missing before any work, not after it
        viz._require_pictures("python -m spn demo")
    except ModuleNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

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

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"Soft Proposal of {Path(args.image).name if args.image else 'the built-in image'}"
    save_figure(out, image[: h * args.cell, : w * args.cell], proposal[0].numpy(), args.cell, title)
    print(f"wrote {out} (the image; the proposal map M with its colour bar; M over the image in grey)")
    return 0
