"""The competition score of the Vesuvius Challenge "Surface Detection" task (see ../shared/METRIC.md).

score = 0.30 * TopoScore + 0.35 * SurfaceDice@2 + 0.35 * voi_score, after every voxel with label 2 is
set to background in both prediction and label and both are binarized (!= 0, NaN as 0):

- SurfaceDice at tolerance 2 (Nikolov et al. 2021, the DeepMind ``surface-distance`` package);
  both masks empty -> 1, exactly one empty -> 0.
- VOI (Meila 2003) of the 26-connected components (``cc3d``) over the union of both foregrounds,
  H(GT|Pred) + H(Pred|GT) in bits as ``skimage.metrics.variation_of_information``;
  voi_score = 1 / (1 + 0.3 VOI); empty union -> VOI 0.
- TopoScore: Betti matching (Stucki et al. 2024, Betti-Matching-3D) of the inverted masks on 2x2x2 tiles
  (the first half of an axis takes the extra voxel), counts summed over tiles; per dimension k
  TopoF1_k = 2 m_k / (p_k + g_k), 0.5 / (p_k + 0.5) when g_k = 0 < p_k, dropped when p_k = g_k = 0;
  weighted mean with (0.34, 0.33, 0.33) renormalised over the dimensions left, 1 when none is left.

``leaderboard_score(pred, label, workers)`` is the fast path (tiles in parallel processes, surface
distances on the bounding box of both masks); ``leaderboard_score_reference`` the straightforward one;
their values are identical.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

__all__ = [
    "leaderboard_score",
    "leaderboard_score_reference",
    "surface_dice",
    "voi",
    "betti_tile_counts",
    "topo_score",
    "LeaderboardMetric",
    "LeaderboardIgniteMetric",
]

TOPO_WEIGHTS = (0.34, 0.33, 0.33)
TOLERANCE = 2.0
VOI_ALPHA = 0.3


def _prepare(pred, label) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.ndim != 3 or label.ndim != 3 or pred.shape != label.shape:
        raise ValueError(f"pred and label must be 3D arrays of one shape, got pred {pred.shape} and label {label.shape}.")
    if np.issubdtype(pred.dtype, np.floating):
        pred = np.nan_to_num(pred, nan=0.0)
    ignore = label == 2
    p = (pred != 0) & ~ignore
    g = (label != 0) & ~ignore
    return p, g


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        any_axes = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=any_axes))
        out.append(slice(max(0, idx[0] - margin), min(mask.shape[axis], idx[-1] + 1 + margin)))
    return tuple(out)


def surface_dice(p: np.ndarray, g: np.ndarray, crop: bool = True) -> float:
    """SurfaceDice@2 of two binary masks (``surface-distance``); ``crop`` restricts it to their bounding box.

    The surface elements and distances depend only on the voxels within one voxel of the masks, so
    cropping to the union's bounding box plus a margin of 2 (padding with background) gives the same value.
    """
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    pe, ge = not p.any(), not g.any()
    if pe and ge:
        return 1.0
    if pe or ge:
        return 0.0
    if crop:
        box = _bbox(p | g, margin=2)
        p, g = np.pad(p[box], 1), np.pad(g[box], 1)
    d = compute_surface_distances(g, p, (1.0, 1.0, 1.0))
    return float(compute_surface_dice_at_tolerance(d, TOLERANCE))


def _entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def voi(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(split, merge) = (H(GT|Pred), H(Pred|GT)) in bits over the union of both foregrounds (26-connected components)."""
    import cc3d

    union = p | g
    if not union.any():
        return 0.0, 0.0
    lp = cc3d.connected_components(p, connectivity=26)[union].astype(np.int64)
    lg = cc3d.connected_components(g, connectivity=26)[union].astype(np.int64)
    joint = np.unique(lg * (int(lp.max()) + 1) + lp, return_counts=True)[1]
    h_joint = _entropy_bits(joint)
    h_g = _entropy_bits(np.unique(lg, return_counts=True)[1])
    h_p = _entropy_bits(np.unique(lp, return_counts=True)[1])
    return h_joint - h_p, h_joint - h_g  # H(GT|Pred), H(Pred|GT)


def _tiles(shape) -> list[tuple[slice, ...]]:
    halves = [((0, math.ceil(n / 2)), (math.ceil(n / 2), n)) for n in shape]
    return [tuple(slice(a, b) for a, b in (hz, hy, hx)) for hz in halves[0] for hy in halves[1] for hx in halves[2]]


def betti_tile_counts(p_tile: np.ndarray, g_tile: np.ndarray) -> np.ndarray:
    """(3, 3) int array: rows matched m, prediction p, label g; columns dimensions 0, 1, 2."""
    from custom_components.losses.topology import load_betti_matching

    bm = load_betti_matching()
    if p_tile.size == 0:
        return np.zeros((3, 3), np.int64)
    a = np.ascontiguousarray(1.0 - p_tile.astype(np.float64))
    b = np.ascontiguousarray(1.0 - g_tile.astype(np.float64))
    r = bm.compute_matching([a], [b])[0]
    m = np.asarray(r.num_matched, np.int64)[:3]
    u1 = np.asarray(r.num_unmatched_input1, np.int64)[:3]
    u2 = np.asarray(r.num_unmatched_input2, np.int64)[:3]
    pad = lambda v: np.pad(v, (0, 3 - len(v)))  # noqa: E731
    m, u1, u2 = pad(m), pad(u1), pad(u2)
    return np.stack([m, m + u1, m + u2])


