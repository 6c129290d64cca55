"""DANet (spn.methods.danet): the hierarchy file, the cosine loss, the divergent levels and the
head's maps against loop-by-loop evaluations; the method's options and wiring; training and
evaluation through the harness on a tiny digits set with its three-level hierarchy."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from harness_checks import round_trip, train_method
from spn.__main__ import main as spn_main
from spn.data.digits import HIERARCHY
from spn.harness.checkpoint import load_checkpoint
from spn.harness.config import RunConfig
from spn.methods import MethodError, Step, get_method
from spn.methods.danet import (
    DANet,
    DANetHead,
    DivergentLevel,
    HierarchyError,
    cosine_discrepancy,
    divergent_activation_loss,
    read_hierarchy,
)
from spn.models import FeatureLevels, small_cam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ----------------------------------------------------------------------------- references


def ref_cos(a: list, b: list) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b) + 1e-8)


def ref_discrepancy(maps: torch.Tensor, per_pair: bool = True) -> float:
    batch, count = maps.shape[:2]
    pairs = count * (count - 1) / 2
    total = 0.0
    for b in range(batch):
        flat = [maps[b, m].flatten().tolist() for m in range(count)]
        values = [ref_cos(flat[i], flat[j]) for i in range(count) for j in range(i + 1, count)]
        total += sum(abs(v) for v in values) if per_pair else abs(sum(values))
    return total / (batch * pairs)


def ref_bilinear_corners(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with align_corners=True of a (h, w) map, by hand."""
    h, w = image.shape
    out = torch.zeros(height, width, dtype=image.dtype)
    for y, x in itertools.product(range(height), range(width)):
        sy = y * (h - 1) / (height - 1) if height > 1 else 0.0
        sx = x * (w - 1) / (width - 1) if width > 1 else 0.0
        y0, x0 = math.floor(sy), math.floor(sx)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        dy, dx = sy - y0, sx - x0
        out[y, x] = (
            image[y0, x0] * (1 - dy) * (1 - dx) + image[y0, x1] * (1 - dy) * dx
            + image[y1, x0] * dy * (1 - dx) + image[y1, x1] * dy * dx
        )  # fmt: skip
    return out


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=1e-7)


# ------------------------------------------------------------------------- the hierarchy


def test_read_hierarchy_reads_the_digits_file(tmp_path):
    file = tmp_path / "hierarchy.txt"
    file.write_text("".join(f"{d},{p},{c}\n" for d, p, c in reversed(HIERARCHY)) + "\n")  # any order, blank line
    table = read_hierarchy(file, 10)
    assert table.dtype == torch.long and table.shape == (3, 10)
    for digit, parity, loops in HIERARCHY:
        assert table[:, digit].tolist() == [digit, parity, loops]


@pytest.mark.parametrize(
    ("text", "message"),
    [("0,0\n1,x\n", r"h.txt:2: expected integers"),
     ("0,0\n1,-1\n", r"h.txt:2: indices must be >= 0"),
     ("0,0\n\n1,1,1\n", r"h.txt:3: 3 fields, but earlier lines have 2"),
     ("0,0\n0,1\n", r"h.txt:2: class 0 is listed twice"),
     ("0,0\n2,1\n", r"must list classes 0..1 once each; missing \[1\]"),
     ("0,0\n1,2\n", r"field 2 \(ancestor level 1\) never uses label\(s\) \[1\]"),
     ("\n\n", "empty hierarchy file")],
)  # fmt: skip
def test_read_hierarchy_names_file_and_line(tmp_path, text, message):
    file = tmp_path / "h.txt"
    file.write_text(text)
    with pytest.raises(HierarchyError, match=message):
        read_hierarchy(file)


def test_read_hierarchy_checks_the_class_count_and_the_file(tmp_path):
    file = tmp_path / "h.txt"
    file.write_text("0,0\n1,0\n")
    with pytest.raises(HierarchyError, match=r"classes 0..2 once each; missing \[2\]"):
        read_hierarchy(file, 3)
    with pytest.raises(HierarchyError, match="no such hierarchy file"):
        read_hierarchy(tmp_path / "absent.txt")


