"""custom_components.data.targets: hand values of the signed distance map, the medial-surface tube."""

import math

import numpy as np
import pytest

from custom_components.data.targets import medial_surface_tube, signed_distance_map


def plane(shape=(12, 12, 12), z=5, thickness=1):
    label = np.zeros(shape, np.uint8)
    label[z : z + thickness] = 1
    return label


def test_sdm_plane_hand_values():
    phi = signed_distance_map(plane())
    assert phi.dtype == np.float32 and phi.shape == (12, 12, 12)
    # every column along z is the same: -1 on the plane, 1, 2, 3, ... beside it
    expected = np.array([5, 4, 3, 2, 1, -1, 1, 2, 3, 4, 5, 6], np.float32)
    assert np.array_equal(phi[:, 3, 7], expected)
    assert np.array_equal(phi, np.broadcast_to(expected[:, None, None], phi.shape))


def test_sdm_thick_slab_inside_negative():
    phi = signed_distance_map(plane(z=4, thickness=3))
    assert np.array_equal(phi[2:9, 6, 6], np.array([2, 1, -1, -2, -1, 1, 2], np.float32))


def test_sdm_clip():
    phi = signed_distance_map(plane(z=4, thickness=5), clip=2.0)
    col = phi[:, 0, 0]
    assert np.array_equal(col, np.array([2, 2, 2, 1, -1, -2, -2, -2, -1, 1, 2, 2], np.float32))


def test_sdm_label2_is_background():
    label = plane()
    label[:2] = 2
    label[9:, :, :4] = 2
    assert np.array_equal(signed_distance_map(label), signed_distance_map(plane()))


def test_sdm_diagonal_distance():
    label = np.zeros((5, 5, 5), np.uint8)
    label[0, 0, 0] = 1
    phi = signed_distance_map(label)
    assert phi[0, 0, 0] == -1
    assert phi[1, 1, 0] == pytest.approx(math.sqrt(2))
    assert phi[3, 4, 0] == pytest.approx(5.0)


def test_sdm_empty_and_full():
    empty = np.zeros((4, 5, 6), np.uint8)
    empty[0] = 2
    assert np.all(signed_distance_map(empty, clip=8.0) == 8.0)
    diag = math.sqrt(16 + 25 + 36)
    assert np.allclose(signed_distance_map(empty), diag)
    full = np.ones((4, 5, 6), np.uint8)
    assert np.all(signed_distance_map(full, clip=3.0) == -3.0)
    assert np.all(np.isfinite(signed_distance_map(full)))


def test_sdm_bad_input():
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        signed_distance_map(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="clip"):
        signed_distance_map(plane(), clip=0)


def test_tube_contains_plane_and_is_inside_label():
    label = plane()
    tube = medial_surface_tube(label, dilation=1)
    assert tube.dtype == np.uint8 and tube.shape == label.shape
    # a one-voxel plane is its own medial surface: the tube is the plane
    assert np.array_equal(tube, label)


def test_tube_thick_slab_centre_and_dilation():
    label = plane(shape=(12, 16, 16), z=4, thickness=3)
    t0 = medial_surface_tube(label, dilation=0)
    t1 = medial_surface_tube(label, dilation=1)
    inner = (slice(None), slice(3, 13), slice(3, 13))  # away from the volume edges
    # the per-slice skeletons along y and x are the centre line z=5; along z the slices are full squares
    # whose skeleton is thin, so the centre plane is in the tube and most of z=4 / z=6 is not
    assert t0[5][inner[1:]].all()
    assert t0[4][inner[1:]].mean() < 0.3 and t0[6][inner[1:]].mean() < 0.3
    assert t1[4:7][:, 3:13, 3:13].all()  # dilation by 1 covers the slab
    assert np.all(t1 >= t0)
    assert np.all(t1 <= (label == 1))  # restricted to the surface
    assert not t1[:4].any() and not t1[7:].any()


def test_tube_label2_ignored_and_empty():
    label = plane(shape=(10, 10, 10), z=3, thickness=3)
    with2 = label.copy()
    with2[7:] = 2
    with2[:, :, :2][with2[:, :, :2] == 0] = 2
    assert np.array_equal(medial_surface_tube(with2), medial_surface_tube(label))
    assert not medial_surface_tube(np.full((6, 6, 6), 2, np.uint8)).any()
    with pytest.raises(ValueError, match="dilation"):
        medial_surface_tube(label, dilation=-1)
