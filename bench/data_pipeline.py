"""What the data pipeline costs the host per sample: ours vs the earlier trainer's vs nnU-Net's.

Side by side in one run, from one 320^3 synthetic scroll volume, at 72x136x136 and 128^3:

(a) ours: crop from the memory-mapped cache (host), then train.json's device augmentation
    (``BatchRandAugment``: rotation + scaling + mirroring + elastic in one resample, intensity) -- on
    CUDA where present, and also on the CPU, so the total CPU figure cannot be won by moving work out
    of what is counted; "elastic always" forces the elastic field on every sample (train.json uses
    p = 0.2); "MONAI per sample" is the same augmentation as MONAI transforms (``monai_augment.json``);
(b) seed-style: what the earlier trainer did on the CPU per sample: crop, MONAI ``Rand3DElasticd``,
    ``RandRotated`` and ``RandZoomd`` as separate transforms, plus the label's distance transforms
    (inside and outside, scipy);
(c) nnU-Net ``batchgeneratorsv2`` ``SpatialTransform`` (rotation + scaling + elastic), if installed
    (``pip install -e '.[bench]'``).

Times are process CPU time (``time.process_time``) with one thread, in ms per sample; device ms from
CUDA events. The last line is ``host_cpu_ratio: N`` (seed-style over ours, host CPU per sample, 128^3).

    python bench/data_pipeline.py [--volume 320] [--samples 5] [--sizes 72x136x136 128x128x128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

TRAIN_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs", "train.json")


def cpu_ms(fn, n):
    out = []
    for i in range(n):
        t = time.process_time()
        fn(i)
        out.append((time.process_time() - t) * 1000)
    return float(np.median(out))


def device_ms(fn, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(0)
    torch.cuda.synchronize()
    start.record()
    for i in range(n):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def our_transforms(patch, device, elastic_prob=None, monai=False):
    """train.json's augmentation (``monai``: the MONAI per-sample one of monai_augment.json)."""
    parser = ConfigParser()
    parser.read_config([TRAIN_JSON] + ([os.path.join(os.path.dirname(TRAIN_JSON), "monai_augment.json")] if monai else []))
    parser["patch_size"] = list(patch)
    parser["device"] = str(device)
    if elastic_prob is not None and monai:
        parser["train#device_transforms"][0]["prob"] = elastic_prob
    elif elastic_prob is not None:
        parser["train#augment#elastic_prob"] = elastic_prob
    aug = parser.get_parsed_content("train#augment")
    aug.set_random_state(0)
    return aug, int(parser["aug_margin"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", type=int, default=320)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=["72x136x136", "128x128x128"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from custom_components.data.patch_dataset import PatchDataset
    from custom_components.data.prepare import prepare_cache
    from custom_components.data.synthetic import write_dataset

    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    write_dataset(tmp, volumes=1, test=0, test_labels=False, profile="34117", shape=(a.volume,) * 3, seed=0, preview=False)
    ids = [line.split(",")[0] for line in open(os.path.join(tmp, "train.csv")).read().split()[1:]]
    entries = [{"id": i, "image": f"{tmp}/train_images/{i}.tif", "label": f"{tmp}/train_labels/{i}.tif"} for i in ids]
    t = time.perf_counter()
    prepared = prepare_cache(entries, os.path.join(tmp, "cache"), workers=1, progress=False)
    prepare_s = time.perf_counter() - t
    vol = np.load(os.path.join(prepared[0]["cache"], "image.npy"))
    lab = np.load(os.path.join(prepared[0]["cache"], "label.npy"))
    cuda = torch.cuda.is_available()
    rows = []
    ratio = None
    for size in a.sizes:
        patch = [int(s) for s in size.split("x")]
        ds = PatchDataset(prepared, patch, margin=int(ConfigParser.load_config_file(TRAIN_JSON)["aug_margin"]),
                          samples_per_epoch=a.samples, seed=0)
        batch = lambda i: {k: v[None] for k, v in ds[(0, i)].items() if k in ("image", "label", "sdm", "tube")}  # noqa: E731
        host = cpu_ms(lambda i: ds[(0, i)], a.samples)
        samples = [batch(i) for i in range(a.samples)]
        for name, kw in (("ours (train.json)", {}), ("ours, elastic always", {"elastic_prob": 1.0}),
                         ("ours, MONAI per sample", {"monai": True}),
                         ("ours, MONAI per sample, elastic always", {"monai": True, "elastic_prob": 1.0})):
            aug_cpu, margin = our_transforms(patch, "cpu", **kw)
            cpu = cpu_ms(lambda i: aug_cpu(samples[i], "cpu"), a.samples)
            dev = None
            if cuda:
                aug_gpu, _ = our_transforms(patch, "cuda", **kw)
                dev = device_ms(lambda i: aug_gpu(samples[i % a.samples], "cuda"), a.samples)
            rows.append((size, name, host, host + cpu, dev))

        # (b) the earlier trainer: everything on the host CPU, per sample
        from monai.transforms import Compose, Rand3DElasticd, RandRotated, RandZoomd
        from scipy.ndimage import distance_transform_edt

        seed_tf = Compose([
            Rand3DElasticd(keys=["image", "label"], sigma_range=(5, 8), magnitude_range=(50, 150), prob=1.0,
                           spatial_size=patch, mode=["bilinear", "nearest"], padding_mode="border"),
            RandRotated(keys=["image", "label"], range_x=0.5, range_y=0.5, range_z=0.5, prob=1.0, keep_size=True,
                        mode=["bilinear", "nearest"]),
            RandZoomd(keys=["image", "label"], min_zoom=0.85, max_zoom=1.15, prob=1.0, keep_size=True, mode=["trilinear", "nearest"]),
        ])
        seed_tf.set_random_state(0)
        rng = np.random.default_rng(0)
        read = [p + 2 * margin for p in patch]

        def seed_sample(i):
            o = [int(rng.integers(0, s - r + 1)) for s, r in zip(vol.shape, read)]
            sl = tuple(slice(oo, oo + r) for oo, r in zip(o, read))
            d = {"image": torch.from_numpy(vol[sl].astype(np.float32) / 255)[None], "label": torch.from_numpy(lab[sl].astype(np.float32))[None]}
            d = seed_tf(d)
            fg = np.asarray(d["label"][0]) == 1
            distance_transform_edt(fg)
            distance_transform_edt(~fg)

        seed_ms = cpu_ms(seed_sample, a.samples)
        rows.append((size, "seed-style (CPU, per sample)", seed_ms, seed_ms, None))
        if patch == [128, 128, 128]:
            ratio = seed_ms / host

        # (c) nnU-Net batchgeneratorsv2
        try:
            from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

            bg = SpatialTransform(patch_size=tuple(patch), patch_center_dist_from_border=0, random_crop=False,
                                  p_elastic_deform=1.0, p_rotation=1.0, rotation=(-0.5, 0.5), p_scaling=1.0, scaling=(0.85, 1.15),
                                  mode_seg="nearest")

            def bg_sample(i):
                o = [int(rng.integers(0, s - r + 1)) for s, r in zip(vol.shape, read)]
                sl = tuple(slice(oo, oo + r) for oo, r in zip(o, read))
                bg(image=torch.from_numpy(vol[sl].astype(np.float32) / 255)[None], segmentation=torch.from_numpy(lab[sl].astype(np.int16))[None])

            bg_ms = cpu_ms(bg_sample, a.samples)
            rows.append((size, "nnU-Net batchgeneratorsv2 SpatialTransform", bg_ms, bg_ms, None))
        except ImportError:
            rows.append((size, "nnU-Net batchgeneratorsv2 (not installed: pip install -e '.[bench]')", float("nan"), float("nan"), None))

    print(f"volume {a.volume}^3, {a.samples} samples per row, 1 thread; prepare (once per volume): {prepare_s:.1f} s wall")
    print(f"{'patch':<12} {'pipeline':<46} {'host CPU ms':>12} {'total CPU ms':>13} {'device ms':>10}")
    for size, name, host, total, dev in rows:
        d = f"{dev:10.1f}" if dev is not None else f"{'-':>10}"
        print(f"{size:<12} {name:<46} {host:12.1f} {total:13.1f} {d}")
    print(json.dumps({"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}))
    if ratio is not None:
        print(f"host_cpu_ratio: {ratio:.0f}")


if __name__ == "__main__":
    main()
