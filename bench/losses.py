"""What each loss term costs next to the network: time and memory of forward + backward, as a ratio.

For each patch size (default 64^3 and the default training patch 128^3), batch 2, on the CPU and on
CUDA when present, it times forward + backward of

- one bare MONAI DynUNet step (the bench config below, training mode, deep supervision on: the
  (B, 3, 1, *S) output, backward of its mean) -- the reference, ratio 1;
- each term alone on the main head, (B, 1, *S) logits, against a synthetic label with its precomputed
  signed distance map and tube (computed once, not timed: that is the prepare step's work);
- the composite with train.json's weights on the stacked deep-supervision output, without the
  topology term and with it (a step where the topology term runs); the topology term also amortised
  over ``topology_every_n`` steps.

Memory: on CUDA the peak allocated during the step above what was allocated before it; on the CPU
(no allocator statistics) the bytes of the tensors autograd saves for backward (distinct storages,
inputs and parameters excluded), which is what a term adds to the network's activations at peak.
Precision: fp32 on the CPU, bf16 autocast on CUDA (``--precision`` to force), as in training.

Times are the best of ``reps`` repetitions (terms: at least 3) (and their median): on a shared or virtualised host the
CPU times of large allocations vary several-fold from page faults, the best is the compute cost.

On the CPU, 128^3 at batch 2 in fp32 needs more than 22 GB of RAM for the bare DynUNet step (run
``--patch 128 --batch 1 --quick`` on a small host; the ratios hardly depend on the batch).

Budget: all terms except topology (the composite without it) at most 15 % of the bare step, topology
amortised at most 5 %. The last line gives those ratios.

    python bench/losses.py [--patch 64 128] [--batch 2] [--quick] [--device cpu cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.networks.nets import DynUNet  # noqa: E402

from custom_components.losses import (  # noqa: E402
    CompositeTopologyLoss,
    MaskedBCEWithLogitsLoss,
    MaskedSoftclDiceLoss,
    MaskedSoftDiceLoss,
    PersistentHomologyLoss,
    SkeletonRecallLoss,
    SurfaceDistanceLoss,
)
from custom_components.data.targets import medial_surface_tube, signed_distance_map  # noqa: E402

# train.json's loss settings
WEIGHTS = {"bce": 1.0, "dice": 1.0, "cldice": 0.5, "skeleton_recall": 0.5, "surface_distance": 0.1, "topology": 0.05}
EVERY_N, DOWNSAMPLE, CLIP = 10, 4, 8.0
BUDGET_TERMS, BUDGET_TOPOLOGY = 0.15, 0.05


def build_net() -> DynUNet:
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        kernel_size=[[3, 3, 3]] * 5,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[32, 64, 128, 256, 320],
        deep_supervision=True,
        deep_supr_num=2,
        res_block=True,
    )


def synthetic_label(size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, S, S, S): wavy sheets 2 voxels thick every 12 voxels, a label-2 slab; sdm and tube."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size, :size, :size]
    out = []
    for _ in range(batch):
        phase = rng.uniform(0, 2 * np.pi, 2)
        height = z + 2.5 * np.sin(x / 7.0 + phase[0]) + 2.0 * np.sin(y / 9.0 + phase[1])
        label = (np.mod(height, 12.0) < 2.0).astype(np.uint8)
        label[:, :, : size // 8] = 2
        sdm = signed_distance_map(label, clip=CLIP)
        tube = medial_surface_tube(label, dilation=1)
        out.append(np.stack([label.astype(np.float32), sdm, tube.astype(np.float32)]))
    return torch.from_numpy(np.stack(out))


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the ``with`` block."""

    def __init__(self, exclude=()):
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def _pack(self, t):
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, reps: int, warmup: int, exclude=()):
    """(best seconds, median seconds, memory bytes) of ``step()`` (forward + backward)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        mem = torch.cuda.max_memory_allocated(device) - base
    else:
        with SavedBytes(exclude) as sb:
            step(backward=False)
        mem = sb.bytes
    return min(times), statistics.median(times), mem


def bench_one(size: int, batch: int, device: torch.device, bf16: bool, reps: int, warmup: int):
    torch.manual_seed(0)
    net = build_net().to(device).train()
    image = torch.randn(batch, 1, size, size, size, device=device)
    label = synthetic_label(size, batch).to(device)
    fg = (label[:, :1] == 1).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # a mid-training prediction: right on average, noisy; heads 1, 2 blurrier
    base_logits = 3.0 * (2 * fg - 1) + 2.0 * torch.randn(batch, 1, size, size, size, device=device)
    ds_logits = torch.stack([base_logits, 0.7 * base_logits, 0.5 * base_logits], dim=1)
    if bf16:
        base_logits, ds_logits = base_logits.bfloat16(), ds_logits.bfloat16()
    params = list(net.parameters())

    def net_step(backward=True):
        net.zero_grad(set_to_none=True)
        with autocast:
            out = net(image)
        if backward:
            out.float().mean().backward()
        return out

    def term_step(loss, logits):
        def step(backward=True):
            x = logits.detach().requires_grad_(True)
            with autocast:
                v = loss(x, label)
            if backward:
                v.backward()
            return v

        return step

    rows = []

    term_reps = max(reps, 3)  # a term costs a fraction of the network step: always best of >= 3

    def add(name, step, exclude, reps_=term_reps, warmup_=warmup):
        best, med, mem = measure(step, device, reps_, warmup_, exclude=exclude)
        rows.append((name, best, med, mem))
        return best, med, mem

    t_net, _, m_net = add("DynUNet fwd+bwd (bare)", net_step, [image, *params], reps_=reps)
    terms = {
        "bce": MaskedBCEWithLogitsLoss(),
        "dice": MaskedSoftDiceLoss(batch=True),
        "cldice": MaskedSoftclDiceLoss(),
        "cldice, checkpointed": MaskedSoftclDiceLoss(checkpoint=True),
        "skeleton_recall": SkeletonRecallLoss(),
        "surface_distance": SurfaceDistanceLoss(clip=CLIP),
        "topology, crop 16 (one call)": PersistentHomologyLoss(downsample=DOWNSAMPLE, every_n=1, crop=16),
        "topology (one computed call)": PersistentHomologyLoss(downsample=DOWNSAMPLE, every_n=1),
    }
    excl = [base_logits, ds_logits, label]
    for name, loss in terms.items():
        t_topo, med_topo, m_topo = add(name, term_step(loss, base_logits), excl)
    rows.append((f"topology amortised (/{EVERY_N})", t_topo / EVERY_N, med_topo / EVERY_N, m_topo))
    noise = (2 * torch.randn_like(base_logits.float())).to(base_logits.dtype)
    t_noise, med_noise, m_noise = measure(
        term_step(terms["topology (one computed call)"], noise), device, term_reps, 1, exclude=[noise, label]
    )
    rows.append(("topology, noise input (/1)", t_noise, med_noise, m_noise))
    rows.append((f"topology, noise input (/{EVERY_N})", t_noise / EVERY_N, med_noise / EVERY_N, m_noise))
    no_topo = CompositeTopologyLoss({k: v for k, v in WEIGHTS.items() if k != "topology"}, surface_clip=CLIP)
    t_c, med_c, _ = add("composite w/o topology (DS, 3 heads)", term_step(no_topo, ds_logits), excl)
    full = CompositeTopologyLoss(WEIGHTS, surface_clip=CLIP, topology_every_n=1, topology_downsample=DOWNSAMPLE)
    _, _, m_f = add("composite, topology step", term_step(full, ds_logits), excl)
    rows.append(("composite amortised", t_c + t_topo / EVERY_N, med_c + med_topo / EVERY_N, m_f))
    return rows, t_net, m_net, t_c, t_topo / EVERY_N, t_noise / EVERY_N


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, nargs="+", default=[64, 128], help="cubic patch sizes (multiples of 16)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--quick", action="store_true", help="network: 1 warm-up, 1 timed repetition (terms: best of 3)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    summary = []
    for dev in devices:
        device = torch.device(dev)
        bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
        reps = args.reps or (1 if args.quick else (3 if device.type == "cpu" else 10))
        warmup = 1 if (args.quick or device.type == "cpu") else 3
        for size in args.patch:
            if size % 16:
                raise ValueError(f"--patch {size}: must be a multiple of 16 (total stride of the bench DynUNet).")
            rows, t_net, m_net, t_c, t_topo_am, t_noise_am = bench_one(
                size, args.batch, device, bf16, reps, warmup
            )
            mem_kind = "peak MB" if device.type == "cuda" else "saved MB"
            threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
            precision = "bf16" if bf16 else "fp32"
            print(f"\n== {dev}{threads}, patch {size}^3, batch {args.batch}, {precision}, reps {reps} ==")
            head = f"{'step (forward + backward)':38s} {'ms best':>9s} {'ms med':>9s} {'x bare':>7s}"
            print(f"{head} {mem_kind:>9s} {'x bare':>7s}")
            for name, best, med, m in rows:
                print(
                    f"{name:38s} {best * 1e3:9.1f} {med * 1e3:9.1f} {best / t_net:7.3f} "
                    f"{m / 2**20:9.1f} {m / max(m_net, 1):7.3f}"
                )
            r_terms, r_topo, r_noise = t_c / t_net, t_topo_am / t_net, t_noise_am / t_net
            ok = "PASS" if (r_terms <= BUDGET_TERMS and r_topo <= BUDGET_TOPOLOGY) else "OVER"
            summary.append(
                f"{dev} {size}^3: terms w/o topology {r_terms:.3f} (budget {BUDGET_TERMS}), "
                f"topology amortised {r_topo:.4f} (noise input {r_noise:.4f}; budget {BUDGET_TOPOLOGY}) {ok}"
            )
    print("\nratios: " + "; ".join(summary))


if __name__ == "__main__":
    main()
