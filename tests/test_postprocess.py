"""custom_components.inference.postprocess: thresholds, dust, closing, hole filling, types, dictionary versions.

Every expected mask is built by hand from the geometry of the example, never by calling cc3d / scipy.
"""

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from custom_components.inference.postprocess import (
    DEFAULT_MIN_SIZE,
    BinaryClosing,
    BinaryClosingd,
    Binarize,
    Binarized,
    FillHoles,
    FillHolesd,
    PostProcess,
    PostProcessd,
    RemoveSmallComponents,
    RemoveSmallComponentsd,
    binarize,
    binary_closing,
    fill_holes,
    postprocess,
    remove_small_components,
)

# ------------------------------------------------------------------------------------------ Binarize


def test_plain_threshold_is_strict_and_nan_is_background():
    p = np.array([[[0.1, 0.5, 0.51], [0.9, np.nan, 1.0]]], np.float32)  # (1, 2, 3) as (Z, Y, X)
    out = Binarize(0.5)(p)
    assert out.dtype == np.uint8 and out.shape == p.shape
    np.testing.assert_array_equal(out, [[[0, 0, 1], [1, 0, 1]]])


def _hysteresis_example():
    p = np.zeros((10, 10, 10), np.float32)
    p[2, 2, 2] = 0.9                      # strong seed
    p[2, 2, 3:7] = 0.3                    # weak bridge, face-connected to the seed
    p[3, 3, 7] = 0.3                      # weak, attached to the bridge's end only diagonally (26-conn)
    p[7, 7, 7:9] = 0.3                    # isolated weak blob: no strong voxel
    p[7, 2, 2] = 0.2                      # exactly the low threshold: not above it
    p[7, 2, 3] = 0.8                      # a strong voxel next to it, kept alone
    expect = np.zeros(p.shape, np.uint8)
    expect[2, 2, 2:7] = 1
    expect[3, 3, 7] = 1
    expect[7, 2, 3] = 1
    return p, expect


def test_hysteresis_keeps_weak_bridge_drops_isolated_weak_blob():
    p, expect = _hysteresis_example()
    np.testing.assert_array_equal(Binarize(0.5, hysteresis_low=0.2)(p), expect)
    plain = np.zeros(p.shape, np.uint8)
    plain[2, 2, 2] = plain[7, 2, 3] = 1
    np.testing.assert_array_equal(Binarize(0.5)(p), plain)
    # hysteresis_low == threshold is the plain threshold
    np.testing.assert_array_equal(Binarize(0.5, hysteresis_low=0.5)(p), plain)


def test_hysteresis_connectivity_6_drops_the_diagonal_voxel():
    p, expect = _hysteresis_example()
    expect[3, 3, 7] = 0
    np.testing.assert_array_equal(Binarize(0.5, hysteresis_low=0.2, connectivity=6)(p), expect)


def test_binarize_bad_settings():
    with pytest.raises(ValueError, match=r"hysteresis_low \(0.7\) must not exceed threshold \(0.5\)"):
        Binarize(0.5, hysteresis_low=0.7)
    with pytest.raises(ValueError, match="connectivity must be one of"):
        Binarize(0.5, connectivity=4)


# ------------------------------------------------------------------------------------------ dust


def test_dust_below_min_size_removed_exactly_min_size_kept():
    m = np.zeros((12, 12, 12), np.uint8)
    m[0, 0, 0] = 1                        # size 1
    m[5, 10, 0:3] = 1                     # size 3
    m[10, 0:4, 10] = 1                    # size 4 == min_size: kept
    m[2:4, 8, 8] = 1                      # 2 voxels ...
    m[4:6, 9, 9] = 1                      # ... + 2 voxels touching (3,8,8)-(4,9,9) only diagonally: one 26-component of 4
    m[6:11, 3:6, 3:6] = 1                 # 45 voxels
    expect = m.copy()
    expect[0, 0, 0] = 0
    expect[5, 10, 0:3] = 0
    np.testing.assert_array_equal(RemoveSmallComponents(min_size=4)(m), expect)
    # 6-connectivity: the diagonal pair is two components of 2 and goes too
    expect6 = expect.copy()
    expect6[2:4, 8, 8] = 0
    expect6[4:6, 9, 9] = 0
    np.testing.assert_array_equal(RemoveSmallComponents(min_size=4, connectivity=6)(m), expect6)
    # min_size 5: the size-4 components go as well
    expect5 = expect6.copy()
    expect5[10, 0:4, 10] = 0
    np.testing.assert_array_equal(RemoveSmallComponents(min_size=5)(m), expect5)


