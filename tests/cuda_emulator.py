"""Run the CUDA kernels of spn/cuda/kernels on the CPU, for tests on machines without a GPU.

A test tool, not part of the package. The .cu sources are compiled unchanged as C++ (g++)
after a small header that maps the CUDA keywords onto fibers: a launch runs the grid's
blocks one after another, and each CUDA thread of a block is a fiber (ucontext) that runs
until its next `__syncthreads()`; `__shared__` variables become function statics, shared
by the threads of the running block. At every barrier the emulator checks that all threads
of the block reached the same `__syncthreads()` (not another one, nor the end of the
kernel), and it resumes the threads in a different order each time (forward, backward,
pseudo-random), so a missing barrier shows up as a wrong result. Launches go through the
same argument lists as on the GPU, checked against the kernel's C signature (pointer
element types and constness, int vs long long vs double), and every array is surrounded by
guard cells (a NaN with a recognisable payload) that must be intact after the launch: a
kernel that writes out of bounds fails, one that reads out of bounds sees NaN.

Thread order. An `Emulator` has a seed; its i-th launch shuffles threads with a seed made
from (emulator seed, i) alone, so the orders a test sees depend on nothing that ran before
it. The tests make one emulator per test, seeded from the test's node id (`seed_for`), so a
failure reproduces under `pytest -k`; $SPN_EMULATOR_SEED, when set, is mixed into every
test's seed, to try other orders. Each launch is recorded as a `Launch` (name, grid, block,
seed, and a digest of every thread order it used) in `Emulator.launches`, which keeps the
last `keep` launches only (and a fresh emulator per test starts empty).

What this does not check: warp-level behaviour (the kernels use none), real concurrency
within a block (threads only interleave at barriers), memory coalescing, register or
shared-memory limits, timing, and anything about CuPy, DLPack or streams. It is a test
of the arithmetic, the indexing, the block synchronisation and the launch plan.

    from cuda_emulator import Emulator
    from spn.cuda import function
    emulator = Emulator(seed=1)
    v, m, converged = function.soft_proposal(u, eps, None, 0.0, True, emulator.make_launcher)
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from spn.cuda import compile as _compile

__all__ = ["ENV_SEED", "Emulator", "Launch", "compiler", "launch_seed", "library", "seed_for", "signature"]

ENV_SEED = "SPN_EMULATOR_SEED"

_SHIM = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx;  // of the thread (fiber) that runs now; set by the scheduler
static dim3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;

void emu_syncthreads(int line);

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __syncthreads() emu_syncthreads(__LINE__)
using std::exp;
using std::sqrt;
"""

