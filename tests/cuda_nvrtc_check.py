"""Compile the CUDA sources of spn/cuda/kernels with NVRTC, called directly through ctypes.

A test tool: NVRTC compiles CUDA C++ to PTX on the CPU, with no GPU and no driver, so the
tests can check that every .cu file builds for each architecture on any Linux machine.
Only the NVRTC shared library is needed (about 90 MB, the `nvidia-cuda-nvrtc-cu12` wheel),
not CuPy. Where the library comes from, in this order (`find_library` returns the first
that exists):

1. the file named by $SPN_NVRTC, when set;
2. the NVIDIA NVRTC wheels installed in this environment (`nvidia-cuda-nvrtc-cu12`,
   `nvidia-cuda-nvrtc-cu13`, `nvidia-cuda-nvrtc`), found through their lists of installed files;
3. a system CUDA toolkit: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda (lib64/, lib/), then the
   dynamic loader's search path (`ctypes.util.find_library("nvrtc")`).

`compile_all(arch)` compiles every source alone and all of them together, as spn/cuda/compile.py
hands them to CuPy, and returns the PTX; a source that does not compile raises `CompileError`
with NVRTC's log. `load_or_skip()` is what the tests call: it skips with the reason where
NVRTC is missing, and fails instead when $CI is "true", so that CI never passes without
having compiled the kernels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
from importlib import metadata
from pathlib import Path

from spn.cuda import compile as cuda_compile

__all__ = [
    "WHEELS",
    "CompileError",
    "NvrtcNotFound",
    "compile_all",
    "compile_ptx",
    "find_library",
    "library_candidates",
    "load",
    "load_or_skip",
    "version",
]

ENV_LIBRARY = "SPN_NVRTC"
# The pip distributions that ship libnvrtc: CUDA 12's, and CUDA 13's under both names it used.
WHEELS = ("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvrtc-cu13", "nvidia-cuda-nvrtc")
INSTALL = "pip install nvidia-cuda-nvrtc-cu12 (the NVRTC library alone, no CuPy needed)"
# libnvrtc.so, libnvrtc.so.12, libnvrtc.so.12.9.86 on Linux, nvrtc64_120_0.dll on Windows;
# not libnvrtc-builtins (loaded by libnvrtc itself) nor the .alt variant.
_LIBRARY_NAME = re.compile(r"^(libnvrtc\.so(\.\d+)*|nvrtc64_\d+_0\.dll)$")
_SUCCESS = 0


class NvrtcNotFound(RuntimeError):
    """No NVRTC library could be found or loaded."""


class CompileError(RuntimeError):
    """NVRTC refused a source; the message holds NVRTC's log."""


def _wheel_libraries(name: str) -> list[Path]:
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return []
    found = []
    for file in distribution.files or ():
        if _LIBRARY_NAME.match(Path(str(file)).name):
            found.append(Path(str(distribution.locate_file(file))))
    return sorted(found)


def library_candidates() -> list[Path]:
    """Every place the NVRTC library may be, in the order they are tried (existing or not)."""
    candidates: list[Path] = []
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        candidates.append(Path(explicit))
    for wheel in WHEELS:
        candidates += _wheel_libraries(wheel)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib"):
            folder = Path(root) / sub
            if folder.is_dir():
                candidates += sorted(p for p in folder.iterdir() if _LIBRARY_NAME.match(p.name))
    system = ctypes.util.find_library("nvrtc")
    if system:
        candidates.append(Path(system))
    return candidates


def find_library() -> Path | None:
    """The first NVRTC library of `library_candidates` that exists, or None."""
    for path in library_candidates():
        # find_library may return a bare soname ("libnvrtc.so.12") that only the loader resolves
        if path.exists() or (path.parent == Path(".") and _LIBRARY_NAME.match(path.name)):
            return path
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    program = ctypes.c_void_p  # nvrtcProgram, an opaque pointer
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [ctypes.POINTER(program), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcCompileProgram": [program, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetProgramLogSize": [program, ctypes.POINTER(ctypes.c_size_t)],
        "nvrtcGetProgramLog": [program, ctypes.c_char_p],
        "nvrtcGetPTXSize": [program, ctypes.POINTER(ctypes.c_size_t)],
        "nvrtcGetPTX": [program, ctypes.c_char_p],
        "nvrtcDestroyProgram": [ctypes.POINTER(program)],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@functools.cache
def load() -> ctypes.CDLL:
    """The NVRTC library with its functions' C signatures set; NvrtcNotFound when there is none."""
    path = find_library()
    if path is None:
        raise NvrtcNotFound(
            "the NVRTC library was not found (looked at $SPN_NVRTC, the wheels "
            f"{', '.join(WHEELS)}, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the loader's path): {INSTALL}"
        )
    try:
        return _bind(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as error:
        raise NvrtcNotFound(f"the NVRTC library {path} could not be loaded ({error}): {INSTALL}") from error


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(load().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(result: int, what: str) -> None:
    if result != _SUCCESS:
        message = load().nvrtcGetErrorString(result)
        raise RuntimeError(f"{what} failed: {message.decode() if message else result}")


def _text(program: ctypes.c_void_p, size_function, text_function) -> str:
    size = ctypes.c_size_t()
    _check(size_function(program, ctypes.byref(size)), size_function.__name__)
    buffer = ctypes.create_string_buffer(max(1, size.value))
    _check(text_function(program, buffer), text_function.__name__)
    return buffer.value.decode("utf-8", errors="replace")


def compile_ptx(code: str, name: str, arch: str, options: tuple[str, ...] = cuda_compile.OPTIONS) -> str:
    """The PTX of one CUDA C++ source for `arch` (e.g. "compute_90"); CompileError with the log."""
    lib = load()
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        flags = [f"-arch={arch}", *options]
        argv = (ctypes.c_char_p * len(flags))(*[flag.encode() for flag in flags])
        result = lib.nvrtcCompileProgram(program, len(flags), argv)
        if result != _SUCCESS:
            log = _text(program, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog)
            raise CompileError(f"NVRTC could not compile {name} for {arch} "
                               f"({lib.nvrtcGetErrorString(result).decode()}):\n{log}")
        return _text(program, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def compile_all(arch: str = "compute_90") -> dict[str, str]:
    """{filename: PTX} of every source of spn/cuda/kernels alone, and "<module>": all of them
    together (what CuPy compiles), for `arch`. Raises CompileError on the first that fails."""
    units = {filename: cuda_compile.source(filename) for filename in cuda_compile.SOURCES}
    units["<module>"] = cuda_compile.module_source()
    return {filename: compile_ptx(code, filename, arch) for filename, code in units.items()}


def load_or_skip() -> ctypes.CDLL:
    """`load()` for a test: skip with the reason where NVRTC is missing, fail instead under CI=true."""
    import pytest

    try:
        return load()
    except NvrtcNotFound as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the CUDA compile check cannot run: {error}", pytrace=False)
        pytest.skip(f"the CUDA compile check needs NVRTC: {error}")
