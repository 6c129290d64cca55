"""wsolevaluation's metadata layout (Choe et al., CVPR 2020): CUB, ILSVRC, OpenImages, digits.

    METADATA_ROOT/<split>/image_ids.txt      path
    METADATA_ROOT/<split>/class_labels.txt   path,label
    METADATA_ROOT/<split>/image_sizes.txt    path,width,height
    METADATA_ROOT/<split>/localization.txt   path,x0,y0,x1,y1        (one line per box)
                                             or path,mask.png,ignore.png  (one line per mask
                                             instance; repeated paths leave ignore empty)

Image paths are relative to the image root, mask paths to the mask root. Everything is
checked when the dataset is built (before any training starts); the first problem raises
:class:`DataError` naming the file and the line. Only decoding is left to loading time (an
image that fails to decode raises ``DataError`` naming it, also from inside a loader worker).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from spn.localize import resize_boxes

from . import transforms
from ._errors import DataError
from .erased import ErasedRegions

__all__ = ["WSOLDataset", "collate"]


def _read_rows(path: Path, columns: Sequence[int], what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-empty line; wrong column counts raise."""
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) not in columns:
            expected = " or ".join(str(count) for count in columns)
            raise DataError(f"{path}:{number}: {len(fields)} comma-separated fields, expected {expected} ({what})")
        rows.append((number, fields))
    return rows


def _integer(text: str, path: Path, number: int, what: str, minimum: int = 0) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise DataError(f"{path}:{number}: {what} {text.strip()!r} is not an integer") from None
    if value < minimum:
        raise DataError(f"{path}:{number}: {what} {value} must be >= {minimum}")
    return value


