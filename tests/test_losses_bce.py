"""MaskedBCEWithLogitsLoss: hand values, positive weight, label-2 masking."""

import math

import pytest
import torch

from custom_components.losses import MaskedBCEWithLogitsLoss

LN3 = math.log(3.0)
# 2x2x2, flattened in (Z, Y, X) order
LABEL = torch.tensor([1, 0, 2, 0, 0, 1, 2, 2], dtype=torch.float32).reshape(1, 1, 2, 2, 2)
LOGITS = torch.tensor([LN3, 0.0, 7.0, -LN3, LN3, -LN3, -4.0, 9.0]).reshape(1, 1, 2, 2, 2)
# sigmoid: 0.75, 0.5, (ignored), 0.25, 0.75, 0.25, (ignored), (ignored)


def hand(w):
    fg = w * (-math.log(0.75)) + w * (-math.log(0.25))  # v0, v5
    bg = -math.log(0.5) - math.log(0.75) - math.log(0.25)  # v1, v3, v4
    return (fg + bg) / 5  # five labelled voxels


def test_hand_value_pos_weight_1():
    assert float(MaskedBCEWithLogitsLoss()(LOGITS, LABEL)) == pytest.approx(hand(1.0), rel=1e-6)


def test_hand_value_pos_weight_fixed_and_auto():
    assert float(MaskedBCEWithLogitsLoss(pos_weight=3.0)(LOGITS, LABEL)) == pytest.approx(hand(3.0), rel=1e-6)
    # auto: 3 negative / 2 positive labelled voxels (the three label-2 voxels are not counted)
    auto = MaskedBCEWithLogitsLoss(pos_weight="auto")
    assert float(auto.batch_pos_weight(*_split(LABEL))) == pytest.approx(1.5)
    assert float(auto(LOGITS, LABEL)) == pytest.approx(hand(1.5), rel=1e-6)
    clamped = MaskedBCEWithLogitsLoss(pos_weight="auto", max_pos_weight=1.2)
    assert float(clamped(LOGITS, LABEL)) == pytest.approx(hand(1.2), rel=1e-6)


def _split(label):
    lab = label[:, :1]
    return (lab == 1).float(), (lab != 2).float()


def test_auto_without_positives_is_one():
    label = torch.tensor([0, 0, 2, 0, 0, 0, 2, 2], dtype=torch.float32).reshape(1, 1, 2, 2, 2)
    assert float(MaskedBCEWithLogitsLoss(pos_weight="auto").batch_pos_weight(*_split(label))) == 1.0


def test_sum_and_none_reductions():
    none = MaskedBCEWithLogitsLoss(reduction="none")(LOGITS, LABEL)
    assert none.shape == LOGITS.shape
    assert torch.all(none[LABEL == 2] == 0)
    total = MaskedBCEWithLogitsLoss(reduction="sum")(LOGITS, LABEL)
    assert float(total) == pytest.approx(5 * hand(1.0), rel=1e-6)


def test_mask_removal_matters():
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(1, 1, 8, 8, 8, generator=g) > 0.7).float()
    label[..., :3] = 2
    x = torch.randn(1, 1, 8, 8, 8, generator=g) * 3
    x[..., :3] = 8.0  # confident foreground where nothing is labelled
    loss = MaskedBCEWithLogitsLoss()
    masked = loss(x, label)
    # the same term computed on the labelled part alone, where there is no label 2
    cropped = loss(x[..., 3:], label[..., 3:])
    assert torch.allclose(masked, cropped)
    # reading label 2 as background instead would count the confident voxels as errors
    as_background = loss(x, torch.where(label == 2, 0.0, label))
    assert float(as_background) > float(masked) + 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="pos_weight"):
        MaskedBCEWithLogitsLoss(pos_weight="balanced")
    with pytest.raises(ValueError, match="pos_weight"):
        MaskedBCEWithLogitsLoss(pos_weight=0.0)


def test_bf16_input_gives_float32():
    v = MaskedBCEWithLogitsLoss()(LOGITS.bfloat16(), LABEL.half())
    assert v.dtype == torch.float32 and torch.isfinite(v)