@pytest.mark.parametrize("min_size", [None, 0, 1])
def test_dust_disabled_is_identity(min_size):
    m = np.zeros((4, 4, 4), np.float32)
    m[1, 1, 1] = 1.0
    m[3, 3, 3] = 0.7  # nonzero: foreground
    out = RemoveSmallComponents(min_size)(m)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, m != 0)


def test_dust_bad_min_size():
    with pytest.raises(ValueError, match="min_size must be >= 0 or None, got -1"):
        RemoveSmallComponents(-1)


# ------------------------------------------------------------------------------------------ closing


def test_closing_fills_one_voxel_slit_and_pinhole_in_a_plane():
    m = np.zeros((9, 12, 12), np.uint8)
    m[4] = 1
    m[4, 6, :] = 0                        # a slit across the whole plane: two sheets
    m[4, 2, 3] = 0                        # a pinhole
    full = np.zeros_like(m)
    full[4] = 1
    np.testing.assert_array_equal(BinaryClosing(radius=1)(m), full)  # structure "cube"


def test_closing_with_ball_cannot_close_gap_in_one_voxel_sheet():
    # the dilated plane has a dimple over the slit into which the 6-neighbour ball does not fit
    m = np.zeros((9, 12, 12), np.uint8)
    m[4] = 1
    m[4, 6, :] = 0
    np.testing.assert_array_equal(BinaryClosing(radius=1, structure="ball")(m), m)
    np.testing.assert_array_equal(BinaryClosing(radius=1, structure="cross")(m), m)


def test_closing_with_ball_closes_middle_of_slit_in_three_voxel_sheet():
    m = np.zeros((9, 12, 12), np.uint8)
    m[3:6] = 1
    m[3:6, 6, :] = 0                      # slit through the whole thickness
    expect = m.copy()
    expect[4, 6, :] = 1                   # the middle layer is bridged; the outer layers keep a groove
    np.testing.assert_array_equal(BinaryClosing(radius=1, structure="ball")(m), expect)


def test_closing_does_not_erode_volume_border():
    full = np.ones((6, 7, 8), np.uint8)
    for structure in ("cube", "ball", "cross"):
        np.testing.assert_array_equal(BinaryClosing(1, structure)(full), full)
        np.testing.assert_array_equal(BinaryClosing(2, structure)(full), full)
    # a sheet lying on a face, with a slit: kept whole up to the edges, slit closed
    m = np.zeros((6, 10, 10), np.uint8)
    m[0] = 1
    m[0, :, 5] = 0
    expect = np.zeros_like(m)
    expect[0] = 1
    np.testing.assert_array_equal(BinaryClosing(1)(m), expect)


def test_closing_merges_sheets_two_voxels_apart():
    m = np.zeros((9, 6, 6), np.uint8)
    m[3] = m[5] = 1
    expect = np.zeros_like(m)
    expect[3:6] = 1
    np.testing.assert_array_equal(BinaryClosing(1)(m), expect)


def test_closing_never_removes_voxels_and_radius_zero_is_identity():
    m = (np.random.default_rng(0).random((10, 10, 10)) > 0.7).astype(np.uint8)
    out = BinaryClosing(1)(m)
    assert np.all(out >= m) and out.sum() > m.sum()
    np.testing.assert_array_equal(BinaryClosing(0)(m), m)
    np.testing.assert_array_equal(BinaryClosing(None)(m), m)
    with pytest.raises(ValueError, match="structure must be 'cube', 'ball' or 'cross', got 'disk'"):
        BinaryClosing(1, "disk")


# ------------------------------------------------------------------------------------------ holes


def _hollow_cube(vol, lo, hi):
    """Shell of the cube [lo, hi)^3 in ``vol``; the inside (hi - lo - 2)^3 stays background."""
    vol[lo:hi, lo:hi, lo:hi] = 1
    vol[lo + 1:hi - 1, lo + 1:hi - 1, lo + 1:hi - 1] = 0


def test_fill_holes_fills_enclosed_cavity():
    m = np.zeros((10, 10, 10), np.uint8)
    _hollow_cube(m, 2, 8)                 # cavity of 4^3 = 64 voxels
    expect = np.zeros_like(m)
    expect[2:8, 2:8, 2:8] = 1
    np.testing.assert_array_equal(FillHoles()(m), expect)


def test_fill_holes_leaves_tunnel_open_to_border_and_opened_cube():
    m = np.ones((8, 8, 8), np.uint8)
    m[3:5, 3:5, :] = 0                    # a 2x2 channel through the volume along X: touches two faces
    np.testing.assert_array_equal(FillHoles()(m), m)
    c = np.zeros((10, 10, 10), np.uint8)
    _hollow_cube(c, 2, 8)
    c[2, 4, 4] = 0                        # a window in the top wall: the inside joins the outside
    np.testing.assert_array_equal(FillHoles()(c), c)


