"""Dictionary versions of the post-processing transforms (MONAI's ``...d`` convention)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection

from ._base import DEFAULT_MIN_SIZE, _VolumeTransformd, _restore, _to_volume
from .height_map import HeightMapFill
from .morphology import BinaryClosing, BinaryMedian, FillHoles, PlugHoles, RemoveSmallComponents
from .threshold import Binarize, GaussianSmooth
from .tunnels import TunnelRepair
from .unmerge import Unmerge

class Binarized(_VolumeTransformd):
    """Dictionary version of ``Binarize``."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, hysteresis_low: float | None = None,
                 connectivity: int = 26, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = Binarize(threshold, hysteresis_low, connectivity)


class RemoveSmallComponentsd(_VolumeTransformd):
    """Dictionary version of ``RemoveSmallComponents``."""

    def __init__(self, keys: KeysCollection, min_size: int | None = DEFAULT_MIN_SIZE, connectivity: int = 26,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = RemoveSmallComponents(min_size, connectivity)


class BinaryClosingd(_VolumeTransformd):
    """Dictionary version of ``BinaryClosing``."""

    def __init__(self, keys: KeysCollection, radius: int | None = 1, structure: str = "cube",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = BinaryClosing(radius, structure)


class FillHolesd(_VolumeTransformd):
    """Dictionary version of ``FillHoles``."""

    def __init__(self, keys: KeysCollection, max_hole_size: int | None = None, connectivity: int = 6,
                 enabled: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = FillHoles(max_hole_size, connectivity, enabled)


class GaussianSmoothd(_VolumeTransformd):
    """Dictionary version of ``GaussianSmooth`` (float32 back)."""

    def __init__(self, keys: KeysCollection, sigma: float | None = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = GaussianSmooth(sigma)


class BinaryMediand(_VolumeTransformd):
    """Dictionary version of ``BinaryMedian``."""

    def __init__(self, keys: KeysCollection, iterations: int | None = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = BinaryMedian(iterations)


class PlugHolesd(_VolumeTransformd):
    """Dictionary version of ``PlugHoles``."""

    def __init__(self, keys: KeysCollection, enabled: bool = True, min_axes: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = PlugHoles(enabled, min_axes)


class HeightMapFilld(_VolumeTransformd):
    """Dictionary version of ``HeightMapFill``."""

    def __init__(self, keys: KeysCollection, max_hole_area: int | None = 5000, min_hole_area: int = 2,
                 min_component_size: int = 500, enabled: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = HeightMapFill(max_hole_area, min_hole_area, min_component_size, enabled)


class TunnelRepaird(_VolumeTransformd):
    """Dictionary version of ``TunnelRepair``."""

    def __init__(self, keys: KeysCollection, chunk: int = 32, radius: int = 1, structure: str = "cube",
                 enabled: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = TunnelRepair(chunk, radius, structure, enabled)


class Unmerged(_VolumeTransformd):
    """Dictionary version of ``Unmerge``: with ``prob_key``, each key holds a mask and ``d[prob_key]`` the
    probability map; without, each key holds the probability map (mask = ``p > threshold``)."""

    def __init__(self, keys: KeysCollection, prob_key: Hashable | None = None,
                 levels: Sequence[float] = (0.6, 0.7, 0.8, 0.9), min_size: int = 1000,
                 multi_valued_fraction: float = 0.1, threshold: float = 0.5, enabled: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.transform = Unmerge(levels, min_size, multi_valued_fraction, threshold, enabled)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.prob_key is None:
            return super().__call__(data)
        d = dict(data)
        prob = _to_volume(d[self.prob_key], f"Unmerged: {self.prob_key!r}")
        for key in self.key_iterator(d):
            mask = _to_volume(d[key], f"Unmerged: {key!r}")
            if mask.shape != prob.shape:
                raise ValueError(f"Unmerged: {key!r} has shape {list(mask.shape)}, {self.prob_key!r} {list(prob.shape)}.")
            d[key] = _restore(self.transform.apply_volume(mask, prob=prob), d[key])
        return d
