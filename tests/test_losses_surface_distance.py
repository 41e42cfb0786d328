"""SurfaceDistanceLoss: hand values, clip, equality with MONAI BoundaryLoss, label-2 masking."""

import pytest
import torch
from monai.losses import BoundaryLoss

from custom_components.losses import SurfaceDistanceLoss

LAB = torch.tensor([1, 0, 2, 0, 0, 1, 2, 2], dtype=torch.float32)
SDM = torch.tensor([-1.0, 1.0, 5.0, 2.0, 9.0, -3.0, -2.0, 4.0])
PROBS = torch.tensor([0.9, 0.2, 0.7, 0.1, 0.6, 0.8, 0.3, 0.4])
LABEL = torch.stack([LAB, SDM, torch.zeros(8)]).reshape(1, 3, 2, 2, 2)
P = PROBS.reshape(1, 1, 2, 2, 2)


def test_hand_value_and_clip():
    # labelled voxels v0, v1, v3, v4, v5
    no_clip = (0.9 * -1 + 0.2 * 1 + 0.1 * 2 + 0.6 * 9 + 0.8 * -3) / 5
    assert float(SurfaceDistanceLoss(sigmoid=False)(P, LABEL)) == pytest.approx(no_clip, rel=1e-6)
    clipped = (0.9 * -1 + 0.2 * 1 + 0.1 * 2 + 0.6 * 2.5 + 0.8 * -2.5) / 5
    assert float(SurfaceDistanceLoss(clip=2.5, sigmoid=False)(P, LABEL)) == pytest.approx(clipped, rel=1e-6)


def test_gradient_is_phi():
    p = P.clone().requires_grad_(True)
    SurfaceDistanceLoss(sigmoid=False, reduction="sum")(p, LABEL).backward()
    expected = torch.where(LAB == 2, 0.0, SDM).reshape(P.shape)
    assert torch.equal(p.grad, expected)


def test_equals_monai_boundary_loss_without_label2():
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 1, 12, 12, 12)
    label[0, 0, 5:7] = 1
    label[1, 0, :, 3:5] = 1
    label[1, 0, 8:10, 8:10, 8:10] = 1
    sdm = BoundaryLoss().compute_distance_map(label)  # MONAI's own convention, for this comparison
    x = torch.randn(2, 1, 12, 12, 12, generator=g) * 2
    ours = SurfaceDistanceLoss()(x, torch.cat([label, sdm], 1))
    theirs = BoundaryLoss(sigmoid=True)(x, label)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_mask_removal_matters():
    label = torch.zeros(1, 2, 8, 8, 8)
    label[:, 0, 4] = 1
    z = torch.arange(8.0).reshape(8, 1, 1)
    label[:, 1] = torch.where(z == 4, -1.0, (z - 4).abs()).expand(8, 8, 8)
    label[:, 0, ..., :3] = 2
    x = torch.zeros(1, 1, 8, 8, 8)
    x[..., :3] = 8.0  # confident prediction far from the surface, inside label 2
    loss = SurfaceDistanceLoss()
    assert torch.allclose(loss(x, label), loss(x[..., 3:], label[..., 3:]))
    as_background = loss(x, torch.cat([torch.where(label[:, :1] == 2, 0.0, label[:, :1]), label[:, 1:]], 1))
    assert float(as_background) > float(loss(x, label)) + 0.2


def test_missing_sdm_channel_raises():
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2, 2\)"):
        SurfaceDistanceLoss()(P, LABEL[:, :1])
