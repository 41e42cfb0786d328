"""The Betti-Matching-3D extension (Stucki et al. 2024, "Efficient Betti Matching Enables Topology-Aware 3D
Segmentation via Persistent Homology") shipped as a compiled module inside the PyPI package ``topolosses``.

``topolosses``' package ``__init__`` imports torchvision / OpenCV (docs/CONVENTIONS.md), so the extension
``topolosses/losses/betti_matching/src/betti_matching*.so`` is loaded here by file path and ``topolosses``
itself is never imported: the package folder comes from ``importlib.util.find_spec("topolosses")``
(which locates a package without executing it) or, failing that, from the site-packages folders; the
module from ``spec_from_file_location`` + ``module_from_spec`` + ``exec_module``.

The extension (pybind11) exposes ``compute_matching(input1, input2)`` on two float arrays of one shape
(a V-construction cubical complex: values on voxels, a cube takes the max of its vertices; sublevel
filtration) and returns a ``BettiMatchingResult`` whose ``num_matched``, ``num_unmatched_input1``,
``num_unmatched_input2`` are int64 arrays over dimensions 0, 1, 2 (finite persistence pairs only).
``betti_counts`` turns one matching into the counts of the competition's TopoScore (docs/METRIC.md):
the matched pairs from ``compute_matching(..., include_input1_unmatched_pairs=False,
include_input2_unmatched_pairs=False)`` (the extension then skips collecting the unmatched pairs, most of
its time when a prediction has many small components or loops) and the pairs of each input from
``finite_pair_counts``, which counts them without persistence: for a binary image the finite pairs of the
sublevel filtration are the homology of the foreground complex K (the box itself is contractible), so

    p_0 = b_0(K) - 1,   p_1 = b_1(K),   p_2 = b_2(K)          (all zeros for an empty foreground)

with b_0 the 6-connected foreground components (``cc3d``; the V-construction joins 6-neighbours),
b_2 the 26-connected background components that do not touch the box's faces (Alexander duality: the
cavities), and b_1 = b_0 + b_2 - chi from the Euler characteristic chi = V - E + F - C of K (voxels,
and the edges, squares and cubes whose voxels are all foreground). ``betti_counts_reference`` takes all
three counts from the extension; tests/test_metrics.py checks both ways agree.
This module imports only numpy and cc3d, so that worker processes (``tile_counts``) start light.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import site
import sys

import numpy as np

__all__ = ["load_extension", "find_extension", "finite_pair_counts", "betti_counts", "betti_counts_reference",
           "tile_counts"]

INSTALL_HINT = "pip install --no-deps topolosses==0.2.0"
_RELATIVE = os.path.join("losses", "betti_matching", "src")
_PATTERN = "betti_matching*.so"


def _package_dirs() -> list[str]:
    """Candidate ``topolosses`` folders: the import system's answer first, then every site-packages."""
    dirs: list[str] = []
    try:
        spec = importlib.util.find_spec("topolosses")  # finds the package; does not run its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(spec.submodule_search_locations)
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some embedded interpreters lack them
        pass
    for root in roots:
        cand = os.path.join(root, "topolosses")
        if root and os.path.isdir(cand) and cand not in dirs:
            dirs.append(cand)
    return dirs


