"""Decathlon-style datalists of a Kaggle-layout dataset: training / validation split, folds, test list.

``python -m custom_components.data.datalist --data_root DIR --out data_lists/NAME.json --val_fraction F --seed S
[--split random|scroll] [--folds K]`` writes (atomically)::

    {"name": ..., "split": ..., "seed": ..., "val_fraction": ..., "folds": K or null, "numTraining": N,
     "training":   [{"id", "scroll_id", "image": "train_images/<id>.tif", "label": "train_labels/<id>.tif"
                     (, "fold")}, ...],
     "validation": [...],
     "test":       [{"id", "image": "test_images/<id>.tif" (, "label": "test_labels/<id>.tif")}, ...]}

Paths are relative to the data root, so ``monai.data.load_decathlon_datalist(path, data_list_key=...,
base_dir=data_root)`` works. Splits (deterministic for a seed; numpy ``default_rng(seed)``):

- ``random`` without folds: ``n_val = clip(round(val_fraction * n), 1, n - 1)`` volumes drawn at random
  (no validation when n == 1);
- ``scroll`` without folds: whole scrolls go to validation, in a seed-shuffled order, each one taken when
  it brings the count closer to ``val_fraction * n``; at least one scroll on each side (>= 2 scrolls);
- ``--folds K``: every volume gets ``fold`` in 0..K-1 (random: a shuffled round robin; scroll: whole
  scrolls, largest first, each to the fold with fewest volumes, ties and fold numbering drawn from the
  seed). ``training`` then lists ALL training volumes, each with its ``fold`` (the Auto3DSeg
  convention), and ``validation`` repeats fold 0: select by ``fold`` (``load_datalist(..., fold=k)``),
  do not concatenate ``training`` and ``validation``. ``val_fraction`` is not used with folds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from custom_components.atomic import atomic_write_json

__all__ = ["SPLITS", "make_datalist", "write_datalist", "load_datalist", "main"]

SPLITS = ("random", "scroll")


def _check_settings(val_fraction: float, split: str, folds: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}.")
    try:
        vf = float(val_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}.") from None
    if not 0.0 < vf < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    if folds is not None and (isinstance(folds, bool) or int(folds) != folds or folds < 2):
        raise ValueError(f"folds must be an integer >= 2 (or None for a single split), got {folds!r}.")


def _n_val(n: int, val_fraction: float) -> int:
    if n < 2:
        return 0
    return int(min(max(round(val_fraction * n), 1), n - 1))


def _scroll_groups(rows: list[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["scroll_id"], []).append(i)
    return groups


def _assign_folds(rows: list[dict], split: str, folds: int, rng: np.random.Generator) -> list[int]:
    n = len(rows)
    if folds > n:
        raise ValueError(f"folds={folds} > the {n} training volumes of train.csv; use at most {n} folds.")
    fold_of = [0] * n
    if split == "random":
        for pos, i in enumerate(rng.permutation(n)):
            fold_of[int(i)] = pos % folds
        return fold_of
    groups = _scroll_groups(rows)
    if len(groups) < folds:
        raise ValueError(
            f"split 'scroll' with folds={folds} needs at least {folds} scrolls; train.csv has {len(groups)} "
            f"({sorted(groups)})."
        )
    names = list(groups)
    order = [names[int(i)] for i in rng.permutation(len(names))]  # seed decides ties
    order.sort(key=lambda s: -len(groups[s]))  # stable: largest first
    label = [int(k) for k in rng.permutation(folds)]  # seed decides which group is "fold 0"
    load = [0] * folds
    for s in order:
        k = min(range(folds), key=lambda j: (load[j], j))
        load[k] += len(groups[s])
        for i in groups[s]:
            fold_of[i] = label[k]
    return fold_of


def _val_scrolls(rows: list[dict], val_fraction: float, rng: np.random.Generator) -> set[str]:
    groups = _scroll_groups(rows)
    if len(groups) < 2:
        raise ValueError(
            f"split 'scroll' needs at least 2 scrolls (one for training, one for validation); train.csv has "
            f"{len(groups)} ({sorted(groups)})."
        )
    names = list(groups)
    order = [names[int(i)] for i in rng.permutation(len(names))]
    target = val_fraction * len(rows)
    chosen: list[str] = []
    count = 0
    for s in order:
        if len(chosen) == len(names) - 1:
            break
        size = len(groups[s])
        if not chosen or abs(count + size - target) < abs(count - target):
            chosen.append(s)
            count += size
    return set(chosen)


def _read_rows(data_root: str) -> list[dict]:
    from custom_components.data.validate_data import read_train_csv

    rows, problems = read_train_csv(os.path.join(data_root, "train.csv"))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in train.csv:\n  " + "\n  ".join(problems))
    if not rows:
        raise ValueError(f"{os.path.join(data_root, 'train.csv')}: lists no volumes.")
    return rows


def _test_entries(data_root: str) -> list[dict]:
    folder = os.path.join(data_root, "test_images")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.lower().endswith((".tif", ".tiff")):
            continue
        entry = {"id": os.path.splitext(name)[0], "image": f"test_images/{name}"}
        if os.path.isfile(os.path.join(data_root, "test_labels", name)):
            entry["label"] = f"test_labels/{name}"
        out.append(entry)
    return out


def make_datalist(
    data_root,
    val_fraction: float = 0.2,
    seed: int = 0,
    split: str = "random",
    folds: int | None = None,
) -> dict:
    """The datalist dict of the module docstring for the dataset at ``data_root`` (paths relative to it).

    Raises ``ValueError`` for an unknown ``split``, ``val_fraction`` outside (0, 1), ``folds`` < 2 or
    more than the volumes, fewer scrolls than a scroll split needs, or a bad / empty ``train.csv``.
    """
    root = os.fspath(data_root)
    _check_settings(val_fraction, split, folds)
    if not os.path.isdir(root):
        raise ValueError(f"data_root '{root}' does not exist or is not a folder.")
    rows = _read_rows(root)
    rng = np.random.default_rng(int(seed))
    entries = [
        {"id": r["id"], "scroll_id": r["scroll_id"], "image": f"train_images/{r['id']}.tif", "label": f"train_labels/{r['id']}.tif"}
        for r in rows
    ]
    if folds is not None:
        fold_of = _assign_folds(rows, split, int(folds), rng)
        for e, k in zip(entries, fold_of):
            e["fold"] = k
        training = entries
        validation = [dict(e) for e in entries if e["fold"] == 0]
    else:
        if split == "random":
            val_idx = {int(i) for i in rng.permutation(len(rows))[: _n_val(len(rows), float(val_fraction))]}
        else:
            scrolls = _val_scrolls(rows, float(val_fraction), rng)
            val_idx = {i for i, r in enumerate(rows) if r["scroll_id"] in scrolls}
        training = [e for i, e in enumerate(entries) if i not in val_idx]
        validation = [e for i, e in enumerate(entries) if i in val_idx]
    return {
        "name": "VesuviusSurface",
        "description": f"split={split} seed={seed} val_fraction={val_fraction} folds={folds}",
        "split": split,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "folds": None if folds is None else int(folds),
        "numTraining": len(entries),
        "training": training,
        "validation": validation,
        "test": _test_entries(root),
    }


def write_datalist(datalist: dict, path) -> str:
    """Write ``datalist`` as JSON to ``path`` atomically (tmp file in the same folder, fsync, os.replace)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return atomic_write_json(path, datalist)


