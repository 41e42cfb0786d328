"""Seconds per volume of inference, split into its parts, each as a ratio to the bare network forward passes.

Builds ``network_def``, ``network`` (``ProbabilityEnsemble``: sigmoid, ``--mirror`` flips), ``inferer``
(``RobustSlidingWindowInferer``, Gaussian blending) and ``postprocess_steps`` (``PostProcessd``, the
default steps: threshold 0.5, dust < 64 voxels, fill holes) from ``bundle/configs/inference.json``, with
``--roi`` / ``--overlap`` / ``--filters`` / ``--mirror`` / ``--sw_batch_size`` overrides, and times, per
synthetic volume (``custom_components.data.synthetic.generate_volume``, seed 0, one per ``--sizes`` edge):

- ``network``: the bare forward passes of the network over all windows (``network(batch of windows)``
  and nothing else, timed call by call inside the sliding-window run): the ratio base, ``x network`` = 1.
  A check line below each volume gives the first ``--replay_batches`` batches of windows run again,
  alone, on random windows of the same shape, against the same batches inside the sliding window (on a
  loaded machine the two differ by the load's swings, not by what is computed);
- ``blending/stitching``: sliding-window total minus its network time (padding, window gathering,
  Gaussian weighting, accumulation, normalisation);
- ``sliding window total``: ``inferer(image, network)`` on the (1, 1, Z, Y, X) image scaled to [0, 1];
- ``post-processing``: ``postprocess_steps`` on the probability map;
- ``I/O read image``, ``I/O write mask``: ``custom_components.data.io.read_volume`` of the uint8 image TIFF
  (what ``VolumeReader`` calls) and ``write_volume`` of the uint8 mask (LZW, atomic: what ``TiffWriter``
  calls), in a temporary folder;
- ``pipeline total``: read + sliding window + post-processing + write;
- ``metric``: ``custom_components.metrics.score.leaderboard_score`` of the mask against the synthetic label,
  ``--metric_workers`` processes; skipped above ``--skip_metric_above`` (Betti matching on the synthetic
  scrolls costs about 50 CPU minutes per 320^3 volume, see bench/metric.py), which the table says.

CPU threads: ``--threads`` (default 1, see its help; post-processing, I/O and each metric worker are
single-threaded anyway). Columns: wall seconds per volume, their ratio to the network's, CPU seconds
(user + system of this process and, for the metric, its worker processes) and their ratio to the
network's: on a shared machine the CPU figures move less with the load than the wall ones.

Without ``--ckpt`` the network has random weights: its time is that of a trained one, but its output is
meaningless, so post-processing, writing and the metric run on a stand-in prediction, the synthetic
recto surface blurred (sigma 1 voxel) and scaled by 1.6 plus Gaussian noise (sigma 0.15), clipped to
[0, 1]: the sheets survive the 0.5 threshold and the noise leaves speckle for the dust removal. With
``--ckpt`` (a checkpoint of ``network_def`` or a TorchScript ``.ts``, loaded by
``custom_components.inference.sliding_window.load_networks``) they run on the network's own probability map.

    python bench/inference.py                            # 128^3 and 320^3, roi 128, overlap 0.25, small net
    python bench/inference.py --sizes 320 --overlap 0.5 --filters 32,64,128,256,320,320 --mirror 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

INFER_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs", "inference.json")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn, dev):
    """``(fn(), wall seconds, CPU seconds)``, synchronised on CUDA."""
    sync(dev)
    t, c = time.perf_counter(), cpu_seconds()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t, cpu_seconds() - c


class TimedNetwork:
    """Calls ``network`` and records the batch shape and the (synchronised) wall / CPU seconds of every call."""

    def __init__(self, network, dev):
        self.network, self.dev = network, dev
        self.shapes: list[tuple[int, ...]] = []
        self.calls: list[float] = []
        self.seconds = self.cpu = 0.0

    def __call__(self, x, *args, **kwargs):
        out, dt, dc = timed(lambda: self.network(x, *args, **kwargs), self.dev)
        self.shapes.append(tuple(x.shape))
        self.calls.append(dt)
        self.seconds += dt
        self.cpu += dc
        return out


def stand_in_probability(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """clip(1.6 * gaussian_filter(label == 1, sigma 1) + N(0, 0.15^2), 0, 1), float32 (Z, Y, X)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    p = 1.6 * ndimage.gaussian_filter((label == 1).astype(np.float32), 1.0)
    p += rng.normal(0.0, 0.15, size=p.shape).astype(np.float32)
    return np.clip(p, 0.0, 1.0)


