"""Shared pieces of the post-processing steps: array/tensor in and out, checks, the transform bases."""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

#: Default dust size in voxels. True sheets in a 320^3 crop span thousands to hundreds of thousands of
#: voxels; 64 (a 4^3 cube, or an 8 x 8 patch of a 1-voxel sheet) removes the speckle a network leaves
#: in the background while a sheet clipped by a corner of the crop almost always keeps more than that.
DEFAULT_MIN_SIZE = 64

_CONNECTIVITIES = (6, 18, 26)

def _to_volume(img, where: str) -> np.ndarray:
    """The (Z, Y, X) numpy view of ``img`` ((1, Z, Y, X) or (Z, Y, X), ndarray or tensor)."""
    shape = tuple(img.shape)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1):
        raise ValueError(
            f"{where}: expected a volume shaped (1, Z, Y, X) or (Z, Y, X), got shape {list(shape)}."
        )
    if isinstance(img, torch.Tensor):
        t = img.as_tensor() if isinstance(img, MetaTensor) else img
        t = t.detach()
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        arr = t.cpu().numpy()
    else:
        arr = np.asarray(img)
    return arr[0] if arr.ndim == 4 else arr


def _restore(out: np.ndarray, like, dtype=np.uint8) -> Any:
    """``out`` (Z, Y, X) as ``dtype`` in the type, shape and device of ``like`` (MetaTensor meta kept)."""
    out = np.ascontiguousarray(out, dtype=dtype).reshape(tuple(like.shape))
    if not isinstance(like, torch.Tensor):
        return out
    t = torch.from_numpy(out).to(like.device)
    if isinstance(like, MetaTensor):
        return MetaTensor(t, meta=like.meta, applied_operations=like.applied_operations)
    return t


def _mask(vol: np.ndarray) -> np.ndarray:
    """Foreground of a volume: ``!= 0`` with NaN as background (the metric's rule)."""
    if vol.dtype == bool:
        return vol
    m = vol != 0
    if np.issubdtype(vol.dtype, np.floating):
        m &= ~np.isnan(vol)
    return m


def _probability(vol: np.ndarray) -> np.ndarray:
    """float32 copy of a probability map (or mask) with NaN as 0."""
    return np.nan_to_num(np.asarray(vol, dtype=np.float32), nan=0.0)


def _check_connectivity(connectivity: int, name: str) -> int:
    if connectivity not in _CONNECTIVITIES:
        raise ValueError(f"{name} must be one of {list(_CONNECTIVITIES)}, got {connectivity!r}.")
    return int(connectivity)


def _check_int(value, name: str, low: int, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``low`` (None allowed when ``allow_none``); ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = f"an int >= {low}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def _plain(value):
    """JSON-friendly form of a stored setting (tuples as lists, numpy scalars as Python numbers)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _VolumeTransform(Transform):
    """A transform that maps a (Z, Y, X) numpy volume to a (Z, Y, X) 0/1 volume (``apply_volume``).

    Each subclass stores every constructor argument under its own name, so ``params()`` gives the
    step's settings (its entry in ``postprocess.json``). ``needs_probability``: ``apply_volume(mask,
    prob=...)`` also takes the pipeline's probability map. ``produces_probability``: returns a float map.
    """

    needs_probability = False
    produces_probability = False

    def apply_volume(self, vol: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def params(self) -> dict:
        """The settings of this step by constructor argument name (as stored, JSON-friendly)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: _plain(getattr(self, n)) for n in names}

    def __call__(self, img):
        out = self.apply_volume(_to_volume(img, type(self).__name__))
        return _restore(out, img, np.float32 if self.produces_probability else np.uint8)


class _VolumeTransformd(MapTransform):
    """Dictionary version of a ``_VolumeTransform``: applies ``self.transform`` to every key."""

    transform: _VolumeTransform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# --------------------------------------------------------------------------------------------- steps
