"""Competition metric (custom_components.metrics, .betti_matching, .evaluate) on tiny hand-built volumes.

Expected values are derived by hand in the comments (shared/METRIC.md), never from the libraries the code
calls.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch

from custom_components import evaluate
from custom_components.betti_matching import betti_counts, load_extension
from custom_components.metrics import (
    LeaderboardIgniteMetric,
    LeaderboardMetric,
    leaderboard_score,
    leaderboard_score_reference,
    surface_dice,
    tiles,
    topo_score,
    voi,
)

pytestmark = pytest.mark.timeout(60)

N = 12


def plane(z: int, shape=(N, N, N)) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[z] = 1
    return a


def values(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "seconds"}


def entropy_bits(*counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


# ----------------------------------------------------------------------------------------- extension


def test_extension_loads_without_topolosses_package():
    import sys

    ext = load_extension()
    assert load_extension() is ext  # cached
    assert hasattr(ext, "compute_matching")
    assert "topolosses" not in sys.modules and "torchvision" not in sys.modules


def test_betti_counts_extra_component_in_prediction():
    # label: one blob; prediction: the blob plus a separate voxel -> one finite H0 pair in the prediction,
    # unmatched (p0 = 1, g0 = 0, m0 = 0); nothing else finite.
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    pred = lab.copy()
    pred[7, 7, 7] = 1
    m, p, g = betti_counts(pred, lab)
    assert m.tolist() == [0, 0, 0] and p.tolist() == [1, 0, 0] and g.tolist() == [0, 0, 0]
    m, p, g = betti_counts(lab, pred)  # order matters: (prediction, label)
    assert p.tolist() == [0, 0, 0] and g.tolist() == [1, 0, 0]


def test_betti_counts_hollow_cube_has_a_void():
    # a hollow cube: its cavity is a finite H2 pair, matched with itself
    a = np.zeros((8, 8, 8), np.uint8)
    a[1:7, 1:7, 1:7] = 1
    a[3:5, 3:5, 3:5] = 0
    m, p, g = betti_counts(a, a)
    assert m.tolist() == [0, 0, 1] and p.tolist() == [0, 0, 1] and g.tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------------------- whole score


def test_both_empty_every_component_one():
    z = np.zeros((N, N, N), np.uint8)
    for r in (leaderboard_score(z, z), leaderboard_score_reference(z, z)):
        assert r["surface_dice"] == 1.0 and r["voi_score"] == 1.0 and r["topo_score"] == 1.0
        assert r["voi"] == 0.0 and r["topo_f1"] == [None, None, None]
        assert r["score"] == pytest.approx(1.0, abs=1e-12)


def test_pred_empty_label_not_surface_dice_zero():
    r = leaderboard_score(np.zeros((N, N, N), np.uint8), plane(4))
    assert r["surface_dice"] == 0.0
    # union = the plane, one GT component, prediction constant 0 -> both conditional entropies 0
    assert r["voi"] == 0.0
    # neither side has a finite persistence pair -> all dimensions dropped -> 1.0
    assert r["topo_score"] == 1.0
    assert r["score"] == pytest.approx(0.30 + 0.35 * 0 + 0.35 * 1)


@pytest.mark.parametrize("shift,expected", [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5), (4, 0.0)])
def test_plane_shift_surface_dice(shift, expected):
    # surface-distance puts surface elements on voxel faces: the plane z=4 has its two large faces at
    # z=4 and z=5, the shifted plane at 4+s and 5+s (plus equal side faces at the volume's edges).
    # s<=2: every face has a face of the other within 2 (|5-(4+s)| <= 1, |4-(4+s)| = s <= 2 ...) -> 1.
    # s=3: face 5 is 2 from face 7 (within), face 4 is 3 from face 7 (not): half of each surface -> 0.5.
    # s=4: nearest faces 5 and 8 are 3 apart -> 0.
    a, b = plane(4).astype(bool), plane(4 + shift).astype(bool)
    assert surface_dice(b, a, crop=True) == pytest.approx(expected, abs=1e-12)
    assert surface_dice(b, a, crop=False) == pytest.approx(expected, abs=1e-12)
    assert leaderboard_score(b, a)["surface_dice"] == pytest.approx(expected, abs=1e-12)


def test_crop_equals_full_volume_surface_dice():
    rng = np.random.default_rng(3)
    for _ in range(4):
        g = np.zeros((20, 22, 24), bool)
        p = np.zeros_like(g)
        g[5:15, 3:12, 4:20] = rng.random((10, 9, 16)) > 0.4
        p[6:17, 2:14, 0:18] = rng.random((11, 12, 18)) > 0.4
        p[0, 0, 0] = True  # touches the volume corner
        assert surface_dice(p, g, crop=True) == surface_dice(p, g, crop=False)


def test_voi_plane_cut_by_gap():
    # label: plane z=4 (144 voxels, one component). prediction: the plane without column x=5 -> parts
    # x<5 (60 voxels) and x>5 (72 voxels, 2 apart: not 26-connected) and the gap (12, background 0).
    # GT is constant on the union -> H(GT|Pred) = 0; H(Pred|GT) = H(60, 72, 12 over 144).
    lab = plane(4)
    pred = lab.copy()
    pred[4, :, 5] = 0
    split, merge = voi(pred.astype(bool), lab.astype(bool))
    expected = entropy_bits(60, 72, 12)
    assert split == pytest.approx(expected, abs=1e-12) and merge == pytest.approx(0.0, abs=1e-12)
    r = leaderboard_score(pred, lab)
    assert r["voi"] == pytest.approx(expected, abs=1e-12)
    assert r["voi_score"] == pytest.approx(1 / (1 + 0.3 * expected), abs=1e-12)


def test_voi_even_split_is_one_bit():
    # label: plane z=4 (one component, 144 voxels); prediction: its half x<6 (72 voxels). On the union
    # (= the plane) the prediction labels are {1: 72, 0: 72}: one GT component split evenly in two ->
    # H(Pred|GT) = 1 bit (split), H(GT|Pred) = 0 (merge); swapping roles swaps them.
    lab = plane(4)
    pred = lab.copy()
    pred[4, :, 6:] = 0
    r = leaderboard_score(pred, lab)
    assert r["voi"] == pytest.approx(1.0, abs=1e-12)
    assert r["voi_split"] == pytest.approx(1.0, abs=1e-12) and r["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    assert r["voi_score"] == pytest.approx(1 / 1.3, abs=1e-12)  # 1 / (1 + 0.3 * 1)
    r2 = leaderboard_score(lab, pred)
    assert r2["voi_split"] == pytest.approx(0.0, abs=1e-12) and r2["voi_merge"] == pytest.approx(1.0, abs=1e-12)


def test_topo_f1_formulas():
    # rows m, p, g; columns dims 0, 1, 2
    c = np.array([[0, 0, 0], [3, 0, 0], [0, 0, 0]])  # p0 = 3 > 0 = g0; dims 1, 2 dropped
    ts, f1 = topo_score(c)
    assert f1 == [pytest.approx(0.5 / 3.5), None, None] and ts == pytest.approx(1 / 7)
    c = np.array([[2, 1, 0], [4, 2, 0], [2, 2, 0]])  # F1_0 = 4/6, F1_1 = 2/4, dim 2 dropped
    ts, f1 = topo_score(c)
    assert ts == pytest.approx((0.34 * 4 / 6 + 0.33 * 0.5) / 0.67)
    assert topo_score(np.zeros((3, 3), int)) == (1.0, [None, None, None])


def test_topo_special_case_prediction_only_features():
    # label empty; prediction: two separate voxels in the first tile -> one finite H0 pair (the younger
    # component dies when the background enters), p0 = 1, g0 = 0 -> F1_0 = 0.5 / 1.5 = 1/3.
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[0, 0, 0] = pred[2, 2, 2] = 1
    r = leaderboard_score(pred, np.zeros_like(pred))
    assert r["betti_pred"] == [1, 0, 0] and r["betti_label"] == [0, 0, 0]
    assert r["topo_score"] == pytest.approx(1 / 3)
    assert r["surface_dice"] == 0.0
    # union = the two voxels, GT constant, prediction labels 1 and 2 -> VOI = 1 bit
    assert r["voi"] == pytest.approx(1.0)
    assert r["score"] == pytest.approx(0.30 / 3 + 0.35 / 1.3)


def test_identical_single_sheets_topo_one():
    a = plane(4)
    r = leaderboard_score(a, a)
    assert r["betti_pred"] == [0, 0, 0] and r["betti_label"] == [0, 0, 0]
    assert r["topo_score"] == 1.0 and r["surface_dice"] == 1.0 and r["voi"] == 0.0
    assert r["score"] == pytest.approx(1.0)


def test_label_two_is_ignored():
    lab = plane(5).astype(np.uint8)
    lab[:3], lab[-3:], lab[:, :3], lab[:, -3:], lab[:, :, :3], lab[:, :, -3:] = 2, 2, 2, 2, 2, 2
    pred = plane(5)
    base = values(leaderboard_score(pred, lab))
    noisy = pred.copy()
    ignore = lab == 2
    rng = np.random.default_rng(0)
    noisy[ignore] = rng.integers(0, 2, int(ignore.sum()))
    assert values(leaderboard_score(noisy, lab)) == base
    assert values(leaderboard_score_reference(noisy, lab)) == base
    assert base["score"] == pytest.approx(1.0)


def test_nan_counts_as_background():
    lab = plane(4)
    pred = lab.astype(np.float32)
    pred[7] = np.nan
    assert values(leaderboard_score(pred, lab)) == values(leaderboard_score(lab, lab))


def test_odd_shape_tiling():
    t = tiles((7, 9, 11))
    assert len(t) == 8
    assert t[0] == (slice(0, 4), slice(0, 5), slice(0, 6)) and t[-1] == (slice(4, 7), slice(5, 9), slice(6, 11))
    cover = np.zeros((7, 9, 11), int)
    for s in t:
        cover[s] += 1
    assert (cover == 1).all()
    rng = np.random.default_rng(1)
    lab = (rng.random((7, 9, 11)) > 0.7).astype(np.uint8)
    pred = (rng.random((7, 9, 11)) > 0.7).astype(np.uint8)
    assert values(leaderboard_score(pred, lab, workers=2)) == values(leaderboard_score_reference(pred, lab))


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        leaderboard_score(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 4\)"):
        leaderboard_score(np.zeros((4, 4)), np.zeros((4, 4), np.uint8))


def _sheets(shape, rng, n=2) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    out = np.zeros(shape, np.uint8)
    for _ in range(n):
        z0, a, f = rng.uniform(4, shape[0] - 4), rng.uniform(0.5, 2.5), rng.uniform(0.1, 0.4)
        surf = z0 + a * np.sin(f * xx + rng.uniform(0, 6)) * np.cos(f * yy)
        out |= (np.abs(zz - surf) < 1.0).astype(np.uint8)
    return out


def test_fast_equals_reference_on_sheet_volumes():
    rng = np.random.default_rng(7)
    for shape in [(24, 24, 24), (21, 26, 19)]:
        lab = _sheets(shape, rng)
        lab[:2], lab[:, :, -2:] = 2, 2
        pred = np.roll(lab == 1, 1, axis=0).astype(np.uint8)
        pred[rng.random(shape) > 0.995] = 1  # dust
        pred[rng.random(shape) > 0.97] = 0  # holes
        fast, ref = leaderboard_score(pred, lab, workers=2), leaderboard_score_reference(pred, lab)
        assert values(fast) == values(ref)
        assert 0.0 <= fast["score"] <= 1.0 and set(fast["seconds"]) >= {"surface_dice", "voi", "topo"}


# ----------------------------------------------------------------------------------------- MONAI / ignite


def _batch():
    a = plane(4)
    y_pred = torch.from_numpy(np.stack([a, np.zeros_like(a)])[:, None].astype(np.float32))
    y = torch.from_numpy(np.stack([a, a])[:, None].astype(np.float32))
    # sample 0 identical -> all 1; sample 1 empty prediction: sdice 0, VOI 0, topo 1 -> 0.65
    return y_pred, y, torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.65, 1.0, 0.0, 1.0]])


def test_leaderboard_metric_batch_of_two():
    y_pred, y, expected = _batch()
    m = LeaderboardMetric(workers=1)
    out = m(y_pred, y)
    assert out.shape == (2, 4)
    assert torch.allclose(out, expected, atol=1e-6)
    assert float(m.aggregate()) == pytest.approx(0.825, abs=1e-6)
    comps = m.aggregate_components()
    assert comps == pytest.approx({"score": 0.825, "topo_score": 1.0, "surface_dice": 0.5, "voi_score": 1.0}, abs=1e-6)
    with pytest.raises(ValueError, match="y_pred"):
        m(y_pred, y[:, :, :5])


def test_ignite_handler_puts_components_in_state():
    from ignite.engine import Engine
    from monai.handlers import from_engine

    y_pred, y, _ = _batch()
    engine = Engine(lambda e, b: {"pred": [y_pred[0], y_pred[1]], "label": [y[0], y[1]]})
    handler = LeaderboardIgniteMetric(workers=2, output_transform=from_engine(["pred", "label"]))
    handler.attach(engine, "val_score")
    engine.run([0], max_epochs=1)
    m = engine.state.metrics
    assert m["val_score"] == pytest.approx(0.825, abs=1e-6)
    assert m["val_surface_dice"] == pytest.approx(0.5, abs=1e-6)
    assert m["val_topo_score"] == pytest.approx(1.0) and m["val_voi_score"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- evaluate CLI


def _write(folder, name, arr):
    from custom_components.io import write_volume

    os.makedirs(folder, exist_ok=True)
    write_volume(os.path.join(folder, name), arr)


def test_evaluate_cli(tmp_path, capsys):
    pred_dir, label_dir, post_dir = tmp_path / "pred", tmp_path / "labels", tmp_path / "post"
    a = plane(4)
    half = a.copy()
    half[4, :, 6:] = 0
    _write(label_dir, "v1.tif", a)
    _write(label_dir, "v2.tif", a)
    _write(pred_dir, "v1.tif", a)  # identical -> 1.0
    _write(pred_dir, "v2.tif", np.zeros_like(a))  # empty -> 0.65
    out = tmp_path / "res.csv"
    assert evaluate.main(["--pred_dir", str(pred_dir), "--label_dir", str(label_dir), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "v1" in text and "v2" in text and "mean" in text and "surface_dice" in text
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["v1", "v2", "mean"]
    assert float(rows[0]["score"]) == pytest.approx(1.0) and float(rows[1]["score"]) == pytest.approx(0.65)
    assert float(rows[2]["score"]) == pytest.approx(0.825)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    # post-processed folder: v2 becomes the half plane (sdice 1 - the cut faces? no: scored, diff = post - raw)
    _write(post_dir, "v1.tif", a)
    _write(post_dir, "v2.tif", half)
    rows = evaluate.compare_postprocessing(pred_dir, post_dir, label_dir, tmp_path / "cmp.csv", workers=1)
    assert [r["id"] for r in rows] == ["v1", "v2"]
    assert rows[0]["score_diff"] == pytest.approx(0.0)
    assert rows[1]["score_diff"] == pytest.approx(rows[1]["score_post"] - 0.65)
    assert os.path.exists(tmp_path / "cmp.csv")

    # missing prediction -> exit 1 naming the file; extra prediction too
    os.remove(pred_dir / "v2.tif")
    _write(pred_dir, "v3.tif", a)
    capsys.readouterr()
    assert evaluate.main(["--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]) == 1
    err = capsys.readouterr().err
    assert "v2.tif" in err and "v3.tif" in err

    # shape mismatch -> exit 1 naming the file and both shapes
    os.remove(pred_dir / "v3.tif")
    _write(pred_dir, "v2.tif", np.zeros((N, N, N + 1), np.uint8))
    assert evaluate.main(["--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]) == 1
    err = capsys.readouterr().err
    assert "v2" in err and "(12, 12, 13)" in err and "(12, 12, 12)" in err
