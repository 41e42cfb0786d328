"""The competition score of the Vesuvius Challenge "Surface Detection" task (docs/METRIC.md).

Ignore handling first: every voxel with label 2 is set to background in both prediction and label, then
both are binarized (!= 0; NaN counts as 0). Then

    score = 0.30 * TopoScore + 0.35 * SurfaceDice@2 + 0.35 * voi_score

- SurfaceDice at tolerance tau = 2, spacing (1, 1, 1) (Nikolov et al. 2021, "Clinically applicable
  segmentation of head and neck anatomy for radiotherapy"; the DeepMind ``surface-distance`` package):
  surfels (2x2x2 neighbourhood codes, weighted by area) of each mask within tau of the other's surface,
  over all surface area. Both masks empty -> 1, exactly one empty -> 0.
- VOI (Meila 2007, "Comparing clusterings - an information based distance") of the 26-connected
  components (``cc3d``) over the voxels of the union of both foregrounds (background inside the union is
  label 0): VOI = H(GT|Pred) + H(Pred|GT) in bits, as ``skimage.metrics.variation_of_information``;
  split = H(Pred|GT), merge = H(GT|Pred); voi_score = 1 / (1 + 0.3 VOI); empty union -> VOI 0.
- TopoScore: Betti matching (Stucki et al. 2024, Betti-Matching-3D, ``custom_components.metrics.betti_matching``)
  of the inverted masks on 2x2x2 tiles (an axis of length n is cut at ceil(n/2)), counts m_k, p_k, g_k
  summed over the tiles; TopoF1_k = 2 m_k / (p_k + g_k), = 0.5 / (p_k + 0.5) when p_k > 0 = g_k, dropped
  when p_k = g_k = 0; TopoScore = mean of the kept TopoF1_k with weights (0.34, 0.33, 0.33) renormalised,
  1.0 when none is kept.

Two implementations with bit-identical values (tests/test_metrics.py compares every key):

- ``leaderboard_score_reference(pred, label)``: the straightforward one, one process; SurfaceDice is the
  ``surface-distance`` package itself on the whole volume, the 8 tiles are matched one after the other.
- ``leaderboard_score(pred, label, workers)``: the fast path. The Betti tiles (nearly all of the time)
  run in ``workers`` processes, largest tile first, while SurfaceDice and VOI run in the calling
  process; tiles where both masks are empty are skipped (no finite pairs). SurfaceDice reproduces
  ``compute_surface_distances`` on the same bounding-box crop (the package itself crops to the bounding
  box of the union, zero-padded by one voxel at the high end) with the same neighbour codes (bit shifts
  instead of ``ndimage.correlate``), exact squared distances from the ``edt`` package (integers, so
  ``sqrt`` gives the float64 values scipy's EDT gives) and a vectorised sort by (distance, area) in
  place of the package's Python ``sorted(zip(...))``; the final sums are the package's own
  ``compute_surface_dice_at_tolerance`` on arrays in the same order, so the float sums are identical.

Both return a dict: score, topo_score, surface_dice, voi_score, voi, voi_split, voi_merge, topo_f1
(3 values, None where dropped), betti_matched / betti_pred / betti_label (3 counts each, summed over
tiles) and ``seconds`` (wall seconds: surface_dice, voi, topo, total; topo_tiles per tile; ``cpu``: CPU
seconds of surface_dice, voi, each tile (topo_tiles) and of the calling process in all (main)).

``LeaderboardMetric`` (MONAI ``CumulativeIterationMetric``, per-sample (B, 1) scores) and
``LeaderboardIgniteMetric`` (ignite handler, usable as ``validate#key_metric``) compute it during
validation.
"""

from __future__ import annotations

import functools
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

__all__ = [
    "TOPO_WEIGHTS",
    "TOLERANCE",
    "VOI_ALPHA",
    "TIMING_KEYS",
    "prepare_masks",
    "surface_dice",
    "surface_dice_reference",
    "surface_distances",
    "neighbour_code",
    "voi",
    "conditional_entropies",
    "tiles",
    "topo_score",
    "combine",
    "leaderboard_score",
    "leaderboard_score_reference",
    "values_of",
    "LeaderboardMetric",
    "LeaderboardIgniteMetric",
]