# -------------------------------------------------------------------------- the cos loss


@pytest.mark.parametrize("per_pair", [True, False])
def test_cosine_discrepancy_matches_loops(per_pair):
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64)
    close(cosine_discrepancy(maps, per_pair), ref_discrepancy(maps, per_pair))


def test_cosine_discrepancy_degenerate():
    assert float(cosine_discrepancy(torch.zeros(2, 4, 3, 3))) == 0.0  # zero maps: 0, not NaN
    assert float(cosine_discrepancy(torch.rand(2, 1, 3, 3))) == 0.0  # one map: no pair
    same = torch.rand(1, 1, 3, 3).expand(1, 3, 3, 3)
    assert float(cosine_discrepancy(same)) == pytest.approx(1.0, abs=1e-6)
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    cosine_discrepancy(maps).backward()
    assert maps.grad is not None and torch.isfinite(maps.grad).all()
    with pytest.raises(ValueError, match=r"maps must be a float tensor \(B, M, h, w\)"):
        cosine_discrepancy(torch.rand(3, 3, 3))


def _gt_maps_by_hand(level_maps, level_labels):
    largest = max((m.shape[-2:] for m in level_maps), key=lambda hw: hw[0] * hw[1])
    batch = level_maps[0].shape[0]
    stacked = []
    for b in range(batch):
        mine = []
        for maps, labels in zip(level_maps, level_labels, strict=True):
            for k in range(maps.shape[2]):
                mine.append(ref_bilinear_corners(maps[b, int(labels[b]), k], *largest))
        stacked.append(torch.stack(mine))
    return torch.stack(stacked)


def test_divergent_activation_loss_upsamples_the_label_maps_of_every_level():
    gen = torch.Generator().manual_seed(1)
    level_maps = [torch.randn(2, 2, 3, 6, 6, generator=gen, dtype=torch.float64),
                  torch.randn(2, 4, 3, 3, 3, generator=gen, dtype=torch.float64)]  # fmt: skip
    level_labels = [torch.tensor([1, 0]), torch.tensor([3, 2])]
    everything = _gt_maps_by_hand(level_maps, level_labels)
    close(divergent_activation_loss(level_maps, level_labels), ref_discrepancy(everything))
    close(divergent_activation_loss(level_maps, level_labels, sampled=99), ref_discrepancy(everything))
    # a sample of 4 of the 6 maps: one of the 15 subsets, the same for both images
    value = float(divergent_activation_loss(level_maps, level_labels, sampled=4, generator=gen))
    subsets = [ref_discrepancy(everything[:, list(s)]) for s in itertools.combinations(range(6), 4)]
    assert min(abs(value - s) for s in subsets) < 1e-9
    with pytest.raises(ValueError, match="one label tensor per level"):
        divergent_activation_loss(level_maps, level_labels[:1])


# ---------------------------------------------------------------------------- the levels


def test_divergent_level_is_class_major():
    torch.manual_seed(0)
    level = DivergentLevel(3, num_classes=2, maps_per_class=4, width=5, convs=0).double()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    out = level(x)
    weight, bias = level.classifier.weight[:, :, 0, 0], level.classifier.bias
    for c, k, i, j in itertools.product(range(2), range(4), range(2), range(2)):
        expected = sum(weight[c * 4 + k, ch] * x[0, ch, i, j] for ch in range(3)) + bias[c * 4 + k]
        assert float(out[0, c, k, i, j]) == pytest.approx(float(expected), abs=1e-12)
    deep = DivergentLevel(3, 2, 4, width=5, convs=2)
    assert len(deep.convs) == 4  # two 3x3 conv + ReLU
    for conv in (deep.convs[0], deep.convs[2], deep.classifier):  # the authors' init: Xavier uniform, zero bias
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert float(conv.weight.abs().max()) <= bound and float(conv.weight.abs().max()) > 0.8 * bound
        assert not conv.bias.any()


def _head(coarse: str = "top") -> DANetHead:
    torch.manual_seed(0)
    hierarchy = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 1, 0], [0, 0, 1, 1, 2]])  # classes, parity-like, groups
    return DANetHead([3, 4, 5], hierarchy, 5, maps_per_class=2, width=4, convs=1, coarse_maps=coarse).double().eval()


