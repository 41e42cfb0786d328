"""custom_components.inference.tune_postprocess: logits on disk, the decision rule, the search, its guards.

Volumes are tiny (32^3): a 2-voxel sheet as the label, the prediction that sheet plus blobs of 80 voxels
(above the default dust size 64, under 500), so the dust stage has a gain to find whose sign is known.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_components.data.io import write_volume
from custom_components.inference import tune_postprocess as tp
from custom_components.inference.postprocess import load_postprocess, pipeline_config


def test_logits_written_by_save_logitsd_read_back(tmp_path):
    p = np.array([0.0, 0.25, 0.5, 0.75, 1.0, np.nan], np.float32).reshape(1, 1, 2, 3)
    meta = {"filename_or_obj": "/data/images/vol_7.tif"}
    d = {"pred": MetaTensor(torch.from_numpy(p), meta=meta)}
    out = tp.SaveLogitsd("pred", output_dir=str(tmp_path / "logits"))(d)
    assert out["pred"] is d["pred"]                                  # data pass unchanged
    z = tp.read_logits(tmp_path / "logits" / "vol_7.npy")
    assert z.dtype == np.float16 and z.shape == (1, 2, 3)
    # log(p / (1 - p)) by hand: -inf -> -16, log(1/3), 0, log 3, +inf -> 16, NaN -> -16
    expect = [-16.0, math.log(1 / 3), 0.0, math.log(3), 16.0, -16.0]
    np.testing.assert_allclose(z.ravel().astype(np.float64), expect, atol=2e-3)
    np.testing.assert_allclose(tp.probability_of(z).ravel()[1:4], [0.25, 0.5, 0.75], atol=1e-3)
    # the record's id wins over the file name
    tp.SaveLogitsd("pred", output_dir=str(tmp_path / "logits"))({"pred": torch.zeros(1, 2, 2, 2), "id": "abc"})
    assert sorted(os.listdir(tmp_path / "logits")) == ["abc.npy", "vol_7.npy"]
    with pytest.raises(ValueError, match="SaveLogitsd: no id for 'pred'"):
        tp.SaveLogitsd("pred", output_dir=str(tmp_path))({"pred": np.zeros((2, 2, 2))})


def test_accept_rule():
    assert tp.accept([0.01, 0.002, 0.003, -0.001], 0.002)          # mean 0.0035, 3 of 4 up
    assert not tp.accept([0.02, 0.0, 0.0, 0.0], 0.002)              # mean 0.005 but 1 of 4 up
    assert not tp.accept([0.003, 0.003, -0.001, -0.001], 0.002)     # mean 0.001 < 0.002
    assert not tp.accept([0.004, 0.004, 0.0, 0.0], 0.002)           # 2 of 4 up is not a majority
    assert not tp.accept([], 0.0)


def _dataset(root, n, held_out=True):
    """n volumes: logits in root/logits, labels in root/labels; plus a held-out label that is not a TIFF."""
    logits, labels = root / "logits", root / "labels"
    logits.mkdir()
    labels.mkdir()
    for i in range(n):
        label = np.zeros((32, 32, 32), np.uint8)
        label[12:14] = 1                                             # sheet of 2,048 voxels
        label[:, :, :2] = 2                                          # an unlabeled border slab
        p = np.full(label.shape, 0.02, np.float32)
        p[12:14] = 0.9
        for b in range(2 + i % 2):                                   # 2 or 3 blobs of 4x4x5 = 80 voxels
            z0, y0 = (3, 24)[b % 2], 4 + 9 * b
            p[z0:z0 + 5, y0:y0 + 4, 10:14] = 0.8
        np.save(logits / f"v{i}.npy", tp.logit_of(p))
        write_volume(str(labels / f"v{i}.tif"), label)
    if held_out:
        (labels / "held.tif").write_bytes(b"not a tiff: opening it would fail")
    return logits, labels


def test_tune_keeps_dust_that_wins_and_reads_only_its_labels(tmp_path, monkeypatch, capsys):
    logits, labels = _dataset(tmp_path, 4)
    opened = []
    real = tp._read_label
    monkeypatch.setattr(tp, "_read_label", lambda path: opened.append(os.path.basename(path)) or real(path))
    out = tmp_path / "run" / "postprocess.json"
    cfg = tp.tune(logits, labels, out, budget_minutes=5, stages=["threshold", "dust"])
    assert sorted(opened) == ["v0.tif", "v1.tif", "v2.tif", "v3.tif"]        # never held.tif
    steps = {s["name"]: s for s in cfg["steps"]}
    # the blobs (80 voxels) survive dust 64 and go at 500; 2000 ties (sheet 2,048 kept) and comes later;
    # 5000 and 20000 remove the sheet too; the threshold moves nothing (0.02 / 0.8 / 0.9 maps)
    assert steps["dust"] == {"name": "dust", "min_size": 500, "connectivity": 26}
    assert steps["binarize"]["threshold"] == 0.5
    rec = cfg["tuning"]
    assert rec["status"] == "done" and rec["volumes"] == ["v0", "v1", "v2", "v3"]
    assert rec["final_score"] > rec["start_score"]
    kept = [c for c in rec["candidates"] if c["status"] == "kept"]
    assert len(kept) == 1 and kept[0]["improved"] == 4
    assert all(c["status"] == "rejected" for c in rec["candidates"] if c["stage"] == "threshold")
    assert pipeline_config(load_postprocess(out)) == {"steps": cfg["steps"]}
    assert json.loads(out.read_text())["tuning"]["final_score"] == rec["final_score"]
    printed = capsys.readouterr().out
    assert "gain" in printed and "dust: kept dust min_size=500 connectivity=26" in printed


def test_tune_refuses_fewer_than_four_volumes(tmp_path, capsys):
    logits, labels = _dataset(tmp_path, 3)
    rc = tp.main(["--logit_dir", str(logits), "--label_dir", str(labels), "--out", str(tmp_path / "pp.json")])
    assert rc == 1 and not (tmp_path / "pp.json").exists()
    assert "at least 4 validation volumes" in capsys.readouterr().err


def test_tune_names_missing_labels(tmp_path):
    logits, labels = _dataset(tmp_path, 4, held_out=False)
    os.remove(labels / "v2.tif")
    with pytest.raises(ValueError, match=r"no label in .* for: v2.tif"):
        tp.tune(logits, labels, tmp_path / "pp.json", stages=[])


def test_tune_stays_inside_a_tiny_budget(tmp_path, capsys):
    logits, labels = _dataset(tmp_path, 4)
    rc = tp.main(["--logit_dir", str(logits), "--label_dir", str(labels), "--out", str(tmp_path / "pp.json"),
                  "--budget_minutes", "0.00001", "--stages", "dust"])
    assert rc == 0
    cfg = json.loads((tmp_path / "pp.json").read_text())
    assert cfg["tuning"]["status"] == "budget too small for one evaluation"
    assert [s["name"] for s in cfg["steps"]] == ["binarize", "dust", "fill_holes"]   # the start, unchanged
    assert "budget spent" in capsys.readouterr().out


def test_tune_bad_stage_named(tmp_path):
    logits, labels = _dataset(tmp_path, 4)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['erosion'\]"):
        tp.tune(logits, labels, tmp_path / "pp.json", stages=["erosion"])


def test_save_logits_wired_as_the_bundle_configs_will(tmp_path):
    # the entries the report asks inference.json / evaluate.json to carry, parsed by MONAI's ConfigParser
    from monai.bundle import ConfigParser

    cfg = ConfigParser({
        "imports": ["$import os"],
        "output_dir": str(tmp_path),
        "save_logits": True,
        "logit_dir": "$os.path.join(@output_dir, 'logits')",
        "save": {"_target_": "custom_components.inference.tune_postprocess.SaveLogitsd", "keys": "pred",
                 "output_dir": "@logit_dir", "enabled": "@save_logits"},
        "post": {"_target_": "custom_components.inference.postprocess.postprocess_transform", "path": None,
                 "keys": "pred", "threshold": 0.5, "min_size": 2, "dust_connectivity": 6},
    })
    cfg.parse()
    p = torch.zeros(1, 4, 4, 4)
    p[0, 1, 1, 1:3] = 0.9
    d = cfg.get_parsed_content("save")({"pred": MetaTensor(p), "id": "case_1"})
    assert np.allclose(tp.probability_of(tp.read_logits(tmp_path / "logits" / "case_1.npy")), p[0].numpy(), atol=1e-3)
    out = cfg.get_parsed_content("post")(d)["pred"]
    assert out.dtype == torch.uint8 and int(out.sum()) == 2
    off = tp.SaveLogitsd("pred", output_dir=str(tmp_path / "none"), enabled=False)({"pred": p, "id": "x"})
    assert off["pred"] is p and not (tmp_path / "none").exists()
