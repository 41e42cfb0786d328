"""Zarr input and output of whole-scroll inference (``zarr`` 3.x, Zarr formats 2 and 3, OME-Zarr written by us).

Input, ``PATH[::ARRAY]``: an array, or a group holding OME-Zarr ``multiscales`` metadata (0.4 in the group's
attributes, 0.5 under ``"ome"``) whose level ``level`` is read. The last three axes are (Z, Y, X); leading axes
(t, c) must have size 1. The voxel size is the level's ``scale`` (times the multiscale's own, if any), in
micrometres where the axes carry a unit. ``read_box`` reads one box, naming a chunk that is missing (a chunk
never written reads as the fill value, which in a scan means a silent hole) or cannot be decoded.

Output: a group with one OME multiscale image per product (``mask``, ``probabilities``; one level ``0``,
uint8, the input's shape, scale and translation), OME-Zarr 0.4 on Zarr format 2 and 0.5 on format 3; every
chunk is stored, all-zero ones included, so a missing chunk always means "not written". The ``ome-zarr``
package is not used (it pulls ~45 packages for this handful of attributes).

``tile_synthetic`` writes a test / benchmark input of any size by tiling synthetic volumes chunk by chunk
(the generator holds one whole volume in memory).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["InputVolume", "parse_input", "open_input", "read_box", "multiscales_of", "ome_image_attrs",
           "create_image", "tile_synthetic", "UNIT_UM", "require_zarr"]

logger = logging.getLogger("vesuvius.inference")

#: micrometres per unit of the OME-Zarr axes' ``unit`` (UDUNITS-2 names)
UNIT_UM = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "angstrom": 1e-4, "millimeter": 1e3,
           "centimeter": 1e4, "meter": 1e6}


def require_zarr():
    """``zarr`` 3.x, or a ValueError saying which extra installs it."""
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ValueError("whole-scroll inference needs zarr 3.x: pip install -e '.[zarr]'") from e
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ValueError(f"whole-scroll inference needs zarr 3.x, found {zarr.__version__}: pip install -e '.[zarr]'")
    return zarr


def parse_input(spec: str) -> tuple[str, str]:
    """``"PATH::ARRAY"`` -> ``(PATH, ARRAY)``; ``"PATH"`` -> ``(PATH, "")``."""
    path, _, inner = str(spec).partition("::")
    if not path:
        raise ValueError(f"--input {spec!r}: give a Zarr path, optionally followed by ::ARRAY (a path inside it).")
    return path, inner.strip("/")


def multiscales_of(attrs) -> list | None:
    """The ``multiscales`` list of a group's attributes: OME-Zarr 0.4 (top level) or 0.5 (under ``"ome"``)."""
    attrs = dict(attrs)
    if "multiscales" in attrs:
        return attrs["multiscales"]
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return ome["multiscales"]
    return None


def _transforms(items) -> tuple[list | None, list | None]:
    scale = translation = None
    for t in items or []:
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    return scale, translation


