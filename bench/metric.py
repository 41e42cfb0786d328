"""Benchmark of the competition metric: reference (one process, whole-volume ``surface-distance``, tiles one
after the other) vs the fast path (``leaderboard_score(workers=2)``), per component, with an identical-values check.

Volume pairs (label uint8 0/1/2, prediction = the label's surface perturbed: shifted by one voxel along the
sheet normal, dust voxels added, single-voxel holes punched):

- ``synthetic``: ``custom_components.data.synthetic.generate_volume`` (scroll-like: wound, undulating sheets with
  holes, bridges, a 6-connected 2-4 voxel recto layer, label 2 on the border and unannotated blobs),
  default 128^3; at 320^3 it scores in about 1.3x the clean sheets' time (docs/PERFORMANCE.md; the
  earlier 1-voxel diagonal layer took ~50 CPU minutes there). ``perturb`` clears single voxels, which
  inside a layer this thick become small cavities (H2 pairs): fine for timing, not a realistic prediction.
- ``sheets``: undulating 2-voxel sheets (6-connected), label 2 on a 3-voxel border and an unlabeled slab,
  default 128^3 and 320^3: the Betti matching then costs about 14 s of one core per 160^3 tile.

The table gives wall seconds per component side by side (for the fast path ``topo`` is the wall time of the
tile processes, which overlaps SurfaceDice and VOI running in the calling process) and CPU seconds (for
``topo`` the sum over the tiles, for ``total`` this process and its children), ``N-core est.`` the reference's CPU seconds (one process: its wall time
on an idle core) against the fast path's wall time projected from its CPU seconds onto N idle cores
(``projected_fast``), and whether every value key is identical. The host load average is printed: on a
shared machine the measured wall times depend on it. The last line is ``speedup: N`` = measured reference
total / fast total (wall) on the last volume (the 320^3 sheets by default), the line before it the projection.

    .venv/bin/python bench/metric.py [--sheet_sizes 128 320] [--synthetic_sizes 128] [--workers 2] [--quick]

``--fast_only 1 8`` skips the reference and times the fast path with each number of worker processes (the
GPU check's form: where the machine has the cores); its last line is ``workers_speedup: N`` (fewest over most workers).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.metrics.score import leaderboard_score, leaderboard_score_reference, values_of  # noqa: E402


def perturb(label: np.ndarray, axis: int, rng: np.random.Generator) -> np.ndarray:
    """Prediction from a label: its surface (label 1) shifted by one voxel along ``axis``, 1 voxel in 50,000
    set (dust), 1 surface voxel in 1,000 cleared (holes); uint8 0/1."""
    pred = np.roll(label == 1, 1, axis=axis)
    pred |= rng.random(pred.shape) > 0.99998
    pred &= ~(rng.random(pred.shape) > 0.999)
    return pred.astype(np.uint8)


def sheet_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, label) of shape (n, n, n): 5 undulating 2-voxel sheets across z, label 2 on a 3-voxel border
    and on the background of an unlabeled slab; pred = ``perturb(label, axis 0)``."""
    rng = np.random.default_rng(seed)
    zz = np.arange(n, dtype=np.float32)[:, None, None]
    yy = np.arange(n, dtype=np.float32)[None, :, None]
    xx = np.arange(n, dtype=np.float32)[None, None, :]
    label = np.zeros((n, n, n), np.uint8)
    for z0 in np.linspace(n / 8, n - n / 8, 5):
        a, f1, f2 = rng.uniform(2, 6), rng.uniform(0.02, 0.06), rng.uniform(0.02, 0.06)
        surf = z0 + a * np.sin(f1 * xx + rng.uniform(0, 6)) * np.cos(f2 * yy + rng.uniform(0, 6))
        label[(zz >= surf - 1.0) & (zz < surf + 1.0)] = 1
    b = 3
    label[:b], label[-b:], label[:, :b], label[:, -b:], label[:, :, :b], label[:, :, -b:] = 2, 2, 2, 2, 2, 2
    slab = label[:, : n // 4, : n // 3]
    slab[slab == 0] = 2
    return perturb(label, 0, rng), label


def synthetic_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, label) from ``custom_components.data.synthetic.generate_volume((n, n, n), seed)``; the shift is
    along the volume axis closest to the sheet normal."""
    from custom_components.data.synthetic import generate_volume

    _, label, info = generate_volume((n, n, n), seed)
    return perturb(label, int(info.get("normal_axis", 0)), np.random.default_rng(seed + 1)), label


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _run(fn, *args, **kw):
    c, t = _cpu(), time.perf_counter()
    r = fn(*args, **kw)
    return r, time.perf_counter() - t, _cpu() - c


def projected_fast(seconds: dict, workers: int) -> float:
    """Wall seconds the fast path would take on ``workers`` otherwise idle cores, from its CPU seconds:
    the longest of the calling process's own work, the tiles scheduled longest first on ``workers``
    processes, and all the work spread evenly over the cores."""
    cpu = seconds["cpu"]
    lanes = [0.0] * max(1, workers)
    for t in sorted(cpu["topo_tiles"], reverse=True):
        lanes[lanes.index(min(lanes))] += t
    return max(cpu["main"], max(lanes), (cpu["main"] + sum(cpu["topo_tiles"])) / max(1, workers))


def fast_only(cases, workers: list[int]) -> int:
    """Wall and CPU seconds of the fast path per volume and number of workers; identical values across them."""
    print(f"metric, fast path only; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'volume':<16} {'workers':>7} {'wall_s':>8} {'cpu_s':>8} {'topo_s':>8} {'score':>9}")
    ok, wall = True, {}
    for kind, n, make in cases:
        pred, label = make(n)
        values = None
        for w in workers:
            r, wall[w], c = _run(leaderboard_score, pred, label, workers=w)
            print(f"{f'{kind} {n}^3':<16} {w:7d} {wall[w]:8.2f} {c:8.2f} {r['seconds']['topo']:8.2f} {r['score']:9.6f}")
            ok &= values is None or values_of(r) == values
            values = values_of(r)
    print(f"identical values across worker counts: {ok}")
    print(f"workers_speedup: {wall[min(workers)] / wall[max(workers)]:.2f} ({min(workers)} over {max(workers)} workers, last volume)")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sheet_sizes", type=int, nargs="*", default=[128, 320])
    ap.add_argument("--synthetic_sizes", type=int, nargs="*", default=[128])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="96^3 synthetic and 128^3 sheets only")
    ap.add_argument("--fast_only", type=int, nargs="*", default=None, metavar="WORKERS",
                    help="no reference: the fast path with each of these numbers of worker processes")
    args = ap.parse_args(argv)
    if args.quick:
        args.synthetic_sizes, args.sheet_sizes = [96], [128]
    cases = [("synthetic", n, synthetic_pair) for n in args.synthetic_sizes] + [("sheets", n, sheet_pair) for n in args.sheet_sizes]
    if args.fast_only:
        return fast_only(cases, args.fast_only)
    w = args.workers
    print(f"metric benchmark: reference (1 process) vs fast (workers={w}); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    head = (f"{'volume':<16} {'component':<13} {'reference_s':>11} {f'fast_w{w}_s':>10} {'ratio':>7}"
            f" {'ref_cpu_s':>9} {'fast_cpu_s':>10}")
    print(head)
    print("-" * len(head))
    speedup, projected, ok = float("nan"), float("nan"), True
    for kind, n, make in cases:
        t = time.perf_counter()
        pred, label = make(n)
        t_gen = time.perf_counter() - t
        name = f"{kind} {n}^3"
        ref, t_ref, c_ref = _run(leaderboard_score_reference, pred, label)
        fast, t_fast, c_fast = _run(leaderboard_score, pred, label, workers=w)
        rs, fs = ref["seconds"], fast["seconds"]
        for comp in ("surface_dice", "voi", "topo"):
            cr = sum(rs["cpu"]["topo_tiles"]) if comp == "topo" else rs["cpu"][comp]
            cf = sum(fs["cpu"]["topo_tiles"]) if comp == "topo" else fs["cpu"][comp]
            print(f"{name:<16} {comp:<13} {rs[comp]:11.2f} {fs[comp]:10.2f} {rs[comp] / max(fs[comp], 1e-9):7.2f}"
                  f" {cr:9.2f} {cf:10.2f}")
        print(f"{name:<16} {'total':<13} {t_ref:11.2f} {t_fast:10.2f} {t_ref / t_fast:7.2f} {c_ref:9.2f} {c_fast:10.2f}")
        est = projected_fast(fs, w)
        print(f"{name:<16} {f'{w}-core est.':<13} {c_ref:11.2f} {est:10.2f} {c_ref / est:7.2f}")
        projected = c_ref / est
        same = values_of(ref) == values_of(fast)
        ok &= same
        tiles = ", ".join(f"{s:.1f}" for s in rs["topo_tiles"])
        print(f"{name:<16} identical values: {same}; score {fast['score']:.6f} (topo {fast['topo_score']:.4f}, "
              f"sdice {fast['surface_dice']:.4f}, voi_score {fast['voi_score']:.4f}); betti m/p/g "
              f"{fast['betti_matched']}/{fast['betti_pred']}/{fast['betti_label']}; reference tile s [{tiles}]; "
              f"generated in {t_gen:.1f} s")
        speedup = t_ref / t_fast
    print(f"load average {os.getloadavg()[0]:.1f} at the end; identical values on every volume: {ok}")
    print(f"projected speedup on {w} idle cores (from CPU seconds, last volume): {projected:.2f}")
    print(f"speedup: {speedup:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
