"""SPA (spn.methods.spa): the restricted activation loss, the self-correlation and the
self-correlation maps against loop-by-loop evaluations; the head; the method's options and
wiring; training and evaluation through the harness on a tiny digits set."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from harness_checks import round_trip
from spn.harness.config import ConfigError, RunConfig
from spn.methods import MethodError, Step, get_method
from spn.methods.spa import (
    SPA,
    RestrictedActivationLoss,
    SPAHead,
    combine_self_correlation,
    restricted_activation_loss,
    self_correlation,
    self_correlation_maps,
)
from spn.models import FeatureLevels, small_cam, small_sp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ----------------------------------------------------------------------------- references


def ref_ra_loss(maps: torch.Tensor, labels: torch.Tensor, theta: float, gap: float) -> float:
    batch, classes, height, width = maps.shape
    total = 0.0
    for b in range(batch):
        var = [[0.0] * width for _ in range(height)]
        for i, j in itertools.product(range(height), range(width)):
            exps = [math.exp(float(maps[b, c, i, j])) for c in range(classes)]
            probs = [e / sum(exps) for e in exps]
            mean = sum(probs) / classes
            var[i][j] = sum((p - mean) ** 2 for p in probs) / (classes - 1)
        low = min(min(row) for row in var)
        high = max(max(row) for row in var)
        for i, j in itertools.product(range(height), range(width)):
            v = (var[i][j] - low) / (high - low + 1e-15)
            m = 1 / (1 + math.exp(-float(maps[b, int(labels[b]), i, j])))
            total += m * (v < theta) + (1 - m) * (v > theta + gap)
    return total / (batch * height * width)


def ref_self_correlation(feats: torch.Tensor, fo: float, so: float, order: int) -> tuple[list, list]:
    """Per image: (first, high) as nested lists [i][j], plain Python."""
    out_first, out_high = [], []
    for b in range(feats.shape[0]):
        height, width = feats.shape[-2:]
        n = height * width
        vecs = []
        for i in range(n):
            v = [float(x) for x in feats[b, :, i // width, i % width]]
            norm = math.sqrt(sum(x * x for x in v))
            vecs.append([x / (norm + 1e-10) for x in v])
        s = [[max(0.0, sum(a * c for a, c in zip(vecs[i], vecs[j], strict=True))) for j in range(n)] for i in range(n)]
        s = [[x if x >= fo else 0.0 for x in row] for row in s]

        def colnorm(m, eps, n=n):
            sums = [sum(m[i][j] for i in range(n)) for j in range(n)]
            return [[m[i][j] / (sums[j] + eps) for j in range(n)] for i in range(n)]

        first = colnorm(s, 1e-5)
        base = colnorm([[0.0 if i == j else s[i][j] for j in range(n)] for i in range(n)], 1e-5)
        high = base
        for _ in range(order - 1):
            prod = [[sum(high[i][t] * base[t][j] for t in range(n)) for j in range(n)] for i in range(n)]
            high = colnorm(prod, 1e-10)
        high = [[x if x >= so / n else 0.0 for x in row] for row in high]
        out_first.append(first)
        out_high.append(high)
    return out_first, out_high


def ref_combine(first: list, high: list, weight: float) -> list:
    n = len(first)
    m = [[max(first[i][j], weight * high[i][j]) for j in range(n)] for i in range(n)]
    sums = [sum(m[i][j] for i in range(n)) for j in range(n)]
    return [[m[i][j] / (sums[j] + 1e-10) for j in range(n)] for i in range(n)]


def ref_minmax(values: list) -> list:
    low, high = min(values), max(values)
    return [(v - low) / (high - low + 1e-10) for v in values]


def ref_scm(cam: list, corr: list, fg: float, bg: float) -> list:
    """cam: flat list (n,), corr: [i][j]; returns the flat map."""
    n = len(cam)
    c = ref_minmax([max(0.0, v) for v in cam])
    columns = [ref_minmax([corr[i][j] for i in range(n)]) for j in range(n)]  # columns[j][i]

    def seeded(select):
        chosen = [j for j in range(n) if select(c[j])]
        if not chosen:
            return [0.0] * n
        return ref_minmax([sum(columns[j][i] for j in chosen) for i in range(n)])

    pos, neg = seeded(lambda v: v >= fg), seeded(lambda v: v <= bg)
    return ref_minmax([max(0.0, p - q) for p, q in zip(pos, neg, strict=True)])


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=1e-7)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize(("theta", "gap"), [(0.1, 0.2), (0.4, 0.1), (0.5, 0.0)])
def test_restricted_activation_loss_matches_loops(theta, gap):
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 3, 5, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([0, 3, 1])
    value = restricted_activation_loss(maps, labels, theta, gap)
    assert value.dtype == torch.float64
    close(value, ref_ra_loss(maps, labels, theta, gap), atol=1e-12)
    close(RestrictedActivationLoss(theta, gap)(maps, labels), ref_ra_loss(maps, labels, theta, gap), atol=1e-12)


def test_restricted_activation_loss_gradient_reaches_only_the_label_map():
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    restricted_activation_loss(maps, torch.tensor([2, 0])).backward()
    grad = maps.grad
    assert grad is not None and grad[0, 2].abs().sum() > 0 and grad[1, 0].abs().sum() > 0
    assert grad[0, :2].abs().sum() == 0 and grad[1, 1:].abs().sum() == 0


def test_restricted_activation_loss_degenerate_and_bad_input():
    # constant maps: variance constant -> normalised 0 -> all background; m = sigmoid(0)
    assert float(restricted_activation_loss(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]))) == pytest.approx(0.5)
    assert math.isfinite(float(restricted_activation_loss(torch.full((1, 2, 1, 1), 7.0), torch.tensor([1]))))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        restricted_activation_loss(torch.zeros(1, 3, 2, 2), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        restricted_activation_loss(torch.zeros(2, 3, 2, 2), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer tensor"):
        restricted_activation_loss(torch.zeros(1, 3, 2, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"class_maps must be a float tensor \(B, C, h, w\)"):
        restricted_activation_loss(torch.zeros(3, 2, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="gap finite and >= 0"):
        restricted_activation_loss(torch.zeros(1, 3, 2, 2), torch.tensor([0]), 0.1, -0.1)


# ----------------------------------------------------------------------- self-correlation


@pytest.mark.parametrize(("fo", "so", "order"), [(0.1, 0.5, 2), (0.2, 0.2, 3), (0.0, 0.0, 1), (-0.5, 0.5, 2)])
def test_self_correlation_matches_loops(fo, so, order):
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)  # negative entries: ReLU and fo matter
    first, high = self_correlation(feats, fo, so, order)
    ref_first, ref_high = ref_self_correlation(feats, fo, so, order)
    close(first, ref_first)
    close(high, ref_high)
    for weight in (2.0, 1.0):
        combined = combine_self_correlation(first, high, weight)
        close(combined, [ref_combine(f, h, weight) for f, h in zip(ref_first, ref_high, strict=True)])


def test_self_correlation_thresholds_bite_and_zero_features_stay_finite():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 4, 3, 3, generator=gen)
    first, high = self_correlation(feats, 0.1, 0.5, 2)
    assert (first == 0).any() and (high == 0).any()
    first, high = self_correlation(torch.zeros(1, 4, 2, 2))
    assert torch.isfinite(first).all() and torch.isfinite(high).all()
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        self_correlation(feats, order=0)
    with pytest.raises(ValueError, match="first and high must both be"):
        combine_self_correlation(first, torch.zeros(1, 3, 3))


def test_self_correlation_maps_match_loops():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)
    corr = combine_self_correlation(*self_correlation(feats))
    cams = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64)
    out = self_correlation_maps(cams, corr, 0.1, 0.05)
    assert out.shape == (2, 3, 3, 4)
    for b, k in itertools.product(range(2), range(3)):
        expected = ref_scm(cams[b, k].flatten().tolist(), corr[b].tolist(), 0.1, 0.05)
        close(out[b, k].flatten(), expected)


def test_self_correlation_maps_degenerate_seeds():
    corr = combine_self_correlation(*self_correlation(torch.rand(1, 4, 3, 3)))
    # constant CAM: no object seed (all background), the map is all zeros, not NaN
    out = self_correlation_maps(torch.zeros(1, 1, 3, 3), corr)
    assert torch.equal(out, torch.zeros(1, 1, 3, 3))
    # every location an object seed except none in background: no background seeds, finite
    cam = torch.linspace(0.5, 1.0, 9).view(1, 1, 3, 3)
    cam[0, 0, 0, 0] = 0.0  # min-max: 0 at one place -> one background seed; rest >= 0.1
    out = self_correlation_maps(cam, corr)
    expected = ref_scm(cam.flatten().tolist(), corr[0].tolist(), 0.1, 0.05)
    close(out.flatten(), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"correlation must have shape \(1, 9, 9\)"):
        self_correlation_maps(torch.zeros(1, 1, 3, 3), torch.zeros(1, 4, 4))


# ----------------------------------------------------------------------------- the head


def _head(scg: bool = True) -> SPAHead:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    return SPAHead(conv, nn.Linear(6, 3), scg=scg).double().eval()


def test_head_logits_are_the_mean_of_the_class_maps_with_bias():
    head = _head()
    feats = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    units = head.conv(feats)
    expected_maps = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    for b, c, i, j in itertools.product(range(2), range(3), range(5), range(5)):
        expected_maps[b, c, i, j] = (head.classifier.weight[c] * units[b, :, i, j]).sum() + head.classifier.bias[c]
    out = head(feats, target=torch.tensor([0, 2]))
    torch.testing.assert_close(out.class_maps, expected_maps)
    torch.testing.assert_close(out.logits, head.classifier(units.mean(dim=(2, 3))))
    torch.testing.assert_close(head(feats), out.logits)
    torch.testing.assert_close(head.compute(feats).logits, out.logits)


def test_head_maps_are_self_correlation_maps_of_the_pooled_levels():
    head = _head()
    shallow = torch.randn(2, 5, 10, 10, dtype=torch.float64)
    deep = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    _, maps, proposal = head.forward_with_maps([shallow, deep], classes=labels)
    assert proposal is None and maps.shape == (2, 5, 5)
    pooled = torch.zeros(2, 5, 5, 5, dtype=torch.float64)  # 2x2 max pooling by hand
    for b, c, i, j in itertools.product(range(2), range(5), range(5), range(5)):
        pooled[b, c, i, j] = shallow[b, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max()
    first_a, high_a = ref_self_correlation(pooled, 0.1, 0.5, 2)
    first_b, high_b = ref_self_correlation(deep, 0.1, 0.5, 2)
    cams = head(deep, target=labels).class_maps
    for b in range(2):
        a = ref_combine(first_a[b], high_a[b], 2.0)
        c = ref_combine(first_b[b], high_b[b], 2.0)
        corr = [[a[i][j] + c[i][j] for j in range(25)] for i in range(25)]
        expected = ref_scm(cams[b, int(labels[b])].flatten().tolist(), corr, 0.1, 0.05)
        close(maps[b].flatten(), expected, atol=1e-9)
    # "all" and top-k shapes, resizing
    assert head.forward_with_maps([shallow, deep], classes="all", size=(20, 20)).maps.shape == (2, 3, 20, 20)
    assert head.forward_with_maps(deep, classes=torch.tensor([[0, 1], [2, 0]])).maps.shape == (2, 2, 5, 5)


def test_head_without_scg_gives_the_class_maps():
    head = _head(scg=False)
    feats = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    maps = head.forward_with_maps(feats, classes=labels).maps
    cams = head(feats, target=labels).class_maps
    torch.testing.assert_close(maps, torch.stack([cams[0, 2], cams[1, 0]]))


# --------------------------------------------------------------------------- the method


def test_defaults_are_the_authors_cub_ones_and_every_number_is_an_option():
    method = get_method("spa")
    assert isinstance(method, SPA)
    assert method.options == {
        "ra_weight": 0.5, "start_epoch": 20, "bg_threshold": 0.1, "gap": 0.2, "scg": True, "scg_levels": 2,
        "fo_threshold": 0.1, "so_threshold": 0.5, "so_weight": 2.0, "order": 2, "object_seed": 0.1,
        "background_seed": 0.05,
    }  # fmt: skip
    ilsvrc = get_method("spa", {"start_epoch": "5", "bg_threshold": 0.4, "gap": 0.1, "fo_threshold": 0.2,
                                "so_threshold": 0.2, "so_weight": 1})  # fmt: skip
    assert ilsvrc.options["start_epoch"] == 5 and ilsvrc.options["so_weight"] == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [({"ra_weight": -1}, "ra_weight must be >= 0"),
     ({"start_epoch": -1}, "start_epoch must be >= 0"),
     ({"scg_levels": 0}, "scg_levels must be an int >= 1"),
     ({"order": 0}, "order must be an int >= 1"),
     ({"bg_threshold": float("nan")}, "bg_threshold must be a finite number"),
     ({"background_seed": 0.2}, r"background_seed \(0.2\) must be below object_seed \(0.1\)"),
     ({"start_epoch": 1.5}, "option start_epoch must be a int"),
     ({"theta": 1}, "has no option 'theta'")],
)  # fmt: skip
def test_bad_options_are_named(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("spa", options)


def test_build_keeps_the_head_conv_and_classifier_and_wraps_the_backbone():
    network = small_sp(5, 6, widths=(4, 8, 8))
    conv, classifier = network.head.conv, network.head.classifier
    built = SPA().build(network, None)
    assert isinstance(built.head, SPAHead) and built.head.conv is conv and built.head.classifier is classifier
    assert (built.head.in_channels, built.head.num_classes) == (8, 5)  # the backbone's channels, the classes
    assert isinstance(built.backbone, FeatureLevels) and built.backbone.levels == 2
    logits, maps, _ = built.eval().forward_with_maps(torch.rand(2, 3, 32, 32), classes=torch.tensor([0, 4]))
    assert logits.shape == (2, 5) and maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    single = SPA(scg_levels=1).build(small_cam(5, 8, widths=(4, 8)), None)
    assert not isinstance(single.backbone, FeatureLevels)
    with pytest.raises(MethodError, match="scg_levels=3"):
        SPA(scg_levels=3).build(small_cam(5, 8, widths=(4, 8)), None)


def test_loss_adds_the_restricted_activation_from_start_epoch():
    torch.manual_seed(0)
    network = SPA(start_epoch=2).build(small_cam(4, 8, widths=(4, 8)), None)
    images, labels = torch.rand(3, 3, 16, 16), torch.tensor([0, 3, 1])
    method = SPA(start_epoch=2, ra_weight=0.7)
    before = method.loss(network, images, {"label": labels}, Step(1, 5))
    logits = network(images)
    ce = -torch.log_softmax(logits, 1)[torch.arange(3), labels].mean()
    torch.testing.assert_close(before.loss, ce)
    assert float(before.parts["ra"]) == 0.0
    after = method.loss(network, images, {"label": labels}, Step(2, 5))
    maps = network(images, target=labels).class_maps.detach().double()
    expected = float(ce) + 0.7 * ref_ra_loss(maps, labels, 0.1, 0.2)
    assert float(after.loss) == pytest.approx(expected, rel=1e-5)
    assert float(after.parts["ra"]) == pytest.approx(ref_ra_loss(maps, labels, 0.1, 0.2), rel=1e-5)
    with pytest.raises(MethodError, match="single-label"):
        method.loss(network, images, {"label": labels, "labels": torch.zeros(3, 4)}, Step(2, 5))


def test_voc_is_refused(tmp_path):
    with pytest.raises((MethodError, ConfigError), match="single-label"):
        SPA().build(small_cam(4, 8, widths=(4, 8)), RunConfig(model="small_cam", out=str(tmp_path), dataset="voc",
                                                              data=str(tmp_path), method="spa"))  # fmt: skip


# ------------------------------------------------------------------ through the harness


def test_train_evaluate_and_resume_through_the_harness(mini_digits, tmp_path):
    options = ("--method-option", "start_epoch=1", "--batch-size", "5", "--widths", "4", "8", "8")
    lines, state = round_trip(mini_digits, tmp_path, "spa", *options)
    assert lines[0]["loss_ra"] == 0.0 and lines[1]["loss_ra"] > 0.0  # start_epoch=1: from the 2nd epoch
    assert any(key.startswith("backbone.backbone.") for key in state)
