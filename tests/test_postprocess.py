"""custom_components.inference.postprocess: thresholds, dust, closing, hole filling, types, dictionary versions.

Every expected mask is built by hand from the geometry of the example, never by calling cc3d / scipy.
"""

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