_HARNESS = r"""
namespace emu {

// One fiber (ucontext) per CUDA thread of the running block, all on the calling OS thread.
// A fiber runs until it reaches a __syncthreads() or the end of the kernel; when every
// fiber has stopped, the scheduler checks that they all stopped at the same barrier (or
// all finished) and resumes them, in a different order each phase (forward, backward,
// then pseudo-random), so that a missing barrier shows as a wrong result.
constexpr std::size_t STACK = 256 * 1024;

static ucontext_t scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<std::vector<char>> stacks;
static std::vector<int> tags;  // line of the barrier a fiber waits at, -1 when finished
static int current = 0;
static void (*kernel_call)(void**) = nullptr;
static void** kernel_params = nullptr;

static void fiber_main() {
    kernel_call(kernel_params);
    tags[current] = -1;  // returning switches to uc_link, the scheduler
}

template <typename T> constexpr char code() {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_pointer_t<T>;
        using E = std::remove_cv_t<P>;
        constexpr bool ro = std::is_const_v<P>;
        if constexpr (std::is_same_v<E, float>) return ro ? 'A' : 'F';
        else if constexpr (std::is_same_v<E, double>) return ro ? 'B' : 'D';
        else if constexpr (std::is_same_v<E, int>) return ro ? 'J' : 'I';
        else return '?';
    } else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, long long>) return 'l';
    else if constexpr (std::is_same_v<T, double>) return 'd';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else return '?';
}

template <typename... A> std::string signature(void (*)(A...)) { return std::string{code<A>()...}; }

template <typename... A, std::size_t... I>
void invoke(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}
template <typename... A> void invoke(void (*f)(A...), void** params) {
    invoke(f, params, std::index_sequence_for<A...>{});
}

struct Entry { const char* name; void (*call)(void**); std::string (*sig)(); };

// Runs one block; returns an empty string or what went wrong. Every order in which the
// threads were resumed is folded into `trace` (FNV-1a over the thread indices).
static std::string run_block(unsigned threads, unsigned long long& seed, unsigned long long& trace) {
    for (unsigned t = 0; t < threads; ++t) {
        getcontext(&fibers[t]);
        fibers[t].uc_stack.ss_sp = stacks[t].data();
        fibers[t].uc_stack.ss_size = STACK;
        fibers[t].uc_link = &scheduler;
        makecontext(&fibers[t], fiber_main, 0);
        tags[t] = 0;
    }
    std::vector<unsigned> order(threads);
    for (long phase = 0;; ++phase) {
        for (unsigned t = 0; t < threads; ++t) order[t] = t;
        if (phase % 3 == 1) {
            for (unsigned t = 0; t < threads; ++t) order[t] = threads - 1 - t;
        } else if (phase % 3 == 2) {
            for (unsigned t = threads - 1; t > 0; --t) {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                std::swap(order[t], order[seed % (t + 1)]);
            }
        }
        for (unsigned t : order) {
            trace = (trace ^ t) * 1099511628211ULL;
            if (tags[t] == -1) continue;
            current = (int)t;
            threadIdx = dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
            swapcontext(&scheduler, &fibers[t]);
        }
        unsigned finished = 0;
        int line = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (tags[t] == -1) { ++finished; continue; }
            if (line == 0) line = tags[t];
            else if (tags[t] != line)
                return "threads of one block wait at different __syncthreads() (lines " + std::to_string(line) +
                       " and " + std::to_string(tags[t]) + ")";
        }
        if (finished == threads) return "";
        if (finished > 0)
            return "some threads of the block finished while others wait at the __syncthreads() of line " +
                   std::to_string(line);
    }
}

}  // namespace emu

void emu_syncthreads(int line) {
    const int me = emu::current;
    emu::tags[me] = line;
    swapcontext(&emu::fibers[me], &emu::scheduler);
}

static const emu::Entry emu_entries[] = {
@ENTRIES@
};

static const emu::Entry* emu_find(const char* name) {
    for (const auto& e : emu_entries) if (std::strcmp(e.name, name) == 0) return &e;
    return nullptr;
}

extern "C" int emu_signature(const char* name, char* out, int size) {
    const emu::Entry* e = emu_find(name);
    if (!e) return 1;
    std::snprintf(out, size, "%s", e->sig().c_str());
    return 0;
}

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, void** params, unsigned long long seed, unsigned long long* trace,
                          char* error, int size) {
    const emu::Entry* e = emu_find(name);
    if (!e) { std::snprintf(error, size, "no kernel %s", name); return 1; }
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx < 1 || gy < 1 || gz < 1 || bx < 1 || by < 1 || bz < 1 || gx > 2147483647u || gy > 65535 || gz > 65535 ||
        bx > 1024 || by > 1024 || bz > 64 || threads > 1024) {
        std::snprintf(error, size, "invalid launch of %s: grid (%u, %u, %u), block (%u, %u, %u)", name, gx, gy, gz, bx,
                      by, bz);
        return 1;
    }
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, by, bz};
    emu::fibers.resize(threads);
    emu::tags.resize(threads);
    while (emu::stacks.size() < threads) emu::stacks.emplace_back(emu::STACK);
    emu::kernel_call = e->call;
    emu::kernel_params = params;
    seed = seed * 2862933555777941757ULL + 3037000493ULL;
    if (seed == 0) seed = 88172645463325252ULL;
    *trace = 14695981039346656037ULL;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = dim3{x, y, z};
                const std::string problem = emu::run_block((unsigned)threads, seed, *trace);
                if (!problem.empty()) {
                    std::snprintf(error, size, "%s, block (%u, %u, %u): %s", name, x, y, z, problem.c_str());
                    return 1;
                }
            }
    return 0;
}
"""

