"""Tests of spn.models.upsample_maps (moved from spn.localize: a torch op, tensor in, tensor
out). Expected values are worked out by hand in the comments."""

import numpy as np
import pytest
import torch

import spn.models
from spn.models import upsample_maps


def test_upsample_bilinear_half_pixel():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    out = upsample_maps(maps, (4, 4))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 4)
    # align_corners=False: output columns sample input x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
    # row 0 -> [1, 0.75*1 + 0.25*3, 0.25*1 + 0.75*3, 3] = [1, 1.5, 2.5, 3]
    # row 1 = 0.75 * row0 + 0.25 * [0, 1, 3, 4] = [0.75, 1.375, 2.625, 3.25]
    np.testing.assert_allclose(out[0, 0].numpy(), [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(out[0, 1].numpy(), [0.75, 1.375, 2.625, 3.25])


def test_upsample_align_corners():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    out = upsample_maps(maps, (4, 4), align_corners=True)
    # align_corners=True: output index p samples input p * (2 - 1) / (4 - 1) = p / 3:
    # row 0 -> [1, 1 + 2/3, 1 + 4/3, 3]; row 3 = input row 1 -> [0, 4/3, 8/3, 4]
    np.testing.assert_allclose(out[0, 0].numpy(), [1.0, 5 / 3, 7 / 3, 3.0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 3].numpy(), [0.0, 4 / 3, 8 / 3, 4.0], rtol=1e-6)
    # row 1 samples input row 1/3: 2/3 of row 0 + 1/3 of row 1 -> column 0: 2/3 * 1 + 0 = 2/3
    assert out[0, 1, 0].item() == pytest.approx(2 / 3)


def test_upsample_is_a_torch_op_numpy_raises():
    # NumPy in is no longer NumPy out: a TypeError that says how to wrap the array
    with pytest.raises(TypeError, match=r"torch\.from_numpy"):
        upsample_maps(np.ones((2, 3, 3)), (5, 7))  # type: ignore[arg-type]
    out = upsample_maps(torch.from_numpy(np.ones((2, 3, 3))), (5, 7))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 7) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), 1.0)  # a constant map stays constant
    assert upsample_maps(torch.zeros(0, 3, 3), (5, 5)).shape == (0, 5, 5)
    assert spn.models.maps.upsample_maps is upsample_maps  # one function, two import paths


def test_upsample_channels_integers_and_bad_input():
    # (B, C, h, w) keeps its channels; each channel is resized on its own: channel 1 = 2 x channel 0
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]])  # (1, 2, 1, 2)
    out = upsample_maps(maps, (1, 4))
    assert out.shape == (1, 2, 1, 4)
    # one row, columns sample x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped): [1, 1.5, 2.5, 3]
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(out[0, 1, 0].numpy(), [2.0, 3.0, 5.0, 6.0])
    # integer maps become float32
    ints = upsample_maps(torch.tensor([[[1, 3]]]), (1, 4))
    assert ints.dtype == torch.float32
    np.testing.assert_allclose(ints[0, 0].numpy(), [1.0, 1.5, 2.5, 3.0])
    with pytest.raises(ValueError, match=r"\(B, h, w\) or \(B, C, h, w\)"):
        upsample_maps(torch.zeros(3, 3), (5, 5))
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        upsample_maps(torch.zeros(1, 3, 3), (0, 5))
