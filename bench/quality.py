"""What each part of the topology-aware setup is worth on the synthetic scrolls, against nnU-Net too.

    python bench/quality.py --out runs/quality            # the whole study, ~60 min on 2 CPU cores
    python bench/quality.py --out runs/quality --extras   # and the weight averaging / TTA / ResEnc rows, ~15 min more
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
- with ``--extras`` (or named in ``--rows``), weight averaging, ensembles, TTA and nnU-Net's network, each
  against the composite row(s) it derives from (the section "Weight averaging, ensembles, TTA": raw, +post and +tuned beside the reference, with
  the differences):
  ``ema_s<seed>`` (every seed) the composite with ``ema_decay`` ``EMA_DECAY`` (0.99: at 12 x 40 = 480
  steps the default-style 0.999 would leave 0.999^480 = 62% of the average on the first step's weights),
  ``ema999_s<seed>`` (first seed) with 0.999; validation, ``best.pt``'s choice and ``models/model.pt`` then
  use the averaged weights;
  ``avg_s<seed>``: ``custom_components.training.average_checkpoints`` of the composite run's kept
  checkpoints (``AVERAGED``: the saver keeps ``best.pt`` and ``last.pt`` only);
  ``tta_mirror_s<seed>``, ``tta_rot_s<seed>``: the composite's model with ``--tta_flips 8`` (all
  mirrorings), and with ``--tta_rotations 4`` quarter turns about Z on top (``TTA``; the default
  evaluation has neither);
  ``ensemble_s<seeds>``: the logits of every seed's composite model fused (``--ckpt_path a,b``, equal
  weights, ``LogitEnsemble``);
  ``resenc_s<seed>``: the composite with nnU-Net's residual-encoder U-Net (``resenc.json`` +
  ``resenc_demo.json``) at the composite's wall-clock budget: iterations per epoch divided by
  ``--resenc_step_ratio`` (its step time over DynUNet's; the epochs, and so the validation epochs, kept).
  The derived rows (avg, tta, ensemble) show their source rows' training time (the ensemble: the sum);
  every new row its ``evaluate.json`` wall time (inference + scoring of the held-out volumes);
- ``nnunet``: nnU-Net v2 (its own default 3d_fullres plan) trained on the same volumes, converted by
  ``custom_components.data.convert_nnunet``, for the mean wall-clock training time of the composite rows, in
  its own venv (``bench/nnunet_baseline.py``); ``--skip_nnunet`` leaves it out.

Each trained row is the real bundle: ``python -m monai.bundle run training`` with ``train.json`` +
``demo.json`` (CPU, small DynUNet, 32^3 patches) + the study's override file (epochs, iterations, loss
weights, seed; ``ema_decay``) written into the row's folder, then ``evaluate.json`` on the held-out volumes
with the run's ``models/model.pt`` (the best checkpoint, chosen on the validation volumes; its EMA weights
when the run kept an average). All rows share budget, patch, network and data; the runs go one after
another, each with the whole machine (``OMP_NUM_THREADS``).

``--rows`` runs only the named rows (loss rows or extras) (``threshold`` = its tuning) and keeps every other row of the
previous ``results.json`` in ``--out`` (scores, tuning, curves; refused when that run had another data
set or budget); the data sets are reused when present. The derived rows read their source rows'
``models/model.pt`` from ``--out``, so e.g. ``--rows ema_s0 avg_s0`` against a finished study trains only
``ema_s0``.

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
SUFFIXES = ("", "+post", "+tuned")  # the entries of one row, in table order
#: What a previous results.json must share with this run for its rows to be kept (``--rows``).
STUDY_ARGS = ("train_profile", "test_profile", "train_seed", "test_seed", "train_volumes", "test_volumes", "shape",
              "epochs", "iterations", "val_interval")
EMA_DECAY = {"ema": 0.99, "ema999": 0.999}  # row prefix -> ema_decay (ema999: first seed only)
AVERAGED = ("best.pt", "last.pt")  # the checkpoints a run keeps (AtomicCheckpointSaver), averaged by avg_s<seed>
TTA = {"tta_mirror": {"tta_flips": 8}, "tta_rot": {"tta_flips": 8, "tta_rotations": 4}}  # inference.json settings
RESENC_CONFIGS = ("resenc.json", "resenc_demo.json")  # merged after train.json + demo.json


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


def extra_rows(seeds: list[int], resenc_iterations: int) -> list[dict]:
    """The rows of weight averaging, ensembles, TTA and nnU-Net's network, in the order they run. Each is
    ``{"name", "ref": [the composite rows it is compared with]}`` and either ``"train"`` (the override file's
    settings besides the budget, ``"seed"``, optional ``"configs"`` merged after demo.json) or ``"ckpts"``
    (the rows whose models it evaluates) with ``"settings"`` (inference.json) and, for avg, ``"average"``."""
    s0, c0, comps = seeds[0], f"composite_s{seeds[0]}", [f"composite_s{s}" for s in seeds]
    composite = default_weights()
    rows = [{"name": f"ema_s{s}", "seed": s, "train": {"loss_weights": composite, "ema_decay": EMA_DECAY["ema"]},
             "ref": [f"composite_s{s}"]} for s in seeds]
    rows.append({"name": f"ema999_s{s0}", "seed": s0, "train": {"loss_weights": composite,
                 "ema_decay": EMA_DECAY["ema999"]}, "ref": [c0]})
    rows.append({"name": f"avg_s{s0}", "ckpts": [c0], "settings": {}, "average": list(AVERAGED), "ref": [c0]})
    rows += [{"name": f"{k}_s{s0}", "ckpts": [c0], "settings": v, "ref": [c0]} for k, v in TTA.items()]
    if len(seeds) > 1:
        rows.append({"name": "ensemble_s" + "".join(map(str, seeds)), "ckpts": comps, "settings": {}, "ref": comps})
    rows.append({"name": f"resenc_s{s0}", "seed": s0, "configs": list(RESENC_CONFIGS), "ref": [c0],
                 "train": {"loss_weights": composite, "iterations_per_epoch": resenc_iterations}})
    return rows


def study_plan(a) -> list[dict]:
    """Every trained or derived row of the study in the order it runs: ``loss_rows`` (as ``extra_rows``'
    trained rows, no reference) then ``extra_rows``."""
    rows = [{"name": n, "seed": s, "train": {"loss_weights": w}, "ref": []} for n, w, s in loss_rows(a.seeds)]
    return rows + extra_rows(a.seeds, scaled_iterations(a.iterations, a.resenc_step_ratio))


def scaled_iterations(iterations: int, step_ratio: float) -> int:
    """Iterations per epoch that give a network ``step_ratio`` times slower per step the same wall time."""
    return max(1, round(iterations / step_ratio))


def study_overrides(a, seed: int, loss_weights: dict, **settings) -> dict:
    """A trained row's override file: the study's budget, the seed, the loss weights, then ``settings``
    (which win: ``ema_decay``, ResEnc's ``iterations_per_epoch``)."""
    return {"epochs": a.epochs, "iterations_per_epoch": a.iterations, "val_interval": a.val_interval, "seed": seed,
            "loss_weights": loss_weights, **settings}


def bundle_cmd(configs: list[str], run_id: str | None = None, **args) -> list[str]:
    """``python -m monai.bundle run [run_id] --config_file [...] --key value ...``: a bare file name is a
    config of bundle/configs, anything else a path; lists and dicts go as JSON, booleans as true / false."""
    paths = [c if os.sep in c else os.path.join(CONFIGS, c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", json.dumps(paths)]
    for key, value in args.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value).lower() if isinstance(value, bool) \
            else str(value)
        cmd += [f"--{key}", text]
    return cmd


def model_path(out: str, row: str) -> str:
    """A trained row's inference weights (``models/model.pt``: the best checkpoint, its EMA weights if any)."""
    return os.path.join(out, row, "run", "models", "model.pt")


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


def evaluate(row_dir: str, ckpts: list[str], settings: dict, held: str, log: str, val_images: str | None = None) -> dict:
    """evaluate.json on the held-out volumes with ``ckpts`` (several: their logits fused) and the inference
    ``settings`` (raw and post-processed predictions, float16 logits); with ``val_images``, inference.json on
    those validation volumes with the same networks and settings (their logits, for the tuning)."""
    common = {"ckpt_path": ",".join(ckpts), "save_logits": True, **settings}
    ev = os.path.join(row_dir, "eval")
    eval_s = run(bundle_cmd(["inference.json", "demo_inference.json", "evaluate.json"],
                            input_dir=os.path.join(held, "test_images"), label_dir=os.path.join(held, "test_labels"),
                            output_dir=ev, **common), log)
    val_logits, val_s = None, None
    if val_images is not None:  # the validation volumes' logits, for tuning (no labels read here)
        val_s = run(bundle_cmd(["inference.json", "demo_inference.json"], input_dir=val_images,
                               output_dir=os.path.join(row_dir, "val"), **common), log)
        val_logits = os.path.join(row_dir, "val", "logits")
    return {"raw": os.path.join(ev, "raw"), "post": os.path.join(ev, "postprocessed"),
            "held_logits": os.path.join(ev, "logits"), "val_logits": val_logits, "val_infer_s": val_s, "eval_s": eval_s}


def train_and_evaluate(row: dict, data: tuple[str, str, str], out: str, a, val_images: str | None = None) -> dict:
    """One trained row: bundle training (train.json + demo.json + the row's configs + its override file),
    then ``evaluate`` with the run's ``models/model.pt``."""
    train, datalist, held = data
    row_dir = os.path.join(out, row["name"])
    os.makedirs(row_dir, exist_ok=True)
    override_file = os.path.join(row_dir, "study.json")
    with open(override_file, "w") as f:
        json.dump(study_overrides(a, row["seed"], **row["train"]), f, indent=2)
    log = os.path.join(row_dir, "run.log")
    run_dir = os.path.join(row_dir, "run")
    train_s = run(bundle_cmd(["train.json", "demo.json", *row.get("configs", []), override_file], "training",
                             dataset_dir=train, datalist=datalist, output_dir=run_dir, overwrite=True), log)
    r = evaluate(row_dir, [model_path(out, row["name"])], {}, held, log, val_images)
    with open(os.path.join(CONFIGS, "demo.json")) as f:
        batch = int(json.load(f)["batch_size"])
    return {**r, "train_s": train_s, "s_per_step": seconds_per_step(run_dir, batch), "run_dir": run_dir}


def derive_and_evaluate(row: dict, out: str, held: str, val_images: str | None = None) -> dict:
    """An avg / tta / ensemble row: the models of its source rows (for avg, the average of the source run's
    ``row["average"]`` checkpoints, ``custom_components.training.average_checkpoints``) through ``evaluate``
    with the row's inference settings."""
    row_dir = os.path.join(out, row["name"])
    os.makedirs(row_dir, exist_ok=True)
    log = os.path.join(row_dir, "run.log")
    models = [model_path(out, src) for src in row["ckpts"]]
    missing = [m for m in models if not os.path.isfile(m)]
    if missing:
        raise SystemExit(f"{row['name']} needs {', '.join(missing)}: run {', '.join(row['ckpts'])} first (--rows)")
    if row.get("average"):
        ckpts = [os.path.join(out, row["ckpts"][0], "run", "checkpoints", f) for f in row["average"]]
        models = [os.path.join(row_dir, "avg", "model.pt")]
        run([sys.executable, "-m", "custom_components.training.average_checkpoints", *ckpts, "--out", models[0]], log)
    return evaluate(row_dir, models, row["settings"], held, log, val_images)


def source_timing(results: dict[str, dict], sources: list[str]) -> dict:
    """A derived row's training cost: its source rows' training seconds summed, their seconds per step averaged."""
    train = [results[s]["train_s"] for s in sources if results.get(s, {}).get("train_s") is not None]
    steps = [results[s]["s_per_step"] for s in sources if results.get(s, {}).get("s_per_step") is not None]
    return {"train_s": float(sum(train)) if train else None, "s_per_step": float(np.mean(steps)) if steps else None}


def checkpoint_epochs(paths: list[str]) -> list[int | None]:
    """The epoch each training checkpoint was written at (its ``meta``)."""
    from custom_components.training.checkpoint import load_checkpoint

    return [load_checkpoint(p).get("meta", {}).get("epoch") for p in paths]


def row_detail(row: dict, a, results: dict[str, dict], epochs: list[int | None] | None = None) -> str:
    """What an extra row is, in one line (ema: the weight left on the first step after the budget; avg: the
    checkpoints and their ``epochs``; resenc: its budget and step time against the DynUNet rows in ``results``)."""
    steps = a.epochs * a.iterations
    if "ema_decay" in row.get("train", {}):
        d = row["train"]["ema_decay"]
        return f"ema_decay {d}: {d ** steps:.1%} of the average on the first step's weights after {steps} steps"
    if "iterations_per_epoch" in row.get("train", {}):
        it = row["train"]["iterations_per_epoch"]
        mine = (results.get(row["name"]) or {}).get("s_per_step")
        vs = [f"{mine / results[n]['s_per_step']:.2f}x {n}'s" for n in [f"ema_s{row['seed']}", *row["ref"]]
              if mine and (results.get(n) or {}).get("s_per_step")]
        return (f"{a.epochs} epochs x {it} iterations = {a.epochs * it} steps ({steps} / {a.resenc_step_ratio}); "
                f"s / step " + (f"{mine:.3f} = " + ", ".join(vs) if vs else "n/a"))
    if row.get("average"):
        files = ", ".join(f"{f} (epoch {e})" for f, e in zip(row["average"], epochs or [None] * len(row["average"])))
        return f"mean of {row['ckpts'][0]}'s {files}, the checkpoints its run keeps"
    settings = " ".join(f"--{k} {v}" for k, v in row["settings"].items())
    if len(row["ckpts"]) > 1:
        return f"logits of {', '.join(row['ckpts'])} fused, equal weights" + (f", {settings}" if settings else "")
    passes = row["settings"].get("tta_flips", 1) * row["settings"].get("tta_rotations", 1)
    return f"{row['ckpts'][0]}'s model with {settings} ({passes} passes per window)"


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


def comparison_section(results: dict[str, dict], rows: list[dict]) -> str:
    """"Weight averaging, ensembles, TTA": each of ``rows`` (raw, +post, +tuned: those present on both sides)
    beside its reference (the mean of its ``ref`` rows), every metric with the difference; then each row's
    ``detail``. Empty when no row is in ``results``."""
    head = ("| row | against (score) | score | Δ | TopoScore | Δ | SurfaceDice | Δ | VOI score | Δ | training s | "
            "s / step | evaluate s |")
    lines, notes = [head, "|" + "---|" * 13], []
    for row in rows:
        name, refs = row["name"], row["ref"]
        for suffix in SUFFIXES:
            mine, theirs = results.get(name + suffix), [results.get(n + suffix) for n in refs]
            if mine is None or not theirs or None in theirs:
                continue
            ref = {k: float(np.mean([t[k] for t in theirs])) for k in METRICS}
            label = " + ".join(refs) + (" (mean)" if len(refs) > 1 else "")
            cells = [f"{mine[k]:.4f} | {mine[k] - ref[k]:+.4f}" for k in METRICS]
            cells += [fmt.format(mine[k]) if mine.get(k) is not None else "-"
                      for k, fmt in (("train_s", "{:.0f}"), ("s_per_step", "{:.3f}"), ("eval_s", "{:.0f}"))]
            lines.append(f"| {name}{suffix} | {label}{suffix} ({ref['score']:.4f}) | " + " | ".join(cells) + " |")
        if results.get(name, {}).get("detail"):
            notes.append(f"- {name}: {results[name]['detail']}")
    if len(lines) == 2:
        return ""
    return "## Weight averaging, ensembles, TTA\n\n" + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def row_base(key: str) -> str:
    """The row an entry belongs to: ``composite_s0+tuned`` -> ``composite_s0``."""
    return key.split("+")[0]


def in_study_order(entries: dict, order: list[str]) -> dict:
    """``entries`` (keyed by row or row + suffix) sorted by their row's place in ``order`` (unknown rows
    last, in their own order), then raw, +post, +tuned."""
    rank = {n: i for i, n in enumerate(order)}

    def key(k):
        suffix = k[len(row_base(k)):]
        return rank.get(row_base(k), len(rank)), SUFFIXES.index(suffix) if suffix in SUFFIXES else len(SUFFIXES)

    return dict(sorted(entries.items(), key=lambda kv: key(kv[0])))


def kept_entries(previous: dict, rerun) -> dict:
    """The entries of ``previous`` whose row is not run again (``rerun(row)`` false)."""
    return {k: v for k, v in previous.items() if not rerun(row_base(k))}


def previous_run(out: str, a) -> dict:
    """With ``--rows``, the previous ``results.json`` in ``out`` (its rows not named are kept), else {};
    SystemExit when that run had another data set or budget (``STUDY_ARGS``)."""
    path = os.path.join(out, "results.json")
    if not a.rows or not os.path.exists(path):
        return {}
    with open(path) as f:
        prev = json.load(f)
    diff = [f"{k} {prev['args'].get(k)} -> {getattr(a, k)}" for k in STUDY_ARGS if prev["args"].get(k) != getattr(a, k)]
    if diff:
        raise SystemExit(f"{path} is of another study ({'; '.join(diff)}): give another --out or the same settings")
    return prev


def runs_row(name: str, a, extras: set[str]) -> bool:
    """Whether this invocation runs row ``name``: only those ``--rows`` names when given, else every row
    but the ``extras`` (the weight averaging / ensemble / TTA / ResEnc rows), which ``--extras`` adds."""
    return name in a.rows if a.rows else a.extras or name not in extras


def wants_tuning(name: str, tune_rows: set[str]) -> bool:
    """Whether ``--tune_rows`` names the row or its family (the name without ``_s<seed>``)."""
    return name in tune_rows or re.sub(r"_s\d+$", "", name) in tune_rows


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


def scored_entries(name: str, r: dict, timing: dict, labels: str, val_labels: str, out: str, a,
                   tune: bool) -> tuple[dict, dict | None]:
    """A row's table entries from its ``evaluate`` output ``r``: raw and +post scored on the held-out
    ``labels``, and with ``tune`` the +tuned entry (``tune_row`` on its validation logits); every entry
    with ``timing``. Returns the entries and the tuning record (or None)."""
    entries = {name: {**score(r["raw"], labels, a.workers), **timing},
               f"{name}+post": {**score(r["post"], labels, a.workers), **timing}}
    if not tune:
        return entries, None
    t = tune_row(name, r["val_logits"], val_labels, r["held_logits"], os.path.join(out, name, "tuned"), labels, a)
    entries[f"{name}+tuned"] = {**t["row"], **timing}
    return entries, t


def describe(row: dict) -> str:
    """A row of ``study_plan`` as the run's log names it: its settings and seed, or its sources."""
    if "train" in row:
        return " ".join(f"{k} {v}" for k, v in row["train"].items()) + f", seed {row['seed']}" + \
            (f", configs {' '.join(row['configs'])}" if row.get("configs") else "")
    how = (f"average of {' '.join(row['average'])}" if row.get("average") else json.dumps(row["settings"])
           if row["settings"] else "logits fused")
    return f"{how} of {', '.join(row['ckpts'])}"


def run_row(row: dict, data: tuple[str, str, str], results: dict, a, val_images: str | None) -> tuple[dict, dict]:
    """Train (``train_and_evaluate``) or derive (``derive_and_evaluate``) one row of ``study_plan``; returns
    its ``evaluate`` output and its timing (training s, s / step, evaluate s; a derived row's training as
    ``source_timing``)."""
    if "train" in row:
        r = train_and_evaluate(row, data, a.out, a, val_images)
        return r, {"train_s": r["train_s"], "s_per_step": r["s_per_step"], "eval_s": r["eval_s"]}
    r = derive_and_evaluate(row, a.out, data[2], val_images)
    return r, {**source_timing(results, row["ckpts"]), "eval_s": r["eval_s"]}


def hard_case_folders(out: str, results: dict, tuned: dict, seed: int) -> dict[str, str]:
    """The predictions the hard-case figure shows: threshold (+tuned), the first seed's baseline and
    composite, the composite's +post and +tuned (those in ``results``)."""
    folders = {"threshold": os.path.join(out, "trivial", "threshold")}
    if "threshold" in tuned:
        folders["threshold+tuned"] = tuned["threshold"]["folder"]
    for name in (f"baseline_s{seed}", f"composite_s{seed}"):
        if name in results:
            folders[name] = os.path.join(out, name, "eval", "raw")
    comp = f"composite_s{seed}"
    if f"{comp}+post" in results:
        folders[f"{comp}+post"] = os.path.join(out, comp, "eval", "postprocessed")
    if comp in tuned:
        folders[f"{comp}+tuned"] = tuned[comp]["folder"]
    return folders


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
    p.add_argument("--rows", nargs="*", help="only these rows (e.g. composite_s0 no_topology ema_s0; threshold = its "
                   "tuning); the other rows of the previous results.json in --out are kept")
    p.add_argument("--extras", action="store_true",
                   help="also the weight averaging / ensemble / TTA / ResEnc rows (~15 min more on 2 cores); "
                        "--rows runs any of them by name without it")
    p.add_argument("--skip_nnunet", action="store_true")
    p.add_argument("--nnunet_budget_s", type=float, help="default: mean training time of the composite rows")
    p.add_argument("--workers", type=int, default=2, help="metric processes")
    p.add_argument("--tune_rows", nargs="*", default=["threshold", "baseline", "composite", *EMA_DECAY, "avg", *TTA,
                                                      "ensemble", "resenc"],
                   help="rows whose post-processing is tuned: threshold, and trained or derived rows by name or "
                        "name without _s<seed> (default: threshold, baseline, composite and every row of the weight "
                        "averaging / ensemble / TTA / ResEnc section that runs); none: no tuning")
    p.add_argument("--tune_minutes", type=float, default=4.0, help="tune_postprocess budget per tuned row")
    p.add_argument("--resenc_step_ratio", type=float, default=1.27,
                   help="ResEnc's seconds per step over DynUNet's (demo sizes, composite loss, 2 CPU cores: 0.26 vs "
                        "0.205 s measured back to back on an idle machine): resenc_s<seed> trains iterations / ratio "
                        "per epoch")
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
    plan = study_plan(a)
    order = ["zeros", "ones", "threshold"] + [row["name"] for row in plan] + ["nnunet"]
    unknown = sorted(set(a.rows or []) - set(order[2:-1]))
    if unknown:
        raise SystemExit(f"--rows: no row {', '.join(unknown)}; rows: {' '.join(order[2:-1])}")

    extras = {row["name"] for row in plan if row["ref"]}

    def rerun(name):
        return runs_row(name, a, extras)

    previous = previous_run(a.out, a)
    results = kept_entries(previous.get("results", {}), rerun)
    tuned = kept_entries(previous.get("tuned", {}), rerun)
    curves = kept_entries(previous.get("run_dirs", {}), rerun)
    if previous:
        print(f"kept from {os.path.join(a.out, 'results.json')}: {' '.join(sorted({row_base(k) for k in results}))}",
              flush=True)
    for row, folder in trivial_predictions(data[2], a.out).items():
        results[row] = {**score(folder, labels, a.workers), "train_s": None, "s_per_step": None}
    if "threshold" in tune_rows and (rerun("threshold") or "threshold+tuned" not in results):
        print("== threshold: tuning its post-processing on the validation volumes", flush=True)
        thr = os.path.join(a.out, "trivial", "threshold_tuning")
        held_logits = write_threshold_logits(os.path.join(data[2], "test_images"), os.path.join(thr, "held_out_logits"))
        val_logits = write_threshold_logits(val_images, os.path.join(thr, "val_logits"), val_ids)
        tuned["threshold"] = tune_row("threshold", val_logits, val_labels, held_logits, thr, labels, a)
        results["threshold+tuned"] = {**tuned["threshold"]["row"], "train_s": None, "s_per_step": None}
        print(f"   score {results['threshold']['score']:.4f}, +tuned {results['threshold+tuned']['score']:.4f}",
              flush=True)
    for row in plan:
        name = row["name"]
        if not rerun(name):
            continue
        tune_this = wants_tuning(name, tune_rows)
        print(f"== {name}: {describe(row)}", flush=True)
        r, timing = run_row(row, data, results, a, val_images if tune_this else None)
        entries, t = scored_entries(name, r, timing, labels, val_labels, a.out, a, tune_this)
        results.update(entries)
        if t is not None:
            tuned[name] = t
        if "train" in row:
            curves[name] = r["run_dir"]
        if row["ref"]:  # an extra row: what it is, in one line
            epochs = checkpoint_epochs([os.path.join(a.out, row["ckpts"][0], "run", "checkpoints", f)
                                        for f in row["average"]]) if row.get("average") else None
            results[name]["detail"] = row_detail(row, a, results, epochs)
        print(f"   score {results[name]['score']:.4f}, +post {results[name + '+post']['score']:.4f}"
              + (f", +tuned {results[name + '+tuned']['score']:.4f}" if tune_this else "")
              + f", training {timing['train_s'] or 0:.0f} s, evaluate {timing['eval_s']:.0f} s", flush=True)
    if not a.skip_nnunet:
        composite_s = [results[n]["train_s"] for n in results if n.startswith("composite_s") and "+" not in n]
        budget = a.nnunet_budget_s or (float(np.mean(composite_s)) if composite_s else 300.0)
        print(f"== nnunet: budget {budget:.0f} s of training", flush=True)
        nn = train_and_predict(data[0], os.path.join(data[2], "test_images"), os.path.join(a.out, "nnunet"),
                               budget_s=budget, threads=int(os.environ["OMP_NUM_THREADS"]))
        results["nnunet"] = {**score(nn["pred_dir"], labels, a.workers), "train_s": nn.get("train_s"),
                             "s_per_step": nn.get("s_per_iter"), "nnunet": dict(nn)}
    results, tuned, curves = (in_study_order(d, order) for d in (results, tuned, curves))
    folders = hard_case_folders(a.out, results, tuned, a.seeds[0])
    if "nnunet" in results:
        folders["nnunet"] = results["nnunet"]["nnunet"]["pred_dir"]
    pngs = figures(a.out, data[2], folders, curves, a)
    text = table(results)
    section = comparison_section(results, [row for row in plan if row["ref"]])
    if section:
        text += "\n\n" + section
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
