"""Synthetic scrolls in the exact Kaggle competition layout: the built-in data of the demo, tests and benchmarks.

A volume is a piece of a wound scroll seen by CT. The papyrus sheets are concentric shells around an
axis that lies outside the volume (direction near one volume axis, mostly Z as in the real crops,
slightly tilted), with smooth random undulation:

    psi(p) = rho(p) + U_tan(p) + U_rad(p)

``rho`` is the distance of voxel ``p`` from the scroll axis, ``U_tan`` a sum of waves along the sheets
(they bend together), ``U_rad`` waves with a radial component (the spacing between sheets varies).
Sheet ``k`` is the band ``s_k <= psi < s_k + t_k`` (``t_k`` thickness, random per sheet; gaps random,
>= 3, so that sheets touch only where made to). The gradient of the waves is bounded so that the
level sets never fold. On top of that, as in real data:

- contacts: "bridges" of papyrus fill the gap between two neighbouring sheets in places (at least one
  per volume, inside the labelled part), so the sheets' bodies form fewer 26-connected components
  than there are sheets;
- holes (ragged discs) and tears (long thin slits) cut out of sheets (at least one interior hole);
- papyrus structure: the recto half of a sheet has fibres along the winding (horizontal fibres), the
  verso half fibres along the scroll axis (vertical fibres); bright debris; per-sheet density;
- CT: Gaussian blur, signal-dependent noise, slow multiplicative and additive intensity drift.

Labels (uint8): 1 = the recto surface layer of each sheet, the face that looks *towards* the scroll
axis (papyrus is rolled with the writing inside): the sheet voxels with a 6-neighbour below the sheet's
inner face, plus those within ``recto`` of it, about 1-2 voxels; never the whole body, never bridges
or holes. 2 = unlabeled: a 3-voxel border on every face, smooth random blobs where "annotation is
missing" and, sometimes, the neighbourhood of a sheet on one side of a random cut (an annotator
stopped tracing it), 20-80 % of a 64^3+ volume in all. An intensity threshold finds sheet *bodies*,
so it scores poorly against label 1.

``--profile`` picks a named "scroll" (thickness, spacing, noise, blur, contrast, damage differ), and
``scroll_id`` in ``train.csv`` follows it. Every volume draws from ``numpy.random.default_rng([seed,
index])`` only, so the same seed gives byte-identical files (on the same numpy / CPU kind).

    python -m custom_components.data.synthetic --out DIR --volumes N [--test M] [--test_labels]
        [--profile NAME] --shape Z Y X --seed S [--preview]
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import numbers
import os
from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import ndimage

__all__ = ["PROFILES", "DEFAULT_PROFILE", "BORDER", "generate_volume", "write_dataset", "dataset_ids", "main"]

BORDER = 3  # label 2 on this many voxels along every face
DEFAULT_PROFILE = "34117"
_MIN_EDGE = 16

# thickness / gap: ranges in voxels (per sheet, along the normal before undulation); recto: extra depth
# of label 1 below the inner face; contrast / air: papyrus and void intensity (0..1); noise: CT noise
# std; blur: Gaussian sigma; fibre: fibre texture amplitude (relative); drift: slow intensity drift
# amplitude; wave_tan / wave_rad: slope budgets of the along-sheet / spacing-changing undulation;
# radius: distance from the scroll axis to the nearest voxel, in largest edges; contacts / holes /
# tears: expected number per sheet (pair) per 64^2 voxels of sheet; debris: bright specks per 64^3;
# skip: probability that a sheet is partly unannotated; unlabeled: range of the label-2 fraction.
PROFILES: dict[str, dict] = {
    "34117": dict(thickness=(3.5, 5.0), gap=(3.0, 7.0), recto=1.0, contrast=0.42, air=0.16, noise=0.07,
                  blur=0.8, fibre=0.30, drift=0.15, wave_tan=0.45, wave_rad=0.20, radius=(0.5, 3.0),
                  contacts=0.25, holes=0.12, tears=0.08, debris=2.0, skip=0.10, unlabeled=(0.35, 0.60)),
    "35360": dict(thickness=(4.5, 6.0), gap=(4.0, 9.0), recto=1.2, contrast=0.32, air=0.20, noise=0.11,
                  blur=1.0, fibre=0.25, drift=0.20, wave_tan=0.40, wave_rad=0.20, radius=(0.8, 4.0),
                  contacts=0.15, holes=0.10, tears=0.06, debris=3.0, skip=0.10, unlabeled=(0.40, 0.65)),
    "26010": dict(thickness=(3.0, 4.0), gap=(3.0, 5.0), recto=0.8, contrast=0.50, air=0.14, noise=0.05,
                  blur=0.7, fibre=0.35, drift=0.12, wave_tan=0.50, wave_rad=0.25, radius=(0.3, 2.0),
                  contacts=0.40, holes=0.15, tears=0.10, debris=1.0, skip=0.05, unlabeled=(0.30, 0.55)),
    "26002": dict(thickness=(3.5, 5.5), gap=(3.0, 8.0), recto=1.0, contrast=0.38, air=0.18, noise=0.09,
                  blur=0.9, fibre=0.30, drift=0.30, wave_tan=0.45, wave_rad=0.20, radius=(0.5, 3.0),
                  contacts=0.25, holes=0.12, tears=0.08, debris=6.0, skip=0.15, unlabeled=(0.40, 0.65)),
    "44430": dict(thickness=(4.0, 5.5), gap=(3.5, 6.0), recto=1.0, contrast=0.30, air=0.18, noise=0.08,
                  blur=1.3, fibre=0.20, drift=0.15, wave_tan=0.40, wave_rad=0.15, radius=(1.0, 4.0),
                  contacts=0.20, holes=0.10, tears=0.05, debris=2.0, skip=0.10, unlabeled=(0.35, 0.60)),
    "53997": dict(thickness=(3.5, 5.0), gap=(3.0, 6.0), recto=1.0, contrast=0.38, air=0.17, noise=0.14,
                  blur=0.9, fibre=0.30, drift=0.20, wave_tan=0.50, wave_rad=0.25, radius=(0.4, 2.5),
                  contacts=0.30, holes=0.30, tears=0.20, debris=3.0, skip=0.10, unlabeled=(0.40, 0.70)),
}


# ------------------------------------------------------------------------------------------ checks


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        values = list(shape)
    except TypeError:
        raise ValueError(f"shape must be 3 ints >= {_MIN_EDGE} (Z Y X), got {shape!r}.") from None
    ok = len(values) == 3 and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) or isinstance(s, float) and s.is_integer()
        for s in values
    )
    if not ok or min(int(s) for s in values) < _MIN_EDGE:
        raise ValueError(f"shape must be 3 ints >= {_MIN_EDGE} (Z Y X), got {values!r}.")
    return tuple(int(s) for s in values)


def _check_profile(profile) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}.")
    return PROFILES[profile]


def _check_seed(seed) -> list[int]:
    values = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    if not values or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in values):
        raise ValueError(f"seed must be a non-negative int (or a sequence of them), got {seed!r}.")
    return [int(s) for s in values]


# ------------------------------------------------------------------------------------ random fields


def _smooth_field(rng: np.random.Generator, shape, cell: float) -> np.ndarray:
    """Smooth random field of unit std: random coefficients on a grid of spacing ``cell`` times a separable
    Gaussian basis (three small matrix products, cheap even at 384^3)."""
    mats = []
    for n in shape:
        centres = np.arange(-cell, n + cell, cell)
        i = np.arange(n)[:, None]
        mats.append(np.exp(-0.5 * ((i - centres[None]) / (0.6 * cell)) ** 2).astype(np.float32))
    coef = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    bz, by, bx = mats
    f = (bz @ coef.reshape(coef.shape[0], -1)).reshape(shape[0], coef.shape[1], coef.shape[2])
    f = np.matmul(by[None], f)  # (Z, Y, cx)
    f = f @ bx.T  # (Z, Y, X)
    sub = f[::4, ::4, ::4]
    return ((f - sub.mean()) / (sub.std() + 1e-6)).astype(np.float32, copy=False)


def _slices(ax: int, a, b):
    return tuple(slice(a, b) if i == ax else slice(None) for i in range(3))


def _box(centre, half, shape):
    """Slices of the box ``centre +- half`` clipped to the volume, and its origin."""
    lo = [max(0, int(np.floor(c - half))) for c in centre]
    hi = [min(n, int(np.ceil(c + half)) + 1) for c, n in zip(centre, shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.array(lo, float)


# ------------------------------------------------------------------------------------------ volume


def generate_volume(shape, seed=0, profile: str = DEFAULT_PROFILE):
    """One synthetic scroll volume: ``(image uint8, label uint8, info dict)``, arrays (Z, Y, X) of ``shape``.

    ``seed``: non-negative int or sequence of ints, fed to ``numpy.random.default_rng`` (nothing else
    is random). ``info`` holds ``n_sheets`` (sheets with voxels in the volume), ``n_holes``,
    ``n_tears``, ``n_contacts``, ``body_components`` (26-connected components of ``body``),
    ``thickness`` / ``gaps`` (per sheet, voxels), ``normal_axis`` (volume axis closest to the sheet
    normal at the centre), ``recto_side`` (-1: label 1 is on the lower-index face along that axis,
    +1 the upper), ``axis`` / ``axis_distance`` (scroll axis direction and distance from the centre),
    ``holes`` / ``contacts`` (list of dicts with ``sheet`` and ``centre``), ``profile``,
    ``label1_fraction`` / ``label2_fraction``, ``skipped_sheets``, and the arrays ``body`` (bool, papyrus incl. bridges)
    and ``sheet_id`` (uint8/uint16: 0 none, 1..n_sheets, bridges excluded).
    """
    shape = _check_shape(shape)
    prof = _check_profile(profile)
    rng = np.random.default_rng(_check_seed(seed))
    Z, Y, X = shape
    L = max(shape)
    nvox = Z * Y * X

    # ---- scroll frame: axis a, e1 points from the axis towards the volume centre, e2 = a x e1
    ax = int(rng.choice(3, p=[0.5, 0.25, 0.25]))
    a = np.zeros(3)
    a[ax] = 1.0
    tilt = rng.normal(0.0, 0.12, 3)
    tilt[ax] = 0.0
    a = a + tilt
    a /= np.linalg.norm(a)
    r = rng.standard_normal(3)
    e1 = r - (r @ a) * a
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    # the axis lies outside the volume: the innermost voxel is `radius` (in largest edges) from it
    extent = 0.5 * float(np.abs(e1) @ (np.array(shape) - 1)) + 1.0
    dist = extent + float(L * np.exp(rng.uniform(np.log(prof["radius"][0]), np.log(prof["radius"][1]))))
    coords = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape]

    def dot(vec):
        """p . vec over the volume (float32)."""
        return (
            (np.float32(vec[0]) * coords[0])[:, None, None]
            + (np.float32(vec[1]) * coords[1])[None, :, None]
            + (np.float32(vec[2]) * coords[2])[None, None, :]
        )

    q1 = dot(e1)
    q1 += np.float32(dist)
    q2 = dot(e2)
    w = dot(a)  # axial coordinate
    psi = np.sqrt(q1 * q1 + q2 * q2)  # rho
    v = q2 / q1
    np.arctan(v, out=v)
    v *= psi  # arc length along the winding (rho * theta)

    # ---- undulation: along-sheet waves (large) and spacing-changing waves (bounded radial slope)
    for budget, n_waves, dirs in ((prof["wave_tan"], 3, "tan"), (prof["wave_rad"], 2, "rad")):
        slopes = rng.dirichlet(np.ones(n_waves)) * budget
        for s in slopes:
            lam = float(rng.uniform(40, 160) if dirs == "tan" else rng.uniform(30, 100))
            k = 2 * np.pi / lam
            amp = np.float32(s / k)
            phase = np.float32(rng.uniform(0, 2 * np.pi))
            if dirs == "tan":
                ang = rng.uniform(0, 2 * np.pi)
                arg = (np.float32(k * np.cos(ang)) * q2 + np.float32(k * np.sin(ang)) * w) + phase
            else:
                d = rng.standard_normal(3)
                d /= np.linalg.norm(d)
                arg = dot(d * k) + phase
            np.sin(arg, out=arg)
            arg *= amp
            psi += arg
            del arg

    # ---- sheets as psi bands; bands look-up through a fine table (faster than searchsorted)
    pmin, pmax = float(psi.min()), float(psi.max())
    starts, thick, gaps = [], [], []
    s = pmin - rng.uniform(0, prof["thickness"][1] + prof["gap"][1])
    while s < pmax:
        t = float(rng.uniform(*prof["thickness"]))
        g = float(rng.uniform(*prof["gap"]))
        starts.append(s)
        thick.append(t)
        gaps.append(g)
        s += t + g
    starts_a = np.array(starts + [np.inf])
    thick_a = np.array(thick, np.float32)
    h = 0.5
    nb = int(np.ceil((pmax - starts[0]) / h)) + 2
    table = (np.searchsorted(starts_a, starts[0] + h * np.arange(nb), side="right") - 1).astype(np.int32)
    band = table[((psi - np.float32(starts[0])) * np.float32(1 / h)).astype(np.int32)]
    band += psi >= starts_a.astype(np.float32)[band + 1]
    depth = psi - starts_a.astype(np.float32)[band]  # psi below the band's start (>= 0)
    inside = depth < thick_a[band]
    counts = np.bincount(band[inside].ravel(), minlength=len(starts))
    visible = np.flatnonzero(counts >= 20)
    n_sheets = len(visible)
    sid_dtype = np.uint8 if n_sheets < 255 else np.uint16
    lut = np.zeros(len(starts), sid_dtype)
    lut[visible] = np.arange(1, n_sheets + 1)
    sheet_id = lut[band]
    sheet_id[~inside] = 0
    del inside
    band_of = {int(j + 1): int(b) for j, b in enumerate(visible)}  # sheet id -> band index

    # candidate voxels (for placing holes, tears, bridges): a random sample, interior first
    pool = rng.integers(0, nvox, size=8192)
    pool_zyx = np.stack(np.unravel_index(pool, shape), 1)
    pool_sid = sheet_id.ravel()[pool]

    def interior(margin):
        return np.all((pool_zyx >= margin) & (pool_zyx < np.array(shape) - margin), axis=1)

    def radial(p):
        """Outward unit normal of the shells (rho direction) at voxel p."""
        c = np.array(p, float) - np.array([(n - 1) / 2 for n in shape])
        x1, x2 = c @ e1 + dist, c @ e2
        n = x1 * e1 + x2 * e2
        return n / np.linalg.norm(n)

    # ---- holes (ragged discs) and tears (slits) in the (v, w) coordinates of a sheet
    holes = []
    clear = {}  # sheet -> (centre, distance): the deliberate hole, kept clear of other cuts

    def cut(j, p, kind):
        t = thick[band_of[j]]
        vf, wf = v[tuple(p)], w[tuple(p)]
        if kind == "hole":
            r0 = float(rng.uniform(2.5, 4.0 + min(shape) / 16))
            ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
            half = 1.5 * r0 + t + 4
        else:
            length = float(rng.uniform(6.0, min(64.0, max(8.0, min(shape) / 3))))
            width = float(rng.uniform(0.8, 1.8))
            ang = rng.uniform(0, np.pi)
            half = length + t + 4
        if j in clear and np.linalg.norm(np.array(p) - clear[j][0]) < clear[j][1] + 1.4 * (half - t - 4):
            return
        box, _ = _box(p, half, shape)
        sub = sheet_id[box]
        on = np.nonzero(sub == j)  # evaluate on the sheet's voxels only
        dv, dw = v[box][on] - vf, w[box][on] - wf
        if kind == "hole":
            alpha = np.arctan2(dw, dv)
            rad = r0 * (1 + 0.25 * np.sin(2 * alpha + ph1) + 0.15 * np.sin(3 * alpha + ph2))
            m = dv * dv + dw * dw <= rad * rad
        else:
            u1 = dv * np.cos(ang) + dw * np.sin(ang)
            u2 = -dv * np.sin(ang) + dw * np.cos(ang)
            m = (u1 / length) ** 2 + (u2 / width) ** 2 <= 1.0
        sub[tuple(c[m] for c in on)] = 0
        holes.append({"kind": kind, "sheet": int(j), "centre": [int(c) for c in p],
                      "size": round(r0 if kind == "hole" else length, 2), "voxels": int(m.sum())})

    if n_sheets:
        # one deliberate interior hole, in the sheet the interior sample hits most
        marg = BORDER + 2 + 1.5 * (4.0 + min(shape) / 16) + 2
        cand = np.flatnonzero(interior(marg) & (pool_sid > 0))
        if len(cand) == 0:
            cand = np.flatnonzero(pool_sid > 0)
        if len(cand):
            best = np.bincount(pool_sid[cand]).argmax()
            cand = cand[pool_sid[cand] == best]
            p0 = pool_zyx[rng.choice(cand)]
            cut(int(best), p0, "hole")
            r0 = holes[0]["size"]
            clear[int(best)] = (p0, np.sqrt(3) * (1.75 * r0 + 3) + 3)
        for j in range(1, n_sheets + 1):
            cand = np.flatnonzero(pool_sid == j)
            if len(cand) == 0:
                continue
            sheet_area = counts[band_of[j]] / thick[band_of[j]] / 64.0**2
            for kind in ("hole", "tear"):
                for _ in range(int(rng.poisson(prof[kind + "s"] * sheet_area))):
                    cut(j, pool_zyx[rng.choice(cand)], kind)

    # ---- contacts: papyrus bridges across the gap between sheet j and j+1 (neighbouring bands)
    bridge = np.zeros(shape, bool)
    contacts = []

    def add_bridge(j, p):
        b = band_of[j]
        t, g = thick[b], gaps[b]
        rb = float(rng.uniform(2.5, 5.0))
        n = radial(p)
        reach = 1.7 * (t + g) + 2
        box, _ = _box(np.array(p) + 0.5 * reach * n, rb + 0.5 * reach + 2, shape)
        grid = np.stack(np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in box], indexing="ij"), -1) - np.array(p)
        along = grid @ n
        perp2 = (grid * grid).sum(-1) - along * along
        pb = psi[box]
        m = (perp2 <= rb * rb) & (along >= -1) & (along <= reach)
        m &= (pb >= starts[b] + t - 0.5) & (pb <= starts[b + 1] + 0.5)
        bridge[box] |= m
        contacts.append({"sheets": [int(j), int(j + 1)], "centre": [int(c) for c in p], "voxels": int(m.sum())})

    pairs = [j for j in range(1, n_sheets) if band_of[j + 1] == band_of[j] + 1]

    def deliberate_bridge():
        marg = BORDER + 8
        for margin in (marg, BORDER + 2, 0):
            cand = np.flatnonzero(interior(margin) & np.isin(pool_sid, pairs))
            if len(cand):
                i = rng.choice(cand)
                add_bridge(int(pool_sid[i]), pool_zyx[i])
                return True
        return False

    if pairs:
        deliberate_bridge()
        for j in pairs:
            cand = np.flatnonzero(pool_sid == j)
            if len(cand):
                sheet_area = counts[band_of[j]] / thick[band_of[j]] / 64.0**2
                for _ in range(int(rng.poisson(prof["contacts"] * sheet_area))):
                    add_bridge(j, pool_zyx[rng.choice(cand)])

    body = (sheet_id > 0) | bridge
    n_comp = int(cc3d.connected_components(body, connectivity=26, return_N=True)[1])
    for _ in range(40):  # sheets cut in pieces by the volume's faces or tears: add contacts until they merge
        if n_sheets < 2 or n_comp < n_sheets or not pairs or not deliberate_bridge():
            break
        body = (sheet_id > 0) | bridge
        n_comp = int(cc3d.connected_components(body, connectivity=26, return_N=True)[1])

    # ---- label 1: recto layer = sheet voxels with a 6-neighbour below the inner face, or within `recto`
    start_of = starts_a.astype(np.float32)[band]
    low = depth < np.float32(prof["recto"])
    for axis in range(3):
        a0, a1 = _slices(axis, 1, None), _slices(axis, None, -1)
        low[a0] |= psi[a1] < start_of[a0]
        low[a1] |= psi[a0] < start_of[a1]
    del start_of
    label = ((sheet_id > 0) & low).astype(np.uint8)
    del low

    # ---- label 2: border, partly unannotated sheets, smooth blobs up to a random target fraction
    unl = np.zeros(shape, bool)
    b = BORDER
    unl[:b] = unl[-b:] = True
    unl[:, :b] = unl[:, -b:] = True
    unl[:, :, :b] = unl[:, :, -b:] = True
    skipped = []
    for j in range(1, n_sheets + 1):
        if rng.random() < prof["skip"]:
            k = band_of[j]
            lo_ = starts[k] - (gaps[k - 1] / 2 if k > 0 else 1.0)
            hi_ = starts[k] + thick[k] + gaps[k] / 2
            ang = rng.uniform(0, 2 * np.pi)
            cutv = rng.uniform(-0.3, 0.3) * L
            unl |= (psi >= lo_) & (psi < hi_) & ((np.float32(np.cos(ang)) * v + np.float32(np.sin(ang)) * w) > cutv)
            skipped.append(j)
    target = float(rng.uniform(*prof["unlabeled"]))
    f0 = float(unl.mean())
    field = _smooth_field(rng, shape, cell=max(12.0, L / 5))
    if target > f0:
        extra = (target - f0) / (1 - f0)
        sub_f, sub_u = field[::2, ::2, ::2], unl[::2, ::2, ::2]
        vals = sub_f[~sub_u]
        if vals.size:
            thr = np.float32(np.quantile(vals, 1 - extra))
            unl |= field > thr
    del field
    label[unl] = 2
    del unl

    # ---- image: papyrus with fibre texture, debris, drift, blur, noise
    img = np.full(shape, prof["air"], np.float32)
    bi = np.flatnonzero(body)
    sid_b = sheet_id.ravel()[bi].astype(np.int64)
    vmin, wmin = float(v.min()), float(w.min())
    pad = 64
    nv, nw = int(np.ceil(v.max() - vmin)) + 2 + pad, int(np.ceil(w.max() - wmin)) + 2 + pad
    fib_rec = ndimage.gaussian_filter(rng.standard_normal((nv, nw)).astype(np.float32), (6.0, 0.7), mode="wrap")
    fib_ver = ndimage.gaussian_filter(rng.standard_normal((nv, nw)).astype(np.float32), (0.7, 6.0), mode="wrap")
    fib_rec /= fib_rec.std() + 1e-6
    fib_ver /= fib_ver.std() + 1e-6
    off = rng.integers(0, pad, size=(n_sheets + 1, 2))
    vi = (v.ravel()[bi] - np.float32(vmin)).astype(np.int64) + off[sid_b, 0]
    wi = (w.ravel()[bi] - np.float32(wmin)).astype(np.int64) + off[sid_b, 1]
    del v, w
    half_t = np.concatenate([[0.0], thick_a[visible] / 2]).astype(np.float32)
    is_rec = (sid_b > 0) & (depth.ravel()[bi] < half_t[sid_b])
    tex = np.where(is_rec, fib_rec[vi, wi], fib_ver[vi, wi])
    del vi, wi, is_rec
    dens = np.concatenate([[0.95], rng.uniform(0.8, 1.2, n_sheets)]).astype(np.float32)
    img.ravel()[bi] += np.float32(prof["contrast"]) * dens[sid_b] * (1 + np.float32(prof["fibre"]) * tex)
    del bi, sid_b, tex, depth, band, psi
    for _ in range(int(rng.poisson(prof["debris"] * nvox / 64.0**3))):
        p = rng.uniform(0, 1, 3) * np.array(shape)
        rad = float(rng.uniform(0.7, 2.0))
        box, _ = _box(p, rad + 1, shape)
        grid = np.stack(np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in box], indexing="ij"), -1) - p
        img[box] += np.float32(prof["contrast"] * rng.uniform(0.8, 1.6)) * ((grid * grid).sum(-1) <= rad * rad)
    dvec = rng.standard_normal(3)
    dvec /= np.linalg.norm(dvec)
    ramp = dot(dvec / (0.5 * L))  # about -1..1
    low_freq = _smooth_field(rng, shape, cell=max(16.0, L / 3))
    img *= 1 + np.float32(prof["drift"]) * (ramp + 0.5 * low_freq)
    dvec = rng.standard_normal(3)
    ramp = dot(dvec / np.linalg.norm(dvec) / (0.5 * L))
    img += np.float32(0.5 * prof["drift"] * prof["air"]) * ramp
    del ramp, low_freq
    img = ndimage.gaussian_filter(img, sigma=prof["blur"], truncate=3.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(prof["noise"]) * (0.7 + 0.6 * img)
    img += noise
    del noise
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    image = img.astype(np.uint8)
    del img

    centre_normal = e1  # outward shell normal at the volume centre; recto faces -e1
    normal_axis = int(np.argmax(np.abs(centre_normal)))
    info = {
        "profile": profile,
        "n_sheets": n_sheets,
        "n_holes": sum(h["kind"] == "hole" for h in holes),
        "n_tears": sum(h["kind"] == "tear" for h in holes),
        "n_contacts": len(contacts),
        "body_components": n_comp,
        "thickness": [round(thick[band_of[j]], 3) for j in range(1, n_sheets + 1)],
        "gaps": [round(gaps[band_of[j]], 3) for j in range(1, n_sheets + 1)],
        "normal_axis": normal_axis,
        "recto_side": int(-np.sign(centre_normal[normal_axis])),
        "axis": [round(float(c), 4) for c in a],
        "axis_distance": round(dist, 2),
        "holes": holes,
        "contacts": contacts,
        "skipped_sheets": skipped,
        "label1_fraction": float((label == 1).mean()),
        "label2_fraction": float((label == 2).mean()),
        "body": body,
        "sheet_id": sheet_id,
    }
    return image, label, info


# --------------------------------------------------------------------------------------- writing


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_tiff(path: str, array: np.ndarray) -> None:
    import tifffile

    _atomic_write(path, lambda f: tifffile.imwrite(f, array, compression="lzw", photometric="minisblack", metadata=None))


def _write_preview(path: str, image: np.ndarray, label: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    overlay = ListedColormap([(1.0, 0.1, 0.1, 0.75), (0.2, 0.5, 1.0, 0.30)])
    for axis, axp in zip(range(3), axes):
        idx = image.shape[axis] // 2
        axp.imshow(np.take(image, idx, axis=axis), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        lab = np.take(label, idx, axis=axis)
        axp.imshow(np.ma.masked_where(lab == 0, lab), cmap=overlay, vmin=1, vmax=2, interpolation="nearest")
        axp.set_title(f"{'ZYX'[axis]} = {idx}")
        axp.axis("off")
    fig.suptitle(f"{title}   red: label 1 (recto surface), blue: label 2 (unlabeled)")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    _atomic_write(path, lambda f: f.write(buf.getvalue()))


def dataset_ids(seed: int, profile: str, n: int) -> list[str]:
    """The ``n`` ids of a dataset (training first, then test): consecutive integers from a base drawn
    from ``default_rng([seed, profile])``, so they are unique within a dataset and differ between seeds."""
    base = int(np.random.default_rng([*_check_seed(seed), int(profile)]).integers(10**8, 2 * 10**9))
    return [str(base + i) for i in range(n)]


def write_dataset(out, volumes: int, test: int = 1, test_labels: bool = False, profile: str = DEFAULT_PROFILE,
                  shape=(128, 128, 128), seed: int = 0, preview: bool = False) -> list[str]:
    """Write ``volumes`` training and ``test`` test volumes in the Kaggle layout under ``out``.

    Files: ``train.csv`` (``id,scroll_id``), ``train_images/<id>.tif``, ``train_labels/<id>.tif``,
    ``test_images/<id>.tif``, with ``test_labels`` also ``test_labels/<id>.tif``, with ``preview``
    ``previews/<id>.png``. Volume ``i`` (training then test) comes from ``generate_volume(shape,
    (seed, i), profile)``. Returns the training ids, in ``train.csv`` order.
    """
    shape = _check_shape(shape)
    _check_profile(profile)
    _check_seed(seed)
    if isinstance(volumes, bool) or not isinstance(volumes, numbers.Integral) or volumes < 1:
        raise ValueError(f"volumes must be an int >= 1, got {volumes!r}.")
    if isinstance(test, bool) or not isinstance(test, numbers.Integral) or test < 0:
        raise ValueError(f"test must be an int >= 0, got {test!r}.")
    out = os.fspath(out)
    dirs = ["train_images", "train_labels", "test_images"] + (["test_labels"] if test_labels else [])
    dirs += ["previews"] if preview else []
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    ids = dataset_ids(seed, profile, int(volumes) + int(test))
    for i, vid in enumerate(ids):
        image, label, _ = generate_volume(shape, (int(seed), i), profile)
        split = "train" if i < volumes else "test"
        _write_tiff(os.path.join(out, f"{split}_images", f"{vid}.tif"), image)
        if split == "train" or test_labels:
            _write_tiff(os.path.join(out, f"{split}_labels", f"{vid}.tif"), label)
        if preview:
            _write_preview(os.path.join(out, "previews", f"{vid}.png"), image, label, f"{split} {vid} (scroll {profile})")
    train_ids = ids[: int(volumes)]
    text = _io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["id", "scroll_id"])
    w.writerows([vid, profile] for vid in train_ids)
    _atomic_write(os.path.join(out, "train.csv"), lambda f: f.write(text.getvalue().encode()))
    return train_ids


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m custom_components.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (Kaggle layout)")
    p.add_argument("--volumes", type=int, required=True, help="training volumes (>= 1)")
    p.add_argument("--test", type=int, default=1, help="test volumes (default 1)")
    p.add_argument("--test_labels", action="store_true", help="also write test_labels/")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"scroll profile: {', '.join(PROFILES)} (default {DEFAULT_PROFILE})")
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--preview", action="store_true", help="write previews/<id>.png (three mid slices)")
    a = p.parse_args(argv)
    try:
        ids = write_dataset(a.out, a.volumes, a.test, a.test_labels, a.profile, a.shape, a.seed, a.preview)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {len(ids)} training and {a.test} test volumes (scroll {a.profile}, shape {list(a.shape)}) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
