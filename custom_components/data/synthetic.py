"""Synthetic scrolls in the exact Kaggle competition layout: the built-in data of the demo, tests and benchmarks.

A volume is a piece of a wound scroll seen by CT. The papyrus sheets are concentric shells around an
axis that lies outside the volume (direction near one volume axis, mostly Z as in the real crops,
slightly tilted), with smooth random undulation:

    psi(p) = rho(p) + U_tan(p) + U_rad(p)

``rho`` is the distance of voxel ``p`` from the scroll axis, ``U_tan`` a sum of waves along the sheets
(they bend together), ``U_rad`` waves with a radial component (the spacing between sheets varies); the
slopes are bounded so that the level sets never fold (``|grad psi|`` stays within about 0.75-1.35).
Band ``k`` is ``s_k <= psi < s_{k+1}``; its papyrus is ``psi - s_k < W_k`` with ``W_k = (t_label +
verso_k) * max|grad psi|``, and ``depth = (psi - s_k) / |grad psi|`` is the distance below the band's
inner face along the local normal (to first order). Every 6-connected piece of a band's recto layer
inside the volume is one *sheet*. On top of that, as in real data:

- contacts: "bridges" of papyrus fill the gap between a sheet and the sheet of the next band in places
  (at least one per volume, inside the labelled part), so the sheets' bodies form fewer 26-connected
  components than there are sheets; both sheets keep their whole labelled layer there, the two layers
  only the lower sheet's verso apart (``label_gap`` in the record, >= 1.5 voxels: they never share a face);
- holes (ragged discs) and tears (capsule-shaped slits) cut through sheets (at least one interior hole);
- papyrus structure: the recto half of a sheet has fibres along the winding (horizontal fibres), the
  verso half fibres along the scroll axis (vertical fibres); bright debris; per-sheet density;
- CT: Gaussian blur, signal-dependent noise, slow multiplicative and additive intensity drift.

Label 1 (``recto_label``): the recto layer of each sheet, the face that looks *towards* the scroll axis
(papyrus is rolled with the writing inside): its voxels with ``0 <= depth < t_label``, ``t_label`` drawn
per volume in [2.25, 3.75] (mode 3). A digital slab ``0 <= n.p - c < t`` is 6-connected when ``t >=
|n|_1`` (at most sqrt(3) = 1.73), so the layer is 6-connected at every orientation; where the layers of
two sheets would share a face the voxel deeper in its sheet is left out. Never the verso, never bridges
or holes. Each sheet's label is checked (``sheet_betti``: Betti numbers per sheet) to be one
6-connected component without cavities whose tunnels are exactly the holes and tears of the record:
every cut is kept only if it adds one tunnel and nothing else (Betti numbers of the box around it, before
and after), and a sheet whose label fails the check as a whole (a tunnel where the sheet leaves the
volume) is left unannotated: no label 1, label 2 around it, listed in ``unannotated_sheets``.
**These properties are checked before label 2 is painted**: ``info["label1"]`` is label 1 before it,
and label 2 (below) may cut any sheet's label; its cuts are not listed.

Label 2 = unlabeled: a 3-voxel border on every face, smooth random blobs where "annotation is missing",
the neighbourhood of unannotated sheets and, sometimes, the neighbourhood of a sheet on one side of a
random cut (an annotator stopped tracing it), 20-80 % of a 64^3+ volume in all.

``--profile`` picks a named "scroll" (verso thickness, spacing, noise, blur, contrast, damage differ), and
``scroll_id`` in ``train.csv`` follows it. Each volume scales what a scanner and a scroll vary (contrast,
air level, noise, blur, drift, fibre texture, sheet thickness, gaps, damage, density) by random factors
around its profile (``JITTER``) and draws its label thickness, so that a model trained on one profile sees
variety. ``HELD_OUT_PROFILE`` (35360: thicker sheets, wider gaps, lower contrast) is the profile the
quality study (bench/quality.py) keeps out of training. Every volume draws from
``numpy.random.default_rng([seed, index])`` only, so the same seed gives byte-identical files (on the same
numpy / CPU kind).

    python -m custom_components.data.synthetic --out DIR --volumes N [--test M] [--test_labels]
        [--profile NAME] --shape Z Y X --seed S [--preview]

(with a progress bar of the volumes on stderr when it is a terminal).
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

__all__ = ["PROFILES", "DEFAULT_PROFILE", "HELD_OUT_PROFILE", "BORDER", "JITTER", "LABEL_THICKNESS", "generate_volume",
           "recto_label", "sheet_betti", "write_dataset", "dataset_ids", "main"]

BORDER = 3  # label 2 on this many voxels along every face
DEFAULT_PROFILE = "34117"
HELD_OUT_PROFILE = "35360"  # bench/quality.py's --test_profile: never trained on in the quality study
LABEL_THICKNESS = (2.25, 3.0, 3.75)  # label-1 thickness along the normal per volume: triangular (min, mode, max)
_VERSO_MIN, _GAP_MIN = 1.5, 2.5  # after the per-volume scaling: labels of two sheets never share a face
_MIN_EDGE = 16
_MIN_SHEET = 20  # label voxels of the smallest sheet; smaller pieces of a layer stay unlabelled papyrus

# verso: range of the sheet's thickness below its label (voxels along the normal, per sheet); gap: range of
# the void between sheets (psi units, about voxels); contrast / air: papyrus and void intensity (0..1);
# noise: CT noise std; blur: Gaussian sigma; fibre: fibre texture amplitude (relative); drift: slow intensity
# drift amplitude; wave_tan / wave_rad: slope budgets of the along-sheet / spacing-changing undulation;
# radius: distance from the scroll axis to the nearest voxel, in largest edges; contacts / holes / tears:
# expected number per sheet (pair) per 64^2 voxels of sheet; debris: bright specks per 64^3; skip:
# probability that a sheet is partly unannotated; unlabeled: range of the label-2 fraction.
PROFILES: dict[str, dict] = {
    "34117": dict(verso=(1.5, 3.0), gap=(4.0, 10.0), contrast=0.42, air=0.16, noise=0.07,
                  blur=0.8, fibre=0.30, drift=0.15, wave_tan=0.45, wave_rad=0.20, radius=(0.5, 3.0),
                  contacts=0.25, holes=0.12, tears=0.08, debris=2.0, skip=0.10, unlabeled=(0.35, 0.60)),
    "35360": dict(verso=(2.5, 4.5), gap=(5.0, 12.0), contrast=0.32, air=0.20, noise=0.11,
                  blur=1.0, fibre=0.25, drift=0.20, wave_tan=0.40, wave_rad=0.20, radius=(0.8, 4.0),
                  contacts=0.15, holes=0.10, tears=0.06, debris=3.0, skip=0.10, unlabeled=(0.40, 0.65)),
    "26010": dict(verso=(1.5, 2.0), gap=(3.0, 7.0), contrast=0.50, air=0.14, noise=0.05,
                  blur=0.7, fibre=0.35, drift=0.12, wave_tan=0.50, wave_rad=0.25, radius=(0.3, 2.0),
                  contacts=0.40, holes=0.15, tears=0.10, debris=1.0, skip=0.05, unlabeled=(0.30, 0.55)),
    "26002": dict(verso=(1.5, 3.5), gap=(3.5, 11.0), contrast=0.38, air=0.18, noise=0.09,
                  blur=0.9, fibre=0.30, drift=0.30, wave_tan=0.45, wave_rad=0.20, radius=(0.5, 3.0),
                  contacts=0.25, holes=0.12, tears=0.08, debris=6.0, skip=0.15, unlabeled=(0.40, 0.65)),
    "44430": dict(verso=(2.0, 3.5), gap=(4.5, 9.0), contrast=0.30, air=0.18, noise=0.08,
                  blur=1.3, fibre=0.20, drift=0.15, wave_tan=0.40, wave_rad=0.15, radius=(1.0, 4.0),
                  contacts=0.20, holes=0.10, tears=0.05, debris=2.0, skip=0.10, unlabeled=(0.35, 0.60)),
    "53997": dict(verso=(1.5, 3.0), gap=(3.5, 8.5), contrast=0.38, air=0.17, noise=0.14,
                  blur=0.9, fibre=0.30, drift=0.20, wave_tan=0.50, wave_rad=0.25, radius=(0.4, 2.5),
                  contacts=0.30, holes=0.30, tears=0.20, debris=3.0, skip=0.10, unlabeled=(0.40, 0.70)),
}

# per-volume factor range of each scanner / scroll property (log-uniform), applied around the profile
JITTER: dict[str, tuple[float, float]] = {
    "contrast": (0.7, 1.35), "air": (0.75, 1.3), "noise": (0.6, 1.6), "blur": (0.7, 1.45), "drift": (0.5, 1.6),
    "fibre": (0.5, 1.6), "verso": (0.75, 1.4), "gap": (0.75, 1.6), "holes": (0.5, 2.0), "tears": (0.5, 2.0),
    "contacts": (0.6, 1.8), "debris": (0.5, 2.0),
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


def _dot(shape, vec) -> np.ndarray:
    """``p . vec`` over the volume, ``p`` relative to the volume centre (float32)."""
    c = [np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2) for n in shape]
    return ((np.float32(vec[0]) * c[0])[:, None, None] + (np.float32(vec[1]) * c[1])[None, :, None]
            + (np.float32(vec[2]) * c[2])[None, None, :])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# ------------------------------------------------------------------------------ stage 0: parameters


def _draw_params(prof: dict, rng: np.random.Generator) -> dict:
    """This volume's parameters: the profile's, each property of ``JITTER`` times a log-uniform factor of its
    range (a range property: both ends), verso >= 1.5 and gap >= 2.5; plus the label thickness
    (triangular on ``LABEL_THICKNESS``), the fibre length (voxels) and the spread of the sheets' density."""
    p = dict(prof)
    for key, (lo, hi) in JITTER.items():
        f = _log_uniform(rng, lo, hi)
        p[key] = tuple(x * f for x in prof[key]) if isinstance(prof[key], tuple) else prof[key] * f
    p["verso"] = tuple(max(_VERSO_MIN, x) for x in p["verso"])
    p["gap"] = tuple(max(_GAP_MIN, x) for x in p["gap"])
    p["label_thickness"] = float(rng.triangular(*LABEL_THICKNESS))
    p["fibre_length"] = float(rng.uniform(3.0, 10.0))
    p["density_spread"] = float(rng.uniform(0.05, 0.3))
    return p


