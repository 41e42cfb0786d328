"""PersistentHomologyLoss: hand values of H0/H1/H2 bars and their gradients, every_n, downsampling, masking."""

import pytest
import torch
import torch.nn.functional as F

from custom_components.losses import PersistentHomologyLoss


def ph(**kw):
    return PersistentHomologyLoss(**{"downsample": 1, "sigmoid": False, **kw})


def spurious_component():
    """Target: a 2^3 block. Prediction: the block (p=.95), and a voxel p=.8 linked to it by a voxel p=.3."""
    p = torch.full((1, 1, 5, 5, 5), 0.1)
    label = torch.zeros(1, 1, 5, 5, 5)
    p[0, 0, 1:3, 1:3, 1:3] = 0.95
    label[0, 0, 1:3, 1:3, 1:3] = 1
    p[0, 0, 1, 1, 4] = 0.8
    p[0, 0, 1, 1, 3] = 0.3
    return p, label


def test_hand_value_unmatched_component_and_gradient():
    # f = 1 - p: the spurious H0 bar is born at f=.2 (the voxel), dies at f=.7 (the link):
    # distance^2 to the diagonal = (.7 - .2)^2 / 2
    p, label = spurious_component()
    p.requires_grad_(True)
    v = ph()(p, label)
    assert float(v.detach()) == pytest.approx(0.5 * 0.5**2, rel=1e-5)
    v.backward()
    # dL/df_birth = -(f_d - f_b) = -.5, dL/dp = +.5 at the voxel; -.5 at the link; nothing elsewhere
    assert float(p.grad[0, 0, 1, 1, 4]) == pytest.approx(0.5, rel=1e-5)
    assert float(p.grad[0, 0, 1, 1, 3]) == pytest.approx(-0.5, rel=1e-5)
    assert int((p.grad != 0).sum()) == 2


def test_hand_value_matched_components():
    # target: two separate voxels -> one finite H0 bar (0, 1). Prediction: the voxels at p=.9 and .7 joined
    # by a voxel p=.2 -> bar (.3, .8), matched: (.3 - 0)^2 + (.8 - 1)^2
    p = torch.full((1, 1, 5, 5, 5), 0.1)
    label = torch.zeros(1, 1, 5, 5, 5)
    label[0, 0, 1, 1, 1] = label[0, 0, 1, 1, 3] = 1
    p[0, 0, 1, 1, 1], p[0, 0, 1, 1, 3], p[0, 0, 1, 1, 2] = 0.9, 0.7, 0.2
    p.requires_grad_(True)
    v = ph()(p, label)
    assert float(v.detach()) == pytest.approx(0.3**2 + 0.2**2, rel=1e-5)
    v.backward()
    assert float(p.grad[0, 0, 1, 1, 3]) == pytest.approx(-2 * 0.3, rel=1e-5)
    assert float(p.grad[0, 0, 1, 1, 2]) == pytest.approx(2 * 0.2, rel=1e-5)
    assert ph(matched_weight=0.0)(p, label).item() == pytest.approx(0.0, abs=1e-7)


def test_hand_value_tunnel_and_cavity():
    # H1: a ring p=.9 around a 3x3 hole p=.3 (target: the filled square): bar (.1, .7)
    p = torch.full((1, 1, 3, 7, 7), 0.05)
    label = torch.zeros(1, 1, 3, 7, 7)
    p[0, 0, 1, 1:6, 1:6] = 0.9
    p[0, 0, 1, 2:5, 2:5] = 0.3
    label[0, 0, 1, 1:6, 1:6] = 1
    assert float(ph()(p, label)) == pytest.approx(0.5 * 0.6**2, rel=1e-5)
    assert float(ph(homology_dims=(0, 2))(p, label)) == pytest.approx(0.0, abs=1e-7)
    # H2: a hollow 3^3 cube p=.9 with its centre p=.4 (target: the solid cube): bar (.1, .6)
    p = torch.full((1, 1, 7, 7, 7), 0.05)
    label = torch.zeros(1, 1, 7, 7, 7)
    p[0, 0, 2:5, 2:5, 2:5] = 0.9
    p[0, 0, 3, 3, 3] = 0.4
    label[0, 0, 2:5, 2:5, 2:5] = 1
    assert float(ph()(p, label)) == pytest.approx(0.5 * 0.5**2, rel=1e-5)
    assert float(ph(homology_dims=(0, 1))(p, label)) == pytest.approx(0.0, abs=1e-7)


