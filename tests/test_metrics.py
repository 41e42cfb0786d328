"""Competition metric (custom_components.metrics.score, custom_components.metrics.betti_matching) on tiny hand-built volumes.

Expected values are derived by hand in the comments (docs/METRIC.md), never by calling the libraries the
code under test calls; the library calls below only cross-check that the fast path reproduces them bit for bit.
The Betti-matching extension works on the inverted masks with a V-construction cubical complex, so its
H0 counts 6-connected foreground components; 0/1 images have finite pairs [0, 1) only, one per extra
component (b0 - 1), per loop (b1) and per cavity (b2) of each tile's foreground.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from custom_components.metrics import betti_matching
from custom_components.metrics.betti_matching import betti_counts, betti_counts_reference, finite_pair_counts, load_extension
from custom_components.metrics.score import (
    LeaderboardIgniteMetric,
    LeaderboardMetric,
    conditional_entropies,
    leaderboard_score,
    leaderboard_score_reference,
    neighbour_code,
    prepare_masks,
    surface_dice,
    surface_dice_reference,
    surface_distances,
    tiles,
    topo_score,
    values_of,
    voi,
)

# surface-distance 0.1 imports scipy.ndimage.filters / .morphology (deprecated names; not our code)
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")]

N = 12


def plane(z: int, shape=(N, N, N)) -> np.ndarray:
    """A full 1-voxel plane at index ``z`` of axis 0."""
    a = np.zeros(shape, np.uint8)
    a[z] = 1
    return a


def square(z: int, shape=(16, 16, 16)) -> np.ndarray:
    """A 6 x 6 sheet at z, inside the first tile (axes cut at 8) of a 16^3 volume."""
    a = np.zeros(shape, np.uint8)
    a[z, 1:7, 1:7] = 1
    return a


def entropy_bits(*counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def both(pred, label, workers=1) -> dict:
    """The fast and the reference result, asserted identical (every value key), returned once."""
    fast, ref = values_of(leaderboard_score(pred, label, workers=workers)), values_of(leaderboard_score_reference(pred, label))
    assert fast == ref
    return fast


# ----------------------------------------------------------------------------------------- extension


def test_extension_loads_without_importing_topolosses():
    # in a fresh interpreter: the .so loads by path, neither topolosses nor torchvision / cv2 get imported
    code = (
        "import sys, custom_components.metrics.betti_matching as b; m = b.load_extension(); assert b.load_extension() is m;"
        "assert hasattr(m, 'compute_matching');"
        "bad = [k for k in ('topolosses', 'torchvision', 'cv2') if k in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extension_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(betti_matching, "_package_dirs", lambda: [])
    with pytest.raises(ImportError, match=r"pip install --no-deps topolosses==0\.2\.0"):
        betti_matching.find_extension()
    monkeypatch.setattr(betti_matching, "_package_dirs", lambda: [str(tmp_path)])
    with pytest.raises(ImportError, match=r"pip install --no-deps topolosses==0\.2\.0"):
        betti_matching.find_extension()


def test_betti_counts_order_and_dimensions():
    lab = square(3)
    holed = lab.copy()
    holed[3, 3, 3] = 0  # a hole through the sheet: one loop (H1), one component
    m, p, g = betti_counts(holed, lab)  # (prediction, label)
    assert (list(m), list(p), list(g)) == ([0, 0, 0], [0, 1, 0], [0, 0, 0])
    m, p, g = betti_counts(lab, holed)  # swapped: the loop is the label's
    assert (list(m), list(p), list(g)) == ([0, 0, 0], [0, 0, 0], [0, 1, 0])
    m, p, g = betti_counts(holed, holed)  # the same loop in both: matched
    assert (list(m), list(p), list(g)) == ([0, 1, 0], [0, 1, 0], [0, 1, 0])
    cube = np.zeros((10, 10, 10), np.uint8)
    cube[1:6, 1:6, 1:6] = 1
    cavity = cube.copy()
    cavity[3, 3, 3] = 0  # a closed cavity: one H2 class
    m, p, g = betti_counts(cavity, cube)
    assert (list(m), list(p), list(g)) == ([0, 0, 0], [0, 0, 1], [0, 0, 0])
    m, p, g = betti_counts(np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    assert list(p) == [0, 0, 0]
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 2, 3\)"):
        betti_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_finite_pair_counts_by_hand():
    """(b0 - 1, b1, b2) of the foreground complex: hand-counted shapes."""
    box = np.zeros((9, 9, 9), np.uint8)
    assert list(finite_pair_counts(box)) == [0, 0, 0]  # empty
    solid = box.copy()
    solid[2:7, 2:7, 2:7] = 1
    assert list(finite_pair_counts(solid)) == [0, 0, 0]  # one component, nothing else
    two = solid.copy()
    two[2:7, 4, 2:7] = 0  # cut in two by a wall: two components
    assert list(finite_pair_counts(two)) == [1, 0, 0]
    diagonal = box.copy()
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1  # 26- but not 6-neighbours: two components for the V-construction
    assert list(finite_pair_counts(diagonal)) == [1, 0, 0]
    ring = box.copy()
    ring[4, 3:6, 3:6] = 1
    ring[4, 4, 4] = 0  # 8 voxels, 8 edges, no square: chi 0, one loop
    assert list(finite_pair_counts(ring)) == [0, 1, 0]
    shell = solid.copy()
    shell[4, 4, 4] = 0  # a closed cavity
    assert list(finite_pair_counts(shell)) == [0, 0, 1]
    shell[3:6, 3:6, 3:6] = 0  # a bigger cavity, still closed
    assert list(finite_pair_counts(shell)) == [0, 0, 1]
    cup = box.copy()
    cup[:5, 2:7, 2:7] = 1
    cup[:4, 4, 4] = 0  # a cavity open to the box's face is no cavity (and no loop)
    assert list(finite_pair_counts(cup)) == [0, 0, 0]
    full = np.ones((4, 5, 6), np.uint8)
    assert list(finite_pair_counts(full)) == [0, 0, 0]
    with pytest.raises(ValueError, match=r"3D.*\(4, 4\)"):
        finite_pair_counts(np.ones((4, 4)))


@pytest.mark.parametrize("seed", range(6))
def test_betti_counts_agree_with_the_extensions_unmatched_pairs(seed):
    """p and g counted from Betti numbers equal m + unmatched pairs as Betti-Matching-3D reports them."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 24, 3))
    pred = rng.random(shape) < rng.uniform(0.2, 0.8)
    label = rng.random(shape) < rng.uniform(0.2, 0.8)
    fast, ref = betti_counts(pred, label), betti_counts_reference(pred, label)
    for a, b in zip(fast, ref):
        assert list(a) == list(b)
    assert fast[1].sum() > 0 and fast[2].sum() > 0  # random masks have topology to count