def _tile_job(args):
    return betti_tile_counts(*args)


def topo_score(counts: np.ndarray) -> tuple[float, list]:
    """TopoScore and the per-dimension TopoF1 (None when dropped) from summed (3, 3) counts."""
    f1, weights = [], []
    for k in range(3):
        m, p, g = (int(v) for v in counts[:, k])
        if p == 0 and g == 0:
            f1.append(None)
            continue
        f1.append(0.5 / (p + 0.5) if g == 0 else 2 * m / (p + g))
        weights.append(TOPO_WEIGHTS[k])
    kept = [v for v in f1 if v is not None]
    if not kept:
        return 1.0, f1
    return float(sum(w * v for w, v in zip(weights, kept)) / sum(weights)), f1


def _score(p, g, workers: int, fast: bool) -> dict:
    seconds = {}
    t = time.perf_counter()
    sd = surface_dice(p, g, crop=fast)
    seconds["surface_dice"] = time.perf_counter() - t
    t = time.perf_counter()
    split, merge = voi(p, g)
    seconds["voi"] = time.perf_counter() - t
    t = time.perf_counter()
    jobs = [(p[s], g[s]) for s in _tiles(p.shape)]
    if fast and workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=min(workers, 8), mp_context=ctx) as pool:
            tiles = list(pool.map(_tile_job, jobs))
    else:
        tiles = [_tile_job(j) for j in jobs]
    counts = np.sum(tiles, axis=0)
    ts, f1 = topo_score(counts)
    seconds["topo"] = time.perf_counter() - t
    v = split + merge
    vs = 1.0 / (1.0 + VOI_ALPHA * v)
    return {
        "score": 0.30 * ts + 0.35 * sd + 0.35 * vs,
        "topo_score": ts,
        "surface_dice": sd,
        "voi_score": vs,
        "voi": v,
        "voi_split": split,
        "voi_merge": merge,
        "topo_f1": f1,
        "betti_matched": counts[0].tolist(),
        "betti_pred": counts[1].tolist(),
        "betti_label": counts[2].tolist(),
        "seconds": seconds,
    }


def leaderboard_score(pred, label, workers: int = 1) -> dict:
    """The competition score of one volume (fast path; values identical to the reference)."""
    p, g = _prepare(pred, label)
    return _score(p, g, workers, fast=True)


def leaderboard_score_reference(pred, label) -> dict:
    """Straightforward single-process version of METRIC.md (for benchmarks and equality tests)."""
    p, g = _prepare(pred, label)
    return _score(p, g, 1, fast=False)


from monai.handlers.ignite_metric import IgniteMetricHandler  # noqa: E402
from monai.metrics import CumulativeIterationMetric  # noqa: E402

_COMPONENTS = ("score", "topo_score", "surface_dice", "voi_score")


class LeaderboardMetric(CumulativeIterationMetric):
    """MONAI metric: per sample [score, topo_score, surface_dice, voi_score] of (B, 1, ...) pred vs label."""

    def __init__(self, workers: int = 1):
        super().__init__()
        self.workers = int(workers)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        if y is None or y_pred.shape != y.shape:
            raise ValueError(f"y_pred and y must have one shape (B, 1, Z, Y, X), got {tuple(y_pred.shape)} and {None if y is None else tuple(y.shape)}.")
        rows = []
        for b in range(y_pred.shape[0]):
            r = leaderboard_score(y_pred[b, 0].detach().cpu().numpy(), y[b, 0].detach().cpu().numpy().astype(np.uint8), self.workers)
            rows.append([r[k] for k in _COMPONENTS])
        return torch.tensor(rows, dtype=torch.float32)

    def aggregate_components(self) -> dict[str, float]:
        data = self.get_buffer()
        if data is None or len(data) == 0:
            return {k: float("nan") for k in _COMPONENTS}
        data = torch.as_tensor(data).reshape(-1, len(_COMPONENTS))
        return {k: float(data[:, i].mean()) for i, k in enumerate(_COMPONENTS)}

    def aggregate(self):
        return torch.tensor(self.aggregate_components()["score"])


class LeaderboardIgniteMetric(IgniteMetricHandler):
    """Ignite handler of ``LeaderboardMetric`` for ``validate#key_metric``; also logs the components.

    The key metric is the mean score; ``val_topo_score``, ``val_surface_dice`` and ``val_voi_score`` go
    into ``engine.state.metrics`` beside it.
    """

    def __init__(self, workers: int = 1, output_transform=lambda x: x, save_details: bool = False):
        super().__init__(metric_fn=LeaderboardMetric(workers=workers), output_transform=output_transform, save_details=save_details)

    def completed(self, engine, name) -> None:
        super().completed(engine, name)
        for k, v in self.metric_fn.aggregate_components().items():
            if k != "score":
                engine.state.metrics[f"{name.split('_')[0]}_{k}" if "_" in name else k] = v
