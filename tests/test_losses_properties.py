"""Term x property matrix shared by the six loss terms (per-term specifics are in test_losses_<term>.py).

Each term is run on a 16^3 volume with a curved sheet, label-2 regions, and its precomputed signed
distance map and tube (channels [label, sdm, tube], docs/CONVENTIONS.md).
"""

import numpy as np
import pytest
import torch

from custom_components.losses import (
    MaskedBCEWithLogitsLoss,
    MaskedSoftclDiceLoss,
    MaskedSoftDiceLoss,
    PersistentHomologyLoss,
    SkeletonRecallLoss,
    SurfaceDistanceLoss,
)
from custom_components.data.targets import medial_surface_tube, signed_distance_map

S = 16
CLIP = 5.0

TERMS = {
    "bce": lambda **kw: MaskedBCEWithLogitsLoss(**{"pos_weight": "auto", **kw}),
    "dice": lambda **kw: MaskedSoftDiceLoss(**kw),
    "cldice": lambda **kw: MaskedSoftclDiceLoss(iterations=3, **kw),
    "skeleton_recall": lambda **kw: SkeletonRecallLoss(**kw),
    "surface_distance": lambda **kw: SurfaceDistanceLoss(clip=CLIP, **kw),
    "topology": lambda **kw: PersistentHomologyLoss(downsample=2, every_n=1, **kw),
}
# terms normalised per sample (reduction "none" gives (B,)); the others average over the batch's voxels
PER_SAMPLE = ("dice", "cldice", "skeleton_recall", "topology")


def make_label(seed=0, with_unlabeled=True):
    z, y, x = np.mgrid[:S, :S, :S]
    centre = 7 + np.round(2 * np.sin(x / 3.0 + seed)).astype(int)
    label = ((z >= centre) & (z < centre + 2)).astype(np.uint8)
    if with_unlabeled:
        label[:, :, :3] = 2  # a slab the sheet runs into
        label[10:14, 2:6, 8:12] = 2  # a box off the sheet
    return label


def label_tensor(label):
    sdm = signed_distance_map(label, clip=CLIP)
    tube = medial_surface_tube(label, dilation=1)
    return torch.from_numpy(np.stack([label.astype(np.float32), sdm, tube.astype(np.float32)]))[None]


def perfect_logits(label_t, scale=12.0):
    return scale * (2 * (label_t[:, :1] == 1).float() - 1)


def worse_logits(label_t):
    x = perfect_logits(label_t)
    x[:, :, 1:3, 9:12, 9:12] = 12.0  # spurious blob away from the sheet
    x[:, :, :, 6:9, 6:9] = -12.0  # a hole through the sheet
    return x


def noisy_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, S, S, S, generator=g) * 2


def minimum(name, label_t):
    if name == "surface_distance":  # p = 1 exactly where phi < 0 (valid voxels only)
        lab, phi = label_t[:, 0], label_t[:, 1]
        valid = lab != 2
        return float(phi[(phi < 0) & valid].sum() / valid.sum())
    return 0.0


@pytest.fixture(scope="module")
def label_t():
    return label_tensor(make_label())


@pytest.mark.parametrize("name", TERMS)
def test_perfect_is_minimum(name, label_t):
    loss = TERMS[name]()
    best = float(loss(perfect_logits(label_t), label_t))
    assert best == pytest.approx(minimum(name, label_t), abs=1e-3)
    for x in (worse_logits(label_t), noisy_logits(1), noisy_logits(2)):
        assert float(loss(x, label_t)) >= best - 1e-6


@pytest.mark.parametrize("name", TERMS)
def test_worse_is_larger(name, label_t):
    loss = TERMS[name]()
    assert float(loss(worse_logits(label_t), label_t)) > float(loss(perfect_logits(label_t), label_t)) + 1e-3


@pytest.mark.parametrize("name", TERMS)
def test_label2_invariance_value_and_gradient(name, label_t):
    loss = TERMS[name]()
    unl = label_t[:, :1] == 2
    base = noisy_logits(3)
    other = torch.where(unl, torch.randn(base.shape) * 10, base)
    assert not torch.equal(base, other)
    values, grads = [], []
    for x in (base, other):
        x = x.clone().requires_grad_(True)
        v = loss(x, label_t)
        v.backward()
        values.append(v.detach())
        grads.append(x.grad)
    assert torch.equal(values[0], values[1])
    assert torch.equal(grads[0], grads[1])
    assert torch.all(grads[0][unl] == 0)


@pytest.mark.parametrize("name", TERMS)
def test_gradient_finite_and_nonzero(name, label_t):
    loss = TERMS[name]()
    # soft logits, with a spurious blob and a hole so that the topology term has bars to push
    x = (worse_logits(label_t) / 6 + noisy_logits(4) / 4).requires_grad_(True)
    v = loss(x, label_t)
    v.backward()
    assert torch.isfinite(v) and torch.all(torch.isfinite(x.grad))
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TERMS)
def test_batch_of_two(name):
    a, b = label_tensor(make_label(0)), label_tensor(make_label(2))
    xa, xb = noisy_logits(5), noisy_logits(6)
    both_x, both_l = torch.cat([xa, xb]), torch.cat([a, b])
    if name in PER_SAMPLE:
        loss = TERMS[name](reduction="none")
        per = loss(both_x, both_l)
        assert per.shape == (2,)
        assert torch.allclose(per, torch.cat([loss(xa, a), loss(xb, b)]), atol=1e-6)
        mean = TERMS[name]()(both_x, both_l)
        assert torch.allclose(mean, per.mean())
    else:
        kw = {"pos_weight": 2.0} if name == "bce" else {}
        loss = TERMS[name](reduction="sum", **kw)
        assert torch.allclose(loss(both_x, both_l), loss(xa, a) + loss(xb, b), rtol=1e-5)
        n = ((both_l[:, 0] != 2).sum()).float()
        assert torch.allclose(TERMS[name](**kw)(both_x, both_l), loss(both_x, both_l) / n, rtol=1e-5)


@pytest.mark.parametrize("name", TERMS)
def test_empty_foreground_finite(name):
    label = make_label()
    label[label == 1] = 0
    lt = label_tensor(label)
    x = noisy_logits(7).requires_grad_(True)
    v = TERMS[name]()(x, lt)
    v.backward()
    assert torch.isfinite(v) and torch.all(torch.isfinite(x.grad))
    if name != "skeleton_recall":  # no tube: no recall to ask for, hence no gradient
        assert float(v.detach()) >= 0 if name != "surface_distance" else float(v.detach()) > 0
    # predicting nothing is (close to) the best on an empty patch
    assert float(TERMS[name]()(torch.full_like(x, -12.0), lt)) <= float(v.detach()) + 1e-6


@pytest.mark.parametrize("name", TERMS)
def test_all_unlabeled_gives_zero(name):
    lt = label_tensor(np.full((S, S, S), 2, np.uint8))
    x = noisy_logits(8).requires_grad_(True)
    v = TERMS[name]()(x, lt)
    v.backward()
    assert torch.isfinite(v)
    assert float(v.detach()) == pytest.approx(0.0, abs=1e-4)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("name", TERMS)
def test_bad_shapes_raise(name, label_t):
    loss = TERMS[name]()
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16, 8\)"):
        loss(torch.zeros(1, 1, 16, 16, 8), label_t)
    with pytest.raises(ValueError, match=r"\(1, 2, 16, 16, 16\)"):
        loss(torch.zeros(1, 2, S, S, S), label_t)
