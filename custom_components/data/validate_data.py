"""Data check of a Kaggle-layout dataset before anything trains or predicts on it.

Layout: ``train.csv`` (header ``id,scroll_id``), ``train_images/<id>.tif``, ``train_labels/<id>.tif``,
``test_images/<id>.tif`` and optionally ``test_labels/<id>.tif``; volumes are 3D uint8 TIFF (Z, Y, X),
labels take values in {0 background, 1 surface, 2 unlabeled}.

Checked (every problem is reported, one line each, naming the file and what is wrong):

- ``train.csv``: exists, has the columns ``id`` and ``scroll_id``, every row has both, no duplicate id;
- every id has ``train_images/<id>.tif`` and ``train_labels/<id>.tif``; no stray file in those folders;
- each volume reads, is 3D and uint8; label shape == image shape; label values within {0, 1, 2}
  (values need decoding: skipped with ``decode=False``, which reads TIFF headers only);
- ``test_images/*.tif(f)`` (when the folder exists) likewise 3D uint8; ``test_labels/<id>.tif`` (optional)
  belongs to a test image and matches it like a training label.

``python -m custom_components.data.validate_data --data_root DIR [--headers_only]`` prints the problems
(exit 1) or ``OK: N training volumes, M test volumes``, with a progress bar on stderr while the volumes
are read (on a terminal). Training / inference call ``check_or_raise``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

__all__ = ["read_train_csv", "validate_volumes", "validate_dataset", "check_or_raise", "main"]

LABEL_VALUES = (0, 1, 2)
MAX_LISTED = 200  # problems listed in check_or_raise's message; the CLI prints all


def read_train_csv(path) -> tuple[list[dict], list[str]]:
    """Rows ``[{"id", "scroll_id"}]`` of ``train.csv`` (file order, strings) and the problems found in it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return [], [f"{path}: missing (expected a csv with the header 'id,scroll_id')."]
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [f"{path}: cannot be read as csv ({type(e).__name__}: {e})."]
    if not lines:
        return [], [f"{path}: empty file (expected the header 'id,scroll_id')."]
    header = [h.strip() for h in lines[0]]
    if "id" not in header or "scroll_id" not in header:
        return [], [f"{path}: header is {','.join(header)!r}, expected 'id,scroll_id'."]
    i_id, i_scroll = header.index("id"), header.index("scroll_id")
    rows: list[dict] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, fields in enumerate(lines[1:], start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            problems.append(f"{path} line {lineno}: {len(fields)} fields, the header has {len(header)}.")
            continue
        vid, scroll = fields[i_id].strip(), fields[i_scroll].strip()
        if not vid:
            problems.append(f"{path} line {lineno}: empty id.")
            continue
        if "/" in vid or "\\" in vid or vid.startswith("."):
            problems.append(f"{path} line {lineno}: id {vid!r} is not a plain file name.")
            continue
        if not scroll:
            problems.append(f"{path} line {lineno}: empty scroll_id for id {vid!r}.")
            continue
        if vid in first_line:
            problems.append(f"{path} line {lineno}: duplicate id {vid!r} (first on line {first_line[vid]}).")
            continue
        first_line[vid] = lineno
        rows.append({"id": vid, "scroll_id": scroll})
    return rows, problems


def _volume(path: str, decode: bool):
    """``(array or None, shape, dtype)``; raises ``ValueError`` naming the file."""
    from custom_components.data.io import read_tiff_header, read_volume, volume_format

    if not decode and volume_format(path) == "tiff":
        shape, dtype = read_tiff_header(path)
        return None, tuple(shape), np.dtype(dtype)
    arr = read_volume(path)
    return arr, tuple(arr.shape), arr.dtype


def _check_pair(image: str | None, label: str | None, decode: bool) -> list[str]:
    """Problems of one image (and its label, either may be ``None``)."""
    problems: list[str] = []
    image_shape = None
    if image is not None:
        try:
            _, shape, dtype = _volume(image, decode)
        except ValueError as e:
            problems.append(str(e))
        else:
            if len(shape) != 3:
                problems.append(f"{image}: image is {len(shape)}D of shape {list(shape)}, expected 3D (Z, Y, X).")
            if dtype != np.uint8:
                problems.append(f"{image}: image dtype is {dtype}, expected uint8.")
            image_shape = shape
    if label is not None:
        try:
            arr, shape, dtype = _volume(label, decode)
        except ValueError as e:
            problems.append(str(e))
            return problems
        if len(shape) != 3:
            problems.append(f"{label}: label is {len(shape)}D of shape {list(shape)}, expected 3D (Z, Y, X).")
        if dtype != np.uint8:
            problems.append(f"{label}: label dtype is {dtype}, expected uint8.")
        if image_shape is not None and shape != image_shape:
            problems.append(f"{label}: label shape {list(shape)} != image shape {list(image_shape)} of {image}.")
        if arr is not None and arr.size:
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                problems.append(f"{label}: label holds NaN/inf values, expected values in {{0, 1, 2}}.")
            elif arr.min() < 0 or arr.max() > 2 or (np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.rint(arr))):
                bad = np.unique(arr[~np.isin(arr, LABEL_VALUES)])
                shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
                problems.append(f"{label}: label values {{{shown}}} outside {{0, 1, 2}} ({int(np.count_nonzero(~np.isin(arr, LABEL_VALUES)))} voxels).")
    return problems


