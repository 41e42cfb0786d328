"""Synthetic scrolls: layout, determinism, and the properties that make them hard (as the real data is)."""

import csv
import hashlib

import cc3d
import numpy as np
import pytest
import tifffile
from skimage.filters import threshold_otsu

from custom_components.synthetic import PROFILES, generate_volume, main, write_dataset

SHAPE = (64, 64, 64)


@pytest.fixture(scope="module")
def volumes():
    return {(p, s): generate_volume(SHAPE, s, p) for p in PROFILES for s in range(3)}


def test_layout_and_csv(tmp_path):
    ids = write_dataset(tmp_path, volumes=2, test=1, test_labels=True, profile="35360", shape=(40, 48, 56), seed=3, preview=True)
    rows = list(csv.reader(open(tmp_path / "train.csv")))
    assert rows[0] == ["id", "scroll_id"] and [r[0] for r in rows[1:]] == ids and {r[1] for r in rows[1:]} == {"35360"}
    for vid in ids:
        for d in ("train_images", "train_labels"):
            with tifffile.TiffFile(tmp_path / d / f"{vid}.tif") as tf:
                assert tf.series[0].shape == (40, 48, 56) and tf.series[0].dtype == np.uint8
                assert tf.pages[0].compression == tifffile.COMPRESSION.LZW
        assert (tmp_path / "previews" / f"{vid}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "test_images").iterdir())) == 1 and len(list((tmp_path / "test_labels").iterdir())) == 1


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.tif"))}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_dataset(tmp_path / name, volumes=1, test=1, shape=(40, 40, 40), seed=seed)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert list(_digest(tmp_path / "a").values()) != list(_digest(tmp_path / "c").values())


def test_at_least_three_sheets_that_touch(volumes):
    for (p, s), (_, label, info) in volumes.items():
        assert info["n_sheets"] >= 3, (p, s)
        # touching: the sheets' bodies form fewer 26-connected components than there are sheets
        n_components = cc3d.connected_components(info["body"], connectivity=26, return_N=True)[1]
        assert n_components < info["n_sheets"], (p, s, n_components, info["n_sheets"])


def test_holes_exist(volumes):
    assert sum(info["n_holes"] for _, _, info in volumes.values()) > 0
    # a hole shows as body voxels missing inside a sheet: some sheets have fewer voxels than a full one
    assert any(info["n_holes"] for (p, _), (_, _, info) in volumes.items() if p == "34117")


def test_label_fractions_and_border(volumes):
    for (p, s), (_, label, _) in volumes.items():
        assert set(np.unique(label)) <= {0, 1, 2}
        assert 0.20 <= (label == 2).mean() <= 0.80, (p, s)
        assert 0.01 <= (label == 1).mean() <= 0.20, (p, s)
        for axis in range(3):
            for idx in (0, 1, 2, -1, -2, -3):
                assert (np.take(label, idx, axis=axis) == 2).all()


def test_label1_is_one_face_of_the_sheet(volumes):
    # label 1 lies on the sheet body, and is a thin layer: most body voxels are not label 1
    for (p, s), (_, label, info) in volumes.items():
        body, l1 = info["body"], label == 1
        assert l1[body].mean() < 0.5 and (l1 & ~body).sum() == 0, (p, s)
        assert (l1.sum() / max(1, (body & (label != 2)).sum())) < 0.5


def test_profiles_differ():
    stats = {}
    for p in PROFILES:
        thick = [t for s in range(3) for t in generate_volume(SHAPE, s, p)[2]["thickness"]]
        stats[p] = np.mean(thick)
    assert stats["35360"] > stats["34117"] > stats["26010"]


def test_threshold_does_not_solve_it(volumes):
    for (p, s), (image, label, _) in volumes.items():
        m = label != 2
        pred = image > threshold_otsu(image)
        l1 = label == 1
        dice = 2 * (pred & l1 & m).sum() / ((pred & m).sum() + (l1 & m).sum())
        assert dice < 0.5, (p, s, dice)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape must be 3 ints >= 16"):
        generate_volume((8, 64, 64), 0)
    with pytest.raises(ValueError, match="unknown profile 'x'; valid profiles"):
        generate_volume(SHAPE, 0, "x")
    with pytest.raises(ValueError, match="volumes must be >= 1"):
        write_dataset("/tmp/never", volumes=0)


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--volumes", "1", "--test", "0", "--shape", "40", "40", "40", "--seed", "1"]) == 0
    assert "wrote 1 training" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--volumes", "1", "--shape", "40", "40", "40", "--seed", "1", "--profile", "nope"])
