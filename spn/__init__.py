"""spn: Soft Proposal Networks (Zhu et al., ICCV 2017) for PyTorch.

    >>> import torch, spn
    >>> v, m = spn.soft_proposal(torch.rand(2, 8, 7, 7))   # coupled features, proposal maps
    >>> layer = spn.SoftProposal(**spn.RELEASED)            # the released code's options
"""

from .coupling import couple, sum_pool
from .functional import ConvergenceWarning, soft_proposal
from .modules import SoftProposal, SpatialSumPool
from .presets import PAPER, RELEASED, default_epsilon, released_epsilon

__version__ = "0.1.0"

_SUBMODULES = ("cuda", "localize", "metrics", "models", "viz")


def __getattr__(name):
    # spn.models, spn.metrics, ... load on first use: `import spn` stays light.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"spn.{name}")
    raise AttributeError(f"module 'spn' has no attribute {name!r}")


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
