"""The Kaggle ``submission.zip``: one ``<id>.tif`` per test volume at the root of the archive, checked first.

``write_submission_zip(pred_dir, zip_path, ids=None, input_dir=None)`` packs every ``<id>.tif``
(``.tiff`` is packed under the name ``<id>.tif``) of ``pred_dir`` and nothing else (no folders, no other
files, so a ``submission.zip`` kept inside ``pred_dir`` is not packed into the next one). Before
anything is written it checks, from the TIFF headers alone (``custom_components.data.io.read_tiff_header``,
which also catches truncated files):

- every prediction is a 3D uint8 TIFF;
- with ``ids`` (e.g. the ids of ``test_images``): every id has a prediction and there is no other one;
- with ``input_dir``: every prediction has the shape of ``input_dir/<id>.tif``, and, when ``ids`` is
  not given, the ids are those of ``input_dir``.

All problems are reported at once in one ``ValueError`` naming the files. The archive is written to a
temporary file beside ``zip_path``, read back (CRC of every member, names), fsynced and ``os.replace``d
over ``zip_path``: a failure at any point leaves no partial zip and an earlier ``zip_path`` intact.

CLI::

    python -m custom_components.inference.submission --pred_dir DIR --out submission.zip [--input_dir DIR]

Exit status 0 when written, 1 (message on stderr, nothing written) when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable

import numpy as np
from custom_components.atomic import fsync_dir

__all__ = ["write_submission_zip", "find_predictions", "main"]

_SUFFIXES = (".tif", ".tiff")
_COMPRESSION = {"deflated": zipfile.ZIP_DEFLATED, "stored": zipfile.ZIP_STORED}
_MAX_LISTED = 20


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _tif_files(folder: str, what: str) -> dict[str, str]:
    """``{id: path}`` for every .tif/.tiff file of ``folder``; ValueError on a missing folder or a duplicate id."""
    if not os.path.isdir(folder):
        raise ValueError(f"{what} '{folder}' does not exist or is not a folder.")
    found: dict[str, str] = {}
    dups = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if ext.lower() not in _SUFFIXES or not os.path.isfile(path):
            continue
        if stem in found:
            dups.append(f"{os.path.basename(found[stem])} and {name}")
            continue
        found[stem] = path
    if dups:
        raise ValueError(f"{what} '{folder}' holds two files for the same id: {'; '.join(dups)}.")
    return found


def find_predictions(pred_dir: str) -> dict[str, str]:
    """``{id: path}`` of the prediction TIFFs of ``pred_dir`` (``<id>.tif`` / ``<id>.tiff``)."""
    return _tif_files(os.fspath(pred_dir), "pred_dir")


def _normalize_ids(ids) -> list[str]:
    if isinstance(ids, str):
        ids = [i for i in ids.split(",")]
    out = []
    for i in ids:
        i = os.path.basename(str(i).strip())
        stem, ext = os.path.splitext(i)
        out.append(stem if ext.lower() in _SUFFIXES else i)
    return [i for i in out if i]


def _check(preds: dict[str, str], ids: list[str] | None, inputs: dict[str, str] | None) -> list[str]:
    """Every problem of the prediction set, one line each, naming the file."""
    from custom_components.data.io import read_tiff_header

    problems = []
    if ids is not None:
        missing = set(ids) - set(preds)
        extra = set(preds) - set(ids)
        if missing:
            problems.append(f"missing prediction(s) for {len(missing)} id(s): {_listing(i + '.tif' for i in missing)}")
        if extra:
            problems.append(
                f"{len(extra)} prediction(s) not among the expected ids: {_listing(os.path.basename(preds[i]) for i in extra)}"
            )
    for pid, path in sorted(preds.items()):
        try:
            shape, dtype = read_tiff_header(path)
        except ValueError as e:
            problems.append(str(e))
            continue
        if len(shape) != 3:
            problems.append(f"{path}: not a 3D volume (shape {list(shape)}); expected (Z, Y, X).")
        if dtype != np.uint8:
            problems.append(f"{path}: dtype {dtype}, expected uint8.")
        if inputs is not None:
            if pid not in inputs:
                if ids is None or pid in ids:
                    problems.append(f"{path}: no input volume {pid}.tif in input_dir.")
                continue
            try:
                in_shape, _ = read_tiff_header(inputs[pid])
            except ValueError as e:
                problems.append(f"input of {path}: {e}")
                continue
            if tuple(in_shape) != tuple(shape):
                problems.append(
                    f"{path}: shape {list(shape)} differs from its input {inputs[pid]} shape {list(in_shape)}."
                )
    return problems


def write_submission_zip(
    pred_dir,
    zip_path,
    ids=None,
    input_dir=None,
    compression: str = "deflated",
) -> str:
    """Check the predictions of ``pred_dir`` and pack them into ``zip_path`` atomically; returns ``zip_path``.

    ``ids``: the expected ids (``"1234"`` or ``"1234.tif"``; a list or a comma-separated string); with
    ``input_dir`` and no ``ids``, the ids of ``input_dir``'s TIFFs. ``compression``: ``"deflated"``
    (default; a 0/1 uint8 mask compresses well even when its TIFF is stored uncompressed) or
    ``"stored"``. Raises ``ValueError`` listing every problem, before anything is written.
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}.")
    pred_dir, zip_path = os.fspath(pred_dir), os.fspath(zip_path)
    preds = find_predictions(pred_dir)
    inputs = _tif_files(os.fspath(input_dir), "input_dir") if input_dir is not None else None
    ids = _normalize_ids(ids) if ids is not None else (sorted(inputs) if inputs is not None else None)
    if not preds:
        raise ValueError(f"pred_dir '{pred_dir}' holds no .tif predictions.")
    if ids is not None and not ids:
        raise ValueError("ids is empty: give the ids of the test volumes (or None to pack every prediction).")
    problems = _check(preds, ids, inputs)
    if problems:
        raise ValueError(
            f"submission not written ({zip_path}): {len(problems)} problem(s) in '{pred_dir}':\n  " + "\n  ".join(problems)
        )

    folder = os.path.dirname(os.path.abspath(zip_path))
    os.makedirs(folder, exist_ok=True)
    arcnames = {pid: f"{pid}.tif" for pid in preds}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(zip_path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=_COMPRESSION[compression], allowZip64=True) as zf:
                for pid in sorted(preds):
                    zf.write(preds[pid], arcname=arcnames[pid])
            fh.flush()
            os.fsync(fh.fileno())
        with zipfile.ZipFile(tmp) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"{zip_path}: member {bad} failed its CRC check after writing.")
            if sorted(zf.namelist()) != sorted(arcnames.values()):
                raise ValueError(f"{zip_path}: archive members {zf.namelist()} differ from {sorted(arcnames.values())}.")
        os.replace(tmp, zip_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return zip_path


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 written, 1 problems found: the message goes to stderr)."""
    ap = argparse.ArgumentParser(
        prog="python -m custom_components.inference.submission",
        description="Check the <id>.tif predictions of a folder and pack them into a Kaggle submission.zip.",
    )
    ap.add_argument("--pred_dir", required=True, help="folder of <id>.tif uint8 predictions")
    ap.add_argument("--out", default="submission.zip", help="the zip to write (default: submission.zip)")
    ap.add_argument("--input_dir", default=None,
                    help="folder of the input volumes (test_images): every id present, shapes equal")
    ap.add_argument("--ids", default=None, help="comma-separated expected ids (default: those of --input_dir)")
    ap.add_argument("--compression", default="deflated", choices=sorted(_COMPRESSION))
    args = ap.parse_args(argv)
    try:
        path = write_submission_zip(args.pred_dir, args.out, ids=args.ids, input_dir=args.input_dir,
                                    compression=args.compression)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(path) as zf:
        n = len(zf.namelist())
    print(f"wrote {path}: {n} volume(s), {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
