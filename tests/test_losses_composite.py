"""CompositeTopologyLoss: weights, zero-weight terms, deep supervision, list input, shapes, bf16, edge patches."""

import numpy as np
import pytest
import torch

from custom_components.losses import (
    CompositeTopologyLoss,
    MaskedBCEWithLogitsLoss,
    MaskedSoftclDiceLoss,
    MaskedSoftDiceLoss,
    PersistentHomologyLoss,
    SkeletonRecallLoss,
    SurfaceDistanceLoss,
)
from custom_components.data.targets import medial_surface_tube, signed_distance_map

S = 16
ALL = {"bce": 1.0, "dice": 1.0, "cldice": 0.5, "skeleton_recall": 0.5, "surface_distance": 0.1, "topology": 0.05}


def make_label(kind="sheet", batch=2):
    out = []
    for b in range(batch):
        label = np.zeros((S, S, S), np.uint8)
        if kind == "sheet":
            label[6 + b : 8 + b] = 1
            label[:, :, :3] = 2
        elif kind == "empty":
            label[:, :, :3] = 2
        elif kind == "unlabeled":
            label[:] = 2
        sdm = signed_distance_map(label, clip=8.0)
        tube = medial_surface_tube(label)
        out.append(np.stack([label.astype(np.float32), sdm, tube.astype(np.float32)]))
    return torch.from_numpy(np.stack(out))


def logits(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, S, S, S, generator=g) * 2


def test_weighted_sum_of_terms_and_last_terms():
    label, x = make_label(), logits()
    loss = CompositeTopologyLoss(dict(ALL), surface_clip=8.0, topology_every_n=1, cldice_iterations=3)
    total = loss(x, label)
    parts = {
        "bce": MaskedBCEWithLogitsLoss()(x, label),
        "dice": MaskedSoftDiceLoss(batch=True)(x, label),
        "cldice": MaskedSoftclDiceLoss(iterations=3)(x, label),
        "skeleton_recall": SkeletonRecallLoss()(x, label),
        "surface_distance": SurfaceDistanceLoss(clip=8.0)(x, label),
        "topology": PersistentHomologyLoss(downsample=4)(x, label),
    }
    assert set(loss.last_terms) == set(ALL)
    for k, v in parts.items():
        assert loss.last_terms[k] == pytest.approx(float(v.detach()), rel=1e-5, abs=1e-7), k
        assert isinstance(loss.last_terms[k], float)
    assert float(total) == pytest.approx(sum(ALL[k] * float(v.detach()) for k, v in parts.items()), rel=1e-5)


def test_zero_weight_terms_not_constructed_or_computed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a zero-weight term was computed")

    monkeypatch.setattr(PersistentHomologyLoss, "forward", boom)
    monkeypatch.setattr(MaskedSoftclDiceLoss, "forward", boom)
    loss = CompositeTopologyLoss({"bce": 1.0, "dice": 2.0, "cldice": 0.0, "topology": 0})
    assert set(loss.terms) == {"bce", "dice"}
    label, x = make_label(), logits()
    v = loss(x, label)
    assert set(loss.last_terms) == {"bce", "dice"}
    expected = MaskedBCEWithLogitsLoss()(x, label) + 2 * MaskedSoftDiceLoss(batch=True)(x, label)
    assert torch.allclose(v, expected)


def test_deep_supervision_weights_and_main_head_only():
    label = make_label()
    heads = [logits(seed=i) for i in range(3)]
    stacked = torch.stack(heads, dim=1)  # DynUNet: (B, 1 + K, C, *S)
    loss = CompositeTopologyLoss({"dice": 1.0, "cldice": 1.0}, cldice_iterations=3)
    assert loss.head_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    loss(stacked, label)
    dice = MaskedSoftDiceLoss(batch=True)
    expected_dice = sum(w * float(dice(h, label)) for w, h in zip([4 / 7, 2 / 7, 1 / 7], heads))
    assert loss.last_terms["dice"] == pytest.approx(expected_dice, rel=1e-5)
    main_only = float(MaskedSoftclDiceLoss(iterations=3)(heads[0], label))
    assert loss.last_terms["cldice"] == pytest.approx(main_only, rel=1e-5)
    # configured otherwise: cldice on every head, decay 1 -> plain mean
    every = CompositeTopologyLoss({"cldice": 1.0}, cldice_iterations=3, main_head_only=(), deep_supervision_decay=1.0)
    every(stacked, label)
    cl = MaskedSoftclDiceLoss(iterations=3)
    assert every.last_terms["cldice"] == pytest.approx(np.mean([float(cl(h, label)) for h in heads]), rel=1e-5)


