"""Tests of the offline digits benchmark (spn.data.digits): determinism, disjoint splits, ground truth
that matches the pixels, the distractor's placement, and the wsolevaluation layout on disk."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits benchmark needs scikit-learn (the digits extra)")
Image = pytest.importorskip("PIL.Image", reason="writing the digits benchmark needs Pillow")

import spn.data.digits as digits  # noqa: E402
from spn.data.digits import DigitsBenchmark, generate, render, write_benchmark  # noqa: E402

# 4 images per class and split (40 a split); the shares give every distractor kind per class: 2 match, 1 other, 1 none
SMALL = DigitsBenchmark(
    train_per_class=4, val_per_class=4, test_per_class=4, distractor_match=0.5, distractor_other=0.25
)


@pytest.fixture(scope="module")
def splits():
    return generate(SMALL, seed=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "bench"
    return write_benchmark(root, SMALL, seed=3)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def every_split(splits):
    return [splits[name] for name in digits.SPLITS]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays(splits):
    again = generate(SMALL, seed=3)
    for one, two in zip(every_split(splits), every_split(again), strict=True):
        assert one.ids == two.ids and one.specs == two.specs
        for field in ("images", "masks", "labels", "boxes", "distractor_labels", "distractor_boxes"):
            np.testing.assert_array_equal(getattr(one, field), getattr(two, field))
    assert digits.content_hash(splits) == digits.content_hash(again)


def test_same_seed_byte_identical_files(written, tmp_path):
    other = write_benchmark(tmp_path / "again", SMALL, seed=3)
    first, second = tree(written.root), tree(other.root)
    assert first.keys() == second.keys() and len(first) > 240  # 120 images, 120 masks, 3 ignores, metadata
    assert first == second


def test_other_seed_other_benchmark(splits):
    other = generate(SMALL, seed=4)
    for one, two in zip(every_split(splits), every_split(other), strict=True):
        assert not np.array_equal(one.images, two.images)
        assert not np.array_equal(one.boxes, two.boxes)
        # the layout stream depends on the seed too, not only the scan partition: the first draws differ
        assert (one.specs[0].xywh, one.specs[0].color) != (two.specs[0].xywh, two.specs[0].color)
    assert digits.content_hash(splits) != digits.content_hash(other)


def test_a_split_does_not_depend_on_the_size_of_another(splits):
    bigger_test = generate(dataclasses.replace(SMALL, test_per_class=7), seed=3)
    for name in ("train", "val"):
        np.testing.assert_array_equal(bigger_test[name].images, splits[name].images)
    assert len(bigger_test["test"]) == 70


# ----------------------------------------------------------------------------- splits and balance


def test_splits_use_disjoint_source_scans(splits):
    train, val, test = (split.all_scans for split in every_split(splits))
    assert not train & val and not train & test and not val & test
    assert all(split.all_scans > set(split.scans.tolist()) for split in every_split(splits))  # clutter adds scans


def test_scan_partition_is_disjoint_complete_and_stratified():
    _, labels = digits.load_scans()
    pools = digits.partition_scans(seed=3, fractions=(0.6, 0.15, 0.25))
    together = np.concatenate([pools[name] for name in digits.SPLITS])
    assert len(together) == len(set(together.tolist())) == len(labels) == 1797
    for label in range(10):
        members = (labels == label).sum()
        shares = [(labels[pools[name]] == label).sum() / members for name in digits.SPLITS]
        np.testing.assert_allclose(shares, (0.6, 0.15, 0.25), atol=0.01)
    assert not np.array_equal(pools["test"], digits.partition_scans(seed=4)["test"])


def test_clutter_and_targets_come_from_the_split_pool_and_clutter_is_another_class(splits):
    _, labels = digits.load_scans()
    pools = digits.partition_scans(seed=3, fractions=SMALL.scan_fractions)
    for split in every_split(splits):
        assert split.all_scans <= set(pools[split.name].tolist())
        np.testing.assert_array_equal(labels[split.scans], split.labels)
        for spec in split.specs:
            assert all(labels[f.scan] != spec.label for f in spec.fragments)
            assert SMALL.fragments[0] <= len(spec.fragments) <= SMALL.fragments[1]


def test_class_balance_and_exact_distractor_shares(splits):
    for split in every_split(splits):
        assert np.bincount(split.labels, minlength=10).tolist() == [4] * 10
        for label in range(10):
            kinds = split.distractor_labels[split.labels == label]
            assert (kinds == label).sum() == 2  # distractor_match 0.5 of 4
            assert ((kinds >= 0) & (kinds != label)).sum() == 1  # distractor_other 0.25 of 4
            assert (kinds == -1).sum() == 1
        for i, path in enumerate(split.ids):
            assert path == f"{split.name}/{split.labels[i]}/{split.name}_{i:05d}.png"


def test_default_config_sizes():
    config = DigitsBenchmark()
    assert (config.image_size, config.train_per_class, config.val_per_class, config.test_per_class) == (64, 160, 30, 60)
    assert config.distractor_match == 0.8


# ----------------------------------------------------------------------------- ground truth against pixels


def torch_ink(scan: np.ndarray, height: int, width: int) -> np.ndarray:
    """The upscaled scan by torch's bilinear resize: an independent check of spn's own."""
    tensor = torch.from_numpy(np.array(scan, dtype=np.float64))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def test_upscale_matches_torch_bilinear():
    rng = np.random.default_rng(0)
    for height, width in [(18, 20), (34, 27), (8, 8), (5, 3), (1, 9)]:
        array = rng.random((8, 8))
        np.testing.assert_allclose(digits.upscale(array, height, width), torch_ink(array, height, width), atol=1e-12)


def test_masks_are_the_target_ink_above_the_threshold(splits):
    scans, _ = digits.load_scans()
    for split in every_split(splits):
        for i, spec in enumerate(split.specs):
            x, y, w, h = spec.xywh
            ink = np.zeros((64, 64))
            ink[y : y + h, x : x + w] = torch_ink(scans[spec.scan], h, w)
            expected = ink >= SMALL.mask_threshold
            ambiguous = np.abs(ink - SMALL.mask_threshold) < 1e-9
            assert np.array_equal(split.masks[i] & ~ambiguous, expected & ~ambiguous), split.ids[i]
            assert split.masks[i].sum() >= 10


def test_boxes_are_the_tight_boxes_of_the_masks_and_inside_the_image(splits):
    for split in every_split(splits):
        for i in range(len(split)):
            ys, xs = np.nonzero(split.masks[i])
            assert split.boxes[i].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()], split.ids[i]
            x0, y0, x1, y1 = split.boxes[i]
            assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
            x, y, w, h = split.specs[i].xywh  # the box lies in the digit's square
            assert x <= x0 and y <= y0 and x1 < x + w and y1 < y + h


def test_the_target_digit_is_drawn_exactly_with_its_ink(splits):
    # the image is render()'s; leaving the target out changes pixels inside its square only;
    # without noise, every pixel is (what lies under the digit) blended with its colour by its ink
    noiseless = dataclasses.replace(SMALL, noise_std=0.0)
    for split in every_split(splits):
        for i, spec in enumerate(split.specs):
            image, ink = render(spec, SMALL)
            np.testing.assert_array_equal(image, split.images[i])
            without, _ = render(spec, SMALL, target=False)
            changed = np.any(image != without, axis=-1)
            x, y, w, h = spec.xywh
            square = np.zeros((64, 64), bool)
            square[y : y + h, x : x + w] = True
            assert not (changed & ~square).any() and changed[split.masks[i]].mean() > 0.9, split.ids[i]
            clean, clean_ink = render(spec, noiseless)
            under, _ = render(spec, noiseless, target=False)
            np.testing.assert_array_equal(clean_ink, ink)
            expected = under + ink[..., None] * (np.asarray(spec.color) * 255 - under)
            assert np.abs(clean - expected).max() <= 1.0, split.ids[i]  # rounding of the layers below
            # the mask's pixels carry at least half the ink colour
            assert np.all(ink[split.masks[i]] >= SMALL.mask_threshold)


def test_the_distractor_is_drawn_in_its_box_only(splits):
    for split in every_split(splits):
        for i, spec in enumerate(split.specs):
            if spec.distractor is None:
                assert split.distractor_boxes[i].tolist() == [-1] * 4
                continue
            without, _ = render(dataclasses.replace(spec, distractor=None), SMALL)
            changed = np.any(split.images[i] != without, axis=-1)
            x0, y0, x1, y1 = split.distractor_boxes[i]
            outside = changed.copy()
            outside[y0 : y1 + 1, x0 : x1 + 1] = False
            assert not outside.any() and changed.any(), split.ids[i]


def test_distractor_is_beside_the_digit_and_never_overlaps_it(splits):
    for split in every_split(splits):
        for i, spec in enumerate(split.specs):
            if spec.distractor is None:
                continue
            dx0, dy0, dx1, dy1 = split.distractor_boxes[i]
            assert 0 <= dx0 <= dx1 < 64 and 0 <= dy0 <= dy1 < 64
            assert dx1 - dx0 == dy1 - dy0 and SMALL.distractor_size[0] <= dx1 - dx0 + 1 <= SMALL.distractor_size[1]
            x, y, w, h = spec.xywh  # the digit's square, which holds all of its ink
            gap_x = max(x - dx1 - 1, dx0 - (x + w))  # > 0 when the two are apart along x
            gap_y = max(y - dy1 - 1, dy0 - (y + h))
            assert max(gap_x, gap_y) >= SMALL.distractor_gap[0], split.ids[i]  # disjoint from the square
            bx0, by0, bx1, by1 = split.boxes[i]
            assert dx1 < bx0 or bx1 < dx0 or dy1 < by0 or by1 < dy0  # hence from the ground-truth box
            assert not split.masks[i][dy0 : dy1 + 1, dx0 : dx1 + 1].any()
            # beside: apart along one axis by a configured gap, overlapping along the other
            if gap_x > 0:
                assert SMALL.distractor_gap[0] <= gap_x <= SMALL.distractor_gap[1] and dy0 < y + h and y <= dy1
            else:
                assert SMALL.distractor_gap[0] <= gap_y <= SMALL.distractor_gap[1] and dx0 < x + w and x <= dx1


def test_distractor_patterns_differ_between_classes():
    patterns = np.stack([digits.distractor_pattern(label, 16).ravel() for label in range(10)])
    spectra = np.abs(np.fft.rfft2((patterns - patterns.mean(1, keepdims=True)).reshape(10, 16, 16))).reshape(10, -1)
    peaks = spectra.argmax(axis=1)  # the stripes' frequency and orientation
    assert len(set(peaks.tolist())) == 10


def test_linear_probes_see_the_context_cue():
    config = DigitsBenchmark(train_per_class=10, val_per_class=1, test_per_class=10)
    results = digits.linear_probes(generate(config, seed=1), max_iter=100)
    assert set(results) == {"pixels", "distractor", "distractor_ceiling", "digit"}
    assert results["distractor"] > 0.5  # chance is 0.1: the striped patch alone tells the class
    assert results["distractor_ceiling"] == pytest.approx(8 / 9)


# ----------------------------------------------------------------------------- the layout on disk

PATH = r"(train|val|test)/\d/\1_\d{5}\.png"


def read_lines(path: Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text and " " not in text, path
    return text[:-1].split("\n")


def test_layout_parses_and_matches_the_arrays(written, splits):
    root = written.root
    assert {p.name for p in root.iterdir()} == {
        "images", "masks", "metadata", "metadata_masks", "hierarchy.txt", "README.txt", "manifest.json"
    }  # fmt: skip
    for split in every_split(splits):
        name = split.name
        boxes_meta, masks_meta = written.metadata_root / name, written.mask_metadata_root / name
        for meta in (boxes_meta, masks_meta):
            assert sorted(p.name for p in meta.iterdir()) == [
                "class_labels.txt", "image_ids.txt", "image_sizes.txt", "localization.txt"
            ]  # fmt: skip
            ids = read_lines(meta / "image_ids.txt")
            assert ids == list(split.ids) and all(re.fullmatch(PATH, i) and i.startswith(name) for i in ids)
            labels = [line.split(",") for line in read_lines(meta / "class_labels.txt")]
            assert [(p, int(v)) for p, v in labels] == list(zip(split.ids, split.labels.tolist(), strict=True))
            assert all(path.split("/")[1] == label for path, label in labels)
            sizes = read_lines(meta / "image_sizes.txt")
            assert sizes == [f"{i},64,64" for i in ids]
        for i, line in enumerate(read_lines(boxes_meta / "localization.txt")):
            path, *box = line.split(",")
            assert path == split.ids[i] and len(box) == 4
            x0, y0, x1, y1 = map(int, box)
            assert [x0, y0, x1, y1] == split.boxes[i].tolist() and 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
        for i, line in enumerate(read_lines(masks_meta / "localization.txt")):
            path, mask_path, ignore_path = line.split(",")
            assert path == split.ids[i] and mask_path == path and ignore_path == f"{name}/ignore.png"
            with Image.open(written.mask_root / mask_path) as png:
                assert png.mode == "L" and png.size == (64, 64)
                mask = np.asarray(png)
            assert set(np.unique(mask).tolist()) == {0, 255}
            np.testing.assert_array_equal(mask == 255, split.masks[i])
            with Image.open(written.image_root / path) as png:
                assert png.mode == "RGB" and png.size == (64, 64)
                np.testing.assert_array_equal(np.asarray(png), split.images[i])
        with Image.open(written.mask_root / name / "ignore.png") as png:
            assert png.mode == "L" and png.size == (64, 64) and not np.asarray(png).any()
        images = sorted(p.relative_to(written.image_root).as_posix() for p in (written.image_root / name).rglob("*"))
        assert [p for p in images if p.endswith(".png")] == sorted(split.ids)


def test_hierarchy_manifest_and_readme(written, splits):
    lines = read_lines(written.hierarchy)
    rows = [tuple(map(int, line.split(","))) for line in lines]
    assert [row[0] for row in rows] == list(range(10))
    assert {row[1] for row in rows} == {0, 1} and all(row[1] == row[0] % 2 for row in rows)
    assert sorted(d for d, _, loops in rows if loops == 2) == [8]
    manifest = json.loads(written.manifest.read_text())
    assert manifest["seed"] == 3 and DigitsBenchmark.from_dict(manifest["config"]) == SMALL
    assert manifest["format_version"] == digits.FORMAT_VERSION
    assert manifest["content_sha256"] == digits.content_hash(splits)
    for name in digits.SPLITS:
        counts = manifest["counts"][name]
        assert counts["images"] == 40 and counts["per_class"] == [4] * 10
        assert (counts["distractor_match"], counts["distractor_other"], counts["distractor_none"]) == (20, 10, 10)
    assert manifest["files"] == len(tree(written.root)) - 1
    readme = (written.root / "README.txt").read_text()
    assert "seed 3" in readme and "train 40, val 40, test 40" in readme


# ----------------------------------------------------------------------------- atomic writes and re-runs


def test_rerun_with_the_same_settings_is_a_no_op(written, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in written.root.rglob("*")}

    def refuse(*args, **kwargs):
        raise AssertionError("generate() ran on a complete benchmark")

    monkeypatch.setattr(digits, "generate", refuse)
    assert write_benchmark(written.root, SMALL, seed=3) == written
    assert {p: p.stat().st_mtime_ns for p in written.root.rglob("*")} == before


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 4}, "seed"), ({"config": dataclasses.replace(SMALL, noise_std=0.1)}, "noise_std")],
)
def test_other_settings_on_an_existing_benchmark_raise(written, change, named):
    before = tree(written.root)
    arguments = {"config": SMALL, "seed": 3, **change}
    with pytest.raises(ValueError, match=f"other settings.*{named}"):
        write_benchmark(written.root, **arguments)
    assert tree(written.root) == before


def test_a_foreign_or_modified_directory_is_refused(tmp_path, written):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        write_benchmark(foreign, SMALL, seed=3)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for relative, data in tree(written.root).items():
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy / relative).write_bytes(data)
    assert write_benchmark(copy, SMALL, seed=3).root == copy  # an intact copy is reused
    (copy / "metadata" / "test" / "localization.txt").write_text("test/0/test_00000.png,0,0,1,1\n")
    with pytest.raises(ValueError, match="modified"):
        write_benchmark(copy, SMALL, seed=3)


def test_an_empty_directory_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    tiny = dataclasses.replace(SMALL, train_per_class=1, val_per_class=1, test_per_class=1)
    paths = write_benchmark(tmp_path / "empty", tiny, seed=0)
    assert len(read_lines(paths.metadata_root / "train" / "image_ids.txt")) == 10


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real_png, calls = digits._png, []

    def failing_png(array):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt("killed mid-write")
        return real_png(array)

    monkeypatch.setattr(digits, "_png", failing_png)
    with pytest.raises(KeyboardInterrupt):
        write_benchmark(tmp_path / "bench", SMALL, seed=3)
    assert len(calls) == 50
    assert list(tmp_path.iterdir()) == []  # neither the benchmark nor the temporary directory


KILLED_WRITER = """
import os, sys
import spn.data.digits as digits
print(sorted(m for m in ("sklearn",) if m in sys.modules), flush=True)  # what the import loaded
real_png, calls = digits._png, []
def png(array):
    calls.append(1)
    if len(calls) == 50:
        os._exit(9)  # like kill -9: no cleanup, no finally
    return real_png(array)
