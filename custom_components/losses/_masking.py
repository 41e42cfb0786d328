"""The ignore label (2 = unlabeled) shared by every loss term, and shape checks.

Every term splits channel 0 of the label tensor into a binary ``target`` (label == 1) and a ``valid``
mask (label != 2), and sets the prediction probability to 0 at invalid voxels with ``torch.where``
*before* any neighbourhood operator (pooling, soft skeleton, downsampling): the probability there is
then a constant, so a prediction changed only inside label-2 voxels changes neither a loss value nor
any gradient, and no label-2 voxel leaks into its labelled neighbours. Sums and normalisations run over
``valid`` voxels only.
"""

from __future__ import annotations

import torch

__all__ = ["split_label", "masked_probs", "check_pair", "label_channel", "reduce_per_sample"]


def check_pair(name: str, input: torch.Tensor, target: torch.Tensor, min_target_channels: int = 1) -> None:
    """Raise ``ValueError`` naming both shapes unless ``input`` is (B, 1, *S) and ``target`` (B, >=n, *S)."""
    if input.dim() not in (4, 5):
        raise ValueError(f"{name}: input must be (B, 1, [Z,] Y, X) logits, got shape {tuple(input.shape)}.")
    if input.shape[1] != 1:
        raise ValueError(
            f"{name}: input must have one logit channel (B, 1, ...), got shape {tuple(input.shape)}."
        )
    if (
        target.dim() != input.dim()
        or target.shape[0] != input.shape[0]
        or target.shape[2:] != input.shape[2:]
        or target.shape[1] < min_target_channels
    ):
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}: "
            f"expected (B, >= {min_target_channels}, *spatial) with the input's batch and spatial sizes "
            "(label channels: 0 = label 0/1/2, 1 = signed distance map, 2 = medial-surface tube)."
        )


def split_label(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From channel 0 (values 0/1/2) of ``target`` (B, C, *S): float32 ``(fg, valid)``, each (B, 1, *S).

    ``fg = (label == 1)``, ``valid = (label != 2)``; fg is 0 wherever valid is 0.
    """
    lab = torch.round(target[:, :1].float())
    valid = lab != 2
    fg = (lab == 1).float()
    return fg, valid.float()


def masked_probs(input: torch.Tensor, valid: torch.Tensor, sigmoid: bool = True) -> torch.Tensor:
    """float32 probabilities (``sigmoid(input)`` or ``input``) with label-2 voxels set to 0 (background)."""
    x = input.float()
    p = torch.sigmoid(x) if sigmoid else x
    return torch.where(valid > 0, p, torch.zeros((), dtype=p.dtype, device=p.device))


def label_channel(name: str, target: torch.Tensor, channel: int, what: str) -> torch.Tensor:
    """Channel ``channel`` of ``target`` as float32 (B, 1, *S), or a ``ValueError`` naming the shape."""
    if target.shape[1] <= channel:
        raise ValueError(
            f"{name}: needs the {what} in label channel {channel}, but the label has shape "
            f"{tuple(target.shape)} ({target.shape[1]} channel(s))."
        )
    return target[:, channel : channel + 1].float()


def reduce_per_sample(values: torch.Tensor, reduction: str, name: str) -> torch.Tensor:
    """Apply ``reduction`` ("mean" | "sum" | "none") to per-sample values of shape (B,)."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f'{name}: unsupported reduction "{reduction}", available options are ["mean", "sum", "none"].')
