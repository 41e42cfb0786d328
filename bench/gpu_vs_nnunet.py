"""Ours vs nnU-Net on one GPU, side by side in one run: training samples/s, and DynUNet vs nnU-Net's
residual-encoder U-Net (ResEnc M) step time and memory.

1. nnU-Net's way, driven by this bench (nnunetv2 itself is not needed): ``PlainConvUNet`` from
   ``dynamic-network-architectures`` with nnU-Net's default 3d_fullres settings for this patch (6 stages,
   32-320 features, 2 convolutions per stage, instance norm, leaky ReLU, deep supervision), nnU-Net's
   Dice + CE loss (soft Dice over the batch without background + cross-entropy, deep-supervision weights
   1/2^i with the lowest head at 0), fp16 autocast with a gradient scaler, SGD (Nesterov, 0.99), and its
   data augmentation on the CPU: batchgeneratorsv2 with nnU-Net v2's default training transforms (spatial,
   noise, blur, brightness, contrast, low resolution, gamma, mirroring, DS downsampling) in
   ``--nnunet_workers`` processes (nnU-Net's default 12), each sample read as ``patch + 2 * 16`` from the
   volume as ours is.
2. Ours: train.json's trainer (``bench/gpu_trainer.py``'s run) on the same volumes, and the same with
   the loss cut to BCE + Dice (what the topology-aware terms cost).
3. Bare forward + backward, bf16, at the same patch and batch, seconds and peak memory, with cudnn's
   deterministic algorithms and with its autotuner (``cudnn.benchmark``): train.json's DynUNet (deep
   supervision 2, and none), nnU-Net's PlainConvUNet and ResEnc M (blocks per stage 1, 3, 4, 6, 6, 6;
   nnU-Net's ``nnUNetResEncUNetMPlans`` preset).

Prints a table and one JSON line (``--out`` writes it too). Without CUDA it runs tiny versions on the CPU.

    python bench/gpu_vs_nnunet.py --patch 128 --batch 2 --steps 30
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_trainer import bare_step_s, emit_json, make_data, run_trainer  # noqa: E402


def nnunet_transforms(patch: int, ds_scales):
    """nnU-Net v2's default training transforms (nnUNetTrainer.get_training_transforms, 3D, no regions)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    rot = (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi)
    return ComposeTransforms([
        SpatialTransform((patch,) * 3, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=rot, p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, mode_seg="nearest"),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True), 0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False,
                                              p_per_channel=0.5, benchmark=True), 0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1), 0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), 0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                                       ignore_axes=None, allowed_channels=None, p_per_channel=0.5), 0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), 0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), 0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
        RemoveLabelTansform(-1, 0),
        DownsampleSegForDSTransform(ds_scales=ds_scales),
    ])


class NnunetPatches(torch.utils.data.Dataset):
    """Random ``patch + 2 * margin`` reads of the volumes, augmented by nnU-Net's transforms (in the worker)."""

    def __init__(self, volumes, patch: int, margin: int, ds_scales, length: int):
        self.volumes, self.patch, self.read, self.length = volumes, patch, patch + 2 * margin, length
        self.ds_scales = ds_scales
        self.transforms = None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if self.transforms is None:
            self.transforms = nnunet_transforms(self.patch, self.ds_scales)
        rng = np.random.default_rng(i)
        image, label = self.volumes[int(rng.integers(len(self.volumes)))]
        o = [int(rng.integers(0, max(s - self.read, 0) + 1)) for s in image.shape]
        sl = tuple(slice(a, a + self.read) for a in o)
        img = torch.from_numpy(image[sl].astype(np.float32) / 255)[None]
        seg = torch.from_numpy((label[sl] == 1).astype(np.int16))[None]  # speed bench: label 2 counts as background
        out = self.transforms(image=img, segmentation=seg)
        return out["image"], [s.long().clamp(0, 1) for s in out["segmentation"]]


