"""``HeightMapFill``: holes of each component's height map over its PCA plane, interpolated where no topology is created."""

from __future__ import annotations


import numpy as np

from ._base import _VolumeTransform, _check_int, _mask

def _normal_axis(comp: np.ndarray) -> int:
    """Volume axis closest to the normal of the principal plane of the voxels of ``comp`` (bool 3D): the
    eigenvector of the smallest eigenvalue of their coordinates' covariance (PCA), its largest entry."""
    pts = np.argwhere(comp).astype(np.float64)
    pts -= pts.mean(axis=0)
    _, vecs = np.linalg.eigh(pts.T @ pts)
    return int(np.argmax(np.abs(vecs[:, 0])))


def _height_map(comp: np.ndarray, axis: int):
    """(count, first, last) per column along ``axis`` of bool ``comp``: voxels, lowest and highest index
    (first = last = 0 where empty). A column is single-valued when ``count == last - first + 1``."""
    c = np.moveaxis(comp, axis, 0)
    n = c.shape[0]
    count = c.sum(axis=0, dtype=np.int64)
    first = np.argmax(c, axis=0)
    last = n - 1 - np.argmax(c[::-1], axis=0)
    return count, first, np.where(count > 0, last, 0)


def _component_boxes(labels: np.ndarray, n: int, min_size: int):
    """[(label, slices, size)] of the components of ``labels`` (1..n) with at least ``min_size`` voxels."""
    from scipy import ndimage

    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(labels, max_label=n)
    return [(i + 1, s, int(sizes[i + 1])) for i, s in enumerate(boxes) if s is not None and sizes[i + 1] >= min_size]


def _grow(box: tuple[slice, ...], margin: int, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, shape))


