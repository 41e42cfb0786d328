"""Time of one training step of the default configuration, split into its parts, vs the bare network.

Builds network, loss, optimiser, loader and device augmentation from ``bundle/configs/train.json``
(with ``--patch`` / ``--batch`` / ``--filters`` overrides) on one synthetic scroll volume, and times per
step: data wait (next batch from the host loader), augmentation (on the device), forward, each loss
term, backward, optimiser; samples/s; peak memory. Beside it, in the same run: a bare DynUNet forward +
backward on random tensors at the same patch, batch and precision. Budget on one GPU (issue #6): whole
step <= 1.3x the bare step; data wait <= 5 %, augmentation <= 5 %, loss terms <= 15 %, topology
(amortised over ``topology_every_n``) <= 5 %.

    python bench/train_step.py                     # CUDA: 128^3 batch 2; CPU: 48^3 batch 2, small net
    python bench/train_step.py --patch 128 --batch 2 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

TRAIN_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs", "train.json")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=128 if cuda else 48)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10 if cuda else 4)
    p.add_argument("--filters", default=None, help="comma list; default: train.json's (GPU) or 8,16,32,64 (CPU)")
    p.add_argument("--volume", type=int, default=None, help="synthetic volume edge (default 2x patch, >= 64)")
    p.add_argument("--num_workers", type=int, default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda:0" if cuda else "cpu")
    from custom_components.data.datalist import make_datalist
    from custom_components.data.synthetic import write_dataset

    tmp = tempfile.mkdtemp(prefix="bench_step_")
    edge = a.volume or max(64, 2 * a.patch)
    write_dataset(os.path.join(tmp, "data"), volumes=2, test=0, test_labels=False, profile="34117", shape=(edge,) * 3, seed=0, preview=False)
    parser = ConfigParser()
    parser.read_config(TRAIN_JSON)
    over = {
        "dataset_dir": os.path.join(tmp, "data"), "output_dir": os.path.join(tmp, "run"), "patch_size": [a.patch] * 3,
        "batch_size": a.batch, "iterations_per_epoch": a.steps + 2, "device": str(dev), "val_fraction": 0.5,
    }
    if a.filters or not cuda:
        over["filters"] = [int(f) for f in (a.filters or "8,16,32,64,128").split(",")]
    if a.num_workers is not None:
        over["num_workers"] = a.num_workers
    for k, v in over.items():
        parser[k] = v
    del make_datalist
    parser.get_parsed_content("preflight")
    network = parser.get_parsed_content("network")
    loss = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    loader = parser.get_parsed_content("train#dataloader")
    augment = parser.get_parsed_content("train#augment")
    amp = bool(parser["amp"]) and cuda
    network.train()
    it = iter(loader)
    parts = {k: 0.0 for k in ["data wait", "augmentation", "forward", "backward", "optimizer"]}
    term_time = {n: 0.0 for n in loss.terms}
    n = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_all = time.perf_counter()
    for step in range(a.steps + 1):
        if step == 1:  # the first step warms up; not counted
            parts = dict.fromkeys(parts, 0.0)
            term_time = dict.fromkeys(term_time, 0.0)
            n = 0
            t_all = time.perf_counter()
        batch, dt = timed(lambda: next(it), dev)
        parts["data wait"] += dt
        (image, label), dt = timed(lambda: augment(batch, dev), dev)
        parts["augmentation"] += dt
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred, dt = timed(lambda: network(image), dev)
            parts["forward"] += dt
            # the composite's own sum, term by term, so each term is timed (same computation as loss(pred, label))
            heads = loss._heads(pred, label)
            hw = loss.head_weights(len(heads))
            full = torch.zeros((), device=dev)
            for name, term in loss.terms.items():
                def one():
                    if name in loss.main_head_only or len(heads) == 1:
                        return term(heads[0], label).float()
                    return sum(w * term(h, label).float() for w, h in zip(hw, heads))
                value, dt = timed(one, dev)
                term_time[name] += dt
                full = full + loss.weights[name] * value
        _, dt = timed(lambda: full.backward(), dev)
        parts["backward"] += dt
        _, dt = timed(lambda: optimizer.step(), dev)
        parts["optimizer"] += dt
        n += 1
    step_s = (time.perf_counter() - t_all) / n
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")

    # bare DynUNet forward + backward, same patch / batch / precision
    x = torch.randn(a.batch, 1, a.patch, a.patch, a.patch, device=dev)
    bare = 0.0
    for step in range(a.steps + 1):
        def fb():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = network(x)
            out.float().mean().backward()
        _, dt = timed(fb, dev)
        if step:
            bare += dt
    bare /= a.steps
    print(f"device {dev} ({torch.cuda.get_device_name(0) if cuda else 'CPU, ' + str(torch.get_num_threads()) + ' threads'}), "
          f"patch {a.patch}^3, batch {a.batch}, amp {'bf16' if amp else 'off'}, {a.steps} steps")
    print(f"{'part':<28} {'s/step':>9} {'% of step':>10} {'x bare':>8}")
    rows = [(k, v / n) for k, v in parts.items()] + [(f"loss/{k}", v / n) for k, v in term_time.items()]
    for k, v in rows:
        print(f"{k:<28} {v:9.4f} {100 * v / step_s:9.1f}% {v / bare:8.3f}")
    print(f"{'whole step':<28} {step_s:9.4f} {100.0:9.1f}% {step_s / bare:8.3f}")
    print(f"{'bare DynUNet fwd+bwd':<28} {bare:9.4f}")
    every = int(parser["topology_every_n"])
    topo = term_time.get("topology", 0.0) / n
    print(json.dumps({
        "samples_per_s": a.batch / step_s, "peak_gpu_mem_gb": peak, "step_over_bare": step_s / bare,
        "data_wait_pct": 100 * parts["data wait"] / n / step_s, "augment_pct": 100 * parts["augmentation"] / n / step_s,
        "loss_terms_pct": 100 * sum(v for k, v in term_time.items() if k != "topology") / n / step_s,
        "topology_amortised_pct": 100 * topo / step_s, "topology_every_n": every,
    }))


if __name__ == "__main__":
    main()
