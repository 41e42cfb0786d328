"""Soft Dice loss on sigmoid probabilities over labelled voxels."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._masking import check_pair, masked_probs, reduce_per_sample, split_label

__all__ = ["MaskedSoftDiceLoss"]


class MaskedSoftDiceLoss(_Loss):
    """Soft Dice loss (Milletari et al. 2016, "V-Net", 3DV) with label 2 (unlabeled) ignored.

    With p = sigmoid(x) set to 0 at unlabeled voxels, g = (label == 1) and sums over the labelled voxels
    of one sample (or of the whole batch with ``batch=True``)::

        loss = 1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)

    identical to ``monai.losses.DiceLoss(sigmoid=True)`` (same smooth terms) when no voxel is label 2.
    A sample without labelled voxels gives 0; one without surface gives ``1 - smooth_nr / (sum(p) +
    smooth_dr)`` (close to 1 unless p is ~0 everywhere): use ``batch=True`` to soften that.
    """

    def __init__(
        self,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        sigmoid: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            smooth_nr: added to the numerator. Defaults to 1e-5 (as MONAI ``DiceLoss``).
            smooth_dr: added to the denominator. Defaults to 1e-5 (as MONAI ``DiceLoss``).
            batch: sum over the batch before dividing (one Dice for the batch). Defaults to False.
            sigmoid: ``input`` is logits (True) or already probabilities (False).
            reduction: ``"mean"`` | ``"sum"`` over samples, or ``"none"`` (shape (B,), or (1,) with ``batch``).
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if smooth_nr < 0 or smooth_dr <= 0:
            raise ValueError(f"smooth_nr must be >= 0 and smooth_dr > 0, got {smooth_nr}, {smooth_dr}.")
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = bool(batch)
        self.sigmoid = bool(sigmoid)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities with ``sigmoid=False``), (B, 1, [Z,] Y, X).
            target: label tensor (B, C >= 1, ...), channel 0 = label 0/1/2.
        """
        check_pair(type(self).__name__, input, target)
        fg, valid = split_label(target)
        p = masked_probs(input, valid, self.sigmoid)
        axes = list(range(1, p.dim()))
        inter = (p * fg).sum(dim=axes)
        den = p.sum(dim=axes) + fg.sum(dim=axes)
        if self.batch:
            inter, den = inter.sum(0, keepdim=True), den.sum(0, keepdim=True)
        f = 1.0 - (2.0 * inter + self.smooth_nr) / (den + self.smooth_dr)
        return reduce_per_sample(f, self.reduction, type(self).__name__)
