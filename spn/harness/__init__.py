"""Training and evaluation of WSOL models end to end: ``python -m spn train`` / ``evaluate``.

    config.py       RunConfig: everything needed to rebuild a run's model and data (config.json)
    checkpoint.py   atomic checkpoints, loaded with ``torch.load(weights_only=True)``
    distributed.py  torchrun / torch.distributed: the process group, data sharding, rank 0 writes
    train.py        ``spn train``: the training loop, progress, metrics.jsonl, resume
    evaluate.py     ``spn evaluate``: the wsolevaluation protocol and the other metrics, OUT.json
    pictures.py     picture grids of images, maps and boxes

Datasets come from :mod:`spn.data`, models from :mod:`spn.models`, metrics from :mod:`spn.metrics`.
"""

from .config import RunConfig

__all__ = ["RunConfig"]