def build(a, dev):
    """``network_def``, ``network``, ``inferer``, ``postprocess_steps`` of inference.json with the overrides."""
    from custom_components.inference.sliding_window import load_networks

    parser = ConfigParser()
    parser.read_config(INFER_JSON)
    over = {"patch_size": [a.roi] * 3, "overlap": a.overlap, "tta_flips": a.mirror, "device": str(dev)}
    if a.filters:
        over["filters"] = [int(f) for f in a.filters.split(",")]
    if a.sw_batch_size:
        over["sw_batch_size"] = a.sw_batch_size
    for k, v in over.items():
        parser[k] = v
    net_def = parser.get_parsed_content("network_def")
    if a.ckpt:
        networks = load_networks(net_def, a.ckpt, dev)
    else:
        torch.manual_seed(0)
        networks = [net_def.to(dev).eval()]
    parser["networks"] = "$@_bench_networks"
    parser["_bench_networks"] = networks  # the config's own "network" wiring around our networks
    network = parser.get_parsed_content("network")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocess_steps")
    return parser, net_def, network, inferer, post


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 320], help="volume edges (cubes)")
    p.add_argument("--roi", type=int, default=128, help="sliding-window edge = network patch_size (inference.json: 128)")
    p.add_argument("--overlap", type=float, default=0.25, help="inference.json: 0.5")
    p.add_argument("--filters", default=None if cuda else "4,8,16,32,64,64",
                   help="comma list; default: inference.json's (GPU) or 4,8,16,32,64,64 (CPU)")
    p.add_argument("--mirror", type=int, default=1, help="tta_flips, 1..8 (1: no mirroring)")
    p.add_argument("--sw_batch_size", type=int, default=None, help="default: inference.json's (4)")
    p.add_argument("--ckpt", default=None, help="a checkpoint of network_def (.pt) or TorchScript (.ts); default random weights")
    p.add_argument("--device", default="cuda:0" if cuda else "cpu")
    p.add_argument("--skip_metric_above", type=int, default=128, help="no metric for volumes with an edge above this")
    p.add_argument("--metric_workers", type=int, default=2)
    p.add_argument("--replay_batches", type=int, default=2, help="batches of windows run again alone, as a check")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine a second OpenMP thread waits at every "
                        "barrier for a free core, which times the scheduler, not the work; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from custom_components.data.io import read_volume, write_volume
    from custom_components.metrics.score import leaderboard_score
    from custom_components.data.synthetic import generate_volume

    parser, net_def, network, inferer, post = build(a, dev)
    amp = bool(parser["amp"]) and dev.type == "cuda"  # as the evaluator: bf16 autocast on CUDA only
    filters = [int(f) for f in parser["filters"]][: len(net_def.filters)]
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"roi {a.roi}^3, overlap {a.overlap}, sw_batch_size {inferer.sw_batch_size}, mirror flips {a.mirror}, "
          f"filters {filters} ({sum(q.numel() for q in net_def.parameters()) / 1e6:.2f} M parameters), "
          f"{'weights ' + a.ckpt if a.ckpt else 'random weights, stand-in prediction'}, amp {'bf16' if amp else 'off'}")
    head = f"{'volume':<8} {'part':<24} {'s/volume':>9} {'x network':>10} {'cpu_s':>8} {'cpu x net':>9}"
    print(head)
    print("-" * len(head))
    summary = {}
    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    try:
        # warm-up (first-call allocations, kernel selection) at batch 1 and the full window batch: not counted
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for b in sorted({1, inferer.sw_batch_size}):
                network(torch.rand(b, 1, a.roi, a.roi, a.roi, device=dev))
        for n in a.sizes:
            t = time.perf_counter()
            image, label, _ = generate_volume((n, n, n), seed=a.seed)
            t_gen = time.perf_counter() - t
            img_path = write_volume(os.path.join(tmp, f"image_{n}.tif"), image)
            rows = {}
            vol, *rows["read"] = timed(lambda: read_volume(img_path), dev)
            x = torch.from_numpy(vol.astype(np.float32) / 255.0)[None, None].to(dev)  # ScaleIntensityRanged 0..255 -> 0..1

            counting = TimedNetwork(network, dev)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                prob, *rows["sw"] = timed(lambda: inferer(x, counting), dev)
            rows["net"] = [counting.seconds, counting.cpu]
            rows["stitch"] = [rows["sw"][0] - counting.seconds, rows["sw"][1] - counting.cpu]
            # the first batches of windows again, alone, random content: a check of the in-window timing
            k = max(0, min(a.replay_batches, len(counting.shapes)))
            t_replay = 0.0
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                for shape in counting.shapes[:k]:
                    w = torch.rand(shape, device=dev)
                    t_replay += timed(lambda: network(w), dev)[1]
            t_replayed_in_sw = sum(counting.calls[:k])
            n_windows = sum(s[0] for s in counting.shapes)

            pred = prob[0].float().cpu() if a.ckpt else torch.from_numpy(stand_in_probability(label, a.seed))[None]
            out, *rows["post"] = timed(lambda: post({"pred": pred}), dev)
            mask = np.asarray(out["pred"])[0].astype(np.uint8)
            _, *rows["write"] = timed(lambda: write_volume(os.path.join(tmp, f"pred_{n}.tif"), mask), dev)
            rows["total"] = [sum(rows[k][i] for k in ("read", "sw", "post", "write")) for i in (0, 1)]
            score = None
            if n <= a.skip_metric_above:
                res, *rows["metric"] = timed(lambda: leaderboard_score(mask, label, workers=a.metric_workers), dev)
                score = float(res["score"])
            base, base_cpu = rows["net"]
            name = f"{n}^3"
            labels = [("net", f"network ({n_windows} windows)"),
                      ("stitch", "blending/stitching"), ("sw", "sliding window total"), ("post", "post-processing"),
                      ("read", "I/O read image"), ("write", "I/O write mask"), ("total", "pipeline total")]
            for key, part in labels:
                wall, cpu = rows[key]
                print(f"{name:<8} {part:<24} {wall:9.2f} {wall / base:10.3f} {cpu:8.2f} {cpu / base_cpu:9.3f}")
            if "metric" in rows:
                wall, cpu = rows["metric"]
                print(f"{name:<8} {'metric':<24} {wall:9.2f} {wall / base:10.3f} {cpu:8.2f} {cpu / base_cpu:9.3f}  "
                      f"(leaderboard_score {score:.4f}, {a.metric_workers} workers)")
            else:
                print(f"{name:<8} {'metric':<24} {'skipped':>9} {'':>10} {'':>8} {'':>9}  (edge > --skip_metric_above {a.skip_metric_above})")
            if k:
                print(f"{name:<8} check: {k} of {len(counting.shapes)} window batches took {t_replay:.2f} s alone, "
                      f"{t_replayed_in_sw:.2f} s in the sliding window (ratio {t_replay / t_replayed_in_sw:.2f})")
            print(f"{name:<8} volume generated in {t_gen:.1f} s (not counted); load average {os.getloadavg()[0]:.1f}")
            summary[name] = {"windows": n_windows, **{f"{key}_s": v[0] for key, v in rows.items()},
                             **{f"{key}_over_network": v[0] / base for key, v in rows.items() if key != "net"},
                             "score": score, "replay_over_in_window": t_replay / t_replayed_in_sw if k else None}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