def test_fill_holes_touching_border_is_not_a_cavity():
    m = np.ones((6, 6, 6), np.uint8)
    m[0, 2:4, 2:4] = 0                    # a dent in the face z = 0
    np.testing.assert_array_equal(FillHoles()(m), m)


def test_fill_holes_max_hole_size():
    m = np.zeros((12, 20, 12), np.uint8)
    _hollow_cube(m, 1, 5)                 # cavity 2^3 = 8 at [2:4]^3
    m[1:6, 8:13, 1:6] = 1
    m[2:5, 9:12, 2:5] = 0                 # cavity 3^3 = 27
    small = m.copy()
    small[2:4, 2:4, 2:4] = 1
    both = small.copy()
    both[2:5, 9:12, 2:5] = 1
    np.testing.assert_array_equal(FillHoles(max_hole_size=7)(m), m)
    np.testing.assert_array_equal(FillHoles(max_hole_size=8)(m), small)
    np.testing.assert_array_equal(FillHoles(max_hole_size=26)(m), small)
    np.testing.assert_array_equal(FillHoles(max_hole_size=27)(m), both)
    np.testing.assert_array_equal(FillHoles()(m), both)
    np.testing.assert_array_equal(FillHoles(enabled=False)(m), m)


# ------------------------------------------------------------------------------------------ pipeline


def _scene():
    """A probability map: a sheet (195) with a pinhole, a sealed box (208, cavity 8), a speck (1); by-hand results."""
    p = np.full((16, 16, 16), 0.1, np.float32)
    p[3, 1:15, 1:15] = 0.9                # sheet of 196
    p[3, 7, 7] = 0.2                      # pinhole in the sheet
    p[8:14, 8:14, 8:14] = 0.8             # box 6^3 ...
    p[10:12, 10:12, 10:12] = 0.05         # ... hollow: cavity 2^3 (208 voxels of box)
    p[13, 2, 2] = 0.95                    # speck of 1
    thr = (p > 0.5).astype(np.uint8)
    no_speck = thr.copy()
    no_speck[13, 2, 2] = 0
    filled = no_speck.copy()
    filled[10:12, 10:12, 10:12] = 1
    closed = filled.copy()
    closed[3, 7, 7] = 1
    return p, thr, no_speck, filled, closed


def test_postprocess_defaults_and_each_switch():
    p, thr, no_speck, filled, closed = _scene()
    assert DEFAULT_MIN_SIZE > 1
    np.testing.assert_array_equal(postprocess(p), filled)  # threshold, dust, fill; closing off
    np.testing.assert_array_equal(postprocess(p, min_size=0, fill_holes=False), thr)
    np.testing.assert_array_equal(postprocess(p, min_size=None, fill_holes=False, closing_radius=None), thr)
    np.testing.assert_array_equal(postprocess(p, fill_holes=False), no_speck)
    np.testing.assert_array_equal(postprocess(p, closing_radius=1), closed)
    np.testing.assert_array_equal(postprocess(p, min_size=2, max_hole_size=7), no_speck)
    # a mask input needs no threshold
    np.testing.assert_array_equal(postprocess(thr, threshold=None, min_size=2), filled)


def test_closing_runs_before_dust_so_a_cracked_sheet_survives():
    p = np.zeros((9, 12, 12), np.float32)
    p[4] = 0.9
    p[4, 3, :] = p[4, 7, :] = 0.1         # two cracks: pieces of 36, 36 and 48 voxels, all < 64
    sheet = np.zeros(p.shape, np.uint8)
    sheet[4] = 1                          # 144 voxels once the cracks are closed
    np.testing.assert_array_equal(postprocess(p, min_size=64, closing_radius=1), sheet)
    np.testing.assert_array_equal(postprocess(p, min_size=64), np.zeros_like(sheet))
    np.testing.assert_array_equal(PostProcessd("pred", 0.5, None, 64, 1)({"pred": p})["pred"], sheet)


def test_postprocess_steps_in_order_and_custom_callable():
    p, thr, no_speck, filled, _ = _scene()
    pp = PostProcess(steps=[Binarize(0.5), RemoveSmallComponents(2)])
    np.testing.assert_array_equal(pp(p), no_speck)
    invert = PostProcess(steps=[Binarize(0.5), lambda v: 1 - v])
    np.testing.assert_array_equal(invert(p), 1 - thr)
    with pytest.raises(ValueError, match=r"returned shape \[8, 16, 16\] for a volume of shape \[16, 16, 16\]"):
        PostProcess(steps=[lambda v: v[:8]])(p)


# ------------------------------------------------------------------------------------------ types


