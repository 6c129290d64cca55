"""spn.data.VOCDataset on a generated VOCdevkit fixture, and spn train / evaluate on it
(multi-label training, the SPN paper's pointing game and CorLoc)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spn.__main__ import main as spn_main
from spn.data import VOC_CLASSES, DataError, VOCDataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def annotation(width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc(root: Path, count: int = 8, size: int = 32) -> Path:
    """VOCdevkit/VOC2007 with `count` images: a bright square of class `dog` or `cat`, and in
    image 0 a second, difficult `person`. 1-based VOC coordinates."""
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for index in range(count):
        image_id = f"{index:06d}"
        ids.append(image_id)
        array = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        x0, y0 = rng.integers(1, size // 2, size=2)
        name = "dog" if index % 2 else "cat"
        array[y0 - 1 : y0 + 9, x0 - 1 : x0 + 9] = (250, 40, 40) if name == "dog" else (40, 40, 250)
        Image.fromarray(array).save(voc / "JPEGImages" / f"{image_id}.jpg")
        objects = [(name, (int(x0), int(y0), int(x0) + 9, int(y0) + 9), 0)]
        if index == 0:
            objects.append(("person", (1, 1, 4, 4), 1))
        (voc / "Annotations" / f"{image_id}.xml").write_text(annotation(size, size, objects))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[:4]) + "\n")
    return voc


def test_labels_boxes_and_difficult_flags(tmp_path):
    voc = write_voc(tmp_path)
    data = VOCDataset(tmp_path / "VOCdevkit", "test", resize=(16, 16))  # finds VOC2007 inside
    assert len(data) == 4 and data.num_classes == 20
    item = data[0]
    present = [VOC_CLASSES[i] for i in item["labels"].nonzero().flatten().tolist()]
    assert present == ["cat", "person"] and item["label"] == VOC_CLASSES.index("cat")
    assert item["difficult"].tolist() == [False, True]
    # VOC (1, 1, 4, 4) is 0-based (0, 0, 3, 3); resized 32 -> 16: int(x / 2) -> (0, 0, 1, 1)
    assert item["boxes"][1].tolist() == [0, 0, 1, 1]
    assert item["image"].shape == (3, 16, 16)
    assert VOCDataset(voc, "trainval", train=True, crop=(24, 24))[1]["boxes"].shape == (0, 4)


def test_bad_annotations_are_named(tmp_path):
    voc = write_voc(tmp_path)
    xml = voc / "Annotations" / "000001.xml"
    xml.write_text(annotation(32, 32, [("unicorn", (1, 1, 5, 5), 0)]))
    with pytest.raises(DataError, match=r"000001\.xml: unknown class 'unicorn'"):
        VOCDataset(voc, "test")
    xml.write_text(annotation(32, 32, [("dog", (1, 1, 40, 5), 0)]))
    with pytest.raises(DataError, match=r"000001\.xml: box \(1, 1, 40, 5\) outside the 32 x 32 image"):
        VOCDataset(voc, "test")
    xml.write_text("<annotation><size>")
    with pytest.raises(DataError, match=r"000001\.xml:1: not well-formed XML"):
        VOCDataset(voc, "test")
    xml.write_text(annotation(32, 32, [("dog", (1, 1, 5, 5), 0)]))
    (voc / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"test\.txt:3: image 000002\.jpg not found"):
        VOCDataset(voc, "test")


def test_train_and_evaluate_on_voc(tmp_path):
    voc = write_voc(tmp_path)
    run = tmp_path / "run"
    sizes = ("--resize", "32", "--crop", "32", "--eval-size", "32")
    assert spn_main(["train", "--dataset", "voc", "--data", str(voc), "--model", "small_sp", "--epochs", "1",
                     "--batch-size", "4", "--widths", "8", "16", "--out", str(run), *sizes]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["num_classes"] == 20
    out = tmp_path / "voc.json"
    assert spn_main(["evaluate", "--run", str(run), "--split", "test", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("top1_cls", "pointing_game", "pointing_game_difficult", "corloc"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["images"] == 4


def test_difficult_subset_by_the_ebp_rule_and_from_a_file(tmp_path):
    from spn.data.voc import ebp_difficult_flags, read_difficult_flags

    voc = write_voc(tmp_path, count=2, size=32)
    # image 1: a dog 10 x 10 (100 of 1024 px) alone -> not difficult (no other class);
    # image 0: a cat 10 x 10 and a person 4 x 4 -> both small, each with another class -> difficult
    flags = ebp_difficult_flags(VOCDataset(voc, "trainval"))
    cat, dog, person = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    assert [c for c, flag in enumerate(flags["000000"]) if flag] == [cat, person]
    assert not any(flags["000001"])
    # a big object (the union of its boxes >= 1/4 of the image) is not difficult
    xml = voc / "Annotations" / "000000.xml"
    xml.write_text(annotation(32, 32, [("cat", (1, 1, 16, 16), 0), ("person", (1, 1, 4, 4), 1)]))
    flags = ebp_difficult_flags(VOCDataset(voc, "trainval"))
    assert flags["000000"][cat] is False and flags["000000"][person] is True
    assert dog not in [c for c, flag in enumerate(flags["000000"]) if flag]

    listing = tmp_path / "difficult.txt"
    listing.write_text("000000\t" + "\t".join("1" if c == cat else "0" for c in range(20)) + "\n")
    assert read_difficult_flags(listing)["000000"][cat] is True
    # every image to be scored needs a line (TorchRay would count a missing one as difficult in
    # every class, which is what a file of another split would do to every image)
    with pytest.raises(DataError, match=r"difficult.txt: no line for 1 of the 2 images to be scored \(000001\)"):
        read_difficult_flags(listing, ["000000", "000001"])
    assert read_difficult_flags(listing, ["000000"])["000000"][cat] is True
    listing.write_text("000000 1 0\n")
    with pytest.raises(DataError, match=r"difficult.txt:1: expected an image id and 20 flags"):
        read_difficult_flags(listing)