def dc_and_ce(outputs, targets, weights):
    """nnU-Net's DC_and_CE_loss (batch Dice without background, smooth 1e-5, + CE) over the DS heads."""
    total = 0.0
    for w, logits, seg in zip(weights, outputs, targets):
        if w == 0:
            continue
        seg = seg[:, 0]
        ce = torch.nn.functional.cross_entropy(logits.float(), seg)
        probs = torch.softmax(logits.float(), 1)[:, 1:]
        onehot = (seg == 1).unsqueeze(1).float()
        axes = (0, 2, 3, 4)
        tp = (probs * onehot).sum(axes)
        dice = (2 * tp + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
        total = total + w * (ce - dice.mean())
    return total


def plain_conv_unet(patch: int, features, deep_supervision=True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    return PlainConvUNet(1, n, features, torch.nn.Conv3d, 3, [1] + [2] * (n - 1), 2, 2, [2] * (n - 1), conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def resenc_m(features, n_classes: int = 1):
    """nnU-Net's ResEnc M preset (blocks per stage 1, 3, 4, 6, 6, 6, one conv per decoder stage)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    n = len(features)
    blocks = [1, 3, 4, 6, 6, 6, 6, 6][:n]
    return ResidualEncoderUNet(1, n, features, torch.nn.Conv3d, 3, [1] + [2] * (n - 1), blocks, n_classes, [1] * (n - 1),
                               conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True}, deep_supervision=True)


def nnunet_samples_per_s(volumes, patch, batch, steps, workers, features, device) -> dict:
    """nnU-Net's network, loss, precision, optimiser and CPU augmentation: samples/s after 5 warm-up steps
    (cudnn benchmark on, as nnU-Net sets it)."""
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    net = plain_conv_unet(patch, features).to(device)
    n_heads = len(features) - 1
    ds_scales = [[1.0 / 2**i] * 3 for i in range(n_heads)]
    weights = np.array([1 / 2**i for i in range(n_heads)])
    weights[-1] = 0
    weights = (weights / weights.sum()).tolist()
    ds = NnunetPatches(volumes, patch, 16, ds_scales, (steps + 5) * batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0, prefetch_factor=6 if workers else None)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    t0 = None
    for i, (img, segs) in enumerate(loader):
        if i == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        img = img.to(device, non_blocking=True)
        segs = [s.to(device, non_blocking=True) for s in segs]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = net(img)
            loss = dc_and_ce(out, segs, weights)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"samples_per_s": steps * batch / wall, "step_s": wall / steps, "workers": workers}


def bare_and_memory(net, batch, patch, device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    s = bare_step_s(net, batch, patch, device.type == "cuda", device, steps=5)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": s, "peak_mem_gb": mem, "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=128 if cuda else 32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30 if cuda else 4)
    p.add_argument("--nnunet_workers", type=int, default=12 if cuda else 2)
    p.add_argument("--data", default=None)
    p.add_argument("--parts", default="compare,resenc", help="comma list of: compare, resenc")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda:0" if cuda else "cpu")
    features = [32, 64, 128, 256, 320, 320] if cuda else [8, 16, 32, 64]
    tmp = tempfile.mkdtemp(prefix="gpu_vs_nnunet_")
    data = make_data(a.data or os.path.join(tmp, "data"), a.patch + 64)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "patch": a.patch, "batch": a.batch}
    parts = a.parts.split(",")
    if "compare" in parts:
        from custom_components.data.io import read_volume

        ids = [line.split(",")[0] for line in open(os.path.join(data, "train.csv")).read().split()[1:]]
        volumes = [(read_volume(os.path.join(data, "train_images", f"{i}.tif")), read_volume(os.path.join(data, "train_labels", f"{i}.tif")))
                   for i in ids]
        extra = {} if cuda else {"filters": features}
        keys = ("samples_per_s", "step_s", "data_wait_pct", "gpu_util_pct")
        ours = run_trainer(data, os.path.join(tmp, "ours"), a.patch, a.batch, a.steps + 5, None, 6, extra)
        res["ours"] = {k: ours[k] for k in keys}
        plain = run_trainer(data, os.path.join(tmp, "ours_bce_dice"), a.patch, a.batch, a.steps + 5, None, 6,
                            {**extra, "loss_weights": {"bce": 1.0, "dice": 1.0}})
        res["ours_bce_dice"] = {k: plain[k] for k in keys}
        res["nnunet"] = nnunet_samples_per_s(volumes, a.patch, a.batch, a.steps, a.nnunet_workers, features, device)
        res["ours_over_nnunet"] = res["ours"]["samples_per_s"] / res["nnunet"]["samples_per_s"]
    if "resenc" in parts:
        from custom_components.training.network import build_dynunet

        nets = {
            "DynUNet, DS 2 (train.json)": lambda: build_dynunet(patch_size=[a.patch] * 3, filters=features,
                                                                deep_supervision=True, deep_supr_num=2),
            "DynUNet, no DS": lambda: build_dynunet(patch_size=[a.patch] * 3, filters=features, deep_supervision=False),
            "nnU-Net PlainConvUNet, DS": lambda: plain_conv_unet(a.patch, features),
            "nnU-Net ResEnc M, DS": lambda: resenc_m(features),
        }
        res["networks"] = {}
        for benchmark in (False, True):  # cudnn deterministic algorithms (MONAI's set_determinism) vs autotuned
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, not benchmark
            for name, make in nets.items():
                res["networks"][f"{name}, cudnn {'benchmark' if benchmark else 'deterministic'}"] = \
                    bare_and_memory(make().to(device), a.batch, a.patch, device)
    print(f"{res['device']}, patch {a.patch}^3, batch {a.batch}")
    if "ours" in res:
        print(f"{'pipeline':<58} {'samples/s':>10} {'s/step':>8}")
        print(f"{'ours: train.json trainer (device augmentation, bf16)':<58} {res['ours']['samples_per_s']:10.2f} {res['ours']['step_s']:8.3f}")
        print(f"{'ours, loss BCE + Dice only':<58} {res['ours_bce_dice']['samples_per_s']:10.2f} {res['ours_bce_dice']['step_s']:8.3f}")
        name = f"nnU-Net: PlainConvUNet, DC+CE, fp16, bgv2 CPU aug x{a.nnunet_workers}"
        print(f"{name:<58} {res['nnunet']['samples_per_s']:10.2f} {res['nnunet']['step_s']:8.3f}")
        print(f"ours / nnU-Net samples/s: {res['ours_over_nnunet']:.2f}")
    if "networks" in res:
        print(f"{'network, bare fwd+bwd bf16':<52} {'s/step':>8} {'peak GB':>8} {'params M':>9}")
        for name, r in res["networks"].items():
            mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
            print(f"{name:<52} {r['step_s']:8.3f} {mem:>8} {r['params_m']:9.1f}")
    emit_json(res, a.out)


if __name__ == "__main__":
    main()
