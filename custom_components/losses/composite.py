"""The training loss: weighted sum of the topology-aware terms, with DynUNet deep supervision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn.modules.loss import _Loss

from .bce import MaskedBCEWithLogitsLoss
from .cldice import MaskedSoftclDiceLoss
from .dice import MaskedSoftDiceLoss
from .skeleton_recall import SkeletonRecallLoss
from .surface_distance import SurfaceDistanceLoss
from .topology import PersistentHomologyLoss

__all__ = ["CompositeTopologyLoss", "TERM_NAMES"]

TERM_NAMES = ("bce", "dice", "cldice", "skeleton_recall", "surface_distance", "topology")
# label channels each term reads (0 = label, 1 = signed distance map, 2 = tube; docs/CONVENTIONS.md)
_CHANNELS_NEEDED = {"bce": 1, "dice": 1, "cldice": 1, "skeleton_recall": 3, "surface_distance": 2, "topology": 1}


class CompositeTopologyLoss(_Loss):
    """``sum_t weights[t] * L_t`` over the terms t of ``TERM_NAMES`` with a weight > 0, label 2 ignored.

    Terms (each masks label 2 itself, see ``custom_components.losses._masking``):
    ``bce`` MaskedBCEWithLogitsLoss, ``dice`` MaskedSoftDiceLoss, ``cldice`` MaskedSoftclDiceLoss,
    ``skeleton_recall`` SkeletonRecallLoss (label channel 2), ``surface_distance`` SurfaceDistanceLoss
    (label channel 1), ``topology`` PersistentHomologyLoss. A term of weight 0 is neither constructed nor
    computed.

    Deep supervision (DynUNet, Isensee et al. nnU-Net): with heads h_0 (main) ... h_K at full size,
    head i weighs ``decay**i / sum_j decay**j`` (1, 1/2, 1/4, ... normalised to sum 1) and a term t is
    ``L_t = sum_i w_i L_t(h_i)``; the terms in ``main_head_only`` (by default the costly ones) use h_0
    only: ``L_t = L_t(h_0)``.

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

        Raises:
            ValueError: unknown term name (in ``weights`` or ``main_head_only``), negative or non-finite weight,
                or a bad ``deep_supervision_decay``; the message names the term and the valid names.
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
        """Deep-supervision weights of ``n_heads`` heads: ``decay**i`` normalised to sum 1."""
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
                and h.shape[2:] == label.shape[2:]
            )
            if not fits:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"head {i} has shape {shape}, label {tuple(label.shape)}: every head must be (B, 1, *S) "
                    "with the label's batch and spatial sizes (upsample deep-supervision heads first)."
                )
        return heads

    def forward(self, pred, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: logits: a (B, 1, *S) tensor, DynUNet's stacked (B, 1 + K, 1, *S) deep-supervision output,
                or a list of (B, 1, *S) heads (index 0 the main head).
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
        hw = self.head_weights(len(heads))
        total = torch.zeros((), dtype=torch.float32, device=label.device)
        last: dict[str, torch.Tensor] = {}
        for name, weight in self.weights.items():
            term = self.terms[name]
            if name in self.main_head_only or len(heads) == 1:
                value = term(heads[0], label).float()
            else:
                value = sum(w * term(h, label).float() for w, h in zip(hw, heads))
            last[name] = value.detach()
            total = total + weight * value
        self._last_terms = last
        return total