def find_extension() -> str:
    """Path of ``topolosses/losses/betti_matching/src/betti_matching*.so``; ``ImportError`` with the
    install command when the package or the compiled file is missing."""
    dirs = _package_dirs()
    if not dirs:
        raise ImportError(
            f"The package 'topolosses' (Betti-Matching-3D extension of the TopoScore) is not installed; install it "
            f"with `{INSTALL_HINT}` (--no-deps: its dependencies would replace torch)."
        )
    for d in dirs:
        found = sorted(glob.glob(os.path.join(d, _RELATIVE, _PATTERN)))
        if found:
            return found[0]
    where = ", ".join(os.path.join(d, _RELATIVE, _PATTERN) for d in dirs)
    raise ImportError(f"No compiled Betti-matching extension matches {where}; reinstall with `{INSTALL_HINT}`.")


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled ``betti_matching`` module, loaded once per process by file path (``topolosses`` is
    never imported). Raises ``ImportError`` naming ``pip install --no-deps topolosses==0.2.0`` when missing."""
    path = find_extension()
    spec = importlib.util.spec_from_file_location("betti_matching", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot load the Betti-matching extension {path}; reinstall with `{INSTALL_HINT}`.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise ImportError(f"Loading the Betti-matching extension {path} failed ({e}); reinstall with `{INSTALL_HINT}`.") from e
    return module


def _inverted(mask: np.ndarray) -> np.ndarray:
    """Foreground 0.0, background 1.0, float64 C-contiguous (the sublevel filtration's H0 = foreground)."""
    out = np.ones(mask.shape, np.float64)
    out[mask != 0] = 0.0
    return out


def _pad3(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64).reshape(-1)[:3]
    return np.pad(v, (0, 3 - v.size))


def finite_pair_counts(mask) -> np.ndarray:
    """(p_0, p_1, p_2): finite persistence pairs of the inverted binary ``mask`` (foreground 0, background 1,
    V-construction, sublevel filtration) by dimension, from its Betti numbers (module docstring)."""
    import cc3d

    f = np.ascontiguousarray(np.asarray(mask) != 0)
    if f.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {f.shape}.")
    if not f.any():
        return np.zeros(3, np.int64)
    _, b0 = cc3d.connected_components(f, connectivity=6, return_N=True)
    background, n_bg = cc3d.connected_components(~f, connectivity=26, return_N=True)
    faces = [background[0], background[-1], background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]]
    touching = np.unique(np.concatenate([face.ravel() for face in faces]))
    b2 = int(n_bg) - int(np.count_nonzero(touching))  # label 0 is the foreground itself
    ex, ey, ez = f[:, :, 1:] & f[:, :, :-1], f[:, 1:] & f[:, :-1], f[1:] & f[:-1]  # edges along x, y, z
    sq_yx = ex[:, 1:] & ex[:, :-1]
    squares = np.count_nonzero(sq_yx) + np.count_nonzero(ex[1:] & ex[:-1]) + np.count_nonzero(ey[1:] & ey[:-1])
    cubes = np.count_nonzero(sq_yx[1:] & sq_yx[:-1])
    chi = np.count_nonzero(f) - (np.count_nonzero(ex) + np.count_nonzero(ey) + np.count_nonzero(ez)) + squares - cubes
    return np.array([int(b0) - 1, int(b0) + b2 - int(chi), b2], np.int64)


def _check_tiles(pred_tile, label_tile) -> tuple[np.ndarray, np.ndarray]:
    pred_tile, label_tile = np.asarray(pred_tile), np.asarray(label_tile)
    if pred_tile.ndim != 3 or pred_tile.shape != label_tile.shape:
        raise ValueError(
            f"pred and label tiles must be 3D arrays of one shape, got pred {pred_tile.shape} and label {label_tile.shape}."
        )
    return pred_tile, label_tile


def betti_counts(pred_tile, label_tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, p, g): three int64 arrays over dimensions 0, 1, 2 of the Betti matching of (prediction, label).

    Inputs are masks of one 3D shape (any dtype, != 0 is foreground). Both are inverted to float64
    (foreground 0, background 1) and passed to ``compute_matching(prediction, label)`` in that order;
    m_k = matched pairs of dimension k, p_k / g_k = all finite pairs of the prediction / label
    (``finite_pair_counts``; = m_k + unmatched pairs: one sheet has p = (0, 0, 0)). An empty tile gives zeros.
    """
    pred_tile, label_tile = _check_tiles(pred_tile, label_tile)
    if pred_tile.size == 0:
        return np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64)
    result = load_extension().compute_matching(_inverted(pred_tile), _inverted(label_tile), False, False)
    return _pad3(result.num_matched), finite_pair_counts(pred_tile), finite_pair_counts(label_tile)


def betti_counts_reference(pred_tile, label_tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``betti_counts`` straight from the extension: p = m + unmatched prediction pairs, g = m + unmatched
    label pairs, as ``compute_matching`` reports them (the reference metric's path)."""
    pred_tile, label_tile = _check_tiles(pred_tile, label_tile)
    if pred_tile.size == 0:
        return np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64)
    result = load_extension().compute_matching(_inverted(pred_tile), _inverted(label_tile))
    m = _pad3(result.num_matched)
    return m, m + _pad3(result.num_unmatched_input1), m + _pad3(result.num_unmatched_input2)


def tile_counts(pred_tile, label_tile, reference: bool = False) -> tuple[np.ndarray, float, float]:
    """``((3, 3) int64 [m; p; g] by dimension, wall seconds, CPU seconds)`` of one tile (``betti_counts``,
    or ``betti_counts_reference`` when ``reference``): the job worker processes run (a top-level function
    of a light module, so it pickles under fork and spawn alike)."""
    import time

    t, c = time.perf_counter(), time.process_time()
    counts = np.stack((betti_counts_reference if reference else betti_counts)(pred_tile, label_tile))
    return counts, time.perf_counter() - t, time.process_time() - c
