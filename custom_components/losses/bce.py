"""Binary cross-entropy on logits over labelled voxels, with a fixed or batch-derived positive weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._masking import check_pair, split_label

__all__ = ["MaskedBCEWithLogitsLoss"]


class MaskedBCEWithLogitsLoss(_Loss):
    """Weighted binary cross-entropy on logits, label 2 (unlabeled) ignored.

    With x the logit, y = (label == 1), m = (label != 2) and w the positive weight::

        l(q) = -[ w * y(q) * log sigmoid(x(q)) + (1 - y(q)) * log(1 - sigmoid(x(q))) ]
        loss = sum_q m(q) l(q) / max(sum_q m(q), 1)           (reduction "mean", over the whole batch)

    ``pos_weight="auto"`` sets ``w = n_neg / n_pos`` from the labelled voxels of the batch (no gradient),
    clamped to at most ``max_pos_weight``; ``w = 1`` when the batch has no positive voxel. A patch with
    no labelled voxel gives 0 (and zero gradients).
    """

    def __init__(
        self,
        pos_weight: float | str = 1.0,
        max_pos_weight: float = 20.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            pos_weight: weight of the positive (surface) voxels, a float > 0 or ``"auto"``. Defaults to 1.0.
            max_pos_weight: upper clamp of the ``"auto"`` weight. Defaults to 20.0.
            reduction: ``"mean"`` (over labelled voxels of the batch), ``"sum"`` (over labelled voxels), or
                ``"none"`` (per-voxel loss, shape of the input, 0 at unlabeled voxels).
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if isinstance(pos_weight, str):
            if pos_weight != "auto":
                raise ValueError(f'pos_weight must be a float > 0 or "auto", got "{pos_weight}".')
        elif not float(pos_weight) > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}.")
        if not float(max_pos_weight) > 0:
            raise ValueError(f"max_pos_weight must be > 0, got {max_pos_weight}.")
        self.pos_weight = pos_weight if isinstance(pos_weight, str) else float(pos_weight)
        self.max_pos_weight = float(max_pos_weight)

    @torch.no_grad()
    def batch_pos_weight(self, fg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The positive weight for this batch (a 0-dim float32 tensor on the input's device)."""
        if self.pos_weight != "auto":
            return torch.full((), self.pos_weight, dtype=torch.float32, device=fg.device)  # a fill, not a host copy
        n_pos = fg.sum()
        n_neg = valid.sum() - n_pos
        w = torch.where(n_pos > 0, n_neg / n_pos.clamp_min(1.0), torch.ones_like(n_pos))
        return w.clamp(max=self.max_pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits, (B, 1, [Z,] Y, X).
            target: label tensor (B, C >= 1, ...), channel 0 = label 0/1/2.
        """
        check_pair(type(self).__name__, input, target)
        fg, valid = split_label(target)
        x = input.float()
        # w * y * softplus(-x) + (1 - y) * softplus(x); the unweighted kernel is faster when w is fixed at 1
        w = None if self.pos_weight == 1.0 else self.batch_pos_weight(fg, valid).reshape(1)
        per_voxel = F.binary_cross_entropy_with_logits(x, fg, pos_weight=w, reduction="none")
        per_voxel = torch.where(valid > 0, per_voxel, torch.zeros((), device=x.device))
        if self.reduction == LossReduction.NONE.value:
            return per_voxel
        total = per_voxel.sum()
        if self.reduction == LossReduction.SUM.value:
            return total
        return total / valid.sum().clamp_min(1.0)
