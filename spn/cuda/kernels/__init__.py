"""CUDA C++ sources of the Soft Proposal kernels (package data; see spn/cuda/compile.py)."""

__all__: list[str] = []  # no Python names: the .cu and .cuh files are read by spn/cuda/compile.py
