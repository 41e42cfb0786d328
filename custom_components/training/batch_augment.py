"""Batched spatial and intensity augmentation on the device, with no host round trip: the default
``prepare_batch`` of ``train.json``.

MONAI's ``Rand3DElasticd`` / ``RandGaussianNoised`` / ``RandAdjustContrastd`` run on CUDA tensors, but
they draw their random fields with numpy on the host (a 3 x 144^3 elastic offset field is 25 MB per
sample), copy them to the device with a blocking copy and, for the contrast, read ``float(range)``
back: each is a host-device synchronisation, and the loop runs sample by sample. Here every random
number comes from a ``torch.Generator`` on the device and the whole batch goes through one
``grid_sample`` per interpolation mode.

Spatial (one fused resample per sample, as ``Rand3DElasticd`` with ``rotate_range`` / ``scale_range``):
an output voxel at offset x from the patch centre (voxels, (z, y, x)) reads the input at

    c_in + A x + d(x),      A = R_z(a_0) R_y(a_1) R_x(a_2) · diag(1 / s) · diag(f)

with rotation angles a_i ~ U(-rotate_range_i, rotate_range_i) (probability ``rotate_prob``, else 0),
scales s_i ~ U(1 - scale_range_i, 1 + scale_range_i) (probability ``scale_prob``, else 1), mirror signs
f_i = -1 with probability ``flip_prob`` per axis, and the elastic displacement d (probability
``elastic_prob``, else 0) = magnitude · G_sigma * U(-1, 1)^3: uniform noise smoothed by a Gaussian of
``sigma`` (truncated at 3 sigma), magnitude ~ U(``magnitude_range``), sigma ~ U(``sigma_range``), as
MONAI's ``Rand3DElastic`` (Simard et al. 2003) draws it. The input holds the patch plus ``margin`` per
side, so a rotation mostly reads real data. Image and signed distance map are interpolated
trilinearly (border padding); label and tube by nearest neighbour, and a label voxel read from outside
the input becomes 2 (ignored), never background.

Intensity, on the image only, each per sample with its own probability (nnU-Net's defaults in
train.json): multiply by U(1 - scale, 1 + scale); add U(-shift, shift); gamma on the sample's own range,
``min + range · ((x - min) / range) ** gamma`` with gamma ~ U(gamma_range); add N(0, sigma^2) with
sigma ~ U(0, noise_std).

``set_random_state(seed)`` reseeds the generator (``EpochSeedHandler`` calls it per epoch), so a run
resumed at an epoch boundary draws the same augmentation. The same seed gives the same batch on the
same device type (CPU and CUDA generators are different streams).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchRandAugment", "rotation_scale_flip", "gaussian_smooth", "sampling_grid", "gamma_contrast"]


def _triple(value, name: str) -> list[float]:
    v = [float(value)] * 3 if isinstance(value, (int, float)) else [float(x) for x in value]
    if len(v) != 3 or any(x < 0 for x in v):
        raise ValueError(f"{name} must be a number or 3 numbers >= 0 (z, y, x), got {value!r}.")
    return v


def _pair(value, name: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in value)
    if not lo <= hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}.")
    return lo, hi


def rotation_scale_flip(angles: torch.Tensor, scales: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) matrices ``R_z(a_0) R_y(a_1) R_x(a_2) diag(1 / s) diag(f)`` in (z, y, x) coordinates.

    ``angles`` (B, 3) radians about the z, y and x axes; ``scales`` (B, 3) zoom factors (> 1 enlarges the
    content); ``flips`` (B, 3) of +1 / -1.
    """
    if angles.shape != scales.shape or angles.shape != flips.shape or angles.shape[-1] != 3:
        raise ValueError(f"angles {tuple(angles.shape)}, scales {tuple(scales.shape)}, flips {tuple(flips.shape)}: "
                         "each must be (B, 3).")
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    # rotation about z mixes (y, x); about y mixes (z, x); about x mixes (z, y)
    rz = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rx = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx @ torch.diag_embed(flips / scales)


