"""Loss terms for the surface-detection task, all honouring label 2 (unlabeled), and their combination.

One class per module (MONAI style): ``bce``, ``dice``, ``cldice``, ``skeleton_recall``,
``surface_distance``, ``topology``; ``composite`` combines them with deep supervision. Inputs are logits
(B, 1, [Z,] Y, X) and a label tensor whose channel 0 is the label 0/1/2 (channel 1 the signed distance
map, channel 2 the medial-surface tube; docs/CONVENTIONS.md).
"""

from .bce import MaskedBCEWithLogitsLoss
from .cldice import MaskedSoftclDiceLoss
from .composite import TERM_NAMES, CompositeTopologyLoss
from .dice import MaskedSoftDiceLoss
from .skeleton_recall import SkeletonRecallLoss
from .surface_distance import SurfaceDistanceLoss
from .topology import PersistentHomologyLoss

__all__ = [
    "MaskedBCEWithLogitsLoss",
    "MaskedSoftDiceLoss",
    "MaskedSoftclDiceLoss",
    "SkeletonRecallLoss",
    "SurfaceDistanceLoss",
    "PersistentHomologyLoss",
    "CompositeTopologyLoss",
    "TERM_NAMES",
]
