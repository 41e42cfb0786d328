"""MaskedSoftDiceLoss: hand values, equality with MONAI DiceLoss, label-2 masking."""

import pytest
import torch
from monai.losses import DiceLoss

from custom_components.losses import MaskedSoftDiceLoss

LABEL = torch.tensor([1, 0, 2, 0, 0, 1, 2, 2], dtype=torch.float32).reshape(1, 1, 2, 2, 2)
PROBS = torch.tensor([0.9, 0.2, 0.7, 0.1, 0.6, 0.8, 0.3, 0.4]).reshape(1, 1, 2, 2, 2)


def test_hand_value_probabilities():
    # labelled voxels v0, v1, v3, v4, v5: p = .9 .2 .1 .6 .8, g = 1 0 0 0 1
    inter, sum_p, sum_g = 0.9 + 0.8, 0.9 + 0.2 + 0.1 + 0.6 + 0.8, 2.0
    expected = 1 - (2 * inter + 1e-5) / (sum_p + sum_g + 1e-5)
    assert float(MaskedSoftDiceLoss(sigmoid=False)(PROBS, LABEL)) == pytest.approx(expected, rel=1e-6)
    logits = torch.log(PROBS / (1 - PROBS))
    assert float(MaskedSoftDiceLoss()(logits, LABEL)) == pytest.approx(expected, rel=1e-5)


def test_hand_value_batch_option():
    label = torch.cat([LABEL, torch.zeros_like(LABEL)])
    probs = torch.cat([PROBS, torch.full_like(PROBS, 0.5)])
    # batch: one Dice over both samples; the second has no surface and p = .5 on all 8 voxels
    inter, den = 1.7, (2.6 + 2.0) + 8 * 0.5
    expected = 1 - (2 * inter + 1e-5) / (den + 1e-5)
    assert float(MaskedSoftDiceLoss(sigmoid=False, batch=True)(probs, label)) == pytest.approx(expected, rel=1e-6)
    per = MaskedSoftDiceLoss(sigmoid=False, reduction="none")(probs, label)
    assert float(per[1]) == pytest.approx(1 - 1e-5 / (4.0 + 1e-5), rel=1e-6)


@pytest.mark.parametrize("batch", [False, True])
def test_equals_monai_without_label2(batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 10, 10, 10, generator=g) * 2
    label = (torch.rand(2, 1, 10, 10, 10, generator=g) > 0.8).float()
    ours = MaskedSoftDiceLoss(batch=batch)(x, label)
    theirs = DiceLoss(sigmoid=True, batch=batch)(x, label)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_mask_removal_matters():
    g = torch.Generator().manual_seed(1)
    label = (torch.rand(1, 1, 8, 8, 8, generator=g) > 0.7).float()
    label[..., :3] = 2
    x = torch.randn(1, 1, 8, 8, 8, generator=g) * 3
    x[..., :3] = 8.0
    loss = MaskedSoftDiceLoss()
    assert torch.allclose(loss(x, label), loss(x[..., 3:], label[..., 3:]))
    as_background = loss(x, torch.where(label == 2, 0.0, label))
    assert float(as_background) > float(loss(x, label)) + 0.1