def _feats():
    gen = torch.Generator().manual_seed(5)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 4, 4)]
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def test_head_levels_logits_and_labels():
    head = _head()
    feats = _feats()
    target = torch.tensor([3, 4])
    out = head(feats, target=target)
    # coarsest first: level 0 reads the shallowest features, max-pooled 2x2 to 4x4
    pooled = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    for b, c, i, j in itertools.product(range(2), range(3), range(4), range(4)):
        pooled[b, c, i, j] = feats[0][b, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max()
    close(out.level_maps[0], head.levels[0](pooled))
    close(out.level_maps[2], head.levels[2](feats[2]))
    assert [tuple(m.shape) for m in out.level_maps] == [(2, 3, 2, 4, 4), (2, 2, 2, 4, 4), (2, 5, 2, 4, 4)]
    for maps, logits in zip(out.level_maps, out.level_logits, strict=True):
        for b, c in itertools.product(range(2), range(maps.shape[1])):
            assert float(logits[b, c]) == pytest.approx(float(maps[b, c].sum()) / maps[b, c].numel(), abs=1e-12)
    assert [labels.tolist() for labels in out.level_labels] == [[1, 2], [1, 0], [3, 4]]
    torch.testing.assert_close(head(feats), out.logits)


@pytest.mark.parametrize("coarse", ["top", "ancestor"])
def test_head_maps_sum_the_levels(coarse):
    head = _head(coarse)
    feats = _feats()
    out = head(feats, target=torch.zeros(2, dtype=torch.long))
    ancestors = {0: [0, 0, 1, 1, 2], 1: [0, 1, 0, 1, 0]}  # coarsest level 0, then 1

    def expected(b: int, cls: int, rank: int) -> torch.Tensor:
        total = torch.zeros(4, 4, dtype=torch.float64)
        for depth, maps in enumerate(out.level_maps):
            if depth == 2:
                c = cls
            elif coarse == "ancestor":
                c = ancestors[depth][cls]
            else:
                scores = out.level_logits[depth][b].tolist()
                c = sorted(range(len(scores)), key=lambda n: -scores[n])[min(rank, len(scores) - 1)]
            total += maps[b, c].clamp(min=0).mean(dim=0)
        return total

    labels = torch.tensor([2, 4])
    maps = head.forward_with_maps(feats, classes=labels).maps
    for b in range(2):
        close(maps[b], expected(b, int(labels[b]), 0))
    top = torch.tensor([[1, 0, 3], [4, 2, 0]])
    maps = head.forward_with_maps(feats, classes=top).maps
    for b, r in itertools.product(range(2), range(3)):
        close(maps[b, r], expected(b, int(top[b, r]), r))
    every = head.forward_with_maps(feats, classes="all", size=(8, 8)).maps
    assert every.shape == (2, 5, 8, 8)


def test_head_upsamples_to_the_largest_level_with_corners_aligned():
    torch.manual_seed(0)
    hierarchy = torch.tensor([[0, 1, 2], [0, 1, 1]])
    head = DANetHead([3, 3], hierarchy, 3, maps_per_class=2, width=4, convs=0, coarse_maps="ancestor").double()
    feats = [torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 3, 3, 3, dtype=torch.float64)]
    out = head(feats, target=torch.tensor([2]))
    assert out.level_maps[0].shape[-2:] == (2, 2)  # smaller than the last level: not pooled
    maps = head.forward_with_maps(feats, classes=torch.tensor([2])).maps
    fine = out.level_maps[1][0, 2].clamp(min=0).mean(0)  # 3x3, the largest
    coarse = ref_bilinear_corners(out.level_maps[0][0, 1].clamp(min=0).mean(0), 3, 3)
    close(maps[0], fine + coarse)
    # a larger level is max-pooled 2x2 with ceil mode: 5x5 -> 3x3 (windows [0:2], [2:4], [4:5])
    odd = [torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(1, 3, 3, 3, dtype=torch.float64)]
    pooled = torch.zeros(1, 3, 3, 3, dtype=torch.float64)
    for c, i, j in itertools.product(range(3), range(3), range(3)):
        pooled[0, c, i, j] = odd[0][0, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max()
    close(head(odd, target=torch.tensor([0])).level_maps[0], head.levels[0](pooled))


def test_head_validates_its_inputs():
    with pytest.raises(ValueError, match=r"hierarchy must be \(L, 4\)"):
        DANetHead([3], torch.tensor([[0, 1, 2]]), 4)
    with pytest.raises(ValueError, match="2 hierarchy levels need as many feature levels, got 1"):
        DANetHead([3], torch.tensor([[0, 1], [0, 0]]), 2)
    with pytest.raises(ValueError, match="coarse_maps must be"):
        DANetHead([3], None, 2, coarse_maps="mean")
    head = DANetHead([3], None, 2, width=4)
    assert head.ancestors.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="has 1 levels, got 2 feature maps"):
        head([torch.rand(1, 3, 2, 2)] * 2)