# -------------------------------------------------------------------------------- stage 1: geometry


@dataclass
class _Geometry:
    """The scroll in the volume, as the later stages read it (arrays (Z, Y, X))."""

    shape: tuple
    axis: np.ndarray  # scroll axis direction
    e1: np.ndarray  # from the axis towards the volume centre (outward shell normal there)
    e2: np.ndarray  # axis x e1
    dist: float  # distance of the volume centre from the axis
    psi: np.ndarray  # float32, the sheet field (module docstring)
    v: np.ndarray  # float32, arc length along the winding (rho * theta)
    w: np.ndarray  # float32, axial coordinate
    band: np.ndarray  # int32 band (winding) of each voxel
    depth: np.ndarray  # float32 distance below the band's inner face along the normal
    starts: list  # s_k (psi)
    width: list  # W_k (psi): papyrus is psi - s_k < W_k
    thick: list  # t_label + verso_k: least thickness of band k's sheets along the normal
    gaps: list  # void after band k (psi)
    papyrus: np.ndarray | None = None  # bool, sheet voxels (cuts clear them; bridges not included)
    sheet_id: np.ndarray | None = None  # 0 none, 1..n
    sheet_band: np.ndarray | None = None  # band of each sheet id (index 0 unused)


def _frame(shape, p: dict, rng: np.random.Generator):
    """Scroll axis ``a`` (near a volume axis, tilted), ``e1`` from the axis towards the volume centre,
    ``e2 = a x e1``, and the centre's distance from the axis: the innermost voxel lies ``radius`` (in
    largest edges) from it."""
    ax = int(rng.choice(3, p=[0.5, 0.25, 0.25]))
    tilt = rng.normal(0.0, 0.12, 3)
    tilt[ax] = 0.0
    a = np.eye(3)[ax] + tilt
    a /= np.linalg.norm(a)
    r = rng.standard_normal(3)
    e1 = r - (r @ a) * a
    e1 /= np.linalg.norm(e1)
    extent = 0.5 * float(np.abs(e1) @ (np.array(shape) - 1)) + 1.0
    dist = extent + max(shape) * _log_uniform(rng, *p["radius"])
    return a, e1, np.cross(a, e1), dist