def _workers(workers: int | None) -> int:
    return max(1, int(workers) if workers else min(8, os.cpu_count() or 1))


def validate_volumes(
    image_paths: Sequence,
    label_paths: Sequence | None = None,
    decode: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Problems of the given volumes: each reads, is 3D uint8; each label matches its image's shape and,
    with ``decode``, holds only {0, 1, 2}. ``label_paths[i]`` may be ``None`` (no label for image i).

    ``decode=False`` reads TIFF headers only (shape, dtype). Files are checked on ``workers`` threads
    (default ``min(8, cpu_count)``); the problems come back in input order. A progress bar on stderr
    (``custom_components.progress``; none with ``progress=False`` or without a terminal) counts the
    volumes as they finish.
    """
    from custom_components.progress import advance, progress_bar

    images = [os.fspath(p) if p is not None else None for p in image_paths]
    if label_paths is None:
        labels: list[str | None] = [None] * len(images)
    else:
        labels = [os.fspath(p) if p is not None else None for p in label_paths]
        if len(labels) != len(images):
            raise ValueError(f"validate_volumes: {len(images)} image paths but {len(labels)} label paths.")
    pairs = list(zip(images, labels))
    n = _workers(workers)
    desc = "check volumes" + ("" if decode else " (headers)")
    with progress_bar(len(pairs), desc, progress) as bar:
        if n == 1 or len(pairs) <= 1:
            results = []
            for i, lab in pairs:
                results.append(_check_pair(i, lab, decode))
                advance(bar, _name(i, lab))
        else:
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = {pool.submit(_check_pair, i, lab, decode): _name(i, lab) for i, lab in pairs}
                for f in as_completed(futures):  # the bar follows the files as they finish
                    advance(bar, futures[f])
            results = [f.result() for f in futures]  # input order (the dict keeps submission order)
    return [line for r in results for line in r]


def _name(image: str | None, label: str | None) -> str:
    """What the bar shows for a pair: the file name of the image, else of the label."""
    return os.path.basename(image or label or "")


def _visible(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def _validate(data_root, check_test: bool = True, decode: bool = True, workers: int | None = None, progress: bool = True):
    """``(problems, n_train, n_test)``; see ``validate_dataset``."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        return [f"{root}: data_root does not exist or is not a folder."], 0, 0
    rows, problems = read_train_csv(os.path.join(root, "train.csv"))
    ids = [r["id"] for r in rows]
    expected = {f"{i}.tif" for i in ids}
    found: dict[str, set[str] | None] = {}
    for sub in ("train_images", "train_labels"):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            problems.append(f"{folder}: folder missing ({len(ids)} ids of train.csv need a file there).")
            found[sub] = None
            continue
        names = _visible(folder)
        found[sub] = set(names)
        for name in names:
            if name not in expected:
                what = "folder" if os.path.isdir(os.path.join(folder, name)) else "file"
                problems.append(f"{os.path.join(folder, name)}: stray {what}, not <id>.tif for an id of train.csv.")
    images: list[str | None] = []
    labels: list[str | None] = []
    for vid in ids:
        pair = []
        for sub, what in (("train_images", "image"), ("train_labels", "label")):
            path = os.path.join(root, sub, f"{vid}.tif")
            have = found[sub]
            if have is not None and f"{vid}.tif" not in have:
                problems.append(f"{path}: missing {what} for id {vid!r} of train.csv.")
                path = None
            elif have is None:
                path = None
            pair.append(path)
        images.append(pair[0])
        labels.append(pair[1])
    problems += validate_volumes(images, labels, decode=decode, workers=workers, progress=progress)
    n_test = 0
    test_dir = os.path.join(root, "test_images")
    if check_test and os.path.isdir(test_dir):
        test_names = []
        for name in _visible(test_dir):
            if name.lower().endswith((".tif", ".tiff")) and os.path.isfile(os.path.join(test_dir, name)):
                test_names.append(name)
            else:
                problems.append(f"{os.path.join(test_dir, name)}: stray entry in test_images, not a .tif volume.")
        n_test = len(test_names)
        t_images = [os.path.join(test_dir, n) for n in test_names]
        t_labels: list[str | None] = [None] * n_test
        label_dir = os.path.join(root, "test_labels")
        if os.path.isdir(label_dir):
            by_stem = {os.path.splitext(n)[0]: k for k, n in enumerate(test_names)}
            for name in _visible(label_dir):
                stem, ext = os.path.splitext(name)
                path = os.path.join(label_dir, name)
                if ext.lower() in (".tif", ".tiff") and stem in by_stem and os.path.isfile(path):
                    t_labels[by_stem[stem]] = path
                else:
                    problems.append(f"{path}: stray entry in test_labels, no test image of that name.")
        problems += validate_volumes(t_images, t_labels, decode=decode, workers=workers, progress=progress)
    return problems, len(ids), n_test


def validate_dataset(data_root, check_test: bool = True, decode: bool = True, workers: int | None = None,
                     progress: bool = True) -> list[str]:
    """Every problem of the dataset at ``data_root`` (module docstring), one line each; ``[]`` when valid.

    ``check_test=False`` skips test_images / test_labels; ``decode=False`` reads TIFF headers only;
    ``progress=False`` shows no bar.
    """
    return _validate(data_root, check_test=check_test, decode=decode, workers=workers, progress=progress)[0]


def check_or_raise(data_root, check_test: bool = True, decode: bool = False, workers: int | None = None,
                   progress: bool = True) -> tuple[int, int]:
    """``(n_train, n_test)`` when the dataset is valid, else ``ValueError`` listing the problems.

    Defaults to the header-only check (seconds for the Kaggle set); ``decode=True`` also checks label values.
    """
    problems, n_train, n_test = _validate(data_root, check_test=check_test, decode=decode, workers=workers,
                                          progress=progress)
    if problems:
        shown = problems[:MAX_LISTED]
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more (python -m custom_components.data.validate_data --data_root {data_root})"
            if len(problems) > MAX_LISTED
            else ""
        )
        raise ValueError(f"{len(problems)} problem(s) in the dataset at {data_root}:\n  " + "\n  ".join(shown) + more)
    return n_train, n_test


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 valid, 1 problems)."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.data.validate_data", description=__doc__.split("\n")[0])
    ap.add_argument("--data_root", required=True, help="folder holding train.csv, train_images/, train_labels/, test_images/")
    ap.add_argument("--headers_only", action="store_true", help="read TIFF headers only (shape, dtype): fast, no label values")
    ap.add_argument("--skip_test", action="store_true", help="do not check test_images / test_labels")
    ap.add_argument("--workers", type=int, default=None, help="threads reading files (default min(8, cpus))")
    args = ap.parse_args(argv)
    problems, n_train, n_test = _validate(
        args.data_root, check_test=not args.skip_test, decode=not args.headers_only, workers=args.workers
    )
    if problems:
        for line in problems:
            print(line)
        print(f"FAILED: {len(problems)} problem(s) in {args.data_root}", file=sys.stderr)
        return 1
    print(f"OK: {n_train} training volumes, {n_test} test volumes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