# --------------------------------------------------------------------------- the method


def test_defaults_are_the_authors():
    method = get_method("danet")
    assert isinstance(method, DANet)
    assert method.options == {
        "hierarchy": "auto", "maps_per_class": 8, "alpha": 0.01, "level_weight": 0.5, "sample_ratio": 1.5,
        "per_pair": True, "width": 0, "convs": 2, "coarse_maps": "top",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [({"maps_per_class": 0}, "maps_per_class must be >= 1"),
     ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
     ({"sample_ratio": float("inf")}, "sample_ratio must be a finite number >= 0"),
     ({"convs": -1}, "convs must be >= 0"),
     ({"coarse_maps": "mean"}, "coarse_maps must be 'top' or 'ancestor'"),
     ({"hierarchy": ""}, "hierarchy must be 'auto', 'none' or a file path"),
     ({"K": 8}, "has no option 'K'")],
)  # fmt: skip
def test_bad_options_are_named(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("danet", options)


def test_hierarchy_option(tmp_path):
    digits = RunConfig(model="small_cam", out=str(tmp_path / "run"), dataset="digits", method="danet")
    assert DANet().hierarchy_path(digits) == tmp_path / "run" / "digits" / "hierarchy.txt"
    assert DANet(hierarchy="none").hierarchy_path(digits) is None
    wsol = RunConfig(model="small_cam", out=str(tmp_path / "run"), dataset="wsol", data=str(tmp_path))
    assert DANet().hierarchy_path(wsol) is None
    assert DANet(hierarchy=str(tmp_path / "h.txt")).hierarchy_path(wsol) == tmp_path / "h.txt"
    # a single level without a hierarchy
    built = DANet(width=4).build(small_cam(3, 8, widths=(4, 8)), wsol)
    assert isinstance(built.backbone, FeatureLevels) and built.backbone.levels == 1
    assert len(built.head.levels) == 1
    # a file that does not fit the classes, a hierarchy deeper than the backbone
    (tmp_path / "h.txt").write_text("0,0\n1,1\n")
    with pytest.raises(HierarchyError, match=r"missing \[2\]"):
        DANet(hierarchy=str(tmp_path / "h.txt")).build(small_cam(3, 8, widths=(4, 8)), wsol)
    (tmp_path / "h.txt").write_text("0,0,0\n1,1,0\n")
    with pytest.raises(MethodError, match="a 3-level hierarchy needs 3 feature levels"):
        DANet(hierarchy=str(tmp_path / "h.txt")).build(small_cam(2, 8, widths=(4, 8)), wsol)
    voc = RunConfig(model="small_cam", out=str(tmp_path / "v"), dataset="voc", data=str(tmp_path))
    with pytest.raises(MethodError, match="single-label"):
        DANet().build(small_cam(3, 8, widths=(4, 8)), voc)


def test_loss_is_half_the_levels_ce_plus_alpha_cos(tmp_path):
    file = tmp_path / "h.txt"
    file.write_text("0,0\n1,1\n2,0\n3,1\n")
    wsol = RunConfig(model="small_cam", out=str(tmp_path / "run"), dataset="wsol", data=str(tmp_path))
    method = DANet(hierarchy=str(file), maps_per_class=3, sample_ratio=10, alpha=0.3, width=4, convs=1)
    torch.manual_seed(0)
    network = method.build(small_cam(4, 8, widths=(4, 8)), wsol)
    images, labels = torch.rand(3, 3, 16, 16), torch.tensor([0, 3, 2])
    out = method.loss(network, images, {"label": labels}, Step(0, 1))
    train = network(images, target=labels)
    parity = torch.tensor([0, 1, 0])
    ce_fine = -torch.log_softmax(train.level_logits[1], 1)[torch.arange(3), labels].mean()
    ce_coarse = -torch.log_softmax(train.level_logits[0], 1)[torch.arange(3), parity].mean()
    cos = ref_discrepancy(_gt_maps_by_hand([m.detach().double() for m in train.level_maps], [parity, labels]))
    assert float(out.loss) == pytest.approx(0.5 * float(ce_fine + ce_coarse) + 0.3 * cos, rel=1e-5)
    assert float(out.parts["cos"]) == pytest.approx(cos, rel=1e-5)
    assert float(out.parts["cls"]) == pytest.approx(float(ce_fine), rel=1e-6)
    assert float(out.parts["cls_level0"]) == pytest.approx(float(ce_coarse), rel=1e-6)
    torch.testing.assert_close(out.logits, network(images))
    with pytest.raises(MethodError, match="single-label"):
        method.loss(network, images, {"label": labels, "labels": torch.zeros(3, 4)}, Step(0, 1))


# ------------------------------------------------------------------ through the harness


def test_train_evaluate_and_resume_through_the_harness(mini_digits, tmp_path):
    options = ("--method-option", "width=8", "--method-option", "maps_per_class=4", "--method-option", "convs=1")
    lines, state = round_trip(mini_digits, tmp_path, "danet", *options, "--batch-size", "5", "--widths", "4", "8", "8")
    assert {"loss_cls", "loss_cls_level0", "loss_cls_level1", "loss_cos"} <= set(lines[-1])  # the digits' 3 levels
    assert "head.ancestors" in state


def test_a_run_keeps_its_hierarchy(mini_digits, tmp_path, capsys):
    # hierarchy=PATH: the run copies the file, so that resuming and evaluating need it no longer
    named = tmp_path / "elsewhere" / "levels.txt"
    named.parent.mkdir()
    named.write_bytes((mini_digits / "hierarchy.txt").read_bytes())
    options = ("--method-option", f"hierarchy={named}", "--method-option", "width=8", "--method-option",
               "maps_per_class=2", "--method-option", "convs=1", "--batch-size", "5", "--widths", "4", "8", "8")
    run = tmp_path / "run"
    assert train_method(mini_digits, run, 1, "danet", *options) == 0
    assert (run / "hierarchy.txt").read_bytes() == named.read_bytes()
    named.unlink()
    assert train_method(mini_digits, run, 2, "danet", *options, "--resume") == 0
    result = tmp_path / "eval.json"
    command = ["evaluate", "--run", str(run), "--split", "test", "--json", str(result), "--interval", "0.05"]
    assert spn_main(command) == 0, capsys.readouterr().err
    assert json.loads(result.read_text())["method"] == "danet"
    # a second run without --resume in that directory is refused, and its copy left as it was
    kept = (run / "hierarchy.txt").read_bytes()
    assert train_method(mini_digits, run, 1, "danet", "--method-option", "hierarchy=none") == 2
    assert (run / "hierarchy.txt").read_bytes() == kept
    # a fresh run with a single level leaves no copy of an earlier attempt behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "hierarchy.txt").write_bytes(kept)
    assert train_method(mini_digits, other, 1, "danet", "--method-option", "hierarchy=none", "--widths", "4", "8") == 0
    assert not (other / "hierarchy.txt").exists()
    assert load_checkpoint(other / "checkpoint.pt")["model"]["head.ancestors"].shape[0] == 1
    assert load_checkpoint(run / "checkpoint.pt")["model"]["head.ancestors"].shape[0] == 3  # the digits' levels
