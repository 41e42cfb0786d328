"""Whole-scroll inference: a Zarr volume in, an OME-Zarr prediction out, one Dask task per block, resumable.

    python -m custom_components.inference.predict_zarr --input PATH[::ARRAY] --output OUT.zarr --ckpt_path model.pt \\
        [--level 0] [--overlap 0.5] [--region z0:z1,y0:y1,x0:x1] [--block 256] [--scheduler local|ADDRESS]
        [--workers N] [--save_probabilities true] [--save_mask true] [--intensity_range LO HI]

The volume is cut into blocks of ``--block`` voxels on a grid anchored at voxel 0 (a multiple of the output
chunks, so that no two blocks write one chunk). One Dask task per block (``dask.distributed``; a local
cluster by default: one worker per GPU, else ``--workers`` CPU workers with ``--threads_per_worker`` torch
threads each; or the scheduler at ``--scheduler ADDRESS``) reads the block's context from the input, runs
every window of the whole volume's sliding-window grid that overlaps the block grown by the
post-processing margin (``window_grid``: the result equals ``inference.json``'s on the whole volume and
does not depend on block size or worker count), runs the per-voxel post-processing
(``block_postprocess``), writes its chunks of ``mask/0`` and ``probabilities/0`` (uint8, ``round(255 p)``)
and then, last, marks itself done in ``blocks_done`` (one chunk per block). Each worker loads the network
once. A rerun with the same settings skips the blocks marked done (a block killed half-way is simply run
again: its writes are whole chunks, each replaced atomically); different settings are refused, naming them,
unless ``--overwrite true``. ``--region`` restricts the run to the blocks it touches (it is widened to whole
blocks); the output always has the input's shape, so regions fill one output run by run.

Networks: from the checkpoint(s) (``resolve_network_specs``: ``--patch_size`` / ``--filters`` /
``--deep_supr_num`` only checked against them); several checkpoints are fused as ``inference.json`` fuses
them (``LogitEnsemble``: each member blended on its own window grid, weighted logits, one sigmoid), with
its mirror / quarter-turn TTA. Input: uint8 is scaled by ``/255`` as in training; any other
dtype needs ``--intensity_range LO HI`` (``LO`` -> 0, ``HI`` -> 1, clipped; the summary counts the voxels
clipped), so a uint16 scan never saturates silently. The voxel size is read from the OME-Zarr metadata and
a warning names it when it differs from ``--train_voxel_size`` (micrometres) by more than 5 %.

Prints a progress bar (voxels/s, ETA) and a closing table (blocks, seconds, voxels/s, CPU-seconds per
million voxels, windows run and their redundancy, peak memory per worker), then one JSON line; the same
summary is stored in the output group's attributes (``predict_zarr.summary``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import re
import resource
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np
import torch

from custom_components.inference.block_postprocess import block_postprocess
from custom_components.inference.window_grid import (
    Member,
    WindowGrid,
    block_boxes,
    box_shape,
    grow_box,
    importance_map,
    predict_box,
)

__all__ = ["predict_zarr", "parse_region", "run_block", "main", "summary_table", "SLOW_BLOCK_ENV", "DEFAULT_TRAIN_VOXEL_SIZE_UM"]

logger = logging.getLogger("vesuvius.inference")

#: test hook: seconds each block sleeps before its work (widens the window a SIGKILL can hit)
SLOW_BLOCK_ENV = "VESUVIUS_PREDICT_ZARR_SLOW_BLOCK_S"

#: the voxel size the bundle's networks are trained at, micrometres (the Kaggle volumes are cut from scans
#: at ~7.91 um); ``--train_voxel_size`` overrides it, 0 switches the check off
DEFAULT_TRAIN_VOXEL_SIZE_UM = 7.91

PRODUCTS = ("mask", "probabilities")


# ------------------------------------------------------------------------------------------ settings


def _triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        value = [int(v) for v in value.split(",")]
    if isinstance(value, (int, np.integer)):
        value = [int(value)] * 3
    value = [int(v) for v in value]
    if len(value) == 1:
        value = value * 3
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"--{name} must be one positive int or three (Z,Y,X), got {value}.")
    return tuple(value)


def parse_region(region, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """``"z0:z1,y0:y1,x0:x1"`` (an empty bound is the volume's edge: ``":,100:200,:"``) -> ((z0, z1), ...)."""
    if region is None or region == "" or region == []:
        return None
    parts = region.split(",") if isinstance(region, str) else list(region)
    if len(parts) != 3:
        raise ValueError(f"--region {region!r}: give three ranges z0:z1,y0:y1,x0:x1.")
    out = []
    for part, n, axis in zip(parts, shape, "zyx"):
        if isinstance(part, str):
            m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", part)
            if not m:
                raise ValueError(f"--region {region!r}: '{part}' is not a range a:b.")
            a = int(m.group(1)) if m.group(1) else 0
            b = int(m.group(2)) if m.group(2) else n
        else:
            a, b = (int(v) for v in part)
        if not 0 <= a < b <= n:
            raise ValueError(f"--region {region!r}: {axis} range {a}:{b} is empty or outside the volume's 0:{n}.")
        out.append((a, b))
    return tuple(out)


def _absolute(spec: str) -> str:
    """A local input path made absolute (workers may run elsewhere), the ``::ARRAY`` part kept."""
    path, sep, inner = str(spec).partition("::")
    if "://" in path or not os.path.exists(path):
        return spec
    return os.path.abspath(path) + sep + inner


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off", "none"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _check_voxel_size(vol, train_um: float | None) -> str | None:
    """A warning (also logged) when the input's voxel size differs from training's by more than 5 %."""
    if not train_um:
        return None
    have = vol.voxel_size_um()
    if have is None:
        msg = (f"input {vol.spec}: voxel size unknown ({'; '.join(vol.notes) or 'no unit'}); the network was trained "
               f"at {train_um} um: check the scan's resolution.")
    elif any(abs(v - train_um) > 0.05 * train_um for v in have):
        msg = (f"input {vol.spec}: voxel size {[round(v, 4) for v in have]} um differs from training's {train_um} um; "
               "predictions at another resolution are unvalidated (choose the --level nearest to it).")
    else:
        return None
    logger.warning(msg)
    return msg


# ------------------------------------------------------------------------------------------ the worker side

_STATE: dict = {}
_LOADS = [0]


def _pick_device(setting: str) -> torch.device:
    """``auto``: on a Dask worker named by an int (a local cluster), GPU ``name % count``; else the current GPU;
    without CUDA, the CPU."""
    if setting != "auto":
        return torch.device(setting)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def _worker_state(job: dict) -> dict:
    """What a worker keeps between blocks of one run: network, input, output arrays, post-processing."""
    state = _STATE.get(job["token"])
    if state is not None:
        return state
    import zarr

    from custom_components.inference.ensemble import LogitEnsemble
    from custom_components.inference.sliding_window import load_ensemble_members
    from custom_components.inference.zarr_io import open_input

    torch.set_num_threads(int(job["threads_per_worker"]))
    device = _pick_device(job["device"])
    specs = job["network_specs"]
    ensemble = LogitEnsemble(load_ensemble_members(specs, job["ckpt_path"], device), weights=job["ensemble_weights"],
                             tta_flips=job["tta_flips"], tta_rotations=job["tta_rotations"],
                             rotation_axis=job["tta_rotation_axis"]).eval()
    amp = bool(job["amp"]) and device.type == "cuda"

    def member_logits(i):
        def logits(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return ensemble.member_logits(i, x)
        return logits

    members = [Member(WindowGrid(tuple(job["shape"]), tuple(spec["patch_size"]), float(job["overlap"])), member_logits(i),
                      ensemble.weights[i], importance_map(spec["patch_size"], device)) for i, spec in enumerate(specs)]
    out = zarr.open_group(job["output"], mode="r+")
    state = {
        "device": device,
        "members": members,
        "input": open_input(job["input"], job["level"]),
        "arrays": {name: out[f"{name}/0"] for name in job["products"]},
        "done": out["blocks_done"],
        "post": block_postprocess(**job["post"]),
        "loaded_at": time.time(),
        "blocks": 0,
    }
    _STATE.clear()
    _STATE[job["token"]] = state
    _LOADS[0] += 1
    return state


def network_loads() -> int:
    """How many times this process has loaded a network (once per run, whatever the number of its blocks)."""
    return _LOADS[0]


def run_block(job: dict, index: Sequence[int], box) -> dict:
    """Predict, post-process and write one block, then mark it done; returns its figures."""
    from custom_components.inference.zarr_io import read_box

    wall0, cpu0 = time.perf_counter(), time.process_time()
    if os.environ.get(SLOW_BLOCK_ENV):
        time.sleep(float(os.environ[SLOW_BLOCK_ENV]))
    state = _worker_state(job)
    vol, post = state["input"], state["post"]
    box = tuple(tuple(int(v) for v in b) for b in box)
    prob_box = grow_box(box, post.margin, vol.shape)
    kept = {}

    def read(raw_box):
        kept["raw"], kept["box"] = read_box(vol, raw_box, job["missing_chunks"]), raw_box
        return kept["raw"]

    prob, n_windows = predict_box(state["members"], prob_box, read, tuple(job["intensity"]), job["sw_batch_size"],
                                  state["device"])
    own = tuple(slice(a - p0, b - p0) for (a, b), (p0, _) in zip(box, prob_box))
    target = tuple(slice(a, b) for a, b in box)
    if "mask" in state["arrays"]:
        state["arrays"]["mask"][target] = post(prob, prob_box, box)
    if "probabilities" in state["arrays"]:
        state["arrays"]["probabilities"][target] = np.rint(prob[own] * 255.0).astype(np.uint8)
    raw_own = kept["raw"][tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(box, kept["box"]))]
    lo, hi = job["intensity"]
    clipped = int(np.count_nonzero((raw_own < lo) | (raw_own > hi))) if job["count_clipped"] else 0
    state["done"][tuple(slice(i, i + 1) for i in index)] = 1  # last: the block's chunks are all written
    state["blocks"] += 1
    gpu = torch.cuda.max_memory_allocated(state["device"]) / 2**20 if state["device"].type == "cuda" else 0.0
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except (ImportError, ValueError):
        worker = f"pid{os.getpid()}"
    return {"index": list(index), "voxels": int(math.prod(box_shape(box))), "windows": n_windows,
            "seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0, "clipped": clipped,
            "worker": worker, "pid": os.getpid(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": gpu, "network_loads": network_loads(), "blocks_on_worker": state["blocks"]}


# ------------------------------------------------------------------------------------------ the driver


def _open_output(output: str, record: dict, shape, chunks, zarr_format: int, grid_counts, vol, products, overwrite: bool):
    """Create the output group, or reopen it after checking that it holds this run's record."""
    import zarr

    from custom_components.inference.zarr_io import create_image

    exists = os.path.exists(os.path.join(output, "zarr.json")) or os.path.exists(os.path.join(output, ".zgroup"))
    if exists and not overwrite:
        group = zarr.open_group(output, mode="r+")
        old = dict(group.attrs).get("predict_zarr", {}).get("run")
        if old != record:
            if old is None:
                raise ValueError(f"--output {output} exists and was not written by predict_zarr: give another --output "
                                 "or --overwrite true.")
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            details = "; ".join(f"{k}: {old.get(k)!r} then, {record.get(k)!r} now" for k in diff)
            raise ValueError(f"--output {output} holds a run with other settings ({details}): give the same settings to "
                             "resume it, another --output, or --overwrite true to start over.")
        return group, True
    if exists:
        import shutil

        shutil.rmtree(output)
    group = zarr.open_group(output, mode="w", zarr_format=zarr_format)
    for name in products:
        create_image(group, name, shape, chunks, zarr_format, vol.voxel_size, vol.unit, vol.translation)
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    group.create_array("blocks_done", shape=tuple(grid_counts), chunks=(1, 1, 1), dtype="uint8", fill_value=0, **kw)
    group.attrs["predict_zarr"] = {"run": record}
    return group, False


def _start_client(scheduler: str, workers: int | None, device: str, threads: int):
    from distributed import Client, LocalCluster

    for name in ("distributed", "tornado"):  # the scheduler and nannies of a local cluster log here at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if scheduler != "local":
        return Client(scheduler), None
    if workers is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() and device in ("auto", "cuda") else 0
        workers = max(gpus, 1)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR, env=env)
    client = Client(cluster)
    client.run(importlib.import_module, "custom_components.inference.predict_zarr")  # torch and MONAI imported by every worker before the clock runs
    return client, cluster


def summary_table(s: dict) -> str:
    rows = [("blocks in region", s["blocks_total"]), ("blocks already done (skipped)", s["blocks_skipped"]),
            ("blocks run", s["blocks_run"]), ("voxels run", s["voxels_run"]), ("seconds", round(s["seconds"], 2)),
            ("of which cluster start", round(s["startup_seconds"], 2)),
            ("voxels/s", round(s["voxels_per_s"])), ("CPU-s per Mvoxel", round(s["cpu_s_per_mvox"], 3)),
            ("windows run", s["windows_run"]), ("windows of the grid", s["windows_grid"]),
            ("redundancy (run / grid)", s["redundancy"]), ("clipped input voxels", s["clipped_voxels"])]
    lines = [f"{k:<32} {v}" for k, v in rows]
    lines.append(f"{'worker':<10} {'blocks':>7} {'peak RSS MB':>12} {'peak GPU MB':>12} {'network loads':>14}")
    for name, w in sorted(s["workers"].items()):
        lines.append(f"{name:<10} {w['blocks']:>7} {w['peak_rss_mb']:>12.0f} {w['peak_gpu_mb']:>12.0f} {w['network_loads']:>14}")
    return "\n".join(lines)


def predict_zarr(input: str, output: str, ckpt_path: str, level: int = 0, overlap: float = 0.5, region=None,
                 block=256, chunk=None, scheduler: str = "local", workers: int | None = None,
                 threads_per_worker: int = 1, device: str = "auto", sw_batch_size: int = 4, tta_flips: int = 1,
                 tta_rotations: int = 1, tta_rotation_axis: int = 0, ensemble_weights: Sequence[float] | None = None,
                 amp: bool = True, save_probabilities: bool = False, save_mask: bool = True,
                 intensity_range: Sequence[float] | None = None, missing_chunks: str = "error",
                 zarr_format: int | None = None, postprocess: str | None = None, threshold: float | None = 0.5,
                 hysteresis_low: float | None = None, hysteresis_margin: int = 32, smooth_sigma: float | None = 0,
                 median_iterations: int | None = 0, closing_radius: int | None = 0, closing_structure: str = "cube",
                 plug_holes: bool = False, min_component_size: int | None = 0, fill_holes: bool = False,
                 patch_size=None, filters=None, deep_supr_num=None,
                 train_voxel_size: float | None = DEFAULT_TRAIN_VOXEL_SIZE_UM, overwrite: bool = False,
                 progress: bool = True, max_in_flight: int | None = None, client=None) -> dict:
    """Run the whole-scroll prediction (module docstring); returns the summary. ``client``: an existing
    ``distributed.Client`` to use instead of ``scheduler`` (left open)."""
    from custom_components.inference.ensemble import tta_transforms
    from custom_components.inference.sliding_window import parse_ckpt_paths, resolve_network_specs
    from custom_components.inference.zarr_io import open_input, require_zarr

    require_zarr()
    # the bundle's command line (fire) passes 'false' / 'true' as strings
    save_mask, save_probabilities, amp, plug_holes, fill_holes, overwrite, progress = (
        _bool(v) for v in (save_mask, save_probabilities, amp, plug_holes, fill_holes, overwrite, progress))
    input = _absolute(input)
    output = os.path.abspath(output) if "://" not in output else output
    specs = resolve_network_specs(ckpt_path, patch_size=patch_size, filters=filters, deep_supr_num=deep_supr_num)
    rois = [_triple(s["patch_size"], "patch_size") for s in specs]
    tta_transforms(tta_flips, tta_rotations)  # checks both before any volume is read
    if ensemble_weights is not None and (len(ensemble_weights) != len(specs) or min(ensemble_weights) <= 0):
        raise ValueError(f"--ensemble_weights {list(ensemble_weights)}: give {len(specs)} positive numbers, one per "
                         "checkpoint.")
    if not (save_mask or save_probabilities):
        raise ValueError("nothing to write: --save_mask and --save_probabilities are both false.")
    post_settings = dict(path=postprocess, threshold=threshold, hysteresis_low=hysteresis_low,
                         smooth_sigma=smooth_sigma, median_iterations=median_iterations, closing_radius=closing_radius,
                         closing_structure=closing_structure, plug_holes=plug_holes,
                         min_component_size=min_component_size, fill_holes=fill_holes,
                         hysteresis_margin=hysteresis_margin)
    post = block_postprocess(**post_settings)
    if not post.exact:
        logger.warning("hysteresis thresholding per block keeps weak voxels connected to a strong one within the block "
                       "grown by %d voxels (--hysteresis_margin), not across the whole volume.", post.margin)
    vol = open_input(input, level)
    if vol.dtype == np.uint8 and intensity_range is None:
        intensity = (0.0, 255.0)
    elif intensity_range is None:
        raise ValueError(f"input {input} is {vol.dtype}; the network was trained on uint8 scans scaled by 1/255. Give "
                         "--intensity_range LO HI (the scan values that map to 0 and 255 in training's uint8 scans); "
                         "voxels outside it are clipped and counted in the summary.")
    else:
        intensity = tuple(float(v) for v in intensity_range)
        if len(intensity) != 2 or not intensity[1] > intensity[0]:
            raise ValueError(f"--intensity_range {list(intensity_range)}: give LO HI with HI > LO.")
    voxel_warning = _check_voxel_size(vol, train_voxel_size)
    shape = vol.shape
    block = _triple(block, "block")
    chunk = _triple(chunk if chunk is not None else [min(b, 128) if b % min(b, 128) == 0 else b for b in block], "chunk")
    if any(b % c for b, c in zip(block, chunk)):
        raise ValueError(f"--block {list(block)} must be a multiple of the output --chunk {list(chunk)}, so that no two "
                         "blocks write one chunk.")
    grids = [WindowGrid(shape, roi, float(overlap)) for roi in rois]
    region_box = parse_region(region, shape)
    blocks = block_boxes(shape, block, region_box)
    grid_counts = tuple(-(-n // b) for n, b in zip(shape, block))
    zarr_format = int(zarr_format or vol.array.metadata.zarr_format)
    products = tuple(p for p, on in zip(PRODUCTS, (save_mask, save_probabilities)) if on)
    record = {"input": input, "level": vol.level, "shape": list(shape), "dtype": str(vol.dtype),
              "intensity": list(intensity), "ckpt_sha256": [_sha256(p) for p in parse_ckpt_paths(ckpt_path)],
              "network_specs": specs, "ensemble_weights": None if ensemble_weights is None else [float(w) for w in ensemble_weights],
              "tta": [int(tta_flips), int(tta_rotations), int(tta_rotation_axis)], "overlap": float(overlap), "amp": bool(amp),
              "block": list(block), "chunk": list(chunk), "postprocess": post.config(), "products": list(products),
              "zarr_format": zarr_format}
    group, resumed = _open_output(output, record, shape, chunk, zarr_format, grid_counts, vol, products, overwrite)
    done = group["blocks_done"][...]
    todo = [(i, b) for i, b in blocks if not done[i]]
    job = {"token": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16], "input": input,
           "level": vol.level, "output": output, "ckpt_path": ckpt_path, "network_specs": specs,
           "ensemble_weights": record["ensemble_weights"], "shape": list(shape), "overlap": float(overlap),
           "tta_flips": int(tta_flips), "tta_rotations": int(tta_rotations), "tta_rotation_axis": int(tta_rotation_axis),
           "amp": bool(amp),
           "device": device, "threads_per_worker": int(threads_per_worker), "sw_batch_size": int(sw_batch_size),
           "intensity": list(intensity), "count_clipped": not (vol.dtype == np.uint8 and intensity == (0.0, 255.0)),
           "missing_chunks": missing_chunks, "products": list(products), "post": post_settings}
    region_of_blocks = tuple((min(b[a][0] for _, b in blocks), max(b[a][1] for _, b in blocks)) for a in range(3))
    windows_grid = sum(math.prod(len(w) for w in g.windows_for(region_of_blocks)) for g in grids)
    results, t0, startup = [], time.perf_counter(), 0.0
    own_client = client is None
    cluster = None
    if todo:
        from distributed import as_completed
        from tqdm import tqdm

        if own_client:
            client, cluster = _start_client(scheduler, workers, device, int(threads_per_worker))
        startup = time.perf_counter() - t0
        try:
            n_workers = max(1, len(client.scheduler_info()["workers"]))
            limit = int(max_in_flight or 2 * n_workers)
            run_id = uuid.uuid4().hex[:8]
            queue = iter(todo)
            futures = {}

            def submit():
                item = next(queue, None)
                if item is None:
                    return None
                index, box = item
                fut = client.submit(run_block, job, index, box, key=f"predict-block-{run_id}-{'-'.join(map(str, index))}",
                                    pure=False)
                futures[fut.key] = (index, box)
                return fut

            pending = as_completed([f for f in (submit() for _ in range(limit)) if f is not None])
            with tqdm(total=sum(math.prod(box_shape(b)) for _, b in todo), unit="vox", unit_scale=True,
                      desc="predict_zarr", disable=not progress, file=sys.stderr) as bar:
                for fut in pending:
                    index, box = futures.pop(fut.key)
                    try:
                        res = fut.result()
                    except Exception as e:
                        for other in list(pending.futures):
                            other.cancel()
                        raise ValueError(f"block {list(index)} (voxels {[list(b) for b in box]}) failed: "
                                         f"{type(e).__name__}: {e}. Blocks finished so far are recorded; rerun the same "
                                         "command to continue.") from e
                    results.append(res)
                    bar.update(res["voxels"])
                    nxt = submit()
                    if nxt is not None:
                        pending.add(nxt)
        finally:
            if own_client:
                client.close()
                if cluster is not None:
                    cluster.close()
    seconds = time.perf_counter() - t0
    workers_seen: dict = {}
    for r in results:
        w = workers_seen.setdefault(r["worker"], {"blocks": 0, "peak_rss_mb": 0.0, "peak_gpu_mb": 0.0,
                                                  "network_loads": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        w["blocks"] += 1
        w["peak_rss_mb"] = max(w["peak_rss_mb"], r["peak_rss_mb"])
        w["peak_gpu_mb"] = max(w["peak_gpu_mb"], r["peak_gpu_mb"])
        w["network_loads"] = max(w["network_loads"], r["network_loads"])
        w["seconds"] += r["seconds"]
        w["cpu_seconds"] += r["cpu_seconds"]
    voxels = sum(r["voxels"] for r in results)
    windows_run = sum(r["windows"] for r in results)
    summary = {
        "output": output, "resumed": resumed, "shape": list(shape), "rois": [list(r) for r in rois], "block": list(block),
        "chunk": list(chunk), "blocks_total": len(blocks), "blocks_skipped": len(blocks) - len(todo),
        "blocks_run": len(results), "voxels_run": voxels, "seconds": seconds,
        "startup_seconds": startup, "voxels_per_s": voxels / (seconds - startup) if seconds > startup and voxels else 0.0,
        "cpu_s_per_mvox": sum(r["cpu_seconds"] for r in results) / (voxels / 1e6) if voxels else 0.0,
        "block_seconds_mean": float(np.mean([r["seconds"] for r in results])) if results else 0.0,
        "block_seconds_median": float(np.median([r["seconds"] for r in results])) if results else 0.0,
        "windows_run": windows_run, "windows_grid": windows_grid,
        "redundancy": round(windows_run / windows_grid, 3) if results and len(todo) == len(blocks) else None,
        "clipped_voxels": sum(r["clipped"] for r in results), "voxel_size_warning": voxel_warning,
        "postprocess_exact": post.exact, "workers": workers_seen,
    }
    attrs = dict(group.attrs).get("predict_zarr", {})
    group.attrs["predict_zarr"] = {**attrs, "run": record, "summary": summary}
    if voxels and summary["clipped_voxels"]:
        frac = summary["clipped_voxels"] / voxels
        logger.warning("%.3f %% of the input voxels lay outside --intensity_range %s and were clipped.", 100 * frac,
                       list(intensity))
    return summary


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m custom_components.inference.predict_zarr",
                                description=__doc__.split("\n\n")[0],
                                epilog="Every setting of the bundle config bundle/configs/predict_zarr.json.")
    p.add_argument("--input", required=True, help="Zarr array or OME-Zarr multiscale group: PATH[::ARRAY]")
    p.add_argument("--output", required=True, help="output Zarr group (OUT.zarr)")
    p.add_argument("--ckpt_path", required=True, help="checkpoint(s) or TorchScript export; comma-separated = ensemble")
    p.add_argument("--level", type=int, default=0, help="multiscale level of an OME-Zarr input (default 0)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5, as inference.json)")
    p.add_argument("--region", default=None, help="z0:z1,y0:y1,x0:x1 (widened to whole blocks)")
    p.add_argument("--block", default="256", help="block edge in voxels, or Z,Y,X (default 256)")
    p.add_argument("--chunk", default=None, help="output chunk edge (default min(block, 128)); divides --block")
    p.add_argument("--scheduler", default="local", help="'local' (a local Dask cluster) or a scheduler ADDRESS")
    p.add_argument("--workers", type=int, default=None, help="local workers (default: one per GPU, else 1)")
    p.add_argument("--threads_per_worker", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--sw_batch_size", type=int, default=4)
    p.add_argument("--tta_flips", type=int, default=1, help="mirrorings per member, 1..8 (default 1: none)")
    p.add_argument("--tta_rotations", type=int, default=1, help="quarter turns, 1..4 (default 1: none)")
    p.add_argument("--tta_rotation_axis", type=int, default=0, help="axis of the quarter turns: 0 (Z), 1 (Y), 2 (X)")
    p.add_argument("--ensemble_weights", type=float, nargs="+", default=None, help="one weight per checkpoint")
    p.add_argument("--amp", type=_bool, default=True, help="bf16 autocast on CUDA (default true)")
    p.add_argument("--save_probabilities", type=_bool, default=False, help="write probabilities/0 as uint8 round(255 p)")
    p.add_argument("--save_mask", type=_bool, default=True, help="write mask/0 (default true)")
    p.add_argument("--intensity_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="map LO..HI to 0..1 (required for input that is not uint8)")
    p.add_argument("--missing_chunks", choices=("error", "fill"), default="error",
                   help="an input chunk never written: error (default) or read as the fill value")
    p.add_argument("--zarr_format", type=int, choices=(2, 3), default=None, help="output format (default: the input's)")
    p.add_argument("--postprocess", default=None, help="postprocess.json of per-voxel steps (replaces the settings below)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--hysteresis_low", type=float, default=None)
    p.add_argument("--hysteresis_margin", type=int, default=32, help="context of hysteresis per block (voxels)")
    p.add_argument("--smooth_sigma", type=float, default=0)
    p.add_argument("--median_iterations", type=int, default=0)
    p.add_argument("--closing_radius", type=int, default=0)
    p.add_argument("--closing_structure", default="cube")
    p.add_argument("--plug_holes", type=_bool, default=False)
    p.add_argument("--min_component_size", type=int, default=0, help="refused if > 1: needs whole components")
    p.add_argument("--fill_holes", type=_bool, default=False, help="refused if true: needs whole components")
    p.add_argument("--patch_size", type=int, nargs=3, default=None, help="checked against the checkpoint")
    p.add_argument("--filters", type=int, nargs="+", default=None, help="checked against the checkpoint")
    p.add_argument("--deep_supr_num", type=int, default=None, help="checked against the checkpoint")
    p.add_argument("--train_voxel_size", type=float, default=DEFAULT_TRAIN_VOXEL_SIZE_UM,
                   help=f"training's voxel size in um, for the check (default {DEFAULT_TRAIN_VOXEL_SIZE_UM}; 0: off)")
    p.add_argument("--overwrite", type=_bool, default=False, help="start over in an --output that holds another run")
    p.add_argument("--progress", type=_bool, default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = predict_zarr(**args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
