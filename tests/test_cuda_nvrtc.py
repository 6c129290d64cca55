"""The CUDA sources compile, and the CPU-testable glue of backend='cupy' behaves.

No GPU, driver or CuPy is needed: NVRTC compiles CUDA C++ to PTX on its own, and
tests/cuda_nvrtc_check.py calls it through ctypes, from the `nvidia-cuda-nvrtc-cu12` wheel
or a system CUDA toolkit. Where NVRTC cannot be found the compile tests are skipped with
the reason, except under CI=true, where they fail: CI must compile the kernels.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_nvrtc_check
from spn.cuda import compile as cuda_compile
from spn.cuda import function

ARCHS = ("compute_80", "compute_90")
needs_cupy = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None,
    reason="CuPy is not installed: pip install 'spn-wsol[cuda12]' to check the CUDA sources",
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=ARCHS)
def ptx(request):
    cuda_nvrtc_check.load_or_skip()
    return request.param, cuda_nvrtc_check.compile_all(request.param)


def test_every_kernel_file_is_package_data():
    """An installed spn must ship every .cu and .cuh file that compile.py reads."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    shipped = set()
    kernels = ROOT / "spn" / "cuda" / "kernels"
    for package, patterns in package_data.items():
        base = ROOT.joinpath(*package.split("."))
        for path in kernels.iterdir():
            relative = path.relative_to(base).as_posix() if path.is_relative_to(base) else None
            if relative and any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                shipped.add(path.name)
    needed = {cuda_compile.HEADER, *cuda_compile.SOURCES}
    assert needed <= shipped, f"add {sorted(needed - shipped)} to [tool.setuptools.package-data] in pyproject.toml"


def _entries(text: str) -> set[str]:
    return set(re.findall(r"\.entry\s+([A-Za-z_0-9]+)\s*\(", text))


def test_every_source_compiles_with_nvrtc(ptx):
    arch, results = ptx
    assert set(results) == {*cuda_compile.SOURCES, "<module>"}
    target = arch.replace("compute_", "sm_")
    for filename, text in results.items():
        assert f".target {target}" in text, filename


def test_every_kernel_is_in_the_ptx_under_its_extern_c_name(ptx):
    _, results = ptx
    for filename in cuda_compile.SOURCES:
        assert _entries(results[filename]) == set(cuda_compile.kernel_names(filename)), filename
    assert _entries(results["<module>"]) == set(cuda_compile.kernel_names())


def test_both_dtypes_have_every_typed_kernel(ptx):
    _, results = ptx
    entries = _entries(results["<module>"])
    for bases in cuda_compile.TYPED.values():
        for base in bases:
            assert {base + "_f32", base + "_f64"} <= entries


def test_a_broken_source_reports_the_nvrtc_log(monkeypatch):
    cuda_nvrtc_check.load_or_skip()
    real = cuda_compile.source
    monkeypatch.setattr(cuda_compile, "source", lambda name: real(name) + "\nthis is not C++;\n")
    monkeypatch.setattr(cuda_compile, "SOURCES", ("couple.cu",))
    broken = r"NVRTC could not compile couple.cu(.|\n)*this is not C\+\+"
    with pytest.raises(cuda_nvrtc_check.CompileError, match=broken):
        cuda_nvrtc_check.compile_all("compute_80")


def test_an_unknown_architecture_is_refused():
    cuda_nvrtc_check.load_or_skip()
    with pytest.raises(cuda_nvrtc_check.CompileError, match="compute_1"):
        cuda_nvrtc_check.compile_ptx("__global__ void k() {}", "k.cu", "compute_1")


def test_the_compile_check_needs_no_cupy():
    """In a fresh interpreter where `import cupy` fails, the check still compiles the kernels."""
    cuda_nvrtc_check.load_or_skip()
    code = (
        "import sys; sys.modules['cupy'] = sys.modules['cupy_backends'] = None\n"
        "import cuda_nvrtc_check\n"
        "ptx = cuda_nvrtc_check.compile_all('compute_80')['couple.cu']\n"
        "assert '.entry sp_couple_f32' in ptx, ptx[:500]\n"
        "assert not any(name.startswith('cupy') for name in sys.modules if sys.modules[name] is not None)\n"
    )
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}:{tests}"})
    assert result.returncode == 0, result.stderr[-3000:]


# -- finding NVRTC: where it looks, and what a machine without it is told ---------------------


def _not_found():
    raise cuda_nvrtc_check.NvrtcNotFound("no NVRTC here")


