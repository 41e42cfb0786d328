"""Logit fusion and rotation / mirror TTA (custom_components.inference.ensemble), by hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from custom_components.inference.ensemble import EnsembleSlidingWindowInferer, LogitEnsemble, tta_transforms


class Constant(torch.nn.Module):
    """A network whose logit is ``value`` everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def test_logits_of_two_constant_networks_fuse_to_the_weighted_mean_at_their_own_window_sizes():
    ensemble = LogitEnsemble([Constant(2.0), Constant(-1.0)], weights=[3, 1])
    inferer = EnsembleSlidingWindowInferer([[8, 8, 8], [4, 4, 4]], sw_batch_size=2, overlap=0.25, mode="gaussian")
    z = inferer(torch.zeros(1, 1, 8, 8, 8), ensemble)
    # (3 * 2 + 1 * -1) / (3 + 1) = 1.25 at every voxel, whatever the window blending
    assert torch.allclose(z, torch.full((1, 1, 8, 8, 8), 1.25), atol=1e-6)
    assert torch.sigmoid(z)[0, 0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-1.25)), abs=1e-6)
    with pytest.raises(ValueError, match="2 positive numbers"):
        LogitEnsemble([Constant(0), Constant(1)], weights=[1, 0])
    with pytest.raises(ValueError, match="1 window sizes for an ensemble of 2"):
        EnsembleSlidingWindowInferer([[8, 8, 8]], sw_batch_size=1)(torch.zeros(1, 1, 8, 8, 8), ensemble)


def test_rotation_and_mirror_tta_is_exact_for_an_equivariant_network():
    torch.manual_seed(0)
    pointwise = torch.nn.Conv3d(1, 1, 1)  # commutes with every mirroring and quarter turn
    x = torch.randn(1, 1, 6, 6, 6)
    for axis in (0, 1, 2):
        tta = LogitEnsemble([pointwise], tta_flips=8, tta_rotations=4, rotation_axis=axis)
        assert len(tta.transforms) == 32
        assert torch.allclose(tta(x), pointwise(x), atol=1e-6)


def test_rotation_tta_of_a_general_network_is_the_mean_of_the_turned_back_outputs():
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 6, 6, 6)
    tta = LogitEnsemble([net], tta_rotations=4, rotation_axis=0)  # quarter turns in the (Y, X) plane
    by_hand = sum(torch.rot90(net(torch.rot90(x, k, (3, 4))), -k, (3, 4)) for k in range(4)) / 4
    assert torch.allclose(tta(x), by_hand, atol=1e-6)
    assert not torch.allclose(by_hand, net(x), atol=1e-3)  # the network is not equivariant: TTA changes it


def test_tta_transform_lists():
    assert tta_transforms(1, 1) == [((), 0)]
    assert tta_transforms(2, 2) == [((), 0), ((2,), 0), ((), 1), ((2,), 1)]
    with pytest.raises(ValueError, match="tta_rotations must be in 1..4"):
        tta_transforms(1, 5)
    with pytest.raises(ValueError, match="tta_rotation_axis"):
        LogitEnsemble([Constant(0)], rotation_axis=3)
