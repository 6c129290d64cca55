"""spn.data.WSOLDataset on generated fixture folders: well-formed boxes and masks, and every
malformed case reported as file:line before anything is loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from spn.data import DataError, WSOLDataset, collate


def write_layout(root: Path, images: dict[str, tuple[int, int, int]], localization: list[str]) -> Path:
    """images: path -> (label, width, height); writes PNGs (a gradient) and the metadata."""
    for path, (_, width, height) in images.items():
        target = root / "images" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        array = np.zeros((height, width, 3), dtype=np.uint8)
        array[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 10  # red grows to the right
        Image.fromarray(array).save(target)
    folder = root / "metadata" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "image_ids.txt").write_text("".join(f"{path}\n" for path in images))
    (folder / "class_labels.txt").write_text("".join(f"{path},{label}\n" for path, (label, _, _) in images.items()))
    (folder / "image_sizes.txt").write_text("".join(f"{path},{w},{h}\n" for path, (_, w, h) in images.items()))
    (folder / "localization.txt").write_text("".join(f"{line}\n" for line in localization))
    return folder


IMAGES = {"a/1.png": (0, 20, 10), "b/2.png": (2, 8, 8)}
BOXES = ["a/1.png,2,1,9,4", "a/1.png,10,0,19,9", "b/2.png,0,0,7,7"]


def dataset(root: Path, **options) -> WSOLDataset:
    return WSOLDataset(root / "images", root / "metadata", "test", **options)


def test_boxes_are_mapped_to_the_evaluation_size_like_wsolevaluation(tmp_path):
    write_layout(tmp_path, IMAGES, BOXES)
    data = dataset(tmp_path, resize=(5, 10), normalize=False)
    assert (len(data), data.num_classes, data.has_masks, data.class_counts) == (2, 3, False, {0: 1, 2: 1})
    item = data[0]
    assert item["image"].shape == (3, 5, 10) and item["size"] == (10, 20) and item["label"] == 0
    # int(x * 10 / 20), int(y * 5 / 10): (2, 1, 9, 4) -> (1, 0, 4, 2); (10, 0, 19, 9) -> (5, 0, 9, 4)
    assert item["boxes"].tolist() == [[1, 0, 4, 2], [5, 0, 9, 4]]
    assert item["box_labels"].tolist() == [0, 0] and item["difficult"].tolist() == [False, False]
    assert item["mask"] is None
    batch = collate([data[0], data[1]])
    assert batch["image"].shape == (2, 3, 5, 10) and batch["label"].tolist() == [0, 2]
    assert [len(boxes) for boxes in batch["boxes"]] == [2, 1]


def test_masks_are_the_union_of_instances_without_the_ignored_background(tmp_path):
    images = {"a.png": (1, 4, 2)}
    folder = write_layout(tmp_path, images, ["a.png,m1.png,ignore.png", "a.png,m2.png,"])
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.array([[255, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)).save(masks / "m1.png")
    Image.fromarray(np.array([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=np.uint8)).save(masks / "m2.png")  # 1 > 0.5
    Image.fromarray(np.array([[255, 255, 0, 0], [255, 255, 255, 0]], dtype=np.uint8)).save(masks / "ignore.png")
    data = WSOLDataset(tmp_path / "images", folder.parent, "test", mask_root=masks)
    item = data[0]
    assert data.has_masks
    assert item["mask"].tolist() == [[True, False, False, False], [False, True, False, False]]
    assert item["ignore"].tolist() == [[False, True, False, False], [True, False, True, False]]


def test_training_items_crop_and_flip_under_the_seed(tmp_path):
    write_layout(tmp_path, IMAGES, BOXES)
    data = dataset(tmp_path, train=True, resize=(10, 20), crop=(6, 6), flip=True, normalize=False)
    torch.manual_seed(3)
    first = data[0]["image"]
    torch.manual_seed(3)
    assert torch.equal(first, data[0]["image"])  # the seed decides crop and flip
    assert first.shape == (3, 6, 6) and len(data[0]["boxes"]) == 0
    flips = set()
    for seed in range(20):
        torch.manual_seed(seed)
        red = data[0]["image"][0, 0]
        flips.add(bool(red[0] > red[-1]))  # red grows to the right unless mirrored
    assert flips == {True, False}


def expect_error(root: Path, file: str, line: int | None, words: str, **options):
    with pytest.raises(DataError) as error:
        dataset(root, **options)
    place = str(root / "metadata" / "test" / file) + (f":{line}:" if line else ":")
    assert place in str(error.value), str(error.value)
    assert words in str(error.value)


def test_missing_image(tmp_path):
    write_layout(tmp_path, IMAGES, BOXES)
    (tmp_path / "images" / "b" / "2.png").unlink()
    expect_error(tmp_path, "image_ids.txt", 2, "'b/2.png' not found")


def test_wrong_column_count(tmp_path):
    write_layout(tmp_path, IMAGES, [*BOXES[:2], "b/2.png,0,0,7"])
    expect_error(tmp_path, "localization.txt", 3, "4 comma-separated fields, expected 3 or 5")


def test_non_integer_label(tmp_path):
    folder = write_layout(tmp_path, IMAGES, BOXES)
    (folder / "class_labels.txt").write_text("a/1.png,0\nb/2.png,two\n")
    expect_error(tmp_path, "class_labels.txt", 2, "label 'two' is not an integer")


def test_label_out_of_range(tmp_path):
    write_layout(tmp_path, IMAGES, BOXES)
    expect_error(tmp_path, "class_labels.txt", 2, "label 2 out of range", num_classes=2)


@pytest.mark.parametrize(
    "line, words",
    [("a/1.png,2,1,20,4", "outside the 20 x 10 image"), ("a/1.png,9,1,2,4", "x1 < x0"), ("a/1.png,-1,1,2,4", "x0 -1")],
)
def test_bad_boxes(tmp_path, line, words):
    write_layout(tmp_path, IMAGES, [BOXES[0], line])
    expect_error(tmp_path, "localization.txt", 2, words)


def test_missing_metadata_file_duplicates_and_unlisted_paths(tmp_path):
    folder = write_layout(tmp_path, IMAGES, BOXES)
    (folder / "image_sizes.txt").unlink()
    expect_error(tmp_path, "image_sizes.txt", None, "missing")
    folder = write_layout(tmp_path / "dup", IMAGES, BOXES)
    (folder / "image_ids.txt").write_text("a/1.png\nb/2.png\na/1.png\n")
    expect_error(tmp_path / "dup", "image_ids.txt", 3, "listed twice (first on line 1)")
    folder = write_layout(tmp_path / "extra", IMAGES, [*BOXES, "c/3.png,0,0,1,1"])
    expect_error(tmp_path / "extra", "localization.txt", 4, "'c/3.png' is not in image_ids.txt")
    folder = write_layout(tmp_path / "nolabel", IMAGES, BOXES)
    (folder / "class_labels.txt").write_text("a/1.png,0\n")
    expect_error(tmp_path / "nolabel", "class_labels.txt", None, "no class label for 'b/2.png'")


def test_an_image_that_fails_to_decode_is_named_also_from_a_worker(tmp_path):
    write_layout(tmp_path, IMAGES, BOXES)
    broken = tmp_path / "images" / "b" / "2.png"
    broken.write_bytes(b"not a png")
    data = dataset(tmp_path, resize=(8, 8))  # the validation pass does not decode
    with pytest.raises(DataError, match="cannot decode"):
        data[1]
    loader = DataLoader(data, batch_size=1, num_workers=2, collate_fn=collate)
    with pytest.raises(Exception) as error:
        list(loader)
    assert str(broken) in str(error.value)
