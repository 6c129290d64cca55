"""Tests of the command line: `python -m spn` and `python -m spn demo`."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spn import demo, viz
from spn.__main__ import COMMANDS, main


def test_usage():
    result = subprocess.run([sys.executable, "-m", "spn"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert all(name in result.stderr for name in COMMANDS)
    result = subprocess.run([sys.executable, "-m", "spn", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: python -m spn COMMAND" in result.stdout


def test_unknown_command(capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_demo_checks_and_picture(tmp_path, capsys):
    out = tmp_path / "pictures" / "demo.png"
    assert main(["demo", "--out", str(out), "--size", "64"]) == 0
    printed = capsys.readouterr().out
    # the closed form agrees with SciPy's eigenvector, and the walk converges to it
    match = re.search(r"max \|difference\| = (\S+),", printed)
    assert match, printed
    difference = float(match.group(1))
    assert difference < 1e-12
    assert re.search(r"stops at step \d+", printed)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 2.5 * png.height  # three panels side by side
    assert [p.name for p in out.parent.iterdir()] == ["demo.png"]  # no temporary file left behind


def test_demo_reads_an_image_file(tmp_path, capsys):
    picture = viz.save_png(tmp_path / "in.png", demo.builtin_image(48)[:40])  # 48 wide, 40 high
    out = tmp_path / "out.png"
    assert demo.main(["--image", str(picture), "--out", str(out), "--size", "48"]) == 0
    assert "48 x 40 px" in capsys.readouterr().out and out.exists()


@pytest.mark.parametrize("missing", ["matplotlib", "PIL"])
def test_demo_without_the_pictures_extra_says_what_to_install(tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import of `missing` now fails
    out = tmp_path / "demo.png"
    assert demo.main(["--out", str(out), "--size", "32"]) == 1
    captured = capsys.readouterr()
    assert "pip install 'spn-wsol[pictures]'" in captured.err and missing in captured.err
    assert captured.out == "" and not out.exists()  # said before any work


def test_the_map_reads_brighter_where_it_is_higher():
    # A ramp map over the coloured built-in image: the overlay's luma must grow with the map
    # everywhere, whatever the image's colours (jet over the colour image fails this: its
    # extremes are both dark, and a blue object under a high value reads as low).
    image = demo.builtin_image(64)
    ramp = np.tile(np.linspace(0.0, 1.0, 16), (16, 1))
    luma = demo.grey(demo.map_over_image(image, ramp)).astype(float)
    columns = luma.mean(axis=0)
    assert np.all(np.diff(columns[::4]) > 0), columns[::4]


def test_the_map_over_the_image_ignores_the_image_hue():
    # only the image's luma shows under the map: its colours cannot pass for the map's
    image = demo.builtin_image(32)
    proposal = np.random.default_rng(1).random((8, 8))
    as_grey = np.repeat(demo.grey(image)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(demo.map_over_image(image, proposal), demo.map_over_image(as_grey, proposal))


def test_the_figure_has_the_map_in_its_own_panel_and_a_colour_bar_beside_the_overlay():
    proposal = np.random.default_rng(2).random((8, 8))
    proposal /= proposal.sum()
    picture = demo.figure(demo.builtin_image(32), proposal, cell=4)
    image_panel, map_panel, overlay_panel, bar = picture.axes
    assert [panel.get_title() for panel in (image_panel, map_panel, overlay_panel)] == [
        "image",
        "proposal map M (8 x 8 cells)",
        "M over the image (grey)",
    ]
    # the map panel shows M (in units of the uniform map) with the colour bar's colour map and range
    (shown,) = map_panel.get_images()
    shown_map = shown.get_array()
    assert shown_map is not None
    np.testing.assert_allclose(np.asarray(shown_map, dtype=float), proposal * 64)
    assert shown.colorbar is not None and shown.colorbar.ax is bar
    assert shown.get_cmap().name == demo.CMAP and shown.get_clim() == (proposal.min() * 64, proposal.max() * 64)
    picture.canvas.draw()
    panels = [panel.get_position() for panel in (image_panel, map_panel, overlay_panel)]
    assert panels[0].x1 <= panels[1].x0 and panels[1].x1 <= panels[2].x0  # side by side, in this order
    assert bar.get_position().x0 >= panels[2].x1  # the colour bar right of the overlay


def test_the_figure_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "demo.png"
    out.write_bytes(b"the previous picture")
    from matplotlib.figure import Figure

    def broken_savefig(self, filename, **kwargs):
        with open(filename, "wb") as file:
            file.write(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        demo.save_figure(out, demo.builtin_image(32), np.random.default_rng(0).random((8, 8)), cell=4)
    assert out.read_bytes() == b"the previous picture"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]
