"""What each part of the topology-aware setup is worth on the synthetic scrolls, against nnU-Net too.

    python bench/quality.py --out runs/quality            # the whole study, ~60 min on 2 CPU cores
    python bench/quality.py --out runs/quality --quick    # every row at a tiny budget (a smoke run)

One synthetic training set (``--train_profile``, ``--train_seed``, ``--train_volumes``; a quarter of it
held for validation by the datalist) and labelled held-out volumes of a different seed and a different
profile (``--test_profile``, default ``synthetic.HELD_OUT_PROFILE``, ``--test_seed``). Every row is a
folder of uint8 predictions of the held-out volumes scored with the competition score
(``custom_components.metrics.evaluate.score_folders``, docs/METRIC.md), mean over the volumes:

- trivial baselines, no training: all zeros, all ones, Otsu threshold of the image;
- ``baseline`` (BCE + Dice) and ``composite`` (train.json's default ``loss_weights``), ``--seeds`` each;
- ablations (first seed): the composite without ``cldice``, ``skeleton_recall``, ``surface_distance``,
  ``topology``;
- every trained row raw (threshold 0.5) and with the default post-processing (``+post``), both written
  by ``bundle/configs/evaluate.json``;
- ``+tuned`` for the threshold, baseline and composite rows (``--tune_rows``): the post-processing chosen
  by ``custom_components.inference.tune_postprocess`` on the row's own float16 logits of the
  **validation** volumes (the quarter of the training set; ``inference.json --save_logits true``) and
  their labels, then applied (``load_postprocess`` on sigmoid(logits)) to the row's held-out logits
  (``evaluate.json --save_logits true``). The threshold row has no network: its "logits" are the image,
  ``(image - otsu(image)) / (0.5 std(image))`` per volume, so p > 0.5 is exactly the Otsu threshold and
  the same tuner chooses its threshold and steps;
- the post-processing table of every tuned row: raw, then the tuned pipeline's steps added one at a
  time in the pipeline's order (each line the pipeline up to that step), ending at the tuned pipeline,
  with each step's seconds per held-out volume;
- ``nnunet``: nnU-Net v2 (its own default 3d_fullres plan) trained on the same volumes, converted by
  ``custom_components.data.convert_nnunet``, for the mean wall-clock training time of the composite rows, in
  its own venv (``bench/nnunet_baseline.py``); ``--skip_nnunet`` leaves it out.

Each trained row is the real bundle: ``python -m monai.bundle run training`` with ``train.json`` +
``demo.json`` (CPU, small DynUNet, 32^3 patches) + the study's override file (epochs, iterations, loss
weights, seed) written into the row's folder, then ``evaluate.json`` on the held-out volumes with the
best checkpoint (chosen on the validation volumes). All rows share budget, patch, network and data; the
runs go one after another, each with the whole machine (``OMP_NUM_THREADS``).

The table (``results.md``, ``results.json`` in ``--out``) has score, TopoScore, SurfaceDice, VOI score,
training wall time and seconds per training step; rows with several seeds show the mean and, in
brackets, half the range. Then the post-processing tables, the targets, and the closing lines
``threshold:``, ``baseline:``, ``composite:`` (score, TopoScore, VOI score; raw, trained rows mean over
seeds), ``threshold_tuned:``, ``composite_tuned:`` (the same with the tuned pipeline) and ``post_gain:``
(composite_tuned minus composite, the same three numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from custom_components.metrics.evaluate import score_folders  # noqa: E402
from custom_components.data.io import read_volume, write_volume  # noqa: E402
from nnunet_baseline import _run, train_and_predict  # noqa: E402  (bench/ is the script's folder)

CONFIGS = os.path.join(ROOT, "bundle", "configs")
METRICS = ("score", "topo_score", "surface_dice", "voi_score")
ABLATED = ("cldice", "skeleton_recall", "surface_distance", "topology")
SUMMARY = ("score", "topo_score", "voi_score")  # the three numbers of each closing line
#: The targets of the tuned post-processing (issue 15), checked by ``targets``.
TARGET_POST_GAIN = 0.03  # composite_tuned - composite, held-out score
TARGET_MAX_DROP = 0.01  # no tuned row below its raw score by more than this
TARGET_OVER_THRESHOLD = 0.05  # composite_tuned - threshold_tuned
THRESHOLD_SCALE = 0.5  # the threshold row's "logits": (image - otsu) / (THRESHOLD_SCALE * std(image))


def default_weights() -> dict[str, float]:
    """The composite's ``loss_weights`` as train.json sets them (the one place they are defined)."""
    with open(os.path.join(CONFIGS, "train.json")) as f:
        return {k: float(v) for k, v in json.load(f)["loss_weights"].items()}