def _field(shape, frame, p: dict, rng: np.random.Generator):
    """``psi = rho + U_tan + U_rad`` and the sheet coordinates ``v = rho * theta``, ``w``: along-sheet waves
    in (e2, axis) with a Dirichlet share of the slope budget ``wave_tan`` each, spacing waves along random
    directions sharing ``wave_rad``."""
    a, e1, e2, dist = frame
    q1 = _dot(shape, e1)
    q1 += np.float32(dist)
    q2 = _dot(shape, e2)
    w = _dot(shape, a)
    psi = np.sqrt(q1 * q1 + q2 * q2)  # rho
    v = q2 / q1
    np.arctan(v, out=v)
    v *= psi
    del q1
    for budget, n_waves, kind in ((p["wave_tan"], 3, "tan"), (p["wave_rad"], 2, "rad")):
        for s in rng.dirichlet(np.ones(n_waves)) * budget:
            k = 2 * np.pi / float(rng.uniform(40, 160) if kind == "tan" else rng.uniform(30, 100))
            amp, phase = np.float32(s / k), np.float32(rng.uniform(0, 2 * np.pi))
            if kind == "tan":
                ang = rng.uniform(0, 2 * np.pi)
                arg = (np.float32(k * np.cos(ang)) * q2 + np.float32(k * np.sin(ang)) * w) + phase
            else:
                d = rng.standard_normal(3)
                arg = _dot(shape, d / np.linalg.norm(d) * k) + phase
            np.sin(arg, out=arg)
            arg *= amp
            psi += arg
            del arg
    return psi, v, w


def _grad_norm(psi: np.ndarray) -> np.ndarray:
    """``|grad psi|`` by central differences (one-sided at the faces), float32."""
    g = np.zeros_like(psi)
    for axis in range(3):
        d = np.gradient(psi, axis=axis)
        d *= d
        g += d
    return np.sqrt(g, out=g)


def _bands(psi: np.ndarray, p: dict, rng: np.random.Generator):
    """Band starts ``s_k``, widths ``W_k = thick_k * max|grad psi|`` (so that the papyrus is at least
    ``thick_k = t_label + verso_k`` thick along the normal everywhere), gaps; the band of every voxel and its
    depth ``(psi - s_k) / |grad psi|``. Band look-up through a fine table (faster than searchsorted)."""
    g = _grad_norm(psi)
    g_hi = float(g.max())
    t_label = p["label_thickness"]
    pmin, pmax = float(psi.min()), float(psi.max())
    starts, width, thick, gaps = [], [], [], []
    s = pmin - rng.uniform(0, (t_label + p["verso"][1]) * g_hi + p["gap"][1])
    while s < pmax:
        thick.append(t_label + float(rng.uniform(*p["verso"])))
        gaps.append(float(rng.uniform(*p["gap"])))
        starts.append(s)
        width.append(thick[-1] * g_hi)
        s += width[-1] + gaps[-1]
    starts_a = np.array(starts + [np.inf])
    h = 0.5
    nb = int(np.ceil((pmax - starts[0]) / h)) + 2
    table = (np.searchsorted(starts_a, starts[0] + h * np.arange(nb), side="right") - 1).astype(np.int32)
    band = table[((psi - np.float32(starts[0])) * np.float32(1 / h)).astype(np.int32)]
    band += psi >= starts_a.astype(np.float32)[band + 1]
    depth = psi - starts_a.astype(np.float32)[band]
    depth /= g
    return band, depth, starts, width, thick, gaps