def gaussian_smooth(field: torch.Tensor, sigma: torch.Tensor, radius: int, truncated: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``field`` (B, C, Z, Y, X), one ``sigma`` per sample (B,), zero padding.

    Each sample's kernel is cut at ``truncated * sigma`` (within ``radius``, a host number so that no
    device value is read) and normalised to sum 1, as MONAI's ``GaussianFilter``.
    """
    b, ch = field.shape[:2]
    x = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    k = torch.exp(-0.5 * (x[None] / sigma[:, None].to(field.dtype)) ** 2)
    k = k * (x[None].abs() <= truncated * sigma[:, None])
    k = k / k.sum(dim=1, keepdim=True)  # (B, 2 radius + 1)
    out = field.reshape(1, b * ch, *field.shape[2:])
    weight = k.repeat_interleave(ch, dim=0)
    for axis in range(3):
        shape = [b * ch, 1, 1, 1, 1]
        shape[2 + axis] = weight.shape[1]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad), weight.reshape(shape), groups=b * ch)
    return out.reshape(field.shape)


def _scale_columns(t: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``t[:, i] * factors[i]`` with host numbers (building a tensor of them on a GPU would be a blocking copy)."""
    return torch.stack([t[:, i] * float(f) for i, f in enumerate(factors)], dim=1)


