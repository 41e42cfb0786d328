"""Seconds per post-processing step on one thread, every step on, at 320^3 on a synthetic-like probability map.

The volume: ``custom_components.data.synthetic.generate_volume`` (``--seed``, ``--size`` per edge), its
probability map the stand-in of bench/inference.py (``stand_in_probability``: the recto surface blurred
by sigma 1, scaled by 1.6, plus Gaussian noise of sigma 0.15, clipped to [0, 1]: sheets that survive the
0.5 threshold, speckle for the dust removal, pinholes and ragged faces for the rest). The pipeline is
``PostProcess`` with every step of ``custom_components.inference.postprocess`` switched on, each with the
setting the winners reported or its class default (``--median`` iterations, ``--closing`` ball radius,
``--dust`` size):

    smooth (sigma 1) -> binarize (0.5, hysteresis 0.3) -> median -> closing (ball) -> dust (6-connected)
    -> unmerge -> plug_holes -> height_map_fill -> tunnel_repair -> fill_holes

Each step runs on the output of the steps before it (as in the pipeline) and is timed alone (wall and
CPU seconds); the table gives those, the voxels each step added and removed, and the total against the
budget of 60 s of one core for a 320^3 volume with everything on. The last rows time the default
pipeline (threshold 0.5, dust < 64, fill holes) for comparison. One thread: ``OMP_NUM_THREADS`` and its
kin are set to 1 before numpy is imported (``--threads`` changes it; scipy.ndimage, cc3d and the Betti
counts are single-threaded anyway).

    .venv/bin/python bench/postprocess.py                 # 320^3, seed 0, one thread
    .venv/bin/python bench/postprocess.py --size 128      # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _threads(argv) -> str:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


_N = _threads(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = _N

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from custom_components.inference import postprocess as pp  # noqa: E402

BUDGET_S = 60.0


def stand_in(size: int, seed: int) -> tuple[np.ndarray, float]:
    """(probability map, seconds to build it): bench/inference.py's stand-in of the synthetic label."""
    import importlib.util

    from custom_components.data.synthetic import generate_volume

    spec = importlib.util.spec_from_file_location("bench_inference", os.path.join(_ROOT, "bench", "inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t = time.perf_counter()
    _, label, _ = generate_volume((size, size, size), seed=seed)
    return module.stand_in_probability(label, seed=seed), time.perf_counter() - t


def everything_on(median: int, closing: int, dust: int) -> list:
    """The steps of the module docstring's pipeline, in its order."""
    return [
        pp.GaussianSmooth(1.0),
        pp.Binarize(0.5, hysteresis_low=0.3),
        pp.BinaryMedian(median),
        pp.BinaryClosing(closing, structure="ball"),
        pp.RemoveSmallComponents(dust, connectivity=6),
        pp.Unmerge(),
        pp.PlugHoles(),
        pp.HeightMapFill(),
        pp.TunnelRepair(),
        pp.FillHoles(),
    ]


def run_steps(prob: np.ndarray, steps: list) -> list[dict]:
    """Each step on the output of the ones before it: rows of name, wall / CPU seconds, voxels +/-."""
    rows = []
    out = prob
    for step in steps:
        t, c = time.perf_counter(), time.process_time()
        if step.needs_probability:
            res = step.apply_volume(out, prob=prob)
        else:
            res = step.apply_volume(out)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        row = {"step": pp._NAME_OF[type(step)], "settings": _short(step.params()), "wall": wall, "cpu": cpu}
        if not step.produces_probability and not np.issubdtype(out.dtype, np.floating):
            row["added"] = int(np.count_nonzero(res & ~out))
            row["removed"] = int(np.count_nonzero(out & ~res))
        elif not step.produces_probability:
            row["added"], row["removed"] = int(np.count_nonzero(res)), 0
        rows.append(row)
        out = res
    rows.append({"step": "total", "settings": f"{int(np.count_nonzero(out))} voxels out",
                 "wall": sum(r["wall"] for r in rows), "cpu": sum(r["cpu"] for r in rows)})
    return rows


def _short(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "enabled")


def table(rows: list[dict]) -> str:
    cols = ("step", "wall s", "cpu s", "added", "removed", "settings")
    cells = [list(cols)]
    for r in rows:
        cells.append([r["step"], f"{r['wall']:.2f}", f"{r['cpu']:.2f}", str(r.get("added", "")),
                      str(r.get("removed", "")), r["settings"]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=320, help="edge of the cubic volume (default 320)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--median", type=int, default=8, help="BinaryMedian iterations (10th place: 8)")
    ap.add_argument("--closing", type=int, default=3, help="closing ball radius (1st place: 3)")
    ap.add_argument("--dust", type=int, default=5000, help="dust size, 6-connected (9th place: 5,000)")
    ap.add_argument("--threads", default="1", help="OMP/MKL threads, set before numpy loads (default 1)")
    a = ap.parse_args(argv)
    prob, build_s = stand_in(a.size, a.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"volume {a.size}^3 (synthetic seed {a.seed}, stand-in probability built in {build_s:.1f} s), "
          f"threads {os.environ['OMP_NUM_THREADS']}, load average {load:.2f}")
    rows = run_steps(prob, everything_on(a.median, a.closing, a.dust))
    print(table(rows))
    total = rows[-1]["cpu"]
    scale = (320 / a.size) ** 3
    print(f"everything on: {total:.1f} CPU s ({'within' if total * scale <= BUDGET_S else 'OVER'} the {BUDGET_S:.0f} s "
          f"budget at 320^3{'' if a.size == 320 else f', scaled by (320/{a.size})^3 = {scale:.1f}'})")
    default = run_steps(prob, pp.PostProcess().steps)
    print(f"default pipeline (threshold 0.5, dust < 64, fill holes): {default[-1]['wall']:.2f} s wall, "
          f"{default[-1]['cpu']:.2f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
