"""The whole volume's sliding-window grid, cut into blocks that are each predicted exactly.

MONAI's ``sliding_window_inference`` (what ``inference.json`` runs, once per ensemble member at the
member's own window size) places windows of ``roi`` on a grid of the whole volume and blends their logits
with a Gaussian importance map ``w``; the members' blended logits are fused with their weights and the
sigmoid is taken once:

    z_n(v) = sum_k w_k(v) z_nk(v) / sum_k w_k(v)     (k over member n's windows that contain voxel v)
    p(v)   = sigmoid(sum_n a_n z_n(v))

Per axis of size ``n`` (after padding, ``n' = max(n, roi)``): the interval is ``roi`` where ``roi == n'``,
else ``max(1, int(roi * (1 - overlap)))``; the starts are ``i * interval`` for ``i = 0..m`` with ``m`` the
first index whose window reaches the end, and a start that overshoots is pulled back to ``n' - roi``
(the last window "snaps" to the end). An axis shorter than ``roi`` is zero-padded, ``(roi - n) // 2``
before and the rest after (``F.pad`` with 0 after intensity scaling), and the output cropped back.

A block (any box of the volume) is exact by construction: it runs every window of that grid that
overlaps it, in the grid's order, and sums ``w p`` and ``w`` over its own voxels only, so each voxel
gets the same windows, weights and summation order as in the whole-volume run (float32 throughout, so on
the same device the fused logits are bit for bit those of the whole-volume run; the sigmoid after them can
differ by one unit in the last place, see ``predict_box``). The result depends on
neither the block size nor the number of workers; the price is that a window overlapping several
blocks runs once for each (``redundancy``: windows run / windows of the grid).

``window_starts`` / ``scan_interval`` reproduce MONAI's ``dense_patch_slices`` / ``_get_scan_interval``
per axis (tests compare them with MONAI's); ``predict_box`` computes p over a box from a reader of the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["scan_interval", "window_starts", "axis_padding", "WindowGrid", "Box", "box_shape", "grow_box", "clip_box",
           "block_boxes", "importance_map", "predict_box", "intensity_scale", "Member", "fused_logits"]

#: (start, stop) per axis (Z, Y, X)
Box = tuple[tuple[int, int], ...]


def scan_interval(size: int, roi: int, overlap: float) -> int:
    """MONAI's interval on an axis of (padded) ``size``: ``roi`` where ``roi == size``, else
    ``max(1, int(roi * (1 - overlap)))``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}.")
    if roi == size:
        return int(roi)
    return max(1, int(roi * (1 - overlap)))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts on one axis of (padded) ``size >= roi``, as ``dense_patch_slices`` places them: every
    ``interval`` up to the first window that reaches the end, that one pulled back to ``size - roi``."""
    if size < roi:
        raise ValueError(f"window_starts: axis of {size} voxels is shorter than the window {roi}; pad it first.")
    step = scan_interval(size, roi, overlap)
    count = next((d for d in range(math.ceil(size / step)) if d * step + roi >= size), 0) + 1
    return [i * step - max(i * step + roi - size, 0) for i in range(count)]


def axis_padding(size: int, roi: int) -> tuple[int, int]:
    """Zero padding (before, after) of an axis shorter than ``roi``: ``(roi - size) // 2`` before, the rest after."""
    diff = max(roi - size, 0)
    return diff // 2, diff - diff // 2


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def grow_box(box: Box, margin: int, shape: Sequence[int]) -> Box:
    """``box`` widened by ``margin`` voxels on every side, clipped to ``[0, shape)``."""
    return tuple((max(0, a - margin), min(n, b + margin)) for (a, b), n in zip(box, shape))


def clip_box(box: Box, shape: Sequence[int]) -> Box:
    return tuple((max(0, a), min(n, b)) for (a, b), n in zip(box, shape))


