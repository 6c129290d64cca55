"""CUDA C++ sources of the Soft Proposal kernels (package data; see spn/cuda/compile.py)."""