def sampling_grid(matrices: torch.Tensor, displacement: torch.Tensor | None, in_shape: Sequence[int],
                  out_shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid (B, *out_shape, 3) reading the input at ``c_in + A x + d(x)``.

    ``matrices`` (B, 3, 3) in (z, y, x); ``displacement`` (B, 3, *out_shape) voxels in (z, y, x) or None;
    x is the output voxel's offset from the output centre. Coordinates are normalised with
    ``align_corners=True`` (-1 and 1 are the centres of the first and last voxel).
    """
    dev, dt = matrices.device, matrices.dtype
    axes = [torch.arange(n, device=dev, dtype=dt) - (n - 1) / 2 for n in out_shape]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, *out)
    coords = torch.einsum("bij,j...->bi...", matrices, offsets)
    if displacement is not None:
        coords = coords + displacement
    normalised = _scale_columns(coords, [1 / max((n - 1) / 2, 0.5) for n in in_shape])  # input centre is 0
    return normalised.flip(1).permute(0, 2, 3, 4, 1)  # grid_sample wants (x, y, z) last


def gamma_contrast(image: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``min + range * ((x - min) / (range + eps)) ** gamma`` per sample (min and range over the sample)."""
    dims = tuple(range(1, image.dim()))
    lo = image.amin(dim=dims, keepdim=True)
    rng = image.amax(dim=dims, keepdim=True) - lo
    g = gamma.view(-1, *([1] * (image.dim() - 1)))
    return lo + rng * ((image - lo) / (rng + eps)).clamp(min=0) ** g


class BatchRandAugment:
    """``prepare_batch`` of the trainer: host batch -> augmented ``(image (B,1,*P), label (B,3,*P))`` on ``device``.

    Args:
        patch_size: output (Z, Y, X); the input batch is ``patch_size + 2 * margin``.
        rotate_range, rotate_prob: radians per axis (z, y, x) and the probability of a rotation.
        scale_range, scale_prob: relative zoom per axis and its probability.
        flip_prob: probability of mirroring, per axis.
        elastic_prob, sigma_range, magnitude_range: the elastic deformation (MONAI's parameters).
        intensity_scale, intensity_scale_prob / intensity_shift, intensity_shift_prob / gamma_range,
            gamma_prob / noise_std, noise_prob: the intensity steps of the module docstring.
        image_scale: multiplies the uint8 image (1/255 maps it to [0, 1]).
    """

    keys = ("image", "label", "sdm", "tube")

    def __init__(self, patch_size: Sequence[int], rotate_range=0.5236, rotate_prob: float = 0.2, scale_range=0.15,
                 scale_prob: float = 0.2, flip_prob: float = 0.5, elastic_prob: float = 0.2,
                 sigma_range=(5.0, 8.0), magnitude_range=(50.0, 150.0), intensity_scale: float = 0.25,
                 intensity_scale_prob: float = 0.15, intensity_shift: float = 0.1, intensity_shift_prob: float = 0.15,
                 gamma_range=(0.7, 1.5), gamma_prob: float = 0.3, noise_std: float = 0.05, noise_prob: float = 0.15,
                 image_scale: float = 1 / 255, seed: int = 0):
        self.patch_size = [int(p) for p in patch_size]
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes (Z, Y, X), got {patch_size!r}.")
        self.rotate_range = _triple(rotate_range, "rotate_range")
        self.scale_range = _triple(scale_range, "scale_range")
        if max(self.scale_range) >= 1:
            raise ValueError(f"scale_range must be < 1 per axis (zoom 1 +- range), got {scale_range!r}.")
        self.sigma_range = _pair(sigma_range, "sigma_range")
        self.magnitude_range = _pair(magnitude_range, "magnitude_range")
        self.gamma_range = _pair(gamma_range, "gamma_range")
        self.probs = {"rotate": rotate_prob, "scale": scale_prob, "flip": flip_prob, "elastic": elastic_prob,
                      "intensity_scale": intensity_scale_prob, "intensity_shift": intensity_shift_prob,
                      "gamma": gamma_prob, "noise": noise_prob}
        for name, p in self.probs.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name}_prob must be in [0, 1], got {p}.")
        self.intensity_scale, self.intensity_shift, self.noise_std = float(intensity_scale), float(intensity_shift), float(noise_std)
        self.image_scale = float(image_scale)
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.last_seconds = 0.0

    def set_random_state(self, seed: int) -> None:
        """Reseed (every device's generator) with ``seed``."""
        self.seed = int(seed) % (2**63)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _uniform(self, g, shape, lo, hi, device) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)

    def _happens(self, g, name: str, b: int, device) -> torch.Tensor:
        return torch.rand(b, generator=g, device=device) < float(self.probs[name])

    def spatial_grid(self, b: int, in_shape, device) -> torch.Tensor:
        """The (B, *patch, 3) sampling grid of one batch (random draws in a fixed order)."""
        g = self._generator(device)
        angles = _scale_columns(self._uniform(g, (b, 3), -1.0, 1.0, device), self.rotate_range)
        angles = angles * self._happens(g, "rotate", b, device)[:, None]
        zooms = _scale_columns(self._uniform(g, (b, 3), -1.0, 1.0, device), self.scale_range)
        scales = 1 + zooms * self._happens(g, "scale", b, device)[:, None]
        flips = 1 - 2 * (torch.rand((b, 3), generator=g, device=device) < float(self.probs["flip"])).float()
        matrices = rotation_scale_flip(angles, scales, flips)
        displacement = None
        if self.probs["elastic"] > 0:
            on = self._happens(g, "elastic", b, device).float()
            magnitude = self._uniform(g, (b,), *self.magnitude_range, device) * on
            sigma = self._uniform(g, (b,), *self.sigma_range, device)
            noise = self._uniform(g, (b, 3, *self.patch_size), -1.0, 1.0, device)
            radius = max(1, math.ceil(3.0 * self.sigma_range[1]))
            displacement = gaussian_smooth(noise, sigma, radius) * magnitude.view(b, 1, 1, 1, 1)
        return sampling_grid(matrices, displacement, in_shape, self.patch_size)

    def intensity(self, image: torch.Tensor) -> torch.Tensor:
        """The four intensity steps of the module docstring, each per sample with its probability."""
        g, dev, b = self._generator(image.device), image.device, image.shape[0]
        view = (b, 1, 1, 1, 1)
        factor = 1 + self._uniform(g, (b,), -self.intensity_scale, self.intensity_scale, dev)
        image = image * torch.where(self._happens(g, "intensity_scale", b, dev), factor, 1.0).view(view)
        shift = self._uniform(g, (b,), -self.intensity_shift, self.intensity_shift, dev)
        image = image + torch.where(self._happens(g, "intensity_shift", b, dev), shift, 0.0).view(view)
        gamma = self._uniform(g, (b,), *self.gamma_range, dev)
        image = torch.where(self._happens(g, "gamma", b, dev).view(view), gamma_contrast(image, gamma), image)
        std = self._uniform(g, (b,), 0.0, self.noise_std, dev) * self._happens(g, "noise", b, dev)
        return image + torch.randn(image.shape, generator=g, device=dev) * std.view(view)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        start = time.perf_counter()
        device = torch.device(device) if device is not None else torch.device("cpu")
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise ValueError(f"batch has no key(s) {missing} (keys: {sorted(batchdata)}).")
        moved = {k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking).float() for k in self.keys}
        image = moved["image"] * self.image_scale
        b, in_shape = image.shape[0], list(image.shape[2:])
        grid = self.spatial_grid(b, in_shape, device)
        smooth = F.grid_sample(torch.cat([image, moved["sdm"]], 1), grid, mode="bilinear", padding_mode="border",
                               align_corners=True)
        # +1 so that zero padding marks voxels read from outside the input; those become label 2
        discrete = F.grid_sample(torch.cat([moved["label"] + 1, moved["tube"]], 1), grid, mode="nearest",
                                 padding_mode="zeros", align_corners=True)
        label = torch.where(discrete[:, :1] == 0, 2.0, discrete[:, :1] - 1)
        image = self.intensity(smooth[:, :1])
        self.last_seconds = time.perf_counter() - start
        return image, torch.cat([label, smooth[:, 1:2], discrete[:, 1:2]], 1)
