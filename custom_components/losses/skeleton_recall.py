"""Skeleton recall: soft recall of the precomputed medial-surface tube over labelled voxels."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._masking import check_pair, label_channel, masked_probs, reduce_per_sample, split_label

__all__ = ["SkeletonRecallLoss"]


class SkeletonRecallLoss(_Loss):
    """Skeleton Recall loss (Kirchhoff et al. 2024, "Skeleton Recall Loss for Connectivity Conserving and
    Resource Efficient Segmentation of Thin Tubular Structures", ECCV), label 2 (unlabeled) ignored.

    With p = sigmoid(x), the precomputed tube t (label channel ``tube_channel``, see
    ``custom_components.data.targets.medial_surface_tube``), m = (label != 2) and sums over one sample::

        loss = 1 - (sum(p * t * m) + smooth_nr) / (sum(t * m) + smooth_dr)

    No neighbourhood operator: the tube is an input, never computed here. A sample whose tube has no
    labelled voxel gives 0 (with the default smooth terms) and no gradient.
    """

    def __init__(
        self,
        tube_channel: int = 2,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        sigmoid: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            tube_channel: label channel holding the tube (0/1). Defaults to 2 (docs/CONVENTIONS.md).
            smooth_nr: added to the numerator. Defaults to 1e-5.
            smooth_dr: added to the denominator (> 0). Defaults to 1e-5.
            batch: sum over the batch before dividing. Defaults to False.
            sigmoid: ``input`` is logits (True) or already probabilities (False).
            reduction: ``"mean"`` | ``"sum"`` over samples, or ``"none"`` (shape (B,), or (1,) with ``batch``).
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if tube_channel < 1:
            raise ValueError(f"tube_channel must be >= 1 (channel 0 is the label), got {tube_channel}.")
        if smooth_nr < 0 or smooth_dr <= 0:
            raise ValueError(f"smooth_nr must be >= 0 and smooth_dr > 0, got {smooth_nr}, {smooth_dr}.")
        self.tube_channel = int(tube_channel)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = bool(batch)
        self.sigmoid = bool(sigmoid)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities with ``sigmoid=False``), (B, 1, [Z,] Y, X).
            target: label tensor (B, C > tube_channel, ...), channel 0 = label 0/1/2.
        """
        name = type(self).__name__
        check_pair(name, input, target)
        tube = label_channel(name, target, self.tube_channel, "medial-surface tube")
        _, valid = split_label(target)
        p = masked_probs(input, valid, self.sigmoid)
        tube = (tube > 0.5).float() * valid
        axes = list(range(1, p.dim()))
        hit, total = (p * tube).sum(dim=axes), tube.sum(dim=axes)
        if self.batch:
            hit, total = hit.sum(0, keepdim=True), total.sum(0, keepdim=True)
        f = 1.0 - (hit + self.smooth_nr) / (total + self.smooth_dr)
        return reduce_per_sample(f, self.reduction, name)