def loss_rows(seeds: list[int]) -> list[tuple[str, dict[str, float], int]]:
    """``(row name, loss_weights, seed)`` for every trained row of the study."""
    composite = default_weights()
    baseline = {k: (v if k in ("bce", "dice") else 0.0) for k, v in composite.items()}
    rows = [(f"baseline_s{s}", baseline, s) for s in seeds] + [(f"composite_s{s}", composite, s) for s in seeds]
    rows += [(f"no_{term}", {**composite, term: 0.0}, seeds[0]) for term in ABLATED]
    return rows


def run(cmd: list[str], log: str) -> float:
    """Run ``cmd`` in the repository with its output appended to ``log`` (``nnunet_baseline._run``, the one
    runner of the benchmarks); the wall time in seconds. A failure raises with the log's last lines."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    return _run(cmd, None, log, log=lambda line: None, cwd=ROOT)


def make_data(out: str, a) -> tuple[str, str, str]:
    """Training set (+ datalist) and held-out set; returns (train_root, datalist, held_out_root)."""
    py = sys.executable
    train, held = os.path.join(out, "data_train"), os.path.join(out, "data_held_out")
    log = os.path.join(out, "data.log")
    shape = [str(s) for s in a.shape]
    if not os.path.exists(os.path.join(train, "train.csv")):
        run([py, "-m", "custom_components.data.synthetic", "--out", train, "--volumes", str(a.train_volumes),
             "--test", "1", "--profile", a.train_profile, "--shape", *shape, "--seed", str(a.train_seed)], log)
    if not os.path.exists(os.path.join(held, "train.csv")):
        run([py, "-m", "custom_components.data.synthetic", "--out", held, "--volumes", "1", "--test",
             str(a.test_volumes), "--test_labels", "--profile", a.test_profile, "--shape", *shape,
             "--preview", "--seed", str(a.test_seed)], log)
    datalist = os.path.join(out, "datalist.json")
    run([py, "-m", "custom_components.data.datalist", "--data_root", train, "--out", datalist,
         "--val_fraction", "0.25", "--seed", "0"], log)
    return train, datalist, held


def validation_images(train: str, datalist: str, out: str) -> tuple[str, list[str]]:
    """A folder of links to the datalist's validation images (the input of their inference), and their ids.

    The tuning sees only these volumes: their logits, and the labels of exactly these ids in the training
    set's ``train_labels`` (``tune_postprocess`` opens no other label)."""
    with open(datalist) as f:
        records = json.load(f)["validation"]
    folder = os.path.join(out, "data_val", "images")
    os.makedirs(folder, exist_ok=True)
    ids = [r["id"] for r in records]
    for r in records:
        link = os.path.join(folder, f"{r['id']}.tif")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(train, r["image"])), link)
    return folder, ids


def threshold_logits(image: np.ndarray) -> np.ndarray:
    """The threshold row's stand-in for logits: ``(image - otsu(image)) / (THRESHOLD_SCALE * std(image))``,
    float16, clipped to +-16 (``tune_postprocess.LOGIT_CLIP``). sigmoid of it is > 0.5 exactly where the
    image is above its Otsu threshold (the raw threshold row), so the tuner's threshold grid 0.30-0.70
    moves the cut by +-0.42 standard deviations of the volume's intensity."""
    from skimage.filters import threshold_otsu

    from custom_components.inference.tune_postprocess import LOGIT_CLIP

    img = np.asarray(image, dtype=np.float32)
    scale = THRESHOLD_SCALE * float(img.std()) or 1.0
    z = (img - np.float32(threshold_otsu(image))) / np.float32(scale)
    return np.clip(z, -LOGIT_CLIP, LOGIT_CLIP).astype(np.float16)