# ----------------------------------------------------------------------------------------- edge cases


def test_both_empty_every_component_one():
    z = np.zeros((8, 9, 10), np.uint8)
    r = both(z, z, workers=2)
    assert r["score"] == 1.0 and r["topo_score"] == 1.0 and r["surface_dice"] == 1.0 and r["voi_score"] == 1.0
    assert r["voi"] == 0.0 and r["topo_f1"] == [None, None, None]


def test_prediction_empty_label_not():
    # SurfaceDice 0; the label plane is one component per tile (no finite pair) -> TopoScore 1;
    # on the union (the plane) GT is constant and Pred is all background -> VOI 0.
    lab = plane(4)
    r = both(np.zeros_like(lab), lab)
    assert r["surface_dice"] == 0.0 and r["topo_score"] == 1.0 and r["voi"] == 0.0
    assert r["score"] == pytest.approx(0.30 + 0.35 * 0.0 + 0.35 * 1.0, abs=1e-15)
    assert both(lab, np.zeros_like(lab))["surface_dice"] == 0.0


def test_shape_and_dimension_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        leaderboard_score(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 4\)"):
        leaderboard_score(np.zeros((4, 4)), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 4, 1\)"):
        leaderboard_score_reference(np.zeros((4, 4, 4)), np.zeros((4, 4, 4, 1), np.uint8))