def test_list_input_equals_stacked_and_gradients_reach_every_head():
    label = make_label()
    heads = [logits(seed=i).requires_grad_(True) for i in range(3)]
    loss = CompositeTopologyLoss(dict(ALL), topology_every_n=1)
    a = loss(heads, label)
    b = loss(torch.stack(heads, dim=1), label)
    assert torch.allclose(a, b)
    a.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 and torch.isfinite(h.grad).all() for h in heads)


def test_label2_invariance_of_the_composite():
    label = make_label()
    unl = label[:, :1] == 2
    x = logits()
    y = torch.where(unl, torch.randn(x.shape) * 5, x)
    loss = CompositeTopologyLoss(dict(ALL), topology_every_n=1)
    grads = []
    for t in (x, y):
        t = t.clone().requires_grad_(True)
        loss(t, label).backward()
        grads.append(t.grad)
    assert torch.equal(grads[0], grads[1])


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match=r"unknown loss term \"clDice\".*'cldice'"):
        CompositeTopologyLoss({"clDice": 1.0})
    with pytest.raises(ValueError, match=r"\"dice\" has weight -1.0"):
        CompositeTopologyLoss({"dice": -1.0})
    with pytest.raises(ValueError, match="main_head_only"):
        CompositeTopologyLoss({"dice": 1.0}, main_head_only=("boundary",))
    with pytest.raises(ValueError, match="deep_supervision_decay"):
        CompositeTopologyLoss({"dice": 1.0}, deep_supervision_decay=0.0)


def test_bad_shapes_raise():
    label = make_label()
    loss = CompositeTopologyLoss({"dice": 1.0, "surface_distance": 1.0})
    with pytest.raises(ValueError, match=r"surface_distance.*\(2, 1, 16, 16, 16\)"):
        loss(logits(), label[:, :1])
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16, 8\)"):
        loss(torch.zeros(2, 1, S, S, 8), label)
    # a coarser deep-supervision head is taken (nnU-Net's ResEnc, tests/test_resenc.py) if its size divides the label's;
    # the main head never is coarser
    with pytest.raises(ValueError, match=r"head 1 .*\(2, 1, 8, 8, 6\)"):
        loss([logits(), torch.zeros(2, 1, 8, 8, 6)], label)
    with pytest.raises(ValueError, match=r"head 0 .*\(2, 1, 8, 8, 8\)"):
        loss([torch.zeros(2, 1, 8, 8, 8), logits()], label)
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        loss(torch.zeros(2, 1, S, S), label)
    # label-channel terms alone accept a one-channel label
    only = CompositeTopologyLoss({"bce": 1.0, "dice": 1.0, "cldice": 1.0, "topology": 1.0}, topology_every_n=1)
    assert torch.isfinite(only(logits(), label[:, :1]))


@pytest.mark.parametrize("kind", ["empty", "unlabeled"])
def test_finite_on_patch_without_surface_or_labels(kind):
    label = make_label(kind)
    x = logits().requires_grad_(True)
    loss = CompositeTopologyLoss(dict(ALL), topology_every_n=1, surface_clip=8.0)
    v = loss(x, label)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(x.grad).all()
    assert all(np.isfinite(t) for t in loss.last_terms.values())
    if kind == "unlabeled":
        assert float(v.detach()) == pytest.approx(0.0, abs=1e-4) and torch.all(x.grad == 0)


def test_bf16_autocast():
    label = make_label().half()  # the sdm channel is cached as float16
    x = logits().requires_grad_(True)
    loss = CompositeTopologyLoss(dict(ALL), topology_every_n=1, surface_clip=8.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = torch.stack([x.bfloat16(), (x * 0.5).bfloat16()], dim=1)
        v = loss(pred, label)
    assert v.dtype == torch.float32 and torch.isfinite(v)
    v.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    ref = CompositeTopologyLoss(dict(ALL), topology_every_n=1, surface_clip=8.0)(
        torch.stack([x.bfloat16().float(), (x * 0.5).bfloat16().float()], dim=1), label.float()
    )
    assert float(v.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)


def test_topology_every_n_in_composite():
    label, x = make_label(), logits()
    loss = CompositeTopologyLoss({"dice": 1.0, "topology": 1.0}, topology_every_n=2)
    loss(x, label)
    loss(x, label)
    loss(x, label)
    assert loss.terms["topology"].computed_calls == 2
