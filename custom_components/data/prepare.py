"""The prepare step: TIFF volumes -> a cache of memory-mappable arrays and every deterministic loss target.

Per volume ``<cache_dir>/<id>/`` holds ``image.npy`` (uint8), ``label.npy`` (uint8), ``sdm.npy``
(float16, signed distance map of label 1 clipped to +-``sdm_clip``), ``tube.npy`` (uint8, the
medial-surface tube of label 1), ``fg.npy`` (int32 (N, 3), up to ``max_fg_points`` voxel coordinates of
label 1 for foreground oversampling) and ``meta.json``, written last: a volume is complete only when
its ``meta.json`` exists and every array matches the shape and dtype it records. Each array is written
to a temporary file, fsynced and renamed, so a crash never leaves a file that looks complete.

Nothing that depends only on the label is computed again in the training loop. The step is parallel
(process pool), resumable (complete volumes are skipped), shows a progress bar that moves as volumes
finish (completion order, ``custom_components.progress``), and reports by name, skips and counts sources
that cannot be read; the returned entries and the reports keep the order of the entries.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from custom_components.atomic import atomic_write_json
from custom_components.progress import advance, progress_bar

__all__ = ["CACHE_VERSION", "prepare_cache", "prepare_volume", "open_cached", "is_complete", "CacheError"]

CACHE_VERSION = 1
ARRAYS = {"image": "uint8", "label": "uint8", "sdm": "float16", "tube": "uint8"}
logger = logging.getLogger("vesuvius.prepare")


class CacheError(ValueError):
    """A cached volume is missing or damaged (it will be rebuilt by ``prepare_cache``)."""


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _source_stamp(path: str) -> list:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime)]


def _read_meta(vol_dir: Path) -> dict | None:
    try:
        return json.loads((vol_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(vol_dir: Path, entry: dict | None = None, settings: dict | None = None) -> bool:
    """True when ``vol_dir`` holds a complete cache for ``entry`` made with ``settings``."""
    try:
        open_cached(vol_dir, entry=entry, settings=settings)
        return True
    except CacheError:
        return False


def open_cached(vol_dir: str | Path, entry: dict | None = None, settings: dict | None = None) -> dict:
    """Memory-map a cached volume, checking each file's header and size against ``meta.json``.

    Returns ``{"id", "shape", "image", "label", "sdm", "tube", "fg", "meta"}`` with read-only memory
    maps. Raises ``CacheError`` naming the file and the problem. (A file truncated *while* it is
    memory-mapped kills the process with SIGBUS; that case cannot be caught here.)
    """
    vol_dir = Path(vol_dir)
    meta = _read_meta(vol_dir)
    if meta is None:
        raise CacheError(f"{vol_dir / 'meta.json'}: missing or unreadable (volume not prepared).")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{vol_dir / 'meta.json'}: cache version {meta.get('version')}, expected {CACHE_VERSION}.")
    if settings is not None and meta.get("settings") != settings:
        raise CacheError(f"{vol_dir / 'meta.json'}: made with settings {meta.get('settings')}, now {settings}.")
    if entry is not None:
        for key in ("image", "label"):
            src = entry.get(key)
            if src and os.path.exists(src) and meta.get("source", {}).get(key) != _source_stamp(src):
                raise CacheError(f"{vol_dir}: source {src} changed since it was cached.")
    shape = tuple(meta["shape"])
    out = {"id": meta["id"], "shape": shape, "meta": meta}
    for name, dtype in ARRAYS.items():
        path = vol_dir / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: cannot be memory-mapped ({e}).") from e
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise CacheError(f"{path}: holds {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}.")
        header = arr.offset if hasattr(arr, "offset") else 0
        expected = header + arr.nbytes
        if path.stat().st_size < expected:
            raise CacheError(f"{path}: truncated ({path.stat().st_size} bytes, expected {expected}).")
        out[name] = arr
    try:
        out["fg"] = np.load(vol_dir / "fg.npy")
    except (OSError, ValueError) as e:
        raise CacheError(f"{vol_dir / 'fg.npy'}: unreadable ({e}).") from e
    return out


def prepare_volume(entry: dict, cache_dir: str | Path, settings: dict) -> str:
    """Cache one volume (see module docstring); returns its folder. Raises ``ValueError`` naming the file."""
    from custom_components.data.io import read_volume
    from custom_components.data.targets import medial_surface_tube, signed_distance_map

    vol_dir = Path(cache_dir) / str(entry["id"])
    vol_dir.mkdir(parents=True, exist_ok=True)
    (vol_dir / "meta.json").unlink(missing_ok=True)  # incomplete from here until meta.json is written last
    image = np.asarray(read_volume(entry["image"]))
    label = np.asarray(read_volume(entry["label"])) if entry.get("label") else np.full(image.shape, 2, np.uint8)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"{entry['image']}: expected a 3D uint8 volume, got {image.dtype}{list(image.shape)}.")
    if label.shape != image.shape:
        raise ValueError(f"{entry['label']}: label shape {list(label.shape)} != image shape {list(image.shape)}.")
    clip = float(settings["sdm_clip"])
    sdm = np.clip(signed_distance_map(label, clip=clip), -clip, clip).astype(np.float16)
    tube = medial_surface_tube(label, dilation=int(settings["tube_dilation"])).astype(np.uint8)
    fg = np.argwhere(label == 1).astype(np.int32)
    if len(fg) > settings["max_fg_points"]:
        rng = np.random.default_rng(0)
        fg = fg[np.sort(rng.choice(len(fg), settings["max_fg_points"], replace=False))]
    for name, arr in (("image", image), ("label", label), ("sdm", sdm), ("tube", tube), ("fg", fg)):
        _atomic_save(vol_dir / f"{name}.npy", arr)
    source = {k: _source_stamp(entry[k]) for k in ("image", "label") if entry.get(k)}
    meta = {
        "version": CACHE_VERSION,
        "id": str(entry["id"]),
        "shape": list(image.shape),
        "settings": settings,
        "source": source,
        "label_fraction": float((label == 1).mean()),
        "unlabeled_fraction": float((label == 2).mean()),
    }
    atomic_write_json(vol_dir / "meta.json", meta, indent=1)
    return str(vol_dir)


def _prepare_one(args):
    entry, cache_dir, settings = args
    try:
        return entry["id"], prepare_volume(entry, cache_dir, settings), None
    except Exception as e:  # reported by name, skipped and counted by the caller
        return entry["id"], None, f"{entry.get('image')}: {e}"


def prepare_cache(
    entries: list[dict],
    cache_dir: str | Path,
    sdm_clip: float = 8.0,
    tube_dilation: int = 1,
    max_fg_points: int = 20000,
    workers: int = 2,
    min_volumes: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Cache every entry (``{"id", "image", "label"}``) not cached yet; return entries with ``cache``.

    Unreadable sources are logged by name and skipped; ``ValueError`` if fewer than ``min_volumes``
    remain. Returned entries keep their keys and gain ``cache`` (the folder) and ``shape``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"sdm_clip": float(sdm_clip), "tube_dilation": int(tube_dilation), "max_fg_points": int(max_fg_points)}
    todo = [e for e in entries if not is_complete(cache_dir / str(e["id"]), e, settings)]
    failures: dict[str, str] = {}
    if todo:
        jobs = [(e, str(cache_dir), settings) for e in todo]
        desc = f"prepare cache ({len(entries) - len(todo)} already cached)"
        with progress_bar(len(jobs), desc, progress) as bar:
            if workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                    futures = [pool.submit(_prepare_one, job) for job in jobs]
                    for f in as_completed(futures):  # the bar moves as volumes finish, whatever their order
                        vid, _, err = f.result()
                        if err:
                            failures[str(vid)] = err
                        advance(bar, vid)
            else:
                for job in jobs:
                    vid, _, err = _prepare_one(job)
                    if err:
                        failures[str(vid)] = err
                    advance(bar, vid)
        order = {str(e["id"]): i for i, e in enumerate(entries)}
        failures = dict(sorted(failures.items(), key=lambda kv: order[kv[0]]))  # reported in entry order
    for msg in failures.values():
        logger.warning("skipped volume, cannot be prepared: %s", msg)
    out = []
    for e in entries:
        if str(e["id"]) in failures:
            continue
        cached = open_cached(cache_dir / str(e["id"]))
        out.append({**e, "cache": str(cache_dir / str(e["id"])), "shape": list(cached["shape"])})
    if failures:
        logger.warning("%d of %d volumes skipped; %d remain.", len(failures), len(entries), len(out))
    if len(out) < min_volumes:
        raise ValueError(
            f"only {len(out)} of {len(entries)} volumes could be prepared (need {min_volumes}): "
            + "; ".join(failures.values())
        )
    return out
