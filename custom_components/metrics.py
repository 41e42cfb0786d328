"""The competition score of the Vesuvius Challenge "Surface Detection" task (see ../shared/METRIC.md).

score = 0.30 * TopoScore + 0.35 * SurfaceDice@2 + 0.35 * voi_score, after every voxel with label 2 is
set to background in both prediction and label and both are binarized (!= 0, NaN as 0):

- SurfaceDice at tolerance 2 (Nikolov et al. 2021, the DeepMind ``surface-distance`` package);
  both masks empty -> 1, exactly one empty -> 0.
- VOI (Meila 2003) of the 26-connected components (``cc3d``) over the union of both foregrounds,
  H(GT|Pred) + H(Pred|GT) in bits as ``skimage.metrics.variation_of_information(gt, pred)``
  (split = H(Pred|GT), merge = H(GT|Pred)); voi_score = 1 / (1 + 0.3 VOI); empty union -> VOI 0.
- TopoScore: Betti matching (Stucki et al. 2024, Betti-Matching-3D) of the inverted masks on 2x2x2 tiles
  (the first half of an axis takes the extra voxel), counts summed over tiles; per dimension k
  TopoF1_k = 2 m_k / (p_k + g_k), 0.5 / (p_k + 0.5) when g_k = 0 < p_k, dropped when p_k = g_k = 0;
  weighted mean with (0.34, 0.33, 0.33) renormalised over the dimensions left, 1 when none is left.

``leaderboard_score(pred, label, workers)`` is the fast path (tiles in parallel processes, surface
distances on the bounding box of both masks); ``leaderboard_score_reference`` the straightforward one;
their values are identical. Both return a dict: score, topo_score, surface_dice, voi_score, voi,
voi_split, voi_merge, topo_f1 (3 values, None where dropped), betti_matched / betti_pred / betti_label
(3 counts each, summed over tiles) and seconds (wall time per component).

``LeaderboardMetric`` (MONAI ``CumulativeIterationMetric``) and ``LeaderboardIgniteMetric`` (ignite handler,
``validate#key_metric``) compute it during validation.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric

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
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped to the volume); None if empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(out)


CROP_MARGIN = 3


def surface_dice(p: np.ndarray, g: np.ndarray, crop: bool = True) -> float:
    """SurfaceDice@2 (Nikolov et al. 2021, ``surface-distance``) of binary masks ``p`` (pred), ``g`` (label).

    Both empty -> 1, exactly one empty -> 0. ``crop`` first cuts both masks to the bounding box of their
    union grown by ``CROP_MARGIN`` voxels: ``compute_surface_distances`` itself crops to that bounding box
    (zero-padded by one voxel) before anything else, so the value is exactly the full-volume one.
    """
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    pe, ge = not p.any(), not g.any()
    if pe and ge:
        return 1.0
    if pe or ge:
        return 0.0
    if crop:
        box = _bbox(p | g, margin=CROP_MARGIN)
        p, g = p[box], g[box]
    d = compute_surface_distances(np.ascontiguousarray(g), np.ascontiguousarray(p), (1.0, 1.0, 1.0))
    return float(compute_surface_dice_at_tolerance(d, TOLERANCE))


def _entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def voi(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(split, merge) of the variation of information (Meila 2007) in bits, as
    ``skimage.metrics.variation_of_information(gt_labels, pred_labels)`` orders them:
    split = H(Pred | GT) (false splits), merge = H(GT | Pred) (false merges), over the voxels of the union
    of both foregrounds, each labelled by its mask's 26-connected components (``cc3d``; background = 0).
    Empty union -> (0, 0). H(A|B) = H(A, B) - H(B) from the contingency table.
    """
    import cc3d

    union = p | g
    if not union.any():
        return 0.0, 0.0
    lp = cc3d.connected_components(np.ascontiguousarray(p), connectivity=26)[union].astype(np.int64)
    lg = cc3d.connected_components(np.ascontiguousarray(g), connectivity=26)[union].astype(np.int64)
    joint = np.unique(lg * (int(lp.max()) + 1) + lp, return_counts=True)[1]
    h_joint = _entropy_bits(joint)
    h_g = _entropy_bits(np.bincount(lg))
    h_p = _entropy_bits(np.bincount(lp))
    split = max(h_joint - h_g, 0.0)  # H(Pred | GT)
    merge = max(h_joint - h_p, 0.0)  # H(GT | Pred)
    return split, merge