def _interpolate(points: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation (``scipy.interpolate.griddata``) of ``values`` at ``points`` (2D) onto
    ``targets``; nearest value where linear is undefined (outside the hull, collinear points)."""
    from scipy.interpolate import griddata
    from scipy.spatial import QhullError

    try:
        out = griddata(points, values, targets, method="linear")
    except (QhullError, ValueError):
        out = np.full(len(targets), np.nan)
    bad = np.isnan(out)
    if bad.any():
        out[bad] = griddata(points, values, targets[bad], method="nearest")
    return out


def _no_new_topology(before: np.ndarray, after: np.ndarray) -> bool:
    """Betti counts (p0, p1, p2) of ``finite_pair_counts``: no new component, tunnel or cavity."""
    return bool(after[0] <= before[0] and after[1] <= before[1] and after[2] <= before[2])


def _touches_other(labels: np.ndarray, added: np.ndarray, own: int) -> bool:
    """Whether the 26-neighbourhood of the voxels ``added`` holds a label other than 0 and ``own``."""
    from scipy import ndimage

    near = labels[ndimage.binary_dilation(added, np.ones((3, 3, 3), bool))]
    return bool(np.any((near != 0) & (near != own)))


class HeightMapFill(_VolumeTransform):
    """Fill the holes of each component's height map over the lattice plane across its PCA normal.

    For each 26-connected component of at least ``min_component_size`` voxels: the normal of its
    principal plane (PCA of its voxel coordinates: the eigenvector of the smallest eigenvalue) picks
    the volume axis closest to it, and the component becomes a height map over the other two axes
    (each column: lowest and highest voxel; exact voxel columns, no resampling). A hole is a set of
    empty columns enclosed by the footprint (2D ``binary_fill_holes``) of ``min_hole_area`` to
    ``max_hole_area`` columns; its lowest and highest heights are interpolated piecewise-linearly from
    the single-valued columns of its rim (the 8-neighbour ring), and the voxels between them are added
    -- only when the Betti numbers (``finite_pair_counts``) of the region around the hole show no new
    component, tunnel or cavity and no other component lies within one voxel of the new voxels.
    Metric: each filled hole of a sheet removes a tunnel (TopoF1_1) and may rejoin split pieces (VOI);
    where the label sheet is whole the filled voxels are SurfaceDice gained, where the label has a real
    hole they are lost. 1st place: +0.003 on large holes. ``enabled=False``: no-op.
    """

    def __init__(self, max_hole_area: int | None = 5000, min_hole_area: int = 2, min_component_size: int = 500,
                 enabled: bool = True):
        self.max_hole_area = _check_int(max_hole_area, "HeightMapFill: max_hole_area", 1, allow_none=True)
        self.min_hole_area = _check_int(min_hole_area, "HeightMapFill: min_hole_area", 1)
        self.min_component_size = _check_int(min_component_size, "HeightMapFill: min_component_size", 1)
        self.enabled = bool(enabled)

    def apply_volume(self, vol: np.ndarray) -> np.ndarray:
        mask = _mask(vol)
        if not self.enabled or not mask.any() or min(mask.shape) < 3:
            return mask
        import cc3d

        out = mask.copy()
        labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
        for label, box, _ in _component_boxes(labels, n, self.min_component_size):
            self._fill_component(out, labels, label, box)
        return out

    def _fill_component(self, out: np.ndarray, labels: np.ndarray, label: int, box) -> None:
        from scipy import ndimage

        comp = labels[box] == label
        axis = _normal_axis(comp)
        count, first, last = _height_map(comp, axis)
        foot = count > 0
        holes, n_holes = ndimage.label(ndimage.binary_fill_holes(foot) & ~foot)
        if not n_holes:
            return
        single = foot & (count == last - first + 1)
        areas = np.bincount(holes.ravel())
        for k, sl in enumerate(ndimage.find_objects(holes), start=1):
            area = areas[k]
            if area < self.min_hole_area or (self.max_hole_area is not None and area > self.max_hole_area):
                continue
            sl = _grow(sl, 1, holes.shape)
            hole = holes[sl] == k
            rim = ndimage.binary_dilation(hole, np.ones((3, 3), bool)) & single[sl]
            if np.count_nonzero(rim) < 3:
                continue
            self._fill_hole(out, labels, label, box, axis, sl, hole, rim, first[sl], last[sl])

    def _fill_hole(self, out, labels, label, box, axis, sl, hole, rim, first, last) -> None:
        from custom_components.metrics.betti_matching import finite_pair_counts

        rim_pts, targets = np.argwhere(rim), np.argwhere(hole)
        lo = np.floor(_interpolate(rim_pts, first[rim].astype(np.float64), targets) + 0.5).astype(np.int64)
        hi = np.floor(_interpolate(rim_pts, last[rim].astype(np.float64), targets) + 0.5).astype(np.int64)
        hi = np.maximum(hi, lo)
        span = np.arange(int((hi - lo).max()) + 1)
        h = lo[:, None] + span[None, :]
        keep = h <= hi[:, None]
        # local (height, u, v) -> volume coordinates
        others = [a for a in range(3) if a != axis]
        coords = np.empty((int(keep.sum()), 3), np.int64)
        coords[:, axis] = h[keep] + box[axis].start
        for j, a in enumerate(others):
            coords[:, a] = np.repeat(targets[:, j], keep.sum(axis=1)) + sl[j].start + box[a].start
        inside = np.all((coords >= 0) & (coords < np.array(out.shape)), axis=1)
        coords = coords[inside]
        if not len(coords):
            return
        region = tuple(slice(max(0, int(c.min()) - 2), min(n, int(c.max()) + 3)) for c, n in zip(coords.T, out.shape))
        added = np.zeros(tuple(s.stop - s.start for s in region), bool)
        added[tuple((coords - [s.start for s in region]).T)] = True
        added &= ~out[region]
        if not added.any() or _touches_other(labels[region], added, label):
            return
        before = finite_pair_counts(out[region])
        if _no_new_topology(before, finite_pair_counts(out[region] | added)):
            out[region] |= added
            labels[region][added] = label
