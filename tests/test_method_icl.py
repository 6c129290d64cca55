"""ICL (spn.methods.icl): the non-local block, the masks, the random selection and both losses
against loop-by-loop evaluations; our choices (anchor, margin, weights) tested as documented;
option checks; a training run through the harness (train, evaluate, resume)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness_checks import round_trip
from spn.methods import MethodError, Step, get_method
from spn.methods.icl import (
    ICL,
    ICLHead,
    NonLocalAttention,
    contrastive_attention_loss,
    foreground_consistency_loss,
    random_selection,
    region_features,
    selection_masks,
)
from spn.models import CAMHead, FeatureLevels, Network, small_cam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _normed(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.0 if high == low else (v - low) / (high - low) for v in values]


@pytest.mark.parametrize("subsample", [False, True])
def test_non_local_block_by_hand(subsample):
    torch.manual_seed(0)
    block = NonLocalAttention(3, inter_channels=2, subsample=subsample)
    torch.nn.init.normal_(block.out.weight)
    torch.nn.init.normal_(block.out.bias)
    height, width = 4, 5
    x = torch.randn(2, 3, height, width)
    got = block(x)

    def conv(layer, vector):
        w, b = layer.weight[:, :, 0, 0], layer.bias
        return [float(b[o]) + sum(float(w[o, i]) * vector[i] for i in range(len(vector))) for o in range(w.shape[0])]

    def keys_of(layer, grid):
        # 1x1 conv at every position, then (subsample) the max over each 2x2 window, floor
        mapped = {pos: conv(layer, vector) for pos, vector in grid.items()}
        if not subsample:
            return list(mapped.values())
        return [
            [max(mapped[(2 * r + dr, 2 * s + ds)][k] for dr in range(2) for ds in range(2)) for k in range(2)]
            for r in range(height // 2) for s in range(width // 2)
        ]  # fmt: skip

    for b in range(2):
        grid = {(r, s): [float(x[b, c, r, s]) for c in range(3)] for r in range(height) for s in range(width)}
        phis, gs = keys_of(block.phi, grid), keys_of(block.g, grid)
        assert len(phis) == (4 if subsample else 20)
        for (r, s), position in grid.items():
            theta = conv(block.theta, position)
            scores = [sum(t * f for t, f in zip(theta, phi, strict=True)) for phi in phis]
            top = max(scores)
            weights = [math.exp(v - top) for v in scores]
            weights = [w / sum(weights) for w in weights]
            mixed = [sum(weights[j] * gs[j][k] for j in range(len(gs))) for k in range(2)]
            expected = [position[c] + value for c, value in enumerate(conv(block.out, mixed))]
            for c in range(3):
                assert math.isclose(float(got[b, c, r, s]), expected[c], rel_tol=1e-4, abs_tol=1e-5)


def test_non_local_block_starts_as_identity():
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(NonLocalAttention(4)(x), x)


def test_selection_masks_by_hand_and_constant_attention_keeps_everything():
    torch.manual_seed(1)
    attention = torch.randn(3, 4, 4)
    attention[2] = 0.5
    drop, background, importance = selection_masks(attention, drop_threshold=0.7, background_threshold=0.3)
    for b in range(3):
        values = [float(v) for v in attention[b].flatten()]
        normed = _normed(values)
        constant = max(values) == min(values)
        for i in range(16):
            r, s = divmod(i, 4)
            assert float(drop[b, 0, r, s]) == (1.0 if constant or normed[i] < 0.7 else 0.0)
            assert float(background[b, 0, r, s]) == (1.0 if constant or normed[i] >= 0.3 else 0.0)
            assert math.isclose(float(importance[b, 0, r, s]), 1 / (1 + math.exp(-values[i])), rel_tol=1e-6)


def test_random_selection_draws_each_choice_with_its_probability():
    torch.manual_seed(2)
    features, attention = torch.rand(2, 3, 4, 4), torch.randn(2, 4, 4)
    drop, background, importance = selection_masks(attention)
    expected = {"drop": features * drop, "background": features * background, "importance": features * importance}
    generator = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(expected, 0)
    for _ in range(2000):
        out, which = random_selection(features, attention, generator=generator)
        counts[which] += 1
    for which in expected:
        out, _ = random_selection(features, attention, drop_rate=1.0, background_share=float(which == "background"))
        if which != "importance":
            torch.testing.assert_close(out, expected[which])
    torch.testing.assert_close(random_selection(features, attention, drop_rate=0.0)[0], expected["importance"])
    # drop_rate 0.75 split evenly: 0.375, 0.375, 0.25 (binomial sd ~ 0.011)
    assert abs(counts["drop"] / 2000 - 0.375) < 0.04
    assert abs(counts["background"] / 2000 - 0.375) < 0.04
    assert abs(counts["importance"] / 2000 - 0.25) < 0.04


def test_region_features_by_hand():
    torch.manual_seed(3)
    features = torch.randn(3, 2, 3, 3)
    attention = torch.rand(3, 3, 3)
    attention[2] = 1.0  # constant: everything background, no foreground -> invalid
    fg, dropped, bg, valid = region_features(features, attention, drop_threshold=0.75, background_threshold=0.25)
    for b in range(3):
        normed = _normed([float(v) for v in attention[b].flatten()])
        regions = {
            "fg": [i for i in range(9) if normed[i] >= 0.25],
            "dropped": [i for i in range(9) if 0.25 <= normed[i] < 0.75],
            "bg": [i for i in range(9) if normed[i] < 0.25],
        }
        for name, got in (("fg", fg), ("dropped", dropped), ("bg", bg)):
            for c in range(2):
                cells = [float(features[b, c, i // 3, i % 3]) for i in regions[name]]
                mean = sum(cells) / len(cells) if cells else 0.0
                assert math.isclose(float(got[b, c]), mean, rel_tol=1e-5, abs_tol=1e-6), (b, name)
        assert bool(valid[b]) == (bool(regions["dropped"]) and bool(regions["bg"]))
    assert not valid[2]
    # background_threshold 0: no background anywhere, so no image counts
    *_, no_background = region_features(features, attention, drop_threshold=0.75, background_threshold=0.0)
    assert not no_background.any()


@pytest.mark.parametrize("anchor", ["dropped", "foreground"])
def test_contrastive_attention_loss_by_hand(anchor):
    torch.manual_seed(4)
    fg, dr, bg = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    valid = torch.tensor([True, False, True, True, False])

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def squared(u, v):
        return sum((a - b) ** 2 for a, b in zip(u, v, strict=True))

    losses = []
    for b in range(5):
        u, v, w = unit(fg[b].tolist()), unit(dr[b].tolist()), unit(bg[b].tolist())
        a, positive = (v, u) if anchor == "dropped" else (u, v)
        losses.append(max(0.0, squared(a, positive) - squared(a, w) + 0.7))
    got = contrastive_attention_loss(fg, dr, bg, valid, margin=0.7, anchor=anchor)
    kept = [losses[b] for b in range(5) if valid[b]]
    assert math.isclose(float(got), sum(kept) / len(kept), rel_tol=1e-5)
    assert math.isclose(float(contrastive_attention_loss(fg, dr, bg, margin=0.7, anchor=anchor)), sum(losses) / 5,
                        rel_tol=1e-5)  # fmt: skip
    none = contrastive_attention_loss(fg, dr, bg, torch.zeros(5, dtype=torch.bool))
    assert float(none) == 0.0 and math.isfinite(float(none))


def test_contrastive_anchor_choices_differ_and_margin_matters():
    fg, dr, bg = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    # dropped anchor: d(v,u) = d(v,w) = 2 - sqrt(2) -> margin; foreground anchor: d(u,v) - d(u,w) = -sqrt(2)
    assert math.isclose(float(contrastive_attention_loss(fg, dr, bg, margin=1.0)), 1.0, rel_tol=1e-6)
    fg_anchor = contrastive_attention_loss(fg, dr, bg, margin=1.0, anchor="foreground")
    assert math.isclose(float(fg_anchor), 0.0, abs_tol=1e-6)
    assert math.isclose(float(contrastive_attention_loss(fg, dr, bg, margin=0.5)), 0.5, rel_tol=1e-6)


def test_foreground_consistency_by_hand_and_last_level_detached():
    torch.manual_seed(5)
    early = [torch.randn(2, 3, 3, requires_grad=True) for _ in range(2)]
    last = torch.randn(2, 3, 3, requires_grad=True)
    got = foreground_consistency_loss([*early, last])
    total = 0.0
    for level in early:
        squares = []
        for b in range(2):
            a = _normed([float(v) for v in level[b].flatten()])
            r = _normed([float(v) for v in last[b].flatten()])
            squares.extend((x - y) ** 2 for x, y in zip(a, r, strict=True))
        total += sum(squares) / len(squares)
    assert math.isclose(float(got), total / 2, rel_tol=1e-5)
    got.backward()
    assert last.grad is None and early[0].grad.abs().sum() > 0
    # a larger earlier level is resized (bilinear, align_corners=False): 2x2 -> 1x1 is its mean
    big, small = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor([[[3.0]]])  # normalised: mean 0.5 vs 0
    assert math.isclose(float(foreground_consistency_loss([big, small])), 0.25, rel_tol=1e-6)
    assert float(foreground_consistency_loss([small])) == 0.0


def _head(levels=2):
    torch.manual_seed(6)
    inner = CAMHead(8, num_classes=3)
    head = ICLHead([4, 8][-levels:], inner)
    features = [torch.rand(2, 4, 6, 6), torch.rand(2, 8, 3, 3)][-levels:]
    return head, inner, features


def test_head_eval_is_the_wrapped_head_on_the_non_local_output():
    head, inner, features = _head()
    torch.nn.init.normal_(head.blocks[1].out.weight)
    head.eval()
    z = head.blocks[1](features[1])
    torch.testing.assert_close(head(features), inner(z))
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(head.forward_with_maps(features, classes=labels).maps,
                               inner.forward_with_maps(z, classes=labels).maps)  # fmt: skip


def test_head_training_output_is_the_selection_and_the_losses():
    head, inner, features = _head()
    head.train()
    torch.manual_seed(7)
    out = head(features, torch.tensor([0, 1]))
    torch.manual_seed(7)
    z = [block(level) for block, level in zip(head.blocks, features, strict=True)]
    selected, _ = random_selection(z[1], z[1].mean(1))
    torch.testing.assert_close(out.logits, inner(selected))
    fg, dr, bg, valid = region_features(z[1], z[1].mean(1))
    expected = contrastive_attention_loss(*(head.projection(x) for x in (fg, dr, bg)), valid=valid)
    torch.testing.assert_close(out.contrastive, expected)
    torch.testing.assert_close(out.consistency, foreground_consistency_loss([z[0].mean(1), z[1].mean(1)]))
    with pytest.raises(ValueError, match="made for 2 feature levels, got 1"):
        head(features[1:])


def test_method_loss_is_ce_plus_weighted_terms_and_builds_on_feature_levels():
    torch.manual_seed(8)
    method = ICL(cal_weight=0.5, fcl_weight=2.0)
    model = method.build(small_cam(3, 8, widths=(4, 8, 8)), None)
    assert isinstance(model, Network) and isinstance(model.backbone, FeatureLevels)
    assert isinstance(model.head, ICLHead) and model.head.level_channels == [8, 8]
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([2, 1, 0, 0])
    out = method.loss(model, images, {"label": labels, "image": images}, Step(0, 1))
    logits = out.logits.detach()
    ce = -sum(float(torch.log_softmax(logits[b], 0)[labels[b]]) for b in range(4)) / 4
    assert math.isclose(float(out.parts["cls"]), ce, rel_tol=1e-5)
    expected = ce + 0.5 * float(out.parts["cal"]) + 2.0 * float(out.parts["fcl"])
    assert math.isclose(float(out.loss), expected, rel_tol=1e-5)
    maps = model.eval().forward_with_maps(images, classes=labels).maps
    assert maps.shape == (4, 16, 16)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"levels": 0}, "levels must be >= 1"),
     ({"cal_weight": -1}, "cal_weight must be >= 0"),
     ({"margin": -0.5}, "margin must be >= 0"),
     ({"drop_rate": 1.5}, r"drop_rate must be in \[0, 1\]"),
     ({"background_threshold": -0.1}, r"background_threshold must be in \[0, 1\]"),
     ({"anchor": "background"}, "anchor must be 'dropped' or 'foreground'"),
     ({"projection_dim": 0}, "projection_dim must be >= 1"),
     ({"gamma": 1}, "has no option 'gamma'")],
)  # fmt: skip
def test_bad_options_are_named(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("icl", options)


def test_too_many_levels_for_the_backbone_is_a_method_error():
    with pytest.raises(MethodError, match=r"option levels: levels must be in 1\.\.2"):
        ICL(levels=3).build(small_cam(3, 8, widths=(4, 8)), None)


def test_defaults_are_documented_choices():
    assert ICL().options == {
        "levels": 2, "cal_weight": 1.0, "fcl_weight": 1.0, "margin": 1.0, "anchor": "dropped", "projection_dim": 128,
        "drop_rate": 0.75, "background_share": 0.5, "drop_threshold": 0.8, "background_threshold": 0.2,
    }  # fmt: skip
    docs = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "icl.md").read_text()
    for key in ICL.defaults:
        assert f"`{key}`" in docs, key


# ---------------------------------------------------------------- the harness


def test_trains_evaluates_and_resumes(digits, tmp_path):
    lines, state = round_trip(digits, tmp_path, "icl")
    assert [line["images"] for line in lines] == [40, 40]
    assert {"loss_cls", "loss_cal", "loss_fcl"} <= set(lines[-1])
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert any(key.startswith("head.blocks.0.") for key in state) and "head.projection.weight" in state
