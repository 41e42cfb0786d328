"""bench/quality.py's own logic (no training): the closing lines, the targets, the threshold row's logits,
the step-by-step run of a tuned pipeline, the table's merging of seeds; the rows of weight averaging,
ensembles, TTA and ResEnc (plan, override files, commands, their section) and the --rows resume."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

from custom_components.data.io import read_volume, write_volume  # noqa: E402
from custom_components.inference.postprocess import load_postprocess  # noqa: E402
from custom_components.inference.tune_postprocess import probability_of  # noqa: E402


def _row(score, topo=0.1, sdice=0.7, voi=0.5):
    return {"score": score, "topo_score": topo, "surface_dice": sdice, "voi_score": voi,
            "train_s": None, "s_per_step": None}


def _results():
    return {
        "threshold": _row(0.40, 0.02, 0.7, 0.55),
        "threshold+tuned": _row(0.45, 0.10, 0.7, 0.60),
        "baseline_s0": _row(0.46), "baseline_s0+post": _row(0.47), "baseline_s0+tuned": _row(0.452),
        "composite_s0": _row(0.50, 0.20, 0.7, 0.52), "composite_s1": _row(0.52, 0.30, 0.7, 0.54),
        "composite_s0+tuned": _row(0.54, 0.30, 0.7, 0.56), "composite_s1+tuned": _row(0.55, 0.32, 0.7, 0.58),
    }


def test_closing_lines():
    lines = quality.summary_lines(_results())
    assert [ln.split(":")[0] for ln in lines] == ["threshold", "baseline", "composite", "threshold_tuned",
                                                   "composite_tuned", "post_gain"]
    assert lines[0] == "threshold: 0.4000 0.0200 0.5500"
    assert lines[2] == "composite: 0.5100 0.2500 0.5300"  # mean of the two seeds, raw
    assert lines[3] == "threshold_tuned: 0.4500 0.1000 0.6000"
    assert lines[4] == "composite_tuned: 0.5450 0.3100 0.5700"
    assert lines[5] == "post_gain: 0.0350 0.0600 0.0400"
    # +post rows never enter the raw line; missing rows say n/a
    assert quality.summary_lines({"threshold": _row(0.4)})[4] == "composite_tuned: n/a"


def test_targets():
    text = "\n".join(quality.targets(_results()))
    assert "composite_tuned - composite = +0.0350 (target >= +0.03): met" in text
    assert "worst tuned - raw over the tuned rows = -0.0080 (baseline_s0+tuned; target >= -0.01): met" in text
    assert "composite_tuned - threshold_tuned = +0.0950 (target >= +0.05): met" in text
    worse = {**_results(), "baseline_s0+tuned": _row(0.44)}
    assert "(baseline_s0+tuned; target >= -0.01): missed" in "\n".join(quality.targets(worse))


def test_table_merges_seeds_of_tuned_rows():
    text = quality.table(_results())
    assert "| composite+tuned | 2 | 0.5450 (0.0050) |" in text
    assert "| threshold+tuned | 1 | 0.4500 |" in text


def test_threshold_logits_reproduce_otsu():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 30, (20, 20, 20)), 0, 255).astype(np.uint8)
    z = quality.threshold_logits(image)
    assert z.dtype == np.float16
    np.testing.assert_array_equal(probability_of(z) > 0.5, image > threshold_otsu(image))


def test_run_steps_cumulative_and_equal_to_whole(tmp_path):
    rng = np.random.default_rng(1)
    logits = tmp_path / "logits"
    logits.mkdir()
    for i in range(2):
        z = rng.normal(-2, 1, (24, 24, 24))
        z[:, 10:13, :] += 5  # a slab
        z[2, 2, 2] = 6  # a speck
        np.save(logits / f"v{i}.npy", z.astype(np.float16))
    pp = tmp_path / "postprocess.json"
    pp.write_text(json.dumps({"steps": [{"name": "smooth", "sigma": 0.5}, {"name": "binarize", "threshold": 0.5},
                                        {"name": "dust", "min_size": 20, "connectivity": 6},
                                        {"name": "fill_holes"}]}))
    entries = quality.run_steps(str(pp), str(logits), str(tmp_path / "steps"))
    assert [e["label"].split(" ")[0] for e in entries] == ["smooth", "dust", "fill_holes"]  # smooth merged
    assert "binarize threshold=0.5" in entries[0]["label"]
    assert all(len(e["seconds"]) == 2 and min(e["seconds"]) >= 0 for e in entries)
    whole = load_postprocess(str(pp))
    for i in range(2):
        prob = probability_of(np.load(logits / f"v{i}.npy"))
        expect = np.asarray(whole({"pred": prob[None]})["pred"])[0]
        np.testing.assert_array_equal(read_volume(os.path.join(entries[-1]["folder"], f"v{i}.tif")), expect)
        assert read_volume(os.path.join(entries[0]["folder"], f"v{i}.tif"))[2, 2, 2] == 1  # speck there before dust
        assert read_volume(os.path.join(entries[1]["folder"], f"v{i}.tif"))[2, 2, 2] == 0


def test_validation_images_links_only_validation_ids(tmp_path):
    train = tmp_path / "train"
    (train / "train_images").mkdir(parents=True)
    for i in range(3):
        write_volume(str(train / "train_images" / f"{i}.tif"), np.zeros((4, 4, 4), np.uint8))
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": [{"id": "0", "image": "train_images/0.tif"}],
                                    "validation": [{"id": "1", "image": "train_images/1.tif"},
                                                   {"id": "2", "image": "train_images/2.tif"}]}))
    folder, ids = quality.validation_images(str(train), str(datalist), str(tmp_path / "out"))
    assert ids == ["1", "2"] and sorted(os.listdir(folder)) == ["1.tif", "2.tif"]


@pytest.mark.parametrize("prefix,suffix,n", [("threshold", "", 1), ("composite_s", "", 2), ("composite_s", "+tuned", 2),
                                             ("baseline_s", "+post", 1)])
def test_family(prefix, suffix, n):
    assert len(quality._family(_results(), prefix, suffix)) == n


def _args(**kw):
    from types import SimpleNamespace

    base = dict(seeds=[0, 1], epochs=12, iterations=40, val_interval=3, resenc_step_ratio=1.27, rows=None,
                train_profile="34117", test_profile="35360", train_seed=0, test_seed=1, train_volumes=16,
                test_volumes=3, shape=[64, 64, 64])
    return SimpleNamespace(**{**base, **kw})


def test_extra_rows_plan():
    plan = quality.study_plan(_args())
    names = [r["name"] for r in plan]
    assert names[:8] == ["baseline_s0", "baseline_s1", "composite_s0", "composite_s1", "no_cldice",
                         "no_skeleton_recall", "no_surface_distance", "no_topology"]
    assert names[8:] == ["ema_s0", "ema_s1", "ema999_s0", "avg_s0", "tta_mirror_s0", "tta_rot_s0", "ensemble_s01",
                         "resenc_s0"]
    rows = {r["name"]: r for r in plan}
    composite = quality.default_weights()
    assert rows["ema_s1"]["train"] == {"loss_weights": composite, "ema_decay": 0.99} and rows["ema_s1"]["seed"] == 1
    assert rows["ema_s1"]["ref"] == ["composite_s1"]
    assert rows["ema999_s0"]["train"]["ema_decay"] == 0.999
    assert rows["avg_s0"]["average"] == ["best.pt", "last.pt"] and rows["avg_s0"]["ckpts"] == ["composite_s0"]
    assert rows["tta_mirror_s0"]["settings"] == {"tta_flips": 8}
    assert rows["tta_rot_s0"]["settings"] == {"tta_flips": 8, "tta_rotations": 4}
    assert rows["ensemble_s01"]["ckpts"] == rows["ensemble_s01"]["ref"] == ["composite_s0", "composite_s1"]
    assert rows["resenc_s0"]["configs"] == ["resenc.json", "resenc_demo.json"]
    assert rows["resenc_s0"]["train"]["iterations_per_epoch"] == 31  # 40 / 1.27
    assert all(not r["ref"] for r in plan[:8])
    one_seed = [r["name"] for r in quality.extra_rows([3], 10)]
    assert one_seed == ["ema_s3", "ema999_s3", "avg_s3", "tta_mirror_s3", "tta_rot_s3", "resenc_s3"]  # no ensemble


def test_scaled_iterations_and_overrides():
    assert quality.scaled_iterations(40, 1.09) == 37
    assert quality.scaled_iterations(40, 1.0) == 40
    assert quality.scaled_iterations(1, 3.0) == 1
    o = quality.study_overrides(_args(), 1, {"bce": 1.0}, ema_decay=0.99)
    assert o == {"epochs": 12, "iterations_per_epoch": 40, "val_interval": 3, "seed": 1, "loss_weights": {"bce": 1.0},
                 "ema_decay": 0.99}
    assert quality.study_overrides(_args(), 0, {}, iterations_per_epoch=37)["iterations_per_epoch"] == 37


def test_bundle_cmd():
    cmd = quality.bundle_cmd(["inference.json", "runs/x/study.json"], ckpt_path="a.pt,b.pt", save_logits=True,
                             tta_flips=8, shape=[1, 2])
    assert cmd[1:4] == ["-m", "monai.bundle", "run"] and cmd[4] == "--config_file"
    assert json.loads(cmd[5]) == [os.path.join(quality.CONFIGS, "inference.json"), "runs/x/study.json"]
    assert cmd[6:] == ["--ckpt_path", "a.pt,b.pt", "--save_logits", "true", "--tta_flips", "8", "--shape", "[1, 2]"]
    assert quality.bundle_cmd(["train.json"], "training", overwrite=False)[4:] == [
        "training", "--config_file", json.dumps([os.path.join(quality.CONFIGS, "train.json")]), "--overwrite", "false"]


def test_comparison_section():
    res = {**_results(), "composite_s0+post": _row(0.51, 0.25, 0.7, 0.53),
           "ema_s0": {**_row(0.53, 0.26, 0.72, 0.50), "train_s": 200.0, "s_per_step": 0.3, "eval_s": 12.0,
                      "detail": "ema_decay 0.99"},
           "ensemble_s01": _row(0.515, 0.2, 0.7, 0.6), "ensemble_s01+tuned": _row(0.56)}
    rows = [{"name": "ema_s0", "ref": ["composite_s0"]}, {"name": "avg_s0", "ref": ["composite_s0"]},
            {"name": "ensemble_s01", "ref": ["composite_s0", "composite_s1"]}]
    text = quality.comparison_section(res, rows)
    lines = text.splitlines()
    assert lines[0] == "## Weight averaging, ensembles, TTA"
    assert ("| ema_s0 | composite_s0 (0.5000) | 0.5300 | +0.0300 | 0.2600 | +0.0600 | 0.7200 | +0.0200 | 0.5000 | "
            "-0.0200 | 200 | 0.300 | 12 |") in lines
    # the ensemble against the mean of both seeds; +tuned against their +tuned mean (0.545)
    assert "| ensemble_s01 | composite_s0 + composite_s1 (mean) (0.5100) | 0.5150 | +0.0050 |" in text
    assert "| ensemble_s01+tuned | composite_s0 + composite_s1 (mean)+tuned (0.5450) | 0.5600 | +0.0150 |" in text
    assert not any(ln.startswith("| ema_s0+post") or ln.startswith("| avg_s0") for ln in lines)  # one side missing
    assert lines[-1] == "- ema_s0: ema_decay 0.99"
    assert quality.comparison_section(_results(), rows) == ""


def test_resume_keeps_other_rows_in_study_order(tmp_path):
    prev = {"composite_s0": 1, "composite_s0+post": 2, "composite_s0+tuned": 3, "ema_s0": 4, "ema_s0+tuned": 5,
            "old_row": 6}
    kept = quality.kept_entries(prev, lambda n: n == "ema_s0")
    assert list(kept) == ["composite_s0", "composite_s0+post", "composite_s0+tuned", "old_row"]
    merged = quality.in_study_order({"ema_s0+post": 0, "ema_s0": 0, **kept, "zeros": 0},
                                    ["zeros", "composite_s0", "ema_s0"])
    assert list(merged) == ["zeros", "composite_s0", "composite_s0+post", "composite_s0+tuned", "ema_s0",
                            "ema_s0+post", "old_row"]
    (tmp_path / "results.json").write_text(json.dumps({"args": vars(_args()), "results": prev}))
    assert quality.previous_run(str(tmp_path), _args()) == {}  # no --rows: the whole study afresh
    assert quality.previous_run(str(tmp_path), _args(rows=["ema_s0"]))["results"] == prev
    with pytest.raises(SystemExit, match="epochs 12 -> 2"):
        quality.previous_run(str(tmp_path), _args(rows=["ema_s0"], epochs=2))
    assert quality.previous_run(str(tmp_path / "none"), _args(rows=["ema_s0"])) == {}


def test_extras_run_only_when_asked():
    plan = quality.study_plan(_args())
    extras = {r["name"] for r in plan if r["ref"]}
    names = [r["name"] for r in plan]
    default = [n for n in names if quality.runs_row(n, _args(rows=None, extras=False), extras)]
    assert default == names[:8]  # the loss rows; the study stays within its hour
    assert [n for n in names if quality.runs_row(n, _args(rows=None, extras=True), extras)] == names
    assert [n for n in names if quality.runs_row(n, _args(rows=["tta_mirror_s0", "no_cldice"], extras=False),
                                                 extras)] == ["no_cldice", "tta_mirror_s0"]


def test_wants_tuning_and_source_timing():
    assert quality.wants_tuning("ema_s1", {"ema"}) and quality.wants_tuning("ensemble_s01", {"ensemble"})
    assert not quality.wants_tuning("ema999_s0", {"ema"}) and quality.wants_tuning("ema999_s0", {"ema999_s0"})
    res = {"composite_s0": {"train_s": 100.0, "s_per_step": 0.2}, "composite_s1": {"train_s": 50.0, "s_per_step": 0.4}}
    assert quality.source_timing(res, ["composite_s0", "composite_s1"]) == {"train_s": 150.0,
                                                                            "s_per_step": pytest.approx(0.3)}
    assert quality.source_timing(res, ["composite_s0"]) == {"train_s": 100.0, "s_per_step": 0.2}
    assert quality.source_timing({}, ["x"]) == {"train_s": None, "s_per_step": None}


def test_row_detail():
    rows = {r["name"]: r for r in quality.extra_rows([0, 1], 31)}
    a = _args()
    assert quality.row_detail(rows["ema999_s0"], a, {}) == \
        "ema_decay 0.999: 61.9% of the average on the first step's weights after 480 steps"
    assert quality.row_detail(rows["avg_s0"], a, {}, [9, 12]) == \
        "mean of composite_s0's best.pt (epoch 9), last.pt (epoch 12), the checkpoints its run keeps"
    assert quality.row_detail(rows["tta_rot_s0"], a, {}) == \
        "composite_s0's model with --tta_flips 8 --tta_rotations 4 (32 passes per window)"
    assert quality.row_detail(rows["ensemble_s01"], a, {}) == "logits of composite_s0, composite_s1 fused, equal weights"
    res = {"resenc_s0": {"s_per_step": 0.33}, "ema_s0": {"s_per_step": 0.30}, "composite_s0": {"s_per_step": 0.22}}
    assert quality.row_detail(rows["resenc_s0"], a, res) == \
        "12 epochs x 31 iterations = 372 steps (480 / 1.27); s / step 0.330 = 1.10x ema_s0's, 1.50x composite_s0's"
    assert quality.row_detail(rows["resenc_s0"], a, {}).endswith("s / step n/a")


def test_hard_case_folders():
    res = {"baseline_s0": 1, "composite_s0": 1, "composite_s0+post": 1, "ema_s0": 1}
    folders = quality.hard_case_folders("o", res, {"threshold": {"folder": "t"}, "composite_s0": {"folder": "c"}}, 0)
    assert folders == {"threshold": os.path.join("o", "trivial", "threshold"), "threshold+tuned": "t",
                       "baseline_s0": os.path.join("o", "baseline_s0", "eval", "raw"),
                       "composite_s0": os.path.join("o", "composite_s0", "eval", "raw"),
                       "composite_s0+post": os.path.join("o", "composite_s0", "eval", "postprocessed"),
                       "composite_s0+tuned": "c"}