def _sheets(geo: _Geometry, t_label: float) -> None:
    """Papyrus (``psi - s_k < W_k``) and sheet ids: every 6-connected piece (>= 20 voxels) of a band's recto
    layer is a sheet, numbered by band, then raster order; the rest of the band's papyrus takes the id of the
    largest such piece in its 26-connected piece of papyrus (0 where there is none: papyrus without a label)."""
    starts = np.array(geo.starts, np.float32)
    width = np.array(geo.width, np.float32)
    geo.papyrus = (geo.psi - starts[geo.band]) < width[geo.band]
    layer = geo.papyrus & (geo.depth < np.float32(t_label))
    lp, n_lp = cc3d.connected_components(np.where(layer, geo.band + 1, 0), connectivity=6, return_N=True)
    at = np.flatnonzero(layer)
    lp_at = lp.ravel()[at].astype(np.int64)
    size = np.bincount(lp_at, minlength=n_lp + 1)
    band_of = np.zeros(n_lp + 1, np.int64)
    band_of[lp_at] = geo.band.ravel()[at]
    keep = np.flatnonzero(size >= _MIN_SHEET)
    keep = keep[keep > 0]
    keep = keep[np.lexsort((keep, band_of[keep]))]
    new = np.zeros(n_lp + 1, np.int64)
    new[keep] = np.arange(1, len(keep) + 1)
    bp = cc3d.connected_components(np.where(geo.papyrus, geo.band + 1, 0), connectivity=26)
    bp_of = np.zeros(n_lp + 1, np.int64)
    bp_of[lp_at] = bp.ravel()[at]
    main = np.zeros(int(bp.max()) + 1, np.int64)
    for c in keep[np.argsort(size[keep], kind="stable")]:  # the largest piece last: it wins
        main[bp_of[c]] = new[c]
    sid = main[bp]
    sid.ravel()[at] = new[lp_at]
    geo.sheet_id = sid.astype(np.uint8 if len(keep) < 255 else np.uint16)
    geo.sheet_band = np.concatenate([[-1], band_of[keep]])


def _geometry(shape, p: dict, rng: np.random.Generator) -> _Geometry:
    """Stage 1: frame, field, bands, papyrus and sheets."""
    frame = _frame(shape, p, rng)
    psi, v, w = _field(shape, frame, p, rng)
    band, depth, starts, width, thick, gaps = _bands(psi, p, rng)
    geo = _Geometry(shape, *frame, psi, v, w, band, depth, starts, width, thick, gaps)
    _sheets(geo, p["label_thickness"])
    return geo


# --------------------------------------------------------------------- stage 2: label 1 and its check


def recto_label(sheet_id: np.ndarray, depth: np.ndarray, thickness: float) -> np.ndarray:
    """Label 1 (bool): the voxels of every sheet (``sheet_id > 0``) with ``0 <= depth < thickness``, ``depth``
    the distance below the sheet's inner (recto) face along its normal. Where the layers of two sheets would
    share a face (6-neighbours), the voxel deeper in its sheet is left out (equal depth: the higher id), so
    that two touching sheets keep two labels that never share a face. One pass suffices: every such pair
    loses one voxel."""
    sid = np.where((sheet_id > 0) & (depth >= 0) & (depth < np.float32(thickness)), sheet_id, 0)
    drop = np.zeros(sid.shape, bool)
    for axis in range(3):
        hi, lo = _slices(axis, 1, None), _slices(axis, None, -1)
        a, b = sid[hi], sid[lo]
        clash = (a > 0) & (b > 0) & (a != b)
        if clash.any():
            da, db = depth[hi], depth[lo]
            a_out = clash & ((da > db) | ((da == db) & (a > b)))
            drop[hi] |= a_out
            drop[lo] |= clash & ~a_out
    return (sid > 0) & ~drop


def sheet_betti(ids: np.ndarray, n: int) -> np.ndarray:
    """Betti numbers ``(b0, b1, b2)`` of each sheet ``1..n`` of ``ids`` (0: none) as its own binary image, as
    an ``(n + 1, 3)`` int64 array (row 0 unused): b0 its 6-connected components (cc3d, all sheets at once),
    b2 its cavities (26-connected components of ``ids == 0`` that touch no face and border only that
    sheet), ``b1 = b0 + b2 - chi`` with ``chi = V - E + F - C`` over the cubical cells whose voxels all
    belong to the sheet (the complex of the Betti matching's V-construction)."""
    ids = np.ascontiguousarray(ids)

    def count(x):
        x = x.ravel()
        return np.bincount(x[x > 0].astype(np.int64), minlength=n + 1)[: n + 1]

    def same(arr, axis):  # the id where a cell and its neighbour along axis agree, else 0
        a, b = arr[_slices(axis, 1, None)], arr[_slices(axis, None, -1)]
        return np.where(a == b, a, 0)

    edges = [same(ids, axis) for axis in range(3)]
    chi = count(ids) - sum(count(e) for e in edges)
    squares = [same(edges[0], 1), same(edges[0], 2), same(edges[1], 2)]
    chi += sum(count(s) for s in squares)
    chi -= count(same(squares[2], 0))
    out = np.zeros((n + 1, 3), np.int64)
    cc, n_cc = cc3d.connected_components(ids, connectivity=6, return_N=True)
    owner = np.zeros(n_cc + 1, np.int64)
    owner[cc.ravel()] = ids.ravel()
    out[:, 0] = count(owner[1:])
    bg, n_bg = cc3d.connected_components(ids == 0, connectivity=26, return_N=True)
    faces = [bg[0], bg[-1], bg[:, 0], bg[:, -1], bg[:, :, 0], bg[:, :, -1]]
    enclosed = np.setdiff1d(np.arange(1, n_bg + 1), np.concatenate([f.ravel() for f in faces]))
    if enclosed.size:
        grown = ndimage.grey_dilation(np.where(np.isin(bg, enclosed), bg, 0), size=(3, 3, 3))
        pairs = np.unique(np.stack([grown.ravel(), ids.ravel()], 1)[(grown.ravel() > 0) & (ids.ravel() > 0)], axis=0)
        owners, n_owners = np.unique(pairs[:, 0], return_counts=True)
        for cav in owners[n_owners == 1]:
            out[pairs[pairs[:, 0] == cav, 1][0], 2] += 1
    out[:, 1] = out[:, 0] + out[:, 2] - chi
    out[0] = 0
    return out