def tiles(shape) -> list[tuple[slice, ...]]:
    """The 2x2x2 tiles of ``shape``: each axis of length n cut into [0, ceil(n/2)) and [ceil(n/2), n)."""
    halves = [((0, math.ceil(n / 2)), (math.ceil(n / 2), n)) for n in shape]
    return [tuple(slice(a, b) for a, b in (hz, hy, hx)) for hz in halves[0] for hy in halves[1] for hx in halves[2]]


_tiles = tiles


def betti_tile_counts(p_tile: np.ndarray, g_tile: np.ndarray) -> np.ndarray:
    """(3, 3) int array of one tile's Betti matching: rows m (matched), p (prediction), g (label);
    columns dimensions 0, 1, 2 (``custom_components.betti_matching.betti_counts``)."""
    from custom_components.betti_matching import betti_counts

    if p_tile.size == 0:
        return np.zeros((3, 3), np.int64)
    return np.stack(betti_counts(p_tile, g_tile))


def _tile_job(args):
    return betti_tile_counts(*args)


def topo_score(counts: np.ndarray) -> tuple[float, list]:
    """TopoScore and the per-dimension TopoF1 (None when dropped) from (3, 3) counts summed over tiles.

    TopoF1_k = 2 m_k / (p_k + g_k); 0.5 / (p_k + 0.5) when g_k = 0 < p_k; dropped when p_k = g_k = 0;
    weighted mean with (0.34, 0.33, 0.33) renormalised over the kept dimensions, 1.0 when none is kept.
    """
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


def _result(sd: float, split: float, merge: float, counts: np.ndarray, seconds: dict) -> dict:
    ts, f1 = topo_score(counts)
    v = split + merge
    vs = 1.0 / (1.0 + VOI_ALPHA * v)
    return {
        "score": math.fsum((0.30 * ts, 0.35 * sd, 0.35 * vs)),
        "topo_score": ts,
        "surface_dice": sd,
        "voi_score": vs,
        "voi": v,
        "voi_split": split,
        "voi_merge": merge,
        "topo_f1": f1,
        "betti_matched": [int(x) for x in counts[0]],
        "betti_pred": [int(x) for x in counts[1]],
        "betti_label": [int(x) for x in counts[2]],
        "seconds": seconds,
    }


def _pool_context():
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def leaderboard_score(pred, label, workers: int = 1) -> dict:
    """The competition score of one volume (shared/METRIC.md), fast path; values identical to
    ``leaderboard_score_reference``.

    With ``workers > 1`` the 8 Betti tiles run in a fork ``ProcessPoolExecutor`` (at most ``workers``
    processes) while SurfaceDice and VOI are computed here; SurfaceDice works on the bounding box of
    both masks. Returns the dict described in the module docstring; ``seconds`` holds wall times per
    component (``topo`` spans the overlapping parallel work) and ``total``.
    """
    t0 = time.perf_counter()
    p, g = _prepare(pred, label)
    seconds = {}
    jobs = [(p[s], g[s]) for s in tiles(p.shape)]
    # tiles with both masks empty have no finite pairs: skip them (their counts are 0)
    todo = [i for i, (a, b) in enumerate(jobs) if a.any() or b.any()]
    counts_list = [np.zeros((3, 3), np.int64) for _ in jobs]
    pool = None
    futures = {}
    t_topo = time.perf_counter()
    if int(workers) > 1 and len(todo) > 1:
        pool = ProcessPoolExecutor(max_workers=min(int(workers), len(todo)), mp_context=_pool_context())
        futures = {i: pool.submit(_tile_job, jobs[i]) for i in todo}
    try:
        t = time.perf_counter()
        sd = surface_dice(p, g, crop=True)
        seconds["surface_dice"] = time.perf_counter() - t
        t = time.perf_counter()
        split, merge = voi(p, g)
        seconds["voi"] = time.perf_counter() - t
        if pool is None:
            t_topo = time.perf_counter()
            for i in todo:
                counts_list[i] = _tile_job(jobs[i])
        else:
            for i, f in futures.items():
                counts_list[i] = f.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    seconds["topo"] = time.perf_counter() - t_topo
    counts = np.sum(counts_list, axis=0)
    seconds["total"] = time.perf_counter() - t0
    return _result(sd, split, merge, counts, seconds)


