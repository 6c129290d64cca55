"""ACoL (spn.methods.acol) against a direct, loop-by-loop evaluation of its formulas: min-max
normalisation, erasing at >= delta, the two branches' architecture and mean pooling, the
fused map max(norm A, norm B), the loss CE_A + CE_B; the options; training through the
harness (train, evaluate, resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness_checks import round_trip
from spn.harness.config import ConfigError, RunConfig
from spn.methods import MethodError, Step, get_method
from spn.methods.acol import ACoL, ACoLHead, ACoLOutput, acol_loss, erase_features, normalize_maps
from spn.models import small_cam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ references


def ref_normalize(grid: list[list[float]]) -> list[list[float]]:
    values = [v for row in grid for v in row]
    low, high = min(values), max(values)
    if high == low:
        return [[0.0 for _ in row] for row in grid]
    return [[(v - low) / (high - low) for v in row] for row in grid]


def ref_smooth(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean with zero padding, divisor 9 everywhere, one position at a time. x: (C, h, w)."""
    channels, height, width = x.shape
    out = torch.zeros_like(x, dtype=torch.float64)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                total = 0.0
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        if 0 <= i + di < height and 0 <= j + dj < width:
                            total += float(x[c, i + di, j + dj])
                out[c, i, j] = total / 9
    return out