def block_boxes(shape: Sequence[int], block: Sequence[int], region: Box | None = None) -> list[tuple[tuple[int, ...], Box]]:
    """``[(block index, box)]`` of the blocks of a grid anchored at 0 with edge ``block`` that meet ``region``
    (default: the whole volume); boxes are clipped to the volume, so the last block of an axis may be shorter."""
    region = region or tuple((0, n) for n in shape)
    ranges = [range(a // b, -(-e // b)) for (a, e), b in zip(region, block)]
    out = []
    for idx in np.ndindex(*[len(r) for r in ranges]):
        index = tuple(r[i] for r, i in zip(ranges, idx))
        out.append((index, tuple((i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block, shape))))
    return out


@dataclass(frozen=True)
class WindowGrid:
    """The sliding-window grid of a whole volume of ``shape`` (Z, Y, X) for windows ``roi`` at ``overlap``.

    ``padded``: the shape after MONAI's zero padding of axes shorter than ``roi``; ``pad``: voxels added
    before each axis; ``starts``: window starts per axis in padded coordinates (the grid is their product,
    Z slowest, as MONAI enumerates it)."""

    shape: tuple[int, int, int]
    roi: tuple[int, int, int]
    overlap: float

    @property
    def pad(self) -> tuple[int, ...]:
        return tuple(axis_padding(n, r)[0] for n, r in zip(self.shape, self.roi))

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(max(n, r) for n, r in zip(self.shape, self.roi))

    @property
    def starts(self) -> tuple[list[int], ...]:
        return tuple(window_starts(n, r, self.overlap) for n, r in zip(self.padded, self.roi))

    def n_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def windows_for(self, box: Box) -> tuple[list[int], ...]:
        """Per axis, the starts (padded coordinates) of the windows that overlap ``box`` (volume coordinates)."""
        out = []
        for (a, b), p, r, starts in zip(box, self.pad, self.roi, self.starts):
            out.append([s for s in starts if s < b + p and s + r > a + p])
        return tuple(out)

    def context_for(self, box: Box) -> Box:
        """The union of the windows overlapping ``box``, in padded coordinates."""
        return tuple((w[0], w[-1] + r) for w, r in zip(self.windows_for(box), self.roi))


def importance_map(roi: Sequence[int], device="cpu") -> torch.Tensor:
    """MONAI's Gaussian importance map of ``SlidingWindowInferer(mode="gaussian")`` (sigma_scale 0.125), float32."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(int(r) for r in roi), mode="gaussian", sigma_scale=0.125, device=device,
                                  dtype=torch.float32)


def intensity_scale(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``ScaleIntensityRange(a_min=low, a_max=high, b_min=0, b_max=1, clip=True)`` on float32, as inference.json
    applies it (for uint8 with (0, 255): ``x / 255`` exactly)."""
    x = x.to(torch.float32)
    x = (x - low) / (high - low)
    x = x * (1.0 - 0.0) + 0.0
    return torch.clamp(x, 0.0, 1.0)


@dataclass
class Member:
    """One network of an ensemble on its own grid: ``logits`` maps (B, 1, *roi) scaled input to (B, 1, *roi)
    logits (``LogitEnsemble.member_logits``), ``weight`` is its normalised ensemble weight."""

    grid: WindowGrid
    logits: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    importance: torch.Tensor | None = None


def _union(boxes: Sequence[Box]) -> Box:
    return tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3))