def test_nan_counts_as_background_and_any_nonzero_is_foreground():
    lab = plane(4)
    pred = lab.astype(np.float32) * 0.3  # != 0 -> foreground, whatever the value
    pred[7] = np.nan
    assert values_of(leaderboard_score(pred, lab)) == values_of(leaderboard_score(lab, lab))
    p, g = prepare_masks(pred, lab)
    assert p.dtype == bool and p.sum() == N * N and (p == g).all()


def test_label_two_is_ignored():
    lab = plane(5)
    lab[:3], lab[-3:], lab[:, :3], lab[:, -3:], lab[:, :, :3], lab[:, :, -3:] = 2, 2, 2, 2, 2, 2
    pred = plane(5)
    base = both(pred, lab)
    noisy = pred.copy()
    ignore = lab == 2
    noisy[ignore] = np.random.default_rng(0).integers(0, 2, int(ignore.sum()))
    assert both(noisy, lab) == base
    assert base["score"] == 1.0  # the kept part of the plane equals itself


# ----------------------------------------------------------------------------------------- SurfaceDice


@pytest.mark.parametrize("shift,expected", [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5), (4, 0.0)])
def test_plane_shift_surface_dice(shift, expected):
    # surface-distance puts surfels on the voxel corners: plane z=4 (full in y, x) has two surfel layers,
    # between voxel rows 3|4 and 4|5 (same area each), the shifted plane those of 3+s|4+s and 4+s|5+s.
    # Distances straight across: s <= 2 -> every layer within 2 of one of the other's -> 1.0;
    # s = 3: the facing layers 4|5 and 6|7 are 2 apart (in), the outer ones 3 (out): half the area -> 0.5;
    # s = 4: the facing layers are 3 apart -> 0.0.
    a, b = plane(4).astype(bool), plane(4 + shift).astype(bool)
    assert surface_dice(b, a) == pytest.approx(expected, abs=1e-12)
    assert surface_dice_reference(b, a) == surface_dice(b, a)
    assert both(b, a)["surface_dice"] == pytest.approx(expected, abs=1e-12)