TOPO_WEIGHTS = (0.34, 0.33, 0.33)
TOLERANCE = 2.0
SPACING = (1.0, 1.0, 1.0)
VOI_ALPHA = 0.3
WEIGHTS = (0.30, 0.35, 0.35)  # TopoScore, SurfaceDice, voi_score
TIMING_KEYS = ("seconds",)  # result keys that are not values (excluded when comparing results)
START_METHOD_ENV = "VESUVIUS_METRIC_START_METHOD"  # fork / spawn / forkserver for the tile processes


# ----------------------------------------------------------------------------------------- inputs


def prepare_masks(pred, label) -> tuple[np.ndarray, np.ndarray]:
    """(pred_mask, label_mask), bool, after the ignore handling of docs/METRIC.md.

    ``pred``: 3D, any dtype, != 0 is foreground (NaN counts as 0). ``label``: 3D of the same shape,
    0 / 1 / 2; voxels with label 2 become background in both masks. ``ValueError`` naming both shapes
    when they differ or are not 3D.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.ndim != 3 or label.ndim != 3 or pred.shape != label.shape:
        raise ValueError(
            f"pred and label must be 3D arrays of one shape, got pred shape {pred.shape} and label shape {label.shape}."
        )
    keep = label != 2
    p = pred != 0
    if np.issubdtype(pred.dtype, np.inexact):
        p &= ~np.isnan(pred)
    p &= keep
    g = (label != 0) & keep
    return p, g


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(first, last) index per axis of the nonzero voxels of ``mask`` (inclusive), None when empty."""
    lo, hi = np.zeros(mask.ndim, np.int64), np.zeros(mask.ndim, np.int64)
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if idx.size == 0:
            return None
        lo[axis], hi[axis] = idx[0], idx[-1]
    return lo, hi


# ----------------------------------------------------------------------------------------- SurfaceDice


def surface_dice_reference(p: np.ndarray, g: np.ndarray) -> float:
    """SurfaceDice@2 of bool masks ``p`` (prediction) and ``g`` (label) with the ``surface-distance``
    package on the whole volume (``compute_surface_distances(g, p, (1, 1, 1))`` +
    ``compute_surface_dice_at_tolerance(., 2)``); both empty -> 1, exactly one empty -> 0."""
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    pe, ge = not p.any(), not g.any()
    if pe or ge:
        return 1.0 if (pe and ge) else 0.0
    d = compute_surface_distances(np.ascontiguousarray(g, bool), np.ascontiguousarray(p, bool), SPACING)
    return float(compute_surface_dice_at_tolerance(d, TOLERANCE))


