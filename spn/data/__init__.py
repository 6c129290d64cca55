"""Datasets for training and evaluating WSOL models.

    wsol.py        wsolevaluation's metadata layout (CUB, ILSVRC, OpenImages, and the digits)
    voc.py         Pascal VOC (VOCdevkit/VOC2007): multi-label images, boxes, difficult flags
    digits.py      the offline benchmark made from scikit-learn's handwritten digits
    transforms.py  resize, random crop, flip (Pillow and torch)
    erased.py      images erased by masks as they are read (adversarial erasing's steps)

Every dataset item is a dict with the same keys (``docs/data.md``), batched by :func:`collate`.
Bad data raises :class:`DataError` naming the file and line, when the dataset is built.
"""

from ._errors import DataError
from .erased import ErasedRegions
from .voc import VOC_CLASSES, VOCDataset
from .wsol import WSOLDataset, collate

__all__ = ["VOC_CLASSES", "DataError", "ErasedRegions", "VOCDataset", "WSOLDataset", "collate"]