class WSOLDataset(Dataset):
    """One split of a dataset in wsolevaluation's metadata layout.

    Items are dicts (see ``docs/data.md``): ``image`` float32 (3, H, W); ``label`` int;
    ``boxes`` float32 (m, 4) pixel-inclusive in the output image's pixels (evaluation only,
    empty for training items, whose random crops move them); ``box_labels`` (m,);
    ``difficult`` (m,) all False; ``mask`` / ``ignore`` bool (H, W) for mask datasets, else
    None; ``index``; ``path``; ``size`` the original (H, W).

    Args:
        image_root: the folder the image paths are relative to.
        metadata_root: the folder holding one folder per split.
        split: ``"train"``, ``"val"``, ``"test"``...
        train: training transforms (resize, random crop, flip) instead of evaluation (resize).
        resize: (H, W) to resize to; None keeps the images' own size.
        crop: (h, w) random crop after the resize (training only); None: no crop.
        flip: random horizontal flip (training only).
        normalize: ImageNet mean / std normalisation.
        mask_root: the folder mask paths are relative to (default: ``image_root``).
        num_classes: the number of classes (labels must be below it); default: max label + 1.
        erased: `spn.data.erased.ErasedRegions` whose masks each image is erased by as it is
            read, before any transform (adversarial erasing's later steps); every image of the
            split must have its mask.
    """

    def __init__(
        self,
        image_root: str | os.PathLike[str],
        metadata_root: str | os.PathLike[str],
        split: str,
        *,
        train: bool = False,
        resize: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        flip: bool = True,
        normalize: bool = True,
        mask_root: str | os.PathLike[str] | None = None,
        num_classes: int | None = None,
        erased: ErasedRegions | None = None,
    ) -> None:
        self.image_root = Path(image_root)
        self.mask_root = Path(mask_root) if mask_root is not None else self.image_root
        self.folder = Path(metadata_root) / split
        self.split = split
        self.train = bool(train)
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.flip = bool(flip)
        self.normalize = bool(normalize)
        self.erased = erased
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such split folder (metadata root {metadata_root}, split {split!r})")
        self._read(num_classes)

    # ---------------------------------------------------------------- metadata

    def _read(self, num_classes: int | None) -> None:
        ids_file = self.folder / "image_ids.txt"
        self.paths: list[str] = []
        seen: dict[str, int] = {}
        for number, (path,) in _read_rows(ids_file, (1,), "path"):
            if path in seen:
                raise DataError(f"{ids_file}:{number}: {path!r} is listed twice (first on line {seen[path]})")
            seen[path] = number
            self.paths.append(path)
        if not self.paths:
            raise DataError(f"{ids_file}: lists no image")

        labels_file = self.folder / "class_labels.txt"
        labels: dict[str, int] = {}
        for number, (path, text) in _read_rows(labels_file, (2,), "path,label"):
            self._known(path, labels_file, number, seen)
            label = _integer(text, labels_file, number, "label")
            if num_classes is not None and label >= num_classes:
                raise DataError(f"{labels_file}:{number}: label {label} out of range: there are {num_classes} classes")
            labels[path] = label

        sizes_file = self.folder / "image_sizes.txt"
        sizes: dict[str, tuple[int, int]] = {}
        for number, (path, width, height) in _read_rows(sizes_file, (3,), "path,width,height"):
            self._known(path, sizes_file, number, seen)
            sizes[path] = (
                _integer(height, sizes_file, number, "height", 1),
                _integer(width, sizes_file, number, "width", 1),
            )

        for kind, table, file in (("class label", labels, labels_file), ("size", sizes, sizes_file)):
            missing = [path for path in self.paths if path not in table]
            if missing:
                raise DataError(f"{file}: no {kind} for {missing[0]!r} (line {seen[missing[0]]} of {ids_file})")
        self.labels = [labels[path] for path in self.paths]
        self.sizes = [sizes[path] for path in self.paths]
        self.num_classes = int(num_classes) if num_classes is not None else max(self.labels) + 1

        self.boxes: list[list[list[int]]] = [[] for _ in self.paths]
        self.masks: list[list[str]] = [[] for _ in self.paths]
        self.ignores: list[str | None] = [None for _ in self.paths]
        self.has_masks = False
        location_file = self.folder / "localization.txt"
        rows = []
        if location_file.exists():
            rows = _read_rows(location_file, (3, 5), "path,x0,y0,x1,y1 or path,mask,ignore")
        index_of = {path: index for index, path in enumerate(self.paths)}
        if rows:
            self.has_masks = len(rows[0][1]) == 3
            expected = 3 if self.has_masks else 5
            for number, fields in rows:
                if len(fields) != expected:
                    raise DataError(
                        f"{location_file}:{number}: {len(fields)} fields where line {rows[0][0]} has {expected}: "
                        "a localization file holds boxes or masks, not both"
                    )
                path = fields[0]
                self._known(path, location_file, number, seen)
                index = index_of[path]
                if self.has_masks:
                    self._add_mask(index, fields, location_file, number)
                else:
                    self._add_box(index, fields, location_file, number)
        missing_files = [path for path in self.paths if not (self.image_root / path).is_file()]
        if missing_files:
            path = missing_files[0]
            raise DataError(f"{ids_file}:{seen[path]}: image {path!r} not found under {self.image_root}")
        if self.erased is not None:
            self._check_masks(self.erased, ids_file, seen)

    def _check_masks(self, erased: ErasedRegions, ids_file: Path, seen: dict[str, int]) -> None:
        missing = []
        for path in self.paths:
            try:
                if not erased.mask_path(path).is_file():
                    missing.append(path)
            except DataError as error:
                raise DataError(f"{ids_file}:{seen[path]}: {error}") from None
        if missing:
            path = missing[0]
            raise DataError(
                f"{ids_file}:{seen[path]}: image {path!r} has no erasing mask ({erased.mask_path(path)}; "
                f"{len(missing)} of the split's {len(self.paths)} images have none)"
            )

    def _known(self, path: str, file: Path, number: int, seen: dict[str, int]) -> None:
        if path not in seen:
            raise DataError(f"{file}:{number}: {path!r} is not in image_ids.txt")

    def _add_box(self, index: int, fields: list[str], file: Path, number: int) -> None:
        names = ("x0", "y0", "x1", "y1")
        x0, y0, x1, y1 = (_integer(text, file, number, name) for text, name in zip(fields[1:], names, strict=True))
        height, width = self.sizes[index]
        if x1 < x0 or y1 < y0:
            raise DataError(f"{file}:{number}: box ({x0}, {y0}, {x1}, {y1}) has x1 < x0 or y1 < y0")
        if x1 > width - 1 or y1 > height - 1:
            raise DataError(
                f"{file}:{number}: box ({x0}, {y0}, {x1}, {y1}) is outside the {width} x {height} image "
                f"{self.paths[index]!r} (pixel-inclusive: x1 <= {width - 1}, y1 <= {height - 1})"
            )
        self.boxes[index].append([x0, y0, x1, y1])

    def _add_mask(self, index: int, fields: list[str], file: Path, number: int) -> None:
        mask, ignore = fields[1].strip(), fields[2].strip()
        if not mask:
            raise DataError(f"{file}:{number}: empty mask path")
        for name in (mask, ignore):
            if name and not (self.mask_root / name).is_file():
                raise DataError(f"{file}:{number}: mask file {name!r} not found under {self.mask_root}")
        if self.masks[index] and ignore:
            raise DataError(f"{file}:{number}: only the first line of an image names its ignore mask")
        self.masks[index].append(mask)
        if not self.masks[index][1:]:
            self.ignores[index] = ignore or None

    # ------------------------------------------------------------------- items

    @property
    def class_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.labels).items()))

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, path: Path, mode: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{path}: cannot decode the image ({error})") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = self._open(self.image_root / path, "RGB")
        size = self.sizes[index]
        if image.size != (size[1], size[0]):
            raise DataError(
                f"{self.image_root / path}: the image is {image.size[0]} x {image.size[1]}, "
                f"image_sizes.txt says {size[1]} x {size[0]}"
            )
        if self.erased is not None:
            image = Image.fromarray(self.erased.erase(path, np.asarray(image)))
        out_size = self.resize or size
        tensor = transforms.to_tensor(transforms.resize(image, out_size), self.normalize)
        label = self.labels[index]
        item: dict[str, Any] = {"label": label, "index": index, "path": path, "size": size}
        item.update(mask=None, ignore=None)
        if self.train:
            if self.crop is not None:
                tensor = transforms.random_crop(tensor, self.crop)
            if self.flip:
                tensor = transforms.random_flip(tensor)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        else:
            raw = np.array(self.boxes[index], dtype=np.float64).reshape(-1, 4)
            boxes = torch.from_numpy(resize_boxes(raw, size, out_size).astype(np.float32))
            if self.has_masks:
                item["mask"], item["ignore"] = self._mask(index, out_size)
        item.update(
            image=tensor,
            boxes=boxes,
            box_labels=torch.full((len(boxes),), label, dtype=torch.int64),
            difficult=torch.zeros(len(boxes), dtype=torch.bool),
        )
        return item

    def _mask(self, index: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        def load(name: str) -> np.ndarray:
            grey = transforms.resize(self._open(self.mask_root / name, "L"), size, nearest=True)
            return np.asarray(grey) > 0.5  # wsolevaluation: nearest-neighbour resize, then > 0.5

        foreground = np.zeros(size, dtype=bool)
        for name in self.masks[index]:
            foreground |= load(name)
        ignore_name = self.ignores[index]
        ignore = load(ignore_name) & ~foreground if ignore_name else np.zeros(size, dtype=bool)
        return torch.from_numpy(foreground), torch.from_numpy(ignore)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: ``image``, ``label``, ``labels`` (when present) and ``index`` are
    stacked; ``boxes``, ``box_labels``, ``difficult``, ``mask``, ``ignore``, ``path`` and
    ``size`` stay per-image lists (their shapes differ). For ``DataLoader(collate_fn=...)``."""
    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.tensor([int(item["label"]) for item in items], dtype=torch.int64),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }
    if "labels" in items[0]:
        batch["labels"] = torch.stack([item["labels"] for item in items])
    for key in ("boxes", "box_labels", "difficult", "mask", "ignore", "path", "size"):
        batch[key] = [item.get(key) for item in items]
    return batch
