"""Competition score (docs/METRIC.md) of a folder of predicted TIFF volumes against a folder of labels.

    python -m custom_components.metrics.evaluate --pred_dir DIR --label_dir DIR [--out results.csv] [--workers N]

Volumes are matched by id = file stem (``<id>.tif`` / ``<id>.tiff``). Before anything is scored, every
missing prediction, extra prediction (no label of that id), unreadable, truncated or corrupt file and
shape mismatch (shapes from the TIFF headers, read and checked by ``custom_components.data.io``'s
``read_tiff_header``) is reported by file name on stderr and the command exits with status 1. Otherwise
each volume is scored with ``custom_components.metrics.score.leaderboard_score``, volumes in parallel
processes (``--workers`` in all: min(workers, volumes) volume processes, the rest of the workers for the
Betti tiles of each volume; a progress bar on stderr counts the volumes as they finish), and a table of
the per-volume rows (id, score, topo_score, surface_dice, voi_score, voi, seconds = wall time of the
volume incl. reading) with a mean row is printed; ``--out`` writes the same rows as CSV, atomically.

Python API: ``score_folders(pred_dir, label_dir, workers, progress)``, ``compare_postprocessing(raw_dir,
post_dir, label_dir, out_csv, workers, progress)`` (raw vs post-processed scores per volume and their
difference; used by bundle/configs/evaluate.json), ``format_table``, ``write_csv``, ``main``.
"""

from __future__ import annotations

import argparse
import csv
import io as _stdio
import os
import sys
import time
from custom_components.atomic import atomic_write_text

__all__ = ["COLUMNS", "score_folders", "compare_postprocessing", "format_table", "write_csv", "main"]

COLUMNS = ("id", "score", "topo_score", "surface_dice", "voi_score", "voi", "seconds")
_SUFFIXES = (".tiff", ".tif")


def _stem(name: str) -> str | None:
    low = name.lower()
    for s in _SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def _volumes(folder: str, problems: list[str]) -> dict[str, str]:
    """id -> path of the TIFFs in ``folder`` (hidden files skipped); problems appended, not raised."""
    if not os.path.isdir(folder):
        problems.append(f"not a folder: {folder}")
        return {}
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem = _stem(name)
        path = os.path.join(folder, name)
        if stem is None or name.startswith(".") or not os.path.isfile(path):
            continue
        if stem in out:
            problems.append(f"two volumes with the id {stem!r} in {folder}: {os.path.basename(out[stem])} and {name}")
            continue
        out[stem] = path
    return out


def _pairs(pred_dir: str, label_dir: str) -> list[tuple[str, str, str]]:
    """(id, pred_path, label_path) sorted by id; ValueError listing every missing / extra / unreadable /
    mismatched file (problems joined by "; ")."""
    problems: list[str] = []
    preds, labels = _volumes(pred_dir, problems), _volumes(label_dir, problems)
    for stem in sorted(set(labels) - set(preds)):
        problems.append(f"missing prediction for {os.path.basename(labels[stem])}: no {stem}.tif in {pred_dir}")
    for stem in sorted(set(preds) - set(labels)):
        problems.append(f"extra prediction {os.path.basename(preds[stem])}: no label {stem}.tif in {label_dir}")
    if os.path.isdir(label_dir) and not labels:
        problems.append(f"no label volumes (*.tif) in {label_dir}")
    pairs = [(s, preds[s], labels[s]) for s in sorted(set(preds) & set(labels))]
    if pairs:
        from custom_components.data.io import read_tiff_header  # the checked reader: truncation, corruption
    for stem, p, g in pairs:
        try:
            sp, sg = read_tiff_header(p)[0], read_tiff_header(g)[0]
        except ValueError as e:
            problems.append(str(e))
            continue
        if sp != sg or len(sp) != 3:
            what = "shape mismatch" if sp != sg else "not a 3D volume"
            problems.append(f"{what} for {stem}: prediction {os.path.basename(p)} {sp} vs label {os.path.basename(g)} {sg}")
    if problems:
        raise ValueError("; ".join(problems))
    return pairs


def _score_one(args) -> dict:
    """Score one (id, pred_path, label_path, tile_workers); ValueError naming the files on failure."""
    stem, pred_path, label_path, tile_workers = args
    from custom_components.data.io import read_volume
    from custom_components.metrics.score import leaderboard_score

    t0 = time.perf_counter()
    try:
        pred, label = read_volume(pred_path), read_volume(label_path)
        r = leaderboard_score(pred, label, workers=tile_workers)
    except Exception as e:
        raise ValueError(f"{os.path.basename(pred_path)} vs {os.path.basename(label_path)}: {e}") from e
    r["id"] = stem
    r["seconds_components"] = r.pop("seconds")
    r["seconds"] = time.perf_counter() - t0
    return r


