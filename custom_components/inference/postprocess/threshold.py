"""Thresholding: ``Binarize`` (threshold or hysteresis) and ``GaussianSmooth`` (smoothing before a re-threshold)."""

from __future__ import annotations


import numpy as np

from ._base import _VolumeTransform, _check_connectivity, _probability

class Binarize(_VolumeTransform):
    """Probability -> uint8 mask: ``p > threshold``, or hysteresis thresholding.

    With ``hysteresis_low`` set (``hysteresis_low <= threshold``), the mask is the union of the
    26-connected components of ``p > hysteresis_low`` that contain at least one voxel with
    ``p > threshold`` (the semantics of ``skimage.filters.apply_hysteresis_threshold``, computed with
    cc3d). Weak voxels that continue a confident sheet are kept (fewer holes and splits: TopoF1_1,
    VOI split term), weak blobs with no confident voxel are dropped (fewer spurious components:
    TopoF1_0, VOI). Strict ``>`` as in scikit-image, so ``hysteresis_low == threshold`` equals the
    plain threshold. NaN is below every threshold.
    """

    def __init__(self, threshold: float = 0.5, hysteresis_low: float | None = None, connectivity: int = 26):
        if threshold is None:
            raise ValueError("Binarize: threshold must be a number, got None.")
        if hysteresis_low is not None and hysteresis_low > threshold:
            raise ValueError(
                f"Binarize: hysteresis_low ({hysteresis_low}) must not exceed threshold ({threshold})."
            )
        self.threshold = float(threshold)
        self.hysteresis_low = None if hysteresis_low is None else float(hysteresis_low)
        self.connectivity = _check_connectivity(connectivity, "Binarize: connectivity")

    def apply_volume(self, vol: np.ndarray) -> np.ndarray:
        high = vol > self.threshold
        if self.hysteresis_low is None or self.hysteresis_low == self.threshold:
            return high
        import cc3d

        low = np.ascontiguousarray(vol > self.hysteresis_low)
        labels, n = cc3d.connected_components(low, connectivity=self.connectivity, return_N=True)
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.unique(labels[high])] = True
        keep[0] = False
        return keep[labels]



class GaussianSmooth(_VolumeTransform):
    """Gaussian smoothing of a probability map (``sigma`` voxels); the ``Binarize`` after it re-thresholds.

    ``scipy.ndimage.gaussian_filter`` (kernel radius ``int(4 sigma + 0.5)``, the volume continued
    beyond its faces by its border values, so a sheet crossing a face keeps its border layer); NaN
    counts as 0. Returns a float32 map, not a mask: in a pipeline it must be followed by ``Binarize``
    (applied to a 0/1 mask and re-thresholded at 0.5 it is the Gaussian mask smoothing of the 9th
    place). Metric: an isolated confident voxel or thin spur averages down below the threshold (fewer
    spurious components: TopoF1_0, VOI), a pinhole in a confident sheet averages up and closes
    (TopoF1_1); a sheet's faces move by less than a voxel (SurfaceDice almost unchanged) but a thin
    sheet of moderate confidence fades below the threshold (SurfaceDice and VOI split lost): tune
    ``sigma`` with the threshold. ``sigma`` 0 / None: no smoothing (NaN still becomes 0).
    """

    produces_probability = True

    def __init__(self, sigma: float | None = 1.0):
        if sigma is not None and not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ValueError(f"GaussianSmooth: sigma must be a number >= 0 or None, got {sigma!r}.")
        self.sigma = float(sigma or 0.0)

    def apply_volume(self, vol: np.ndarray) -> np.ndarray:
        p = _probability(vol)
        if not self.sigma or p.size == 0:
            return p
        from scipy import ndimage

        return ndimage.gaussian_filter(p, self.sigma, mode="nearest")
