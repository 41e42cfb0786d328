"""BatchRandAugment: the geometry by hand (identity crop, mirror, 90-degree rotation, zoom), one grid for
image and targets, label 2 outside the input, the intensity formulas, reproducibility, errors."""

from __future__ import annotations

import math

import pytest
import torch

from custom_components.training.batch_augment import (
    BatchRandAugment,
    gamma_contrast,
    gaussian_smooth,
    rotation_scale_flip,
    sampling_grid,
)

OFF = dict(rotate_prob=0, scale_prob=0, flip_prob=0, elastic_prob=0, intensity_scale_prob=0, intensity_shift_prob=0,
           gamma_prob=0, noise_prob=0)


def _batch(b=2, size=(12, 14, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (b, 1, *size), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, 3, (b, 1, *size), generator=g, dtype=torch.uint8),
        "sdm": torch.randn((b, 1, *size), generator=g).half(),
        "tube": torch.randint(0, 2, (b, 1, *size), generator=g, dtype=torch.uint8),
    }


def _sample(volume, matrices, out_shape, mode="nearest"):
    grid = sampling_grid(matrices, None, volume.shape[2:], out_shape)
    return torch.nn.functional.grid_sample(volume, grid, mode=mode, align_corners=True)


def test_everything_off_is_the_centre_crop():
    batch = _batch()
    image, label = BatchRandAugment([8, 10, 12], **OFF)(batch)
    crop = (slice(None), slice(None), slice(2, 10), slice(2, 12), slice(2, 14))
    assert image.shape == (2, 1, 8, 10, 12) and label.shape == (2, 3, 8, 10, 12)
    assert torch.allclose(image, batch["image"][crop].float() / 255, atol=1e-5)
    assert torch.equal(label[:, 0:1], batch["label"][crop].float())
    assert torch.allclose(label[:, 1:2], batch["sdm"][crop].float(), atol=1e-4)
    assert torch.equal(label[:, 2:3], batch["tube"][crop].float())


def test_identity_matrix_and_mirror():
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    assert torch.allclose(rotation_scale_flip(zeros, ones, ones), torch.eye(3)[None])
    flips = torch.tensor([[1.0, -1.0, 1.0]])
    vol = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    out = _sample(vol, rotation_scale_flip(zeros, ones, flips), (4, 5, 6))
    assert torch.equal(out, vol.flip(3))  # y mirrored exactly


def test_quarter_turn_about_z_is_rot90_of_y_and_x():
    # R_z(pi/2) maps the output offset (z, y, x) to the input offset (z, -x, y): out[z, y, x] = in[z, c - x, y]
    angles = torch.tensor([[math.pi / 2, 0.0, 0.0]])
    vol = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(1, 1, 3, 5, 5)
    out = _sample(vol, rotation_scale_flip(angles, torch.ones(1, 3), torch.ones(1, 3)), (3, 5, 5))
    expected = torch.empty_like(vol)
    for y in range(5):
        for x in range(5):
            expected[..., y, x] = vol[..., 4 - x, y]
    assert torch.equal(out, expected)


def test_zoom_two_reads_every_other_voxel_around_the_centre():
    # scale 2 on x: an output offset x reads the input at x / 2, so a linear ramp halves its slope
    ramp = torch.arange(9, dtype=torch.float32).view(1, 1, 1, 1, 9).expand(1, 1, 3, 3, 9).contiguous()
    out = _sample(ramp, rotation_scale_flip(torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 2.0]]), torch.ones(1, 3)),
                  (3, 3, 9), mode="bilinear")
    assert torch.allclose(out[0, 0, 1, 1], torch.tensor([2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]), atol=1e-5)


def test_image_and_targets_share_one_grid_and_outside_is_ignored():
    batch = _batch(b=3, size=(20, 20, 20), seed=1)
    batch["sdm"] = batch["image"].half()  # same values: interpolated the same way, must come out equal
    batch["tube"] = (batch["label"] == 1).to(torch.uint8)
    aug = BatchRandAugment([16, 16, 16], rotate_range=0.8, rotate_prob=1.0, scale_prob=1.0, flip_prob=0.5,
                           elastic_prob=1.0, magnitude_range=(200, 300), intensity_scale_prob=0, intensity_shift_prob=0,
                           gamma_prob=0, noise_prob=0, image_scale=1.0)
    image, label = aug(batch)
    assert torch.allclose(image, label[:, 1:2], atol=0.02)  # float16 copy of the same values
    inside = label[:, 0] != 2
    assert torch.equal(label[:, 2][inside], (label[:, 0][inside] == 1).float())
    assert set(torch.unique(label[:, 0]).tolist()) <= {0.0, 1.0, 2.0}
    # a 0.8 rad rotation of a 16^3 patch reads beyond the 20^3 input at its corners: those voxels are label 2
    edge = torch.zeros(3, 1, 20, 20, 20, dtype=torch.uint8)
    _, lab = aug({**batch, "label": edge, "tube": edge})
    assert (lab[:, 0] == 2).any() and (lab[:, 0] == 0).any()


def test_elastic_field_smoothing_keeps_a_constant_and_centre_weight():
    field = torch.ones(2, 3, 13, 13, 13)
    out = gaussian_smooth(field, torch.tensor([1.0, 2.0]), radius=6)
    assert torch.allclose(out[:, :, 6, 6, 6], torch.ones(2, 3), atol=1e-6)  # 3 sigma = 6 voxels from the padding
    delta = torch.zeros(1, 1, 9, 9, 9)
    delta[0, 0, 4, 4, 4] = 1
    sigma = 1.0
    k = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2 / sigma**2)
    assert gaussian_smooth(delta, torch.tensor([sigma]), radius=4)[0, 0, 4, 4, 4].item() == pytest.approx(
        float((1 / k.sum()) ** 3), rel=1e-5)  # truncated at 3 sigma, normalised per axis


def test_gamma_contrast_by_hand():
    x = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 1, 4)
    out = gamma_contrast(x, torch.tensor([2.0]), eps=0.0)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.125, 0.5, 2.0]))  # 2 * (x / 2) ** 2


def test_reproducible_per_seed_and_random_across_seeds():
    batch = _batch(size=(20, 20, 20))
    aug = BatchRandAugment([16, 16, 16], rotate_prob=1, scale_prob=1, elastic_prob=1, noise_prob=1)
    aug.set_random_state(3)
    a = aug(batch)
    aug.set_random_state(3)
    b = aug(batch)
    aug.set_random_state(4)
    c = aug(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="scale_range"):
        BatchRandAugment([8, 8, 8], scale_range=1.5)
    with pytest.raises(ValueError, match="gamma_prob"):
        BatchRandAugment([8, 8, 8], gamma_prob=2)
    with pytest.raises(ValueError, match="sigma_range"):
        BatchRandAugment([8, 8, 8], sigma_range=(8, 5))
    with pytest.raises(ValueError, match=r"no key\(s\) \['tube'\]"):
        BatchRandAugment([8, 8, 8], **OFF)({k: v for k, v in _batch().items() if k != "tube"})