_GUARD = 64  # guard cells before and after every array
# Guard cells are quiet NaNs (a sentinel for int) whose payload names the argument and the
# cell: a NaN read out of bounds propagates its payload, so a kernel that reads one cell
# and writes the result into another is still caught.
_GUARD_BASE = {torch.float32: (0x7FC00000, 12), torch.float64: (0x7FF8000000000000, 32), torch.int32: (-0x40000000, 12)}
_BITS_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.int32: torch.int32}
_POINTER = {"F": torch.float32, "D": torch.float64, "I": torch.int32}  # written back after the launch
_CONST_POINTER = {"A": torch.float32, "B": torch.float64, "J": torch.int32}  # read only: left untouched
_SCALAR = {"i": (np.int32, ctypes.c_int32), "l": (np.int64, ctypes.c_int64),
           "d": (np.float64, ctypes.c_double), "f": (np.float32, ctypes.c_float)}


def compiler() -> str | None:
    """The C++ compiler the emulator uses ($CXX or g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _harness_source() -> str:
    entries = "\n".join(
        f'    {{"{name}", [](void** p) {{ emu::invoke(&{name}, p); }}, [] {{ return emu::signature(&{name}); }}}},'
        for name in _compile.kernel_names()
    )
    return _SHIM + _compile.module_source() + _HARNESS.replace("@ENTRIES@", entries)


@functools.cache
def library() -> ctypes.CDLL:
    """Compile (once, cached in the temporary directory by source hash) and load the emulator."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs a C++17 compiler (g++ or $CXX)")
    code = _harness_source()
    flags = ["-std=c++17", "-O1", "-fPIC", "-shared", "-w"]
    digest = hashlib.sha256((cxx + " ".join(flags) + code).encode()).hexdigest()[:20]
    path = Path(tempfile.gettempdir()) / f"spn-cuda-emulator-{digest}.so"
    if not path.exists():
        with tempfile.TemporaryDirectory() as scratch:
            cpp = Path(scratch) / "emulator.cpp"
            cpp.write_text(code)
            out = Path(scratch) / "emulator.so"
            result = subprocess.run([cxx, *flags, "-o", str(out), str(cpp)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"the CUDA emulator did not compile:\n{result.stderr[-4000:]}")
            shutil.copy(out, str(path) + f".{os.getpid()}")
            os.replace(str(path) + f".{os.getpid()}", path)
    lib = ctypes.CDLL(str(path))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.c_char_p, *([ctypes.c_uint] * 6), ctypes.POINTER(ctypes.c_void_p),
                               ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_char_p, ctypes.c_int]
    lib.emu_signature.restype = ctypes.c_int
    lib.emu_signature.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    return lib


@functools.cache
def signature(name: str) -> str:
    """The kernel's parameters, one letter each: F/D/I pointer to float/double/int,
    A/B/J pointer to const float/double/int, i int, l long long, d double, f float."""
    out = ctypes.create_string_buffer(256)
    if library().emu_signature(name.encode(), out, len(out)) != 0:
        raise KeyError(f"no kernel {name!r}")
    return out.value.decode()


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def seed_for(node_id: str, salt: str | None = None) -> int:
    """The emulator seed of a test, from its pytest node id (and $SPN_EMULATOR_SEED, if set).

    The node id is relative to the rootdir ("tests/test_cuda_emulated.py::test_x[param]"), so
    a test gets the same seed alone (`pytest -k`), in its file or in the whole suite."""
    salt = os.environ.get(ENV_SEED, "") if salt is None else salt
    return _digest(f"{salt}|{node_id}")


def launch_seed(seed: int, index: int) -> int:
    """The thread-order seed of the `index`-th launch (from 0) of an emulator seeded `seed`."""
    return _digest(f"{seed}/{index}")


class Launch(NamedTuple):
    """One emulated launch: its number (from 0) among the emulator's launches, what was launched,
    the seed of its thread orders, and `order`, a digest of every order in which the threads
    of every block were resumed."""

    number: int
    name: str
    grid: tuple
    block: tuple
    seed: int
    order: int