def _check_label(geo: _Geometry, label1: np.ndarray, tunnels: dict, demoted: dict, reason: str) -> np.ndarray:
    """Every annotated sheet's label: one 6-connected component, ``tunnels[j]`` tunnels, no cavity; a sheet that
    fails is left unannotated (``demoted[j] = reason``, its label removed). Returns the new label 1."""
    n = len(geo.sheet_band) - 1
    betti = sheet_betti(np.where(label1, geo.sheet_id, 0), n)
    for j in range(1, n + 1):
        if j not in demoted and tuple(betti[j]) != (1, tunnels.get(j, 0), 0):
            demoted[j] = reason
    if demoted:
        label1 = label1 & ~np.isin(geo.sheet_id, list(demoted))
    return label1


# ---------------------------------------------------------------------------- stage 3: holes and tears


def _sample(shape, rng: np.random.Generator, n: int = 8192):
    """``n`` random voxels (for placing cuts and bridges) and a test of their distance from the faces."""
    zyx = np.stack(np.unravel_index(rng.integers(0, int(np.prod(shape)), size=n), shape), 1)
    return zyx, lambda margin: np.all((zyx >= margin) & (zyx < np.array(shape) - margin), axis=1)


def _cut(geo: _Geometry, label1: np.ndarray, j: int, p0, kind: str, rng: np.random.Generator):
    """Cut a hole (ragged disc) or a tear (capsule) around voxel ``p0`` through sheet ``j``, in its (v, w)
    coordinates, if it adds exactly one tunnel to the sheet's label and nothing else (Betti numbers of the
    box around the cut, 2 voxels wider, before and after). Returns the record, or None when refused."""
    b = int(geo.sheet_band[j])
    vf, wf = geo.v[tuple(p0)], geo.w[tuple(p0)]
    if kind == "hole":
        r0 = float(rng.uniform(2.5, 4.0 + min(geo.shape) / 16))
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        reach = size = 1.4 * r0
    else:
        size = float(rng.uniform(6.0, min(64.0, max(8.0, min(geo.shape) / 3))))
        width, ang = float(rng.uniform(1.0, 1.8)), rng.uniform(0, np.pi)
        reach = size / 2 + width
    box, _ = _box(p0, reach + 2 * geo.width[b] + 4, geo.shape)
    sub = geo.sheet_id[box]
    on = np.nonzero(sub == j)
    dv, dw = geo.v[box][on] - vf, geo.w[box][on] - wf
    if kind == "hole":
        alpha = np.arctan2(dw, dv)
        rad = r0 * (1 + 0.25 * np.sin(2 * alpha + ph1) + 0.15 * np.sin(3 * alpha + ph2))
        m = dv * dv + dw * dw <= rad * rad
        size = r0
    else:
        u1 = np.maximum(np.abs(dv * np.cos(ang) + dw * np.sin(ang)) - size / 2, 0)
        u2 = -dv * np.sin(ang) + dw * np.cos(ang)
        m = u1 * u1 + u2 * u2 <= width * width
    cut = tuple(c[m] for c in on)
    if not m.any():
        return None
    lo = [max(0, int(c.min()) - 2) for c in cut]
    hi = [min(n, int(c.max()) + 3) for c, n in zip(cut, sub.shape)]
    crop = tuple(slice(a, z) for a, z in zip(lo, hi))
    before = (label1[box][crop] & (sub[crop] == j)).astype(np.uint8)
    after = before.copy()
    after[tuple(c - a for c, a in zip(cut, lo))] = 0
    if tuple(sheet_betti(after, 1)[1] - sheet_betti(before, 1)[1]) != (0, 1, 0):
        return None
    sub[cut] = 0
    geo.papyrus[box][cut] = False
    label1[box][cut] = False
    return {"kind": kind, "sheet": int(j), "centre": [int(c) for c in p0], "size": round(size, 2), "voxels": int(m.sum())}


