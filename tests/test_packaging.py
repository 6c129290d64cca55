"""Tests of the package as users get it: metadata, extras, the wheel's files, public names, import cost."""

import email.parser
import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import spn

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "spn-wsol"

# Public modules that do not define __all__ yet (issue 8, section 3); drop a name once its module has one.
PENDING_ALL: set[str] = set()  # every public module declares __all__ now


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no part starting with `_`."""
    names = ["spn"]
    for info in pkgutil.walk_packages(spn.__path__, "spn."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the tree stays clean) without build isolation:
    the test extra brings setuptools >= 77, so no download is needed."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "spn", source / "spn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dist, source]
    subprocess.run(command, check=True, capture_output=True)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def metadata(wheel) -> Message:
    """The wheel's METADATA: what pip sees."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_distribution_name_and_license(metadata):
    # `spn` on PyPI is an unrelated project; the import name stays `spn`
    assert metadata["Name"] == DISTRIBUTION
    assert metadata["License-Expression"] == "MIT"  # an SPDX expression, not the deprecated table
    assert metadata["License"] is None
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the spn authors" in license_text


def test_build_requires_a_setuptools_that_reads_spdx_licenses():
    (line,) = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("requires =")]
    match = re.fullmatch(r'requires = \["setuptools>=(\d+)"\]', line)
    assert match and int(match.group(1)) >= 77, line


def test_extras(metadata):
    extras: dict[str, set[str]] = {}
    for requirement in metadata.get_all("Requires-Dist") or []:
        extra = re.search(r'extra == "([^"]+)"', requirement)
        name = re.split(r"[<>=~!;\[ ]", requirement)[0].lower()
        extras.setdefault(extra.group(1) if extra else "", set()).add(name)
    assert set(metadata.get_all("Provides-Extra") or []) == {"pictures", "digits", "test", "cuda12", "cuda13"}
    assert extras["pictures"] == {"matplotlib", "pillow"}
    assert {"pillow", "tqdm"} <= extras[""]  # spn.data decodes images, spn train shows progress
    assert extras["digits"] == {"scikit-learn"} and extras["digits"] <= extras["test"]
    assert extras["pictures"] <= extras["test"]
    assert {"pytest", "hypothesis", "nvidia-cuda-nvrtc-cu12", "opencv-python-headless", "ruff", "mypy"} <= extras[
        "test"
    ]
    # the tests compile the CUDA sources with NVRTC alone: CuPy (~500 MB) is for GPU users
    assert not any(name.startswith("cupy") for name in extras["test"] | extras[""])
    assert "cupy-cuda12x" in extras["cuda12"] and "cupy-cuda13x" in extras["cuda13"]


def test_make_test_installs_the_test_extra_only():
    (line,) = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("EXTRAS ?=")]
    assert line.split("?=")[1].strip() == "test"


def test_the_wheel_has_every_file(wheel):
    assert wheel.name.startswith("spn_wsol-")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "spn").rglob("*") if p.is_file()}
    sources = {p for p in package if p.endswith((".py", ".cu", ".cuh")) or p == "spn/py.typed"}
    assert "spn/reference/__init__.py" in sources and "spn/py.typed" in sources
    assert any(p.endswith(".cu") for p in sources) and any(p.endswith(".cuh") for p in sources)
    assert sources <= files, sorted(sources - files)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in files)


def test_public_modules_are_found():
    names = public_modules()
    expected = ["spn.reference", "spn.models", "spn.localize", "spn.metrics", "spn.viz", "spn.cuda", "spn.bench"]
    assert set(expected) <= set(names), sorted(set(expected) - set(names))


@pytest.mark.parametrize("name", public_modules())
def test_public_module_declares_its_names(name, request):
    if name in PENDING_ALL:  # XPASS once the module has one
        request.applymarker(pytest.mark.xfail(reason="__all__ still to be added (issue 8, section 3)"))
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__ list"
    missing = [item for item in module.__all__ if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_dir_lists_the_lazy_submodules():
    # in a fresh interpreter: here, other tests have imported the submodules already
    lazy = ["cuda", "localize", "metrics", "models", "reference", "viz"]
    code = (
        "import sys, spn\n"
        "listed = dir(spn)\n"
        f"print([name for name in {lazy!r} if name not in listed])\n"
        f"print([name for name in {lazy!r} if 'spn.' + name in sys.modules])\n"
        "print(set(spn.__all__) <= set(listed))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:3] == ["[]", "[]", "True"], result.stdout  # listed, not loaded
    for name in lazy:
        assert getattr(spn, name).__name__ == f"spn.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        spn.nope  # noqa: B018


def test_import_spn_stays_light():
    heavy = ["scipy.ndimage", "matplotlib", "PIL", "cv2", "cupy"]
    code = f"import sys, spn\nprint([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
