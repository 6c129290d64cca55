"""The offline digits benchmark: weakly supervised localization on real handwriting, no download.

Every image holds one target digit (the image label, 10 classes): one of the 1,797 real 8 x 8
scans that scikit-learn ships (``sklearn.datasets.load_digits``), upscaled bilinearly to a
random size at a random place, over clutter (lower-contrast crops of scans of *other* classes,
a background gradient, pixel noise). Beside the digit, in most images of class ``c``, lies a
*co-occurring distractor*: a striped patch whose orientation and period encode ``c``. It never
overlaps the digit and is not part of the ground truth, so a classifier may lean on it the way
CNNs lean on rails for "train" and grass for "cow" (Zhu et al., ICCV 2017, Fig. 2); a class map
that lights it up localizes badly. Exact masks (the digit's upscaled ink) and boxes (the tight
box of the mask) come with every image. Train, val and test use disjoint source scans.

`generate` builds the splits in memory (NumPy arrays); `write_benchmark` writes them in
wsolevaluation's layout (PNG images, box and mask metadata), atomically. The exact rules,
the layout and the difficulty knobs are in ``docs/digits.md``.

scikit-learn (the scans) and Pillow (PNG files) come with the ``digits`` extra
(``pip install 'spn-wsol[digits]'``); both are imported inside the functions that need them,
so importing this module imports neither, and a missing one raises ``ModuleNotFoundError``
naming that extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DIGITS_EXTRA",
    "FORMAT_VERSION",
    "HIERARCHY",
    "NUM_CLASSES",
    "SPLITS",
    "BenchmarkPaths",
    "DigitsBenchmark",
    "DigitsSplit",
    "Distractor",
    "Fragment",
    "ImageSpec",
    "content_hash",
    "distractor_pattern",
    "generate",
    "linear_probes",
    "load_scans",
    "partition_scans",
    "render",
    "tight_box",
    "upscale",
    "write_benchmark",
]

DIGITS_EXTRA = "pip install 'spn-wsol[digits]'"
FORMAT_VERSION = 1
"""Bumped whenever a generation rule or the layout changes: a directory written under another
version is not reused (`write_benchmark` raises instead)."""
SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
SCAN_SIZE = 8

HIERARCHY: tuple[tuple[int, int, int], ...] = (
    (0, 0, 1),
    (1, 1, 0),
    (2, 0, 0),
    (3, 1, 0),
    (4, 0, 1),
    (5, 1, 0),
    (6, 0, 1),
    (7, 1, 0),
    (8, 0, 2),
    (9, 1, 1),
)
"""``(digit, parity, loops)`` per class, written to ``hierarchy.txt``: parity 0 = even, 1 = odd;
loops = closed loops of the usual glyph, 0 (1 2 3 5 7), 1 (0 4 6 9) or 2 (8). Two coarse
levels above the 10 digits, for hierarchical methods such as DANet."""

_PERIODS = (3.0, 6.0)  # distractor stripe period (px) for classes 0-4 and 5-9
_ORIENTATIONS = 5  # classes c and c + 5 share the angle (c % 5) * 36 degrees


def _range(value: Any, name: str, kind: type, low: float, high: float | None = None) -> None:
    """Check that `value` is a (lo, hi) pair of `kind` with low <= lo <= hi (<= high)."""
    kinds = (int, float) if kind is float else (kind,)
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"DigitsBenchmark.{name} must be a ({kind.__name__}, {kind.__name__}) pair, got {value!r}")
    lo, hi = value
    if not (low <= lo <= hi and (high is None or hi <= high)):
        bound = f"{low} <= lo <= hi" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"DigitsBenchmark.{name} needs {bound}, got {value!r}")


@dataclass(frozen=True)
class DigitsBenchmark:
    """The generator's settings (defaults: the benchmark of issue 10; see ``docs/digits.md``).

    Sizes are in pixels, ``(lo, hi)`` pairs are inclusive ranges drawn uniformly.

    Attributes:
        image_size: images are ``image_size`` x ``image_size`` RGB.
        train_per_class, val_per_class, test_per_class: images per class and split (exact).
        scan_fractions: the share of each class's scans that goes to train, val, test.
        digit_size: height of the upscaled target scan.
        aspect: width = round(height * aspect), aspect drawn from this range.
        mask_threshold: the mask is the target's upscaled ink (in [0, 1]) >= this.
        fragments: how many clutter fragments an image gets.
        fragment_crop: side (in scan pixels) of the crop of another scan a fragment shows.
        fragment_contrast: a fragment's ink is scaled by this (the target's is 1).
        distractor_match: share of each class's images whose distractor is of that class.
        distractor_other: share with the distractor of another (uniformly drawn) class;
            the remaining ``1 - match - other`` have none.
        distractor_size: side of the square striped patch.
        distractor_gap: pixels between the digit's square and the patch.
        distractor_contrast: the patch's ink scale.
        noise_std: standard deviation of the Gaussian pixel noise (image values in [0, 1]).
    """

    image_size: int = 64
    train_per_class: int = 160
    val_per_class: int = 30
    test_per_class: int = 60
    scan_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    digit_size: tuple[int, int] = (18, 34)
    aspect: tuple[float, float] = (0.8, 1.1)
    mask_threshold: float = 0.5
    fragments: tuple[int, int] = (2, 5)
    fragment_crop: tuple[int, int] = (3, 6)
    fragment_contrast: tuple[float, float] = (0.3, 0.6)
    distractor_match: float = 0.8
    distractor_other: float = 0.1
    distractor_size: tuple[int, int] = (12, 18)
    distractor_gap: tuple[int, int] = (1, 4)
    distractor_contrast: tuple[float, float] = (0.6, 1.0)
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # (1, 1) for a float pair is (1.0, 1.0): one JSON form
            value = getattr(self, field.name)
            float_pair = isinstance(field.default, tuple) and isinstance(field.default[0], float)
            if (
                float_pair
                and isinstance(value, tuple)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                object.__setattr__(self, field.name, tuple(float(v) for v in value))
        for name in ("image_size", "train_per_class", "val_per_class", "test_per_class"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DigitsBenchmark.{name} must be a positive int, got {value!r}")
        fractions = self.scan_fractions
        if not (
            isinstance(fractions, tuple)
            and len(fractions) == 3
            and all(isinstance(f, (int, float)) and f > 0 for f in fractions)
            and math.isclose(sum(fractions), 1.0)
        ):
            raise ValueError(
                f"DigitsBenchmark.scan_fractions must be 3 positive numbers summing to 1, got {fractions!r}"
            )
        _range(self.digit_size, "digit_size", int, 2)
        _range(self.aspect, "aspect", float, 0.1)
        _range(self.fragments, "fragments", int, 0)
        _range(self.fragment_crop, "fragment_crop", int, 1, SCAN_SIZE)
        _range(self.fragment_contrast, "fragment_contrast", float, 0.0, 1.0)
        _range(self.distractor_size, "distractor_size", int, 1)
        _range(self.distractor_gap, "distractor_gap", int, 1)
        _range(self.distractor_contrast, "distractor_contrast", float, 0.0, 1.0)
        for name in ("mask_threshold", "distractor_match", "distractor_other", "noise_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"DigitsBenchmark.{name} must be a number in [0, 1], got {value!r}")
        if self.mask_threshold <= 0:
            raise ValueError(f"DigitsBenchmark.mask_threshold must be > 0, got {self.mask_threshold!r}")
        if self.distractor_match + self.distractor_other > 1:
            raise ValueError(
                "DigitsBenchmark.distractor_match + distractor_other must be <= 1, "
                f"got {self.distractor_match} + {self.distractor_other}"
            )
        need = self.max_digit_extent + self.distractor_gap[1] + self.distractor_size[1]
        if need > self.image_size:
            raise ValueError(
                f"DigitsBenchmark: a digit ({self.max_digit_extent} px) beside a distractor "
                f"({self.distractor_gap[1]} + {self.distractor_size[1]} px) needs {need} px, "
                f"more than image_size={self.image_size}"
            )

    @property
    def max_digit_extent(self) -> int:
        """The largest height or width a target digit can have."""
        return max(self.digit_size[1], round(self.digit_size[1] * self.aspect[1]))

    def per_class(self, split: str) -> int:
        """Images per class in `split`."""
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (pairs become lists); `from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DigitsBenchmark:
        """Rebuild a config from `to_dict`'s output (unknown keys are an error)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown DigitsBenchmark settings: {unknown}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, list):
                default = getattr(cls, name)
                kind = type(default[0]) if isinstance(default, tuple) else None
                value = tuple(float(v) if kind is float else v for v in value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class Fragment:
    """A clutter fragment: rows/cols ``crop = (row, col, height, width)`` of scan `scan`,
    upscaled into the image rectangle ``xywh = (x, y, width, height)``."""

    scan: int
    crop: tuple[int, int, int, int]
    xywh: tuple[int, int, int, int]
    contrast: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Distractor:
    """The striped patch of class `label` (see `distractor_pattern`) in the square
    ``xywh = (x, y, size, size)``."""

    label: int
    xywh: tuple[int, int, int, int]
    phase: float
    contrast: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class ImageSpec:
    """Every random choice behind one image; `render` turns it into pixels.

    The target scan `scan` is upscaled into ``xywh = (x, y, width, height)`` (its *square*,
    which contains the ground-truth box); `background` is the RGB colour at the image centre,
    `gradient` the change of brightness from the left to the right edge and from top to bottom.
    """

    label: int
    scan: int
    xywh: tuple[int, int, int, int]
    color: tuple[float, float, float]
    fragments: tuple[Fragment, ...]
    distractor: Distractor | None
    background: tuple[float, float, float]
    gradient: tuple[float, float]
    noise_seed: int


@dataclass(frozen=True, eq=False)
class DigitsSplit:
    """One generated split: ``N`` images and their ground truth, in image-id order.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        ids: image paths relative to the image root, ``<split>/<label>/<split>_<index>.png``.
        images: ``uint8 (N, S, S, 3)``.
        masks: ``bool (N, S, S)``, the target digit's pixels.
        labels: ``int64 (N,)``.
        boxes: ``int64 (N, 4)``, pixel-inclusive ``(x0, y0, x1, y1)``: the tight box of the mask.
        distractor_labels: ``int64 (N,)``, the class the distractor encodes, ``-1`` for none.
        distractor_boxes: ``int64 (N, 4)``, pixel-inclusive, ``-1`` rows for none.
        specs: the `ImageSpec` of each image.
    """

    name: str
    ids: tuple[str, ...]
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    distractor_labels: np.ndarray
    distractor_boxes: np.ndarray
    specs: tuple[ImageSpec, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scans(self) -> np.ndarray:
        """The source scan (index into ``load_digits()``) of each target digit."""
        return np.array([spec.scan for spec in self.specs], dtype=np.int64)

    @property
    def all_scans(self) -> frozenset[int]:
        """Every source scan drawn in this split: targets and clutter fragments."""
        return frozenset(s.scan for s in self.specs) | frozenset(f.scan for s in self.specs for f in s.fragments)


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where `write_benchmark` put things (all under `root`).

    ``image_root`` with ``metadata_root`` is a wsolevaluation dataset with boxes;
    ``image_root`` with ``mask_metadata_root`` and ``mask_root`` is one with masks.
    """

    root: Path
    image_root: Path
    mask_root: Path
    metadata_root: Path
    mask_metadata_root: Path
    hierarchy: Path
    manifest: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> BenchmarkPaths:
        root = Path(root)
        return cls(
            root=root,
            image_root=root / "images",
            mask_root=root / "masks",
            metadata_root=root / "metadata",
            mask_metadata_root=root / "metadata_masks",
            hierarchy=root / "hierarchy.txt",
            manifest=root / "manifest.json",
        )


@contextlib.contextmanager
def _digits_extra(what: str) -> Iterator[None]:
    """Turn a missing optional dependency into an error that names the ``digits`` extra."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{what} needs {error.name or 'a missing module'}, which comes with the digits extra: {DIGITS_EXTRA}",
            name=error.name,
        ) from error


@functools.lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8 x 8 scans: ``(float64 (1797, 8, 8) in [0, 1], int64 labels)``.

    The scans' 0..16 grey levels are divided by 16. Read-only arrays, loaded once.
    """
    with _digits_extra("the digits benchmark (scikit-learn's bundled scans)"):
        from sklearn.datasets import load_digits  # type: ignore[import-untyped,import-not-found,unused-ignore]
    bunch = load_digits()
    scans = np.asarray(bunch.images, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    scans.flags.writeable = False
    labels.flags.writeable = False
    return scans, labels


def upscale(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D array to ``(height, width)`` (half-pixel centres, edge clamped).

    Output pixel ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5``, clamped to
    ``[0, n_in - 1]``: torch's ``interpolate(mode="bilinear", align_corners=False)``.
    """
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or height < 1 or width < 1:
        raise ValueError(f"upscale needs a 2-D array and a positive size, got {array.shape} -> ({height}, {width})")

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        low = np.floor(u).astype(np.int64)
        return low, np.minimum(low + 1, n_in - 1), u - low

    r0, r1, tr = axis(height, array.shape[0])
    c0, c1, tc = axis(width, array.shape[1])
    top = array[r0][:, c0] * (1 - tc) + array[r0][:, c1] * tc
    bottom = array[r1][:, c0] * (1 - tc) + array[r1][:, c1] * tc
    return top * (1 - tr)[:, None] + bottom * tr[:, None]


def distractor_pattern(label: int, size: int, phase: float = 0.0) -> np.ndarray:
    """The striped patch of class `label`: ``float64 (size, size)`` in [0, 1].

    ``0.5 + 0.5 cos(2 pi (x cos a + y sin a) / period + phase)`` with angle
    ``a = (label % 5) * 36`` degrees and period 3 px for classes 0-4, 6 px for 5-9.
    """
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    angle = (label % _ORIENTATIONS) * math.pi / _ORIENTATIONS
    period = _PERIODS[label // _ORIENTATIONS]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return 0.5 + 0.5 * np.cos(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel-inclusive ``(x0, y0, x1, y1)`` box of a non-empty 2-D mask's true pixels."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("tight_box of an empty mask")
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _blend(canvas: np.ndarray, alpha: np.ndarray, xywh: tuple[int, int, int, int], color: tuple[float, ...]) -> None:
    """Paint `color` over `canvas` with opacity `alpha` in the rectangle `xywh`, in place."""
    x, y, w, h = xywh
    region = canvas[y : y + h, x : x + w]
    a = alpha[..., None]
    region *= 1 - a
    region += a * np.asarray(color)


def render(spec: ImageSpec, config: DigitsBenchmark, *, target: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: ``(uint8 (S, S, 3), float64 (S, S) target ink in [0, 1])``.

    Layers, back to front: background (colour plus linear gradient), fragments, distractor,
    target digit, then Gaussian noise; values are clipped to [0, 1] and rounded to 0..255.
    Before the noise every value is in [0, 1] already (background 0.1..0.3 per channel, the
    gradient at most +-0.1, ink colours 0.55..1), so the clipping acts on the noise only.
    ``target=False`` leaves the target digit out (everything else identical).
    """
    scans, _ = load_scans()
    size = config.image_size
    ramp = (np.arange(size) / (size - 1) - 0.5) if size > 1 else np.zeros(1)
    shade = spec.gradient[0] * ramp[None, :] + spec.gradient[1] * ramp[:, None]
    canvas = np.asarray(spec.background, dtype=np.float64)[None, None, :] + shade[..., None]
    for fragment in spec.fragments:
        row, col, rows, cols = fragment.crop
        crop = scans[fragment.scan, row : row + rows, col : col + cols]
        x, y, w, h = fragment.xywh
        _blend(canvas, upscale(crop, h, w) * fragment.contrast, fragment.xywh, fragment.color)
    if spec.distractor is not None:
        d = spec.distractor
        pattern = distractor_pattern(d.label, d.xywh[2], d.phase)
        _blend(canvas, pattern * d.contrast, d.xywh, d.color)
    ink = np.zeros((size, size))
    x, y, w, h = spec.xywh
    ink[y : y + h, x : x + w] = upscale(scans[spec.scan], h, w)
    if target:
        _blend(canvas, ink[y : y + h, x : x + w], spec.xywh, spec.color)
    canvas += np.random.default_rng(spec.noise_seed).normal(0.0, config.noise_std, canvas.shape)
    image = np.floor(np.clip(canvas, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return image, ink


def partition_scans(seed: int, fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)) -> dict[str, np.ndarray]:
    """Split the 1,797 scan indices into disjoint train / val / test pools, stratified by class.

    Each class's scans are shuffled (by `seed`) and cut at ``round(fraction * count)``
    (train, then val; test takes the rest). Returns sorted index arrays.
    """
    _, labels = load_scans()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(fractions[0] * len(members))
        n_val = round(fractions[1] * len(members))
        if min(n_train, n_val, len(members) - n_train - n_val) < 1:
            raise ValueError(f"scan_fractions {fractions} leave a split without scans of class {label}")
        pools["train"].append(members[:n_train])
        pools["val"].append(members[n_train : n_train + n_val])
        pools["test"].append(members[n_train + n_val :])
    return {split: np.sort(np.concatenate(parts)) for split, parts in pools.items()}


def _uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(pair[0], pair[1]))


def _integer(rng: np.random.Generator, pair: tuple[int, int]) -> int:
    return int(rng.integers(pair[0], pair[1] + 1))


def _color(rng: np.random.Generator, low: float, high: float) -> tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(low, high, 3))  # type: ignore[return-value]


def _place(
    rng: np.random.Generator, config: DigitsBenchmark, h: int, w: int, with_distractor: bool
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int] | None]:
    """The target's square and, if asked, the distractor's square beside it (never overlapping)."""
    size = config.image_size
    if not with_distractor:
        return (_integer(rng, (0, size - w)), _integer(rng, (0, size - h)), w, h), None
    d = _integer(rng, config.distractor_size)
    gap = _integer(rng, config.distractor_gap)
    side = int(rng.integers(4))  # the distractor's side of the digit: 0 left, 1 right, 2 above, 3 below
    if side < 2:
        start = _integer(rng, (0, size - (w + gap + d)))
        x, dx = (start + d + gap, start) if side == 0 else (start, start + w + gap)
        y = _integer(rng, (0, size - h))
        dy = min(max(_integer(rng, (y, y + h - 1)) - d // 2, 0), size - d)  # its rows meet the digit's
    else:
        start = _integer(rng, (0, size - (h + gap + d)))
        y, dy = (start + d + gap, start) if side == 2 else (start, start + h + gap)
        x = _integer(rng, (0, size - w))
        dx = min(max(_integer(rng, (x, x + w - 1)) - d // 2, 0), size - d)
    return (x, y, w, h), (dx, dy, d, d)


def _sample_spec(
    rng: np.random.Generator,
    config: DigitsBenchmark,
    label: int,
    scan: int,
    distractor_label: int,
    clutter: dict[int, np.ndarray],
) -> ImageSpec:
    scans, _ = load_scans()
    h = _integer(rng, config.digit_size)
    w = max(1, round(h * _uniform(rng, config.aspect)))
    xywh, square = _place(rng, config, h, w, distractor_label >= 0)
    distractor = None
    if square is not None:
        distractor = Distractor(
            label=distractor_label,
            xywh=square,
            phase=_uniform(rng, (0.0, 2 * math.pi)),
            contrast=_uniform(rng, config.distractor_contrast),
            color=_color(rng, 0.55, 1.0),
        )
    fragments = []
    for _ in range(_integer(rng, config.fragments)):
        source = int(rng.choice(clutter[label]))
        rows, cols = _integer(rng, config.fragment_crop), _integer(rng, config.fragment_crop)
        for _attempt in range(10):  # a crop with some ink: a stroke, not the empty margin
            row, col = int(rng.integers(SCAN_SIZE - rows + 1)), int(rng.integers(SCAN_SIZE - cols + 1))
            if scans[source, row : row + rows, col : col + cols].max() >= 0.5:
                break
        fh, fw = max(1, round(rows * h / SCAN_SIZE)), max(1, round(cols * w / SCAN_SIZE))
        fx = _integer(rng, (0, config.image_size - fw))
        fy = _integer(rng, (0, config.image_size - fh))
        fragments.append(
            Fragment(
                scan=source,
                crop=(row, col, rows, cols),
                xywh=(fx, fy, fw, fh),
                contrast=_uniform(rng, config.fragment_contrast),
                color=_color(rng, 0.55, 1.0),
            )
        )
    return ImageSpec(
        label=label,
        scan=scan,
        xywh=xywh,
        color=_color(rng, 0.55, 1.0),
        fragments=tuple(fragments),
        distractor=distractor,
        background=_color(rng, 0.1, 0.3),
        gradient=(_uniform(rng, (-0.1, 0.1)), _uniform(rng, (-0.1, 0.1))),
        noise_seed=int(rng.integers(2**63)),
    )


def _split_specs(config: DigitsBenchmark, seed: int, index: int, split: str, pool: np.ndarray) -> list[ImageSpec]:
    """The specs of one split, from its own random stream (so one split's size leaves the others alone)."""
    _, labels = load_scans()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1 + index]))
    n = config.per_class(split)
    n_match = round(config.distractor_match * n)
    n_other = min(round(config.distractor_other * n), n - n_match)
    clutter = {c: pool[labels[pool] != c] for c in range(NUM_CLASSES)}
    jobs: list[tuple[int, int, int]] = []  # (label, scan, distractor label)
    for label in range(NUM_CLASSES):
        members = pool[labels[pool] == label]
        rounds = -(-n // len(members))  # every scan once before any twice
        targets = np.concatenate([rng.permutation(members) for _ in range(rounds)])[:n]
        others = [c for c in range(NUM_CLASSES) if c != label]
        kinds = [label] * n_match + [int(rng.choice(others)) for _ in range(n_other)]
        kinds += [-1] * (n - len(kinds))
        kinds = [kinds[i] for i in rng.permutation(n)]
        jobs += [(label, int(scan), kind) for scan, kind in zip(targets, kinds, strict=True)]
    order = rng.permutation(len(jobs))
    specs = []
    for i in order:
        label, scan, kind = jobs[i]
        specs.append(_sample_spec(rng, config, label, scan, kind, clutter))
    return specs


def _check_seed(seed: Any) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def generate(config: DigitsBenchmark | None = None, seed: int = 0) -> dict[str, DigitsSplit]:
    """Generate the benchmark in memory: ``{"train": DigitsSplit, "val": ..., "test": ...}``.

    Deterministic: the same `config` and `seed` give identical arrays (with the same NumPy and
    scikit-learn). The scan partition depends on `seed` and ``scan_fractions`` only; each split
    has its own random stream, so changing one split's size leaves the other splits unchanged.
    """
    config = DigitsBenchmark() if config is None else config
    seed = _check_seed(seed)
    pools = partition_scans(seed, config.scan_fractions)
    size = config.image_size
    splits: dict[str, DigitsSplit] = {}
    for index, split in enumerate(SPLITS):
        specs = _split_specs(config, seed, index, split, pools[split])
        n = len(specs)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        masks = np.empty((n, size, size), dtype=bool)
        boxes = np.empty((n, 4), dtype=np.int64)
        distractor_boxes = np.full((n, 4), -1, dtype=np.int64)
        for i, spec in enumerate(specs):
            images[i], ink = render(spec, config)
            masks[i] = ink >= config.mask_threshold
            boxes[i] = tight_box(masks[i])
            if spec.distractor is not None:
                x, y, w, h = spec.distractor.xywh
                distractor_boxes[i] = (x, y, x + w - 1, y + h - 1)
        splits[split] = DigitsSplit(
            name=split,
            ids=tuple(f"{split}/{spec.label}/{split}_{i:05d}.png" for i, spec in enumerate(specs)),
            images=images,
            masks=masks,
            labels=np.array([spec.label for spec in specs], dtype=np.int64),
            boxes=boxes,
            distractor_labels=np.array(
                [-1 if spec.distractor is None else spec.distractor.label for spec in specs], dtype=np.int64
            ),
            distractor_boxes=distractor_boxes,
            specs=tuple(specs),
        )
    return splits


def content_hash(splits: Mapping[str, DigitsSplit]) -> str:
    """SHA-256 of the pixels and ground truth of every split (independent of PNG encoding)."""
    digest = hashlib.sha256()
    for name in SPLITS:
        split = splits[name]
        digest.update(name.encode() + b"\0" + "\n".join(split.ids).encode() + b"\0")
        for array in (split.images, split.masks, split.labels, split.boxes, split.distractor_labels):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def _png(array: np.ndarray) -> bytes:
    with _digits_extra("writing the digits benchmark (PNG files)"):
        from PIL import Image  # lazy: only writing needs it
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _files_hash(root: Path) -> tuple[str, int]:
    """SHA-256 over every file under `root` but manifest.json (sorted relative paths and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != "manifest.json")
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest(), len(files)


def _readme(config: DigitsBenchmark, seed: int, splits: Mapping[str, DigitsSplit]) -> str:
    counts = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    settings = "\n".join(f"  {key} = {value}" for key, value in config.to_dict().items())
    return f"""spn digits benchmark (format {FORMAT_VERSION}), seed {seed}: {counts} images, 10 classes.
Generated by spn.data.digits.write_benchmark from scikit-learn's handwritten 8x8 scans; see
docs/digits.md in the spn sources for the rules.

images/<split>/<label>/<split>_<index>.png   RGB {config.image_size}x{config.image_size}: one target digit
    (the label), clutter, and often a striped distractor patch beside the digit (not ground truth).
masks/<split>/<label>/<split>_<index>.png    grey 0/255: the target digit's pixels.
masks/<split>/ignore.png                     all black: no ignored pixels.
metadata/<split>/                            wsolevaluation metadata with boxes, image root images/:
    image_ids.txt (path), class_labels.txt (path,label), image_sizes.txt (path,width,height),
    localization.txt (path,x0,y0,x1,y1; pixel-inclusive, the tight box of the mask).
metadata_masks/<split>/                      the same with masks: localization.txt is
    path,mask,ignore with mask paths relative to masks/.
hierarchy.txt                                digit,parity,loops per line (parity 0 even / 1 odd;
    loops 0: 1 2 3 5 7, 1: 0 4 6 9, 2: 8).
manifest.json                                config, seed, counts and SHA-256 hashes.

Settings:
{settings}
"""


def _write_tree(root: Path, config: DigitsBenchmark, seed: int, splits: Mapping[str, DigitsSplit]) -> None:
    size = config.image_size
    black = _png(np.zeros((size, size), dtype=np.uint8))
    counts: dict[str, Any] = {}
    for name, split in splits.items():
        (root / "masks" / name).mkdir(parents=True)
        (root / "masks" / name / "ignore.png").write_bytes(black)
        ignore = f"{name}/ignore.png"
        boxes_lines, mask_lines = [], []
        for i, path in enumerate(split.ids):
            for base, array in (("images", split.images[i]), ("masks", split.masks[i].astype(np.uint8) * 255)):
                target = root / base / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_png(array))
            boxes_lines.append(f"{path},{','.join(str(int(v)) for v in split.boxes[i])}\n")
            mask_lines.append(f"{path},{path},{ignore}\n")
        common = {
            "image_ids.txt": "".join(f"{path}\n" for path in split.ids),
            "class_labels.txt": "".join(
                f"{path},{int(label)}\n" for path, label in zip(split.ids, split.labels, strict=True)
            ),
            "image_sizes.txt": "".join(f"{path},{size},{size}\n" for path in split.ids),
        }
        for meta, localization in (("metadata", boxes_lines), ("metadata_masks", mask_lines)):
            folder = root / meta / name
            folder.mkdir(parents=True)
            for file, text in {**common, "localization.txt": "".join(localization)}.items():
                (folder / file).write_text(text, encoding="utf-8", newline="\n")
        kinds = split.distractor_labels
        counts[name] = {
            "images": len(split),
            "per_class": np.bincount(split.labels, minlength=NUM_CLASSES).tolist(),
            "distractor_match": int((kinds == split.labels).sum()),
            "distractor_other": int(((kinds >= 0) & (kinds != split.labels)).sum()),
            "distractor_none": int((kinds < 0).sum()),
            "target_scans": len(set(split.scans.tolist())),
            "source_scans": len(split.all_scans),
        }
    (root / "hierarchy.txt").write_text("".join(f"{d},{p},{c}\n" for d, p, c in HIERARCHY), newline="\n")
    (root / "README.txt").write_text(_readme(config, seed, splits), encoding="utf-8", newline="\n")
    files_sha256, files = _files_hash(root)
    manifest = {
        "format": "spn-digits",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "config": config.to_dict(),
        "counts": counts,
        "content_sha256": content_hash(splits),
        "files_sha256": files_sha256,
        "files": files,
        "versions": _versions(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8", newline="\n")


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("numpy", "scikit-learn", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _reusable(root: Path, config: DigitsBenchmark, seed: int) -> bool:
    """True if `root` holds this exact benchmark, complete and unmodified; False if it is absent
    or an empty directory; a `ValueError` for anything else (never mix two benchmarks)."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        if any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and has no manifest.json: not a digits benchmark written by spn; "
                "choose another directory or empty it"
            )
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        written = (manifest["format"], manifest["format_version"], manifest["seed"], manifest["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path} is unreadable ({error}); delete {root} to regenerate it") from error
    wanted = ("spn-digits", FORMAT_VERSION, seed, config.to_dict())
    if written != wanted:
        differences = []
        for label, old, new in zip(("format", "format_version", "seed"), written, wanted, strict=False):
            if old != new:
                differences.append(f"{label}: {old!r} there, {new!r} asked")
        if isinstance(written[3], dict):
            for key in sorted(set(written[3]) | set(wanted[3])):
                if written[3].get(key) != wanted[3].get(key):
                    differences.append(f"{key}: {written[3].get(key)!r} there, {wanted[3].get(key)!r} asked")
        raise ValueError(
            f"{root} holds a digits benchmark generated with other settings ({'; '.join(differences)}); "
            "choose another directory or delete it"
        )
    files_sha256, _ = _files_hash(root)
    if files_sha256 != manifest.get("files_sha256"):
        raise ValueError(
            f"{root} was modified after it was written (its files no longer match {manifest_path}); "
            "delete it to regenerate it"
        )
    return True


def write_benchmark(out_dir: str | os.PathLike, config: DigitsBenchmark | None = None, seed: int = 0) -> BenchmarkPaths:
    """Generate the benchmark and write it to `out_dir` in wsolevaluation's layout.

    The files are written to a hidden directory beside `out_dir` and renamed into place at
    the end, so `out_dir` is either absent or complete (an interrupted run leaves at most a
    ``.<name>.tmp-*`` directory beside it). If `out_dir` already holds the benchmark of this
    `config` and `seed` (its manifest matches and its files are unmodified), nothing is
    written; if it holds anything else a `ValueError` says so and nothing is touched. Safe
    to call from several processes at once (the first rename wins, the others reuse it).

    Returns:
        The `BenchmarkPaths` of `out_dir`.
    """
    config = DigitsBenchmark() if config is None else config
    if not isinstance(config, DigitsBenchmark):
        raise TypeError(f"config must be a DigitsBenchmark, got {type(config).__name__}")
    seed = _check_seed(seed)
    root = Path(out_dir)
    paths = BenchmarkPaths.under(root)
    if _reusable(root, config, seed):
        return paths
    splits = generate(config, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        _write_tree(temporary, config, seed, splits)
        try:
            with contextlib.suppress(FileNotFoundError):
                root.rmdir()  # an empty directory (checked above) gives way; anything else stays
            os.rename(temporary, root)
        except OSError:
            if _reusable(root, config, seed):  # another process wrote the same benchmark first
                return paths
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return paths


# ----------------------------------------------------------------------------- probes


def _patches(split: DigitsSplit, which: str, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Grey patches (the distractor's square, or the target's box) resized to `size`, and the
    indices of the images that have one."""
    keep = np.flatnonzero(split.distractor_labels >= 0) if which == "distractor" else np.arange(len(split))
    boxes = split.distractor_boxes if which == "distractor" else split.boxes
    grey = split.images.astype(np.float64).mean(axis=-1) / 255
    patches = np.empty((len(keep), size, size))
    for row, i in enumerate(keep):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        patches[row] = upscale(grey[i, y0 : y1 + 1, x0 : x1 + 1], size, size)
    return patches, keep


def linear_probes(splits: Mapping[str, DigitsSplit], max_iter: int = 300) -> dict[str, float]:
    """Test accuracies of three logistic regressions trained on the train split (a sanity check
    of the benchmark, not a baseline to report as WSOL):

    - ``pixels``: on the raw RGB pixels of the whole image (standardised);
    - ``distractor``: on the Fourier magnitudes of the distractor's square alone (the digit is
      never in it), predicting the *image* label, on images that have a distractor, with
      ``distractor_ceiling``: the share of those whose distractor matches their label, the
      ceiling of a perfect pattern reader;
    - ``digit``: on the grey target box resized to 16 x 16 (the digit without its context).
    """
    with _digits_extra("linear_probes (scikit-learn)"):
        from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped,import-not-found,unused-ignore]
    train, test = splits["train"], splits["test"]

    def fit(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        model.fit(x_train.reshape(len(x_train), -1), y_train)
        return float(model.score(x_test.reshape(len(x_test), -1), y_test))

    results = {
        "pixels": fit(train.images.astype(np.float64), train.labels, test.images.astype(np.float64), test.labels)
    }
    spectra = {}
    for split in (train, test):
        patches, keep = _patches(split, "distractor")
        patches -= patches.mean(axis=(1, 2), keepdims=True)
        spectra[split.name] = (np.abs(np.fft.rfft2(patches)), keep)
    (x_tr, k_tr), (x_te, k_te) = spectra["train"], spectra["test"]
    results["distractor"] = fit(x_tr, train.labels[k_tr], x_te, test.labels[k_te])
    results["distractor_ceiling"] = float((test.distractor_labels[k_te] == test.labels[k_te]).mean())
    digits_train, _ = _patches(train, "digit")
    digits_test, _ = _patches(test, "digit")
    results["digit"] = fit(digits_train, train.labels, digits_test, test.labels)
    return results
