"""Shared fixtures: ``tiny_dataset``, a valid Kaggle-layout dataset of 16^3 uint8 TIFFs written with tifffile.

Layout (ids and scrolls fixed, values from ``numpy.random.default_rng(0)``)::

    train.csv                       id,scroll_id: 1001,34117 / 1002,34117 / 1003,35360
    train_images/<id>.tif           uint8 (16, 16, 16), LZW multi-page
    train_labels/<id>.tif           0 background, 1 on a 2-voxel-thick sheet (rows z = 6 + i, 7 + i of
                                    the interior), 2 on a 1-voxel border of every face and a 3x3x3 block
    test_images/2001.tif            uint8 (16, 16, 16); no test_labels/
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_SHAPE = (16, 16, 16)
TINY_TRAIN = (("1001", "34117"), ("1002", "34117"), ("1003", "35360"))
TINY_TEST = ("2001",)


def write_tiff(path, array, compression="lzw") -> Path:
    """Write ``array`` as a multi-page TIFF with tifffile (no project code)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(array), compression=compression, photometric="minisblack")
    return path


def tiny_label(index: int, shape=TINY_SHAPE) -> np.ndarray:
    """Label volume ``index``: border 2, a 2-voxel sheet of 1 at z = 6 + index, 7 + index, a 3^3 block of 2."""
    lab = np.zeros(shape, np.uint8)
    lab[6 + index : 8 + index, 2:-2, 2:-2] = 1
    lab[2:5, 2:5, 2:5] = 2
    lab[0, :, :] = lab[-1, :, :] = 2
    lab[:, 0, :] = lab[:, -1, :] = 2
    lab[:, :, 0] = lab[:, :, -1] = 2
    return lab


def tiny_image(rng: np.random.Generator, label: np.ndarray | None = None, shape=TINY_SHAPE) -> np.ndarray:
    """Noise in 0..99, brighter (150..249) on the label's surface voxels."""
    img = rng.integers(0, 100, size=shape, dtype=np.uint8)
    if label is not None:
        img[label == 1] += 150
    return img


def write_tiny_dataset(root, shape=TINY_SHAPE, test_labels: bool = False) -> Path:
    """Write the dataset of the module docstring under ``root``; returns ``root`` as a Path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["id,scroll_id"]
    for i, (vid, scroll) in enumerate(TINY_TRAIN):
        lab = tiny_label(i, shape)
        write_tiff(root / "train_images" / f"{vid}.tif", tiny_image(rng, lab, shape))
        write_tiff(root / "train_labels" / f"{vid}.tif", lab)
        lines.append(f"{vid},{scroll}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for j, vid in enumerate(TINY_TEST):
        lab = tiny_label(j, shape)
        write_tiff(root / "test_images" / f"{vid}.tif", tiny_image(rng, lab, shape))
        if test_labels:
            write_tiff(root / "test_labels" / f"{vid}.tif", lab)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """A valid tiny dataset (module docstring) in ``tmp_path / "data"``; returns its root (a Path)."""
    return write_tiny_dataset(tmp_path / "data")