def neighbour_code(crop: np.ndarray) -> np.ndarray:
    """uint8 2x2x2 neighbourhood code of a 0/1 volume, equal to ``surface-distance``'s
    ``ndimage.correlate(crop, ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)``:
    code[i, j, k] = sum over a, b, c in {0, 1} of 2^(7 - 4a - 2b - c) * crop[i+a-1, j+b-1, k+c-1]
    (outside the volume 0), computed with shifted slices instead of a correlation."""
    crop = np.asarray(crop)
    n0, n1, n2 = crop.shape
    padded = np.zeros((n0 + 1, n1 + 1, n2 + 1), np.uint8)
    padded[1:, 1:, 1:] = crop != 0
    code = np.zeros(crop.shape, np.uint8)
    tmp = np.empty(crop.shape, np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                np.left_shift(padded[a : a + n0, b : b + n1, c : c + n2], 7 - 4 * a - 2 * b - c, out=tmp)
                code |= tmp
    return code


@functools.lru_cache(maxsize=1)
def _area_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area per code, sorted distinct areas, rank of each code's area among them) for spacing (1, 1, 1)."""
    from surface_distance import lookup_tables

    table = np.asarray(lookup_tables.create_table_neighbour_code_to_surface_area(SPACING), np.float64)
    distinct = np.unique(table)
    return table, distinct, np.searchsorted(distinct, table).astype(np.int64)


def _sorted_distances(code_from: np.ndarray, border_from: np.ndarray, border_to: np.ndarray, threads: int):
    """(distances, areas) of the surfels of one mask to the other's surface, sorted by (distance, area)
    as ``surface-distance``'s ``_sort_distances_surfels`` leaves them (column views of one (N, 2) array)."""
    import edt

    table, distinct, rank = _area_table()
    # exact squared distances to the nearest surfel voxel of the other mask; edt computes them in float32,
    # exact for integers < 2^24, rint only guards the type
    d2 = edt.edtsq(~border_to, anisotropy=SPACING, black_border=False, parallel=max(1, int(threads)))
    d2 = np.rint(d2[border_from]).astype(np.int64)
    key = d2 * distinct.size + rank[code_from[border_from]]
    key.sort()
    out = np.empty((key.size, 2), np.float64)
    out[:, 0] = np.sqrt((key // distinct.size).astype(np.float64))  # = scipy's sqrt(dz^2 + dy^2 + dx^2)
    out[:, 1] = distinct[key % distinct.size]
    return out[:, 0], out[:, 1]


def surface_distances(mask_gt: np.ndarray, mask_pred: np.ndarray, threads: int = 1) -> dict:
    """``surface_distance.compute_surface_distances(mask_gt, mask_pred, (1, 1, 1))``, the same dict with
    the same arrays in the same order, computed faster (module docstring). Masks bool, 3D, one shape,
    both non-empty (``ValueError`` otherwise: the package's own answer there is empty / inf arrays)."""
    if mask_gt.shape != mask_pred.shape or mask_gt.ndim != 3:
        raise ValueError(f"masks must be 3D of one shape, got gt shape {mask_gt.shape} and pred shape {mask_pred.shape}.")
    if not mask_gt.any() or not mask_pred.any():
        raise ValueError("surface_distances needs two non-empty masks (SurfaceDice handles empty masks itself).")
    lo, hi = _bbox(mask_gt | mask_pred)
    sl = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    codes, borders = [], []
    for mask in (mask_gt, mask_pred):
        crop = np.zeros(tuple(int(v) for v in hi - lo + 2), np.uint8)  # the package's crop: +1 at the high end
        crop[:-1, :-1, :-1] = mask[sl]
        code = neighbour_code(crop)
        codes.append(code)
        borders.append((code != 0) & (code != 255))
    d_gt, a_gt = _sorted_distances(codes[0], borders[0], borders[1], threads)
    d_pred, a_pred = _sorted_distances(codes[1], borders[1], borders[0], threads)
    return {"distances_gt_to_pred": d_gt, "distances_pred_to_gt": d_pred, "surfel_areas_gt": a_gt, "surfel_areas_pred": a_pred}


def surface_dice(p: np.ndarray, g: np.ndarray, threads: int = 1) -> float:
    """SurfaceDice@2 of bool masks ``p`` (prediction) and ``g`` (label), fast; bit-identical to
    ``surface_dice_reference``. Both empty -> 1, exactly one empty -> 0. ``threads`` for the EDT."""
    from surface_distance import compute_surface_dice_at_tolerance

    pe, ge = not p.any(), not g.any()
    if pe or ge:
        return 1.0 if (pe and ge) else 0.0
    return float(compute_surface_dice_at_tolerance(surface_distances(g, p, threads), TOLERANCE))


# ----------------------------------------------------------------------------------------- VOI


def conditional_entropies(gt_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float]:
    """(H(Pred | GT), H(GT | Pred)) in bits of two non-negative integer labelings of the same voxels:
    H(A | B) = -sum_ab n_ab / N * log2(n_ab / n_b) over the contingency table n_ab (exactly 0 when A is
    a function of B). Their sum is the variation of information (Meila 2007)."""
    lg = np.asarray(gt_labels).reshape(-1).astype(np.int64)
    lp = np.asarray(pred_labels).reshape(-1).astype(np.int64)
    if lg.size != lp.size:
        raise ValueError(f"labelings of different sizes: gt {lg.size} and pred {lp.size}.")
    if lg.size == 0:
        return 0.0, 0.0
    n_g, n_p = np.bincount(lg), np.bincount(lp)
    base = n_p.size
    joint = lg * base + lp
    if n_g.size * base <= 4 * joint.size + 1024:  # small table: counting, else sorting (same result)
        counts = np.bincount(joint)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(joint, return_counts=True)
    c = counts.astype(np.float64)
    q = c / float(lg.size)
    split = -float(np.sum(q * np.log2(c / n_g[keys // base])))  # H(Pred | GT)
    merge = -float(np.sum(q * np.log2(c / n_p[keys % base])))  # H(GT | Pred)
    return split + 0.0, merge + 0.0


def voi(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(split, merge) = (H(Pred|GT), H(GT|Pred)) in bits of the 26-connected components (``cc3d``) of
    bool masks ``p``, ``g`` over the voxels of their union (background in the union = label 0).
    Empty union -> (0, 0). VOI = split + merge."""
    import cc3d

    union = p | g
    if not union.any():
        return 0.0, 0.0
    lg = cc3d.connected_components(np.ascontiguousarray(g, np.uint8), connectivity=26)[union]
    lp = cc3d.connected_components(np.ascontiguousarray(p, np.uint8), connectivity=26)[union]
    return conditional_entropies(lg, lp)


# ----------------------------------------------------------------------------------------- TopoScore


def tiles(shape) -> list[tuple[slice, ...]]:
    """The 2x2x2 tiles of a 3D ``shape`` (z-major order): each axis of length n is cut into
    [0, ceil(n/2)) and [ceil(n/2), n)."""
    halves = [((0, (n + 1) // 2), ((n + 1) // 2, n)) for n in shape]
    return [tuple(slice(a, b) for a, b in (hz, hy, hx)) for hz in halves[0] for hy in halves[1] for hx in halves[2]]


def topo_score(counts) -> tuple[float, list]:
    """(TopoScore, [TopoF1_0, TopoF1_1, TopoF1_2] with None where dropped) from (3, 3) counts: rows
    m (matched), p (prediction), g (label); columns dimensions 0, 1, 2, summed over tiles.

    TopoF1_k = 2 m_k / (p_k + g_k); 0.5 / (p_k + 0.5) when p_k > 0 = g_k; dropped when p_k = g_k = 0;
    weighted mean with (0.34, 0.33, 0.33) renormalised over the kept dimensions, 1.0 when none is kept.
    """
    counts = np.asarray(counts)
    f1, num, den = [], 0.0, 0.0
    for k in range(3):
        m, p, g = (int(v) for v in counts[:, k])
        if p == 0 and g == 0:
            f1.append(None)
            continue
        f = 0.5 / (p + 0.5) if g == 0 else 2.0 * m / (p + g)
        f1.append(f)
        num += TOPO_WEIGHTS[k] * f
        den += TOPO_WEIGHTS[k]
    return (num / den if den > 0 else 1.0), f1


def _tile_counts_serial(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """Summed (3, 3) counts of the 8 tiles, one after the other; wall and CPU seconds per tile."""
    from custom_components.metrics.betti_matching import tile_counts

    out, walls, cpus = [], [], []
    for s in tiles(p.shape):
        c, t, u = tile_counts(p[s], g[s], reference=True)
        out.append(c)
        walls.append(t)
        cpus.append(u)
    return np.sum(out, axis=0), walls, cpus


def _mp_context():
    """Start method of the tile processes: $VESUVIUS_METRIC_START_METHOD, else fork where the platform
    has it (no re-import; the job function lives in the numpy-only ``custom_components.metrics.betti_matching``,
    so spawn / forkserver work as well), else the platform default."""
    import multiprocessing as mp

    method = os.environ.get(START_METHOD_ENV) or ("fork" if "fork" in mp.get_all_start_methods() else None)
    if method is not None and method not in mp.get_all_start_methods():
        raise ValueError(f"{START_METHOD_ENV}={method!r} is not a start method of this platform: {mp.get_all_start_methods()}.")
    return mp.get_context(method)


def _in_daemon() -> bool:
    """True inside a daemonic process (a DataLoader / multiprocessing.Pool worker), which may not start
    processes: the tiles then run one after the other."""
    import multiprocessing as mp

    return bool(mp.current_process().daemon)


# ----------------------------------------------------------------------------------------- score


def combine(sd: float, split: float, merge: float, counts, seconds: dict) -> dict:
    """The result dict (module docstring) from SurfaceDice, VOI split / merge and (3, 3) Betti counts."""
    counts = np.asarray(counts)
    ts, f1 = topo_score(counts)
    v = split + merge
    vs = 1.0 / (1.0 + VOI_ALPHA * v)
    return {
        "score": math.fsum((WEIGHTS[0] * ts, WEIGHTS[1] * sd, WEIGHTS[2] * vs)),
        "topo_score": float(ts),
        "surface_dice": float(sd),
        "voi_score": float(vs),
        "voi": float(v),
        "voi_split": float(split),
        "voi_merge": float(merge),
        "topo_f1": f1,
        "betti_matched": [int(x) for x in counts[0]],
        "betti_pred": [int(x) for x in counts[1]],
        "betti_label": [int(x) for x in counts[2]],
        "seconds": seconds,
    }


def leaderboard_score_reference(pred, label) -> dict:
    """The competition score of one volume, straightforward: one process, ``surface-distance`` on the
    whole volume, the 8 Betti tiles one after the other. For benchmarks and equality tests."""
    t0, c0 = time.perf_counter(), time.process_time()
    p, g = prepare_masks(pred, label)
    seconds: dict = {}
    cpu: dict = {}
    t, c = time.perf_counter(), time.process_time()
    sd = surface_dice_reference(p, g)
    seconds["surface_dice"], cpu["surface_dice"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    split, merge = voi(p, g)
    seconds["voi"], cpu["voi"] = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    counts, seconds["topo_tiles"], cpu["topo_tiles"] = _tile_counts_serial(p, g)
    seconds["topo"] = time.perf_counter() - t
    seconds["total"], cpu["main"] = time.perf_counter() - t0, time.process_time() - c0
    seconds["cpu"] = cpu
    return combine(sd, split, merge, counts, seconds)


def leaderboard_score(pred, label, workers: int = 1) -> dict:
    """The competition score of one volume (docs/METRIC.md), fast path, values bit-identical to
    ``leaderboard_score_reference`` (module docstring for how).

    ``workers > 1``: the non-empty Betti tiles run in a ``ProcessPoolExecutor`` of at most ``workers``
    processes (largest first) while SurfaceDice and VOI are computed here (inside a daemonic process,
    which may not start processes, the tiles run here one after the other). ``seconds["topo"]`` is the
    wall time from submitting the tiles to the last result (it overlaps the other two).
    """
    from custom_components.metrics.betti_matching import tile_counts

    workers = max(1, int(workers))
    context = _mp_context() if workers > 1 else None  # a bad start method fails here, whatever the tiles
    t0, c0 = time.perf_counter(), time.process_time()
    p, g = prepare_masks(pred, label)
    seconds: dict = {}
    cpu: dict = {}
    slices = tiles(p.shape)
    # tiles where both masks are empty: all cubes at 1, no finite pair -> counts 0, skipped
    load = [int(np.count_nonzero(p[s])) + int(np.count_nonzero(g[s])) for s in slices]
    todo = sorted((i for i, n in enumerate(load) if n > 0), key=lambda i: -load[i])
    counts = [np.zeros((3, 3), np.int64) for _ in slices]
    walls, cpus = [0.0] * len(slices), [0.0] * len(slices)
    pool, futures = None, {}
    t_topo = time.perf_counter()
    if workers > 1 and len(todo) > 1 and not _in_daemon():
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context)
    try:
        if pool is not None:
            futures = {i: pool.submit(tile_counts, p[slices[i]], g[slices[i]]) for i in todo}
        t, c = time.perf_counter(), time.process_time()
        sd = surface_dice(p, g, threads=1 if pool is not None else workers)
        seconds["surface_dice"], cpu["surface_dice"] = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        split, merge = voi(p, g)
        seconds["voi"], cpu["voi"] = time.perf_counter() - t, time.process_time() - c
        if pool is None:
            t_topo = time.perf_counter()
            for i in todo:
                counts[i], walls[i], cpus[i] = tile_counts(p[slices[i]], g[slices[i]])
        else:
            for i, f in futures.items():
                counts[i], walls[i], cpus[i] = f.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    seconds["topo"] = time.perf_counter() - t_topo
    seconds["topo_tiles"], cpu["topo_tiles"] = walls, cpus
    seconds["total"] = time.perf_counter() - t0
    cpu["main"] = time.process_time() - c0  # the calling process (with workers = 1: tiles included)
    seconds["cpu"] = cpu
    return combine(sd, split, merge, np.sum(counts, axis=0), seconds)


def values_of(result: dict) -> dict:
    """``result`` without its timing keys (what must be identical between the two paths)."""
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


# ----------------------------------------------------------------------------------------- MONAI / ignite

COMPONENTS = ("score", "topo_score", "surface_dice", "voi_score", "voi")


def _monai_classes() -> None:
    """Define ``LeaderboardMetric`` and ``LeaderboardIgniteMetric`` (torch / MONAI / ignite imported here,
    on first use, so that the metric itself, the CLI and the tile processes start without them)."""
    if "LeaderboardMetric" in globals():
        return
    import torch
    from monai.handlers.ignite_metric import IgniteMetricHandler
    from monai.metrics import Cumulative, CumulativeIterationMetric

    class LeaderboardMetric(CumulativeIterationMetric):
        """MONAI metric of the competition score: per sample a (B, 1) tensor of ``score``.

        ``y_pred``: (B, 1, Z, Y, X) binary predictions (!= 0 is foreground), or probabilities when
        ``threshold`` is given (foreground = y_pred > threshold). ``y``: (B, C, Z, Y, X) with the label 0 / 1 / 2
        in channel 0 (docs/CONVENTIONS.md). ``workers``: processes for the Betti tiles of each sample.
        ``aggregate()`` is the mean score (0-d tensor); ``aggregate_components()`` the means of score,
        topo_score, surface_dice, voi_score and voi (synchronised across ranks like the scores);
        ``results`` holds this rank's full per-sample result dicts since the last ``reset()``.
        ``weight`` (per call, default 1): a sample of weight 0 is not scored and counts for nothing in
        the means (a rank's padding copy when there are fewer validation volumes than ranks).
        """

        def __init__(self, workers: int = 1, threshold: float | None = None) -> None:
            self._components = Cumulative()  # before super().__init__(), which calls reset()
            self.results: list[dict] = []
            super().__init__()
            self.workers = max(1, int(workers))
            self.threshold = threshold

        def reset(self) -> None:
            super().reset()
            self._components.reset()
            self.results = []

        def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, weight: float = 1.0,
                            **kwargs) -> torch.Tensor:
            """(B, 1) float32 scores of (B, 1, Z, Y, X) predictions against (B, C, Z, Y, X) labels."""
            if y is None:
                raise ValueError("LeaderboardMetric needs labels y of shape (B, C, Z, Y, X), got y=None.")
            if (y_pred.ndim != 5 or y.ndim != 5 or y_pred.shape[1] != 1 or y_pred.shape[0] != y.shape[0]
                    or tuple(y_pred.shape[2:]) != tuple(y.shape[2:])):
                raise ValueError(
                    "LeaderboardMetric: y_pred must be (B, 1, Z, Y, X) and y (B, C, Z, Y, X) with the same B, Z, Y, X; "
                    f"got y_pred shape {tuple(y_pred.shape)} and y shape {tuple(y.shape)}."
                )
            scores, comps = [], []
            if float(weight) == 0:  # padding: no work, a row the means ignore
                self._components.extend(torch.zeros(y_pred.shape[0], len(COMPONENTS) + 1, dtype=torch.float64))
                return torch.full((y_pred.shape[0], 1), float("nan"), device=y_pred.device)
            for b in range(y_pred.shape[0]):
                pred = y_pred[b, 0].detach().float().cpu().numpy()
                if self.threshold is not None:
                    pred = np.nan_to_num(pred, nan=-np.inf) > self.threshold
                lab = np.rint(np.nan_to_num(y[b, 0].detach().float().cpu().numpy())).astype(np.uint8)
                r = leaderboard_score(pred, lab, workers=self.workers)
                self.results.append(r)
                scores.append([r["score"]])
                comps.append([r[k] for k in COMPONENTS] + [float(weight)])
            comps_t = torch.tensor(comps, dtype=torch.float64)
            self._components.extend(comps_t)
            return torch.tensor(scores, dtype=torch.float32, device=y_pred.device)

        def aggregate(self) -> torch.Tensor:
            """Mean score over all buffered samples (all ranks), a 0-d float tensor; NaN when empty."""
            return torch.tensor(self.aggregate_components()["score"])

        def aggregate_components(self) -> dict[str, float]:
            """Means over all buffered samples (all ranks) of score, topo_score, surface_dice, voi_score, voi."""
            data = self._components.get_buffer()
            if data is None or (isinstance(data, torch.Tensor) and data.numel() == 0) or (isinstance(data, list) and not data):
                return {k: float("nan") for k in COMPONENTS}
            data = torch.as_tensor(data).reshape(-1, len(COMPONENTS) + 1)
            weights = data[:, -1]
            if float(weights.sum()) == 0:
                return {k: float("nan") for k in COMPONENTS}
            return {k: float((data[:, i] * weights).sum() / weights.sum()) for i, k in enumerate(COMPONENTS)}

    class LeaderboardIgniteMetric(IgniteMetricHandler):
        """Ignite handler of ``LeaderboardMetric`` (as ``monai.handlers.MeanDice`` wraps ``DiceMetric``), for
        ``validate#key_metric``: ``engine.state.metrics[name]`` = mean score; beside it the component means
        under ``<prefix>_topo_score``, ``<prefix>_surface_dice``, ``<prefix>_voi_score``, ``<prefix>_voi``
        with prefix = ``name`` up to its first ``_`` (``val_score`` -> ``val_topo_score``; no ``_``: bare names).
        A sample whose record has ``weight_key`` 0 (``val_records``' padding copy on a rank left without a
        volume) is not scored and does not count.
        """

        def __init__(self, workers: int = 1, threshold: float | None = None, output_transform=lambda x: x,
                     save_details: bool = True, weight_key: str = "weight") -> None:
            self.weight_key = weight_key
            super().__init__(metric_fn=LeaderboardMetric(workers=workers, threshold=threshold),
                             output_transform=output_transform, save_details=save_details)

        def iteration_completed(self, engine) -> None:
            """Reads the samples' ``weight_key`` (default 1) from the engine's batch, then updates as usual."""
            batch = engine.state.batch
            samples = batch if isinstance(batch, list) else []
            self._weights = [float(d.get(self.weight_key, 1.0)) if isinstance(d, dict) else 1.0 for d in samples]
            if isinstance(batch, dict) and self.weight_key in batch:
                self._weights = [float(w) for w in batch[self.weight_key]]
            super().iteration_completed(engine)

        def update(self, output) -> None:
            """Each sample of ``(y_pred, y)`` with its weight (0: a rank's padding copy, not scored)."""
            y_pred, y = output
            weights = getattr(self, "_weights", None) or [1.0] * len(y_pred)
            if len(weights) != len(y_pred):
                raise ValueError(f"{len(weights)} sample weights for {len(y_pred)} predictions.")
            for p, t, w in zip(y_pred, y, weights):
                self.metric_fn([p], [t], weight=w)

        def completed(self, engine, name) -> None:
            super().completed(engine, name)
            prefix = name.split("_")[0] + "_" if "_" in name else ""
            for k, v in self.metric_fn.aggregate_components().items():
                if k != "score":
                    engine.state.metrics[prefix + k] = v

    for cls in (LeaderboardMetric, LeaderboardIgniteMetric):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as custom_components.metrics.score.<name>
    globals().update(LeaderboardMetric=LeaderboardMetric, LeaderboardIgniteMetric=LeaderboardIgniteMetric)


def __getattr__(name: str):
    """``LeaderboardMetric`` / ``LeaderboardIgniteMetric`` are built on first access (``_monai_classes``)."""
    if name in ("LeaderboardMetric", "LeaderboardIgniteMetric"):
        _monai_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
