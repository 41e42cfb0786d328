"""Average the weights of several checkpoints of one network into one inference checkpoint.

    python -m custom_components.training.average_checkpoints A.pt B.pt [C.pt ...] --out avg.pt [--weights 1 1 2]

theta = sum_i w_i theta_i / sum_i w_i for every floating tensor (weights equal by default); each input
contributes its inference weights (its EMA weights when it holds them, else its network's; a ``model.pt``
or a training checkpoint). Every input must describe the same network (the settings the checkpoints
carry, and the same tensor names and shapes): the first difference is named with both files. The output
has ``model.pt``'s form (``{"network", "meta"}``, written atomically) with ``network.json`` beside it, so
inference and export read it as any run's model (e.g. the last checkpoints of one run, or the folds'
models of one configuration).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from custom_components.atomic import atomic_write_json
from custom_components.training.checkpoint import atomic_torch_save, checkpoint_network_spec, inference_weights, load_checkpoint
from custom_components.training.network import spec_differences

__all__ = ["average_state_dicts", "average_checkpoints", "main"]


def average_state_dicts(states: Sequence[dict], weights: Sequence[float] | None = None, names: Sequence[str] | None = None) -> dict:
    """The weighted mean of state dicts with the same keys and shapes; non-floating tensors must be equal."""
    names = list(names or [f"state {i}" for i in range(len(states))])
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or min(weights) <= 0:
        raise ValueError(f"--weights must be {len(states)} positive numbers, got {weights}.")
    first = states[0]
    for name, state in zip(names[1:], states[1:]):
        if set(state) != set(first):
            diff = sorted(set(state) ^ set(first))
            raise ValueError(f"{names[0]} and {name} hold other tensors: {', '.join(diff[:8])}.")
        shapes = [k for k in first if tuple(state[k].shape) != tuple(first[k].shape)]
        if shapes:
            k = shapes[0]
            raise ValueError(f"{names[0]} and {name} differ in shape at {k}: {list(first[k].shape)} vs {list(state[k].shape)}.")
    total = sum(weights)
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = sum(w * s[k].double() for w, s in zip(weights, states)).div(total).to(v.dtype)
        else:
            if any(not torch.equal(s[k], v) for s in states[1:]):
                raise ValueError(f"the integer tensor {k} differs between the checkpoints: it cannot be averaged.")
            out[k] = v.clone()
    return out


def average_checkpoints(paths: Sequence[str], out: str, weights: Sequence[float] | None = None) -> str:
    """Average ``paths`` (same network required) into ``out`` (model.pt form) and ``network.json`` beside it."""
    if len(paths) < 2:
        raise ValueError(f"give at least two checkpoints to average, got {len(paths)}.")
    ckpts = [load_checkpoint(p) for p in paths]
    specs = [checkpoint_network_spec(c) for c in ckpts]
    for path, spec in zip(paths[1:], specs[1:]):
        if (spec is None) != (specs[0] is None) or (spec and spec_differences(specs[0], spec)):
            detail = "; ".join(spec_differences(specs[0] or {}, spec or {})) or "one carries no network settings"
            raise ValueError(f"{paths[0]} and {path} are not the same network: {detail}.")
    averaged = average_state_dicts([inference_weights(c)[0] for c in ckpts], weights, names=list(paths))
    meta = {"network": specs[0], "source": [os.path.basename(p) for p in paths],
            "weights": f"average of {len(paths)}" + (f" with weights {list(weights)}" if weights else "")}
    atomic_torch_save({"network": averaged, "meta": meta}, out)
    atomic_write_json(os.path.join(os.path.dirname(os.path.abspath(out)), "network.json"), {"network_spec": specs[0]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m custom_components.training.average_checkpoints",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoints or model.pt files of one network")
    ap.add_argument("--out", required=True, help="the averaged checkpoint to write (model.pt form)")
    ap.add_argument("--weights", type=float, nargs="*", default=None, help="one positive weight per checkpoint")
    args = ap.parse_args(argv)
    try:
        path = average_checkpoints(args.checkpoints, args.out, args.weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}: the average of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