digits._png = png
config = digits.DigitsBenchmark(train_per_class=4, val_per_class=4, test_per_class=4)
digits.write_benchmark(sys.argv[1], config, seed=0)
"""


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory):
    """A fresh interpreter that imports spn.data.digits, then dies (os._exit) while writing."""
    folder = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", KILLED_WRITER, str(folder / "bench")]
    return folder, subprocess.run(command, env=env, capture_output=True, text=True)


def test_import_does_not_load_scikit_learn(killed_writer):
    # (Pillow is a dependency of spn.data now: its loaders decode images)
    _, result = killed_writer
    assert result.stdout.splitlines()[0] == "[]", result.stderr


def test_a_killed_write_leaves_no_partial_benchmark_and_a_rerun_completes(killed_writer):
    folder, result = killed_writer
    root = folder / "bench"
    assert result.returncode == 9, result.stderr
    assert not root.exists()
    (leftover,) = folder.iterdir()  # the hidden temporary directory, beside it, with 49 files
    assert leftover.name.startswith(".bench.tmp-") and len(list(leftover.rglob("*.png"))) == 49
    config = DigitsBenchmark(train_per_class=4, val_per_class=4, test_per_class=4)
    paths = write_benchmark(root, config, seed=0)
    assert len(read_lines(paths.metadata_root / "test" / "localization.txt")) == 40
    assert json.loads(paths.manifest.read_text())["files"] == len(tree(root)) - 1


def test_a_concurrent_writer_that_finishes_first_wins(tmp_path, monkeypatch):
    # another process completes the same benchmark while this one generates: this one's rename
    # fails, it finds the complete directory, and returns it without touching it
    root = tmp_path / "bench"
    tiny = dataclasses.replace(SMALL, train_per_class=1, val_per_class=1, test_per_class=1)
    real_generate = digits.generate

    def race(config, seed):
        monkeypatch.setattr(digits, "generate", real_generate)
        write_benchmark(root, config, seed)  # the other process
        return real_generate(config, seed)

    monkeypatch.setattr(digits, "generate", race)
    first = tree(tmp_path)
    assert first == {}
    assert write_benchmark(root, tiny, seed=0).root == root
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]
    assert json.loads((root / "manifest.json").read_text())["config"] == tiny.to_dict()


# ----------------------------------------------------------------------------- configuration and extras


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 40},  # a 34 px digit, a 4 px gap and an 18 px patch do not fit
        {"train_per_class": 0},
        {"scan_fractions": (0.5, 0.2, 0.2)},
        {"digit_size": (30, 20)},
        {"distractor_match": 0.8, "distractor_other": 0.3},
        {"fragment_crop": (3, 9)},
        {"noise_std": -0.1},
        {"mask_threshold": 0.0},
    ],
)
def test_bad_settings_raise(change):
    with pytest.raises(ValueError, match="DigitsBenchmark"):
        DigitsBenchmark(**change)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seeds_raise(seed, tmp_path):
    with pytest.raises(ValueError, match="seed"):
        generate(SMALL, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        write_benchmark(tmp_path / "bench", SMALL, seed=seed)
    assert not (tmp_path / "bench").exists()


def test_config_round_trips_through_json():
    config = dataclasses.replace(SMALL, aspect=(1, 1), digit_size=(10, 20))
    assert config.aspect == (1.0, 1.0) and all(type(v) is float for v in config.aspect)  # one JSON form
    assert DigitsBenchmark.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown"):
        DigitsBenchmark.from_dict({"colour": 1})


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    digits.load_scans.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ModuleNotFoundError, match=re.escape("spn-wsol[digits]")):
            digits.load_scans()
    finally:
        digits.load_scans.cache_clear()


def test_missing_pillow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("spn-wsol[digits]")):
        digits._png(np.zeros((4, 4), np.uint8))