@pytest.mark.parametrize(
    "transform",
    [Binarize(0.5, 0.2), RemoveSmallComponents(2), BinaryClosing(1), FillHoles(), PostProcess()],
    ids=lambda t: type(t).__name__,
)
def test_same_type_and_shape_back_uint8(transform):
    p = _scene()[0]
    ref = transform(p)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.shape == p.shape
    out = transform(p[None])                                     # (1, Z, Y, X) ndarray
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (1,) + p.shape
    np.testing.assert_array_equal(out[0], ref)
    t = transform(torch.from_numpy(p)[None])                     # (1, Z, Y, X) tensor
    assert isinstance(t, torch.Tensor) and not isinstance(t, MetaTensor)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (1,) + p.shape
    np.testing.assert_array_equal(t[0].numpy(), ref)
    t3 = transform(torch.from_numpy(p).to(torch.bfloat16))      # (Z, Y, X), bfloat16
    assert t3.dtype == torch.uint8 and tuple(t3.shape) == p.shape


def test_metatensor_meta_kept():
    p = _scene()[0]
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    mt = MetaTensor(torch.from_numpy(p)[None], affine=affine, meta={"filename_or_obj": "/x/1234.tif", "spatial_shape": p.shape})
    out = PostProcess()(mt)
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and tuple(out.shape) == (1,) + p.shape
    assert out.meta["filename_or_obj"] == "/x/1234.tif"
    assert torch.equal(out.affine, affine)
    np.testing.assert_array_equal(out.as_tensor()[0].numpy(), _scene()[3])