def ref_branch(classifier: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """conv3x3 -> relu -> conv3x3 -> relu -> conv1x1, from the weights (float64). x: (C, h, w)."""
    convs = [m for m in classifier if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    w = [(c.weight.double(), c.bias.double()) for c in convs]
    h = torch.relu(F.conv2d(x[None].double(), w[0][0], w[0][1], padding=1))
    h = torch.relu(F.conv2d(h, w[1][0], w[1][1], padding=1))
    return F.conv2d(h, w[2][0], w[2][1])[0]


def ref_mean(grid: torch.Tensor) -> float:
    return sum(float(v) for v in grid.flatten()) / grid.numel()


def ref_head(head: ACoLHead, features: torch.Tensor, erase_classes: list[int]) -> dict[str, list]:
    """Per image: A's maps and logits, B's maps and logits on the erased features."""
    out: dict[str, list] = {"logits_a": [], "logits_b": [], "maps_a": [], "maps_b": []}
    for b in range(features.shape[0]):
        x = ref_smooth(features[b]) if head.smooth else features[b].double()
        maps_a = ref_branch(head.classifier_a, x)
        attention = ref_normalize(maps_a[erase_classes[b]].tolist())
        erased = x.clone()
        for i, row in enumerate(attention):
            for j, value in enumerate(row):
                if value >= head.delta:
                    erased[:, i, j] = 0.0
        maps_b = ref_branch(head.classifier_b, erased)
        out["maps_a"].append(maps_a)
        out["maps_b"].append(maps_b)
        out["logits_a"].append([ref_mean(maps_a[c]) for c in range(maps_a.shape[0])])
        out["logits_b"].append([ref_mean(maps_b[c]) for c in range(maps_b.shape[0])])
    return out


def ref_fused(maps_a: torch.Tensor, maps_b: torch.Tensor, c: int) -> torch.Tensor:
    a, b = ref_normalize(maps_a[c].tolist()), ref_normalize(maps_b[c].tolist())
    return torch.tensor([[max(x, y) for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)])


def ref_cross_entropy(logits: list[list[float]], labels: list[int]) -> float:
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total / len(labels)


def small_head(delta: float = 0.6, smooth: bool = True, seed: int = 0) -> ACoLHead:
    torch.manual_seed(seed)
    return ACoLHead(3, num_classes=4, num_maps=5, delta=delta, smooth=smooth).double()


# ------------------------------------------------------------------ formulas


def test_normalize_maps_is_min_max_per_map_and_zero_on_constant_maps():
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    maps[1, 2] = 7.0  # constant
    got = normalize_maps(maps)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(got[b, c], torch.tensor(ref_normalize(maps[b, c].tolist()), dtype=torch.float64))
    assert torch.isfinite(got).all() and (got[1, 2] == 0).all()
    with pytest.raises(ValueError, match="floating tensor"):
        normalize_maps(torch.ones(2, 3, dtype=torch.int64))


def test_erase_features_zeroes_positions_at_or_above_delta():
    features = torch.randn(2, 3, 3, 4)
    attention = torch.rand(2, 3, 4)
    attention[0, 1, 1] = 0.6  # exactly delta: erased (>=)
    got = erase_features(features, attention, 0.6)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                expected = torch.zeros(3) if float(attention[b, i, j]) >= 0.6 else features[b, :, i, j]
                torch.testing.assert_close(got[b, :, i, j], expected)
    assert (got[0, :, 1, 1] == 0).all()
    with pytest.raises(ValueError, match="attention"):
        erase_features(features, attention[:, :2], 0.6)


@pytest.mark.parametrize(("delta", "smooth"), [(0.6, True), (0.3, False), (1.0, True)])
def test_training_output_matches_the_loop(delta, smooth):
    head = small_head(delta, smooth)
    features = torch.randn(3, 3, 5, 6, dtype=torch.float64)
    target = torch.tensor([1, 3, 0])
    out = head(features, target)
    assert isinstance(out, ACoLOutput)
    ref = ref_head(head, features, target.tolist())
    torch.testing.assert_close(out.logits_a, torch.tensor(ref["logits_a"], dtype=torch.float64))
    torch.testing.assert_close(out.logits_b, torch.tensor(ref["logits_b"], dtype=torch.float64))
    torch.testing.assert_close(out.maps_b, torch.stack(ref["maps_b"]))
    # inference: A's logits alone (the authors' val script and wsolevaluation classify with A)
    torch.testing.assert_close(head(features), out.logits_a)


def test_erasing_uses_the_target_class_map_of_a():
    head = small_head(0.5)
    features = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for target in ([0, 0], [2, 1]):
        out = head(features, torch.tensor(target))
        ref = ref_head(head, features, target)
        torch.testing.assert_close(out.logits_b, torch.tensor(ref["logits_b"], dtype=torch.float64))


def test_branch_b_gets_no_gradient_from_erased_positions():
    head = small_head(0.5, smooth=False)
    features = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = head(features, torch.tensor([2]))
    (grad,) = torch.autograd.grad(out.logits_b.sum(), features)
    attention = ref_normalize(out.maps_a[0, 2].tolist())
    erased = [(i, j) for i in range(5) for j in range(5) if attention[i][j] >= 0.5]
    assert erased  # the peak of a non-constant map is always erased
    for i, j in erased:
        assert (grad[0, :, i, j] == 0).all()
    kept = [(i, j) for i in range(5) for j in range(5) if attention[i][j] < 0.5]
    assert any(grad[0, :, i, j].abs().sum() > 0 for i, j in kept)


def test_forward_with_maps_fuses_normalised_maps_of_the_requested_classes():
    head = small_head(0.6)
    features = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    classes = torch.tensor([3, 1])
    logits, maps, proposal = head.forward_with_maps(features, classes=classes)
    ref = ref_head(head, features, classes.tolist())
    assert proposal is None
    torch.testing.assert_close(logits, torch.tensor(ref["logits_a"], dtype=torch.float64))
    for b, c in enumerate(classes.tolist()):
        torch.testing.assert_close(maps[b], ref_fused(ref["maps_a"][b], ref["maps_b"][b], c).double())

    # "predicted": erased and mapped with A's top class
    logits, maps, _ = head.forward_with_maps(features, classes="predicted")
    predicted = [max(range(4), key=lambda c, row=row: row[c]) for row in ref["logits_a"]]
    ref = ref_head(head, features, predicted)
    for b, c in enumerate(predicted):
        torch.testing.assert_close(maps[b], ref_fused(ref["maps_a"][b], ref["maps_b"][b], c).double())

    # (B, k) and "all": each class its own erasure, same as asking for it alone
    pairs = torch.tensor([[0, 2], [1, 1]])
    stacked = head.forward_with_maps(features, classes=pairs).maps
    every = head.forward_with_maps(features, classes="all").maps
    assert stacked.shape == (2, 2, 4, 4) and every.shape == (2, 4, 4, 4)
    for b in range(2):
        for c in range(4):
            alone = head.forward_with_maps(features, classes=torch.full((2,), c)).maps[b]
            torch.testing.assert_close(every[b, c], alone)
        for k in range(2):
            torch.testing.assert_close(stacked[b, k], every[b, int(pairs[b, k])])

    resized = head.forward_with_maps(features, classes=classes, size=(8, 12)).maps
    assert resized.shape == (2, 8, 12)


def test_constant_features_give_finite_maps():
    head = small_head(0.6, smooth=False)
    out = head.forward_with_maps(torch.zeros(1, 3, 4, 4, dtype=torch.float64), classes=torch.tensor([1]))
    assert torch.isfinite(out.maps).all()


def test_loss_is_the_sum_of_both_cross_entropies():
    logits_a, logits_b = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    expected = ref_cross_entropy(logits_a.tolist(), labels.tolist()) + ref_cross_entropy(
        logits_b.tolist(), labels.tolist()
    )
    assert float(acol_loss(logits_a, logits_b, labels)) == pytest.approx(expected, rel=1e-5)

    method = ACoL(num_maps=4)
    network = method.build(small_cam(4, widths=(8, 8)), RunConfig(model="small_cam", out="x", dataset="digits"))
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 1])
    out = method.loss(network, images, {"label": labels}, Step(0, 1))
    direct = network(images, target=labels)
    expected = ref_cross_entropy(direct.logits_a.tolist(), labels.tolist()) + ref_cross_entropy(
        direct.logits_b.tolist(), labels.tolist()
    )
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert set(out.parts) == {"cls_a", "cls_b"}
    torch.testing.assert_close(out.logits, direct.logits_a)


