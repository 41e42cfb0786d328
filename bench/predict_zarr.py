"""Whole-scroll inference (``custom_components.inference.predict_zarr``): cost, memory per worker, projection.

Inputs are tiled synthetic scrolls (``tile_synthetic``: 128^3 volumes written tile by tile). Parts:

1. **memory** (stub network): peak RSS per worker for cubes of ``--edges`` (default 256 and 512) with 1 and
   2 workers, block ``--block``. The stub is a TorchScript 3x3x3 convolution on ``--stub_roi`` windows (its
   ``network.json`` names a one-filter DynUNet of that patch, only so that the network spec resolves): the
   figures are the pipeline's own (reads, blending, post-processing, writes, Dask), which must not grow
   with the volume.
2. **throughput** (``--network small``: DynUNet 4-8-16-32-64 at 64^3, random weights; ``default``: train.json's
   DynUNet 32-...-320 at 128^3; ``stub``): CPU-seconds per million voxels, voxels/s, with 1 and 2 workers,
   on a ``--shape`` volume.
3. **projection**: hours for a 10^12-voxel scroll on 1 and 8 devices of the kind measured, from the median
   seconds per block of the throughput run (every block of a scroll costs the same: same windows, same
   redundancy), labelled as a projection. ``--device cuda --network default`` measures it on a GPU.

Prints a table and, last, one JSON line; ``--out FILE`` also writes the JSON.

    python bench/predict_zarr.py [--edges 256 512] [--block 256] [--network small] [--device cpu] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SCROLL_VOXELS = 1e12


def stub_network(folder: str, roi: int) -> str:
    """A traced 3x3x3 convolution saved as ``.ts`` with the ``network.json`` that inference reads."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
    traced = torch.jit.trace(net, torch.zeros(1, 1, roi, roi, roi))
    spec = {"kind": "dynunet", "patch_size": [roi] * 3, "filters": [1] * 6, "deep_supr_num": 1}
    path = os.path.join(folder, f"stub{roi}.ts")
    torch.jit.save(traced, path, _extra_files={"network.json": json.dumps({"network_spec": spec})})
    return path


def dynunet_checkpoint(folder: str, kind: str) -> str:
    """A randomly initialised DynUNet saved as training saves it (``small`` or ``default``)."""
    from ignite.engine import Engine

    from custom_components.training.checkpoint import AtomicCheckpointSaver
    from custom_components.training.network import build_network

    torch.manual_seed(0)
    settings = {"patch_size": [64] * 3, "filters": [4, 8, 16, 32, 64]} if kind == "small" else {"patch_size": [128] * 3}
    net = build_network("dynunet", **settings)
    out = os.path.join(folder, kind)
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(out, {"network": net}).attach(engine)
    engine.run([0], max_epochs=1)
    return os.path.join(out, "last.pt")


def run(inp, out, ckpt, block, workers, device, threads):
    from custom_components.inference.predict_zarr import predict_zarr

    shutil.rmtree(out, ignore_errors=True)
    s = predict_zarr(inp, out, ckpt, block=block, workers=workers, device=device, threads_per_worker=threads,
                     save_probabilities=True, progress=False, train_voxel_size=0)
    shutil.rmtree(out, ignore_errors=True)
    return s


def row(part, shape, network, s, workers):
    busy = s["seconds"] - s["startup_seconds"]
    return {"part": part, "shape": "x".join(map(str, shape)), "network": network, "workers": workers,
            "blocks": s["blocks_run"], "seconds": round(busy, 2), "voxels_per_s": round(s["voxels_per_s"]),
            "cpu_s_per_mvox": round(s["cpu_s_per_mvox"], 3), "redundancy": s["redundancy"],
            "block_s_median": round(s["block_seconds_median"], 3),
            "peak_rss_mb_per_worker": round(max(w["peak_rss_mb"] for w in s["workers"].values())),
            "peak_gpu_mb_per_worker": round(max(w["peak_gpu_mb"] for w in s["workers"].values()))}


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", type=int, nargs="+", default=[256, 512], help="cube edges of the memory part")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--stub_roi", type=int, default=64)
    p.add_argument("--network", choices=("small", "default", "stub"), default="default" if cuda else "small")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="throughput volume (default 2 blocks along Z)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--parts", default="memory,throughput")
    p.add_argument("--tmp", default=None, help="work folder (default a temporary one, removed after)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    from custom_components.inference.zarr_io import tile_synthetic

    tmp = a.tmp or tempfile.mkdtemp(prefix="bench_predict_zarr_")
    os.makedirs(tmp, exist_ok=True)
    parts = a.parts.split(",")
    rows, t0 = [], time.perf_counter()
    try:
        if "memory" in parts:
            stub = stub_network(tmp, a.stub_roi)
            for edge in a.edges:
                inp = tile_synthetic(os.path.join(tmp, f"in{edge}.zarr"), (edge,) * 3, tile=128, chunks=64, seed=0)
                for w in a.workers:
                    rows.append(row("memory", (edge,) * 3, f"stub {a.stub_roi}^3", run(inp, os.path.join(tmp, "o.zarr"), stub,
                                                                                     a.block, w, a.device, a.threads), w))
                shutil.rmtree(inp)
        if "throughput" in parts:
            ckpt = stub_network(tmp, a.stub_roi) if a.network == "stub" else dynunet_checkpoint(tmp, a.network)
            shape = tuple(a.shape or (2 * a.block, a.block, a.block))
            inp = tile_synthetic(os.path.join(tmp, "through.zarr"), shape, tile=128, chunks=64, seed=1)
            for w in a.workers:
                rows.append(row("throughput", shape, a.network, run(inp, os.path.join(tmp, "o.zarr"), ckpt, a.block, w,
                                                                    a.device, a.threads), w))
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu ({a.threads} torch thread/worker)"
    cols = ["part", "shape", "network", "workers", "blocks", "seconds", "voxels_per_s", "cpu_s_per_mvox", "redundancy",
            "block_s_median", "peak_rss_mb_per_worker", "peak_gpu_mb_per_worker"]
    print(f"predict_zarr, {device}, block {a.block}^3, overlap 0.5, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{str(r[c]):>14}" for c in cols))
    result = {"device": device, "block": a.block, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    through = [r for r in rows if r["part"] == "throughput"]
    if through:
        t_block = min(r["block_s_median"] for r in through)  # one block on one worker
        blocks = math.ceil(SCROLL_VOXELS / a.block ** 3)
        projection = {f"{n} x {device}": round(blocks * t_block / n / 3600, 1) for n in (1, 8)}
        result["projection_hours_1e12_voxels"] = projection
        result["projection_basis"] = (f"PROJECTION, not a measurement: {blocks} blocks of {a.block}^3 x {t_block:.3f} s "
                                      f"(median block, network '{a.network}') / devices")
        print(result["projection_basis"])
        for k, v in projection.items():
            print(f"  projected hours for 10^12 voxels on {k}: {v}")
    line = json.dumps(result)
    print(line)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
