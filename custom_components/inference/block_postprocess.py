"""Post-processing one block of a whole-scroll prediction: the per-voxel steps, exactly, on a margin.

A step whose output at a voxel depends only on its input within a fixed distance (its *reach*) gives,
on a box grown by the sum of the reaches of the pipeline's steps, the same values inside the original
box as on the whole volume: the grown box is clipped at the volume's faces, where every step already
treats the face as the whole-volume run does (``mode="nearest"`` / edge padding / outside = background),
and the errors made at the inner faces of the grown box travel at most one reach per step.

Reach per step (``custom_components.inference.postprocess``):

- ``smooth`` (``GaussianSmooth``, sigma): ``int(4 sigma + 0.5)``, scipy's kernel radius;
- ``binarize`` (``Binarize``): 0 for a plain threshold; with ``hysteresis_low`` the weak voxels kept are
  those connected to a strong one *within the block grown by* ``hysteresis_margin`` (not exact: a weak
  path that leaves that box is cut, so a weak voxel can be dropped that the whole volume keeps);
- ``median`` (``BinaryMedian``, n iterations): n (its early stop changes nothing inside the box);
- ``closing`` (``BinaryClosing``, radius r): 2 r (dilation then erosion);
- ``plug_holes`` (``PlugHoles``): 1.

Steps that need whole connected components (``dust``, ``fill_holes``, ``unmerge``, ``height_map_fill``,
``tunnel_repair``) are refused with a ``ValueError`` naming the step: a block does not see a component
that crosses its faces.
"""

from __future__ import annotations

import numpy as np

from custom_components.inference.postprocess import (
    BinaryClosing,
    BinaryMedian,
    Binarize,
    FillHoles,
    GaussianSmooth,
    PlugHoles,
    PostProcess,
    RemoveSmallComponents,
    STEPS,
    load_postprocess,
)
from custom_components.inference.window_grid import Box

__all__ = ["BlockPostProcess", "block_postprocess", "step_reach", "PER_VOXEL_STEPS"]

#: the steps a block can run, by their ``postprocess.json`` name
PER_VOXEL_STEPS = ("smooth", "binarize", "median", "closing", "plug_holes")


def _is_noop(step) -> bool:
    """A step that its settings switch off (``dust`` with min_size <= 1, ``fill_holes`` disabled, ...)."""
    if isinstance(step, RemoveSmallComponents):
        return step.min_size <= 1
    if isinstance(step, FillHoles):
        return not step.enabled or step.max_hole_size == 0
    if isinstance(step, (BinaryMedian,)):
        return not step.iterations
    if isinstance(step, BinaryClosing):
        return not step.radius
    if isinstance(step, PlugHoles):
        return not step.enabled
    return bool(getattr(step, "enabled", True) is False)


def step_reach(step, hysteresis_margin: int) -> int:
    """Voxels beyond which ``step``'s input cannot change its output at a voxel (module docstring)."""
    if isinstance(step, GaussianSmooth):
        return int(4.0 * step.sigma + 0.5) if step.sigma else 0
    if isinstance(step, Binarize):
        plain = step.hysteresis_low is None or step.hysteresis_low == step.threshold
        return 0 if plain else int(hysteresis_margin)
    if isinstance(step, BinaryMedian):
        return int(step.iterations)
    if isinstance(step, BinaryClosing):
        return 2 * int(step.radius)
    if isinstance(step, PlugHoles):
        return 1
    name = next((n for n, cls in STEPS.items() if type(step) is cls), type(step).__name__)
    raise ValueError(
        f"post-processing step '{name}' needs whole connected components, which one block of a whole-scroll "
        f"prediction does not see; predict_zarr runs only the per-voxel steps {list(PER_VOXEL_STEPS)} per block. "
        f"Leave '{name}' out (--min_component_size 0, --fill_holes false, or a postprocess.json without it) and "
        f"apply it to the written mask afterwards."
    )


class BlockPostProcess:
    """A ``PostProcess`` of per-voxel steps with its ``margin`` (sum of reaches) and whether it is ``exact``."""

    def __init__(self, pipeline: PostProcess, hysteresis_margin: int = 32):
        steps = [s for s in pipeline.steps if not _is_noop(s)]
        self.hysteresis_margin = int(hysteresis_margin)
        self.margin = sum(step_reach(s, self.hysteresis_margin) for s in steps)
        self.exact = not any(isinstance(s, Binarize) and s.hysteresis_low is not None and s.hysteresis_low != s.threshold
                             for s in steps)
        if not any(isinstance(s, Binarize) for s in steps):
            raise ValueError("predict_zarr post-processing must binarize the probabilities: give a threshold "
                             "(--threshold 0.5) or a postprocess.json with a 'binarize' step.")
        self.pipeline = PostProcess(steps=steps)

    def config(self) -> dict:
        from custom_components.inference.postprocess import pipeline_config

        return {**pipeline_config(self.pipeline), "margin": self.margin, "exact": self.exact}

    def __call__(self, prob: np.ndarray, prob_box: Box, block: Box) -> np.ndarray:
        """The uint8 0/1 mask of ``block`` from the probabilities ``prob`` of the grown box ``prob_box``."""
        mask = self.pipeline.apply_volume(prob)
        inner = tuple(slice(a - p0, b - p0) for (a, b), (p0, _) in zip(block, prob_box))
        return np.ascontiguousarray(mask[inner], dtype=np.uint8)


def block_postprocess(path: str | None = None, threshold: float | None = 0.5, hysteresis_low: float | None = None,
                      smooth_sigma: float | None = 0, median_iterations: int | None = 0, closing_radius: int | None = 0,
                      closing_structure: str = "cube", plug_holes: bool = False, min_component_size: int | None = 0,
                      fill_holes: bool = False, hysteresis_margin: int = 32) -> BlockPostProcess:
    """The ``postprocess.json`` at ``path`` (its steps exactly, the settings ignored), else the steps the settings
    enable, in ``PostProcess``'s order; ``ValueError`` naming a step that needs whole components."""
    if path:
        pipeline = load_postprocess(path).transform
    else:
        pipeline = PostProcess(threshold=threshold, hysteresis_low=hysteresis_low, min_size=min_component_size,
                               closing_radius=closing_radius, closing_structure=closing_structure,
                               fill_holes=fill_holes, smooth_sigma=smooth_sigma, median_iterations=median_iterations,
                               plug_holes=plug_holes)
    return BlockPostProcess(pipeline, hysteresis_margin=hysteresis_margin)
