"""The method contract (spn.methods.base): options, registry, and how the harness calls it."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from spn.harness.config import ConfigError, RunConfig
from spn.methods import METHODS, Method, MethodError, Step, get_method, parse_options


class _Toy(Method):
    name = "toy"
    defaults: ClassVar[dict[str, Any]] = {"delta": 0.6, "steps": 3, "flag": False, "label": "x"}


def test_options_default_and_converted():
    method = _Toy(delta="0.7", steps=4, flag="true")
    assert method.options == {"delta": 0.7, "steps": 4, "flag": True, "label": "x"}
    assert _Toy().options["delta"] == 0.6


@pytest.mark.parametrize(
    ("options", "message"),
    [({"gamma": 1}, "has no option 'gamma' (its options: delta, flag, label, steps)"),
     ({"steps": 2.5}, "option steps must be a int"),
     ({"flag": "maybe"}, "option flag must be a bool")],
)  # fmt: skip
def test_bad_options_name_the_option(options, message):
    with pytest.raises(MethodError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _Toy(**options)


def test_parse_options_reads_json_then_text():
    assert parse_options(["delta=0.7", "name=cub", "levels=[1, 2]", "flag=true"]) == {
        "delta": 0.7, "name": "cub", "levels": [1, 2], "flag": True,
    }  # fmt: skip
    with pytest.raises(MethodError, match="KEY=VALUE"):
        parse_options(["delta"])


def test_registry_names_every_seed_method():
    assert set(METHODS) == {"default", "ae", "acol", "spa", "i2c", "danet", "icl"}
    with pytest.raises(MethodError, match="unknown method 'cutmix'"):
        get_method("cutmix")


def test_default_loss_is_cross_entropy():
    model = torch.nn.Linear(4, 3)
    images = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    out = get_method("default").loss(model, images, {"label": labels}, Step(0, 1))
    expected = -torch.log_softmax(model(images), 1)[torch.arange(5), labels].mean()
    torch.testing.assert_close(out.loss, expected)
    assert set(out.parts) == {"cls"}


def test_run_config_rejects_an_unknown_method_option(tmp_path):
    with pytest.raises(ConfigError, match="--method default: method 'default' has no option 'delta'"):
        RunConfig(model="small_cam", out=str(tmp_path), dataset="digits", method_options={"delta": 0.5})


@pytest.mark.parametrize("kind", ["small", "vgg16", "resnet50"])
def test_feature_levels_are_the_stage_outputs(kind):
    from spn.models import FeatureLevels, ResNet50Backbone, SmallBackbone, VGG16Backbone

    torch.manual_seed(0)
    if kind == "small":
        backbone, size = SmallBackbone(widths=(4, 6, 8, 10), norm="none"), 32
        # block outputs by hand: conv-ReLU, pool after the first two blocks
        x, expected = torch.rand(2, 3, size, size), []
        h = x
        for index, conv in enumerate(m for m in backbone.features if isinstance(m, torch.nn.Conv2d)):
            h = torch.relu(conv(h))
            expected.append(h)
            if index < 2:
                h = torch.nn.functional.max_pool2d(h, 2)
    elif kind == "vgg16":
        backbone, size = VGG16Backbone(), 32
        x = torch.rand(1, 3, size, size)
        convs = [m for m in backbone.features if isinstance(m, torch.nn.Conv2d)]
        h, expected, stage_sizes, at = x, [], [2, 2, 3, 3, 3], 0
        for stage, count in enumerate(stage_sizes):
            for conv in convs[at : at + count]:
                h = torch.relu(conv(h))
            at += count
            expected.append(h)
            if stage < 4:
                h = torch.nn.functional.max_pool2d(h, 2)
    else:
        backbone, size = ResNet50Backbone().eval(), 32
        x = torch.rand(1, 3, size, size)
        h = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        expected = []
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            h = layer(h)
            expected.append(h)
    levels = FeatureLevels(backbone, 3).eval()
    got = levels(x)
    assert len(got) == 3
    assert levels.out_channels == [e.shape[1] for e in expected[-3:]]
    for a, b in zip(got, expected[-3:], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got[-1], backbone(x))
    with pytest.raises(ValueError, match=r"levels must be in 1\.\."):
        FeatureLevels(backbone, 9)