def _resolved(path: str, data: dict, key: str, base: str) -> list[dict]:
    """``data[key]`` with ``image`` / ``label`` joined to ``base`` by MONAI's ``load_decathlon_datalist``
    (absolute paths kept, ``os.path.normpath``); every other key is kept as written, since MONAI would also
    turn an id that happens to name a file under ``base`` into a path."""
    from monai.data import load_decathlon_datalist

    raw = data.get(key) or []
    if not isinstance(raw, list):
        raise ValueError(f"datalist '{path}': '{key}' is not a list.")
    if not raw:
        return []
    if not all(isinstance(e, dict) for e in raw):
        if key != "test" or not all(isinstance(e, str) for e in raw):  # MONAI's bare test paths: all or none
            raise ValueError(f"datalist '{path}': '{key}' entries must all be dicts"
                             + (" (or, in 'test', all image paths)." if key == "test" else "."))
        raw = [{"image": e} for e in raw]
    joined = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base)
    return [{**e, **{k: j[k] for k in ("image", "label") if k in j}} for e, j in zip(raw, joined)]


def load_datalist(path, data_root=None, fold: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, val, test)`` entries of a datalist file, with absolute ``image`` / ``label`` paths.

    Relative paths are joined to ``data_root`` (default: the datalist's folder) by MONAI's
    ``load_decathlon_datalist``. With a folds datalist, ``fold=k`` (default 0) makes fold k the validation
    set and the other folds the training set; a datalist without folds takes ``fold`` None or 0 (its own
    ``validation`` list). Raises ``ValueError`` naming the file for an unreadable / invalid file, a missing
    ``training`` list, entries without ``fold`` among entries with one, or a fold it does not hold.
    """
    path = os.fspath(path)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise ValueError(f"datalist '{path}' cannot be read ({e.strerror}).") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist '{path}' is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise ValueError(f"datalist '{path}' has no 'training' list.")
    base = os.fspath(data_root) if data_root else os.path.dirname(os.path.abspath(path))
    training, validation, test = (_resolved(path, data, key, base) for key in ("training", "validation", "test"))
    with_fold = [e for e in training if "fold" in e]
    if with_fold:
        if len(with_fold) != len(training):
            raise ValueError(f"datalist '{path}': {len(training) - len(with_fold)} training entries lack a 'fold'.")
        folds = sorted({int(e["fold"]) for e in training})
        k = 0 if fold is None else int(fold)
        if k not in folds:
            raise ValueError(f"datalist '{path}': fold {fold} not among its folds {folds}.")
        return [e for e in training if int(e["fold"]) != k], [e for e in training if int(e["fold"]) == k], test
    if fold not in (None, 0):
        raise ValueError(f"datalist '{path}' has no folds (no 'fold' in its entries); fold must be None, got {fold}.")
    return training, validation, test


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring); prints a one-line summary."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.data.datalist", description=__doc__.split("\n")[0])
    ap.add_argument("--data_root", required=True)
    ap.add_argument("--out", required=True, help="datalist JSON to write, e.g. data_lists/kaggle.json")
    ap.add_argument("--val_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="random", choices=list(SPLITS))
    ap.add_argument("--folds", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        dl = make_datalist(args.data_root, val_fraction=args.val_fraction, seed=args.seed, split=args.split, folds=args.folds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_datalist(dl, args.out)
    if args.folds:
        sizes = [sum(1 for e in dl["training"] if e["fold"] == k) for k in range(args.folds)]
        what = f"{len(dl['training'])} training volumes in {args.folds} folds of sizes {sizes}"
    else:
        what = f"{len(dl['training'])} training, {len(dl['validation'])} validation"
    print(f"wrote {args.out}: {what}, {len(dl['test'])} test (split {args.split}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