def test_neighbour_code_equals_the_packages_correlation():
    from scipy import ndimage
    from surface_distance import lookup_tables

    rng = np.random.default_rng(2)
    for shape in [(5, 6, 7), (9, 4, 3), (1, 1, 1)]:
        x = (rng.random(shape) > 0.5).astype(np.uint8)
        want = ndimage.correlate(x, lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
        assert np.array_equal(neighbour_code(x), want)


def test_fast_surface_distances_equal_the_package_arrays():
    # exactness of the fast SurfaceDice: the same sorted distance / area arrays as compute_surface_distances
    from surface_distance import compute_surface_distances

    rng = np.random.default_rng(3)
    for i in range(4):
        g = np.zeros((20, 22, 24), bool)
        p = np.zeros_like(g)
        g[5:15, 3:12, 4:20] = rng.random((10, 9, 16)) > 0.4
        p[6:17, 2:14, 0:18] = rng.random((11, 12, 18)) > 0.4
        if i % 2:
            p[0, 0, 0] = g[-1, -1, -1] = True  # touching opposite volume corners, far-apart surfels
        want = compute_surface_distances(g, p, (1.0, 1.0, 1.0))
        got = surface_distances(g, p)
        for k in want:
            assert np.array_equal(got[k], want[k]), k
        assert surface_dice(p, g) == surface_dice_reference(p, g)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(g, np.zeros_like(g))


# ----------------------------------------------------------------------------------------- VOI


def test_voi_plane_cut_by_gap():
    # label: plane z=4 (144 voxels, one component). Prediction: the plane without column x=5 -> parts
    # x<5 (60 voxels) and x>5 (72, two apart: not 26-connected) and the gap (12, background 0).
    # GT is constant on the union -> H(GT|Pred) = 0; H(Pred|GT) = H(60, 72, 12 over 144) bits.
    lab = plane(4)
    pred = lab.copy()
    pred[4, :, 5] = 0
    expected = entropy_bits(60, 72, 12)
    split, merge = voi(pred.astype(bool), lab.astype(bool))
    assert split == pytest.approx(expected, abs=1e-12) and merge == 0.0
    r = both(pred, lab)
    assert r["voi"] == pytest.approx(expected, abs=1e-12)
    assert r["voi_score"] == pytest.approx(1 / (1 + 0.3 * expected), abs=1e-12)


def test_voi_even_split_is_one_bit():
    # one GT component (the plane, 144 voxels) split evenly: on the union the prediction labels are
    # {component: 72, background: 72} -> H(Pred|GT) = 1 bit (split), H(GT|Pred) = 0; swapped roles swap them.
    lab = plane(4)
    pred = lab.copy()
    pred[4, :, 6:] = 0
    r = both(pred, lab)
    assert r["voi"] == pytest.approx(1.0, abs=1e-12)
    assert r["voi_split"] == pytest.approx(1.0, abs=1e-12) and r["voi_merge"] == 0.0
    assert r["voi_score"] == pytest.approx(1 / 1.3, abs=1e-12)  # 1 / (1 + 0.3 * 1)
    r2 = both(lab, pred)
    assert r2["voi_split"] == 0.0 and r2["voi_merge"] == pytest.approx(1.0, abs=1e-12)


def test_conditional_entropies_by_hand_and_against_skimage():
    # table: gt 1 -> pred {1: 2, 2: 2}; gt 2 -> pred {2: 4}. N = 8.
    # H(Pred|GT) = 4/8 * 1 bit = 0.5; H(GT|Pred): pred 1 pure, pred 2 = {gt1: 2, gt2: 4} -> 6/8 * H(1/3, 2/3)
    gt = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    pr = np.array([1, 1, 2, 2, 2, 2, 2, 2])
    split, merge = conditional_entropies(gt, pr)
    assert split == pytest.approx(0.5, abs=1e-15)
    assert merge == pytest.approx(0.75 * entropy_bits(1, 2), abs=1e-15)
    # cross-check only: scikit-image's definition (the competition's reference call) on random labelings
    from skimage.metrics import variation_of_information

    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 5, 500), rng.integers(0, 7, 500)
    assert np.allclose(conditional_entropies(a, b), variation_of_information(a, b), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------- TopoScore


def test_topo_f1_formulas():
    # rows m, p, g; columns dimensions 0, 1, 2
    ts, f1 = topo_score(np.array([[0, 0, 0], [3, 0, 0], [0, 0, 0]]))  # p0 = 3 > g0 = 0: 0.5 / 3.5
    assert f1 == [pytest.approx(1 / 7), None, None] and ts == pytest.approx(1 / 7)
    ts, f1 = topo_score(np.array([[2, 1, 0], [4, 2, 0], [2, 2, 0]]))  # 4/6 and 2/4, dim 2 dropped
    assert ts == pytest.approx((0.34 * 4 / 6 + 0.33 * 0.5) / 0.67)
    ts, f1 = topo_score(np.array([[1, 0, 0], [1, 0, 2], [1, 1, 0]]))  # 1, 0 (g1 > 0 = p1), 0.5 / 2.5
    assert f1 == [1.0, 0.0, pytest.approx(0.2)] and ts == pytest.approx(0.34 + 0.33 * 0.2)
    assert topo_score(np.zeros((3, 3), int)) == (1.0, [None, None, None])


def test_hole_through_a_sheet():
    # prediction: the label's sheet with one voxel removed -> one unmatched loop: p1 = 1, g1 = 0 -> F1_1 = 0.5 / 1.5;
    # one component each (no finite H0 pair) -> dims 0, 2 dropped -> TopoScore = 1/3.
    lab = square(3)
    pred = lab.copy()
    pred[3, 3, 3] = 0
    r = both(pred, lab, workers=2)
    assert (r["betti_matched"], r["betti_pred"], r["betti_label"]) == ([0, 0, 0], [0, 1, 0], [0, 0, 0])
    assert r["topo_f1"] == [None, pytest.approx(1 / 3), None] and r["topo_score"] == pytest.approx(1 / 3)
    # the label has the hole, the prediction not: g1 = 1, p1 = 0 -> F1_1 = 0 -> TopoScore 0
    assert both(lab, pred)["topo_score"] == 0.0
    # the same hole in both: matched -> 1
    assert both(pred, pred)["topo_score"] == 1.0


def test_two_sheets_merged_by_a_bridge():
    # label: sheets z=1 and z=4 (36 voxels each) = 2 components -> one finite H0 pair (g0 = 1).
    # prediction: the same plus a 2-voxel bridge (z=2..3 at y=x=3) -> one component, no loop: p = 0 ->
    # F1_0 = 0 / 1 = 0, other dims dropped -> TopoScore 0.
    # VOI: Pred is constant on the union (74 voxels) -> H(Pred|GT) = 0, H(GT|Pred) = H(36, 36, 2) (bridge = GT background).
    lab = square(1) | square(4)
    pred = lab.copy()
    pred[2:4, 3, 3] = 1
    r = both(pred, lab, workers=2)
    assert (r["betti_matched"], r["betti_pred"], r["betti_label"]) == ([0, 0, 0], [0, 0, 0], [1, 0, 0])
    assert r["topo_score"] == 0.0
    assert r["voi_split"] == 0.0 and r["voi_merge"] == pytest.approx(entropy_bits(36, 36, 2), abs=1e-12)


def test_dust_lowers_topo_f1_0():
    # label: two sheets (g0 = 1, the younger sheet). Prediction: the same plus 2 isolated voxels after them
    # in index order, in the same tile -> p0 = 3 (the younger sheet matched, the dust not) -> F1_0 = 2*1 / (3+1) = 0.5.
    # VOI: GT background on the 2 dust voxels is split into 2 singletons -> H(Pred|GT) = 2/74 * 1 bit; H(GT|Pred) = 0.
    lab = square(1) | square(4)
    pred = lab.copy()
    pred[6, 2, 2] = pred[7, 5, 5] = 1
    r = both(pred, lab, workers=2)
    assert (r["betti_matched"], r["betti_pred"], r["betti_label"]) == ([1, 0, 0], [3, 0, 0], [1, 0, 0])
    assert r["topo_f1"] == [0.5, None, None] and r["topo_score"] == 0.5
    assert r["voi_split"] == pytest.approx(2 / 74, abs=1e-15) and r["voi_merge"] == 0.0
    # dust alone in its own tile (y, x >= 8) is that tile's only component: no finite pair, no TopoScore effect
    far = lab.copy()
    far[6, 10, 10] = 1
    assert both(far, lab)["topo_score"] == 1.0


def test_prediction_only_features_special_case():
    # label empty; prediction: two separate voxels in one tile -> p0 = 1, g0 = 0 -> F1_0 = 0.5 / 1.5 = 1/3.
    # SurfaceDice 0 (label empty); union = the two voxels, GT constant, Pred labels 1 and 2 -> VOI 1 bit.
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[0, 0, 0] = pred[2, 2, 2] = 1
    r = both(pred, np.zeros_like(pred))
    assert r["betti_pred"] == [1, 0, 0] and r["betti_label"] == [0, 0, 0]
    assert r["topo_score"] == pytest.approx(1 / 3) and r["surface_dice"] == 0.0
    assert r["voi"] == pytest.approx(1.0, abs=1e-12)
    assert r["score"] == pytest.approx(0.30 / 3 + 0.35 * 0 + 0.35 / 1.3, abs=1e-12)


def test_identical_single_sheets():
    a = plane(4)
    r = both(a, a, workers=2)
    assert r["betti_pred"] == [0, 0, 0] and r["betti_label"] == [0, 0, 0]
    assert r["topo_score"] == 1.0 and r["surface_dice"] == 1.0 and r["voi"] == 0.0 and r["score"] == 1.0


def test_odd_shape_tiling_and_tile_boundaries():
    t = tiles((7, 9, 11))  # cuts at ceil(n/2): 4, 5, 6
    assert len(t) == 8
    assert t[0] == (slice(0, 4), slice(0, 5), slice(0, 6)) and t[-1] == (slice(4, 7), slice(5, 9), slice(6, 11))
    cover = np.zeros((7, 9, 11), int)
    for s in t:
        cover[s] += 1
    assert (cover == 1).all()
    z = np.zeros((7, 9, 11), np.uint8)
    # two separate voxels in one tile -> p0 = 1; on both sides of a cut -> one component per tile, p0 = 0.
    # z=3 lies in the first half of the 7-long axis (cut at 4, not 3); likewise y=4 (cut 5), x=5 (cut 6).
    for (a, b), expected in [
        (((1, 0, 0), (3, 0, 0)), 1), (((3, 0, 0), (5, 0, 0)), 0),
        (((0, 2, 0), (0, 4, 0)), 1), (((0, 4, 0), (0, 6, 0)), 0),
        (((0, 0, 3), (0, 0, 5)), 1), (((0, 0, 5), (0, 0, 7)), 0),
    ]:
        pred = z.copy()
        pred[a] = pred[b] = 1
        assert both(pred, z)["betti_pred"] == [expected, 0, 0], (a, b)
    rng = np.random.default_rng(1)
    lab = (rng.random((7, 9, 11)) > 0.7).astype(np.uint8)
    pred = (rng.random((7, 9, 11)) > 0.7).astype(np.uint8)
    both(pred, lab, workers=2)
    both(pred[:3, :1], lab[:3, :1], workers=2)  # tiles with a 1-voxel and a 0-voxel axis


# ----------------------------------------------------------------------------------------- fast == reference


def _sheets(shape, rng, n=2) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    out = np.zeros(shape, np.uint8)
    for _ in range(n):
        z0, a, f = rng.uniform(4, shape[0] - 4), rng.uniform(0.5, 2.5), rng.uniform(0.1, 0.4)
        surf = z0 + a * np.sin(f * xx + rng.uniform(0, 6)) * np.cos(f * yy)
        out |= (np.abs(zz - surf) < 1.0).astype(np.uint8)
    return out


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_fast_equals_reference_on_sheet_volumes(seed):
    rng = np.random.default_rng(seed)
    for shape in [(24, 24, 24), (21, 26, 19)]:
        lab = _sheets(shape, rng)
        lab[:2], lab[:, :, -2:] = 2, 2
        pred = np.roll(lab == 1, 1, axis=0).astype(np.uint8)
        pred[rng.random(shape) > 0.995] = 1  # dust
        pred[rng.random(shape) > 0.97] = 0  # holes
        fast, ref = leaderboard_score(pred, lab, workers=2), leaderboard_score_reference(pred, lab)
        assert values_of(fast) == values_of(ref)
        assert values_of(leaderboard_score(pred, lab, workers=1)) == values_of(ref)
        assert 0.0 <= fast["score"] <= 1.0
        assert {"surface_dice", "voi", "topo", "total"} <= set(fast["seconds"]) and len(fast["seconds"]["topo_tiles"]) == 8


# ----------------------------------------------------------------------------------------- MONAI / ignite


def _batch():
    a = plane(4)
    y_pred = torch.from_numpy(np.stack([a, np.zeros_like(a)])[:, None].astype(np.float32))
    y = torch.from_numpy(np.stack([a, a])[:, None].astype(np.float32))
    # sample 0 identical -> 1; sample 1 empty prediction: SurfaceDice 0, VOI 0, TopoScore 1 -> 0.65
    return y_pred, y


def test_leaderboard_metric_batch():
    y_pred, y = _batch()
    m = LeaderboardMetric(workers=1)
    out = m(y_pred, y)
    assert out.shape == (2, 1) and torch.allclose(out, torch.tensor([[1.0], [0.65]]), atol=1e-6)
    assert float(m.aggregate()) == pytest.approx(0.825, abs=1e-6)
    assert m.aggregate_components() == pytest.approx(
        {"score": 0.825, "topo_score": 1.0, "surface_dice": 0.5, "voi_score": 1.0, "voi": 0.0}, abs=1e-6)
    assert len(m.results) == 2 and m.results[1]["surface_dice"] == 0.0
    # probabilities with a threshold, a 3-channel label (channel 0 = label), a list of channel-first samples
    m.reset()
    assert m.get_buffer() is None and m.results == []
    m2 = LeaderboardMetric(workers=2, threshold=0.5)
    probs = y_pred * 0.8 + 0.1  # 0.9 on the plane, 0.1 elsewhere
    y3 = torch.cat([y, torch.rand_like(y), torch.rand_like(y)], dim=1)
    out = m2([probs[0], probs[1]], [y3[0], y3[1]])
    assert torch.allclose(out, torch.tensor([[1.0], [0.65]]), atol=1e-6)
    with pytest.raises(ValueError, match="y_pred"):
        m2(y_pred, y[:, :, :5])
    with pytest.raises(ValueError, match=r"\(2, 2, 12, 12, 12\)"):
        m2(torch.cat([y_pred, y_pred], 1), y)


def test_weight_zero_samples_are_not_scored_and_do_not_count():
    y_pred, y = _batch()  # scores 1.0 and 0.65 (see above)
    m = LeaderboardMetric(workers=1)
    m([y_pred[0]], [y[0]], weight=1.0)
    m([y_pred[1]], [y[1]], weight=0.0)  # a rank's padding copy
    assert len(m.results) == 1  # not scored
    assert float(m.aggregate()) == pytest.approx(1.0, abs=1e-6)
    m([y_pred[1]], [y[1]], weight=1.0)
    assert m.aggregate_components()["surface_dice"] == pytest.approx(0.5, abs=1e-6)  # (1 + 0) / 2


def test_ignite_handler_from_a_bundle_config():
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    parser = ConfigParser({"metric": {
        "_target_": "custom_components.metrics.score.LeaderboardIgniteMetric",
        "workers": 2,
        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
    }})
    handler = parser.get_parsed_content("metric")
    y_pred, y = _batch()
    engine = Engine(lambda e, b: {"pred": [y_pred[0], y_pred[1]], "label": [y[0], y[1]]})
    handler.attach(engine, "val_score")
    engine.run([0, 1], max_epochs=1)  # two iterations of the same batch: 4 samples
    m = engine.state.metrics
    assert m["val_score"] == pytest.approx(0.825, abs=1e-6)
    assert m["val_surface_dice"] == pytest.approx(0.5, abs=1e-6)
    assert m["val_topo_score"] == 1.0 and m["val_voi_score"] == 1.0 and m["val_voi"] == 0.0
    assert engine.state.metric_details["val_score"].shape == (4, 1)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_tile_processes_under_other_start_methods(method, monkeypatch):
    # the tile job lives in the numpy-only custom_components.metrics.betti_matching: no fork needed
    monkeypatch.setenv("VESUVIUS_METRIC_START_METHOD", method)
    lab = square(1) | square(4)
    pred = lab.copy()
    pred[6, 2, 2] = pred[7, 5, 5] = 1
    assert both(pred, lab, workers=2)["betti_pred"] == [3, 0, 0]
    monkeypatch.setenv("VESUVIUS_METRIC_START_METHOD", "teleport")
    with pytest.raises(ValueError, match="teleport"):
        leaderboard_score(pred, lab, workers=2)


def _score_in_worker(args):
    pred, lab = args
    return values_of(leaderboard_score(pred, lab, workers=2))


def test_inside_a_daemonic_worker_tiles_run_serially():
    # multiprocessing.Pool workers are daemonic and may not start processes: the metric must still work
    import multiprocessing as mp

    lab = plane(4)
    pred = lab.copy()
    pred[4, :, 5] = 0
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.map(_score_in_worker, [(pred, lab)])[0]
    assert got == values_of(leaderboard_score_reference(pred, lab))
