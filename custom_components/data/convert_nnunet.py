"""Conversion of a Kaggle-layout dataset to the nnU-Net v2 "raw" format (for the host's baseline).

``python -m custom_components.data.convert_nnunet --data_root DIR --out DIR [--dataset_id 101 --name VesuviusSurface]``
writes ``OUT/DatasetXXX_Name/``::

    imagesTr/<id>_0000.nii.gz   labelsTr/<id>.nii.gz   imagesTs/<id>_0000.nii.gz
    (labelsTs/<id>.nii.gz when test_labels/ exists)   dataset.json

``dataset.json``: ``channel_names {"0": "CT"}``, ``labels {"background": 0, "surface": 1, "ignore": 2}``
(nnU-Net's ignore label must be the highest), ``numTraining``, ``file_ending ".nii.gz"``.
The NIfTI files hold the TIFF arrays unchanged (uint8, identity affine: spacing 1, 1, 1; axis
convention in ``custom_components.data.io``). The case identifier is the Kaggle id. The dataset is checked
first (``validate_data.check_or_raise`` on headers); files are written atomically, with a progress bar on
stderr (on a terminal).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from custom_components.atomic import atomic_write_json

__all__ = ["dataset_folder_name", "dataset_json", "convert", "main"]

LABELS = {"background": 0, "surface": 1, "ignore": 2}


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name``; ``ValueError`` unless 1 <= dataset_id <= 999 and name is [A-Za-z0-9_-]+."""
    if isinstance(dataset_id, bool) or int(dataset_id) != dataset_id or not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net's three digits), got {dataset_id!r}.")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}.")
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_json(num_training: int, name: str = "VesuviusSurface") -> dict:
    """The ``dataset.json`` nnU-Net v2 reads."""
    return {
        "name": name,
        "description": "Vesuvius Challenge surface detection: papyrus recto surface in scroll CT (uint8).",
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
    }


def _convert_one(src: str, dst: str) -> str:
    from custom_components.data.io import read_volume, write_volume

    write_volume(dst, read_volume(src))
    return dst


def convert(
    data_root,
    out,
    dataset_id: int = 101,
    name: str = "VesuviusSurface",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write the nnU-Net v2 raw dataset of ``data_root`` under ``out``; returns the ``DatasetXXX_Name`` folder.

    An existing non-empty dataset folder is refused unless ``overwrite`` (then its files are replaced
    and case files of ids no longer in the dataset are removed). ``workers`` threads convert in parallel
    (default ``min(8, cpu_count)``; gzip and LZW release the GIL). A progress bar on stderr
    (``custom_components.progress``; none with ``progress=False`` or without a terminal) counts the files
    as they finish.
    """
    from custom_components.data.validate_data import check_or_raise, read_train_csv
    from custom_components.progress import advance, progress_bar

    root = os.fspath(data_root)
    folder = os.path.join(os.fspath(out), dataset_folder_name(dataset_id, name))
    check_or_raise(root, check_test=True, decode=False, progress=progress)
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise ValueError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    rows, _ = read_train_csv(os.path.join(root, "train.csv"))
    jobs: list[tuple[str, str]] = []
    for r in rows:
        vid = r["id"]
        jobs.append((os.path.join(root, "train_images", f"{vid}.tif"), os.path.join(folder, "imagesTr", f"{vid}_0000.nii.gz")))
        jobs.append((os.path.join(root, "train_labels", f"{vid}.tif"), os.path.join(folder, "labelsTr", f"{vid}.nii.gz")))
    test_dir = os.path.join(root, "test_images")
    if os.path.isdir(test_dir):
        for fname in sorted(os.listdir(test_dir)):
            if fname.startswith(".") or not fname.lower().endswith((".tif", ".tiff")):
                continue
            vid = os.path.splitext(fname)[0]
            jobs.append((os.path.join(test_dir, fname), os.path.join(folder, "imagesTs", f"{vid}_0000.nii.gz")))
            label = os.path.join(root, "test_labels", fname)
            if os.path.isfile(label):
                jobs.append((label, os.path.join(folder, "labelsTs", f"{vid}.nii.gz")))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    wanted = {os.path.abspath(d) for _, d in jobs}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                p = os.path.abspath(os.path.join(d, f))
                if f.endswith(".nii.gz") and p not in wanted:
                    os.unlink(p)  # a case of an earlier conversion that is no longer in the dataset
    n = max(1, int(workers) if workers else min(8, os.cpu_count() or 1))
    with progress_bar(len(jobs), "convert to nnU-Net", progress, unit="file") as bar:
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = {pool.submit(_convert_one, src, dst): os.path.basename(dst) for src, dst in jobs}
            for f in as_completed(futures):  # the bar follows the files as they finish
                advance(bar, futures[f])
        for f in futures:
            f.result()  # the first failure in job order is raised, as pool.map raised it
    atomic_write_json(os.path.join(folder, "dataset.json"), dataset_json(len(rows), name))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.data.convert_nnunet", description=__doc__.split("\n")[0])
    ap.add_argument("--data_root", required=True)
    ap.add_argument("--out", required=True, help="nnU-Net raw folder (nnUNet_raw)")
    ap.add_argument("--dataset_id", type=int, default=101)
    ap.add_argument("--name", default="VesuviusSurface")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        folder = convert(args.data_root, args.out, args.dataset_id, args.name, workers=args.workers, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(folder, "dataset.json")) as fh:
        n = json.load(fh)["numTraining"]
    print(f"wrote {folder}: {n} training cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