def _cut_sheets(geo: _Geometry, label1: np.ndarray, p: dict, demoted: dict, rng: np.random.Generator) -> list:
    """Stage 3: one deliberate hole in the interior (in the sheet the interior sample hits most), then per
    annotated sheet a Poisson number of holes and tears (``p["holes"]``, ``p["tears"]`` per 64^2 voxels of
    label area). Every kept cut is one tunnel of its sheet's label."""
    n = len(geo.sheet_band) - 1
    zyx, interior = _sample(geo.shape, rng)
    sid = geo.sheet_id[tuple(zyx.T)].astype(np.int64)
    sid[np.isin(sid, list(demoted))] = 0
    cuts = []
    cand = np.flatnonzero(interior(BORDER + 2 + 1.5 * (4.0 + min(geo.shape) / 16) + 2) & (sid > 0))
    if len(cand) == 0:
        cand = np.flatnonzero(sid > 0)
    if len(cand):
        best = np.bincount(sid[cand]).argmax()
        cand = cand[sid[cand] == best]
        for i in rng.choice(cand, size=min(len(cand), 20), replace=False):
            rec = _cut(geo, label1, int(best), zyx[i], "hole", rng)
            if rec is not None:
                cuts.append(rec)
                break
    area = np.bincount(geo.sheet_id[label1].astype(np.int64), minlength=n + 1) / p["label_thickness"] / 64.0**2
    for j in range(1, n + 1):
        cand = np.flatnonzero(sid == j)
        if len(cand) == 0:
            continue
        for kind in ("hole", "tear"):
            for _ in range(int(rng.poisson(p[kind + "s"] * area[j]))):
                rec = _cut(geo, label1, j, zyx[rng.choice(cand)], kind, rng)
                cuts += [rec] if rec is not None else []
    return cuts


# ---------------------------------------------------------------------------------- stage 4: contacts


def _contacts(geo: _Geometry, p: dict, rng: np.random.Generator):
    """Stage 4: bridges of papyrus across the gap between a sheet and the next band's sheet (one deliberate,
    in the interior, then ``p["contacts"]`` per sheet per 64^2 voxels), more until the papyrus forms fewer
    26-connected components than there are sheets. Returns (bridge mask, record, body components)."""
    n = len(geo.sheet_band) - 1
    bridge = np.zeros(geo.shape, bool)
    contacts = []
    zyx, interior = _sample(geo.shape, rng)
    sid = geo.sheet_id[tuple(zyx.T)].astype(np.int64)
    centre = np.array([(s - 1) / 2 for s in geo.shape])

    def add(j, pt):
        b = int(geo.sheet_band[j])
        if b + 1 >= len(geo.starts):
            return False
        x = np.array(pt, float) - centre
        nrm = (x @ geo.e1 + geo.dist) * geo.e1 + (x @ geo.e2) * geo.e2  # outward (rho) direction
        nrm /= np.linalg.norm(nrm)
        rb, reach = float(rng.uniform(2.5, 5.0)), 1.7 * (geo.width[b] + geo.gaps[b]) + 2
        box, _ = _box(np.array(pt) + 0.5 * reach * nrm, rb + 0.5 * reach + 2, geo.shape)
        grid = np.stack(np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in box], indexing="ij"), -1) - np.array(pt)
        along = grid @ nrm
        m = ((grid * grid).sum(-1) - along * along <= rb * rb) & (along >= -1) & (along <= reach)
        bb, rel = geo.band[box], geo.psi[box] - np.float32(geo.starts[b])
        m &= ((bb == b) & (rel >= geo.width[b] - 0.5)) | ((bb == b + 1) & (geo.psi[box] <= geo.starts[b + 1] + 0.5))
        other = geo.sheet_id[box][m & (bb == b + 1)]
        other = other[other > 0]
        if other.size == 0:
            return False
        bridge[box] |= m
        contacts.append({"sheets": [int(j), int(np.bincount(other).argmax())], "centre": [int(c) for c in pt],
                         "voxels": int(m.sum()), "label_gap": round(geo.thick[b] - p["label_thickness"], 2)})
        return True

    pairs = [j for j in range(1, n + 1) if geo.sheet_band[j] + 1 in set(geo.sheet_band[1:].tolist())]

    def deliberate():
        for margin in (BORDER + 8, BORDER + 2, 0):
            for i in rng.permutation(np.flatnonzero(interior(margin) & np.isin(sid, pairs)))[:20]:
                if add(int(sid[i]), zyx[i]):
                    return True
        return False

    if pairs:
        deliberate()
        area = np.bincount(geo.sheet_id.ravel().astype(np.int64), minlength=n + 1) / np.mean(geo.thick) / 64.0**2
        for j in pairs:
            cand = np.flatnonzero(sid == j)
            for _ in range(int(rng.poisson(p["contacts"] * area[j])) if len(cand) else 0):
                add(j, zyx[rng.choice(cand)])
    n_comp = int(cc3d.connected_components(geo.papyrus | bridge, connectivity=26, return_N=True)[1])
    for _ in range(40):  # sheets cut in pieces by the volume's faces: add contacts until they merge
        if n < 2 or n_comp < n or not pairs or not deliberate():
            break
        n_comp = int(cc3d.connected_components(geo.papyrus | bridge, connectivity=26, return_N=True)[1])
    return bridge, contacts, n_comp


# ----------------------------------------------------------------------------------- stage 5: label 2


