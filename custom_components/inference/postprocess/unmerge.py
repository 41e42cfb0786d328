"""``Unmerge``: a component with a multi-valued height map re-derived from higher thresholds (two touching sheets back as two)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import _VolumeTransform, _check_int, _mask, _probability
from .height_map import _component_boxes, _grow, _height_map, _normal_axis

class Unmerge(_VolumeTransform):
    """Split components that are two touching sheets, by re-deriving them from higher thresholds.

    For each 26-connected component of the mask of at least ``min_size`` voxels: its height map over the
    lattice plane across its PCA normal (see ``HeightMapFill``); when at least ``multi_valued_fraction``
    of its columns are multi-valued (a gap between two runs of voxels: two layers over one spot), the
    component is thresholded at each of ``levels`` in turn (probabilities, ascending), and at the first
    level where it falls into two or more pieces of at least ``min_size`` voxels it is re-derived from
    them: each voxel of the component goes to its nearest piece (geodesic growth inside the component,
    one voxel layer per step, ties to the higher piece id), voxels of pieces under ``min_size`` are
    grown over too, and every grown voxel that touches (26) a voxel of another piece is removed, so
    the pieces come back as separate components. Components that never split keep every voxel.
    Metric: a merge of two sheets costs the VOI merge term (H(GT | Pred)) and one H0 feature; splitting
    them back wins both, at the price of the removed contact voxels (SurfaceDice, a little). The 2nd
    place re-derived such components from masks at higher thresholds.

    In a pipeline the probability map is the pipeline's input (or the output of ``GaussianSmooth``);
    called on its own, the input is the probability map and the mask is ``input > threshold``.
    ``enabled=False``: no-op.
    """

    needs_probability = True

    def __init__(self, levels: Sequence[float] = (0.6, 0.7, 0.8, 0.9), min_size: int = 1000,
                 multi_valued_fraction: float = 0.1, threshold: float = 0.5, enabled: bool = True):
        levels = [float(v) for v in (levels or ())]
        if levels != sorted(levels) or any(not 0.0 <= v < 1.0 for v in levels):
            raise ValueError(f"Unmerge: levels must be ascending probabilities in [0, 1), got {levels!r}.")
        if not 0.0 <= multi_valued_fraction <= 1.0:
            raise ValueError(f"Unmerge: multi_valued_fraction must be in [0, 1], got {multi_valued_fraction!r}.")
        self.levels = levels
        self.min_size = _check_int(min_size, "Unmerge: min_size", 1)
        self.multi_valued_fraction = float(multi_valued_fraction)
        self.threshold = float(threshold)
        self.enabled = bool(enabled)

    def apply_volume(self, vol: np.ndarray, prob: np.ndarray | None = None) -> np.ndarray:
        if prob is None:
            prob = _probability(vol)
            mask = prob > self.threshold
        else:
            mask, prob = _mask(vol), _probability(prob)
        if not self.enabled or not self.levels or not mask.any() or min(mask.shape) < 3:
            return mask
        import cc3d

        out = mask.copy()
        labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
        for label, box, _ in _component_boxes(labels, n, 2 * self.min_size):
            comp = labels[box] == label
            if self._multi_valued(comp) >= max(self.multi_valued_fraction, 1e-12):
                split = self._split(comp, prob[box])
                if split is not None:
                    out[box] &= ~comp | split
        return out

    @staticmethod
    def _multi_valued(comp: np.ndarray) -> float:
        count, first, last = _height_map(comp, _normal_axis(comp))
        foot = count > 0
        return float(np.count_nonzero(foot & (count < last - first + 1))) / max(1, int(np.count_nonzero(foot)))

    def _split(self, comp: np.ndarray, prob: np.ndarray) -> np.ndarray | None:
        """The component's voxels that remain once re-derived from its pieces, or None when it never splits."""
        import cc3d

        for level in self.levels:
            pieces = cc3d.dust(np.ascontiguousarray(comp & (prob > level), np.uint8), threshold=self.min_size,
                               connectivity=26)
            pieces, n = cc3d.connected_components(pieces, connectivity=26, return_N=True)
            if n >= 2:
                return self._regrow(comp, pieces.astype(np.int32))
        return None

    @staticmethod
    def _regrow(comp: np.ndarray, pieces: np.ndarray) -> np.ndarray:
        """``comp`` less the grown voxels that touch another piece, after every voxel of ``comp`` outside
        the pieces joined a piece: a region of such voxels touching one piece joins it whole, one touching
        several (the contact) goes voxel by voxel to the nearest piece voxel (Euclidean)."""
        import cc3d
        from scipy import ndimage

        big = np.iinfo(np.int32).max
        core = pieces > 0
        rest, n = cc3d.connected_components(np.ascontiguousarray(comp & ~core), connectivity=26, return_N=True)
        if n == 0:
            return comp
        hi = ndimage.maximum_filter(pieces, size=3, mode="constant")
        lo = ndimage.minimum_filter(np.where(core, pieces, big), size=3, mode="constant", cval=big)
        at = np.flatnonzero(rest)
        r = rest.ravel()[at]
        top = np.zeros(n + 1, np.int64)
        np.maximum.at(top, r, hi.ravel()[at])
        bottom = np.full(n + 1, big, np.int64)
        np.minimum.at(bottom, r, lo.ravel()[at])
        grown = pieces.copy()
        single = top == bottom
        grown[(rest > 0) & single[rest]] = top[rest][(rest > 0) & single[rest]]
        keep = comp.copy()
        for k, box in enumerate(ndimage.find_objects(rest), start=1):
            if box is None or single[k]:
                continue
            box = _grow(box, 8, comp.shape)
            region = rest[box] == k
            _, idx = ndimage.distance_transform_edt(pieces[box] == 0, return_indices=True)
            nearest = pieces[box][tuple(idx)]
            grown[box][region] = nearest[region]
            around_hi = ndimage.maximum_filter(grown[box], size=3, mode="constant")
            around_lo = ndimage.minimum_filter(np.where(grown[box] > 0, grown[box], big), size=3, mode="constant",
                                               cval=big)
            contact = region & ((around_hi != grown[box]) | (around_lo != grown[box]))
            keep[box] &= ~contact
        return keep
# --------------------------------------------------------------------------------------------- pipeline
