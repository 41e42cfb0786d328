"""SkeletonRecallLoss: hand values, tube channel, label-2 masking."""

import pytest
import torch

from custom_components.losses import SkeletonRecallLoss

LAB = torch.tensor([1, 0, 2, 1, 0, 1, 2, 1], dtype=torch.float32)
TUBE = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.float32)
PROBS = torch.tensor([0.9, 0.2, 0.7, 0.4, 0.6, 0.8, 0.3, 0.5])
LABEL = torch.stack([LAB, torch.zeros(8), TUBE]).reshape(1, 3, 2, 2, 2)
P = PROBS.reshape(1, 1, 2, 2, 2)


def test_hand_value():
    # tube voxels that are labelled: v0, v3, v7 (v2, v6 are label 2): p = .9, .4, .5
    expected = 1 - (0.9 + 0.4 + 0.5 + 1e-5) / (3 + 1e-5)
    assert float(SkeletonRecallLoss(sigmoid=False)(P, LABEL)) == pytest.approx(expected, rel=1e-6)
    logits = torch.log(P / (1 - P))
    assert float(SkeletonRecallLoss()(logits, LABEL)) == pytest.approx(expected, rel=1e-5)


def test_only_tube_voxels_matter():
    other = P.clone()
    other[LABEL[:, 2:3] == 0] = 0.0  # change every voxel off the tube
    loss = SkeletonRecallLoss(sigmoid=False)
    assert torch.equal(loss(other, LABEL), loss(P, LABEL))


def test_mask_removal_matters():
    g = torch.Generator().manual_seed(2)
    label = torch.zeros(1, 3, 8, 8, 8)
    label[:, 0, 4] = 1
    label[:, 0, ..., :3] = 2
    label[:, 2, 4] = 1  # a tube that runs into the label-2 slab (as a stale tube could)
    x = torch.randn(1, 1, 8, 8, 8, generator=g)
    x[..., :3] = -8.0  # nothing predicted where nothing is labelled
    loss = SkeletonRecallLoss()
    assert torch.allclose(loss(x, label), loss(x[..., 3:], label[..., 3:]))
    unmasked = loss(x, torch.cat([torch.where(label[:, :1] == 2, 0.0, label[:, :1]), label[:, 1:]], 1))
    assert float(unmasked) > float(loss(x, label)) + 0.1


def test_missing_tube_channel_raises():
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2, 2\)"):
        SkeletonRecallLoss()(P, LABEL[:, :2])
