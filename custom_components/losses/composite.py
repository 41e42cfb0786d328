"""The training loss: weighted sum of the topology-aware terms, with deep supervision at full resolution
(DynUNet's heads, upsampled inside the network) or at falling resolution (nnU-Net's ResEnc: the targets are
pooled to each head's size, ``downsample_target``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from .bce import MaskedBCEWithLogitsLoss
from .cldice import MaskedSoftclDiceLoss
from .dice import MaskedSoftDiceLoss
from .skeleton_recall import SkeletonRecallLoss
from .surface_distance import SurfaceDistanceLoss
from .topology import PersistentHomologyLoss

__all__ = ["CompositeTopologyLoss", "TERM_NAMES", "downsample_target"]

TERM_NAMES = ("bce", "dice", "cldice", "skeleton_recall", "surface_distance", "topology")
# label channels each term reads (0 = label, 1 = signed distance map, 2 = tube; docs/CONVENTIONS.md)
_CHANNELS_NEEDED = {"bce": 1, "dice": 1, "cldice": 1, "skeleton_recall": 3, "surface_distance": 2, "topology": 1}


def downsample_target(label: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """The label tensor (B, C, *S) at a head ``factors`` times coarser per axis (each an integer dividing S).

    Per block of ``prod(factors)`` voxels:

    - channel 0 (label 0/1/2): 1 if any voxel is 1, else 2 if any is 2, else 0 (max pooling of the surface: a
      sheet 2-4 voxels thick never vanishes or breaks at a coarse head, as nearest sampling would let it; a block
      holding unlabeled voxels and no surface is not known to be background, so it is ignored);
    - channel 1 (signed distance map, negative inside): the block's minimum divided by the geometric mean g of
      the factors, i.e. distances in coarse voxels, negative exactly where channel 0 is 1;
    - channel 2 and later (the medial-surface tube, 0/1): maximum.

    One max pooling of all channels (label 1 mapped to 3 first, the map negated), float32 result. Pooling
    composes: ``downsample_target(downsample_target(y, a), b) == downsample_target(y, a * b)``.
    """
    factors = tuple(int(f) for f in factors)
    if all(f == 1 for f in factors):
        return label
    lab = torch.round(label[:, :1].float())
    parts = [torch.where(lab == 1, torch.full_like(lab, 3.0), lab)]  # max: 3 (surface) > 2 (unlabeled) > 0
    if label.shape[1] > 1:
        parts.append(-label[:, 1:2].float())
    if label.shape[1] > 2:
        parts.append(label[:, 2:].float())
    pool = F.max_pool3d if label.dim() == 5 else F.max_pool2d
    pooled = pool(torch.cat(parts, dim=1), kernel_size=factors, stride=factors)
    out = [torch.where(pooled[:, :1] == 3, torch.ones_like(pooled[:, :1]), pooled[:, :1])]
    if label.shape[1] > 1:
        out.append(pooled[:, 1:2] / -(math.prod(factors) ** (1.0 / len(factors))))
    if label.shape[1] > 2:
        out.append(pooled[:, 2:])
    return torch.cat(out, dim=1)


class CompositeTopologyLoss(_Loss):
    """``sum_t weights[t] * L_t`` over the terms t of ``TERM_NAMES`` with a weight > 0, label 2 ignored.

    Terms (each masks label 2 itself, see ``custom_components.losses._masking``):
    ``bce`` MaskedBCEWithLogitsLoss, ``dice`` MaskedSoftDiceLoss, ``cldice`` MaskedSoftclDiceLoss,
    ``skeleton_recall`` SkeletonRecallLoss (label channel 2), ``surface_distance`` SurfaceDistanceLoss
    (label channel 1), ``topology`` PersistentHomologyLoss. A term of weight 0 is neither constructed nor
    computed.

    Deep supervision (Isensee et al. nnU-Net): with heads h_0 (main) ... h_K, head i weighs w_i =
    ``deep_supervision_weights[i]`` when that list is given (as given, not normalised: ``[0.4, 0.4, 0.1, 0.1]``
    is the 10th place's), else ``decay**i / sum_j decay**j`` (1, 1/2, 1/4, ... normalised to sum 1), and a term t
    is ``L_t = sum_i w_i L_t(h_i, y_i)``; the terms in ``main_head_only`` (by default the costly ones) use h_0
    only: ``L_t = L_t(h_0, y)``. A head of weight 0 is not computed. y_i is the label y itself for a head of the
    label's size (DynUNet upsamples its heads inside the network) and ``downsample_target(y, S / s_i)`` for a
    head of size s_i (nnU-Net's ResEnc returns heads at 1/2, 1/4, ... resolution; the targets are pooled on the
    device, rather than the heads upsampled: a head at 1/2**i costs its loss terms 1/8**i of the main head's
    memory and time instead of as much again). A head that no term reads enters the sum as 0 * sum(h_i), so
    that every parameter gets a gradient (DDP refuses a parameter without one).

    ``last_term_tensors`` holds each computed term's last value ``L_t`` (before its weight) as a detached
    device scalar, for the ``loss/<term>`` logs (summed on the device, read once per epoch);
    ``last_terms`` gives them as floats, which reads the device: the loss itself never synchronises it.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        bce_pos_weight: float | str = 1.0,
        bce_max_pos_weight: float = 20.0,
        dice_batch: bool = True,
        cldice_iterations: int = 5,
        cldice_batch: bool = False,
        cldice_checkpoint: bool = False,
        skeleton_recall_batch: bool = False,
        surface_clip: float | None = None,
        topology_every_n: int = 10,
        topology_downsample: int = 4,
        topology_pool: str = "max",
        topology_crop: int | None = None,
        deep_supervision_decay: float = 0.5,
        main_head_only: Sequence[str] = ("cldice", "skeleton_recall", "topology"),
        deep_supervision_weights: Sequence[float] | None = None,
    ) -> None:
        """
        Args:
            weights: ``{term: weight >= 0}`` with names from ``TERM_NAMES``; missing terms weigh 0.
            bce_pos_weight: ``MaskedBCEWithLogitsLoss`` ``pos_weight`` (float or ``"auto"``). Defaults to 1.0.
            bce_max_pos_weight: clamp of the ``"auto"`` weight. Defaults to 20.0.
            dice_batch: one Dice over the batch (True, nnU-Net's batch Dice: patches without surface do not
                get a Dice of ~1) or per sample. Defaults to True.
            cldice_iterations: soft-skeleton iterations. Defaults to 5 (sheets up to 6 voxels thick at any
                orientation, see ``MaskedSoftclDiceLoss``).
            cldice_batch: clDice over the batch. Defaults to False (as MONAI).
            cldice_checkpoint: recompute the soft skeleton in backward to save its memory. Defaults to False.
            skeleton_recall_batch: recall over the batch. Defaults to False.
            surface_clip: clip of the signed distance map (voxels), or None. Defaults to None.
            topology_every_n: the topology term runs every n-th call (detached last value otherwise).
                Defaults to 10.
            topology_downsample: pooling factor before the Betti matching. Defaults to 4.
            topology_pool: ``"max"`` or ``"avg"``. Defaults to ``"max"``.
            topology_crop: run the matching on a random window of this side in the pooled map (bounds its
                time), or None for the whole map. Defaults to None.
            deep_supervision_decay: head i weighs ``decay**i`` before normalisation, in (0, 1]. Defaults to 0.5.
            main_head_only: terms computed on the main head only. Defaults to the three costly ones.
            deep_supervision_weights: weight of each head, main first, used as given (one entry per head the
                network returns: ``deep_supr_num + 1``), or None for the decay. Defaults to None.

        Raises:
            ValueError: unknown term name (in ``weights`` or ``main_head_only``), negative or non-finite weight,
                a bad ``deep_supervision_decay`` or ``deep_supervision_weights``; the message names the term and
                the valid names, or the list.
        """
        super().__init__()
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a mapping {{term: weight}} over {list(TERM_NAMES)}, got {weights!r}.")
        clean: dict[str, float] = {}
        for name, w in weights.items():
            if name not in TERM_NAMES:
                raise ValueError(f'unknown loss term "{name}" in weights; valid names: {list(TERM_NAMES)}.')
            w = float(w)
            if not (w >= 0 and w < float("inf")):
                raise ValueError(
                    f'loss term "{name}" has weight {w}; weights must be finite and >= 0 (terms: {list(TERM_NAMES)}).'
                )
            if w > 0:
                clean[name] = w
        for name in main_head_only:
            if name not in TERM_NAMES:
                raise ValueError(f'unknown loss term "{name}" in main_head_only; valid names: {list(TERM_NAMES)}.')
        if not 0 < float(deep_supervision_decay) <= 1:
            raise ValueError(f"deep_supervision_decay must be in (0, 1], got {deep_supervision_decay}.")
        if deep_supervision_weights is not None:
            ds = [float(w) for w in deep_supervision_weights]
            if not ds or not all(0 <= w < float("inf") for w in ds) or not any(w > 0 for w in ds):
                raise ValueError(
                    f"deep_supervision_weights must be a non-empty list of finite weights >= 0, one per head (main "
                    f"first), at least one > 0; got {list(deep_supervision_weights)}."
                )
            deep_supervision_weights = ds
        self.deep_supervision_weights = deep_supervision_weights
        self.weights = {n: clean[n] for n in TERM_NAMES if n in clean}
        self.main_head_only = tuple(main_head_only)
        self.deep_supervision_decay = float(deep_supervision_decay)
        builders = {
            "bce": lambda: MaskedBCEWithLogitsLoss(pos_weight=bce_pos_weight, max_pos_weight=bce_max_pos_weight),
            "dice": lambda: MaskedSoftDiceLoss(batch=dice_batch),
            "cldice": lambda: MaskedSoftclDiceLoss(
                iterations=cldice_iterations, batch=cldice_batch, checkpoint=cldice_checkpoint
            ),
            "skeleton_recall": lambda: SkeletonRecallLoss(batch=skeleton_recall_batch),
            "surface_distance": lambda: SurfaceDistanceLoss(clip=surface_clip),
            "topology": lambda: PersistentHomologyLoss(
                downsample=topology_downsample, pool=topology_pool, every_n=topology_every_n, crop=topology_crop
            ),
        }
        self.terms = torch.nn.ModuleDict({n: builders[n]() for n in self.weights})
        self._last_terms: dict[str, torch.Tensor] = {}

    @property
    def last_term_tensors(self) -> dict[str, torch.Tensor]:
        """``{term: last value}`` as detached 0-d tensors on the loss's device (no host read)."""
        return dict(self._last_terms)

    @property
    def last_terms(self) -> dict[str, float]:
        """``{term: last value}`` of the terms with a weight > 0 (unweighted, deep-supervision combined)."""
        return {k: float(v) for k, v in self._last_terms.items()}

    def head_weights(self, n_heads: int) -> list[float]:
        """Deep-supervision weights of ``n_heads`` heads: ``deep_supervision_weights`` (its length must be
        ``n_heads``), else ``decay**i`` normalised to sum 1."""
        if self.deep_supervision_weights is not None:
            if len(self.deep_supervision_weights) != n_heads:
                raise ValueError(
                    f"deep_supervision_weights {self.deep_supervision_weights} has {len(self.deep_supervision_weights)} "
                    f"entries but the network returns {n_heads} head(s): give one weight per head, or build the "
                    f"network with deep_supr_num {len(self.deep_supervision_weights) - 1} (a network of n stages "
                    "returns at most n - 1 heads)."
                )
            return list(self.deep_supervision_weights)
        raw = [self.deep_supervision_decay**i for i in range(n_heads)]
        return [r / sum(raw) for r in raw]

    def _heads(self, pred, label: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(pred, (list, tuple)):
            heads = list(pred)
            if not heads:
                raise ValueError("pred is an empty list of heads.")
        elif not isinstance(pred, torch.Tensor):
            raise ValueError(f"pred must be a tensor or a list of tensors, got {type(pred).__name__}.")
        elif pred.dim() == label.dim() + 1:
            heads = list(pred.unbind(dim=1))  # DynUNet deep supervision: (B, 1 + K, C, *S), index 0 main
        elif pred.dim() == label.dim():
            heads = [pred]
        else:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} does not fit label shape {tuple(label.shape)}: expected "
                "(B, C, *S), or (B, 1 + K, C, *S) stacked deep-supervision heads, with label (B, 1 or 3, *S)."
            )
        for i, h in enumerate(heads):
            fits = (
                isinstance(h, torch.Tensor)
                and h.dim() == label.dim()
                and h.shape[0] == label.shape[0]
                and (
                    h.shape[2:] == label.shape[2:]
                    or (i > 0 and all(0 < s <= t and t % s == 0 for s, t in zip(h.shape[2:], label.shape[2:])))
                )
            )
            if not fits:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"head {i} has shape {shape}, label {tuple(label.shape)}: the main head (0) must be (B, 1, *S) "
                    "with the label's batch and spatial sizes, a deep-supervision head (B, 1, *s) with every s "
                    "dividing S."
                )
        return heads

    def forward(self, pred, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: logits: a (B, 1, *S) tensor, DynUNet's stacked (B, 1 + K, 1, *S) deep-supervision output,
                or a list of heads, index 0 the main head (B, 1, *S), the others (B, 1, *S) or coarser
                (nnU-Net's ResEnc: S / 2**i), each size dividing S.
            label: (B, 3, *S) with channels [label 0/1/2, signed distance map, tube], or (B, 1, *S) when
                only label-channel terms have a weight (``bce``, ``dice``, ``cldice``, ``topology``).

        Returns:
            the weighted sum, a float32 scalar.
        """
        if not isinstance(label, torch.Tensor) or label.dim() not in (4, 5):
            shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
            raise ValueError(f"label must be a (B, 1 or 3, [Z,] Y, X) tensor, got {shape}.")
        pred_shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else f"a list of {len(pred)} heads"
        for name in self.weights:
            if label.shape[1] < _CHANNELS_NEEDED[name]:
                raise ValueError(
                    f'loss term "{name}" needs label channels 0..{_CHANNELS_NEEDED[name] - 1} '
                    f"([label, signed distance map, tube]) but the label has shape {tuple(label.shape)}; "
                    f"pred: {pred_shape}."
                )
        heads = self._heads(pred, label)
        hw = [1.0] if len(heads) == 1 and self.deep_supervision_weights is None else self.head_weights(len(heads))
        targets: dict[tuple[int, ...], torch.Tensor] = {}

        def target(h: torch.Tensor) -> torch.Tensor:
            factors = tuple(t // s for s, t in zip(h.shape[2:], label.shape[2:]))
            if factors not in targets:  # pooled from the coarsest target already made that divides it
                done = [k for k in targets if all(f % c == 0 for f, c in zip(factors, k))]
                k = max(done, key=math.prod, default=(1,) * len(factors))
                source = targets[k] if k in targets else label
                targets[factors] = downsample_target(source, tuple(f // c for f, c in zip(factors, k)))
            return targets[factors]

        total = torch.zeros((), dtype=torch.float32, device=label.device)
        last: dict[str, torch.Tensor] = {}
        used: set[int] = set()
        for name, weight in self.weights.items():
            term = self.terms[name]
            if name in self.main_head_only:
                used.add(0)
                value = term(heads[0], label).float()
            else:
                on = [i for i, w in enumerate(hw) if w > 0]
                used.update(on)
                value = sum(hw[i] * term(heads[i], target(heads[i])).float() for i in on)
            last[name] = value.detach()
            total = total + weight * value
        for i in sorted(set(range(len(heads))) - used):  # a gradient (of 0) for every parameter, for DDP
            total = total + 0.0 * heads[i].float().sum()
        self._last_terms = last
        return total
