"""Tests of spn.viz: overlays, boxes, points and PNG files."""

import doctest
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spn._convert
import spn.models.maps
import spn.viz
from spn.viz import draw_boxes, draw_points, overlay, resize_map, save_png, show_localization, to_uint8_image

RED, GREEN, YELLOW, BLACK = [255, 0, 0], [0, 255, 0], [255, 255, 0], [0, 0, 0]


def test_png_round_trip_with_boxes(tmp_path):
    image = np.zeros((40, 60, 3), dtype=np.uint8)  # 40 rows, 60 columns
    picture = draw_boxes(image, [[5, 10, 30, 25]], color=(255, 0, 0), width=1)
    path = save_png(tmp_path / "boxes.png", picture)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (60, 40)  # Pillow reports (width, height)
        pixels = np.asarray(png.convert("RGB"))
    # the outline covers the box's edge pixels (pixel-inclusive box x 5..30, y 10..25)
    for x, y in [(5, 10), (30, 25), (5, 17), (30, 17), (17, 10), (17, 25)]:
        assert pixels[y, x].tolist() == RED, (x, y)
    # inside and outside stay black
    for x, y in [(17, 17), (4, 17), (31, 17), (17, 9), (17, 26)]:
        assert pixels[y, x].tolist() == BLACK, (x, y)
    assert image.max() == 0  # the input is left alone


def test_box_width_grows_inwards():
    picture = draw_boxes(np.zeros((20, 20, 3), np.uint8), [[2, 2, 17, 17]], (0, 255, 0), width=3)
    assert picture[10, 2].tolist() == GREEN and picture[10, 4].tolist() == GREEN
    assert picture[10, 5].tolist() == BLACK and picture[10, 1].tolist() == BLACK


def test_points_drawn_as_discs():
    picture = draw_points(np.zeros((20, 20, 3), np.uint8), np.array([[4.0, 12.0]]), (255, 255, 0), radius=2)
    assert picture[12, 4].tolist() == YELLOW  # row y = 12, column x = 4
    assert picture[12, 10].tolist() == BLACK


def test_overlay_blends_the_colour_map():
    image = np.full((8, 10, 3), 200, dtype=np.uint8)
    assert np.array_equal(overlay(image, np.random.rand(3, 3), alpha=0.0), image)
    # a constant map scales to 0; jet(0) = (0, 0, 0.5) -> (0, 0, 127.5)
    full = overlay(image, np.zeros((3, 3)), cmap="jet", alpha=1.0)
    assert full.shape == (8, 10, 3) and full.dtype == np.uint8
    np.testing.assert_allclose(full[0, 0], [0, 0, 127.5], atol=0.6)
    # half and half: (200 + (0, 0, 127.5)) / 2 = (100, 100, 163.75)
    np.testing.assert_allclose(overlay(image, np.zeros((3, 3)), alpha=0.5)[4, 4], [100, 100, 163.75], atol=0.6)


def test_overlay_resizes_the_map_and_shows_its_peak():
    response = torch.zeros(4, 4)
    response[0, 0] = 1.0  # peak at the top-left corner
    picture = overlay(np.zeros((32, 32, 3), np.uint8), response, cmap="gray", alpha=1.0)
    assert picture.shape == (32, 32, 3)
    assert picture[0, 0].tolist() == [255, 255, 255]  # gray(1) is white
    assert picture[31, 31].tolist() == [0, 0, 0]  # gray(0) is black


def test_float_chw_tensor_images():
    image = torch.full((3, 6, 9), 0.5)
    converted = to_uint8_image(image)
    assert converted.shape == (6, 9, 3) and converted.dtype == np.uint8
    np.testing.assert_allclose(converted, 127.5, atol=0.6)  # 0.5 * 255
    picture = show_localization(
        image, torch.rand(2, 3), pred_boxes=[[1, 1, 7, 4]], gt_boxes=[[0, 0, 8, 5]], points=[[4, 2]]
    )
    assert picture.shape == (6, 9, 3)
    assert picture[5, 0].tolist() == GREEN  # the gt box's bottom-left corner


def test_bad_images_and_boxes():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        to_uint8_image(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_image(np.full((3, 2, 2), np.nan))
    with pytest.raises(ValueError, match="x1 >= x0"):
        draw_boxes(np.zeros((5, 5, 3), np.uint8), [[3, 0, 1, 1]])
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((5, 5, 3), np.uint8), np.zeros((2, 2)), alpha=2.0)


