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
