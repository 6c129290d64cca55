"""Pascal VOC (``VOCdevkit/VOC2007``): multi-label images with boxes, classes and difficult flags.

    ROOT/JPEGImages/<id>.jpg
    ROOT/Annotations/<id>.xml
    ROOT/ImageSets/Main/<split>.txt      one image id per line (trainval, test, ...)

Items follow ``spn.data``'s contract: ``labels`` is the multi-hot target over the 20 classes
(a class is present when it has a box, difficult or not, as the devkit's image labels), and
``label`` the first present class; ``boxes`` are converted from VOC's 1-based pixel
coordinates to spn's 0-based pixel-inclusive ones (``x - 1``) and resized with the image.
The SPN paper's pointing game and CorLoc use them (``spn evaluate`` on ``--dataset voc``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
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

__all__ = ["VOC_CLASSES", "VOCDataset", "ebp_difficult_flags", "read_difficult_flags"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 classes in the devkit's (alphabetical) order: class index = position here."""


class VOCDataset(Dataset):
    """One image set of a ``VOCdevkit/VOC<year>`` folder.

    Args:
        root: the ``VOC2007`` folder (or ``VOCdevkit``, then ``VOC<year>`` inside it).
        split: an image set of ``ImageSets/Main`` (``trainval``, ``test``, ...).
        year: used when ``root`` is the ``VOCdevkit`` folder.
        train, resize, crop, flip, normalize: as :class:`spn.data.WSOLDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "trainval",
        year: str = "2007",
        *,
        train: bool = False,
        resize: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        flip: bool = True,
        normalize: bool = True,
    ) -> None:
        folder = Path(root)
        if not (folder / "Annotations").is_dir() and (folder / f"VOC{year}").is_dir():
            folder = folder / f"VOC{year}"
        self.root = folder
        self.train, self.flip, self.normalize = bool(train), bool(flip), bool(normalize)
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.num_classes = len(VOC_CLASSES)
        self.has_masks = False
        ids_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise DataError(f"{ids_file}: missing (image set {split!r} of {folder})")
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"{ids_file}: lists no image")
        self.annotations = []
        for number, image_id in enumerate(self.ids, 1):
            if not (folder / "JPEGImages" / f"{image_id}.jpg").is_file():
                raise DataError(f"{ids_file}:{number}: image {image_id}.jpg not found in {folder / 'JPEGImages'}")
            self.annotations.append(self._parse(folder / "Annotations" / f"{image_id}.xml"))

    @staticmethod
    def _parse(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise DataError(f"{path}: missing annotation")
        try:
            tree = ElementTree.parse(path)
        except ElementTree.ParseError as error:
            raise DataError(f"{path}:{error.position[0]}: not well-formed XML ({error})") from None
        node = tree.getroot()

        def number(element: ElementTree.Element | None, tag: str) -> int:
            found = None if element is None else element.find(tag)
            try:
                return int(float(str(found.text if found is not None else "")))
            except ValueError:
                raise DataError(f"{path}: <{tag}> missing or not a number") from None

        size = node.find("size")
        width, height = number(size, "width"), number(size, "height")
        boxes, labels, difficult = [], [], []
        for obj in node.findall("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise DataError(f"{path}: unknown class {name!r} (not one of the 20 VOC classes)")
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (number(box, tag) - 1 for tag in ("xmin", "ymin", "xmax", "ymax"))
            if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
                corners = f"({x0 + 1}, {y0 + 1}, {x1 + 1}, {y1 + 1})"
                raise DataError(f"{path}: box {corners} outside the {width} x {height} image")
            boxes.append([x0, y0, x1, y1])
            labels.append(VOC_CLASSES.index(name))
            difficult.append((obj.findtext("difficult") or "0").strip() == "1")
        if not boxes:
            raise DataError(f"{path}: no object")
        return {"size": (height, width), "boxes": boxes, "labels": labels, "difficult": difficult}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> list[int]:
        """Each image's ``label`` (its first annotated object's class), as `WSOLDataset.labels`."""
        return [int(annotation["labels"][0]) for annotation in self.annotations]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"{path}: cannot decode the image ({error})") from None
        annotation = self.annotations[index]
        size = annotation["size"]
        out_size = self.resize or size
        tensor = transforms.to_tensor(transforms.resize(image, out_size), self.normalize)
        labels = torch.zeros(self.num_classes)
        labels[annotation["labels"]] = 1.0
        if self.train:
            tensor = transforms.random_crop(tensor, self.crop) if self.crop else tensor
            tensor = transforms.random_flip(tensor) if self.flip else tensor
            boxes = torch.zeros((0, 4))
            box_labels = torch.zeros(0, dtype=torch.int64)
            difficult = torch.zeros(0, dtype=torch.bool)
        else:
            raw = np.array(annotation["boxes"], dtype=np.float64)
            boxes = torch.from_numpy(resize_boxes(raw, size, out_size).astype(np.float32))
            box_labels = torch.tensor(annotation["labels"], dtype=torch.int64)
            difficult = torch.tensor(annotation["difficult"], dtype=torch.bool)
        return {
            "image": tensor, "label": int(annotation["labels"][0]), "labels": labels, "boxes": boxes,
            "box_labels": box_labels, "difficult": difficult, "mask": None, "ignore": None,
            "index": index, "path": f"JPEGImages/{self.ids[index]}.jpg", "size": size,
        }  # fmt: skip


def ebp_difficult_flags(dataset: VOCDataset) -> dict[str, list[bool]]:
    """The pointing game's *difficult* (image, class) pairs by the rule of excitation
    backprop (Zhang et al., ECCV 2016), which the SPN paper's Table 1 uses: the class is in
    the image, the union of its boxes covers less than a quarter of the image, and at least
    one other class is in the image.

    TorchRay ships the list it evaluates with (``pointing_game_ebp_voc07_difficult.txt``); this
    function derives the subset from the annotations by the stated rule and has not been
    compared with that list (it needs VOC2007's annotations, which are not bundled). To
    reproduce TorchRay exactly, pass its list to `read_difficult_flags` instead.

    Returns:
        ``{image_id: [flag of class 0, ..., flag of class 19]}`` for every image of the set.
    """
    flags: dict[str, list[bool]] = {}
    for image_id, annotation in zip(dataset.ids, dataset.annotations, strict=True):
        height, width = annotation["size"]
        present = set(annotation["labels"])
        row = [False] * len(VOC_CLASSES)
        for cls in present:
            covered = np.zeros((height, width), dtype=bool)
            for (x0, y0, x1, y1), label in zip(annotation["boxes"], annotation["labels"], strict=True):
                if label == cls:
                    covered[y0 : y1 + 1, x0 : x1 + 1] = True
            row[cls] = bool(covered.sum() < height * width / 4) and len(present) > 1
        flags[image_id] = row
    return flags


def read_difficult_flags(
    path: str | os.PathLike[str], ids: Sequence[str] | None = None
) -> dict[str, list[bool]]:
    """Read a pointing-game subset file in TorchRay's format: per line an image id and one
    0/1 flag per class, tab- or space-separated (``000003  0 0 ... 1 0``).

    With ``ids`` (the images to be scored), every one of them must have a line: TorchRay's
    benchmark counts an image the file does not list in the difficult subset with all its
    classes, which a file of another split would do for every image, so a missing image is
    an error here. (TorchRay's VOC2007 list has a line for each of the 4952 test images.)
    """
    file = Path(path)
    flags: dict[str, list[bool]] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(VOC_CLASSES) + 1 or any(field not in ("0", "1") for field in fields[1:]):
            raise DataError(
                f"{file}:{number}: expected an image id and {len(VOC_CLASSES)} flags 0/1, got {len(fields)} fields"
            )
        flags[fields[0]] = [field == "1" for field in fields[1:]]
    missing = [image_id for image_id in ids or () if image_id not in flags]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{file}: no line for {len(missing)} of the {len(ids or ())} images to be scored ({shown}); "
            "a subset file must list every image of the split (is it the list of another split?)"
        )
    return flags