def write_threshold_logits(image_dir: str, out_dir: str, ids: list[str] | None = None) -> str:
    """``threshold_logits`` of every image of ``image_dir`` (or of ``ids``) as ``out_dir/<id>.npy``."""
    os.makedirs(out_dir, exist_ok=True)
    names = [f"{i}.tif" for i in ids] if ids is not None else sorted(n for n in os.listdir(image_dir) if n.endswith(".tif"))
    for name in names:
        np.save(os.path.join(out_dir, name[:-4] + ".npy"), threshold_logits(read_volume(os.path.join(image_dir, name))))
    return out_dir


def trivial_predictions(held: str, out: str) -> dict[str, str]:
    """Folders of all-zeros, all-ones and Otsu-threshold predictions of the held-out images."""
    from skimage.filters import threshold_otsu

    folders = {name: os.path.join(out, "trivial", name) for name in ("zeros", "ones", "threshold")}
    for d in folders.values():
        os.makedirs(d, exist_ok=True)
    img_dir = os.path.join(held, "test_images")
    for name in sorted(os.listdir(img_dir)):
        image = read_volume(os.path.join(img_dir, name))
        preds = {"zeros": np.zeros(image.shape, np.uint8), "ones": np.ones(image.shape, np.uint8),
                 "threshold": (image > threshold_otsu(image)).astype(np.uint8)}
        for row, pred in preds.items():
            write_volume(os.path.join(folders[row], name), pred)
    return folders


def seconds_per_step(run_dir: str, batch_size: int) -> float | None:
    """Median training seconds per step from the run's TensorBoard ``throughput/samples_per_s``."""
    from custom_components.inference.report import read_scalars

    values = [v for _, v in read_scalars(run_dir).get("throughput/samples_per_s", [])]
    return float(batch_size / np.median(values)) if values else None


def train_and_evaluate(name: str, weights: dict, seed: int, data: tuple[str, str, str], out: str, a,
                       val_images: str | None = None) -> dict:
    """One trained row: bundle training, then evaluate.json on the held-out set (raw and post-processed,
    float16 logits saved); with ``val_images``, inference.json on those validation volumes too (logits)."""
    train, datalist, held = data
    row_dir = os.path.join(out, name)
    os.makedirs(row_dir, exist_ok=True)
    overrides = {"epochs": a.epochs, "iterations_per_epoch": a.iterations, "val_interval": a.val_interval,
                 "seed": seed, "loss_weights": weights}
    override_file = os.path.join(row_dir, "study.json")
    with open(override_file, "w") as f:
        json.dump(overrides, f, indent=2)
    log = os.path.join(row_dir, "run.log")
    py = sys.executable
    configs = [os.path.join(CONFIGS, c) for c in ("train.json", "demo.json")] + [override_file]
    train_s = run([py, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs),
                   "--dataset_dir", train, "--datalist", datalist, "--output_dir", os.path.join(row_dir, "run"),
                   "--overwrite", "true"], log)
    ckpt = os.path.join(row_dir, "run", "checkpoints", "best.pt")
    eval_configs = [os.path.join(CONFIGS, c) for c in ("inference.json", "demo_inference.json", "evaluate.json")]
    run([py, "-m", "monai.bundle", "run", "--config_file", json.dumps(eval_configs),
         "--input_dir", os.path.join(held, "test_images"), "--label_dir", os.path.join(held, "test_labels"),
         "--output_dir", os.path.join(row_dir, "eval"), "--ckpt_path", ckpt, "--save_logits", "true"], log)
    val_logits, val_s = None, None
    if val_images is not None:  # the validation volumes' logits, for tuning (no labels read here)
        infer_configs = [os.path.join(CONFIGS, c) for c in ("inference.json", "demo_inference.json")]
        val_s = run([py, "-m", "monai.bundle", "run", "--config_file", json.dumps(infer_configs),
                     "--input_dir", val_images, "--output_dir", os.path.join(row_dir, "val"), "--ckpt_path", ckpt,
                     "--save_logits", "true"], log)
        val_logits = os.path.join(row_dir, "val", "logits")
    with open(os.path.join(CONFIGS, "demo.json")) as f:
        batch = int(json.load(f)["batch_size"])
    return {"train_s": train_s, "s_per_step": seconds_per_step(os.path.join(row_dir, "run"), batch),
            "raw": os.path.join(row_dir, "eval", "raw"), "post": os.path.join(row_dir, "eval", "postprocessed"),
            "held_logits": os.path.join(row_dir, "eval", "logits"), "val_logits": val_logits, "val_infer_s": val_s,
            "run_dir": os.path.join(row_dir, "run")}


