"""``PostProcess``: the steps in their order, from settings or from a ``postprocess.json`` (load, save, checks)."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection

from ._base import DEFAULT_MIN_SIZE, _VolumeTransform, _VolumeTransformd, _mask, _to_volume
from .height_map import HeightMapFill
from .morphology import BinaryClosing, BinaryMedian, FillHoles, PlugHoles, RemoveSmallComponents
from .threshold import Binarize, GaussianSmooth
from .tunnels import TunnelRepair
from .unmerge import Unmerge

def _steps_from_settings(
    threshold, hysteresis_low, min_size, closing_radius, closing_structure, fill_holes, max_hole_size, connectivity,
    dust_connectivity=None, smooth_sigma=0, median_iterations=0, unmerge=False, plug_holes=False,
    height_map_fill=False, max_hole_area=5000, tunnel_repair=False,
) -> list[_VolumeTransform]:
    steps: list[_VolumeTransform] = []
    if smooth_sigma:
        steps.append(GaussianSmooth(smooth_sigma))
    if threshold is not None:
        steps.append(Binarize(threshold, hysteresis_low, connectivity=connectivity))
    if median_iterations:
        steps.append(BinaryMedian(median_iterations))
    if closing_radius:
        steps.append(BinaryClosing(closing_radius, structure=closing_structure))
    if min_size:
        steps.append(RemoveSmallComponents(min_size, connectivity=dust_connectivity or connectivity))
    if unmerge:
        steps.append(Unmerge(threshold=0.5 if threshold is None else threshold))
    if plug_holes:
        steps.append(PlugHoles())
    if height_map_fill:
        steps.append(HeightMapFill(max_hole_area))
    if tunnel_repair:
        steps.append(TunnelRepair())
    if fill_holes:
        steps.append(FillHoles(max_hole_size))
    return steps


def _check_order(steps: Sequence) -> None:
    """A ``GaussianSmooth`` returns a float map: the step after it must re-threshold (``Binarize``)."""
    for i, step in enumerate(steps):
        if isinstance(step, GaussianSmooth):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            if not isinstance(nxt, (GaussianSmooth, Binarize)):
                after = "nothing" if nxt is None else type(nxt).__name__
                raise ValueError(
                    f"PostProcess: step {i} (GaussianSmooth) returns a probability map and must be followed by "
                    f"Binarize, not by {after}."
                )


class PostProcess(_VolumeTransform):
    """The post-processing pipeline: ``steps`` in order, or the steps that the settings enable.

    Either ``PostProcess(steps=[Binarize(...), RemoveSmallComponents(...), ...])`` (what
    ``load_postprocess`` builds from a ``postprocess.json``) or the settings of ``postprocess`` (each
    step disabled by None / 0 / False):

    - ``threshold=0.5``, ``hysteresis_low=None``: plain threshold at 0.5 (the network is trained with
      BCE, so 0.5 is its calibrated decision point); ``threshold=None`` when the input is already a mask.
    - ``closing_radius=0``: off, since closing can merge neighbouring sheets (VOI, TopoF1_0);
      ``closing_structure`` see ``BinaryClosing``.
    - ``min_size=DEFAULT_MIN_SIZE`` (64): dust removal, the step worth most for TopoF1_0 and VOI;
      ``dust_connectivity`` (6, 18 or 26; None: ``connectivity``, which hysteresis uses too).
    - ``fill_holes=True``, ``max_hole_size=None``: every enclosed cavity is spurious for a sheet.
    - off by default: ``smooth_sigma`` (``GaussianSmooth`` before the threshold), ``median_iterations``
      (``BinaryMedian``), ``unmerge`` (``Unmerge``), ``plug_holes`` (``PlugHoles``), ``height_map_fill``
      with ``max_hole_area`` (``HeightMapFill``), ``tunnel_repair`` (``TunnelRepair``), each with its
      class's defaults for its other settings.

    Order: smooth, binarize, median, close, dust, unmerge, plug, height map, tunnels, fill (see the
    module docstring). ``steps`` (keyword) replaces the settings by an explicit list; steps that are not
    ours are called on the (Z, Y, X) numpy volume and must return a volume of the same shape. Steps
    that need the probability map (``Unmerge``) get the pipeline's input, or the output of the last
    ``GaussianSmooth``.
    """

    def __init__(
        self,
        threshold: float | None = 0.5,
        hysteresis_low: float | None = None,
        min_size: int | None = DEFAULT_MIN_SIZE,
        closing_radius: int | None = 0,
        fill_holes: bool = True,
        max_hole_size: int | None = None,
        closing_structure: str = "cube",
        connectivity: int = 26,
        steps: Sequence[Callable] | None = None,
        dust_connectivity: int | None = None,
        smooth_sigma: float | None = 0,
        median_iterations: int | None = 0,
        unmerge: bool = False,
        plug_holes: bool = False,
        height_map_fill: bool = False,
        max_hole_area: int | None = 5000,
        tunnel_repair: bool = False,
    ):
        if steps is None:
            steps = _steps_from_settings(
                threshold, hysteresis_low, min_size, closing_radius, closing_structure, fill_holes, max_hole_size,
                connectivity, dust_connectivity, smooth_sigma, median_iterations, unmerge, plug_holes,
                height_map_fill, max_hole_area, tunnel_repair,
            )
        self.steps = [s for s in steps if s is not None]
        _check_order(self.steps)

    def params(self) -> dict:
        """``{"steps": [{"name": ..., settings...}, ...]}`` (``pipeline_config``)."""
        return pipeline_config(self)

    def apply_volume(self, vol: np.ndarray) -> np.ndarray:
        out = prob = vol
        for step in self.steps:
            if isinstance(step, _VolumeTransform):
                res = step.apply_volume(out, prob=prob) if step.needs_probability else step.apply_volume(out)
                if step.produces_probability:
                    prob = res
            else:
                res = _to_volume(step(out), f"PostProcess step {step!r}")
            if tuple(res.shape) != tuple(vol.shape):
                raise ValueError(
                    f"PostProcess: step {type(step).__name__} returned shape {list(res.shape)} for a volume of "
                    f"shape {list(vol.shape)}."
                )
            out = res
        return _mask(out)


def postprocess(
    prob,
    threshold: float | None = 0.5,
    hysteresis_low: float | None = None,
    min_size: int | None = DEFAULT_MIN_SIZE,
    closing_radius: int | None = 0,
    fill_holes: bool = True,
    max_hole_size: int | None = None,
    closing_structure: str = "cube",
    connectivity: int = 26,
    **more,
):
    """Apply the enabled steps (see ``PostProcess``; ``more``: its other settings) to ``prob``; same type
    and shape back, dtype uint8."""
    return PostProcess(
        threshold=threshold,
        hysteresis_low=hysteresis_low,
        min_size=min_size,
        closing_radius=closing_radius,
        closing_structure=closing_structure,
        fill_holes=fill_holes,
        max_hole_size=max_hole_size,
        connectivity=connectivity,
        **more,
    )(prob)


# --------------------------------------------------------------------------------------------- postprocess.json

#: The step names of ``postprocess.json`` and the classes they build.
STEPS: dict[str, type] = {
    "smooth": GaussianSmooth,
    "binarize": Binarize,
    "median": BinaryMedian,
    "closing": BinaryClosing,
    "dust": RemoveSmallComponents,
    "unmerge": Unmerge,
    "plug_holes": PlugHoles,
    "height_map_fill": HeightMapFill,
    "tunnel_repair": TunnelRepair,
    "fill_holes": FillHoles,
}
_NAME_OF = {cls: name for name, cls in STEPS.items()}
_TOP_KEYS = ("steps", "tuning", "_comment")


def _step_list(pipeline) -> list:
    if isinstance(pipeline, PostProcessd):
        pipeline = pipeline.transform
    if isinstance(pipeline, PostProcess):
        return list(pipeline.steps)
    return list(pipeline)


def pipeline_config(pipeline) -> dict:
    """``{"steps": [{"name": <STEPS key>, <setting>: value, ...}, ...]}`` of a ``PostProcess``,
    ``PostProcessd`` or list of steps (ValueError naming a step that is not one of ``STEPS``)."""
    out = []
    for i, step in enumerate(_step_list(pipeline)):
        name = _NAME_OF.get(type(step))
        if name is None:
            raise ValueError(f"pipeline_config: step {i} ({step!r}) is not one of the named steps {sorted(STEPS)}.")
        out.append({"name": name, **step.params()})
    return {"steps": out}


def _parameters(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


def pipeline_from_config(config: Mapping, where: str = "postprocess config") -> PostProcess:
    """The ``PostProcess`` that a ``postprocess.json`` dict names, steps in the file's order.

    Top-level keys: ``steps`` (required, a list), ``tuning`` and ``_comment`` (kept for the reader,
    ignored). Each step: ``{"name": <one of STEPS>, <parameter of that class>: value, ...}``; missing
    parameters take the class's defaults. ``ValueError`` naming ``where``, the step's index and the
    unknown key / step / bad value.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: expected a JSON object with a 'steps' list, got {type(config).__name__}.")
    unknown = [k for k in config if k not in _TOP_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}.")
    steps = config.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"{where}: 'steps' must be a list of steps, got {steps!r}.")
    built = []
    for i, entry in enumerate(steps):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ValueError(f"{where}: step {i} must be an object with a 'name', got {entry!r}.")
        name = entry["name"]
        cls = STEPS.get(name)
        if cls is None:
            raise ValueError(f"{where}: step {i} names an unknown step {name!r}; known steps: {sorted(STEPS)}.")
        allowed = _parameters(cls)
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        bad = [k for k in kwargs if k not in allowed]
        if bad:
            raise ValueError(
                f"{where}: step {i} ({name!r}) has unknown parameter(s) {bad}; the parameters of {name!r} are {allowed}."
            )
        try:
            built.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: step {i} ({name!r}): {e}") from e
    try:
        return PostProcess(steps=built)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def load_postprocess(path, keys: KeysCollection = "pred", allow_missing_keys: bool = False) -> PostProcessd:
    """The ``PostProcessd`` (on ``keys``) of the pipeline that the ``postprocess.json`` at ``path`` names
    (``pipeline_from_config``); ValueError naming the file for a missing / unparsable file, an unknown
    step or parameter, or a bad value."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except OSError as e:
        raise ValueError(f"post-processing file {path}: cannot read it ({e}).") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"post-processing file {path}: not valid JSON ({e}).") from e
    pipeline = pipeline_from_config(config, where=f"post-processing file {path}")
    return PostProcessd(keys, steps=pipeline.steps, allow_missing_keys=allow_missing_keys)


def save_postprocess(path, pipeline, tuning: Mapping | None = None) -> str:
    """Write ``pipeline`` (``PostProcess``, ``PostProcessd`` or list of steps) as a ``postprocess.json``
    at ``path``, atomically, with an optional ``tuning`` record; returns ``path``. ``load_postprocess``
    reads it back into the same steps."""
    from custom_components.atomic import atomic_write_json

    config = pipeline_config(pipeline)
    if tuning is not None:
        config["tuning"] = dict(tuning)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write_json(path, config)


def postprocess_transform(path=None, keys: KeysCollection = "pred", **settings) -> PostProcessd:
    """For the bundle configs: ``load_postprocess(path, keys)`` when ``path`` is given (the file's pipeline,
    exactly; ``settings`` are then ignored), else ``PostProcessd(keys, **settings)``."""
    if path:
        return load_postprocess(path, keys)
    return PostProcessd(keys, **settings)


# --------------------------------------------------------------------------------------------- functions


def binarize(prob, threshold: float = 0.5, hysteresis_low: float | None = None, connectivity: int = 26):
    """``prob > threshold`` or hysteresis thresholding as uint8 0/1 (see ``Binarize``); same type/shape back."""
    return Binarize(threshold, hysteresis_low, connectivity)(prob)


def remove_small_components(mask, min_size: int | None = DEFAULT_MIN_SIZE, connectivity: int = 26):
    """Remove components of fewer than ``min_size`` voxels; exactly ``min_size`` is kept (``RemoveSmallComponents``).

    ``cc3d.dust(mask, threshold=min_size)`` deletes components with ``size < threshold`` (cc3d's own
    semantics, checked in the tests with a component of exactly ``min_size`` voxels).
    """
    return RemoveSmallComponents(min_size, connectivity)(mask)


def binary_closing(mask, radius: int | None = 1, structure: str = "cube"):
    """Morphological closing that never erodes the volume border (see ``BinaryClosing``).

    ``structure="ball"`` (Euclidean ball) is the gentler choice on sheets several voxels thick, but it
    cannot close an in-plane gap of a 1-voxel-thick sheet; the default ``"cube"`` can.
    """
    return BinaryClosing(radius, structure)(mask)


def fill_holes(mask, max_hole_size: int | None = None, connectivity: int = 6):
    """Fill background components (6-connected) touching no face, of at most ``max_hole_size`` voxels (``FillHoles``)."""
    return FillHoles(max_hole_size, connectivity)(mask)


# --------------------------------------------------------------------------------------------- dictionary


class PostProcessd(_VolumeTransformd):
    """Dictionary version of ``PostProcess`` (the one ``bundle/configs/inference.json`` wires).

    Each key holds a probability map (or mask, with ``threshold=None``) as an ndarray, tensor or
    ``MetaTensor`` shaped (1, Z, Y, X) or (Z, Y, X); it is processed as a CPU numpy volume and comes
    back as the same type and shape with dtype uint8 / ``torch.uint8`` (a ``MetaTensor`` keeps its meta).
    Settings as in ``PostProcess``; each step is disabled by None / 0 / False. ``load_postprocess``
    builds one from a ``postprocess.json``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | None = 0.5,
        hysteresis_low: float | None = None,
        min_size: int | None = DEFAULT_MIN_SIZE,
        closing_radius: int | None = 0,
        fill_holes: bool = True,
        max_hole_size: int | None = None,
        allow_missing_keys: bool = False,
        closing_structure: str = "cube",
        connectivity: int = 26,
        steps: Sequence[Callable] | None = None,
        dust_connectivity: int | None = None,
        smooth_sigma: float | None = 0,
        median_iterations: int | None = 0,
        unmerge: bool = False,
        plug_holes: bool = False,
        height_map_fill: bool = False,
        max_hole_area: int | None = 5000,
        tunnel_repair: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = PostProcess(
            steps=steps, threshold=threshold, hysteresis_low=hysteresis_low, min_size=min_size,
            closing_radius=closing_radius, fill_holes=fill_holes, max_hole_size=max_hole_size,
            closing_structure=closing_structure, connectivity=connectivity, dust_connectivity=dust_connectivity,
            smooth_sigma=smooth_sigma, median_iterations=median_iterations, unmerge=unmerge, plug_holes=plug_holes,
            height_map_fill=height_map_fill, max_hole_area=max_hole_area, tunnel_repair=tunnel_repair,
        )
