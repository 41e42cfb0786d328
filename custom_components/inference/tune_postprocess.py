"""Choose the post-processing pipeline on validation volumes by the competition score, from saved logits.

    python -m custom_components.inference.tune_postprocess --logit_dir DIR --label_dir DIR --out postprocess.json \
        [--budget_minutes 60] [--workers N] [--crop N] [--min_gain 0.002] [--stages threshold,dust,...] [--start FILE]

Inputs: ``<id>.npy`` float16 logits in ``--logit_dir`` (written by ``SaveLogitsd`` during inference, so
tuning never re-runs the network) and, for exactly those ids, ``<id>.tif`` labels in ``--label_dir``
(0 / 1 / 2). The label folder is never listed: only ``label_dir/<id>.tif`` (or ``.tiff``) of the ids of
the logit folder is opened, so held-out labels in the same folder stay unread. Fewer than 4 volumes:
refused (the decision rule needs several paired gains).

Search (greedy, one stage after the other, each starting from the pipeline chosen so far): the starting
pipeline (``--start FILE``, else ``PostProcess()``'s defaults: threshold 0.5, dust < 64, fill holes) is
scored on every volume; then each stage tries its candidates, each the current pipeline with one step
added or one setting changed (``STAGES``: the threshold, the hysteresis pair, dust size and connectivity,
then each new step with its main parameter), in the canonical step order of ``ORDER``.

Decision rule (``accept``): the gain of a candidate is paired per volume, g_i = score_i(candidate) -
score_i(current). It is accepted when the mean gain is at least ``--min_gain`` (default 0.002, about the
smallest step gain the winners reported) **and** a strict majority of the volumes improve by more than
1e-4 (with 4 volumes: 3 of them), so that neither one volume's large gain nor a mean inside the
volume-to-volume noise moves the pipeline. Among the accepted candidates of a stage the one with the
largest mean gain is kept (ties: the earlier one, candidates are listed simplest first).

Time budget (``--budget_minutes``): before each candidate, the time it would take is estimated as the
longest evaluation so far; a candidate that would end past the budget is skipped (so a tight budget gets
fewer candidates, nearest the current setting first); an evaluation still running at the deadline stops
after its current volume and is discarded. To fit more candidates: ``--crop N`` scores a central N^3
crop of each volume (the metric's Betti matching grows steeply with size), ``--workers N`` scores volumes
in N processes (spare workers go to the metric's Betti tiles). Each candidate prints one line: its
gain, volumes up / down, seconds and verdict, and the time used of the budget.

Output: ``--out`` (atomic), a ``postprocess.json`` of the chosen pipeline (``load_postprocess`` reads it;
``inference.json`` / ``evaluate.json`` take it as ``--postprocess FILE``) with a ``tuning`` record:
volumes, crop, rule, start and final mean score, every candidate with its gains and seconds.

Also here: ``SaveLogitsd`` (the inference transform that writes the logits), ``read_logits``,
``probability_of``, ``logit_of``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom_components.inference.postprocess import PostProcess, pipeline_config, pipeline_from_config, save_postprocess
from custom_components.inference.postprocess._base import _to_volume

__all__ = [
    "MIN_VOLUMES",
    "LOGIT_CLIP",
    "ORDER",
    "STAGES",
    "logit_of",
    "probability_of",
    "read_logits",
    "SaveLogitsd",
    "accept",
    "tune",
    "main",
]

MIN_VOLUMES = 4
LOGIT_CLIP = 16.0
IMPROVED = 1e-4  # a volume counts as improved (worsened) when its gain is above (below) +-1e-4
ORDER = ("smooth", "binarize", "median", "closing", "dust", "unmerge", "plug_holes", "height_map_fill",
         "tunnel_repair", "fill_holes")
_LABEL_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------------------------- logits


def logit_of(prob: np.ndarray, clip: float = LOGIT_CLIP) -> np.ndarray:
    """float16 ``log(p / (1 - p))`` of a probability map, clipped to [-clip, clip]; NaN -> -clip."""
    p = np.asarray(prob, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(p) - np.log1p(-p)
    z = np.nan_to_num(z, nan=-clip, posinf=clip, neginf=-clip)
    return np.clip(z, -clip, clip).astype(np.float16)


def probability_of(logits: np.ndarray) -> np.ndarray:
    """float32 ``sigmoid(logits)``."""
    z = np.asarray(logits, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def read_logits(path) -> np.ndarray:
    """The (Z, Y, X) float16 logits of a ``.npy`` written by ``SaveLogitsd``; ValueError naming the file."""
    path = os.fspath(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"logits {path}: cannot read it ({e}).") from e
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"logits {path}: expected a 3D float array, got {arr.dtype} shape {list(arr.shape)}.")
    return arr


def _save_npy(path: str, arr: np.ndarray) -> str:
    """``np.save`` to ``path`` atomically (``custom_components.atomic.atomic_write``), its folder created."""
    from custom_components.atomic import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False), "wb")


def _stem(name: str) -> str:
    base = os.path.basename(str(name))
    for suffix in (".nii.gz", ".tiff", ".tif", ".nii", ".npy", ".nrrd", ".mha"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


class SaveLogitsd(MapTransform):
    """Write each key's map as float16 logits to ``output_dir/<id>.npy`` (atomic); the data pass unchanged.

    For inference beside the masks (``--save_logits true``): put it in ``postprocessing`` before the
    post-processing steps, where ``pred`` is still the probability map of ``ProbabilityEnsemble``
    (``input_is="probability"``, converted by ``logit_of``: clipped to +-``clip``) or a network's logit
    (``input_is="logit"``). The id is ``data[id_key]`` (the records' ``id``), else the file stem of the
    key's ``MetaTensor`` ``filename_or_obj``, else that of ``data["image"]``. A (1, Z, Y, X) map is stored
    as (Z, Y, X). 320^3 float16: 66 MB per volume. ``enabled=False`` (the bundle's ``save_logits: false``):
    nothing is written.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str = "logits", input_is: str = "probability",
                 clip: float = LOGIT_CLIP, id_key: Hashable = "id", enabled: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.enabled = bool(enabled)
        if input_is not in ("probability", "logit"):
            raise ValueError(f"SaveLogitsd: input_is must be 'probability' or 'logit', got {input_is!r}.")
        self.output_dir = os.fspath(output_dir)
        self.input_is = input_is
        self.clip = float(clip)
        self.id_key = id_key

    def _id(self, d: Mapping, key: Hashable) -> str:
        if self.id_key in d and isinstance(d[self.id_key], str):
            return d[self.id_key]
        for source in (d.get(key), d.get("image")):
            meta = getattr(source, "meta", None) or {}
            name = meta.get("filename_or_obj")
            if name:
                return _stem(name)
        raise ValueError(f"SaveLogitsd: no id for {key!r}: neither data[{self.id_key!r}] nor a filename_or_obj in "
                         f"the meta data of {key!r} or 'image'.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            vol = _to_volume(d[key], f"SaveLogitsd: {key!r}")
            if self.input_is == "probability":
                logits = logit_of(vol, self.clip)
            else:
                logits = np.clip(np.nan_to_num(vol.astype(np.float32), nan=-self.clip), -self.clip, self.clip)
            _save_npy(os.path.join(self.output_dir, f"{self._id(d, key)}.npy"), logits.astype(np.float16))
        return d


# --------------------------------------------------------------------------------------------- volumes


def _read_label(path: str) -> np.ndarray:
    """A label volume (the one place the tuner opens a label file)."""
    from custom_components.data.io import read_volume

    return read_volume(path)


def _center_crop(shape, crop: int | None) -> tuple[slice, ...]:
    if not crop:
        return tuple(slice(0, n) for n in shape)
    return tuple(slice(max(0, (n - crop) // 2), max(0, (n - crop) // 2) + min(n, crop)) for n in shape)


def load_volumes(logit_dir, label_dir, crop: int | None = None) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, probability maps, labels) for the ``<id>.npy`` of ``logit_dir`` and ``label_dir/<id>.tif``.

    ``label_dir`` is not listed; only the label files of these ids are opened. ValueError naming the
    folder when fewer than ``MIN_VOLUMES`` ids, naming every missing label and shape mismatch.
    """
    logit_dir, label_dir = os.fspath(logit_dir), os.fspath(label_dir)
    if not os.path.isdir(logit_dir):
        raise ValueError(f"logit_dir {logit_dir} is not a folder.")
    ids = sorted(_stem(n) for n in os.listdir(logit_dir) if n.endswith(".npy") and not n.startswith("."))
    if len(ids) < MIN_VOLUMES:
        raise ValueError(f"tuning needs at least {MIN_VOLUMES} validation volumes (paired gains over volumes); found "
                         f"{len(ids)} logit file(s) (*.npy) in {logit_dir}.")
    labels_at, missing = {}, []
    for i in ids:
        found = [os.path.join(label_dir, i + s) for s in _LABEL_SUFFIXES if os.path.isfile(os.path.join(label_dir, i + s))]
        if found:
            labels_at[i] = found[0]
        else:
            missing.append(f"{i}.tif")
    if missing:
        raise ValueError(f"no label in {label_dir} for: {', '.join(missing)}.")
    probs, labels = [], []
    for i in ids:
        logits = read_logits(os.path.join(logit_dir, f"{i}.npy"))
        label = _read_label(labels_at[i])
        if label.shape != logits.shape:
            raise ValueError(f"shape mismatch for {i}: logits {list(logits.shape)} vs label {labels_at[i]} "
                             f"{list(label.shape)}.")
        sl = _center_crop(label.shape, crop)
        probs.append(probability_of(logits[sl]))
        labels.append(np.ascontiguousarray(label[sl]))
    return ids, probs, labels


# --------------------------------------------------------------------------------------------- scoring

_VOLUMES: tuple[list, list] = ([], [])  # (probabilities, labels), inherited by forked scoring processes


def _score_one(job) -> tuple[float, float]:
    """(score, seconds) of one volume under one pipeline config (a worker process's job)."""
    from custom_components.metrics.score import leaderboard_score

    index, config, tile_workers = job
    t = time.perf_counter()
    mask = pipeline_from_config(config).apply_volume(_VOLUMES[0][index])
    score = leaderboard_score(mask, _VOLUMES[1][index], workers=tile_workers)["score"]
    return float(score), time.perf_counter() - t


class _Scorer:
    """Scores a pipeline config on every volume: in ``workers`` forked processes (spare workers to the
    metric's tiles) or here; stops at ``deadline`` (returns None)."""

    def __init__(self, n_volumes: int, workers: int):
        import multiprocessing as mp

        self.n = n_volumes
        workers = max(1, int(workers))
        self.procs = min(workers, n_volumes) if "fork" in mp.get_all_start_methods() else 1
        self.tile_workers = max(1, workers // self.procs)
        self.pool = None
        if self.procs > 1:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.procs, mp_context=mp.get_context("fork"))

    def __call__(self, config: dict, deadline: float) -> list[float] | None:
        jobs = [(i, config, self.tile_workers) for i in range(self.n)]
        if self.pool is None:
            scores = []
            for job in jobs:
                if time.perf_counter() > deadline:
                    return None
                scores.append(_score_one(job)[0])
            return scores
        futures = [self.pool.submit(_score_one, job) for job in jobs]
        scores = []
        for f in futures:
            while True:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    for g in futures:
                        g.cancel()
                    return None
                try:
                    scores.append(f.result(timeout=min(timeout, 5.0))[0])
                    break
                except TimeoutError:
                    continue
        return scores

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------- search


def _threshold(state):
    t = state["binarize"]["threshold"]
    grid = [round(0.3 + 0.05 * k, 2) for k in range(9)]  # 0.30 .. 0.70
    return [("binarize", {"threshold": v, "hysteresis_low": None}) for v in sorted(grid, key=lambda v: (abs(v - t), v))
            if abs(v - t) > 1e-9]


def _hysteresis(state):
    t = state["binarize"]["threshold"]
    out = []
    for high in (t, t + 0.15, t + 0.3):
        for low in (t - 0.1, t - 0.2, t - 0.3):
            if high <= 0.95 and low >= 0.05:
                out.append(("binarize", {"threshold": round(high, 3), "hysteresis_low": round(low, 3)}))
    return out


STAGES: dict[str, Callable] = {
    "threshold": _threshold,
    "hysteresis": _hysteresis,
    "dust": lambda s: [("dust", {"min_size": m, "connectivity": c}) for m in (500, 2000, 5000, 20000) for c in (26, 6)],
    "plug_holes": lambda s: [("plug_holes", {})],
    "closing": lambda s: [("closing", {"radius": 1, "structure": "cube"}), ("closing", {"radius": 2, "structure": "ball"}),
                          ("closing", {"radius": 3, "structure": "ball"})],
    "height_map_fill": lambda s: [("height_map_fill", {"max_hole_area": a}) for a in (500, 5000, None)],
    "median": lambda s: [("median", {"iterations": k}) for k in (1, 2, 4, 8)],
    "tunnel_repair": lambda s: [("tunnel_repair", {"radius": r}) for r in (1, 2)],
    "smooth": lambda s: [("smooth", {"sigma": v}) for v in (0.5, 1.0, 2.0)],
    "unmerge": lambda s: [("unmerge", {}), ("unmerge", {"levels": [0.7, 0.8, 0.9]})],
}
"""Stage name -> candidates (step name, its settings) given the current state, simplest / nearest first.
Listed in the order of the winners' reported gains: threshold and hysteresis, dust (+0.018 1st place),
hole plugging (+0.008), closing (+0.002), height-map filling (+0.003), median (+0.010 10th place),
tunnel repair, smoothing, un-merging."""


def _state_of(config: Mapping) -> dict:
    """{step name: settings} of a pipeline config; ValueError when a step repeats or is out of ``ORDER``."""
    state = {}
    names = [s["name"] for s in config["steps"]]
    if len(set(names)) != len(names) or names != sorted(names, key=ORDER.index):
        raise ValueError(f"the starting pipeline must name each step at most once, in the order {list(ORDER)}; "
                         f"got {names}.")
    for step in config["steps"]:
        state[step["name"]] = {k: v for k, v in step.items() if k != "name"}
    if "binarize" not in state:
        raise ValueError("the starting pipeline must binarize the probability map (a 'binarize' step).")
    return state


def _config_of(state: Mapping) -> dict:
    return {"steps": [{"name": n, **state[n]} for n in ORDER if state.get(n) is not None]}


def accept(gains: Sequence[float], min_gain: float) -> bool:
    """The decision rule: mean gain >= ``min_gain`` and a strict majority of volumes improved by > 1e-4."""
    g = np.asarray(gains, dtype=np.float64)
    return bool(g.size and g.mean() >= min_gain and np.count_nonzero(g > IMPROVED) * 2 > g.size)


def _describe(step: str, settings: Mapping) -> str:
    return step + (" " + " ".join(f"{k}={v}" for k, v in settings.items()) if settings else "")


def tune(logit_dir, label_dir, out, budget_minutes: float = 60.0, min_gain: float = 0.002, workers: int = 1,
         crop: int | None = None, stages: Sequence[str] | None = None, start=None,
         log: Callable[[str], None] = print) -> dict:
    """Run the search of the module docstring and write ``out``; returns the written config (with ``tuning``)."""
    t0 = time.perf_counter()
    deadline = t0 + 60.0 * float(budget_minutes)
    stages = list(STAGES) if stages is None else list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}.")
    start_config = pipeline_config(PostProcess()) if start is None else pipeline_config(start)
    state = _state_of(start_config)
    ids, probs, labels = load_volumes(logit_dir, label_dir, crop)
    _VOLUMES[0][:], _VOLUMES[1][:] = probs, labels
    log(f"tuning on {len(ids)} volumes{f' (central {crop}^3 crops)' if crop else ''}, budget {budget_minutes:g} min, "
        f"rule: mean gain >= {min_gain:g} and more than half of the volumes up; stages: {', '.join(stages)}")
    scorer = _Scorer(len(ids), workers)
    record: dict[str, Any] = {"volumes": ids, "crop": crop, "budget_minutes": budget_minutes, "min_gain": min_gain,
                              "rule": f"mean paired gain >= {min_gain:g} and more than half of the volumes improve by "
                                      f"> {IMPROVED:g}", "candidates": []}
    try:
        t = time.perf_counter()
        best = scorer(_config_of(state), deadline)
        took = [time.perf_counter() - t]
        if best is None:
            log("budget spent before the starting pipeline was scored on every volume: writing it unchanged")
            record.update(status="budget too small for one evaluation", seconds=time.perf_counter() - t0)
            return _write(out, state, record)
        record["start_score"] = float(np.mean(best))
        log(f"start: {_describe_state(state)}: mean score {np.mean(best):.4f} ({took[0]:.1f} s)")
        k = 0
        for stage in stages:
            kept = None
            for step, settings in STAGES[stage](state):
                k += 1
                trial = dict(state)
                trial[step] = dict(settings)
                entry = {"stage": stage, "step": step, "settings": settings}
                left = deadline - time.perf_counter()
                if max(took) > left:
                    entry["status"] = "skipped (budget)"
                    record["candidates"].append(entry)
                    log(f"[{k:3d}] {stage:<15} {_describe(step, settings):<44} skipped: needs ~{max(took):.0f} s, "
                        f"{max(left, 0):.0f} s left")
                    continue
                t = time.perf_counter()
                scores = scorer(_config_of(trial), deadline)
                seconds = time.perf_counter() - t
                if scores is None:
                    entry.update(status="stopped at the deadline", seconds=seconds)
                    record["candidates"].append(entry)
                    log(f"[{k:3d}] {stage:<15} {_describe(step, settings):<44} stopped at the deadline")
                    continue
                took.append(seconds)
                gains = np.asarray(scores) - np.asarray(best)
                ok = accept(gains, min_gain)
                entry.update(mean_gain=float(gains.mean()), gains=[float(g) for g in gains],
                             improved=int(np.count_nonzero(gains > IMPROVED)),
                             worsened=int(np.count_nonzero(gains < -IMPROVED)), seconds=seconds,
                             status="accepted" if ok else "rejected")
                record["candidates"].append(entry)
                log(f"[{k:3d}] {stage:<15} {_describe(step, settings):<44} gain {gains.mean():+.4f} "
                    f"({entry['improved']}/{len(ids)} up, {entry['worsened']} down) {seconds:6.1f} s "
                    f"{entry['status']:<8} [{time.perf_counter() - t0:.0f}/{60 * budget_minutes:.0f} s]")
                if ok and (kept is None or gains.mean() > kept[0]):
                    kept = (float(gains.mean()), step, dict(settings), scores, entry)
            if kept is not None:
                _, step, settings, best, entry = kept
                state[step] = settings
                entry["status"] = "kept"
                log(f"      {stage}: kept {_describe(step, settings)} (mean score {np.mean(best):.4f})")
        record.update(status="done", final_score=float(np.mean(best)),
                      final_scores={i: float(s) for i, s in zip(ids, best)}, seconds=time.perf_counter() - t0)
        log(f"final: {_describe_state(state)}: mean score {np.mean(best):.4f} (start {record['start_score']:.4f}), "
            f"{record['seconds']:.0f} s")
        return _write(out, state, record)
    finally:
        scorer.close()
        _VOLUMES[0][:], _VOLUMES[1][:] = [], []


def _describe_state(state: Mapping) -> str:
    return " -> ".join(_describe(n, state[n]) for n in ORDER if state.get(n) is not None)


def _write(out, state: Mapping, record: dict) -> dict:
    pipeline = pipeline_from_config(_config_of(state), where="tuned pipeline")
    save_postprocess(out, pipeline, tuning=record)
    config = pipeline_config(pipeline)
    config["tuning"] = record
    return config


# --------------------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """Command line; exit status 0 when ``--out`` is written, 1 with the reason on stderr otherwise."""
    ap = argparse.ArgumentParser(prog="python -m custom_components.inference.tune_postprocess",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--logit_dir", required=True, help="folder of <id>.npy float16 logits (SaveLogitsd)")
    ap.add_argument("--label_dir", required=True, help="folder holding <id>.tif labels of those ids (0/1/2)")
    ap.add_argument("--out", required=True, help="the postprocess.json to write")
    ap.add_argument("--budget_minutes", type=float, default=60.0, help="wall-clock budget (default 60)")
    ap.add_argument("--min_gain", type=float, default=0.002, help="smallest mean paired gain kept (default 0.002)")
    ap.add_argument("--workers", type=int, default=1, help="scoring processes (volumes, then Betti tiles)")
    ap.add_argument("--crop", type=int, default=None, help="score central N^3 crops (faster metric)")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    ap.add_argument("--start", default=None, help="a postprocess.json to start from (default PostProcess())")
    a = ap.parse_args(argv)
    try:
        if a.budget_minutes <= 0 or a.workers < 1 or (a.crop is not None and a.crop < 8):
            raise ValueError("--budget_minutes must be > 0, --workers >= 1 and --crop >= 8.")
        start = None
        if a.start:
            from custom_components.inference.postprocess import load_postprocess

            start = load_postprocess(a.start)
        stages = [s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None
        tune(a.logit_dir, a.label_dir, a.out, a.budget_minutes, a.min_gain, a.workers, a.crop, stages, start,
             log=lambda line: print(line, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
