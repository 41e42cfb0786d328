"""Competition score (shared/METRIC.md) of a folder of predicted volumes against a folder of labels.

Files are matched by stem (``<id>.tif`` <-> ``<id>.tif``; any format ``custom_components.io.read_volume``
reads). Missing or extra predictions and shape mismatches are reported by file name; the command then
exits with status 1. Volumes are scored in parallel processes (``--workers``); the per-volume rows
(id, score, topo_score, surface_dice, voi_score, seconds) are printed as a table with a mean row and
written atomically to ``--out`` as CSV.

    python -m custom_components.evaluate --pred_dir DIR --label_dir DIR [--out results.csv] [--workers N]

Python API: ``score_folders(pred_dir, label_dir, workers)`` and
``compare_postprocessing(raw_dir, post_dir, label_dir, out_csv, workers)`` (raw vs post-processed
scores per volume and their difference). Heavy imports (numpy, the metric, TIFF readers) are lazy.
"""

from __future__ import annotations

import argparse
import csv
import io as _stdio
import os
import sys
import tempfile
import time

__all__ = ["score_folders", "compare_postprocessing", "format_table", "write_csv", "main"]

COLUMNS = ("id", "score", "topo_score", "surface_dice", "voi_score", "seconds")
_SUFFIXES = (".nii.gz", ".tiff", ".tif", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stem(name: str) -> str | None:
    low = name.lower()
    for s in _SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return None


def _volumes(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise ValueError(f"Not a folder: {folder}")
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem = _stem(name)
        path = os.path.join(folder, name)
        if stem is None or not os.path.isfile(path) or name.startswith("."):
            continue
        if stem in out:
            raise ValueError(f"Two volumes with the stem {stem!r} in {folder}: {os.path.basename(out[stem])} and {name}")
        out[stem] = path
    return out


def _pairs(pred_dir: str, label_dir: str) -> list[tuple[str, str, str]]:
    """(id, pred_path, label_path) sorted by id; ValueError naming every missing / extra / mismatched file."""
    preds, labels = _volumes(pred_dir), _volumes(label_dir)
    problems = []
    for stem in sorted(set(labels) - set(preds)):
        problems.append(f"missing prediction for {os.path.basename(labels[stem])} (expected {stem}.* in {pred_dir})")
    for stem in sorted(set(preds) - set(labels)):
        problems.append(f"extra prediction {os.path.basename(preds[stem])} has no label in {label_dir}")
    if not labels:
        problems.append(f"no label volumes in {label_dir}")
    pairs = [(s, preds[s], labels[s]) for s in sorted(set(preds) & set(labels))]
    for stem, p, g in pairs:  # shapes from the TIFF headers (cheap); other formats are checked when read
        if p.lower().endswith((".tif", ".tiff")) and g.lower().endswith((".tif", ".tiff")):
            from custom_components.io import read_tiff_header

            try:
                sp, sg = read_tiff_header(p)[0], read_tiff_header(g)[0]
            except ValueError as e:
                problems.append(str(e))
                continue
            if tuple(sp) != tuple(sg):
                problems.append(f"shape mismatch for {stem}: prediction {os.path.basename(p)} {tuple(sp)} vs label {os.path.basename(g)} {tuple(sg)}")
    if problems:
        raise ValueError("; ".join(problems))
    return pairs


def _score_one(args) -> dict:
    stem, pred_path, label_path, tile_workers = args
    from custom_components.io import read_volume
    from custom_components.metrics import leaderboard_score

    t0 = time.perf_counter()
    pred, label = read_volume(pred_path), read_volume(label_path)
    if pred.shape != label.shape:
        raise ValueError(f"shape mismatch for {stem}: prediction {os.path.basename(pred_path)} {pred.shape} vs label {os.path.basename(label_path)} {label.shape}")
    try:
        r = leaderboard_score(pred, label, workers=tile_workers)
    except ValueError as e:
        raise ValueError(f"{os.path.basename(pred_path)} vs {os.path.basename(label_path)}: {e}") from e
    r["id"] = stem
    r["seconds_components"] = r["seconds"]
    r["seconds"] = time.perf_counter() - t0
    return r


def _pool_context():
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def score_folders(pred_dir, label_dir, workers: int = 1) -> list[dict]:
    """Per-volume ``leaderboard_score`` dicts (plus ``id``; ``seconds`` = wall time of the volume incl.
    reading, ``seconds_components`` = the metric's own timings), sorted by id.

    Raises ``ValueError`` naming every missing / extra prediction and shape mismatch. ``workers``
    processes score volumes in parallel (one volume: its 8 Betti tiles in parallel instead).
    """
    pairs = _pairs(os.fspath(pred_dir), os.fspath(label_dir))
    workers = max(1, int(workers))
    if workers == 1 or len(pairs) == 1:
        return [_score_one((s, p, g, workers)) for s, p, g in pairs]
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(s, p, g, 1) for s, p, g in pairs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_pool_context()) as pool:
        futures = [pool.submit(_score_one, j) for j in jobs]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except ValueError as e:
                errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
    return results


def _mean_row(rows: list[dict], keys) -> dict:
    out = {"id": "mean"}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict], columns) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; floats with 4 decimals."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path, rows: list[dict], columns) -> str:
    """Write ``rows`` over ``columns`` as CSV to ``path`` atomically (tmp file beside it, fsync, replace)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def compare_postprocessing(raw_dir, post_dir, label_dir, out_csv, workers: int = 1) -> list[dict]:
    """Score raw and post-processed predictions against one label folder; per volume the scores and
    their difference (post - raw) are printed as a table with a mean row and written to ``out_csv``.

    Returns the per-volume rows: id, score_raw, score_post, score_diff and the raw / post components
    (topo_score, surface_dice, voi_score).
    """
    raw = {r["id"]: r for r in score_folders(raw_dir, label_dir, workers)}
    post = {r["id"]: r for r in score_folders(post_dir, label_dir, workers)}
    rows = []
    for stem in sorted(raw):
        a, b = raw[stem], post[stem]
        row = {"id": stem, "score_raw": a["score"], "score_post": b["score"], "score_diff": b["score"] - a["score"]}
        for k in ("topo_score", "surface_dice", "voi_score"):
            row[f"{k}_raw"], row[f"{k}_post"] = a[k], b[k]
        rows.append(row)
    columns = ["id", "score_raw", "score_post", "score_diff"] + [f"{k}_{s}" for k in ("topo_score", "surface_dice", "voi_score") for s in ("raw", "post")]
    table_rows = rows + [_mean_row(rows, columns[1:])]
    print(format_table(table_rows, columns))
    write_csv(out_csv, table_rows, columns)
    return rows


def main(argv=None) -> int:
    """Command line; returns the exit status (0 ok, 1 missing / extra / mismatched files)."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred_dir", required=True)
    ap.add_argument("--label_dir", required=True)
    ap.add_argument("--out", default=None, help="CSV of per-volume rows and the mean row (written atomically)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        rows = score_folders(args.pred_dir, args.label_dir, args.workers)
    except ValueError as e:
        for problem in str(e).split("; "):
            print(f"error: {problem}", file=sys.stderr)
        return 1
    table_rows = rows + [_mean_row(rows, COLUMNS[1:])]
    print(format_table(table_rows, COLUMNS))
    if args.out:
        write_csv(args.out, table_rows, COLUMNS)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
