"""Tests of spn.viz: overlays, boxes, points and PNG files."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spn.viz import draw_boxes, draw_points, overlay, save_png, show_localization, to_uint8_image

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
    picture = show_localization(image, torch.rand(2, 3), pred_boxes=[[1, 1, 7, 4]], gt_boxes=[[0, 0, 8, 5]], points=[[4, 2]])
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
    # no module-level import of matplotlib or PIL in spn.viz, spn.localize or spn.metrics
    package = Path(__file__).resolve().parents[1] / "spn"
    for name in ("viz.py", "localize.py", "metrics.py"):
        tree = ast.parse((package / name).read_text())
        top_level = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top_level.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
        assert not top_level & {"matplotlib", "PIL"}, name
