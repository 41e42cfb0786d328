"""Benchmark of the competition metric: reference (sequential, full volume) vs fast path (workers=2).

Builds sheet-like labels (several undulating 2-voxel sheets, label 2 on a 3-voxel border) of 128^3 and
320^3 and a perturbed prediction (shifted by one voxel, dust, holes), times both paths per component,
checks the values are identical and prints a table; the last line is ``speedup: N`` (reference total /
fast total on the largest volume).

    .venv/bin/python bench/metric.py [--sizes 128 320] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.metrics import leaderboard_score, leaderboard_score_reference  # noqa: E402


def make_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred uint8, label uint8) of shape (n, n, n): sheets every ~n/6 voxels in z, undulating in y, x."""
    rng = np.random.default_rng(seed)
    zz = np.arange(n, dtype=np.float32)[:, None, None]
    yy = np.arange(n, dtype=np.float32)[None, :, None]
    xx = np.arange(n, dtype=np.float32)[None, None, :]
    label = np.zeros((n, n, n), np.uint8)
    for z0 in np.linspace(n / 8, n - n / 8, 5):
        a, f1, f2 = rng.uniform(2, 6), rng.uniform(0.02, 0.06), rng.uniform(0.02, 0.06)
        surf = z0 + a * np.sin(f1 * xx + rng.uniform(0, 6)) * np.cos(f2 * yy + rng.uniform(0, 6))
        label[(zz >= surf - 1.0) & (zz < surf + 1.0)] = 1  # ~2 voxels thick
    b = 3
    label[:b], label[-b:], label[:, :b], label[:, -b:], label[:, :, :b], label[:, :, -b:] = 2, 2, 2, 2, 2, 2
    # an unlabeled slab in the middle, as the real labels leave large regions unlabeled
    label[:, : n // 4, : n // 3][label[:, : n // 4, : n // 3] == 0] = 2
    pred = np.roll(label == 1, 1, axis=0)
    pred |= rng.random(pred.shape) > 0.99998  # dust
    holes = rng.random(pred.shape) > 0.9995
    pred &= ~holes
    return pred.astype(np.uint8), label


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 320])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    header = f"{'size':>5} {'path':>10} {'sdice_s':>8} {'voi_s':>8} {'topo_s':>8} {'total_s':>8} {'score':>8} {'topo':>7} {'sdice':>7} {'voi_sc':>7}"
    print(header)
    print("-" * len(header))
    speedup = float("nan")
    ok = True
    for n in args.sizes:
        pred, label = make_pair(n)
        t = time.perf_counter()
        ref = leaderboard_score_reference(pred, label)
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        fast = leaderboard_score(pred, label, workers=args.workers)
        t_fast = time.perf_counter() - t
        for name, r, tt in (("reference", ref, t_ref), (f"fast(w={args.workers})", fast, t_fast)):
            s = r["seconds"]
            print(f"{n:>5} {name:>10} {s['surface_dice']:8.2f} {s['voi']:8.2f} {s['topo']:8.2f} {tt:8.2f} "
                  f"{r['score']:8.5f} {r['topo_score']:7.4f} {r['surface_dice']:7.4f} {r['voi_score']:7.4f}")
        same = {k: v for k, v in ref.items() if k != "seconds"} == {k: v for k, v in fast.items() if k != "seconds"}
        ok &= same
        print(f"{n:>5} identical values: {same}; betti m/p/g {fast['betti_matched']}/{fast['betti_pred']}/{fast['betti_label']}")
        speedup = t_ref / t_fast
    print(f"speedup: {speedup:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