class Emulator:
    """Runs the kernels on the CPU with checks; a launcher for spn/cuda/function.py.

    `make_launcher` is what `function.soft_proposal` takes (a launcher factory); `launch` is
    the launcher itself, `launch(name, grid, block, *args)`. The i-th launch's thread order
    comes from `launch_seed(seed, i)`. `launches` holds the last `keep` launches (a deque).
    """

    def __init__(self, seed: int, keep: int = 10_000):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"the seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.count = 0  # launches that reached the emulator, including those it refused
        self.launches: collections.deque[Launch] = collections.deque(maxlen=keep)
        self.lib = library()

    def make_launcher(self, device: torch.device | str | None = None):
        """The launcher for tensors on `device` (CPU only): this emulator's `launch`."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("the emulator runs on CPU tensors")
        return self.launch

    def launch(self, name: str, grid, block, *args) -> None:
        grid, block = tuple(grid), tuple(block)
        if len(grid) != 3 or len(block) != 3:
            raise ValueError(f"{name}: grid and block must be 3-tuples, got {grid}, {block}")
        sig = signature(name)
        if len(args) != len(sig):
            raise TypeError(f"{name} takes {len(sig)} arguments ({sig}), got {len(args)}")
        values: list = []
        buffers, storages = [], set()
        for position, (kind, arg) in enumerate(zip(sig, args, strict=True)):
            where = f"{name} argument {position}"
            if kind in _POINTER or kind in _CONST_POINTER:
                dtype = _POINTER.get(kind) or _CONST_POINTER[kind]
                if not isinstance(arg, torch.Tensor):
                    raise TypeError(f"{where} must be a tensor, got {type(arg).__name__}")
                if arg.dtype != dtype or arg.device.type != "cpu" or not arg.is_contiguous():
                    raise TypeError(f"{where} must be a contiguous CPU {dtype} tensor, got {arg.dtype} "
                                    f"on {arg.device}, contiguous={arg.is_contiguous()}")
                storage = arg.untyped_storage().data_ptr()
                if storage in storages:
                    raise ValueError(f"{where} shares memory with another argument")
                storages.add(storage)
                base, shift = _GUARD_BASE[arg.dtype]
                pattern = base + (position << shift) + torch.arange(2 * _GUARD, dtype=torch.int64)
                pattern = pattern.to(_BITS_VIEW[arg.dtype])
                guarded = torch.empty(arg.numel() + 2 * _GUARD, dtype=arg.dtype)
                bits = guarded.view(_BITS_VIEW[arg.dtype])
                bits[:_GUARD], bits[_GUARD + arg.numel():] = pattern[:_GUARD], pattern[_GUARD:]
                guarded[_GUARD:_GUARD + arg.numel()] = arg.reshape(-1)
                buffers.append((arg, guarded, pattern, where, kind in _POINTER))
                values.append(ctypes.c_void_p(guarded.data_ptr() + _GUARD * guarded.element_size()))
            else:
                numpy_type, c_type = _SCALAR[kind]
                if type(arg) is not numpy_type:
                    raise TypeError(f"{where} must be {numpy_type.__name__}, got {type(arg).__name__}")
                values.append(c_type(arg))
        pointers = [ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        params = (ctypes.c_void_p * max(1, len(values)))(*pointers)
        error = ctypes.create_string_buffer(1024)
        number, seed = self.count, launch_seed(self.seed, self.count)
        self.count += 1
        trace = ctypes.c_ulonglong(0)
        if self.lib.emu_launch(name.encode(), *grid, *block, params, seed, ctypes.byref(trace), error, len(error)) != 0:
            raise RuntimeError(f"emulated launch failed: {error.value.decode()}")
        self.launches.append(Launch(number, name, grid, block, seed, trace.value))
        for arg, guarded, pattern, where, writable in buffers:
            bits = guarded.view(_BITS_VIEW[arg.dtype])
            before, after = bits[:_GUARD], bits[_GUARD + arg.numel():]
            if not (torch.equal(before, pattern[:_GUARD]) and torch.equal(after, pattern[_GUARD:])):
                raise RuntimeError(f"{where}: the kernel wrote outside the array")
            if writable:  # inputs are not written to: their version counters stay as they are
                arg.view(-1).copy_(guarded[_GUARD:_GUARD + arg.numel()])