def _outcome(function) -> BaseException:
    """What `function()` raised, a pytest skip or failure included (pytest.raises(Failed) lets a
    skip through, which would turn a wrong skip into a skipped test instead of a failed one)."""
    try:
        function()
    except BaseException as raised:  # skips and failures are BaseExceptions
        return raised
    raise AssertionError(f"{function.__name__} returned instead of raising")


def test_without_nvrtc_the_check_fails_under_ci(monkeypatch):
    monkeypatch.setattr(cuda_nvrtc_check, "load", _not_found)
    monkeypatch.setenv("CI", "true")
    raised = _outcome(cuda_nvrtc_check.load_or_skip)
    assert isinstance(raised, pytest.fail.Exception), repr(raised)
    assert "CI=true and the CUDA compile check cannot run: no NVRTC here" in str(raised)


def test_without_nvrtc_the_check_is_skipped_with_the_reason_elsewhere(monkeypatch):
    monkeypatch.setattr(cuda_nvrtc_check, "load", _not_found)
    monkeypatch.delenv("CI", raising=False)
    raised = _outcome(cuda_nvrtc_check.load_or_skip)
    assert isinstance(raised, pytest.skip.Exception), repr(raised)
    assert "needs NVRTC: no NVRTC here" in str(raised)


def test_load_without_a_library_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cuda_nvrtc_check, "find_library", lambda: None)
    with pytest.raises(cuda_nvrtc_check.NvrtcNotFound, match="pip install nvidia-cuda-nvrtc-cu12"):
        cuda_nvrtc_check.load.__wrapped__()


def test_where_nvrtc_is_looked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("SPN_NVRTC", str(tmp_path / "missing" / "libnvrtc.so.12"))
    candidates = cuda_nvrtc_check.library_candidates()
    assert candidates[0] == tmp_path / "missing" / "libnvrtc.so.12"  # $SPN_NVRTC first
    assert cuda_nvrtc_check.find_library() != candidates[0]  # a missing file is passed over
    for wheel in cuda_nvrtc_check.WHEELS:  # then the installed NVRTC wheels' own files
        for path in cuda_nvrtc_check._wheel_libraries(wheel):
            assert path in candidates and path.name.startswith("libnvrtc.so")
    fake = tmp_path / "cuda" / "lib64"
    fake.mkdir(parents=True)
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13"):
        (fake / name).write_bytes(b"")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert [p for p in cuda_nvrtc_check.library_candidates() if p.parent == fake] == [fake / "libnvrtc.so.13"]


def test_the_wheel_is_found_when_installed(monkeypatch):
    wheel = cuda_nvrtc_check._wheel_libraries("nvidia-cuda-nvrtc-cu12")
    if not wheel:
        pytest.skip("the nvidia-cuda-nvrtc-cu12 wheel is not installed")
    monkeypatch.delenv("SPN_NVRTC", raising=False)
    assert cuda_nvrtc_check.find_library() == wheel[0]
    cuda_nvrtc_check.load_or_skip()
    assert cuda_nvrtc_check.version() >= (12, 0)


def test_the_header_is_inlined_once_and_line_numbers_point_at_the_files():
    text = cuda_compile.module_source()
    assert '#include "common.cuh"' not in text
    assert text.count("#ifndef SPN_COMMON_CUH") == len(cuda_compile.SOURCES)  # the guard empties the copies
    assert '#line 1 "common.cuh"' in text
    walk = cuda_compile.source("walk.cu")
    include_line = cuda_compile.read_text("walk.cu").splitlines().index('#include "common.cuh"') + 1
    assert f'#line {include_line + 1} "walk.cu"' in walk


def test_block_shape_constants_are_read_from_the_header():
    c = cuda_compile.constants()
    assert c["SP_TILE"] == c["SP_TX"] * 4 == c["SP_TY"] * 4
    assert c["SP_CHUNK"] == c["SP_TY"]
    assert c["SP_TX"] * c["SP_TY"] <= 1024 and c["SP_LANES"] * c["SP_ROWS"] <= 1024 and c["SP_THREADS"] <= 1024


def test_typed_names_and_cache_keys():
    assert cuda_compile.typed_name("sp_degree", torch.float32) == "sp_degree_f32"
    assert cuda_compile.typed_name("sp_degree", torch.float64) == "sp_degree_f64"
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda_compile.typed_name("sp_degree", torch.float16)
    with pytest.raises(KeyError):
        cuda_compile.typed_name("sp_walk_update", torch.float32)  # untyped: one kernel for both
    with pytest.raises(KeyError, match="no kernel"):
        cuda_compile.kernel(0, "sp_nonexistent")
    # compiled once per device, looked up once per (device, name): both lru-cached
    assert hasattr(cuda_compile.module, "cache_info") and hasattr(cuda_compile.kernel, "cache_info")
    names = cuda_compile.kernel_names()
    assert len(names) == len(set(names))