def _label2(geo: _Geometry, label1: np.ndarray, p: dict, demoted: dict, rng: np.random.Generator):
    """Stage 5: label 1 with label 2 painted over the border, the neighbourhood of unannotated sheets, of some
    sheets beyond a random cut (probability ``skip``) and smooth blobs up to a random target fraction.
    Returns (label uint8, skipped sheets)."""
    unl = np.zeros(geo.shape, bool)
    b = BORDER
    unl[:b] = unl[-b:] = True
    unl[:, :b] = unl[:, -b:] = True
    unl[:, :, :b] = unl[:, :, -b:] = True
    skipped = []
    n = len(geo.sheet_band) - 1
    for j in range(1, n + 1):
        skip = rng.random() < p["skip"]
        if not skip and j not in demoted:
            continue
        k = int(geo.sheet_band[j])
        lo = geo.starts[k] - (geo.gaps[k - 1] / 2 if k > 0 else 1.0)
        region = (geo.psi >= lo) & (geo.psi < geo.starts[k] + geo.width[k] + geo.gaps[k] / 2)
        if j not in demoted:
            ang = rng.uniform(0, 2 * np.pi)
            cut = rng.uniform(-0.3, 0.3) * max(geo.shape)
            region &= (np.float32(np.cos(ang)) * geo.v + np.float32(np.sin(ang)) * geo.w) > cut
            skipped.append(j)
        unl |= region
    target = float(rng.uniform(*p["unlabeled"]))
    f0 = float(unl.mean())
    field = _smooth_field(rng, geo.shape, cell=max(12.0, max(geo.shape) / 5))
    if target > f0:
        vals = field[::2, ::2, ::2][~unl[::2, ::2, ::2]]
        if vals.size:
            unl |= field > np.float32(np.quantile(vals, 1 - (target - f0) / (1 - f0)))
    label = label1.astype(np.uint8)
    label[unl] = 2
    return label, skipped


# -------------------------------------------------------------------------- stage 6: image formation