def leaderboard_score_reference(pred, label) -> dict:
    """Straightforward single-process version of shared/METRIC.md (no cropping, every tile computed),
    for benchmarks and equality tests."""
    t0 = time.perf_counter()
    p, g = _prepare(pred, label)
    seconds = {}
    t = time.perf_counter()
    sd = surface_dice(p, g, crop=False)
    seconds["surface_dice"] = time.perf_counter() - t
    t = time.perf_counter()
    split, merge = voi(p, g)
    seconds["voi"] = time.perf_counter() - t
    t = time.perf_counter()
    counts = np.sum([betti_tile_counts(p[s], g[s]) for s in tiles(p.shape)], axis=0)
    seconds["topo"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return _result(sd, split, merge, counts, seconds)


_COMPONENTS = ("score", "topo_score", "surface_dice", "voi_score")


class LeaderboardMetric(CumulativeIterationMetric):
    """MONAI metric: per sample [score, topo_score, surface_dice, voi_score] of (B, 1, ...) pred vs label."""

    def __init__(self, workers: int = 1):
        super().__init__()
        self.workers = int(workers)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        """(B, 4) float32 [score, topo_score, surface_dice, voi_score] of (B, 1, Z, Y, X) binary predictions
        against (B, C, Z, Y, X) labels 0/1/2 (channel 0 is the label, docs/CONVENTIONS.md)."""
        if y is None:
            raise ValueError("LeaderboardMetric needs labels y of shape (B, 1, Z, Y, X), got None.")
        if y_pred.ndim != 5 or y.ndim != 5 or y_pred.shape[0] != y.shape[0] or y_pred.shape[2:] != y.shape[2:] or y_pred.shape[1] != 1:
            raise ValueError(f"y_pred must be (B, 1, Z, Y, X) and y (B, C, Z, Y, X) of the same B, Z, Y, X; got y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)}.")
        rows = []
        for b in range(y_pred.shape[0]):
            pred = np.asarray(torch.as_tensor(y_pred[b, 0]).detach().cpu().float().numpy())
            lab = np.asarray(torch.as_tensor(y[b, 0]).detach().cpu().float().numpy())
            lab = np.rint(np.nan_to_num(lab)).astype(np.uint8)
            r = leaderboard_score(pred, lab, self.workers)
            rows.append([r[k] for k in _COMPONENTS])
        return torch.tensor(rows, dtype=torch.float32, device=y_pred.device)

    def aggregate_components(self) -> dict[str, float]:
        """Means over all buffered samples of score, topo_score, surface_dice, voi_score (NaN when empty)."""
        data = self.get_buffer()
        if data is None or len(data) == 0:
            return {k: float("nan") for k in _COMPONENTS}
        data = torch.as_tensor(data).reshape(-1, len(_COMPONENTS))
        return {k: float(data[:, i].mean()) for i, k in enumerate(_COMPONENTS)}

    def aggregate(self):
        """The mean score over all buffered samples, a 0-d tensor."""
        return torch.tensor(self.aggregate_components()["score"])


class LeaderboardIgniteMetric(IgniteMetricHandler):
    """Ignite handler of ``LeaderboardMetric`` for ``validate#key_metric``; also logs the components.

    The key metric is the mean score; ``val_topo_score``, ``val_surface_dice`` and ``val_voi_score`` go
    into ``engine.state.metrics`` beside it.
    """

    def __init__(self, workers: int = 1, output_transform=lambda x: x, save_details: bool = False):
        super().__init__(metric_fn=LeaderboardMetric(workers=workers), output_transform=output_transform, save_details=save_details)

    def completed(self, engine, name) -> None:
        """Store the mean score under ``name`` and the component means under ``<prefix>_topo_score`` etc.,
        prefix = the part of ``name`` before its first ``_`` (``val_score`` -> ``val_topo_score``)."""
        super().completed(engine, name)
        for k, v in self.metric_fn.aggregate_components().items():
            if k != "score":
                engine.state.metrics[f"{name.split('_')[0]}_{k}" if "_" in name else k] = v
