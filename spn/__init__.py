"""spn: Soft Proposal Networks (Zhu et al., ICCV 2017) for PyTorch.

    >>> import torch, spn
    >>> v, m = spn.soft_proposal(torch.rand(2, 8, 7, 7))   # coupled features, proposal maps
    >>> layer = spn.SoftProposal(**spn.RELEASED)            # the released code's options
"""

import importlib as _importlib
from types import ModuleType as _ModuleType

from .coupling import couple, sum_pool
from .functional import ConvergenceWarning, soft_proposal
from .modules import SoftProposal, SpatialSumPool
from .presets import PAPER, RELEASED, default_epsilon, released_epsilon

__version__ = "0.1.0"

# Loaded on first use (`spn.models`, ...), so that `import spn` stays light: it imports torch
# and NumPy, never SciPy's ndimage, matplotlib, Pillow, OpenCV or CuPy.
_SUBMODULES = ("cuda", "data", "harness", "localize", "metrics", "models", "reference", "viz")


def __getattr__(name: str) -> _ModuleType:
    if name in _SUBMODULES:
        return _importlib.import_module(f"spn.{name}")
    raise AttributeError(f"module 'spn' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily loaded submodules too, so that completion and `dir(spn)` show them
    return sorted({*globals(), *_SUBMODULES})


__all__ = [
    "PAPER",
    "RELEASED",
    "ConvergenceWarning",
    "SoftProposal",
    "SpatialSumPool",
    "couple",
    "default_epsilon",
    "released_epsilon",
    "soft_proposal",
    "sum_pool",
]