@dataclass
class InputVolume:
    """One 3D level of the input: ``array`` (zarr) read as (Z, Y, X) through ``lead`` leading zero indices."""

    spec: str
    array: object
    lead: int
    level: int | None
    voxel_size: tuple[float, float, float] | None = None  # per axis, in ``unit``
    unit: str | None = None
    translation: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[self.lead:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def storage_chunks(self) -> tuple[int, ...]:
        """The grid of stored objects (shards where the array is sharded), over all axes."""
        shards = getattr(self.array, "shards", None)
        return tuple(shards or self.array.chunks)

    def voxel_size_um(self) -> tuple[float, ...] | None:
        if self.voxel_size is None or self.unit not in UNIT_UM:
            return None
        return tuple(v * UNIT_UM[self.unit] for v in self.voxel_size)


def _open_node(zarr, path: str, inner: str):
    try:
        root = zarr.open(path, mode="r")
    except Exception as e:  # zarr raises several types for "nothing here"
        raise ValueError(f"--input {path}: not a Zarr array or group ({type(e).__name__}: {e}).") from e
    node = root
    if inner:
        if not hasattr(root, "members"):
            raise ValueError(f"--input {path}::{inner}: {path} is an array, not a group holding '{inner}'.")
        try:
            node = root[inner]
        except KeyError:
            names = sorted(k for k, _ in root.members(max_depth=None))
            raise ValueError(f"--input {path}::{inner}: no array or group '{inner}' in {path}; it holds {names}.") from None
    return root, node


def _parent_group(zarr, path: str, inner: str):
    """(group holding the array, the array's name in it), or (None, name) where there is none."""
    import os

    if inner:
        parent_path, _, name = inner.rpartition("/")
        try:
            parent = zarr.open_group(path, mode="r", path=parent_path or None)
        except Exception:
            return None, name
        return parent, name
    folder, name = os.path.split(os.path.normpath(path))
    if not folder:
        return None, name
    try:  # PATH names the level array itself (scroll.zarr/0): its folder may be the multiscale group
        return zarr.open_group(folder, mode="r"), name
    except Exception:
        return None, name


def open_input(spec: str, level: int = 0) -> InputVolume:
    """The input of ``--input PATH[::ARRAY]`` (module docstring); ``level`` picks the multiscale level."""
    zarr = require_zarr()
    path, inner = parse_input(spec)
    root, node = _open_node(zarr, path, inner)
    voxel = translation = unit = None
    chosen_level = None
    notes: list[str] = []
    multiscale = None
    if isinstance(node, zarr.Group):
        ms = multiscales_of(node.attrs)
        if not ms:
            arrays = sorted(k for k, _ in node.arrays())
            raise ValueError(f"--input {spec}: a group without OME-Zarr multiscales metadata; name one of its arrays "
                             f"as {path}::ARRAY (it holds {arrays}).")
        multiscale = ms[0]
        datasets = multiscale.get("datasets", [])
        if not 0 <= level < len(datasets):
            raise ValueError(f"--input {spec}: --level {level} does not exist; the multiscale has levels "
                             f"0..{len(datasets) - 1} ({[d.get('path') for d in datasets]}).")
        dataset = datasets[level]
        array = node[dataset["path"]]
        chosen_level = level
    else:
        array = node
        parent, name = _parent_group(zarr, path, inner)
        ms = multiscales_of(parent.attrs) if parent is not None else None
        dataset = None
        if ms:
            for i, d in enumerate(ms[0].get("datasets", [])):
                if d.get("path") == name:
                    multiscale, dataset, chosen_level = ms[0], d, i
    if array.ndim < 3:
        raise ValueError(f"--input {spec}: array of shape {list(array.shape)}; a volume needs 3 axes (Z, Y, X).")
    lead = array.ndim - 3
    if any(n != 1 for n in array.shape[:lead]):
        raise ValueError(f"--input {spec}: array of shape {list(array.shape)}; axes before (Z, Y, X) must have size 1.")
    if multiscale is not None and dataset is not None:
        scale, trans = _transforms(dataset.get("coordinateTransformations"))
        gscale, gtrans = _transforms(multiscale.get("coordinateTransformations"))
        if scale is not None:
            s = np.asarray(scale[-3:]) * (np.asarray(gscale[-3:]) if gscale else 1.0)
            voxel = tuple(float(v) for v in s)
            t = np.asarray(trans[-3:]) if trans else np.zeros(3)
            if gscale:
                t = t * np.asarray(gscale[-3:])
            if gtrans:
                t = t + np.asarray(gtrans[-3:])
            translation = tuple(float(v) for v in t) if (trans or gtrans) else None
        axes = multiscale.get("axes") or []
        units = {a.get("unit") for a in axes[-3:] if isinstance(a, dict)}
        unit = units.pop() if len(units) == 1 else None
        if voxel is not None and unit is None:
            notes.append(f"axes carry no common unit ({[a.get('unit') if isinstance(a, dict) else a for a in axes]})")
    else:
        notes.append("no OME-Zarr multiscales metadata: voxel size unknown")
    return InputVolume(spec=spec, array=array, lead=lead, level=chosen_level, voxel_size=voxel, unit=unit,
                       translation=translation, notes=notes)


def _chunk_keys(vol: InputVolume, box) -> list[tuple[str, tuple[slice, ...]]]:
    """(store key, voxel slices) of every stored object the box touches."""
    grid = vol.storage_chunks[vol.lead:]
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, grid)]
    out = []
    for idx in itertools.product(*ranges):
        coords = (0,) * vol.lead + tuple(idx)
        key = vol.array.metadata.encode_chunk_key(coords)
        out.append((key, tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, grid, vol.shape))))
    return out


def _describe(key: str, voxels) -> str:
    return f"chunk '{key}' (voxels z {voxels[0].start}:{voxels[0].stop}, y {voxels[1].start}:{voxels[1].stop}, " \
           f"x {voxels[2].start}:{voxels[2].stop})"


def missing_chunks(vol: InputVolume, box) -> list[str]:
    """The stored objects under ``box`` that do not exist, described (key and voxels)."""
    from zarr.core.sync import sync

    sp = vol.array.store_path
    keys = _chunk_keys(vol, box)
    full = [f"{sp.path}/{k}" if sp.path else k for k, _ in keys]

    async def _exists():
        return await asyncio.gather(*[sp.store.exists(k) for k in full])

    found = sync(_exists())
    return [_describe(k, v) for (k, v), ok in zip(keys, found) if not ok]