def _pool_context():
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def score_folders(pred_dir, label_dir, workers: int = 1, progress: bool = True) -> list[dict]:
    """Per-volume ``leaderboard_score`` dicts sorted by id, plus ``id``, ``seconds`` (wall time of the
    volume incl. reading) and ``seconds_components`` (the metric's own timings).

    Raises ``ValueError`` naming every missing / extra prediction, unreadable file and shape mismatch
    before scoring anything. ``workers`` processes in all: volumes in parallel, spare workers for tiles.
    A progress bar on stderr (``custom_components.progress``; ``progress=False`` or no terminal: none)
    counts the volumes as they finish.
    """
    from custom_components.progress import advance, progress_bar

    pairs = _pairs(os.fspath(pred_dir), os.fspath(label_dir))
    workers = max(1, int(workers))
    procs = min(workers, len(pairs))
    tile_workers = max(1, workers // procs)
    jobs = [(s, p, g, tile_workers) for s, p, g in pairs]
    with progress_bar(len(jobs), "evaluate", progress) as bar:
        if procs == 1:
            results = []
            for j in jobs:
                results.append(_score_one(j))
                advance(bar, j[0])
            return results
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=procs, mp_context=_pool_context()) as pool:
            futures = {pool.submit(_score_one, j): j[0] for j in jobs}
            for f in as_completed(futures):  # the bar follows the volumes as they finish
                advance(bar, futures[f])
    results, errors = [], []
    for f in futures:  # results (and errors) in id order (the dict keeps submission order)
        try:
            results.append(f.result())
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
    return results


def _mean_row(rows: list[dict], keys) -> dict:
    out: dict = {"id": "mean"}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], columns) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``: header, rule, one line per row;
    floats with 4 decimals, the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path, rows: list[dict], columns) -> str:
    """Write ``rows`` over ``columns`` as CSV to ``path`` atomically (tmp file beside it, fsync,
    ``os.replace``); floats written with ``repr`` (full precision). Returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    return atomic_write_text(path, buf.getvalue(), newline="")


def compare_postprocessing(raw_dir, post_dir, label_dir, out_csv, workers: int = 1, progress: bool = True) -> list[dict]:
    """Score raw and post-processed predictions against one label folder; the per-volume scores and
    their difference (post - raw) are printed as a table with a mean row and written to ``out_csv``.

    Returns the per-volume rows: id, score_raw, score_post, score_diff and the raw / post components
    (topo_score, surface_dice, voi_score).
    """
    raw = {r["id"]: r for r in score_folders(raw_dir, label_dir, workers, progress)}
    post = {r["id"]: r for r in score_folders(post_dir, label_dir, workers, progress)}
    rows = []
    for stem in sorted(raw):
        a, b = raw[stem], post[stem]
        row = {"id": stem, "score_raw": a["score"], "score_post": b["score"], "score_diff": b["score"] - a["score"]}
        for k in ("topo_score", "surface_dice", "voi_score"):
            row[f"{k}_raw"], row[f"{k}_post"] = a[k], b[k]
        rows.append(row)
    columns = ["id", "score_raw", "score_post", "score_diff"] + [
        f"{k}_{s}" for k in ("topo_score", "surface_dice", "voi_score") for s in ("raw", "post")
    ]
    table_rows = rows + [_mean_row(rows, columns[1:])]
    print(format_table(table_rows, columns))
    write_csv(out_csv, table_rows, columns)
    return rows


def main(argv=None) -> int:
    """Command line; returns the exit status (0 scored, 1 missing / extra / unreadable / mismatched files)."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.metrics.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred_dir", required=True, help="folder of predicted <id>.tif volumes")
    ap.add_argument("--label_dir", required=True, help="folder of label <id>.tif volumes (0 / 1 / 2)")
    ap.add_argument("--out", default=None, help="CSV of the per-volume rows and the mean row (written atomically)")
    ap.add_argument("--workers", type=int, default=1, help="processes in all (volumes in parallel, then tiles)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        rows = score_folders(args.pred_dir, args.label_dir, args.workers)
    except ValueError as e:
        for problem in str(e).split("; "):
            print(f"error: {problem}", file=sys.stderr)
        return 1
    table_rows = rows + [_mean_row(rows, COLUMNS[1:])]
    print(format_table(table_rows, COLUMNS))
    print(f"{len(rows)} volumes in {time.perf_counter() - t0:.1f} s ({args.workers} workers)")
    if args.out:
        write_csv(args.out, table_rows, COLUMNS)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