def test_inverse_width_matches_the_torch_path_and_survives_underflow():
    from spn import graph

    for eps in (0.15 * 14 * 14, 2.1, 1e-3, 1e-154, 1e-200, 5e-324):
        assert function.inverse_width(eps) == graph._inverse_width(eps)
    assert function.inverse_width(1e-200) == math.inf


def test_sizes_beyond_int32_are_refused():
    function.check_sizes(2, 3, 196, None)
    function.check_sizes(2, 3, 196, 20)
    with pytest.raises(ValueError, match="2\\^31"):
        function.check_sizes(2**31, 1, 1, None)
    with pytest.raises(ValueError, match="too large"):
        function.check_sizes(1, 1, 65536 * 64 + 1, 3)


# -- require / is_available: what a user without the pieces is told ------------------------


def test_is_available_is_false_without_a_gpu_and_never_raises(monkeypatch):
    from spn import cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda.is_available() is False

    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert cuda.is_available() is False


def test_require_without_cupy_says_what_to_install(monkeypatch):
    from spn import cuda

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'spn-wsol\[cuda12\]'.*cupy-cuda12x.*spn-wsol\[cuda13\]"):
        cuda.require(torch.zeros(1, 1, 2, 2))
    assert cuda.is_available() is False


@needs_cupy
def test_require_on_a_cpu_tensor_says_to_move_it():
    from spn import cuda

    with pytest.raises(RuntimeError, match="move the tensor to a CUDA device or use backend='torch'"):
        cuda.require(torch.zeros(1, 1, 2, 2))


@needs_cupy
def test_require_without_a_gpu_says_so(monkeypatch):
    from spn import cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda.require(torch.zeros(1, 1, 2, 2))


@needs_cupy
def test_the_cupy_backend_on_a_cpu_tensor_raises_the_cpu_error():
    import spn

    with pytest.raises(RuntimeError, match="move the tensor to a CUDA device"):
        spn.soft_proposal(torch.rand(1, 2, 3, 3), backend="cupy")
    with pytest.raises(RuntimeError, match="move the tensor to a CUDA device"):
        from spn.cuda import cupy_soft_proposal

        cupy_soft_proposal(torch.rand(1, 2, 3, 3), 1.0, None, 0.0, True)


# -- the CuPy launcher's glue, with a stand-in for CuPy -------------------------------------


def test_cupy_launcher_converts_once_and_launches_inside_device_and_stream(monkeypatch):
    import types

    import numpy as np

    events: list = []

    class Context:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")
            return self

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    def from_external(handle):
        assert handle.__cuda_stream__() == (0, 1234)  # torch's current stream, by the stream protocol
        return Context("stream")

    def from_dlpack(tensor):
        assert not tensor.requires_grad  # torch refuses to export those
        events.append(f"dlpack {tuple(tensor.shape)}")
        return ("cupy", tuple(tensor.shape))

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            events.append(("launch", self.name, grid, block, args))

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            Device=lambda index: Context(f"device {index}"), Stream=types.SimpleNamespace(from_external=from_external)
        ),
        from_dlpack=from_dlpack,
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: types.SimpleNamespace(cuda_stream=1234))
    monkeypatch.setattr(cuda_compile, "kernel", lambda index, name: Kernel(name))
    launcher = function.CupyLauncher(torch.device("cuda", 3))
    a = torch.zeros(2, 3, requires_grad=True)
    b = torch.zeros(4)
    launcher("sp_normalize_f32", (1, 1, 1), (256, 1, 1), a, b, np.int32(2), np.int32(3))
    launcher("sp_normalize_f32", (1, 1, 1), (256, 1, 1), a, b, np.int32(2), np.int32(3))
    assert events[:5] == ["enter device 3", "enter stream", "dlpack (2, 3)", "dlpack (4,)", events[4]]
    launch = events[4]
    assert launch[:4] == ("launch", "sp_normalize_f32", (1, 1, 1), (256, 1, 1))
    assert launch[4][:2] == (("cupy", (2, 3)), ("cupy", (4,))) and launch[4][2:] == (np.int32(2), np.int32(3))
    assert events[5:7] == ["exit stream", "exit device 3"]
    assert sum(1 for e in events if isinstance(e, str) and e.startswith("dlpack")) == 2  # once per tensor
    with pytest.raises(RuntimeError, match="non-contiguous"):
        launcher("sp_normalize_f32", (1, 1, 1), (256, 1, 1), torch.zeros(3, 2).t(), b, np.int32(2), np.int32(3))
