"""Weakly supervised object localisation (WSOL) metrics, streaming and one-shot.

One contract for every metric (``base.py``): ``update(predictions..., ground truth...)``
once per batch, ``compute()`` -> :class:`MetricResult` with the headline in ``.value``,
``reset()``, ``merge(other)`` and ``sync()`` across ``torch.distributed`` processes; and a
one-shot function over one batch that returns what ``compute()`` does. Names of labels:
``labels`` is one class per image (or per query), ``box_labels`` one class per ground-truth
box, ``pred_labels`` the predicted class per image. Accuracies are fractions in ``[0, 1]``.

| metric | one-shot | ``.name`` | source |
| --- | --- | --- | --- |
| :class:`BoxAccuracy` | :func:`box_accuracy` | ``max_box_acc_v2`` / ``max_box_acc`` | wsolevaluation |
| :class:`PxAP` | :func:`pxap` | ``pxap`` | wsolevaluation |
| :class:`LocalizationAccuracy` | :func:`localization_accuracy` | ``gt_known_loc`` | ILSVRC protocol |
| :class:`PointingGame` | :func:`pointing_game` | ``pointing_game`` | TorchRay / released SPN |
| :class:`CorLoc` | :func:`corloc` | ``corloc`` | Deselaers et al.; released SPN |
| :class:`ObjectEnergy` | :func:`object_energy` | ``object_energy`` | SPN paper 4.1 |

Maps go in as tensors or arrays (``spn.localize``'s conventions); boxes are pixel-inclusive
``(x0, y0, x1, y1)`` with the ``+1`` IoU of :func:`pixel_box_iou`. ``docs/metrics.md`` gives
each definition and how it reproduces its reference code.
"""

from ._geometry import pixel_box_iou
from .base import Metric, MetricResult, evaluate
from .box_accuracy import BoxAccuracy, box_accuracy
from .corloc import CorLoc, corloc
from .localization_accuracy import LocalizationAccuracy, localization_accuracy
from .object_energy import ObjectEnergy, object_energy
from .pointing_game import PointingGame, PointingProtocol, pointing_game
from .pxap import PxAP, pxap

__all__ = [
    "BoxAccuracy",
    "CorLoc",
    "LocalizationAccuracy",
    "Metric",
    "MetricResult",
    "ObjectEnergy",
    "PointingGame",
    "PointingProtocol",
    "PxAP",
    "box_accuracy",
    "corloc",
    "evaluate",
    "localization_accuracy",
    "object_energy",
    "pixel_box_iou",
    "pointing_game",
    "pxap",
]
