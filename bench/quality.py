"""What each part of the topology-aware setup is worth on the synthetic scrolls, against nnU-Net too.

    python bench/quality.py --out runs/quality            # the whole study, ~50 min on 2 CPU cores
    python bench/quality.py --out runs/quality --quick    # every row at a tiny budget (a smoke run)

One synthetic training set (``--train_profile``, ``--train_seed``) and labelled held-out volumes of a
different seed and a different profile (``--test_profile``, ``--test_seed``). Every row is a folder of
uint8 predictions of the held-out volumes scored with the competition score
(``custom_components.metrics.evaluate.score_folders``, docs/METRIC.md), mean over the volumes:

- trivial baselines, no training: all zeros, all ones, Otsu threshold of the image;
- ``baseline`` (BCE + Dice) and ``composite`` (train.json's default ``loss_weights``), ``--seeds`` each;
- ablations (first seed): the composite without ``cldice``, ``skeleton_recall``, ``surface_distance``,
  ``topology``;
- every trained row raw (threshold 0.5) and with the default post-processing (``+post``), both written
  by ``bundle/configs/evaluate.json``;
- ``nnunet``: nnU-Net v2 (its own default 3d_fullres plan) trained on the same volumes, converted by
  ``custom_components.data.convert_nnunet``, for the mean wall-clock training time of the composite rows, in
  its own venv (``bench/nnunet_baseline.py``); ``--skip_nnunet`` leaves it out.

Each trained row is the real bundle: ``python -m monai.bundle run training`` with ``train.json`` +
``demo.json`` (CPU, small DynUNet, 32^3 patches) + the study's override file (epochs, iterations, loss
weights, seed) written into the row's folder, then ``evaluate.json`` on the held-out volumes with the
best checkpoint (validation on a quarter of the training set). All rows share budget, patch, network
and data; the runs go one after another, each with the whole machine (``OMP_NUM_THREADS``).

The table (``results.md``, ``results.json`` in ``--out``) has score, TopoScore, SurfaceDice, VOI score,
training wall time and seconds per training step; rows with several seeds show the mean and, in
brackets, half the range. It ends with ``threshold:``, ``baseline:`` and ``composite:`` lines (score,
TopoScore, VOI score; trained rows without post-processing, mean over seeds).
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


def train_and_evaluate(name: str, weights: dict, seed: int, data: tuple[str, str, str], out: str, a) -> dict:
    """One trained row: bundle training, then evaluate.json on the held-out set (raw and post-processed)."""
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
         "--output_dir", os.path.join(row_dir, "eval"), "--ckpt_path", ckpt], log)
    with open(os.path.join(CONFIGS, "demo.json")) as f:
        batch = int(json.load(f)["batch_size"])
    return {"train_s": train_s, "s_per_step": seconds_per_step(os.path.join(row_dir, "run"), batch),
            "raw": os.path.join(row_dir, "eval", "raw"), "post": os.path.join(row_dir, "eval", "postprocessed"),
            "run_dir": os.path.join(row_dir, "run")}


def score(pred_dir: str, label_dir: str, workers: int) -> dict:
    """Mean of each metric over the held-out volumes, and the per-volume rows."""
    rows = score_folders(pred_dir, label_dir, workers)
    return {**{k: float(np.mean([r[k] for r in rows])) for k in METRICS}, "volumes": rows}


def spread(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ({(max(values) - min(values)) / 2:.4f})"


def table(results: dict[str, dict]) -> str:
    """Markdown table; rows named ``x_s<seed>[+post]`` are merged into one row ``x`` with mean (half range)."""
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        m = re.fullmatch(r"(.*)_s\d+(\+post)?", name)
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


def summary_lines(results: dict[str, dict]) -> list[str]:
    def mean_of(prefix):
        rs = [r for n, r in results.items() if n.startswith(prefix) and not n.endswith("+post")]
        return " ".join(f"{np.mean([r[k] for r in rs]):.4f}" for k in ("score", "topo_score", "voi_score"))

    return [f"threshold: {mean_of('threshold')}", f"baseline: {mean_of('baseline_s')}",
            f"composite: {mean_of('composite_s')}"]


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
    p.add_argument("--test_profile", default="35360")
    p.add_argument("--train_seed", type=int, default=0)
    p.add_argument("--test_seed", type=int, default=1)
    p.add_argument("--train_volumes", type=int, default=8)
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
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke run (2 epochs x 5 iterations)")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.iterations, a.val_interval, a.test_volumes = 2, 5, 2, 2
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t_start = time.perf_counter()
    data = make_data(a.out, a)
    labels = os.path.join(data[2], "test_labels")
    results: dict[str, dict] = {}
    for row, folder in trivial_predictions(data[2], a.out).items():
        results[row] = {**score(folder, labels, a.workers), "train_s": None, "s_per_step": None}
    curves = {}
    folders = {"threshold": os.path.join(a.out, "trivial", "threshold")}
    for name, weights, seed in loss_rows(a.seeds):
        if a.rows and name not in a.rows:
            continue
        print(f"== {name}: loss_weights {weights}, seed {seed}", flush=True)
        r = train_and_evaluate(name, weights, seed, data, a.out, a)
        timing = {"train_s": r["train_s"], "s_per_step": r["s_per_step"]}
        results[name] = {**score(r["raw"], labels, a.workers), **timing}
        results[f"{name}+post"] = {**score(r["post"], labels, a.workers), **timing}
        curves[name] = r["run_dir"]
        if name.endswith("_s" + str(a.seeds[0])):
            folders[name] = r["raw"]
            if name.startswith("composite"):
                folders[name + "+post"] = r["post"]
        print(f"   score {results[name]['score']:.4f}, +post {results[name + '+post']['score']:.4f}, "
              f"{r['train_s']:.0f} s", flush=True)
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
    text = table(results) + "\n\n" + "\n".join(summary_lines(results))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "results": results, "run_dirs": curves,
                   "wall_s": time.perf_counter() - t_start}, f, indent=2, default=str)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wall time {time.perf_counter() - t_start:.0f} s; results in {a.out}; figures {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
