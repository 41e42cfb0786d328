"""bench/quality.py's own logic (no training): the closing lines, the targets, the threshold row's logits,
the step-by-step run of a tuned pipeline, the table's merging of seeds."""

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
