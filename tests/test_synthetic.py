"""Synthetic scrolls: the Kaggle layout, determinism, per-volume variety, and the properties that make them
hard as real data is. The topology and thickness of label 1 are in tests/test_synthetic_properties.py.

Expected values are computed here by hand (runs along lines, fractions, a hand-rolled Dice) or with a
library the generator does not use (scipy.ndimage.label for 26-connected components where the
generator uses cc3d; scikit-image for the Otsu threshold).
"""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.filters import threshold_otsu

from custom_components.data.synthetic import (BORDER, DEFAULT_PROFILE, HELD_OUT_PROFILE, JITTER, LABEL_THICKNESS, PROFILES,
                                              dataset_ids, generate_volume, main, write_dataset)

SHAPE = (64, 64, 64)
SEEDS = (0, 1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def volumes():
    """{(profile, seed): (image, label, info)} at 64^3 for every profile."""
    return {(p, s): generate_volume(SHAPE, s, p) for p in PROFILES for s in SEEDS}


def _runs(line):
    """(first, last) index of every run of equal non-zero values in a 1D array."""
    out, i, n = [], 0, len(line)
    while i < n:
        if line[i]:
            j = i
            while j + 1 < n and line[j + 1] == line[i]:
                j += 1
            out.append((i, j))
            i = j + 1
        else:
            i += 1
    return out


def _along_normal(info, *arrays):
    """``arrays`` with the sheets' normal axis last, oriented so that the recto side comes first."""
    ax, side = info["normal_axis"], info["recto_side"]
    out = [np.moveaxis(a, ax, -1) for a in arrays]
    return [a[..., ::-1] if side > 0 else a for a in out]


def _sheet_crossings(info, label):
    """Runs of one sheet along the normal axis, away from the faces, with air on both ends and no label 2."""
    sid, body, lab = _along_normal(info, info["sheet_id"], info["body"], label)
    found = []
    for i in range(BORDER, sid.shape[0] - BORDER, 2):
        for j in range(BORDER, sid.shape[1] - BORDER, 2):
            for a, b in _runs(sid[i, j]):
                if a == 0 or b == sid.shape[2] - 1 or body[i, j, a - 1] or body[i, j, b + 1]:
                    continue
                if (lab[i, j, a : b + 1] == 2).any():
                    continue
                found.append(lab[i, j, a : b + 1])
    return found


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".tif", ".csv")}


# ------------------------------------------------------------------------------------------ layout