def test_matplotlib_and_pillow_are_imported_lazily():
    # importing the WSOL layer loads neither; only drawing does
    code = (
        "import sys, spn.viz, spn.localize, spn.metrics\n"
        "print(sorted(m for m in ('matplotlib', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_resize_map_resizes_the_tensor_then_converts_once(monkeypatch):
    conversions = []

    def counting_to_numpy(value, dtype=None):
        conversions.append((type(value), tuple(value.shape)))
        return spn._convert.to_numpy(value, dtype)

    monkeypatch.setattr(spn.viz, "to_numpy", counting_to_numpy)
    resized = resize_map(torch.rand(3, 4), (12, 16))
    # one conversion, of a tensor that already has the image's size
    assert conversions == [(torch.Tensor, (12, 16))]
    assert resized.shape == (12, 16) and resized.dtype == np.float64


def test_resize_map_takes_numpy_maps_without_a_copy(monkeypatch):
    seen = []

    def spy(maps, size, align_corners=False):
        seen.append(maps)
        return spn.models.maps.upsample_maps(maps, size, align_corners)

    monkeypatch.setattr(spn.viz, "upsample_maps", spy)
    array = np.random.default_rng(0).random((3, 4))
    resized = resize_map(array, (6, 8))
    assert seen[0].data_ptr() == array.ctypes.data  # torch.from_numpy: the array's own memory
    # the same numbers as the tensor route, and the same as upsample_maps itself
    expected = spn.models.maps.upsample_maps(torch.from_numpy(array)[None], (6, 8))[0].numpy()
    np.testing.assert_array_equal(resized, expected)
    np.testing.assert_array_equal(resize_map(torch.from_numpy(array), (6, 8)), expected)


def test_resize_map_keeps_a_map_of_the_right_size_and_checks_it():
    array = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(resize_map(array, (2, 3)), array)
    assert resize_map(torch.ones(2, 3, dtype=torch.float16), (2, 3)).dtype == np.float64
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        resize_map(np.zeros((1, 2, 3)), (4, 4))
    for values in (np.full((2, 3), np.nan), np.array([[0.0, np.inf, 0.0], [0.0, 0.0, 0.0]])):
        for size in ((2, 3), (8, 8)):  # also when the map is resized first
            with pytest.raises(ValueError, match="NaN or infinite"):
                resize_map(values, size)


def test_one_name_for_the_image_size():
    # image sizes are `size` (H, W) in every function of spn.viz, never image_size / upsample / shape
    for name in spn.viz.__all__:
        value = getattr(spn.viz, name)
        if inspect.isfunction(value):
            for parameter in inspect.signature(value).parameters:
                assert parameter == "size" or not {"size", "shape", "upsample"} & set(parameter.split("_")), (
                    name,
                    parameter,
                )


def test_public_names_and_examples():
    assert all(hasattr(spn.viz, name) for name in spn.viz.__all__)
    result = doctest.testmod(spn.viz, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 6, result


@pytest.mark.parametrize("missing", ["matplotlib", "PIL"])
def test_a_missing_picture_library_names_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import of `missing` now fails
    image = np.zeros((4, 4, 3), np.uint8)
    calls = {
        "matplotlib": [lambda: overlay(image, np.zeros((2, 2)))],
        "PIL": [lambda: draw_boxes(image, [[0, 0, 1, 1]]), lambda: draw_points(image, [[1, 1]])],
    }[missing]
    for call in calls:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'spn-wsol\[pictures\]'") as error:
            call()
        assert error.value.name == missing
    with pytest.raises(ModuleNotFoundError, match=r"spn-wsol\[pictures\]"):
        spn.viz._require_pictures("the test")


def test_other_missing_modules_are_not_blamed_on_the_extra():
    with pytest.raises(ModuleNotFoundError) as error, spn.viz._pictures_extra():
        importlib.import_module("spn_no_such_module")
    assert "pictures" not in str(error.value)


def test_save_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "picture.png"
    save_png(path, np.full((4, 5, 3), 7, np.uint8))
    before = path.read_bytes()

    def broken_save(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(path, np.zeros((4, 5, 3), np.uint8))
    assert path.read_bytes() == before  # the old picture is intact
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]  # no temporary file left behind


def test_save_png_writes_tensors_and_returns_the_path(tmp_path):
    path = save_png(str(tmp_path / "tensor.png"), torch.ones(3, 2, 5))
    assert path == tmp_path / "tensor.png"
    with Image.open(path) as png:
        assert png.size == (5, 2) and np.asarray(png.convert("RGB")).min() == 255


def test_resize_map_takes_read_only_arrays_quietly(recwarn):
    array = np.arange(4.0).reshape(2, 2)
    array.setflags(write=False)
    assert resize_map(array, (4, 4)).shape == (4, 4)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
