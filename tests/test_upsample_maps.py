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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bicubic_is_opencvs_inter_cubic(dtype):
    # wsolevaluation's inference.py resizes each CAM (float64, after t2n) with
    # cv2.resize(..., interpolation=cv2.INTER_CUBIC) before it normalises and scores it:
    # to the last bit in float64 (up- and downscaling, integer and other ratios, maps of one
    # row or column); OpenCV's float32 path differs by up to about 1e-6 of the range.
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    shapes = [(14, 14, 224, 224), (7, 9, 224, 224), (28, 28, 224, 224), (6, 5, 31, 17), (1, 8, 3, 40), (40, 33, 9, 1)]
    shapes += [tuple(int(v) for v in (*rng.integers(1, 40, 2), *rng.integers(1, 300, 2))) for _ in range(40)]
    for h, w, H, W in shapes:
        cams = rng.standard_normal((2, h, w)).astype(dtype)
        ours = upsample_maps(torch.from_numpy(cams), (H, W), mode="bicubic").numpy()
        theirs = np.stack([cv2.resize(cam, (W, H), interpolation=cv2.INTER_CUBIC).reshape(H, W) for cam in cams])
        assert ours.dtype == theirs.dtype
        if dtype == np.float64:
            np.testing.assert_array_equal(ours, theirs, err_msg=str((h, w, H, W)))
        else:
            bound = 2.0**-17 * np.abs(cams).max()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=bound, err_msg=str((h, w, H, W)))
    cams = rng.standard_normal((2, 7, 9))
    bilinear = upsample_maps(torch.from_numpy(cams), (224, 224)).numpy()
    bicubic = upsample_maps(torch.from_numpy(cams), (224, 224), mode="bicubic").numpy()
    assert np.abs(bilinear - bicubic).max() > 0.1  # the default is another resize
    torch_bicubic = torch.nn.functional.interpolate(torch.from_numpy(cams)[:, None], (224, 224), mode="bicubic")
    assert np.abs(torch_bicubic[:, 0].numpy() - bicubic).max() > 1e-7  # torch's own differs from OpenCV


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be 'bilinear' or 'bicubic', got 'nearest'"):
        upsample_maps(torch.zeros(1, 3, 3), (5, 5), mode="nearest")
    with pytest.raises(ValueError, match="INTER_CUBIC, which has no align_corners=True"):
        upsample_maps(torch.zeros(1, 3, 3), (5, 5), align_corners=True, mode="bicubic")