def _image(geo: _Geometry, body: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Stage 6: air, papyrus with fibre texture (recto half along the winding, verso half along the axis) and
    per-sheet density, debris, multiplicative and additive drift, blur, signal-dependent noise; uint8."""
    shape, L = geo.shape, max(geo.shape)
    n = len(geo.sheet_band) - 1
    img = np.full(shape, p["air"], np.float32)
    bi = np.flatnonzero(body)
    sid_b = geo.sheet_id.ravel()[bi].astype(np.int64)
    vmin, wmin = float(geo.v.min()), float(geo.w.min())
    pad = 64
    nv, nw = int(np.ceil(geo.v.max() - vmin)) + 2 + pad, int(np.ceil(geo.w.max() - wmin)) + 2 + pad
    fl = p["fibre_length"]
    fib_rec = ndimage.gaussian_filter(rng.standard_normal((nv, nw)).astype(np.float32), (fl, 0.7), mode="wrap")
    fib_ver = ndimage.gaussian_filter(rng.standard_normal((nv, nw)).astype(np.float32), (0.7, fl), mode="wrap")
    fib_rec /= fib_rec.std() + 1e-6
    fib_ver /= fib_ver.std() + 1e-6
    off = rng.integers(0, pad, size=(n + 1, 2))
    vi = (geo.v.ravel()[bi] - np.float32(vmin)).astype(np.int64) + off[sid_b, 0]
    wi = (geo.w.ravel()[bi] - np.float32(wmin)).astype(np.int64) + off[sid_b, 1]
    band_b = geo.band.ravel()[bi]
    rel = geo.psi.ravel()[bi] - np.array(geo.starts, np.float32)[band_b]
    is_rec = (sid_b > 0) & (rel < np.array(geo.width, np.float32)[band_b] / 2)
    tex = np.where(is_rec, fib_rec[vi, wi], fib_ver[vi, wi])
    del vi, wi, is_rec, rel, band_b
    spread = p["density_spread"]
    dens = np.concatenate([[0.95], rng.uniform(1 - spread, 1 + spread, n)]).astype(np.float32)
    img.ravel()[bi] += np.float32(p["contrast"]) * dens[sid_b] * (1 + np.float32(p["fibre"]) * tex)
    del bi, sid_b, tex
    for _ in range(int(rng.poisson(p["debris"] * np.prod(shape) / 64.0**3))):
        c = rng.uniform(0, 1, 3) * np.array(shape)
        rad = float(rng.uniform(0.7, 2.0))
        box, _ = _box(c, rad + 1, shape)
        grid = np.stack(np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in box], indexing="ij"), -1) - c
        img[box] += np.float32(p["contrast"] * rng.uniform(0.8, 1.6)) * ((grid * grid).sum(-1) <= rad * rad)
    d = rng.standard_normal(3)
    ramp = _dot(shape, d / np.linalg.norm(d) / (0.5 * L))  # about -1..1
    img *= 1 + np.float32(p["drift"]) * (ramp + 0.5 * _smooth_field(rng, shape, cell=max(16.0, L / 3)))
    d = rng.standard_normal(3)
    img += np.float32(0.5 * p["drift"] * p["air"]) * _dot(shape, d / np.linalg.norm(d) / (0.5 * L))
    del ramp
    img = ndimage.gaussian_filter(img, sigma=p["blur"], truncate=3.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(p["noise"]) * (0.7 + 0.6 * img)
    img += noise
    del noise
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# -------------------------------------------------------------------------------------- the volume


def generate_volume(shape, seed=0, profile: str = DEFAULT_PROFILE):
    """One synthetic scroll volume: ``(image uint8, label uint8, info dict)``, arrays (Z, Y, X) of ``shape``.

    ``seed``: non-negative int or sequence of ints, fed to ``numpy.random.default_rng`` (nothing else is
    random). Stages: parameters, geometry, label 1 (checked), holes and tears, contacts, label 2, image,
    record (``_record``: the keys of ``info``).
    """
    shape = _check_shape(shape)
    prof = _check_profile(profile)
    rng = np.random.default_rng(_check_seed(seed))
    p = _draw_params(prof, rng)
    geo = _geometry(shape, p, rng)
    demoted: dict[int, str] = {}
    label1 = _check_label(geo, recto_label(geo.sheet_id, geo.depth, p["label_thickness"]), {}, demoted, "opening")
    cuts = _cut_sheets(geo, label1, p, demoted, rng)
    tunnels = {}
    for c in cuts:
        tunnels[c["sheet"]] = tunnels.get(c["sheet"], 0) + 1
    label1 = recto_label(geo.sheet_id, geo.depth, p["label_thickness"]) & ~np.isin(geo.sheet_id, list(demoted))
    label1 = _check_label(geo, label1, tunnels, demoted, "check")
    bridge, contacts, n_comp = _contacts(geo, p, rng)
    label, skipped = _label2(geo, label1, p, demoted, rng)
    body = geo.papyrus | bridge
    image = _image(geo, body, p, rng)
    info = _record(profile, p, geo, label1, label, body, cuts, contacts, n_comp, skipped, demoted)
    return image, label, info


def _record(profile, p, geo, label1, label, body, cuts, contacts, n_comp, skipped, demoted) -> dict:
    """Stage 7, the record. ``n_sheets`` (sheets with voxels in the volume), ``n_holes``, ``n_tears``,
    ``n_contacts``, ``body_components`` (26-connected components of ``body``), per sheet ``thickness``
    (least papyrus thickness along the normal, voxels), ``verso`` (thickness - label thickness), ``gaps``
    (void after it, psi units) and ``bands`` (its winding); ``label_thickness``; ``normal_axis`` (volume
    axis closest to the sheet normal at the centre), ``recto_side`` (-1: label 1 is on the lower-index face
    along that axis, +1 the upper), ``axis`` / ``axis_distance`` (scroll axis direction and distance from
    the centre); ``holes`` (holes and tears: ``kind``, ``sheet``, ``centre``, ``size``, ``voxels``; each is
    exactly one tunnel of its sheet's label), ``contacts`` (``sheets``, ``centre``, ``voxels``, ``label_gap``:
    least distance between the two labels there), ``skipped_sheets`` (partly under label 2),
    ``unannotated_sheets`` ({sheet: reason}: no label 1), ``params`` (this volume's drawn parameters),
    ``profile``, ``label1_fraction`` / ``label2_fraction``; arrays ``body`` (bool, papyrus incl. bridges),
    ``sheet_id`` (uint8/uint16: 0 none, 1..n_sheets, bridges excluded) and ``label1`` (bool, label 1
    before label 2 is painted: the mask the topology properties hold on)."""
    n = len(geo.sheet_band) - 1
    bands = [int(b) for b in geo.sheet_band[1:]]
    t_label = p["label_thickness"]
    normal_axis = int(np.argmax(np.abs(geo.e1)))  # outward shell normal at the centre; recto faces -e1
    return {
        "profile": profile,
        "n_sheets": n,
        "n_holes": sum(c["kind"] == "hole" for c in cuts),
        "n_tears": sum(c["kind"] == "tear" for c in cuts),
        "n_contacts": len(contacts),
        "body_components": n_comp,
        "thickness": [round(geo.thick[b], 3) for b in bands],
        "verso": [round(geo.thick[b] - t_label, 3) for b in bands],
        "gaps": [round(geo.gaps[b], 3) for b in bands],
        "bands": bands,
        "label_thickness": round(t_label, 3),
        "normal_axis": normal_axis,
        "recto_side": int(-np.sign(geo.e1[normal_axis])),
        "axis": [round(float(c), 4) for c in geo.axis],
        "axis_distance": round(geo.dist, 2),
        "holes": cuts,
        "contacts": contacts,
        "skipped_sheets": skipped,
        "unannotated_sheets": dict(sorted(demoted.items())),
        "params": {k: (round(float(v), 4) if not isinstance(v, tuple) else [round(float(x), 4) for x in v])
                   for k, v in p.items()},
        "label1_fraction": float((label == 1).mean()),
        "label2_fraction": float((label == 2).mean()),
        "body": body,
        "sheet_id": geo.sheet_id,
        "label1": label1,
    }


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
                  shape=(128, 128, 128), seed: int = 0, preview: bool = False, progress: bool = True) -> list[str]:
    """Write ``volumes`` training and ``test`` test volumes in the Kaggle layout under ``out``.

    Files: ``train.csv`` (``id,scroll_id``), ``train_images/<id>.tif``, ``train_labels/<id>.tif``,
    ``test_images/<id>.tif``, with ``test_labels`` also ``test_labels/<id>.tif``, with ``preview``
    ``previews/<id>.png``. Volume ``i`` (training then test) comes from ``generate_volume(shape,
    (seed, i), profile)``. Returns the training ids, in ``train.csv`` order. A progress bar on stderr
    (``custom_components.progress``; none with ``progress=False`` or without a terminal) counts the volumes.
    """
    from custom_components.progress import advance, progress_bar

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
    with progress_bar(len(ids), f"synthetic scrolls ({profile})", progress) as bar:
        for i, vid in enumerate(ids):
            image, label, _ = generate_volume(shape, (int(seed), i), profile)
            split = "train" if i < volumes else "test"
            _write_tiff(os.path.join(out, f"{split}_images", f"{vid}.tif"), image)
            if split == "train" or test_labels:
                _write_tiff(os.path.join(out, f"{split}_labels", f"{vid}.tif"), label)
            if preview:
                _write_preview(os.path.join(out, "previews", f"{vid}.png"), image, label, f"{split} {vid} (scroll {profile})")
            advance(bar, f"{split} {vid}")
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