# ------------------------------------------------------------------ options


def test_options_and_build():
    assert get_method("acol").options == {"delta": 0.6, "num_maps": None, "smooth": True}
    assert get_method("acol", {"delta": "0.7"}).options["delta"] == 0.7
    for options, message in (
        ({"delta": 1.5}, "delta must be a number in \\[0, 1\\]"),
        ({"num_maps": 0}, "num_maps must be a positive int"),
        ({"gamma": 1}, "has no option 'gamma'"),
    ):
        with pytest.raises(MethodError, match=message):
            ACoL(**options)
    with pytest.raises(ValueError, match="delta must lie in"):
        ACoLHead(4, 3, delta=-0.1)
    with pytest.raises(ValueError, match="expects features"):
        ACoLHead(4, 3, num_maps=2)(torch.randn(1, 5, 3, 3))
    small = RunConfig(model="small_cam", out="x", dataset="digits")
    net = ACoL().build(small_cam(5, widths=(8, 8)), small)
    assert isinstance(net.head, ACoLHead) and net.head.num_maps == 128 and net.head.num_classes == 5
    assert ACoL()._num_maps(RunConfig(model="vgg16_cam", out="x", data="d")) == 1024
    with pytest.raises(MethodError, match="multi-label VOC"):
        ACoL().build(small_cam(5, widths=(8, 8)), RunConfig(model="small_cam", out="x", dataset="voc", data="d"))
    with pytest.raises(ConfigError, match="delta"):
        RunConfig(model="small_cam", out="x", dataset="digits", method="acol", method_options={"delta": 2})


def test_head_takes_the_last_of_a_list_of_levels():
    head = small_head()
    features = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(head([torch.randn(2, 7, 8, 8, dtype=torch.float64), features]), head(features))


# ------------------------------------------------------------------ harness


def test_train_evaluate_and_resume_through_the_harness(digits, tmp_path):
    lines, state = round_trip(digits, tmp_path, "acol", "--method-option", "num_maps=8", "--method-option", "delta=0.7")
    assert any(key.startswith("head.classifier_b.") for key in state)
    assert all(line["loss"] == pytest.approx(line["loss_cls_a"] + line["loss_cls_b"]) for line in lines)
