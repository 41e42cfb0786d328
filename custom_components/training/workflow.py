"""Pre-flight of a training run: every setting and input checked before a volume is decoded.

``preflight`` is the first thing ``train.json`` evaluates. In order, each failure a ``ValueError``
naming the setting or the file:

1. settings alone: ``batch_size`` >= 1, ``patch_size`` one the network can take (with the nearest
   valid one), ``device`` exists, the loss weights (done by constructing the loss, before this);
2. paths: ``dataset_dir`` / ``datalist`` exist;
3. the datalist (given, or built from ``dataset_dir``) and the data check of
   ``custom_components.data.validate_data`` on TIFF *headers* (files exist, 3D, uint8, shapes match);
4. the patch is not larger than the smallest volume;
5. the output folder: a new run never clobbers another run's checkpoints (``resume`` / ``overwrite``).

``fold="all"`` trains on every volume (the training and validation lists together) with no validation;
``init_from`` must name an existing checkpoint.

No GPU memory is taken and no pixel data is decoded here; label values are checked when the cache is
prepared (``custom_components.data.prepare``), which decodes each volume once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from custom_components.training.checkpoint import check_output_dir
from custom_components.training.network import check_patch_size, plan_dynunet

__all__ = ["preflight", "check_device", "check_settings", "val_records"]

logger = logging.getLogger("vesuvius.workflow")


def check_device(device) -> torch.device:
    """``torch.device`` of a device that exists here, else ``ValueError`` naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device '{device}' is not a valid torch device ({e}).") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' was requested but CUDA is not available on this machine (use device=cpu).")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device '{device}' is not supported (use cpu or cuda[:N]).")
    return dev


def check_settings(patch_size: Sequence[int], batch_size: int, device, epochs: int = 1, iterations_per_epoch: int = 1,
                   max_levels: int = 6) -> None:
    """The settings checks of step 1."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if int(iterations_per_epoch) < 1:
        raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}.")
    check_patch_size(patch_size, plan_dynunet(patch_size, max_levels=max_levels)["strides"])
    check_device(device)


def preflight(
    dataset_dir: str,
    datalist: str | None,
    output_dir: str,
    patch_size: Sequence[int],
    batch_size: int,
    device,
    fold: int | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    epochs: int = 1,
    iterations_per_epoch: int = 1,
    val_fraction: float = 0.2,
    seed: int = 0,
    rank: int = 0,
    max_levels: int = 6,
    init_from: str | None = "",
) -> dict:
    """Run the checks of the module docstring; return ``{"train", "val", "resume_path"}``.

    ``train`` / ``val`` are lists of ``{"id", "image", "label", ...}`` with absolute paths.
    """
    from custom_components.data.datalist import load_datalist, make_datalist
    from custom_components.data.io import read_tiff_header
    from custom_components.data.validate_data import validate_volumes

    check_settings(patch_size, batch_size, device, epochs, iterations_per_epoch, max_levels)
    if not dataset_dir or not os.path.isdir(dataset_dir):
        raise ValueError(f"dataset_dir '{dataset_dir}' does not exist or is not a folder.")
    if init_from and not os.path.isfile(init_from):
        raise ValueError(f"init_from '{init_from}' does not exist.")
    fold_all = str(fold).lower() == "all"
    if datalist:
        if not os.path.isfile(datalist):
            raise ValueError(f"datalist '{datalist}' does not exist.")
        train, val, _ = load_datalist(datalist, dataset_dir, fold=None if fold_all else fold)
    else:
        made = make_datalist(dataset_dir, val_fraction=val_fraction, seed=seed, split="random", folds=None)
        train, val = made["training"], made["validation"]
        absolute = lambda e: {**e, **{k: os.path.join(dataset_dir, e[k]) for k in ("image", "label") if e.get(k)}}  # noqa: E731
        train, val = [absolute(e) for e in train], [absolute(e) for e in val]
    if fold_all:  # every volume trains; no validation (its post-processing comes from a fold run's postprocess.json)
        train, val = train + val, []
    if not train:
        raise ValueError(f"no training volumes in {datalist or dataset_dir}.")
    entries = train + val
    problems = validate_volumes([e["image"] for e in entries], [e["label"] for e in entries], decode=False,
                                progress=rank == 0)  # one bar, not one per rank
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the training data:\n  " + "\n  ".join(problems))
    shapes = {e["id"]: read_tiff_header(e["image"])[0] for e in entries}
    smallest_id = min(shapes, key=lambda k: min(shapes[k]))
    small = shapes[smallest_id]
    if any(p > s for p, s in zip(patch_size, small)):
        raise ValueError(
            f"patch_size {list(patch_size)} is larger than volume {smallest_id} of shape {list(small)}: "
            "choose a patch_size no larger than the smallest volume."
        )
    resume_path = check_output_dir(output_dir, resume=resume, overwrite=overwrite) if rank == 0 else ""
    if rank != 0 and resume:
        resume_path = check_output_dir(output_dir, resume=True)
    logger.info("preflight ok: %d training, %d validation volumes; resume from '%s'", len(train), len(val), resume_path)
    return {"train": train, "val": val, "resume_path": resume_path}


def val_records(prepared: Sequence[dict], max_volumes: int | None = None, rank: int = 0,
                world_size: int = 1) -> list[dict]:
    """This rank's validation records (``NumpyReader`` on the cached arrays), from the first ``max_volumes``.

    Rank r takes volumes r, r + world_size, ... with ``weight`` 1. A rank left without a volume (fewer
    volumes than ranks) takes a copy of volume ``r % n`` with ``weight`` 0: it runs the evaluator like
    every rank (the metric's all-gather needs each rank) and the score ignores it, so the mean equals the
    single-process mean over the same volumes.
    """
    out = [{"id": e["id"], "image": os.path.join(e["cache"], "image.npy"), "label": os.path.join(e["cache"], "label.npy"),
            "weight": 1.0} for e in prepared]
    out = out[: max_volumes] if max_volumes else out
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
    if world_size == 1 or not out:
        return out
    return out[rank::world_size] or [{**out[rank % len(out)], "weight": 0.0}]


def distributed_prepare(entries, cache_dir, rank: int = 0, **kwargs) -> list[dict]:
    """``prepare_cache`` on rank 0 while the other ranks wait at a barrier, then open the cache everywhere."""
    import torch.distributed as dist

    from custom_components.data.prepare import prepare_cache

    out = prepare_cache(entries, cache_dir, **kwargs) if rank == 0 else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        out = prepare_cache(entries, cache_dir, **{**kwargs, "progress": False})
    return out