def test_postprocessd_metatensor_keeps_meta_and_shape():
    p = _scene()[0]
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    mt = MetaTensor(torch.from_numpy(p)[None], affine=affine, meta={"filename_or_obj": "/x/1234.tif"})
    out = PostProcessd("pred", threshold=0.5, min_size=2)({"pred": mt})["pred"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and tuple(out.shape) == (1,) + p.shape
    assert out.meta["filename_or_obj"] == "/x/1234.tif" and torch.equal(out.affine, affine)
    np.testing.assert_array_equal(out.as_tensor()[0].numpy(), _scene()[3])


def test_functional_forms():
    p = np.zeros((8, 8, 8), np.float32)
    p[1, 1, 1:4] = [0.9, 0.3, 0.3]        # strong seed with a weak tail
    p[6, 6, 6] = 0.3                      # weak, isolated
    b = binarize(p, 0.5, hysteresis_low=0.2)
    assert b.dtype == np.uint8
    expect = np.zeros(p.shape, np.uint8)
    expect[1, 1, 1:4] = 1
    np.testing.assert_array_equal(b, expect)
    np.testing.assert_array_equal(remove_small_components(b, 3), expect)      # exactly 3: kept
    np.testing.assert_array_equal(remove_small_components(b, 4), 0 * expect)  # 3 < 4: removed
    plane = np.zeros((7, 8, 8), np.uint8)
    plane[3] = 1
    plane[3, 4, 4] = 0
    full = np.zeros_like(plane)
    full[3] = 1
    np.testing.assert_array_equal(binary_closing(plane, 1), full)
    box = np.zeros((7, 7, 7), np.uint8)
    box[1:6, 1:6, 1:6] = 1
    box[2:5, 2:5, 2:5] = 0                # cavity of 27
    solid = np.zeros_like(box)
    solid[1:6, 1:6, 1:6] = 1
    np.testing.assert_array_equal(fill_holes(box), solid)
    np.testing.assert_array_equal(fill_holes(box, max_hole_size=26), box)


def test_bad_shape_named():
    with pytest.raises(ValueError, match=r"Binarize: expected a volume shaped \(1, Z, Y, X\) or \(Z, Y, X\), got shape \[2, 4, 4, 4\]"):
        Binarize()(np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"got shape \[4, 4\]"):
        FillHoles()(torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------ dictionary


def test_dict_transforms():
    p, thr, no_speck, filled, closed = _scene()
    d = {"pred": torch.from_numpy(p)[None], "image": "untouched"}
    d1 = Binarized("pred", 0.5)(d)
    assert d1["image"] == "untouched" and d["pred"].dtype == torch.float32  # input dict not modified
    np.testing.assert_array_equal(d1["pred"][0].numpy(), thr)
    d2 = RemoveSmallComponentsd("pred", min_size=2)(d1)
    np.testing.assert_array_equal(d2["pred"][0].numpy(), no_speck)
    d3 = FillHolesd("pred")(d2)
    np.testing.assert_array_equal(d3["pred"][0].numpy(), filled)
    d4 = BinaryClosingd("pred", radius=1)(d3)
    np.testing.assert_array_equal(d4["pred"][0].numpy(), closed)
    d5 = PostProcessd(["pred", "other"], closing_radius=1, allow_missing_keys=True)(d)
    np.testing.assert_array_equal(d5["pred"][0].numpy(), closed)
    with pytest.raises(KeyError):
        PostProcessd("other")(d)


def test_wired_by_target_like_the_bundle_config():
    cfg = ConfigParser({
        "pp": {
            "_target_": "custom_components.inference.postprocess.PostProcessd",
            "keys": "pred", "threshold": 0.5, "hysteresis_low": None, "min_size": 2,
            "closing_radius": 0, "fill_holes": True, "max_hole_size": None,
        }
    })
    pp = cfg.get_parsed_content("pp")
    p = _scene()[0]
    out = pp({"pred": MetaTensor(torch.from_numpy(p)[None])})["pred"]
    np.testing.assert_array_equal(out.as_tensor()[0].numpy(), _scene()[3])


# ------------------------------------------------------------------------------------------ new steps (issue 15)
# Every expected mask below is written down from the geometry; the comments give the arithmetic.

from custom_components.inference.postprocess import (  # noqa: E402
    STEPS,
    BinaryMedian,
    BinaryMediand,
    GaussianSmooth,
    GaussianSmoothd,
    HeightMapFill,
    HeightMapFilld,
    PlugHoles,
    PlugHolesd,
    TunnelRepair,
    TunnelRepaird,
    Unmerge,
    Unmerged,
    load_postprocess,
    pipeline_config,
    pipeline_from_config,
    postprocess_transform,
    save_postprocess,
)


def _n_components(mask) -> int:
    """26-connected components counted by a plain flood fill (not the library the code calls)."""
    m = np.asarray(mask).astype(bool).copy()
    n = 0
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    for start in zip(*np.nonzero(m)):
        if not m[start]:
            continue
        n += 1
        stack = [start]
        m[start] = False
        while stack:
            z, y, x = stack.pop()
            for a, b, c in offsets:
                q = (z + a, y + b, x + c)
                if all(0 <= q[i] < m.shape[i] for i in range(3)) and m[q]:
                    m[q] = False
                    stack.append(q)
    return n


def _three_voxel_plane_with_pinholes():
    m = np.zeros((12, 24, 24), np.uint8)
    m[4:7] = 1                            # plane 3 voxels thick
    m[4:7, 5, 5] = 0                      # pinhole through all three layers
    m[4:7, 12, 17] = 0                    # another
    m[5, 18, 18] = 0                      # an enclosed single voxel in the middle layer
    whole = np.zeros_like(m)
    whole[4:7] = 1
    return m, whole


def test_plug_holes_makes_pinholed_plane_whole():
    # each hole voxel has foreground on both sides along Y and along X: 2 axes
    m, whole = _three_voxel_plane_with_pinholes()
    np.testing.assert_array_equal(PlugHoles()(m), whole)
    # min_axes=3: only the enclosed voxel (foreground on both sides along Z too) is plugged
    expect = m.copy()
    expect[5, 18, 18] = 1
    np.testing.assert_array_equal(PlugHoles(min_axes=3)(m), expect)
    np.testing.assert_array_equal(PlugHoles(enabled=False)(m), m)


@pytest.mark.parametrize("z2", [12, 13])
def test_plug_holes_never_joins_two_planes(z2):
    # the background between planes z=10 and z=z2 has foreground on both sides along Z at most: 1 axis
    m = np.zeros((20, 16, 16), np.uint8)
    m[10] = m[z2] = 1
    out = PlugHoles()(m)
    np.testing.assert_array_equal(out, m)
    assert _n_components(out) == 2


def test_plug_holes_leaves_two_by_two_hole_and_slit():
    # a 2x2 hole voxel has foreground on one side per in-plane axis; a slit voxel on both sides along one axis
    m = np.zeros((9, 16, 16), np.uint8)
    m[4] = 1
    m[4, 3:5, 3:5] = 0
    m[4, 10, 2:14] = 0
    np.testing.assert_array_equal(PlugHoles()(m), m)


def test_median_plugs_pinholes_drops_specks_keeps_thick_sheets():
    m, whole = _three_voxel_plane_with_pinholes()
    m[10, 2, 2] = 1                       # a speck: 1 of 27 in its cube
    # pinhole voxels see 26 (middle) / 17 (outer layers) >= 14; plane voxels >= 18; outside voxels <= 9
    np.testing.assert_array_equal(BinaryMedian(1)(m), whole)
    np.testing.assert_array_equal(BinaryMedian(8)(m), whole)  # a fixed point after one pass
    two = np.zeros((8, 10, 10), np.uint8)
    two[3:5] = 1                          # each voxel sees 18: kept
    np.testing.assert_array_equal(BinaryMedian(3)(two), two)
    one = np.zeros((8, 10, 10), np.uint8)
    one[3] = 1                            # each voxel sees 9: the 1-voxel sheet vanishes
    np.testing.assert_array_equal(BinaryMedian(1)(one), np.zeros_like(one))
    np.testing.assert_array_equal(BinaryMedian(0)(one), one)
    with pytest.raises(ValueError, match="BinaryMedian: iterations must be an int >= 0, got -1"):
        BinaryMedian(-1)


def _gauss_weights(sigma=1.0):
    """Normalised 1D Gaussian weights w[k], |k| <= int(4 sigma + 0.5), by hand."""
    import math

    r = int(4 * sigma + 0.5)
    raw = {k: math.exp(-k * k / (2 * sigma * sigma)) for k in range(-r, r + 1)}
    s = sum(raw.values())
    return {k: v / s for k, v in raw.items()}


def test_gaussian_smooth_then_binarize_closes_pinhole_and_drops_speck():
    w = _gauss_weights(1.0)
    p = np.zeros((18, 20, 20), np.float32)
    p[4:9] = 0.9                          # slab 5 thick (z 4..8)
    p[6, 10, 10] = 0.1                    # a weak voxel in its middle
    p[14, 3, 3] = 0.9                     # a confident speck beyond the kernel's reach (4) of the slab
    p[1, 15, 15] = np.nan                 # NaN counts as 0
    s = GaussianSmooth(1.0)(p)
    assert s.dtype == np.float32 and s.shape == p.shape
    # the weak voxel: the slab covers Z offsets -2..2 around it, the voxel itself is 0.8 lower (weight w0^3)
    assert s[6, 10, 10] == pytest.approx(0.9 * sum(w[k] for k in range(-2, 3)) - 0.8 * w[0] ** 3, abs=1e-5)
    # the speck: 0.9 * w0^3 (about 0.057)
    assert s[14, 3, 3] == pytest.approx(0.9 * w[0] ** 3, abs=1e-5)
    # the slab's face layer z=4 sees the slab at offsets 0..4, the layer z=3 at offsets 1..4 (centre of a face)
    assert s[4, 10, 3] == pytest.approx(0.9 * sum(w[k] for k in range(0, 5)), abs=1e-5)
    assert s[3, 10, 3] == pytest.approx(0.9 * sum(w[k] for k in range(1, 5)), abs=1e-5)
    slab = np.zeros(p.shape, np.uint8)
    slab[4:9] = 1                         # 0.63 > 0.5 on the face, 0.27 < 0.5 outside, 0.84 at the hole, 0.06 at the speck
    np.testing.assert_array_equal(PostProcess(steps=[GaussianSmooth(1.0), Binarize(0.5)])(p), slab)
    np.testing.assert_array_equal(postprocess(p, smooth_sigma=1.0, min_size=0), slab)
    np.testing.assert_array_equal(GaussianSmooth(0)(p), np.nan_to_num(p))


def test_gaussian_smooth_must_be_followed_by_binarize():
    with pytest.raises(ValueError, match=r"step 0 \(GaussianSmooth\) .* followed by Binarize, not by RemoveSmallComponents"):
        PostProcess(steps=[GaussianSmooth(1.0), RemoveSmallComponents(2)])
    with pytest.raises(ValueError, match="followed by Binarize, not by nothing"):
        PostProcess(steps=[Binarize(0.5), GaussianSmooth(1.0)])
    with pytest.raises(ValueError, match="sigma must be a number >= 0 or None, got -1"):
        GaussianSmooth(-1)


def _plane_with_hole(thickness=1):
    m = np.zeros((16, 32, 32), np.uint8)
    m[8:8 + thickness] = 1
    m[8:8 + thickness, 10:13, 10:14] = 0  # a 3 x 4 = 12-column hole
    whole = np.zeros_like(m)
    whole[8:8 + thickness] = 1
    return m, whole


@pytest.mark.parametrize("thickness", [1, 2])
def test_height_map_fill_makes_plane_with_12_voxel_hole_whole(thickness):
    # normal along Z; the rim's lowest / highest heights are 8 / 8 + thickness - 1 everywhere
    m, whole = _plane_with_hole(thickness)
    np.testing.assert_array_equal(HeightMapFill()(m), whole)
    np.testing.assert_array_equal(HeightMapFill(max_hole_area=11)(m), m)   # 12 columns > 11
    np.testing.assert_array_equal(HeightMapFill(min_hole_area=13)(m), m)
    np.testing.assert_array_equal(HeightMapFill(enabled=False)(m), m)


def test_height_map_fill_never_touches_another_component():
    m, _ = _plane_with_hole(1)
    m[9, 11, 12] = 1                      # a separate voxel above the hole: its 26-neighbours at z=8 are hole columns
    assert _n_components(m) == 2
    np.testing.assert_array_equal(HeightMapFill(min_component_size=1)(m), m)


def test_tunnel_repair_closes_pinhole_without_merging_the_next_plane():
    m = np.zeros((20, 32, 32), np.uint8)
    m[8] = 1
    m[8, 21, 6] = 0                       # a pinhole: one tunnel
    m[10] = 1                             # the next plane, one voxel of background between
    expect = m.copy()
    expect[8, 21, 6] = 1                  # closing plane 8 alone fills its pinhole, nothing at z=9
    out = TunnelRepair()(m)
    np.testing.assert_array_equal(out, expect)
    assert _n_components(out) == 2
    np.testing.assert_array_equal(TunnelRepair(enabled=False)(m), m)


def test_tunnel_repair_radius_sets_the_widest_hole():
    # a cube closing of radius r closes holes up to 2r - 1 voxels wide: 3x3 needs r = 2
    m = np.zeros((12, 32, 32), np.uint8)
    m[5] = 1
    m[5, 14:17, 14:17] = 0
    whole = np.zeros_like(m)
    whole[5] = 1
    np.testing.assert_array_equal(TunnelRepair(radius=1)(m), m)
    np.testing.assert_array_equal(TunnelRepair(radius=2)(m), whole)
    with pytest.raises(ValueError, match="TunnelRepair: chunk must be an int >= 4, got 2"):
        TunnelRepair(chunk=2)


def _touching_planes():
    p = np.zeros((20, 40, 40), np.float32)
    p[8] = p[11] = 0.9                    # two sheets (1,600 voxels each)
    p[9:11, 18:22, 18:22] = 0.6           # a contact patch between them, weaker
    two = np.zeros(p.shape, np.uint8)
    two[8] = two[11] = 1
    return p, two


def test_unmerge_splits_touching_planes():
    # at 0.5 one component whose columns hold two runs (z=8 and z=11) except 16 contact columns:
    # 1584 / 1600 multi-valued; at 0.6 the patch is still in (0.6 > 0.6 is false: it goes), so the first level
    # splits it into the two planes; the patch's z=9 voxels grow to plane 8, z=10 to plane 11, and both
    # touch the other piece, so they are removed
    p, two = _touching_planes()
    merged = (p > 0.5).astype(np.uint8)
    assert _n_components(merged) == 1
    out = Unmerge()(p)
    np.testing.assert_array_equal(out, two)
    assert _n_components(out) == 2
    np.testing.assert_array_equal(postprocess(p, min_size=0, fill_holes=False, unmerge=True), two)
    d = Unmerged("pred", prob_key="prob")({"pred": merged, "prob": p})
    np.testing.assert_array_equal(d["pred"], two)
    np.testing.assert_array_equal(Unmerge(enabled=False)(p), merged)
    np.testing.assert_array_equal(Unmerge(levels=())(p), merged)


def test_unmerge_keeps_single_sheet_with_weak_patch():
    p = np.zeros((20, 40, 40), np.float32)
    p[8:10] = 0.9
    p[8:10, 5:15, 5:15] = 0.55            # weak, but a single-valued height map: not touched
    np.testing.assert_array_equal(Unmerge()(p), (p > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"levels must be ascending probabilities in \[0, 1\), got \[0.8, 0.6\]"):
        Unmerge(levels=(0.8, 0.6))


def test_dust_connectivity_exposed_in_the_pipeline():
    m = np.zeros((12, 12, 12), np.uint8)
    m[2:4, 8, 8] = 1                      # 2 voxels ...
    m[4:6, 9, 9] = 1                      # ... + 2 touching only diagonally: one 26-component of 4, two 6-components of 2
    kw = dict(threshold=None, min_size=3, fill_holes=False)
    np.testing.assert_array_equal(postprocess(m, **kw), m)
    np.testing.assert_array_equal(postprocess(m, dust_connectivity=6, **kw), np.zeros_like(m))
    step = [s for s in PostProcess(dust_connectivity=6).steps if isinstance(s, RemoveSmallComponents)][0]
    assert step.connectivity == 6


def _every_step():
    return [GaussianSmooth(1.0), Binarize(0.5), BinaryMedian(2), BinaryClosing(1), RemoveSmallComponents(8),
            Unmerge(min_size=4), PlugHoles(), HeightMapFill(min_component_size=4), TunnelRepair(chunk=8), FillHoles()]


@pytest.mark.parametrize("step", _every_step() + [PostProcess(steps=_every_step())], ids=lambda s: type(s).__name__)
def test_nan_empty_all_ones(step):
    shape = (1, 12, 13, 14)
    for value, expect in ((np.nan, 0), (0.0, 0), (1.0, 1)):
        x = torch.full(shape, value)
        out = step(x)
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == shape
        assert torch.equal(out, torch.full(shape, expect, dtype=out.dtype)), (type(step).__name__, value)
        assert torch.equal(step(x), out)  # deterministic


def test_new_dict_transforms():
    m, whole = _three_voxel_plane_with_pinholes()
    d = {"pred": torch.from_numpy(m)[None]}
    np.testing.assert_array_equal(PlugHolesd("pred")(d)["pred"][0].numpy(), whole)
    np.testing.assert_array_equal(BinaryMediand("pred", 1)(d)["pred"][0].numpy(), whole)
    tunnels_closed = whole.copy()
    tunnels_closed[5, 18, 18] = 0         # a cavity, not a tunnel: FillHoles' job
    np.testing.assert_array_equal(TunnelRepaird("pred", chunk=8)(d)["pred"][0].numpy(), tunnels_closed)
    h, hwhole = _plane_with_hole(1)
    np.testing.assert_array_equal(HeightMapFilld("pred")({"pred": h})["pred"], hwhole)
    s = GaussianSmoothd("pred", 0)({"pred": m.astype(np.float32)})["pred"]
    assert s.dtype == np.float32
    p, two = _touching_planes()
    np.testing.assert_array_equal(Unmerged("pred")({"pred": p})["pred"], two)


# ------------------------------------------------------------------------------------------ postprocess.json


def _full_pipeline():
    return PostProcess(smooth_sigma=0.5, hysteresis_low=0.3, median_iterations=1, closing_radius=1, min_size=2,
                       dust_connectivity=6, unmerge=True, plug_holes=True, height_map_fill=True, tunnel_repair=True)


def test_postprocess_json_round_trip(tmp_path):
    pp = _full_pipeline()
    cfg = pipeline_config(pp)
    names = [s["name"] for s in cfg["steps"]]
    assert names == ["smooth", "binarize", "median", "closing", "dust", "unmerge", "plug_holes", "height_map_fill",
                     "tunnel_repair", "fill_holes"]
    assert cfg["steps"][4] == {"name": "dust", "min_size": 2, "connectivity": 6}
    path = save_postprocess(tmp_path / "run" / "postprocess.json", pp, tuning={"note": "by hand"})
    loaded = load_postprocess(path)
    assert isinstance(loaded, PostProcessd)
    assert pipeline_config(loaded) == cfg
    p = _scene()[0]
    np.testing.assert_array_equal(loaded({"pred": p})["pred"], pp(p))
    assert json.loads(open(path).read())["tuning"] == {"note": "by hand"}
    # the bundle's entry point: the file wins over the settings; no file, the settings
    np.testing.assert_array_equal(postprocess_transform(path, threshold=0.9)({"pred": p})["pred"], pp(p))
    np.testing.assert_array_equal(postprocess_transform(None, min_size=2)({"pred": p})["pred"], _scene()[3])
    cp = ConfigParser({"pp": {"_target_": "custom_components.inference.postprocess.postprocess_transform",
                              "path": str(path), "keys": "pred"}})
    assert pipeline_config(cp.get_parsed_content("pp")) == cfg


def test_postprocess_json_errors_name_the_problem(tmp_path):
    def load(obj):
        f = tmp_path / "pp.json"
        f.write_text(json.dumps(obj))
        return load_postprocess(f)

    with pytest.raises(ValueError, match=r"step 1 names an unknown step 'erode'; known steps: \["):
        load({"steps": [{"name": "binarize"}, {"name": "erode", "radius": 1}]})
    with pytest.raises(ValueError, match=r"step 0 \('dust'\) has unknown parameter\(s\) \['size'\]; the parameters of "
                                         r"'dust' are \['min_size', 'connectivity'\]"):
        load({"steps": [{"name": "dust", "size": 5000}]})
    with pytest.raises(ValueError, match=r"step 0 \('closing'\): BinaryClosing: structure must be"):
        load({"steps": [{"name": "closing", "radius": 1, "structure": "disk"}]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pipeline'\]"):
        load({"steps": [], "pipeline": []})
    with pytest.raises(ValueError, match="must be followed by Binarize"):
        load({"steps": [{"name": "smooth", "sigma": 1}, {"name": "dust"}]})
    with pytest.raises(ValueError, match="step 0 must be an object with a 'name'"):
        pipeline_from_config({"steps": ["binarize"]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_postprocess(bad)
    with pytest.raises(ValueError, match=r"missing.json: cannot read it"):
        load_postprocess(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not one of the named steps"):
        pipeline_config(PostProcess(steps=[lambda v: v]))
    assert set(STEPS) == {"smooth", "binarize", "median", "closing", "dust", "unmerge", "plug_holes",
                          "height_map_fill", "tunnel_repair", "fill_holes"}
