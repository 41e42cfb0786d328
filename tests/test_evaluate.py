"""``python -m custom_components.metrics.evaluate`` on temporary folders of tiny TIFFs: table, CSV, mean row, errors.

Expected scores by hand (docs/METRIC.md): a plane against itself scores 1; an empty prediction against a
plane scores 0.30 * 1 (no finite Betti pair: TopoScore 1) + 0.35 * 0 (SurfaceDice) + 0.35 * 1 (VOI 0) = 0.65;
a prediction that is half of the plane has VOI 1 bit (voi_score 1/1.3) and SurfaceDice < 1.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from custom_components.metrics import evaluate

# surface-distance 0.1 imports scipy.ndimage.filters / .morphology (deprecated names; not our code)
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")]

N = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plane() -> np.ndarray:
    a = np.zeros((N, N, N), np.uint8)
    a[4] = 1
    return a


def write(folder, name, arr) -> None:
    os.makedirs(folder, exist_ok=True)
    tifffile.imwrite(os.path.join(folder, name), np.asarray(arr), compression="zlib", photometric="minisblack")


@pytest.fixture
def folders(tmp_path):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    a = plane()
    for vid in ("v1", "v2", "v3"):
        write(label_dir, f"{vid}.tif", a)
    write(pred_dir, "v1.tif", a)  # identical -> 1.0
    write(pred_dir, "v2.tif", np.zeros_like(a))  # empty -> 0.65
    half = a.copy()
    half[4, :, 6:] = 0
    write(pred_dir, "v3.tif", half)  # VOI 1 bit
    return pred_dir, label_dir


def test_cli_table_csv_and_mean(folders, tmp_path, capsys):
    pred_dir, label_dir = folders
    out = tmp_path / "res" / "results.csv"
    assert evaluate.main(["--pred_dir", str(pred_dir), "--label_dir", str(label_dir), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split()
    assert header == list(evaluate.COLUMNS)
    assert all(s in text for s in ("v1", "v2", "v3", "mean", "1.0000", "0.6500"))
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["v1", "v2", "v3", "mean"]
    s = [float(r["score"]) for r in rows]
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(0.65)
    assert float(rows[2]["voi"]) == pytest.approx(1.0) and float(rows[2]["voi_score"]) == pytest.approx(1 / 1.3)
    assert s[3] == pytest.approx(sum(s[:3]) / 3)
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert not [n for n in os.listdir(out.parent) if n.startswith(".tmp")]


def test_serial_equals_parallel(folders):
    pred_dir, label_dir = folders
    serial = evaluate.score_folders(pred_dir, label_dir, workers=1)
    parallel = evaluate.score_folders(pred_dir, label_dir, workers=3)
    keys = ("id", "score", "topo_score", "surface_dice", "voi_score", "voi", "betti_pred")
    assert [[r[k] for k in keys] for r in serial] == [[r[k] for k in keys] for r in parallel]


def test_missing_extra_and_mismatched_files_exit_1(folders, capsys):
    pred_dir, label_dir = folders
    args = ["--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]
    os.remove(pred_dir / "v2.tif")
    write(pred_dir, "v9.tif", plane())
    write(pred_dir, "v3.tif", np.zeros((N, N, N + 1), np.uint8))
    capsys.readouterr()
    assert evaluate.main(args) == 1
    err = capsys.readouterr().err
    assert "missing prediction for v2.tif" in err
    assert "extra prediction v9.tif" in err
    assert "shape mismatch for v3" in err and "(12, 12, 13)" in err and "(12, 12, 12)" in err
    # an unreadable file is named too
    os.remove(pred_dir / "v9.tif")
    write(pred_dir, "v2.tif", plane())
    write(pred_dir, "v3.tif", plane())
    (pred_dir / "v1.tif").write_bytes(b"not a tiff")
    assert evaluate.main(args) == 1
    assert "v1.tif" in capsys.readouterr().err


def test_module_entry_point(folders, tmp_path):
    pred_dir, label_dir = folders
    os.remove(pred_dir / "v3.tif")
    proc = subprocess.run([sys.executable, "-m", "custom_components.metrics.evaluate", "--pred_dir", str(pred_dir),
                           "--label_dir", str(label_dir)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "missing prediction for v3.tif" in proc.stderr


def test_compare_postprocessing(folders, tmp_path, capsys):
    pred_dir, label_dir = folders
    post_dir = tmp_path / "post"
    for vid in ("v1", "v2", "v3"):
        write(post_dir, f"{vid}.tif", plane())  # post-processing restores the plane everywhere -> 1.0
    rows = evaluate.compare_postprocessing(pred_dir, post_dir, label_dir, tmp_path / "cmp.csv", workers=1)
    assert [r["id"] for r in rows] == ["v1", "v2", "v3"]
    assert rows[0]["score_diff"] == pytest.approx(0.0) and rows[1]["score_diff"] == pytest.approx(0.35)
    assert all(r["score_post"] == pytest.approx(1.0) for r in rows)
    assert "score_diff" in capsys.readouterr().out and (tmp_path / "cmp.csv").exists()


def test_truncated_tiff_named_before_any_scoring(folders, monkeypatch, capsys):
    """A prediction cut short by 100 bytes (a broken copy) still shows tifffile a (12, 12, 12) series, so a
    plain header read passes it; io's checked reader names it and nothing is scored."""
    pred_dir, label_dir = folders
    cut = pred_dir / "v2.tif"
    tifffile.imwrite(cut, plane(), photometric="minisblack")
    full = cut.read_bytes()
    cut.write_bytes(full[:-100])
    with tifffile.TiffFile(cut) as tf:
        assert tf.series[0].shape == (N, N, N)  # what a header-only read without the checks believes

    def never(*args, **kwargs):
        raise AssertionError("a volume was scored before the file check")

    monkeypatch.setattr(evaluate, "_score_one", never)
    capsys.readouterr()
    assert evaluate.main(["--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]) == 1
    err = capsys.readouterr().err
    assert "v2.tif" in err and ("truncated" in err or "corrupt" in err)
    assert "v1.tif" not in err and "v3.tif" not in err  # only the broken file is named


def test_bar_follows_completion_order_results_id_order(folders, tmp_path, monkeypatch):
    """v1's prediction is read only once the bar has shown v2 and v3 (possible only when the pool is read in
    completion order); the rows still come back sorted by id with their own scores."""
    from completion_gate import bar_recorder, held

    from custom_components import progress
    from custom_components.data import io as vio

    pred_dir, label_dir = folders
    release = str(tmp_path / "release")
    target = os.path.join(str(pred_dir), "v1.tif")
    monkeypatch.setattr(vio, "read_volume", held(vio.read_volume, lambda p, *a: os.fspath(p) == target, release))
    bar = bar_recorder(release, others=["v2", "v3"])
    monkeypatch.setattr(progress, "tqdm", bar)
    rows = evaluate.score_folders(pred_dir, label_dir, workers=3)
    assert sorted(bar.shown[:2]) == ["v2", "v3"] and bar.shown[2:] == ["v1"]
    assert [r["id"] for r in rows] == ["v1", "v2", "v3"]
    assert rows[0]["score"] == pytest.approx(1.0) and rows[1]["score"] == pytest.approx(0.65)