def test_layout_csv_tiff_and_previews(tmp_path):
    shape = (32, 40, 48)
    ids = write_dataset(tmp_path, volumes=2, test=2, test_labels=True, profile="35360", shape=shape, seed=3, preview=True)
    assert len(ids) == 2 and all(i.isdigit() for i in ids)
    assert (tmp_path / "train.csv").read_text() == f"id,scroll_id\n{ids[0]},35360\n{ids[1]},35360\n"
    test_ids = sorted(p.stem for p in (tmp_path / "test_images").iterdir())
    assert len(test_ids) == 2 and not set(test_ids) & set(ids)
    assert sorted(p.stem for p in (tmp_path / "test_labels").iterdir()) == test_ids
    files = [tmp_path / d / f"{i}.tif" for i in ids for d in ("train_images", "train_labels")]
    files += [tmp_path / d / f"{i}.tif" for i in test_ids for d in ("test_images", "test_labels")]
    for f in files:
        with tifffile.TiffFile(f) as tf:
            assert len(tf.pages) == shape[0]  # multi-page: one page per Z slice
            assert tf.pages[0].compression == tifffile.COMPRESSION.LZW
            arr = tf.asarray()
        assert arr.shape == shape and arr.dtype == np.uint8
        if "labels" in f.parent.name:
            assert set(np.unique(arr)) <= {0, 1, 2}
    for i in ids + test_ids:
        assert (tmp_path / "previews" / f"{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files

    write_dataset(tmp_path / "b", volumes=1, test=0, shape=(16, 16, 16), seed=0)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test_images", "train.csv", "train_images", "train_labels"]
    assert not list((tmp_path / "b" / "test_images").iterdir())


def test_dtype_and_shape():
    image, label, info = generate_volume((64, 40, 52), 5, "26010")
    for arr in (image, label):
        assert arr.shape == (64, 40, 52) and arr.dtype == np.uint8 and arr.flags.c_contiguous
    assert set(np.unique(label)) <= {0, 1, 2}
    assert info["body"].shape == info["sheet_id"].shape == (64, 40, 52)
    assert image.std() > 10  # not a blank volume


def test_same_seed_byte_identical_other_seed_or_profile_differs(tmp_path):
    for name, seed, profile in (("a", 5, "34117"), ("b", 5, "34117"), ("c", 6, "34117"), ("d", 5, "26010")):
        write_dataset(tmp_path / name, volumes=2, test=1, test_labels=True, profile=profile, shape=(32, 32, 32), seed=seed)
    a, b, c, d = (_digest(tmp_path / n) for n in "abcd")
    assert a == b
    for other in (c, d):
        assert set(a.values()) & set(other.values()) == set()  # every file differs (ids too)
    # the two training volumes of one dataset differ from each other
    assert len({h for k, h in a.items() if k.startswith("train_images")}) == 2


# ------------------------------------------------------------------------------------ hard geometry


def test_at_least_three_sheets(volumes):
    for key, (_, label, info) in volumes.items():
        assert info["n_sheets"] >= 3, key
        assert set(np.unique(info["sheet_id"])) == set(range(info["n_sheets"] + 1)), key
        # counted from the volume: body runs along lines of the normal axis near the centre
        (body,) = _along_normal(info, info["body"])
        c0, c1 = body.shape[0] // 2, body.shape[1] // 2
        counts = [len(_runs(body[c0 + di, c1 + dj])) for di in range(-6, 7, 3) for dj in range(-6, 7, 3)]
        assert max(counts) >= 3, (key, counts)


def test_sheets_touch_so_bodies_form_fewer_components(volumes):
    full = np.ones((3, 3, 3), bool)  # 26-connectivity
    for key, (_, _, info) in volumes.items():
        body_cc, n_body = ndimage.label(info["body"], structure=full)
        assert n_body == info["body_components"], key
        assert n_body < info["n_sheets"], (key, n_body, info["n_sheets"])
        assert info["n_contacts"] >= 1 and info["contacts"][0]["voxels"] > 0, key
        for c in info["contacts"]:  # a contact joins the bodies of the two sheets it names
            a, b = (body_cc[info["sheet_id"] == s] for s in c["sheets"])
            assert c["sheets"][0] != c["sheets"][1] and len(set(a) | set(b)) == 1, (key, c)


def test_holes_cut_through_sheets(volumes):
    for key, (_, label, info) in volumes.items():
        assert info["n_holes"] >= 1, key
        hole = info["holes"][0]  # the deliberate interior hole
        c, j = tuple(hole["centre"]), hole["sheet"]
        assert hole["kind"] == "hole" and info["sheet_id"][c] == 0 and label[c] != 1, key
        assert all(BORDER < x < n - 1 - BORDER for x, n in zip(c, label.shape)), key
        assert all(h["voxels"] > 0 and 1 <= h["sheet"] <= info["n_sheets"] for h in info["holes"]), key
    assert sum(info["n_tears"] for _, _, info in volumes.values()) > 0


# --------------------------------------------------------------------------------------------- labels


def test_label_fractions_and_border(volumes):
    for key, (_, label, _) in volumes.items():
        assert 0.20 <= (label == 2).mean() <= 0.80, key
        assert 0.01 <= (label == 1).mean() <= 0.25, key
        for axis in range(3):
            for idx in list(range(BORDER)) + [-1 - i for i in range(BORDER)]:
                assert (np.take(label, idx, axis=axis) == 2).all(), (key, axis, idx)
        # unlabeled regions reach beyond the border
        inner = label[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER]
        assert (inner == 2).mean() > 0.05, key


def test_label1_is_a_layer_on_the_recto_face(volumes):
    for key, (_, label, info) in volumes.items():
        l1, body = label == 1, info["body"]
        assert not (l1 & ~body).any(), key  # on papyrus only
        # a layer, not the whole body: label / (label + verso) <= 3.75 / (3.75 + 1.5) = 0.71 per sheet
        assert l1.sum() < 0.75 * (body & (label != 2)).sum(), key
        crossings = _sheet_crossings(info, label)
        assert len(crossings) > 200, key
        first = np.mean([r[0] == 1 for r in crossings])  # the face towards the scroll axis
        last = np.mean([r[-1] == 1 for r in crossings])  # the other face
        one_run = np.mean([np.all(np.diff(np.flatnonzero(r == 1)) == 1) for r in crossings if r[0] == 1])
        depth = np.median([(r == 1).sum() for r in crossings])
        assert first > 0.95 and last < 0.05 and one_run > 0.98, (key, first, last, one_run)
        # 2.25-3.75 voxels along the normal; along the volume axis nearest to it, at most sqrt(2) more
        assert 2 <= depth <= 5, (key, depth)
        assert np.median([len(r) for r in crossings]) >= depth + 1, key  # sheets are thicker than the layer


def test_profiles_differ(volumes):
    def stats(p):
        thick, noise = [], []
        for s in SEEDS:
            image, label, info = volumes[(p, s)]
            thick += [len(r) for r in _sheet_crossings(info, label)]
            # noise: neighbour differences in the air far from papyrus (drift is slow, noise is white)
            air = ~ndimage.binary_dilation(info["body"], iterations=3)
            pair = air[:, :, 1:] & air[:, :, :-1]
            diff = image[:, :, 1:].astype(float) - image[:, :, :-1]
            noise.append(diff[pair].std() / np.sqrt(2))
        return np.median(thick), np.mean(noise)


    t_thick, n_thick = stats("35360")
    t_thin, n_thin = stats("26010")
    assert t_thick >= t_thin + 1, (t_thick, t_thin)
    assert n_thick > 1.5 * n_thin, (n_thick, n_thin)
    for p, n in (("35360", n_thick), ("26010", n_thin)):  # std = noise * (0.7 + 0.6 * air) in 0..255
        expected = np.mean([255 * q["noise"] * (0.7 + 0.6 * q["air"]) for q in (volumes[(p, s)][2]["params"] for s in SEEDS)])
        assert 0.7 * expected < n < 1.4 * expected, (p, n, expected)
    for a in PROFILES:
        for b in PROFILES:
            assert a == b or PROFILES[a] != PROFILES[b]


def test_otsu_threshold_does_not_solve_it(volumes):
    """The threshold segments the bodies (recto, verso, bridges, debris): a perfect body mask would have a
    precision of at most t_label / (t_label + verso) <= 3.75 / 5.25 = 0.71 against label 1."""
    dices = []
    for key, (image, label, _) in volumes.items():
        labelled = label != 2
        pred = (image > threshold_otsu(image)) & labelled
        truth = (label == 1) & labelled
        precision = (pred & truth).sum() / pred.sum()
        dices.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
        assert precision < 0.65 and dices[-1] < 0.75, (key, precision, dices[-1])
    assert np.mean(dices) < 0.65, dices


def test_each_volume_draws_its_own_scanner_and_scroll():
    """Per-volume factors within JITTER around the profile, the label thickness within LABEL_THICKNESS, and
    eight volumes of one profile that differ from each other (and in measured noise as their noise says)."""
    prof, draws = PROFILES["34117"], []
    for seed in range(8):
        image, _, info = generate_volume((32, 32, 32), seed, "34117")
        q = info["params"]
        for key, (lo, hi) in JITTER.items():
            base = prof[key][0] if isinstance(prof[key], tuple) else prof[key]
            got = q[key][0] if isinstance(q[key], list) else q[key]
            floor = {"verso": 1.5, "gap": 2.5}.get(key, 0.0)
            assert max(floor, 0.999 * lo * base) <= got <= max(floor, 1.001 * hi * base), (seed, key, got)
        assert LABEL_THICKNESS[0] <= q["label_thickness"] <= LABEL_THICKNESS[2], q
        assert info["label_thickness"] == round(q["label_thickness"], 3)
        draws.append((q["noise"], q["contrast"], q["blur"], q["label_thickness"]))
    for col in zip(*draws):
        assert len(set(col)) == 8 and max(col) > 1.2 * min(col), col


def test_held_out_profile_is_the_quality_studys():
    text = (ROOT / "bench" / "quality.py").read_text()
    assert HELD_OUT_PROFILE in PROFILES
    assert re.search(r'"--test_profile", default="(\d+)"', text).group(1) == HELD_OUT_PROFILE
    assert re.search(r'"--train_profile", default="(\d+)"', text).group(1) != HELD_OUT_PROFILE


# ------------------------------------------------------------------------------------ arguments, CLI


def test_bad_arguments(tmp_path):
    for shape in ((15, 64, 64), (64, 64), (64, 64, 64, 1), (64.5, 64, 64), "abc", 64):
        with pytest.raises(ValueError, match=r"shape must be 3 ints >= 16 \(Z Y X\)"):
            generate_volume(shape, 0)
    with pytest.raises(ValueError, match="unknown profile 'x'; valid profiles: " + ", ".join(PROFILES)):
        generate_volume(SHAPE, 0, "x")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        generate_volume(SHAPE, -1)
    with pytest.raises(ValueError, match="volumes must be an int >= 1, got 0"):
        write_dataset(tmp_path, volumes=0)
    with pytest.raises(ValueError, match="test must be an int >= 0, got -1"):
        write_dataset(tmp_path, volumes=1, test=-1)
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        write_dataset(tmp_path, volumes=1, profile="nope")
    assert not list(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_cli(tmp_path, capsys):
    args = ["--volumes", "1", "--test", "1", "--test_labels", "--profile", "26010", "--shape", "24", "28", "32",
            "--seed", "4", "--preview"]
    done = subprocess.run([sys.executable, "-m", "custom_components.data.synthetic", "--out", str(tmp_path / "cli"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 training and 1 test volumes" in done.stdout
    ids = write_dataset(tmp_path / "api", volumes=1, test=1, test_labels=True, profile="26010", shape=(24, 28, 32), seed=4)
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "api")  # the CLI is the API
    assert (tmp_path / "cli" / "previews" / f"{ids[0]}.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "bad"), "--volumes", "1", "--shape", "24", "24", "24", "--seed", "1", "--profile", "nope"])
    assert e.value.code == 2 and "valid profiles: 34117" in capsys.readouterr().err


def test_bar_moves_after_each_volume_is_written(tmp_path, monkeypatch):
    """The bar names each volume (training, then test) once its files are on disk."""
    from custom_components import progress

    seen = []

    class Bar:
        disable = True

        def __init__(self, *args, total=None, **kwargs):
            assert total == 3

        def set_postfix_str(self, s="", refresh=True):
            split, vid = s.split()
            on_disk = [(tmp_path / f"{split}_{kind}" / f"{vid}.tif").is_file() for kind in ("images", "labels")]
            seen.append((split, vid, on_disk))

        def update(self, n=1):
            pass

        def close(self):
            pass

    monkeypatch.setattr(progress, "tqdm", Bar)
    ids = write_dataset(tmp_path, volumes=2, test=1, shape=(16, 16, 16), seed=0)
    test_id = dataset_ids(0, DEFAULT_PROFILE, 3)[2]
    assert seen == [("train", ids[0], [True, True]), ("train", ids[1], [True, True]), ("test", test_id, [True, False])]
