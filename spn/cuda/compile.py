"""Loading and compiling the CUDA sources in spn/cuda/kernels.

The kernels are plain CUDA C++ files kept in the package. Each .cu file includes
"common.cuh"; `source` inlines that header (its include guard makes the second and later
copies empty), so that NVRTC, which gets one string, needs no include path, and so that
CuPy's on-disk kernel cache, keyed by the source text, sees every change to the header.

Every kernel is an `extern "C"` function, so no C++ name mangling or `name_expressions`
is involved: the kernels that depend on the input type exist twice, `<name>_f32` and
`<name>_f64`; the ones that only touch double buffers exist once.

`kernel(device_index, name)` compiles the whole module once per device (CuPy compiles
with NVRTC for that device's architecture and caches the binary on disk) and looks up
one function, both cached with functools.lru_cache: a kernel is compiled once per
(device, source) and looked up once per (device, dtype, name).

The NVRTC compile check of the tests (tests/cuda_nvrtc_check.py) compiles `source(name)` of
every file and `module_source()` with NVRTC alone, which needs no GPU, no driver and no CuPy.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import torch

__all__ = [
    "HEADER",
    "KERNEL_PACKAGE",
    "OPTIONS",
    "SOURCES",
    "SUFFIXES",
    "TYPED",
    "UNTYPED",
    "constants",
    "kernel",
    "kernel_names",
    "module",
    "module_source",
    "read_text",
    "source",
    "typed_name",
]

KERNEL_PACKAGE = "spn.cuda.kernels"
HEADER = "common.cuh"
OPTIONS = ("-std=c++17",)  # no fast math: the accuracy of the results is the point

# Every kernel of every source. TYPED ones exist as <name>_f32 and <name>_f64.
TYPED = {
    "stationary.cu": ("sp_degree", "sp_normalize"),
    "walk.cu": ("sp_weights",),
    "backward.cu": ("sp_grad_m", "sp_distance_vjp", "sp_distance_vjp_pairs", "sp_grad_finish"),
    "couple.cu": ("sp_couple",),
    "scale.cu": ("sp_unit_scale",),
}
UNTYPED = {
    "stationary.cu": (),
    "walk.cu": ("sp_normalize_columns", "sp_walk_matvec", "sp_walk_update"),
    "backward.cu": ("sp_stationary_grad_deg",),
    "couple.cu": (),
    "scale.cu": (),
}
SOURCES = tuple(TYPED)
SUFFIXES = {torch.float32: "_f32", torch.float64: "_f64"}

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_CONSTANT = re.compile(r"^constexpr int (SP_[A-Z_]+) = (\d+);", re.MULTILINE)


def read_text(filename: str) -> str:
    """The text of one file of spn/cuda/kernels."""
    return resources.files(KERNEL_PACKAGE).joinpath(filename).read_text(encoding="utf-8")


def source(filename: str) -> str:
    """One .cu file with `#include "common.cuh"` replaced by the header's text."""

    def inline(match: re.Match) -> str:
        if match.group(1) != HEADER:
            raise ValueError(f"{filename} includes {match.group(1)!r}; the kernels may only include {HEADER!r}")
        next_line = match.string.count("\n", 0, match.start()) + 2  # the line after the #include
        return f'#line 1 "{HEADER}"\n{read_text(HEADER)}\n#line {next_line} "{filename}"'

    return _INCLUDE.sub(inline, read_text(filename))


def module_source() -> str:
    """All kernels in one translation unit: what CuPy compiles."""
    return "\n".join(source(filename) for filename in SOURCES)


def kernel_names(filename: str | None = None) -> tuple[str, ...]:
    """The extern "C" names of the kernels of one source, or of all of them."""
    files = SOURCES if filename is None else (filename,)
    names: list[str] = []
    for name in files:
        names += [base + suffix for base in TYPED[name] for suffix in ("_f32", "_f64")]
        names += list(UNTYPED[name])
    return tuple(names)


@functools.cache
def constants() -> dict[str, int]:
    """The block shape of common.cuh (`constexpr int SP_... = n;`), as the launches must use it."""
    found = {name: int(value) for name, value in _CONSTANT.findall(read_text(HEADER))}
    missing = {"SP_TILE", "SP_CHUNK", "SP_TX", "SP_TY", "SP_THREADS", "SP_LANES", "SP_ROWS"} - set(found)
    if missing:
        raise RuntimeError(f"{HEADER} does not define {sorted(missing)} in the form `constexpr int NAME = number;`")
    return found


def typed_name(base: str, dtype: torch.dtype) -> str:
    """`sp_degree`, torch.float32 -> `sp_degree_f32`; only float32 and float64 have kernels."""
    if dtype not in SUFFIXES:
        raise TypeError(f"the CUDA kernels take float32 or float64, got {dtype}")
    name = base + SUFFIXES[dtype]
    if name not in kernel_names():
        raise KeyError(f"no kernel {name!r}")
    return name


@functools.cache
def module(device_index: int):
    """The CuPy RawModule of all kernels for one device (compiled on first use, then cached)."""
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=module_source(), options=OPTIONS)


@functools.cache
def kernel(device_index: int, name: str):
    """One compiled kernel (a cupy.RawKernel) of the module for `device_index`."""
    if name not in kernel_names():
        raise KeyError(f"no kernel {name!r}; known: {', '.join(kernel_names())}")
    import cupy

    with cupy.cuda.Device(device_index):
        return module(device_index).get_function(name)

