"""Offline adversarial erasing (spn.methods.erasing) against a direct, loop-by-loop evaluation:
the top-fraction region, erasing to the mean pixel, the mean pixel, the merged map of the steps;
the options; the multi-step run through the harness (the erased images of step 2 recomputed here
from step 1's model, the run files, evaluate, and a run killed in step 2 resumed to the same
weights)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spn.data import DataError, ErasedRegions, WSOLDataset
from spn.data import transforms as T
from spn.data.erased import mask_file, read_mask, write_mask
from spn.harness.checkpoint import CheckpointError, load_checkpoint
from spn.harness.compare import _finished
from spn.harness.config import ConfigError, RunConfig, build_dataset
from spn.harness.distributed import Context
from spn.harness.evaluate import evaluate_run, load_trained
from spn.harness.train import _train, run
from spn.methods import MethodError, get_method
from spn.methods.erasing import (
    AdversarialErasing,
    MergedCAMNetwork,
    erase_pixels,
    mean_pixel,
    merge_maps,
    mine_regions,
    top_fraction_mask,
)
from spn.models import small_cam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ references


def ref_top(grid: list[list[float]], fraction: float) -> list[list[bool]]:
    """The floor(f * n + 0.5) largest values, ties in raster order; nothing on a constant map."""
    height, width = len(grid), len(grid[0])
    cells = [(grid[i][j], i * width + j) for i in range(height) for j in range(width)]
    chosen = [[False] * width for _ in range(height)]
    if max(v for v, _ in cells) == min(v for v, _ in cells):
        return chosen
    count = math.floor(fraction * height * width + 0.5)
    for _, position in sorted(cells, key=lambda cell: (-cell[0], cell[1]))[:count]:
        chosen[position // width][position % width] = True
    return chosen


def ref_normalize(grid: list[list[float]]) -> list[list[float]]:
    values = [v for row in grid for v in row]
    low, high = min(values), max(values)
    if high == low:
        return [[0.0] * len(row) for row in grid]
    return [[(v - low) / (high - low) for v in row] for row in grid]


def ref_merge(grids: list[list[list[float]]]) -> list[list[float]]:
    normalized = [ref_normalize(grid) for grid in grids]
    return [[max(n[i][j] for n in normalized) for j in range(len(grids[0][0]))] for i in range(len(grids[0]))]


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.05, 1.0, 0.0])
def test_top_fraction_mask_matches_the_loop(fraction):
    torch.manual_seed(0)
    maps = torch.randn(3, 5, 7)
    maps[1] = torch.randint(0, 3, (5, 7)).float()  # many ties
    maps[2] = 4.0  # constant: nothing mined
    got = top_fraction_mask(maps, fraction)
    for b in range(3):
        assert got[b].tolist() == ref_top(maps[b].tolist(), fraction), b
    assert not got[2].any()


def test_top_fraction_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction must lie in"):
        top_fraction_mask(torch.rand(3, 3), 1.5)
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w\)"):
        top_fraction_mask(torch.rand(3), 0.2)


def test_erase_pixels_sets_the_masked_pixels_to_the_fill():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    mask = rng.random((4, 5)) < 0.3
    got = erase_pixels(image, mask, (10, 20, 30))
    for i in range(4):
        for j in range(5):
            expected = [10, 20, 30] if mask[i, j] else image[i, j].tolist()
            assert got[i, j].tolist() == expected
    assert image.tolist() != got.tolist() or not mask.any()
    with pytest.raises(ValueError, match="mask must be"):
        erase_pixels(image, mask[:3], (0, 0, 0))
    with pytest.raises(ValueError, match="uint8"):
        erase_pixels(image.astype(np.float32), mask, (0, 0, 0))


def test_mean_pixel_counts_every_pixel_once(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((3, 4, 3), (5, 2, 3))]
    paths = []
    for number, array in enumerate(arrays):
        paths.append(tmp_path / f"{number}.png")
        Image.fromarray(array).save(paths[-1])
    sums, count = [0, 0, 0], 0
    for array in arrays:
        for row in array.tolist():
            for pixel in row:
                sums = [s + p for s, p in zip(sums, pixel, strict=True)]
                count += 1
    assert mean_pixel(paths) == pytest.approx([s / count for s in sums])
    with pytest.raises(ValueError, match="at least one"):
        mean_pixel([])


def test_erased_regions_erase_as_the_images_are_read(tmp_path):
    """A WSOL dataset given erasing masks returns each image with its mask's pixels at the fill,
    before its transforms; bad folders are named."""
    rng = np.random.default_rng(3)
    images, metadata = tmp_path / "images", tmp_path / "metadata" / "train"
    (images / "sub").mkdir(parents=True)
    metadata.mkdir(parents=True)
    arrays = {"a.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "sub/b.png": rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)}  # fmt: skip
    for name, array in arrays.items():
        Image.fromarray(array).save(images / name)
    (metadata / "image_ids.txt").write_text("a.png\nsub/b.png\n")
    (metadata / "class_labels.txt").write_text("a.png,0\nsub/b.png,1\n")
    (metadata / "image_sizes.txt").write_text("a.png,7,5\nsub/b.png,3,4\n")
    (metadata / "localization.txt").write_text("a.png,0,0,1,1\nsub/b.png,0,0,1,1\n")
    folder = tmp_path / "erased"
    masks = {name: rng.random(array.shape[:2]) < 0.4 for name, array in arrays.items()}
    for name, mask in masks.items():
        write_mask(mask_file(folder, name), mask)
    (folder / "erasing.json").write_text(json.dumps({"fill": [1, 2, 250]}))

    plain = WSOLDataset(images, tmp_path / "metadata", "train", normalize=False)
    erased = WSOLDataset(images, tmp_path / "metadata", "train", normalize=False, erased=ErasedRegions(folder))
    for index, name in enumerate(arrays):
        expected = arrays[name].astype(np.float32) / 255
        for i, j in zip(*np.nonzero(masks[name]), strict=True):
            expected[i, j] = np.array([1, 2, 250]) / 255
        got = erased[index]["image"].permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), name
        assert np.array_equal(plain[index]["image"].permute(1, 2, 0).numpy(), arrays[name] / np.float32(255))
    # the resize comes after the erasing: the erased image, resized
    small = WSOLDataset(images, tmp_path / "metadata", "train", resize=(2, 2), normalize=False,
                        erased=ErasedRegions(folder))  # fmt: skip
    reference = T.resize(Image.fromarray(ErasedRegions(folder).erase("a.png", arrays["a.png"])), (2, 2))
    assert np.array_equal(small[0]["image"].numpy(), T.to_tensor(reference, False).numpy())

    # bad folders, named
    mask_file(folder, "sub/b.png").unlink()
    with pytest.raises(DataError, match=r"image_ids.txt:2: image 'sub/b.png' has no erasing mask .*1 of the split's 2"):
        WSOLDataset(images, tmp_path / "metadata", "train", erased=ErasedRegions(folder))
    write_mask(mask_file(folder, "sub/b.png"), np.zeros((3, 4), dtype=bool))  # transposed
    with pytest.raises(DataError, match=r"b.png.png: the erasing mask is 4 x 3, the image 'sub/b.png' is 3 x 4"):
        WSOLDataset(images, tmp_path / "metadata", "train", erased=ErasedRegions(folder))[1]
    mask_file(folder, "sub/b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode the erasing mask"):
        WSOLDataset(images, tmp_path / "metadata", "train", erased=ErasedRegions(folder))[1]
    bad = {"{": "cannot read the erasing manifest", '{"fill": [1, 2]}': "three integers",
           '{"fill": [1, 2, 256]}': "three integers", '{"fill": [1, 2, true]}': "three integers"}  # fmt: skip
    for text, message in bad.items():
        (folder / "erasing.json").write_text(text)
        with pytest.raises(DataError, match=message):
            ErasedRegions(folder)
    (folder / "erasing.json").unlink()
    with pytest.raises(DataError, match=r"erasing\.json: no erasing manifest"):
        ErasedRegions(folder)

    # a mask stays inside its folder: no absolute paths, no '..'
    assert mask_file(folder, "sub/b.png") == folder / "masks" / "sub" / "b.png.png"
    for bad in ("/abs/a.png", "../a.png", "sub/../../a.png", "sub\\..\\..\\a.png", "C:\\a.png"):
        with pytest.raises(DataError, match=r"must be relative to the image root, without '\.\.'"):
            mask_file(folder, bad)
    Image.fromarray(arrays["a.png"]).save(tmp_path / "outside.png")
    (metadata / "image_ids.txt").write_text("a.png\n../outside.png\n")
    (metadata / "class_labels.txt").write_text("a.png,0\n../outside.png,1\n")
    (metadata / "image_sizes.txt").write_text("a.png,7,5\n../outside.png,7,5\n")
    (metadata / "localization.txt").write_text("a.png,0,0,1,1\n../outside.png,0,0,1,1\n")
    (folder / "erasing.json").write_text(json.dumps({"fill": [1, 2, 250]}))
    assert len(WSOLDataset(images, tmp_path / "metadata", "train")) == 2  # fine unerased
    with pytest.raises(DataError, match=r"image_ids.txt:2: '../outside.png': an erased image's path must be relative"):
        WSOLDataset(images, tmp_path / "metadata", "train", erased=ErasedRegions(folder))


def test_merge_maps_is_the_max_of_normalised_maps():
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 3, dtype=torch.float64) for _ in range(3)]
    maps[1][0] = 2.0  # a constant map counts as zeros
    got = merge_maps(maps)
    for b in range(2):
        expected = ref_merge([m[b].tolist() for m in maps])
        torch.testing.assert_close(got[b], torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="share a shape"):
        merge_maps([torch.rand(1, 3, 3), torch.rand(1, 4, 4)])


def test_merged_network_uses_the_first_classifier_for_logits_and_predictions():
    torch.manual_seed(0)
    nets = [small_cam(4, 6, widths=(8, 8)).eval() for _ in range(3)]
    merged = MergedCAMNetwork(nets).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), nets[0](images))
        classes = torch.tensor([1, 3])
        logits, maps, proposal = merged.forward_with_maps(images, classes=classes)
        assert proposal is None and maps.shape == (2, 32, 32)
        torch.testing.assert_close(logits, nets[0](images))
        for b in range(2):
            each = [n.forward_with_maps(images, classes=classes)[1][b].tolist() for n in nets]
            torch.testing.assert_close(maps[b], torch.tensor(ref_merge(each)))
        # "predicted" = the first classifier's argmax, used for every step's map
        predicted = nets[0](images).argmax(1)
        torch.testing.assert_close(merged.forward_with_maps(images)[1], merged.forward_with_maps(images, predicted)[1])
        every = merged.forward_with_maps(images, classes="all", size=None)[1]
        assert every.shape == (2, 4, 8, 8)


def test_options():
    assert get_method("ae").options == {"steps": 3, "fraction": 0.2, "merge": 3}
    assert AdversarialErasing(fraction="0.3").options["fraction"] == 0.3
    for options, message in (
        ({"steps": 0}, "steps must be a positive int"),
        ({"merge": -1}, "merge must be a positive int"),
        ({"fraction": 1.0}, r"fraction must lie in \(0, 1\)"),
        ({"fraction": 0}, r"fraction must lie in \(0, 1\)"),
        ({"step": 2}, "has no option 'step'"),
    ):
        with pytest.raises(MethodError, match=message):
            AdversarialErasing(**options)
    with pytest.raises(ConfigError, match="fraction"):
        RunConfig(model="small_cam", out="x", dataset="digits", method="ae", method_options={"fraction": 2})
    with pytest.raises(MethodError, match="multi-label VOC"):
        AdversarialErasing().build(small_cam(3), RunConfig(model="small_cam", out="x", dataset="voc", data="d"))


# ------------------------------------------------------------------ harness

def ae_config(data: Path, out: Path) -> RunConfig:
    return RunConfig(
        model="small_cam", out=str(out), dataset="digits", data=str(data), method="ae",
        method_options={"steps": 2, "fraction": 0.25}, epochs=2, batch_size=8, lr=0.05, widths=(8, 16), num_maps=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ae_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    run(ae_config(digits, out))
    return out


def test_run_files_and_evaluation(ae_run, digits):
    for step in (1, 2):
        assert load_checkpoint(ae_run / f"step{step}" / "checkpoint.pt")["epoch"] == 2
    top = load_checkpoint(ae_run / "checkpoint.pt")
    assert top["epoch"] == 2 and top["ae_steps"] == 2 and _finished(ae_run, 2)
    config = json.loads((ae_run / "config.json").read_text())
    assert (config["method"], config["num_classes"], config["out"]) == ("ae", 10, str(ae_run))
    lines = [json.loads(line) for line in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["epoch"]) for line in lines] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(line["seconds"] > 0 for line in lines)
    assert not list((ae_run / "erased").glob(".*"))  # no temporary folder left

    results = evaluate_run(ae_run, split="test", interval=0.05)
    assert results["method"] == "ae"
    for key in ("top1_cls", "max_box_acc_v2", "gt_known_loc", "pxap", "pointing_game"):
        assert 0.0 <= results[key] <= 1.0, key

    # the evaluated network: step 1's logits, the max of both steps' normalised maps
    config_obj = RunConfig.load(ae_run)
    model = AdversarialErasing(steps=2).load_model(config_obj, ae_run, load_trained).eval()
    assert isinstance(model, MergedCAMNetwork) and len(model.networks) == 2
    first = load_trained(dataclasses.replace(config_obj, out=str(ae_run / "step1"))).eval()
    images = build_dataset(config_obj, "test", train=False)[0]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(model(images), first(images))
    # merge=1: step 1's maps alone
    only = AdversarialErasing(steps=2, merge=1).load_model(config_obj, ae_run, load_trained)
    assert len(only.networks) == 1
    # one step's own run is its classifier alone, scored on the unerased test images
    step2_config = RunConfig.load(ae_run / "step2")
    single = AdversarialErasing(steps=2).load_model(step2_config, ae_run / "step2", load_trained).eval()
    assert not isinstance(single, MergedCAMNetwork)
    with torch.no_grad():
        torch.testing.assert_close(single(images), load_trained(step2_config).eval()(images))
    step_results = evaluate_run(ae_run / "step2", split="test", interval=0.05)
    assert all(0.0 <= step_results[key] <= 1.0 for key in ("top1_cls", "max_box_acc_v2", "pxap"))


def test_step_two_images_are_step_one_images_with_the_mined_region_erased(ae_run, digits):
    config = RunConfig.load(ae_run)
    manifest = json.loads((ae_run / "erased" / "step2" / "erasing.json").read_text())
    # the mean pixel of the training images, pixel by pixel
    train = build_dataset(dataclasses.replace(config, data=str(digits)), "train", train=False)
    pixels = np.concatenate([np.asarray(Image.open(digits / "images" / p).convert("RGB")).reshape(-1, 3)
                             for p in train.paths]).astype(np.float64)  # fmt: skip
    assert manifest["mean_pixel"] == pytest.approx(pixels.mean(axis=0).tolist())
    fill = [math.floor(v + 0.5) for v in manifest["mean_pixel"]]
    assert manifest["fill"] == fill

    step1 = load_trained(dataclasses.replace(config, out=str(ae_run / "step1"), data=str(digits))).eval()
    step2_config = AdversarialErasing(steps=2, fraction=0.25).step_config(config, 2)
    step2_train = build_dataset(step2_config, "train", train=True)
    step2_train.crop = None  # the training transforms without their random crop (digits: no flip)
    for index in (0, 7, len(train) - 1):
        item = train[index]
        with torch.no_grad():
            cam = step1.forward_with_maps(item["image"][None], classes=torch.tensor([item["label"]]), size=None)[1]
        height, width = item["size"]
        full = F.interpolate(cam[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        region = ref_top(full.tolist(), 0.25)
        assert sum(map(sum, region)) == math.floor(0.25 * height * width + 0.5)
        original = np.asarray(Image.open(digits / "images" / item["path"]).convert("RGB"))
        expected = original.copy()
        for i in range(height):
            for j in range(width):
                if region[i][j]:
                    expected[i, j] = fill
        # the mask on disk is the region, and step 2's training images are the originals erased by it
        assert read_mask(mask_file(ae_run / "erased" / "step2", item["path"])).tolist() == region
        item2 = step2_train[index]
        assert item2["path"] == item["path"]
        torch.testing.assert_close(item2["image"], T.to_tensor(Image.fromarray(expected), True), rtol=0, atol=0)

    # no copy of the training set: one mask per image and the manifest, nothing else
    files = sorted(path.relative_to(ae_run / "erased" / "step2") for path in (ae_run / "erased" / "step2").rglob("*")
                   if path.is_file())  # fmt: skip
    assert files == sorted([Path("erasing.json")] + [Path("masks") / f"{path}.png" for path in train.paths])
    masks = [read_mask(mask_file(ae_run / "erased" / "step2", path)) for path in train.paths]
    share = sum(int(mask.sum()) for mask in masks) / sum(mask.size for mask in masks)
    assert manifest["mined_share"] == manifest["erased_share"] == pytest.approx(share, rel=1e-12)
    # the evaluation split is never erased
    assert build_dataset(step2_config, "test", train=False).erased is None

    # the same regions from the public helper
    mined = dict(mine_regions(step1, train, 0.25))
    assert sorted(mined) == list(range(len(train)))


def test_killed_in_step_two_resumes_to_the_same_weights(ae_run, digits, tmp_path):
    out = tmp_path / "run"
    config = ae_config(digits, out)
    calls = []

    def killed_in_step_two(stage: RunConfig, resume: bool) -> dict:
        calls.append((Path(stage.out).name, resume))
        if Path(stage.out).name == "step2":
            _train(dataclasses.replace(stage, epochs=1), resume, Context())
            raise KeyboardInterrupt  # killed after epoch 1 of step 2
        return _train(stage, resume, Context())

    with pytest.raises(KeyboardInterrupt):
        config.training_method().fit(config, False, killed_in_step_two)
    assert calls == [("step1", False), ("step2", False)]
    assert not _finished(out, 2)
    with pytest.raises(CheckpointError, match="step 2 has trained 1 of 2 epochs"):
        evaluate_run(out, interval=0.05)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(config)
    with pytest.raises(ConfigError, match="same --epochs"):
        run(dataclasses.replace(config, epochs=3), resume=True)
    (out / "erased" / ".step2.tmp-1-dead").mkdir()  # a leftover of a kill while writing: ignored
    # a kill between an atomic write of a top-level file and its rename leaves its temporary
    # beside the whole file: the resumed run removes it (the steps' own folders are the harness's)
    stale = out / ".metrics.jsonl.k1lled_x.tmp"
    stale.write_bytes(b"part of the metrics")
    run(config, resume=True)
    assert not stale.exists()
    assert _finished(out, 2)
    for step in ("step1", "step2"):
        straight = load_checkpoint(ae_run / step / "checkpoint.pt")["model"]
        resumed = load_checkpoint(out / step / "checkpoint.pt")["model"]
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, msg=f"{step} {key}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["epoch"]) for line in lines] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_step_three_images_keep_the_earlier_erasures(ae_run, digits, tmp_path):
    """Step 3's images: step 2's images (already erased by step 1) with the region step 2's
    classifier mines on them erased too; step 4's masks hold step 3's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ae_run, out)
    config = dataclasses.replace(RunConfig.load(out), out=str(out), method_options={"steps": 3, "fraction": 0.25})
    method = config.training_method()
    method._write_erased(config, 3)
    step2_manifest = json.loads((out / "erased" / "step2" / "erasing.json").read_text())
    step3_manifest = json.loads((out / "erased" / "step3" / "erasing.json").read_text())
    assert step3_manifest["mean_pixel"] == step2_manifest["mean_pixel"]  # the training images' mean, once
    fill = step2_manifest["fill"]
    step2 = load_trained(method.step_config(config, 2)).eval()
    images2 = build_dataset(method.step_config(config, 2), "train", train=False)
    for index in (1, len(images2) - 2):
        path = images2.paths[index]
        original = np.asarray(Image.open(digits / "images" / path).convert("RGB"))
        before = original.copy()  # step 2's image: the original with step 2's mask at the fill
        before[read_mask(mask_file(out / "erased" / "step2", path))] = fill
        image = T.to_tensor(Image.fromarray(before), True)
        torch.testing.assert_close(images2[index]["image"], image, rtol=0, atol=0)  # what step 2 trained on
        with torch.no_grad():  # the region step 2's classifier mines on it
            cam = step2.forward_with_maps(image[None], classes=torch.tensor([images2.labels[index]]), size=None)[1]
        height, width = original.shape[:2]
        full = F.interpolate(cam[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        region = ref_top(full.tolist(), 0.25)
        after = ErasedRegions(out / "erased" / "step3").erase(path, original)
        erased_before = 0
        for i in range(height):
            for j in range(width):
                was_erased = before[i, j].tolist() != original[i, j].tolist()
                erased_before += was_erased
                expected = fill if (region[i][j] or was_erased) else original[i, j].tolist()
                assert after[i, j].tolist() == expected, (index, i, j)
        assert erased_before > 0

    # step 4 (step 2's classifier standing in for step 3's): its masks hold step 3's, and more
    shutil.copytree(out / "step2", out / "step3")
    config4 = dataclasses.replace(config, method_options={"steps": 4, "fraction": 0.25})
    config4.training_method()._write_erased(config4, 4)
    grown = 0
    for path in images2.paths:
        step3_mask = read_mask(mask_file(out / "erased" / "step3", path))
        step4_mask = read_mask(mask_file(out / "erased" / "step4", path))
        assert not (step3_mask & ~step4_mask).any(), path
        grown += int(step4_mask.sum() - step3_mask.sum())
    assert grown > 0


def test_a_run_with_erased_image_copies_is_refused(ae_run, tmp_path):
    """Runs of an older spn kept erased copies of the images where masks are kept now: named, not
    silently trained on the unerased images."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ae_run, out)
    shutil.rmtree(out / "erased" / "step2" / "masks")
    (out / "erased" / "step2" / "images").mkdir()
    config = dataclasses.replace(RunConfig.load(out), out=str(out))
    with pytest.raises(MethodError, match=r"step2: holds erased image copies, written by an older spn"):
        config.training_method()._write_erased(config, 2)


def test_resuming_a_step_keeps_its_erasing_and_a_bad_manifest_is_named(ae_run, tmp_path):
    """A step's run may find its masks folder moved, not gone (nor a plain run gain one); a
    step-2 manifest without the mean pixel later steps fill with is named."""
    import shutil

    from spn.harness.train import _check_same_run

    step2 = RunConfig.load(ae_run / "step2")
    state = load_checkpoint(ae_run / "step2" / "checkpoint.pt")
    _check_same_run(dataclasses.replace(step2, erased="/elsewhere/erased/step2"), state, Path("c.pt"))
    with pytest.raises(CheckpointError, match=r"another run .*erased"):
        _check_same_run(dataclasses.replace(step2, erased=None), state, Path("c.pt"))
    step1_state = load_checkpoint(ae_run / "step1" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"another run .*erased"):
        _check_same_run(dataclasses.replace(step2, out=str(ae_run / "step1")), step1_state, Path("c.pt"))

    out = tmp_path / "run"
    shutil.copytree(ae_run, out)
    manifest = out / "erased" / "step2" / "erasing.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "mean_pixel": [1, 2]}))
    config = dataclasses.replace(RunConfig.load(out), out=str(out), method_options={"steps": 3, "fraction": 0.25})
    with pytest.raises(MethodError, match=r"step2/erasing\.json: 'mean_pixel' must be three numbers"):
        config.training_method()._write_erased(config, 3)


def test_masks_reach_the_disk_before_their_folder_appears(ae_run, tmp_path, monkeypatch):
    import os
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ae_run, out)
    shutil.rmtree(out / "erased" / "step2")
    calls = []
    real_rename = os.rename
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(("rename", Path(b).name)), real_rename(a, b)))
    config = dataclasses.replace(RunConfig.load(out), out=str(out))
    config.training_method()._write_erased(config, 2)
    assert calls == ["sync", ("rename", "step2")]
