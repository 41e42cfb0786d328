"""MaskedSoftclDiceLoss: hand values (soft skeleton by hand), equality with MONAI SoftclDiceLoss, masking."""

import numpy as np
import pytest
import torch
from monai.losses import SoftclDiceLoss
from monai.losses.cldice import soft_skel

from custom_components.losses import MaskedSoftclDiceLoss


def cldice(tprec, tsens, smooth=1e-4):
    return 1 - 2 * tprec * tsens / (tprec + tsens + smooth)


# a 1x1x6 line: the soft erosion is a min over x-1..x+1, the dilation a max over x-1..x+1
LINE_LABEL = torch.tensor([0, 1, 1, 1, 0, 2], dtype=torch.float32).reshape(1, 1, 1, 1, 6)
LINE_P = torch.tensor([0.8, 0.3, 0.9, 0.5, 0.1, 0.95]).reshape(1, 1, 1, 1, 6)


def test_hand_value_with_label2():
    # label 2 at x=5 -> p = [.8 .3 .9 .5 .1 0], g = [0 1 1 1 0 0]
    # erode(p) = [.3 .3 .3 .1 0 0], open(p) = [.3 .3 .3 .3 .1 0]: S(p) = relu(p - open) = [.5 0 .6 .2 0 0];
    # iteration 1: erode again [.3 .3 .1 0 0 0], open of erode(p) = [.3 .3 .3 .1 0 0], delta = 0.
    # S(g) = [0 0 1 0 0 0] (g's opening is g; one erosion leaves the centre, whose opening is empty)
    tprec = (0.6 + 0.2 + 1) / (0.5 + 0.6 + 0.2 + 1)
    tsens = (0.9 + 1) / (1 + 1)
    loss = MaskedSoftclDiceLoss(iterations=1, sigmoid=False)
    assert float(loss(LINE_P, LINE_LABEL)) == pytest.approx(cldice(tprec, tsens), rel=1e-5)


def test_hand_value_without_mask_differs():
    # the same line read with label 2 as plain background (p = .95 kept at x=5):
    # erode(p) = [.3 .3 .3 .1 .1 .1], open = [.3 .3 .3 .3 .1 .1], S(p) = [.5 0 .6 .2 0 .85]
    label = torch.where(LINE_LABEL == 2, 0.0, LINE_LABEL)
    tprec = (0.6 + 0.2 + 1) / (0.5 + 0.6 + 0.2 + 0.85 + 1)
    tsens = (0.9 + 1) / (1 + 1)
    expected = cldice(tprec, tsens)
    loss = MaskedSoftclDiceLoss(iterations=1, sigmoid=False)
    assert float(loss(LINE_P, label)) == pytest.approx(expected, rel=1e-5)
    assert float(SoftclDiceLoss(iter_=1)(LINE_P, label)) == pytest.approx(expected, rel=1e-5)
    assert abs(float(loss(LINE_P, LINE_LABEL)) - expected) > 0.01  # the mask changes the value


@pytest.mark.parametrize("iterations", [3, 5])
def test_equals_monai_without_label2(iterations):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 12, 12, 12, generator=g) * 2
    label = torch.zeros(2, 1, 12, 12, 12)
    label[0, 0, 4:7] = 1
    label[1, 0, :, 2:4] = 1
    ours = MaskedSoftclDiceLoss(iterations=iterations)(x, label)
    theirs = SoftclDiceLoss(iter_=iterations, sigmoid=True)(x, label)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_mask_removal_matters():
    # reference: the same term on data without label 2, where the label-2 slab is background in both
    # prediction and target; the neighbourhood of the slab sees zeros, not the raw prediction
    g = torch.Generator().manual_seed(3)
    label = torch.zeros(1, 1, 12, 12, 12)
    label[0, 0, 5:8] = 1
    label[..., :4] = 2
    x = torch.randn(1, 1, 12, 12, 12, generator=g) + 4 * (label == 1)
    x[..., :4] = 6.0
    loss = MaskedSoftclDiceLoss(iterations=3)
    ref_p = torch.where(label == 2, 0.0, torch.sigmoid(x))
    ref_label = torch.where(label == 2, 0.0, label)
    reference = MaskedSoftclDiceLoss(iterations=3, sigmoid=False)(ref_p, ref_label)
    assert torch.allclose(loss(x, label), reference, atol=1e-6)
    assert float(loss(x, ref_label)) > float(reference) + 0.02  # unmasked: the slab counts as false positives


def test_default_iterations_cover_oblique_six_voxel_sheets():
    assert MaskedSoftclDiceLoss().iterations == 5
    s = 24
    z, y, x = np.mgrid[:s, :s, :s].astype(float)
    d = ((z - s / 2) + (y - s / 2) + (x - s / 2)) / np.sqrt(3)  # normal (1, 1, 1)
    sheet = torch.from_numpy((np.abs(d) < 3).astype(np.float32))[None, None]  # 6 voxels thick
    assert torch.equal(soft_skel(sheet, 5), soft_skel(sheet, 12))
    assert not torch.equal(soft_skel(sheet, 3), soft_skel(sheet, 12))


def test_checkpoint_gives_the_same_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    label = torch.zeros(2, 1, 12, 12, 12)
    label[:, 0, 4:7] = 1
    label[0, 0, ..., :3] = 2
    x0 = torch.randn(2, 1, 12, 12, 12, generator=g)
    out = []
    for ckpt in (False, True):
        x = x0.clone().requires_grad_(True)
        v = MaskedSoftclDiceLoss(checkpoint=ckpt)(x, label)
        v.backward()
        out.append((v.detach(), x.grad))
    assert torch.allclose(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1])