def score(pred_dir: str, label_dir: str, workers: int) -> dict:
    """Mean of each metric over the held-out volumes, and the per-volume rows."""
    rows = score_folders(pred_dir, label_dir, workers)
    return {**{k: float(np.mean([r[k] for r in rows])) for k in METRICS}, "volumes": rows}


def spread(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ({(max(values) - min(values)) / 2:.4f})"


def table(results: dict[str, dict]) -> str:
    """Markdown table; rows named ``x_s<seed>[+post|+tuned]`` are merged into one row ``x`` with mean (half range)."""
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        m = re.fullmatch(r"(.*)_s\d+(\+post|\+tuned)?", name)
        base = m.group(1) + (m.group(2) or "") if m else name
        groups.setdefault(base, []).append(r)
    head = "| row | seeds | score | TopoScore | SurfaceDice | VOI score | training s | s / step |"
    lines = [head, "|" + "---|" * 8]
    for base, rs in groups.items():
        cells = [spread([r[k] for r in rs]) for k in METRICS]
        for key, fmt in (("train_s", "{:.0f}"), ("s_per_step", "{:.3f}")):
            vals = [r[key] for r in rs if r.get(key) is not None]
            cells.append(fmt.format(np.mean(vals)) if vals else "-")
        lines.append(f"| {base} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _family(results: dict[str, dict], prefix: str, suffix: str = "") -> list[dict]:
    """The rows ``threshold`` / ``<prefix><seed>`` with exactly ``suffix`` ("" = raw, "+tuned", "+post")."""
    pattern = re.escape(prefix) + (r"\d*" if prefix.endswith("_s") else "") + re.escape(suffix)
    return [r for n, r in results.items() if re.fullmatch(pattern, n)]


def summary_lines(results: dict[str, dict]) -> list[str]:
    """The closing lines: ``name: score TopoScore VOI-score`` (mean over seeds; raw unless ``_tuned``) and
    ``post_gain:`` (composite_tuned minus composite, the same three numbers). A line whose rows are
    missing (``--rows``) says ``n/a``."""
    def means(prefix, suffix=""):
        rs = _family(results, prefix, suffix)
        return [float(np.mean([r[k] for r in rs])) for k in SUMMARY] if rs else None

    def line(name, values):
        return f"{name}: " + (" ".join(f"{v:.4f}" for v in values) if values else "n/a")

    comp, comp_t = means("composite_s"), means("composite_s", "+tuned")
    gain = [t - r for t, r in zip(comp_t, comp)] if comp and comp_t else None
    return [line("threshold", means("threshold")), line("baseline", means("baseline_s")),
            line("composite", comp), line("threshold_tuned", means("threshold", "+tuned")),
            line("composite_tuned", comp_t), line("post_gain", gain)]


def targets(results: dict[str, dict]) -> list[str]:
    """The three targets of the tuned post-processing, each ``met`` / ``missed`` with its figures."""
    def mean(prefix, suffix=""):
        rs = _family(results, prefix, suffix)
        return float(np.mean([r["score"] for r in rs])) if rs else None

    out = []
    comp, comp_t, thr_t = mean("composite_s"), mean("composite_s", "+tuned"), mean("threshold", "+tuned")
    if comp is not None and comp_t is not None:
        g = comp_t - comp
        out.append(f"- composite_tuned - composite = {g:+.4f} (target >= +{TARGET_POST_GAIN:.2f}): "
                   f"{'met' if g >= TARGET_POST_GAIN else 'missed'}")
    drops = []
    for name, r in results.items():
        if name.endswith("+tuned") and name[: -len("+tuned")] in results:
            drops.append((r["score"] - results[name[: -len("+tuned")]]["score"], name))
    if drops:
        worst, who = min(drops)
        out.append(f"- worst tuned - raw over the tuned rows = {worst:+.4f} ({who}; target >= -{TARGET_MAX_DROP:.2f}): "
                   f"{'met' if worst >= -TARGET_MAX_DROP else 'missed'}")
    if comp_t is not None and thr_t is not None:
        g = comp_t - thr_t
        out.append(f"- composite_tuned - threshold_tuned = {g:+.4f} (target >= +{TARGET_OVER_THRESHOLD:.2f}): "
                   f"{'met' if g >= TARGET_OVER_THRESHOLD else 'missed'}")
    return out


def _describe(step: dict) -> str:
    """One step of a ``postprocess.json`` in a few words (its settings that are not None; a plain threshold's
    connectivity, which only hysteresis uses, left out)."""
    skip = {"name", "enabled"} | ({"connectivity"} if step["name"] == "binarize" and step.get("hysteresis_low") is None
                                  else set())
    settings = " ".join(f"{k}={v}" for k, v in step.items() if k not in skip and v is not None)
    return step["name"] + (f" {settings}" if settings else "")


def run_steps(pipeline_file: str, logit_dir: str, out_dir: str) -> list[dict]:
    """The held-out volumes through the tuned pipeline one step at a time.

    For every volume ``<id>.npy`` of ``logit_dir``: probabilities = sigmoid(logits), then the steps of
    ``pipeline_file`` (``load_postprocess``) in order, each timed; after step k the mask is the output of
    the pipeline cut after step k and goes to ``out_dir/<k>/<id>.tif``. A step that returns a probability
    map (smoothing) is merged with the step after it. The last folder is checked to equal the whole
    pipeline applied by ``load_postprocess`` (the ``+tuned`` row). Returns one entry per folder:
    ``{"label": "+<steps>", "folder", "seconds": [per volume], "steps": [...]}``."""
    from custom_components.inference.postprocess import load_postprocess, pipeline_config
    from custom_components.inference.tune_postprocess import probability_of, read_logits

    pipeline = load_postprocess(pipeline_file)
    steps = pipeline.transform.steps
    config = pipeline_config(pipeline)["steps"]
    entries: list[dict] = []
    ids = sorted(n[:-4] for n in os.listdir(logit_dir) if n.endswith(".npy"))
    for vid in ids:
        prob = probability_of(read_logits(os.path.join(logit_dir, f"{vid}.npy")))
        out, p, k, pending, pending_s = prob, prob, 0, [], 0.0
        for step, cfg in zip(steps, config):
            t = time.perf_counter()
            res = step.apply_volume(out, prob=p) if step.needs_probability else step.apply_volume(out)
            pending_s += time.perf_counter() - t
            pending.append(_describe(cfg))
            out = res
            if step.produces_probability:
                p = res
                continue
            if len(entries) <= k:
                entries.append({"label": " + ".join(pending), "folder": os.path.join(out_dir, str(k)), "seconds": []})
            entries[k]["seconds"].append(pending_s)
            write_volume(os.path.join(entries[k]["folder"], f"{vid}.tif"), (out != 0).astype(np.uint8))
            k, pending, pending_s = k + 1, [], 0.0
        whole = np.asarray(pipeline({"pred": prob[None]})["pred"])[0]
        if not np.array_equal(whole != 0, out != 0):
            raise RuntimeError(f"step-by-step run of {pipeline_file} differs from the whole pipeline on {vid}")
    return entries


def tune_row(name: str, val_logits: str, val_labels: str, held_logits: str, row_dir: str, labels: str, a) -> dict:
    """Tune the post-processing of one row on its validation logits, apply it to its held-out logits.

    ``tune_postprocess`` (its own process, ``--budget_minutes a.tune_minutes``, ``--workers a.workers``)
    on ``val_logits`` and the labels of those ids in ``val_labels``; then ``run_steps`` on the held-out
    logits and every cumulative folder scored against the held-out ``labels``. Returns the ``+tuned`` row
    (scores, seconds per volume), the step table and the tuning record."""
    os.makedirs(row_dir, exist_ok=True)
    pp_file = os.path.join(row_dir, "postprocess.json")
    log = os.path.join(row_dir, "tune.log")
    tune_s = run([sys.executable, "-m", "custom_components.inference.tune_postprocess", "--logit_dir", val_logits,
                  "--label_dir", val_labels, "--out", pp_file, "--budget_minutes", str(a.tune_minutes),
                  "--workers", str(a.workers)], log)
    with open(pp_file) as f:
        tuned = json.load(f)
    steps, scored = [], {}
    for entry in run_steps(pp_file, held_logits, os.path.join(row_dir, "held_out_steps")):
        scored = score(entry["folder"], labels, a.workers)
        steps.append({"label": entry["label"], "s_per_volume": float(np.mean(entry["seconds"])),
                      **{k: scored[k] for k in METRICS}, "folder": entry["folder"]})
    return {"row": {**scored, "s_per_volume": float(sum(e["s_per_volume"] for e in steps))}, "steps": steps,
            "folder": steps[-1]["folder"], "pipeline": tuned["steps"], "tuning": tuned.get("tuning", {}),
            "tune_s": tune_s}


def step_table(name: str, raw: dict, tuned: dict) -> str:
    """The post-processing table of one row: raw, each step added in turn, the tuned pipeline's total."""
    lines = [f"**{name}** (tuned on {len(tuned['tuning'].get('volumes', []))} validation volumes: "
             f"{tuned['tuning'].get('start_score', float('nan')):.4f} -> {tuned['tuning'].get('final_score', float('nan')):.4f} "
             f"there, {tuned['tune_s']:.0f} s)", "",
             "| step | score | gain | TopoScore | SurfaceDice | VOI score | s / volume |", "|" + "---|" * 7]
    prev = raw["score"]
    lines.append(f"| raw (p > 0.5) | {raw['score']:.4f} | | {raw['topo_score']:.4f} | {raw['surface_dice']:.4f} | "
                 f"{raw['voi_score']:.4f} | - |")
    for e in tuned["steps"]:
        if e["label"] == "binarize threshold=0.5":  # the raw prediction itself
            continue
        lines.append(f"| + {e['label']} | {e['score']:.4f} | {e['score'] - prev:+.4f} | {e['topo_score']:.4f} | "
                     f"{e['surface_dice']:.4f} | {e['voi_score']:.4f} | {e['s_per_volume']:.3f} |")
        prev = e["score"]
    t = tuned["row"]
    lines.append(f"| **tuned** | **{t['score']:.4f}** | {t['score'] - raw['score']:+.4f} | {t['topo_score']:.4f} | "
                 f"{t['surface_dice']:.4f} | {t['voi_score']:.4f} | {t['s_per_volume']:.3f} |")
    return "\n".join(lines)


def hard_case(held_root: str, a) -> tuple[str, list[tuple[str, int]]]:
    """The held-out volume with the most contacts + holes, and the Z slices through one contact (touching
    sheets) and one hole, regenerated from the generator's own record of where it put them."""
    from custom_components.data.synthetic import dataset_ids, generate_volume

    ids = dataset_ids(a.test_seed, a.test_profile, 1 + a.test_volumes)
    best = None
    for i in range(1, 1 + a.test_volumes):  # volume 0 is the set's one training volume
        _, _, info = generate_volume(tuple(a.shape), (a.test_seed, i), a.test_profile)
        holes = [h for h in info["holes"] if h["kind"] == "hole"]
        n = len(info["contacts"]) + len(holes)
        if best is None or n > best[0]:
            best = (n, ids[i], info["contacts"], holes)
    _, vid, contacts, holes = best
    slices = [(f"contact of sheets {c['sheets']}", int(c["centre"][0])) for c in contacts[:1]]
    slices += [(f"hole in sheet {h['sheet']}", int(h["centre"][0])) for h in holes[:1]]
    return vid, slices or [("mid slice", a.shape[0] // 2)]


def figures(out: str, held_root: str, folders: dict[str, str], run_dirs: dict[str, str], a) -> list[str]:
    """``hard_case.png`` (image, label and each row's prediction on the hard case's slices) and
    ``curves.png`` (validation score and Dice loss per epoch of every trained row, the composite's terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from custom_components.inference.report import read_scalars

    vid, slices = hard_case(held_root, a)
    image = read_volume(os.path.join(held_root, "test_images", f"{vid}.tif"))
    label = read_volume(os.path.join(held_root, "test_labels", f"{vid}.tif"))
    cols = [("image", None), ("label (1 white, 2 grey)", None)] + list(folders.items())
    fig, axes = plt.subplots(len(slices), len(cols), figsize=(2.6 * len(cols), 2.8 * len(slices)), squeeze=False)
    for r, (what, z) in enumerate(slices):
        for c, (name, folder) in enumerate(cols):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(image[z], cmap="gray")
            elif c == 1:
                ax.imshow(np.where(label[z] == 2, 0.35, (label[z] == 1).astype(float)), cmap="gray", vmin=0, vmax=1)
            else:
                pred = read_volume(os.path.join(folder, f"{vid}.tif"))[z]
                ax.imshow(np.where(label[z] == 2, 0.35, pred.astype(float)), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name}\nz={z}: {what}" if c < 2 else name, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"held-out volume {vid} (scroll {a.test_profile}); predictions grey where label 2", fontsize=8)
    fig.tight_layout()
    hard_png = os.path.join(out, "hard_case.png")
    fig.savefig(hard_png, dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    first = None
    for name, run_dir in run_dirs.items():
        scalars = read_scalars(run_dir)
        for ax, tag in ((axes[0], "val_score"), (axes[1], "loss/dice")):
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, marker=".", label=name)
        if first is None and name.startswith("composite"):
            first = name
            for tag in sorted(t for t in scalars if t.startswith("loss/")):
                steps, values = zip(*scalars[tag])
                axes[2].plot(steps, values, marker=".", label=tag[5:])
    axes[0].set(title="validation score (training-profile volumes)", xlabel="epoch")
    axes[1].set(title="soft Dice loss, every row (epoch mean)", xlabel="epoch")
    axes[2].set(title=f"every loss term of {first} (unweighted)", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    curves_png = os.path.join(out, "curves.png")
    fig.savefig(curves_png, dpi=90)
    plt.close(fig)
    return [hard_png, curves_png]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--train_profile", default="34117")
    p.add_argument("--test_profile", default="35360", help="held-out profile (synthetic.HELD_OUT_PROFILE; a test "
                   "keeps the two in sync)")
    p.add_argument("--train_seed", type=int, default=0)
    p.add_argument("--test_seed", type=int, default=1)
    p.add_argument("--train_volumes", type=int, default=16,
                   help="training volumes; a quarter is held for validation (the tuning needs >= 4)")
    p.add_argument("--test_volumes", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    p.add_argument("--val_interval", type=int, default=3)
    p.add_argument("--rows", nargs="*", help="only these trained rows (e.g. composite_s0 no_topology)")
    p.add_argument("--skip_nnunet", action="store_true")
    p.add_argument("--nnunet_budget_s", type=float, help="default: mean training time of the composite rows")
    p.add_argument("--workers", type=int, default=2, help="metric processes")
    p.add_argument("--tune_rows", nargs="*", default=["threshold", "baseline", "composite"],
                   help="rows whose post-processing is tuned: threshold, and trained rows by name or name "
                        "without _s<seed> (default: threshold baseline composite); none: no tuning")
    p.add_argument("--tune_minutes", type=float, default=4.0, help="tune_postprocess budget per tuned row")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget for a smoke run (2 epochs x 5 iterations, 2 held-out volumes, 1 min tuning)")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.iterations, a.val_interval, a.test_volumes, a.tune_minutes = 2, 5, 2, 2, 1.0
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    data = make_data(a.out, a)
    labels = os.path.join(data[2], "test_labels")
    val_labels = os.path.join(data[0], "train_labels")
    val_images, val_ids = validation_images(data[0], data[1], a.out)
    tune_rows = set(a.tune_rows or [])
    if tune_rows and len(val_ids) < 4:
        raise SystemExit(f"tuning needs >= 4 validation volumes; --train_volumes {a.train_volumes} gives {len(val_ids)}")
    results: dict[str, dict] = {}
    tuned: dict[str, dict] = {}
    for row, folder in trivial_predictions(data[2], a.out).items():
        results[row] = {**score(folder, labels, a.workers), "train_s": None, "s_per_step": None}
    curves = {}
    folders = {"threshold": os.path.join(a.out, "trivial", "threshold")}
    if "threshold" in tune_rows:
        print("== threshold: tuning its post-processing on the validation volumes", flush=True)
        thr = os.path.join(a.out, "trivial", "threshold_tuning")
        held_logits = write_threshold_logits(os.path.join(data[2], "test_images"), os.path.join(thr, "held_out_logits"))
        val_logits = write_threshold_logits(val_images, os.path.join(thr, "val_logits"), val_ids)
        tuned["threshold"] = tune_row("threshold", val_logits, val_labels, held_logits, thr, labels, a)
        results["threshold+tuned"] = {**tuned["threshold"]["row"], "train_s": None, "s_per_step": None}
        folders["threshold+tuned"] = tuned["threshold"]["folder"]
        print(f"   score {results['threshold']['score']:.4f}, +tuned {results['threshold+tuned']['score']:.4f}",
              flush=True)
    for name, weights, seed in loss_rows(a.seeds):
        if a.rows and name not in a.rows:
            continue
        tune_this = name in tune_rows or re.sub(r"_s\d+$", "", name) in tune_rows
        print(f"== {name}: loss_weights {weights}, seed {seed}", flush=True)
        r = train_and_evaluate(name, weights, seed, data, a.out, a, val_images if tune_this else None)
        timing = {"train_s": r["train_s"], "s_per_step": r["s_per_step"]}
        results[name] = {**score(r["raw"], labels, a.workers), **timing}
        results[f"{name}+post"] = {**score(r["post"], labels, a.workers), **timing}
        if tune_this:
            tuned[name] = tune_row(name, r["val_logits"], val_labels, r["held_logits"], os.path.join(a.out, name, "tuned"),
                                   labels, a)
            results[f"{name}+tuned"] = {**tuned[name]["row"], **timing}
        curves[name] = r["run_dir"]
        if name.endswith("_s" + str(a.seeds[0])):
            folders[name] = r["raw"]
            if name.startswith("composite"):
                folders[name + "+post"] = r["post"]
                if tune_this:
                    folders[name + "+tuned"] = tuned[name]["folder"]
        print(f"   score {results[name]['score']:.4f}, +post {results[name + '+post']['score']:.4f}"
              + (f", +tuned {results[name + '+tuned']['score']:.4f}" if tune_this else "")
              + f", {r['train_s']:.0f} s", flush=True)
    if not a.skip_nnunet:
        composite_s = [results[n]["train_s"] for n in results if n.startswith("composite_s") and "+" not in n]
        budget = a.nnunet_budget_s or (float(np.mean(composite_s)) if composite_s else 300.0)
        print(f"== nnunet: budget {budget:.0f} s of training", flush=True)
        nn = train_and_predict(data[0], os.path.join(data[2], "test_images"), os.path.join(a.out, "nnunet"),
                               budget_s=budget, threads=int(os.environ["OMP_NUM_THREADS"]))
        results["nnunet"] = {**score(nn["pred_dir"], labels, a.workers), "train_s": nn.get("train_s"),
                             "s_per_step": nn.get("s_per_iter"), "nnunet": dict(nn)}
        folders["nnunet"] = nn["pred_dir"]
    pngs = figures(a.out, data[2], folders, curves, a)
    text = table(results)
    if tuned:
        text += "\n\n## Post-processing, each step added in turn (held-out volumes)\n\n"
        text += "\n\n".join(step_table(n, results[n], t) for n, t in tuned.items())
        text += "\n\n## Targets\n\n" + "\n".join(targets(results))
    text += "\n\n" + "\n".join(summary_lines(results))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "results": results, "run_dirs": curves, "validation_ids": val_ids,
                   "tuned": tuned, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                   "wall_s": time.perf_counter() - t_start}, f, indent=2, default=str)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    load_end = os.getloadavg()
    print(f"wall time {time.perf_counter() - t_start:.0f} s; load average at end {load_end[0]:.2f} {load_end[1]:.2f} "
          f"{load_end[2]:.2f}; results in {a.out}; figures {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