def _blend(member: Member, box: Box, raw: torch.Tensor, raw_box: Box, intensity, sw_batch_size: int, device) -> tuple[torch.Tensor, int]:
    """sum_k w z_k / sum_k w over ``box`` for one member (MONAI's arithmetic and window order)."""
    grid = member.grid
    w = (importance_map(grid.roi, device) if member.importance is None else member.importance).to(device)
    starts = grid.windows_for(box)
    ctx = grid.context_for(box)  # padded coordinates
    if any(grid.pad):  # MONAI pads the scaled image with 0: scale, then pad
        context = torch.zeros(box_shape(ctx), dtype=torch.float32, device=device)
        inner = clip_box(tuple((a - p, b - p) for (a, b), p in zip(ctx, grid.pad)), grid.shape)
        src = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(inner, raw_box))
        dst = tuple(slice(a + p - c0, b + p - c0) for (a, b), p, (c0, _) in zip(inner, grid.pad, ctx))
        context[dst] = intensity_scale(raw[src], *intensity)
        origin_ctx, prescaled = tuple(c0 for c0, _ in ctx), True
    else:
        context, origin_ctx, prescaled = raw, tuple(r0 for r0, _ in raw_box), False
    out_shape = box_shape(box)
    acc = torch.zeros(out_shape, dtype=torch.float32, device=device)
    cnt = torch.zeros(out_shape, dtype=torch.float32, device=device)
    origin = tuple(a + p for (a, _), p in zip(box, grid.pad))  # the box's start in padded coordinates
    windows = [tuple(s) for s in np.array(np.meshgrid(*starts, indexing="ij")).reshape(3, -1).T.tolist()]
    for i in range(0, len(windows), sw_batch_size):
        batch = windows[i:i + sw_batch_size]
        x = torch.stack([context[tuple(slice(s - c0, s - c0 + r) for s, c0, r in zip(win, origin_ctx, grid.roi))]
                         for win in batch])[:, None]
        if not prescaled:
            x = intensity_scale(x, *intensity)
        z = member.logits(x).float()
        for win, zw in zip(batch, z):
            zw = zw[0] * w
            src, dst = [], []
            for s, o, n, r in zip(win, origin, out_shape, grid.roi):
                lo, hi = max(s, o), min(s + r, o + n)
                src.append(slice(lo - s, hi - s))
                dst.append(slice(lo - o, hi - o))
            acc[tuple(dst)] += zw[tuple(src)]
            cnt[tuple(dst)] += w[tuple(src)]
    return acc / cnt, len(windows)


@torch.no_grad()
def fused_logits(
    members: Sequence[Member],
    box: Box,
    read: Callable[[Box], np.ndarray],
    intensity: tuple[float, float] = (0.0, 255.0),
    sw_batch_size: int = 4,
    device="cpu",
) -> tuple[torch.Tensor, int]:
    """The fused logit ``sum_n a_n z_n`` of every voxel of ``box`` (volume coordinates), float32 (Z, Y, X) on
    ``device``, and the number of windows run (``EnsembleSlidingWindowInferer``'s output, bit for bit).

    ``read(box)``: the raw input of a box of the volume (any dtype; never outside the volume), called once
    with the union of every member's windows (the context), kept in its own dtype on ``device`` and scaled
    per window batch; where the volume is shorter than a window it is zero-padded after scaling, as MONAI does.
    """
    device = torch.device(device)
    raw_box = _union([clip_box(tuple((a - p, b - p) for (a, b), p in zip(m.grid.context_for(box), m.grid.pad)),
                               m.grid.shape) for m in members])
    raw = np.ascontiguousarray(read(raw_box))
    if raw.dtype.kind == "u" and raw.dtype.itemsize > 1:  # torch's unsigned types beyond uint8 lack arithmetic
        raw = raw.astype(np.int32 if raw.dtype.itemsize == 2 else np.int64)
    raw = torch.from_numpy(raw).to(device)
    fused, n_windows = None, 0
    for m in members:
        z, n = _blend(m, box, raw, raw_box, intensity, sw_batch_size, device)
        fused = m.weight * z if fused is None else fused + m.weight * z
        n_windows += n
    return fused, n_windows


@torch.no_grad()
def predict_box(
    members: Sequence[Member],
    box: Box,
    read: Callable[[Box], np.ndarray],
    intensity: tuple[float, float] = (0.0, 255.0),
    sw_batch_size: int = 4,
    device="cpu",
) -> tuple[np.ndarray, int]:
    """``sigmoid(fused_logits(...))`` as float32 numpy (Z, Y, X), and the number of windows run
    (``inference.json``'s ``EnsembleSlidingWindowInferer`` then ``Activationsd(sigmoid)``).

    The logits are bit for bit the whole-volume run's; the sigmoid can differ from it by one unit in the last
    place (2^-24 near 0.5), since PyTorch computes ``exp`` in vector lanes and in a scalar tail, and which voxel
    takes which path depends on the array's shape."""
    fused, n_windows = fused_logits(members, box, read, intensity, sw_batch_size, device)
    return torch.sigmoid(fused).cpu().numpy(), n_windows
