"""Ensembles and test-time augmentation by logit fusion.

For networks f_1..f_N with weights w_n and test-time transforms t in T (mirrorings along up to three axes
and quarter turns about one axis), the fused logit of an input x is

    z(x) = sum_n w_n * mean_{t in T} t^-1( f_n(t(x)) )  /  sum_n w_n

and the probability is sigmoid(z), taken once, after fusion (the 1st place of the competition found
logit fusion better than averaging probabilities). ``LogitEnsemble`` computes z on one window;
``EnsembleSlidingWindowInferer`` runs each network through its own sliding window at its own window size
(models trained at 128^3 and 192^3 fused) and fuses the blended logits. Mirrors and quarter turns are
exact inverses of themselves on the voxel grid, so a network equivariant to them gives back f(x).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

__all__ = ["tta_transforms", "LogitEnsemble", "EnsembleSlidingWindowInferer", "main_head"]

#: the (B, C, Z, Y, X) dimensions a quarter turn about axis 0 (Z), 1 (Y) or 2 (X) mixes
_PLANES = {0: (3, 4), 1: (2, 4), 2: (2, 3)}


def tta_transforms(flips: int = 1, rotations: int = 1) -> list[tuple[tuple[int, ...], int]]:
    """``(flip dims, quarter turns)`` pairs: the first ``flips`` of the 8 mirrorings times 0..``rotations``-1 turns."""
    if not 1 <= int(flips) <= 8:
        raise ValueError(f"tta_flips must be in 1..8 (1 = no mirroring), got {flips}.")
    if not 1 <= int(rotations) <= 4:
        raise ValueError(f"tta_rotations must be in 1..4 (1 = no rotation), got {rotations}.")
    mirrors = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)][: int(flips)]
    return [(m, k) for k in range(int(rotations)) for m in mirrors]


def main_head(out, ndim: int) -> torch.Tensor:
    """The main head's logits (B, 1, *S) of a network output: a list of heads or stacked DS heads."""
    if isinstance(out, (list, tuple)):
        out = out[0]
    if out.ndim == ndim + 1:  # DynUNet's stacked deep-supervision heads in training mode
        out = out[:, 0]
    return out.float()


class LogitEnsemble(torch.nn.Module):
    """z(x) of the module docstring on one window (all networks at the same window size).

    Args:
        networks: the members f_n (eval mode; checkpoints or TorchScript).
        weights: w_n (default equal); any positive numbers, normalised.
        tta_flips: mirrorings per member (1 = none, 8 = all).
        tta_rotations: quarter turns about ``rotation_axis`` (1 = none, 4 = all), combined with the mirrorings.
        rotation_axis: 0 (Z), 1 (Y) or 2 (X) of the (Z, Y, X) volume.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], weights: Sequence[float] | None = None, tta_flips: int = 1,
                 tta_rotations: int = 1, rotation_axis: int = 0):
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network.")
        self.networks = torch.nn.ModuleList(networks) if all(isinstance(n, torch.nn.Module) for n in networks) else list(networks)
        weights = [1.0] * len(networks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(networks) or min(weights) <= 0:
            raise ValueError(f"ensemble_weights must be {len(networks)} positive numbers (one per checkpoint), got {weights}.")
        self.weights = [w / sum(weights) for w in weights]
        if int(rotation_axis) not in _PLANES:
            raise ValueError(f"tta_rotation_axis must be 0 (Z), 1 (Y) or 2 (X), got {rotation_axis}.")
        self.plane = _PLANES[int(rotation_axis)]
        self.transforms = tta_transforms(tta_flips, tta_rotations)

    def member_logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """mean over the transforms t of t^-1(f_index(t(x)))."""
        net, total = self.networks[index], None
        for dims, turns in self.transforms:
            z = main_head(net(self._apply(x, dims, turns)), x.ndim)
            z = self._invert(z, dims, turns)
            total = z if total is None else total + z
        return total / len(self.transforms)

    def _apply(self, x: torch.Tensor, dims: tuple[int, ...], turns: int) -> torch.Tensor:
        """t(x): mirror along ``dims``, then ``turns`` quarter turns in the rotation plane."""
        x = torch.flip(x, dims) if dims else x
        return torch.rot90(x, turns, self.plane) if turns else x

    def _invert(self, z: torch.Tensor, dims: tuple[int, ...], turns: int) -> torch.Tensor:
        """t^-1(z): the turns undone, then the mirroring."""
        z = torch.rot90(z, -turns, self.plane) if turns else z
        return torch.flip(z, dims) if dims else z

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * self.member_logits(i, x) for i, w in enumerate(self.weights))


class EnsembleSlidingWindowInferer:
    """Each member of a ``LogitEnsemble`` through its own sliding window (window ``roi_sizes[n]``), the
    blended logits fused with the ensemble's weights. ``sw_kwargs`` go to every window
    (``RobustSlidingWindowInferer``: ``sw_batch_size``, ``overlap``, ``mode``, ``sw_device``, ...)."""

    def __init__(self, roi_sizes: Sequence[Sequence[int]], **sw_kwargs):
        from custom_components.inference.sliding_window import RobustSlidingWindowInferer

        self.inferers = [RobustSlidingWindowInferer(roi_size=list(r), **sw_kwargs) for r in roi_sizes]

    def __call__(self, inputs: torch.Tensor, network: LogitEnsemble, *args, **kwargs) -> torch.Tensor:
        members = len(network.networks)
        if members != len(self.inferers):
            raise ValueError(f"{len(self.inferers)} window sizes for an ensemble of {members} networks.")
        fused = None
        for i, (inferer, w) in enumerate(zip(self.inferers, network.weights)):
            z = inferer(inputs, lambda x, i=i: network.member_logits(i, x))
            fused = w * z if fused is None else fused + w * z
        return fused
