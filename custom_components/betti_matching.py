"""The Betti-Matching-3D extension (Stucki et al. 2024, "Efficient Betti Matching Enables Topology-Aware 3D
Segmentation via Persistent Homology") shipped as a compiled module inside the PyPI package ``topolosses``.

``topolosses``' package ``__init__`` imports torchvision / OpenCV (docs/CONVENTIONS.md), so the extension
``topolosses/losses/betti_matching/src/betti_matching*.so`` is loaded here by file path: the package
folder comes from ``importlib.util.find_spec("topolosses")`` (which does not execute the package), the
module from ``spec_from_file_location``. ``betti_counts`` turns one matching into the counts of the
competition's TopoScore (shared/METRIC.md).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os

import numpy as np

__all__ = ["load_extension", "betti_counts"]

_INSTALL_HINT = "pip install --no-deps topolosses==0.2.0"


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled ``betti_matching`` module (loaded once per process, ``topolosses`` never imported).

    Raises ``ImportError`` telling how to install it when the package or the ``.so`` is missing.
    """
    try:
        spec = importlib.util.find_spec("topolosses")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The package 'topolosses' is not installed; install it with `{_INSTALL_HINT}` "
                          "(--no-deps: its dependencies would replace torch).")
    root = list(spec.submodule_search_locations)[0]
    pattern = os.path.join(root, "losses", "betti_matching", "src", "betti_matching*.so")
    found = sorted(glob.glob(pattern))
    if not found:
        raise ImportError(f"No Betti-matching extension matches {pattern}; reinstall with `{_INSTALL_HINT}`.")
    so_spec = importlib.util.spec_from_file_location("betti_matching", found[0])
    if so_spec is None or so_spec.loader is None:
        raise ImportError(f"Cannot load the Betti-matching extension {found[0]}; reinstall with `{_INSTALL_HINT}`.")
    module = importlib.util.module_from_spec(so_spec)
    so_spec.loader.exec_module(module)
    return module


def _pad3(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64).reshape(-1)[:3]
    return np.pad(v, (0, 3 - v.size))


def betti_counts(pred_tile: np.ndarray, label_tile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, p, g): three int64 arrays over dimensions 0, 1, 2 of the Betti matching of (pred, label).

    Inputs are binary masks of one 3D shape (any dtype, != 0 is foreground); they are inverted to
    float64 (foreground 0, background 1) so that the sublevel filtration's H0 counts foreground
    components. m_k = matched pairs of dimension k, p_k = m_k + unmatched prediction pairs,
    g_k = m_k + unmatched label pairs (finite persistence pairs only).
    """
    pred_tile, label_tile = np.asarray(pred_tile), np.asarray(label_tile)
    if pred_tile.shape != label_tile.shape or pred_tile.ndim != 3:
        raise ValueError(f"pred and label tiles must be 3D of one shape, got pred {pred_tile.shape} and label {label_tile.shape}.")
    zero = np.zeros(3, np.int64)
    if pred_tile.size == 0:
        return zero, zero.copy(), zero.copy()
    a = np.ascontiguousarray(np.where(pred_tile != 0, 0.0, 1.0), dtype=np.float64)
    b = np.ascontiguousarray(np.where(label_tile != 0, 0.0, 1.0), dtype=np.float64)
    result = load_extension().compute_matching([a], [b])[0]
    m = _pad3(result.num_matched)
    u1 = _pad3(result.num_unmatched_input1)
    u2 = _pad3(result.num_unmatched_input2)
    return m, m + u1, m + u2