def read_box(vol: InputVolume, box, missing: str = "error") -> np.ndarray:
    """The input voxels of ``box`` ((start, stop) per axis), in the array's dtype.

    ``missing="error"``: a chunk that was never written raises a ValueError naming it (``"fill"`` reads it as
    the array's fill value, as zarr does). A chunk that fails to decode raises a ValueError naming it."""
    if missing not in ("error", "fill"):
        raise ValueError(f"missing_chunks must be 'error' or 'fill', got {missing!r}.")
    if missing == "error":
        gone = missing_chunks(vol, box)
        if gone:
            raise ValueError(f"input {vol.spec}: {len(gone)} chunk(s) missing: {'; '.join(gone[:5])}"
                             f"{' ...' if len(gone) > 5 else ''}. A chunk never written reads as the fill value; "
                             "if that is intended (arrays written with write_empty_chunks=False omit empty chunks), "
                             "give --missing_chunks fill.")
    index = (0,) * vol.lead + tuple(slice(a, b) for a, b in box)
    try:
        return np.asarray(vol.array[index])
    except Exception as e:
        bad = []
        for key, voxels in _chunk_keys(vol, box):
            try:
                vol.array[(0,) * vol.lead + voxels]
            except Exception as inner:
                bad.append(f"{_describe(key, voxels)}: {type(inner).__name__}: {inner}")
        what = "; ".join(bad[:5]) if bad else f"{type(e).__name__}: {e}"
        raise ValueError(f"input {vol.spec}: cannot read voxels {list(box)}: {what}") from e


def ome_image_attrs(name: str, zarr_format: int, voxel_size=None, unit: str | None = None, translation=None) -> dict:
    """The attributes of a one-level OME multiscale image group (level path ``"0"``): OME-Zarr 0.4 for Zarr
    format 2, 0.5 (under ``"ome"``) for format 3. Unknown voxel size: scale 1."""
    axes = []
    for a in "zyx":
        axis = {"name": a, "type": "space"}
        if unit:
            axis["unit"] = unit
        axes.append(axis)
    transforms = [{"type": "scale", "scale": [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))]}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": [float(v) for v in translation]})
    multiscale = {"name": name, "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def create_image(group, name: str, shape, chunks, zarr_format: int, voxel_size=None, unit=None, translation=None):
    """Group ``name`` of ``group`` as a one-level OME image: a uint8 array ``0`` of ``shape`` and ``chunks``,
    fill 0, every chunk stored (also all-zero ones); returns the array."""
    image = group.create_group(name, attributes=ome_image_attrs(name, zarr_format, voxel_size, unit, translation))
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    if zarr_format == 3:
        kw["dimension_names"] = ["z", "y", "x"]
    return image.create_array("0", shape=tuple(shape), chunks=tuple(chunks), dtype="uint8", fill_value=0,
                              config={"write_empty_chunks": True}, **kw)


def tile_synthetic(path: str, shape: Sequence[int], tile: int = 64, chunks: Sequence[int] | int = 32, seed: int = 0,
                   zarr_format: int = 3, voxel_size_um: float | None = None, dtype: str = "uint8",
                   scale: float = 1.0, profile: str = "34117") -> str:
    """An input of ``shape`` at ``path``: synthetic scroll volumes of ``tile``^3 (``generate_volume``, seed
    ``(seed, tile index)``) written tile by tile, so memory holds one tile; each tile a multiple of ``chunks``.

    ``voxel_size_um``: written as a one-level OME multiscale group (``path`` then names the group, level
    ``0`` the array), else a bare array. ``dtype``/``scale``: the uint8 image times ``scale``, as ``dtype``
    (a uint16 scan: ``dtype="uint16", scale=257``). Returns ``path``."""
    zarr = require_zarr()
    from custom_components.data.synthetic import generate_volume

    shape = tuple(int(n) for n in shape)
    chunks = (int(chunks),) * 3 if isinstance(chunks, (int, np.integer)) else tuple(int(c) for c in chunks)
    if any(tile % c for c in chunks):
        raise ValueError(f"tile_synthetic: tile {tile} must be a multiple of the chunks {list(chunks)}.")
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    if voxel_size_um is not None:
        group = zarr.open_group(path, mode="w", zarr_format=zarr_format,
                                attributes=ome_image_attrs("image", zarr_format, (voxel_size_um,) * 3, "micrometer"))
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                   config={"write_empty_chunks": True}, **kw)
    else:
        array = zarr.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, zarr_format=zarr_format,
                                  config={"write_empty_chunks": True}, overwrite=True, **kw)
    counts = [math.ceil(n / tile) for n in shape]
    for i, idx in enumerate(itertools.product(*[range(c) for c in counts])):
        image, _, _ = generate_volume((tile,) * 3, seed=[seed, i], profile=profile)
        box = tuple(slice(k * tile, min((k + 1) * tile, n)) for k, n in zip(idx, shape))
        part = image[tuple(slice(0, s.stop - s.start) for s in box)]
        array[box] = (part.astype(np.float64) * scale).round().astype(dtype) if scale != 1.0 or dtype != "uint8" else part
    return path
