"""Synthetic scrolls in the exact Kaggle competition layout: the built-in data of the demo, tests and benchmarks.

Each volume holds ``n`` undulating papyrus sheets (offset surfaces ``z = s_k(y, x)`` with random
low-frequency waves, uneven spacing, ``t_k`` voxels thick), then randomly permuted axes so that sheets
lie in every orientation. It is hard where the real data is hard:

- sheets touch: one neighbouring pair per volume is pulled together by a smooth bump until it
  overlaps, so the sheets' bodies form fewer 26-connected components than there are sheets;
- tears and holes: discs cut out of some sheets;
- fibre texture (noise smoothed along one in-sheet axis), CT-like Gaussian noise, blur and a linear
  intensity drift, so an intensity threshold finds sheet *bodies*, not the surface;
- label 1 is the recto layer only: the first voxel layer on one face of each sheet;
- label 2 (unlabeled): a 3-voxel border on every face plus smooth random regions where annotation is
  "missing", 20-80 % of the volume in all.

``--profile`` picks one of the named "scrolls" (thickness, spacing, noise, contrast differ), and
``scroll_id`` in ``train.csv`` follows it. The same seed gives byte-identical files.

    python -m custom_components.synthetic --out DIR --volumes N [--test M] [--test_labels]
        [--profile NAME] --shape Z Y X --seed S [--preview]
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import os

import numpy as np
from scipy import ndimage

__all__ = ["PROFILES", "generate_volume", "write_dataset", "main"]

PROFILES = {
    # thickness range, spacing range (voxels between sheet starts), noise std, contrast, wave amplitude
    "34117": {"thickness": (3, 5), "spacing": (7, 11), "noise": 0.10, "contrast": 0.30, "wave": 3.0},
    "35360": {"thickness": (4, 6), "spacing": (9, 14), "noise": 0.14, "contrast": 0.22, "wave": 4.0},
    "26010": {"thickness": (2, 4), "spacing": (6, 9), "noise": 0.07, "contrast": 0.40, "wave": 2.0},
}
BORDER = 3


def _check(shape, profile):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 ints >= 16 (Z Y X), got {list(shape)}.")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; valid profiles: {sorted(PROFILES)}.")
    return shape


def _smooth_field(rng, shape, cells, amplitude=1.0):
    """Low-frequency random field: Gaussian noise on a coarse grid, upsampled linearly."""
    coarse = rng.standard_normal(cells)
    return ndimage.zoom(coarse, [s / c for s, c in zip(shape, cells)], order=1, mode="nearest")[: shape[0], : shape[1]] * amplitude


def _sheet_surfaces(rng, frame, prof):
    """Offset surfaces s_k(y, x) and thicknesses t_k of the sheets that fit wholly inside the frame."""
    fz, fy, fx = frame
    surfaces, thick = [], []
    z = float(rng.uniform(1, prof["spacing"][0]))
    # wound layers are roughly parallel: a wave shared by all sheets plus a small one of each sheet
    common = _smooth_field(rng, (fy, fx), (3, 3), prof["wave"])
    common += prof["wave"] * 0.5 * np.sin(np.arange(fx)[None, :] / rng.uniform(6, 14) + rng.uniform(0, 6.3))
    common -= common.min()
    while True:
        s = z + common + _smooth_field(rng, (fy, fx), (3, 3), 0.35 * prof["wave"])
        t = int(rng.integers(prof["thickness"][0], prof["thickness"][1] + 1))
        s = s - min(0.0, float(s.min()))  # every sheet lies wholly inside the volume
        if s.max() + t > fz - 1:
            return surfaces, thick
        surfaces.append(s)
        thick.append(t)
        z = float(s.min()) + float(rng.uniform(*prof["spacing"]))


def generate_volume(shape, seed: int, profile: str = "34117"):
    """One synthetic scroll volume: ``(image uint8, label uint8, info dict)``, all (Z, Y, X)."""
    Z, Y, X = _check(shape, profile)
    prof = dict(PROFILES[profile])
    rng = np.random.default_rng(int(seed))
    # build in a frame where sheets are z = s(y, x); permute axes at the end
    perm = tuple(int(a) for a in rng.permutation(3))
    frame = tuple(int(s) for s in np.array((Z, Y, X))[np.argsort(perm)])  # so that the permuted result has `shape`
    fz, fy, fx = frame
    # small volumes: scale spacing and waves down so that at least 3 sheets fit
    prof["wave"] = min(prof["wave"], fz / 20)
    need = 3 * prof["spacing"][1] + 3 * prof["wave"] + prof["thickness"][1] + 2
    if fz < need:
        f = fz / need
        prof["spacing"] = (max(prof["thickness"][1] + 1, prof["spacing"][0] * f), max(prof["thickness"][1] + 2, prof["spacing"][1] * f))
    for attempt in range(8):
        surfaces, thick = _sheet_surfaces(rng, frame, prof)
        if len(surfaces) >= 3:
            break
        prof["spacing"] = (max(prof["thickness"][1] + 1, prof["spacing"][0] * 0.85), max(prof["thickness"][1] + 1.5, prof["spacing"][1] * 0.85))
        prof["wave"] *= 0.7
    else:
        raise ValueError(f"shape {[Z, Y, X]} is too small for 3 sheets of profile {profile}; use a larger shape.")
    n = len(surfaces)
    # touching: pull sheet k up into sheet k+1 with a smooth bump
    k = int(rng.integers(0, n - 1))
    y0, x0 = int(rng.integers(fy // 4, 3 * fy // 4)), int(rng.integers(fx // 4, 3 * fx // 4))
    gap = surfaces[k + 1] - surfaces[k] - thick[k]
    yy, xx = np.mgrid[0:fy, 0:fx]
    radius = max(3.0, min(fy, fx) / 6)
    bump = np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * radius**2))
    surfaces[k] = surfaces[k] + bump * (max(float(gap[y0, x0]), 0.0) + 1.5)
    zz = np.arange(fz, dtype=np.float32)[:, None, None]
    body = np.zeros(frame, bool)
    recto = np.zeros(frame, bool)
    n_holes = 0
    bodies = []
    for i, (s, t) in enumerate(zip(surfaces, thick)):
        s = s.astype(np.float32)[None]
        b = (zz >= np.floor(s)) & (zz < np.floor(s) + t)
        r = (zz >= np.floor(s)) & (zz < np.floor(s) + 1)  # recto: the first layer on the sheet's lower face
        if rng.random() < 0.6 and i != k and i != k + 1:
            for _ in range(int(rng.integers(1, 3))):
                hy, hx, hr = int(rng.integers(0, fy)), int(rng.integers(0, fx)), float(rng.uniform(2.5, max(3.0, min(fy, fx) / 8)))
                disc = ((yy - hy) ** 2 + (xx - hx) ** 2 <= hr**2)[None]
                b &= ~disc
                r &= ~disc
                n_holes += 1
        bodies.append(b)
        body |= b
        recto |= r
    # image: papyrus with fibre texture, noise, blur, drift
    fibre = ndimage.gaussian_filter(rng.standard_normal(frame).astype(np.float32), sigma=(0.6, 0.6, 3.0))
    fibre /= fibre.std() + 1e-6
    img = 0.25 + body * (prof["contrast"] * (1 + 0.35 * fibre))
    img = ndimage.gaussian_filter(img.astype(np.float32), sigma=0.8)
    axis = int(rng.integers(0, 3))
    ramp = np.linspace(-1, 1, frame[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    img = img + 0.12 * ramp + rng.normal(0, prof["noise"], frame).astype(np.float32)
    image = np.clip(img * 255, 0, 255).astype(np.uint8)
    # labels: 1 recto, 2 border + unlabeled regions
    label = recto.astype(np.uint8)
    missing = _smooth_field(rng, frame[1:], (3, 3))[None] + _smooth_field(rng, (fz, 1), (3, 1))[:, :, None]
    frac = float(rng.uniform(0.15, 0.35))
    label[missing > np.quantile(missing, 1 - frac)] = 2
    b = BORDER
    label[:b], label[-b:], label[:, :b], label[:, -b:], label[:, :, :b], label[:, :, -b:] = 2, 2, 2, 2, 2, 2
    image, label = np.ascontiguousarray(image.transpose(perm)), np.ascontiguousarray(label.transpose(perm))
    body = body.transpose(perm)
    import cc3d

    info = {
        "n_sheets": n,
        "thickness": thick,
        "n_holes": n_holes,
        "touching_pair": (k, k + 1),
        "body_components": int(cc3d.connected_components(body, connectivity=26, return_N=True)[1]),
        "axes_permutation": perm,
        "profile": profile,
        "label1_fraction": float((label == 1).mean()),
        "label2_fraction": float((label == 2).mean()),
        "body": body,
    }
    return image, label, info


def _write_tiff(path, array):
    import tifffile

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    tifffile.imwrite(tmp, array, compression="lzw", photometric="minisblack", metadata=None)
    os.replace(tmp, path)


def _preview(path, image, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, axis in zip(axes, range(3)):
        idx = image.shape[axis] // 2
        ax.imshow(np.take(image, idx, axis=axis), cmap="gray")
        lab = np.take(label, idx, axis=axis)
        ax.imshow(np.ma.masked_where(lab == 0, lab), cmap="autumn", alpha=0.45, vmin=1, vmax=2)
        ax.set_title(f"axis {axis}, slice {idx} (red: surface, yellow: unlabeled)")
        ax.axis("off")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=70)
    plt.close(fig)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_dataset(out, volumes: int, test: int = 1, test_labels: bool = False, profile: str = "34117",
                  shape=(128, 128, 128), seed: int = 0, preview: bool = False) -> list[str]:
    """Write ``volumes`` training and ``test`` test volumes in the Kaggle layout; return the training ids."""
    shape = _check(shape, profile)
    if int(volumes) < 1:
        raise ValueError(f"volumes must be >= 1, got {volumes}.")
    if int(test) < 0:
        raise ValueError(f"test must be >= 0, got {test}.")
    dirs = ["train_images", "train_labels", "test_images"] + (["test_labels"] if test_labels else []) + (["previews"] if preview else [])
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    base = 1000 * (int(seed) % 1_000_000) + 100 * sorted(PROFILES).index(profile)
    train_ids = []
    for i in range(int(volumes) + int(test)):
        vid = str(base + i + 1)
        image, label, _ = generate_volume(shape, seed=int(seed) * 7919 + i, profile=profile)
        split = "train" if i < volumes else "test"
        _write_tiff(os.path.join(out, f"{split}_images", f"{vid}.tif"), image)
        if split == "train" or test_labels:
            _write_tiff(os.path.join(out, f"{split}_labels", f"{vid}.tif"), label)
        if preview:
            _preview(os.path.join(out, "previews", f"{vid}.png"), image, label)
        if split == "train":
            train_ids.append(vid)
    tmp = os.path.join(out, ".train.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "scroll_id"])
        for vid in train_ids:
            w.writerow([vid, profile])
    os.replace(tmp, os.path.join(out, "train.csv"))
    return train_ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--volumes", type=int, required=True)
    p.add_argument("--test", type=int, default=1)
    p.add_argument("--test_labels", action="store_true")
    p.add_argument("--profile", default="34117")
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--preview", action="store_true")
    a = p.parse_args(argv)
    try:
        ids = write_dataset(a.out, a.volumes, a.test, a.test_labels, a.profile, a.shape, a.seed, a.preview)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {len(ids)} training and {a.test} test volumes ({a.profile}, {list(a.shape)}) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
