"""Boundary (surface-distance) loss: probability times the precomputed signed distance map."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._masking import check_pair, label_channel, masked_probs, split_label

__all__ = ["SurfaceDistanceLoss"]


class SurfaceDistanceLoss(_Loss):
    """Boundary loss (Kervadec et al. 2019, "Boundary loss for highly unbalanced segmentation", MIDL),
    label 2 (unlabeled) ignored, on a signed distance map precomputed in prepare.

    With p = sigmoid(x), phi the signed distance map of the surface (label channel ``sdm_channel``,
    negative inside, positive outside, see ``custom_components.data.targets.signed_distance_map``), clipped to
    ``[-clip, clip]``, and m = (label != 2), over all voxels of the batch::

        loss = sum(m * p * phi) / max(sum(m), 1)

    Minimal (negative) when p = 1 exactly where phi < 0 and p = 0 where phi > 0. ``forward`` never computes
    a distance transform (MONAI ``BoundaryLoss`` does, on the CPU, every step); with the distance map of
    MONAI's convention in the channel and no label 2, the value equals ``monai.losses.BoundaryLoss(sigmoid=True)``.
    """

    def __init__(
        self,
        clip: float | None = None,
        sdm_channel: int = 1,
        sigmoid: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            clip: clip the map to ``[-clip, clip]`` (> 0), or None to use it as given. Defaults to None.
            sdm_channel: label channel holding the map. Defaults to 1 (docs/CONVENTIONS.md).
            sigmoid: ``input`` is logits (True) or already probabilities (False).
            reduction: ``"mean"`` (over labelled voxels of the batch), ``"sum"`` (over labelled voxels) or
                ``"none"`` (per-voxel ``m * p * phi``, shape of the input).
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}.")
        if sdm_channel < 1:
            raise ValueError(f"sdm_channel must be >= 1 (channel 0 is the label), got {sdm_channel}.")
        self.clip = None if clip is None else float(clip)
        self.sdm_channel = int(sdm_channel)
        self.sigmoid = bool(sigmoid)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities with ``sigmoid=False``), (B, 1, [Z,] Y, X).
            target: label tensor (B, C > sdm_channel, ...), channel 0 = label 0/1/2.
        """
        name = type(self).__name__
        check_pair(name, input, target)
        phi = label_channel(name, target, self.sdm_channel, "signed distance map")
        if self.clip is not None:
            phi = phi.clamp(-self.clip, self.clip)
        _, valid = split_label(target)
        p = masked_probs(input, valid, self.sigmoid)
        phi = torch.where(valid > 0, phi, torch.zeros((), device=phi.device))  # also drops non-finite fill values
        per_voxel = p * phi
        if self.reduction == LossReduction.NONE.value:
            return per_voxel
        total = per_voxel.sum()
        if self.reduction == LossReduction.SUM.value:
            return total
        return total / valid.sum().clamp_min(1.0)
