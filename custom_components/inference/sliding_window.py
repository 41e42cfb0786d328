"""Inference building blocks: the networks checkpoints describe, and a sliding window that survives OOM.

``resolve_network_specs`` / ``load_ensemble_members`` build each checkpoint's network from the settings it
carries (a ``.pt`` checkpoint, ``model.pt``, or a TorchScript export ``.ts``); ``ProbabilityEnsemble`` is
the sigmoid of their fused logits on one window (``custom_components.inference.ensemble``).
``RobustSlidingWindowInferer`` is MONAI's ``SlidingWindowInfererAdapt``
(Gaussian blending; stitching moved to a buffer, then to the CPU, on a CUDA out-of-memory error) that
also halves the window batch when the error persists, rather than failing.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from monai.inferers import SlidingWindowInfererAdapt

from custom_components.training.checkpoint import (
    checkpoint_network_spec,
    inference_weights,
    load_checkpoint,
    load_network_weights,
)
from custom_components.training.network import spec_differences

__all__ = ["ProbabilityEnsemble", "RobustSlidingWindowInferer", "load_networks", "load_ensemble_members", "parse_ckpt_paths",
           "input_records", "file_network_spec", "resolve_network_spec", "resolve_network_specs", "image_folder"]

logger = logging.getLogger("vesuvius.inference")


def parse_ckpt_paths(ckpt_path) -> list[str]:
    """One path, a comma-separated string or a list; each must exist."""
    if isinstance(ckpt_path, str):
        paths = [p.strip() for p in ckpt_path.split(",") if p.strip()]
    else:
        paths = [str(p) for p in ckpt_path]
    if not paths:
        raise ValueError("ckpt_path is empty: give a checkpoint (.pt) or a TorchScript model (.ts).")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"checkpoint(s) not found: {', '.join(missing)}")
    return paths


def file_network_spec(path: str) -> dict | None:
    """The network spec a ``.pt`` checkpoint / ``model.pt`` carries, or a ``.ts`` export in its extra file
    ``network.json`` (``ckpt_export --config_file "['inference.json', 'RUN/models/network.json']"``)."""
    if path.endswith(".ts"):
        import json

        extra = {"network.json": ""}
        torch.jit.load(path, map_location="cpu", _extra_files=extra)
        spec = json.loads(extra["network.json"] or "{}").get("network_spec")
        return dict(spec) if spec else None
    return checkpoint_network_spec(load_checkpoint(path))


def resolve_network_specs(ckpt_path, **settings) -> list[dict]:
    """One spec per checkpoint to build its network from: the one the checkpoint carries, checked against every
    setting given (not None) on the command line; ``ValueError`` naming the setting and both values on a
    contradiction, before any volume is read. A checkpoint without a spec (written before specs existed)
    takes the settings given, ``patch_size`` required. Checkpoints of an ensemble may differ (another
    window size, another network)."""
    given = {k: v for k, v in settings.items() if v is not None}
    specs = []
    for path in parse_ckpt_paths(ckpt_path):
        spec = file_network_spec(path)
        if not spec:
            if "patch_size" not in given:
                raise ValueError(f"checkpoint {path} carries no network settings (written before they were recorded): "
                                 "give --patch_size (and --filters, --deep_supr_num if not the defaults).")
            spec = {"kind": "dynunet", **given}
        for name, value in given.items():
            if name in spec and spec_differences({name: spec[name]}, {name: value}):
                raise ValueError(f"--{name} {value!r} contradicts checkpoint {path}, trained with {name}={spec[name]!r}: "
                                 f"leave --{name} out (the checkpoint sets it) or give a checkpoint trained so.")
        specs.append(spec)
    return specs


def resolve_network_spec(ckpt_path, **settings) -> dict:
    """The spec of the first checkpoint (``resolve_network_specs``), for one network or an export."""
    return resolve_network_specs(ckpt_path, **settings)[0]


def image_folder(dataset_dir: str, subfolder: str) -> str:
    """``dataset_dir/subfolder`` where a Kaggle-layout root holds it (``test_images``, ...), else ``dataset_dir``."""
    candidate = os.path.join(dataset_dir, subfolder)
    return candidate if os.path.isdir(candidate) else dataset_dir


def load_ensemble_members(specs: Sequence[dict], ckpt_path, device="cpu") -> list[torch.nn.Module]:
    """One network per checkpoint, each built from its own spec (``resolve_network_specs``), eval mode."""
    from custom_components.training.network import build_network

    return [load_networks(build_network(**spec), path, device)[0] for spec, path in zip(specs, parse_ckpt_paths(ckpt_path))]


def load_networks(network_def: torch.nn.Module, ckpt_path, device="cpu") -> list[torch.nn.Module]:
    """Networks in eval mode on ``device``: TorchScript files load as they are, checkpoints into copies of
    ``network_def`` with their inference weights (the EMA weights when the checkpoint keeps them, as
    ``model.pt`` does)."""
    nets = []
    for path in parse_ckpt_paths(ckpt_path):
        if path.endswith(".ts"):
            net = torch.jit.load(path, map_location=device)
        else:
            net = copy.deepcopy(network_def)
            weights, kind = inference_weights(load_checkpoint(path))  # the EMA weights of a run that kept them
            load_network_weights(net, weights, source=f"checkpoint {path} ({kind} weights)")
        nets.append(net.to(device).eval())
    return nets


class ProbabilityEnsemble(torch.nn.Module):
    """sigmoid of the fused logits of ``custom_components.inference.ensemble.LogitEnsemble`` on one window
    (for callers that want probabilities from a single window size)."""

    def __init__(self, networks: Sequence[torch.nn.Module], tta_flips: int = 1, **kwargs):
        super().__init__()
        from custom_components.inference.ensemble import LogitEnsemble

        self.logits = LogitEnsemble(networks, tta_flips=tta_flips, **kwargs)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class RobustSlidingWindowInferer(SlidingWindowInfererAdapt):
    """MONAI's ``SlidingWindowInfererAdapt`` (on a CUDA out-of-memory error it stitches in a buffer, then on
    the CPU) that, when the error persists, also halves ``sw_batch_size`` down to 1 before giving up."""

    def __call__(self, inputs, network, *args, **kwargs):
        while True:
            try:
                return super().__call__(inputs, network, *args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                if self.sw_batch_size <= 1:
                    raise
                torch.cuda.empty_cache()
                self.sw_batch_size = max(1, self.sw_batch_size // 2)
                logger.warning("CUDA out of memory: retrying with sw_batch_size=%d", self.sw_batch_size)


def input_records(input_dir: str, label_dir: str | None = None) -> list[dict]:
    """``[{"id", "image"(, "label")}]`` for every .tif/.tiff in ``input_dir``, after the data check of headers."""
    from custom_components.data.validate_data import validate_volumes

    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir '{input_dir}' does not exist or is not a folder.")
    names = sorted(f for f in os.listdir(input_dir) if f.lower().endswith((".tif", ".tiff")))
    if not names:
        raise ValueError(f"input_dir '{input_dir}' holds no .tif volumes.")
    recs = [{"id": os.path.splitext(n)[0], "image": os.path.join(input_dir, n)} for n in names]
    if label_dir:
        for r in recs:
            r["label"] = os.path.join(label_dir, os.path.basename(r["image"]))
    problems = validate_volumes([r["image"] for r in recs], [r["label"] for r in recs] if label_dir else None, decode=False)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the input:\n  " + "\n  ".join(problems))
    return recs
