"""Host side of the training data: random patches read out of the memory-mapped cache.

This is all the host CPU does per sample (a crop of a few MB, milliseconds): every spatial and
intensity augmentation runs afterwards on the device (``custom_components.training.augment``).

``PatchDataset`` is indexed by ``(epoch, i)`` pairs that ``EpochSampler`` yields, so the patch a sample
gets depends only on ``(seed, epoch, i)``: the same with 0 or many loader workers (persistent or not),
and the same after resuming from a checkpoint. Each patch is ``patch_size + 2 * margin`` large (the
margin feeds rotation / elastic resampling, which crops back to ``patch_size``); with probability
``fg_fraction`` its centre is a random label-1 voxel (nnU-Net's foreground oversampling, 1 in 3).
Outside the volume the image is 0 and the label 2 (unlabeled), so padding never counts as background.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from custom_components.data.prepare import open_cached

__all__ = ["PatchDataset", "EpochSampler", "shard_entries"]

_PAD = {"image": 0, "label": 2, "sdm": 0, "tube": 0}


def shard_entries(entries: Sequence[dict], rank: int = 0, world_size: int = 1) -> list[dict]:
    """The volumes of one rank: entries ``rank, rank + world_size, ...``, so ranks see disjoint volumes."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
    shard = list(entries)[rank::world_size]
    if not shard:
        raise ValueError(f"rank {rank} of {world_size} gets no training volume ({len(entries)} volumes).")
    if world_size > 1:
        # one write of the whole line: print() writes text and newline separately, and two ranks sharing a
        # pipe could interleave between them
        sys.stdout.write(f"[rank {rank}/{world_size}] training volumes: {[str(e['id']) for e in shard]}\n")
        sys.stdout.flush()
    return shard


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for ``i < length``; ``set_epoch`` is called at every epoch start."""

    def __init__(self, length: int):
        if length < 1:
            raise ValueError(f"sampler length must be >= 1, got {length}.")
        self.length = int(length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in range(self.length)])

    def __len__(self) -> int:
        return self.length


class PatchDataset(Dataset):
    """Random patches from cached volumes; ``dataset[(epoch, i)]`` -> dict of CHW uint8/float16 tensors.

    Args:
        entries: prepared datalist entries (each with ``cache``, the folder ``prepare_cache`` wrote).
        patch_size: output patch (Z, Y, X) after device-side augmentation.
        margin: extra voxels per side read for the spatial augmentation.
        fg_fraction: probability that a patch is centred on a label-1 voxel.
        samples_per_epoch: number of samples per epoch (``iterations_per_epoch * batch_size``).
        seed: base seed.
        keys: which cached arrays to return (``image`` always).
    """

    def __init__(
        self,
        entries: Sequence[dict],
        patch_size: Sequence[int],
        margin: int | Sequence[int] = 0,
        fg_fraction: float = 1 / 3,
        samples_per_epoch: int = 100,
        seed: int = 0,
        keys: Sequence[str] = ("image", "label", "sdm", "tube"),
    ):
        if not entries:
            raise ValueError("PatchDataset needs at least one prepared volume, got none.")
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}.")
        self.entries = list(entries)
        self.patch_size = [int(s) for s in patch_size]
        m = [int(margin)] * 3 if np.isscalar(margin) else [int(v) for v in margin]
        self.read_size = [p + 2 * mm for p, mm in zip(self.patch_size, m)]
        self.fg_fraction = float(fg_fraction)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.keys = list(keys)
        self._volumes: dict[int, dict] = {}  # memory maps, opened lazily in each worker

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _volume(self, k: int) -> dict:
        if k not in self._volumes:
            self._volumes[k] = open_cached(self.entries[k]["cache"])
        return self._volumes[k]

    def crop_origin(self, rng: np.random.Generator, vol: dict) -> list[int]:
        """Top-left corner of the read window (may lie outside the volume; padded then)."""
        shape = vol["shape"]
        if len(vol["fg"]) and rng.random() < self.fg_fraction:
            centre = vol["fg"][rng.integers(len(vol["fg"]))]
        else:
            centre = [rng.integers(0, s) for s in shape]
        # keep the patch proper (not the margin) inside the volume where the volume is large enough
        origin = []
        for c, s, r, p in zip(centre, shape, self.read_size, self.patch_size):
            lo = int(c) - r // 2
            mlo, mhi = -(r - p) // 2, s - p - (r - p) // 2
            origin.append(int(np.clip(lo, mlo, max(mlo, mhi))))
        return origin

    def __getitem__(self, index) -> dict:
        epoch, i = index if isinstance(index, tuple) else (0, int(index))
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        k = int(rng.integers(len(self.entries)))
        vol = self._volume(k)
        origin = self.crop_origin(rng, vol)
        src, dst = [], []
        for o, r, s in zip(origin, self.read_size, vol["shape"]):
            a, b = max(o, 0), min(o + r, s)
            src.append(slice(a, b))
            dst.append(slice(a - o, b - o))
        out = {"id": str(self.entries[k]["id"]), "origin": torch.tensor(origin)}
        for key in self.keys:
            arr = vol[key]
            patch = np.full(self.read_size, _PAD[key], dtype=arr.dtype)
            patch[tuple(dst)] = arr[tuple(src)]
            out[key] = torch.from_numpy(patch)[None]
        return out