def test_perfect_prediction_is_zero():
    _, label = spurious_component()
    label[0, 0, 4, 4, 4] = 1  # two components
    assert float(ph()(label.clone(), label)) == 0.0


def test_label2_masks_the_spurious_component():
    p, label = spurious_component()
    label[0, 0, :, :, 4] = 2  # the spurious voxel lies in unlabeled space
    assert float(ph()(p, label)) == pytest.approx(0.0, abs=1e-7)
    # without the mask (label 2 read as background) it would be penalised
    assert float(ph()(p, torch.where(label == 2, 0.0, label))) == pytest.approx(0.125, rel=1e-5)


def test_min_persistence_filters_short_bars():
    p, label = spurious_component()
    assert float(ph(min_persistence=0.6)(p, label)) == pytest.approx(0.0, abs=1e-7)
    assert float(ph(min_persistence=0.4)(p, label)) == pytest.approx(0.125, rel=1e-5)


def test_downsample_is_pooling_first():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 1, 12, 12, 12, generator=g)
    label = (torch.rand(2, 1, 12, 12, 12, generator=g) > 0.9).float()
    for pool, op in (("max", F.max_pool3d), ("avg", F.avg_pool3d)):
        loss = ph(downsample=3, pool=pool, reduction="none")
        down = loss(p, label)
        # the matching of the pooled maps, f = 1 - pool(p) against f_g = 1 - pool(g)
        ref = loss._matching_loss(1 - op(p, 3, 3)[:, 0], 1 - op(label, 3, 3)[:, 0])
        assert torch.allclose(down, ref, atol=1e-6) and float(down.sum()) > 0


def test_every_n_returns_last_value_detached_without_work():
    p, label = spurious_component()
    loss = ph(every_n=3)
    calls = []
    original = loss._matching_loss
    loss._matching_loss = lambda *a: calls.append(1) or original(*a)
    x = p.clone().requires_grad_(True)
    first = loss(x, label)
    assert first.requires_grad and len(calls) == 1
    for _ in range(2):
        again = loss(torch.zeros_like(p), label)  # a different input: the stale value comes back
        assert not again.requires_grad and float(again) == float(first.detach()) and len(calls) == 1
    fourth = loss(torch.zeros_like(p), label)
    assert len(calls) == 2 and float(fourth) == pytest.approx(0.0, abs=1e-7)
    assert loss.calls == 4 and loss.computed_calls == 2


def test_bad_arguments():
    for kw in ({"downsample": 0}, {"pool": "median"}, {"every_n": 0}, {"homology_dims": (3,)}):
        with pytest.raises(ValueError):
            PersistentHomologyLoss(**kw)


def test_crop_window_maps_back_to_the_right_voxels():
    small, small_label = spurious_component()
    p = torch.full((1, 1, 9, 9, 9), 0.1)
    label = torch.zeros(1, 1, 9, 9, 9)
    p[..., 4:, 4:, 4:] = small
    label[..., 4:, 4:, 4:] = small_label
    loss = ph(crop=5)
    loss._windows = lambda spatial, batch: [(4, 4, 4)] * batch
    x = p.clone().requires_grad_(True)
    v = loss(x, label)
    assert float(v.detach()) == pytest.approx(0.125, rel=1e-5)
    v.backward()
    assert float(x.grad[0, 0, 5, 5, 8]) == pytest.approx(0.5, rel=1e-5)
    assert float(x.grad[0, 0, 5, 5, 7]) == pytest.approx(-0.5, rel=1e-5)
    assert int((x.grad != 0).sum()) == 2
    # random windows: inside the map, and the whole map when crop >= its size
    starts = ph(crop=4)._windows((9, 6, 3), 5)
    assert all(0 <= a <= 5 and 0 <= b <= 2 and c == 0 for a, b, c in starts)
    assert float(ph(crop=9)(p, label)) == pytest.approx(float(ph()(p, label)))
