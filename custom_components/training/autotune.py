"""Tuning without a person: the largest batch that fits, loader settings that keep the GPU fed, the run's duration.

    python -m custom_components.training.autotune --config_file bundle/configs/train.json [--config_file more.json ...]
        [--dataset_dir DIR] [--max_minutes 5] [--out tune.json] [--key value ...]

The configs are read as ``python -m monai.bundle run`` reads them (files merged in order, the other ``--key value``
pairs parsed by ``fire``, ``true``/``false`` as booleans, applied by ``ConfigParser.update``), and network, loss,
optimiser, loader, device augmentation and ``train#trainer`` are built from them: a step here is a step of the run, its
handlers cut to ``SAFE_HANDLERS`` (no file, no validation). A trial is a fresh parse at a ``batch_size`` /
``num_workers`` / ``prefetch`` and a real ``trainer.run()``: an epoch of warm-up steps, then one measured by
``ThroughputHandler`` (data wait ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``, phases by the trainer's
``step_timer``) on the same loader iterator. Trials read the first ``--volumes`` training volumes, cached for the run.

- CUDA: ``search_largest_batch`` doubles then bisects the batch; a batch fits when two real steps (the first with the
  topology term) raise no ``OutOfMemoryError`` and ``max_memory_allocated`` stays under ``--memory_fraction`` (90 %)
  of the GPU. Then ``num_workers`` x ``prefetch``, cheapest first, until data wait is under 5 % of the step.
- CPU: no out-of-memory search. Batch 1's memory is estimated on the ``meta`` device and it runs only if it fits with
  room to spare, then the configured batch (memory predicted from batch 1); step time, peak RSS (``getrusage``) and the
  bytes autograd saves are measured, the configured batch kept, and the output says ``ESTIMATED``.

Printed (``--out``: as JSON): the trials, the recommended overrides, the expected seconds per step, epoch and run with
validation's sliding-window network passes (``val_overlap``, ``val_sw_batch_size``; no metric) every ``val_interval``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import re
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data.utils import dense_patch_slices
from torch.utils.benchmark import Timer

from custom_components.training.handlers import ThroughputHandler

__all__ = ["search_largest_batch", "pick_loader_settings", "estimate_run_time", "loader_candidates",
           "sliding_window_count", "validation_seconds", "parse_overrides", "format_report", "main"]

MAX_DATA_WAIT = 0.05
SAFE_HANDLERS = ("EpochSeedHandler", "LrScheduleHandler", "LossTermsHandler")  # and a ThroughputHandler of our own
_STORE: dict = {}  # the preflight result of this process, read back by every trial's config


def _is_oom(e: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and the CUDA/cuDNN/cuBLAS allocation failures raised as RuntimeError."""
    msg = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg))


def search_largest_batch(try_batch: Callable[[int], bool], start: int = 1, limit: int = 256,
                         out_of_time: Callable[[], bool] | None = None, what: str = "") -> int:
    """Largest ``b`` in ``[start, limit]`` with ``try_batch(b)`` true (an out-of-memory error counts as false), fitting
    being monotone: doubling from ``start`` until a batch fails, then bisection, each batch once (``~2 log2 b`` calls).
    Once ``out_of_time()`` is true, the largest known to fit; ``ValueError`` naming ``what`` if ``start`` does not fit."""
    start, limit = int(start), int(limit)
    if start < 1 or limit < start:
        raise ValueError(f"batch search needs 1 <= start <= limit, got start={start}, limit={limit}.")
    tried: dict[int, bool] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            try:
                tried[b] = bool(try_batch(b))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer, the rest propagates
                if not _is_oom(e):
                    raise
                tried[b] = False
        return tried[b]

    if not fits(start):
        raise ValueError(f"batch_size {start} does not fit{' ' + what if what else ''}: reduce patch_size or "
                         "filters, or set amp=true (bf16 on CUDA).")
    lo, hi = start, None  # lo fits; hi (if any) does not
    while (lo < limit if hi is None else hi - lo > 1) and not (out_of_time is not None and out_of_time()):
        b = min(2 * lo, limit) if hi is None else (lo + hi) // 2
        lo, hi = (b, hi) if fits(b) else (lo, b)
    return lo


def loader_candidates(cpu_count: int, configured: tuple[int, int] | None = None,
                      workers: Sequence[int] = (0, 1, 2, 4, 8, 16), prefetch: Sequence[int] = (2, 4)) -> list:
    """``(num_workers, prefetch)`` pairs, cheapest first; workers capped at ``cpu_count - 1``, the configured pair kept."""
    out = {(w, int(p)) for w in {w for w in workers if w <= max(0, int(cpu_count) - 1)} | {0} for p in prefetch}
    return sorted(out | ({(int(configured[0]), int(configured[1]))} if configured is not None else set()))


def pick_loader_settings(measurements: Sequence[dict], max_data_wait: float = MAX_DATA_WAIT) -> dict:
    """The cheapest (fewest workers, then smallest ``prefetch``) measurement with ``data_wait_fraction`` under
    ``max_data_wait``, copied with ``meets`` and ``reason``; when none meets it, the smallest wait, ``meets=False``."""
    if not measurements:
        raise ValueError("pick_loader_settings needs at least one loader measurement, got none.")
    for m, k in ((m, k) for m in measurements for k in ("num_workers", "prefetch", "data_wait_fraction") if k not in m):
        raise ValueError(f"loader measurement {m} has no '{k}'.")
    ok = [m for m in measurements if float(m["data_wait_fraction"]) < max_data_wait]
    lim = f"{100 * max_data_wait:.0f} % of the step"
    if ok:
        b = min(ok, key=lambda m: (int(m["num_workers"]), int(m["prefetch"])))
        return {**b, "meets": True, "reason": f"num_workers={b['num_workers']}, prefetch={b['prefetch']} is the "
                f"cheapest setting with data wait {100 * float(b['data_wait_fraction']):.1f} % < {lim}"}
    b = min(measurements, key=lambda m: (float(m["data_wait_fraction"]), int(m["num_workers"]), int(m["prefetch"])))
    return {**b, "meets": False, "reason": (
        f"no setting tried keeps data wait under {lim}; the lowest was {100 * float(b['data_wait_fraction']):.1f} % "
        f"with num_workers={b['num_workers']}, prefetch={b['prefetch']} (the host cannot crop patches fast enough: "
        "more CPU cores, the cache on a local SSD, or a larger batch per step)")}


def estimate_run_time(step_s: float, iterations_per_epoch: int, epochs: int, val_s: float | None = None,
                      val_interval: int = 0) -> dict:
    """Seconds of the run: ``epoch_s = step_s * iterations_per_epoch``, ``train_s = epoch_s * epochs``,
    ``validations = epochs // val_interval`` (0 if ``val_interval <= 0``), ``total_s = train_s + validations * val_s``;
    ``val_s=None`` (not estimated): ``val_total_s`` None, ``total_s`` training only (``validation_included`` False)."""
    if step_s < 0 or not math.isfinite(step_s):
        raise ValueError(f"step_s must be a finite number >= 0, got {step_s}.")
    if int(iterations_per_epoch) < 1 or int(epochs) < 1:
        raise ValueError(f"iterations_per_epoch and epochs must be >= 1, got {iterations_per_epoch} and {epochs}.")
    epoch_s = float(step_s) * int(iterations_per_epoch)
    validations = int(epochs) // int(val_interval) if int(val_interval) > 0 else 0
    val_total = None if val_s is None else validations * float(val_s)
    return {"step_s": float(step_s), "epoch_s": epoch_s, "train_s": epoch_s * int(epochs), "validations": validations,
            "val_s": None if val_s is None else float(val_s), "val_total_s": val_total,
            "total_s": epoch_s * int(epochs) + (val_total or 0.0), "validation_included": val_s is not None or validations == 0}


def sliding_window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``SlidingWindowInferer`` takes over ``shape`` (padded to ``roi``): ``dense_patch_slices`` at its
    scan interval, ``max(1, int(r * (1 - overlap)))`` per axis (``r`` on an axis no longer than ``r``)."""
    size = [max(int(s), int(r)) for s, r in zip(shape, roi)]
    step = [int(r) if s == int(r) else max(1, int(int(r) * (1 - float(overlap)))) for s, r in zip(size, roi)]
    return len(dense_patch_slices(size, [int(r) for r in roi], step))


def validation_seconds(shapes: Sequence[Sequence[int]], roi: Sequence[int], overlap: float, sw_batch_size: int,
                       forward_s: float) -> float:
    """Network seconds of one validation: ``sum_v ceil(windows_v / sw_batch_size) * forward_s``."""
    return sum(math.ceil(sliding_window_count(s, roi, overlap) / int(sw_batch_size)) for s in shapes) * float(forward_s)


def parse_overrides(args: Sequence[str]) -> dict:
    """``--id value`` pairs as ``python -m monai.bundle run`` parses them (``fire.Fire``), ``true``/``false`` as
    booleans: ``["--a", "1", "--b#c", "[2, 3]", "--d=x"]`` -> ``{"a": 1, "b#c": [2, 3], "d": "x"}``."""
    got, err = {}, io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            fire.Fire(lambda **kw: got.update(kw), command=list(args), name="autotune")
    except fire.core.FireExit as e:
        stray = re.search(r"Could not consume arg: (.*)", err.getvalue())
        raise ValueError(f"unexpected argument '{stray.group(1) if stray else ' '.join(args)}': overrides are "
                         "'--id value' pairs.") from e
    return {k: v.strip().lower() == "true" if isinstance(v, str) and v.strip().lower() in ("true", "false") else v
            for k, v in got.items()}


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "not estimated"
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _fmt_gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GB"


def format_report(result: dict) -> str:
    """The printed summary of an autotune result (the dict ``main`` writes with ``--out``)."""
    cfg, cuda, e, rec = result["configured"], result["mode"] == "cuda", result.get("expected"), result["recommended"]
    lines = [f"autotune {result['date']}: "
             + ("MEASURED (CUDA, out-of-memory search)" if cuda else "ESTIMATED (CPU, no out-of-memory search)"),
             f"  device {result['device']} ({result['device_name']}), amp {'bf16' if cfg['amp'] and cuda else 'off'}, "
             f"patch_size {cfg['patch_size']}, configured batch_size {cfg['batch_size']}, num_workers {cfg['num_workers']}, "
             f"prefetch {cfg['prefetch']}; {result['tuning_volumes']} training volume(s) read", "",
             f"  {'trial':<7} {'batch':>5} {'workers':>7} {'prefetch':>8} {'steps':>5} {'s/step':>8} {'data wait':>9} "
             f"{'peak GPU':>9} {'peak RSS':>9} {'saved act.':>10}  note"]
    for t in result["trials"]:
        wait = "-" if t.get("data_wait_fraction") is None else f"{100 * t['data_wait_fraction']:.1f} %"
        step = "-" if t.get("step_s") is None else f"{t['step_s']:.3f}"
        lines.append(f"  {t['kind']:<7} {t['batch_size']:>5} {t['num_workers']:>7} {t['prefetch']:>8} {t.get('steps', 0):>5} "
                     f"{step:>8} {wait:>9} {_fmt_gb(t.get('peak_gpu_bytes')):>9} {_fmt_gb(t.get('peak_rss_bytes')):>9} "
                     f"{_fmt_gb(t.get('saved_bytes')):>10}  {t.get('note', '')}")
    lines += [""] + [f"  {k}: {s}" for k, s in (("memory", result.get("memory", {}).get("summary")),
                                                  ("loader", result.get("loader", {}).get("reason"))) if s]
    words = ["python -m monai.bundle run training --config_file", result["config_file_arg"]]
    words += [f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v, separators=(',', ':')))}"
              for k, v in result.get("user_overrides", {}).items() if k not in rec]
    lines += ["", "  recommended overrides:", "    " + " ".join(words + [result["recommended_cli"]]),
              f"    JSON: {json.dumps(rec)}", ""]
    if not e:
        lines.append("  expected time: not measured (no trial ran; see the notes)")
    else:
        val = ("none (val_interval > epochs, or no validation volumes)" if e["validations"] == 0 else
               f"not estimated ({result.get('validation', {}).get('note', '')}); {e['validations']} validations come on top"
               if e["val_s"] is None else
               f"{_fmt_s(e['val_total_s'])} ({e['validations']} x {_fmt_s(e['val_s'])}: {result['validation']['note']})")
        lines += [f"  expected ({result['expected_basis']}):", f"    per step   {_fmt_s(e['step_s'])}",
                  f"    per epoch  {_fmt_s(e['epoch_s'])} ({cfg['iterations_per_epoch']} iterations)",
                  f"    training   {_fmt_s(e['train_s'])} ({cfg['epochs']} epochs)", f"    validation {val}",
                  f"    whole run  {_fmt_s(e['total_s'])}{'' if e['validation_included'] else ' (training only)'}"]
    return "\n".join(lines + [f"  note: {n}" for n in result.get("notes", [])])


def _make_parser(config_files: Sequence[str], overrides: dict) -> ConfigParser:
    """A ``ConfigParser`` as ``monai.bundle run`` makes it: the files merged in order, then ``overrides``."""
    for f in config_files:
        if not os.path.isfile(f):
            raise ValueError(f"config_file '{f}' does not exist.")
    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    parser.update(pairs=dict(overrides))
    return parser


def _root_error(e: BaseException) -> BaseException:
    """The innermost ValueError of an exception chain (MONAI wraps config errors in RuntimeError), else ``e``."""
    seen, cur, found = set(), e, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        found, cur = cur if isinstance(cur, ValueError) else found, cur.__cause__ or cur.__context__
    return found or e


def _handler_refs(parser: ConfigParser, trainer_id: str) -> list[str]:
    """References to the trainer's ``SAFE_HANDLERS``; ``train_handlers`` may be a list or an expression joining
    references (``"$[@train#checkpoint_resumer] + @train#handlers"``), each referenced list scanned item by item."""
    key = f"{trainer_id}#train_handlers"
    raw = parser.get(key)
    sources = [key] if isinstance(raw, list) else re.findall(r"@([\w#]+)", raw) if isinstance(raw, str) else []
    safe = lambda h: isinstance(h, dict) and str(h.get("_target_", "")).rsplit(".", 1)[-1] in SAFE_HANDLERS  # noqa: E731
    refs = []
    for src, item in ((src, parser.get(src)) for src in sources):
        refs += [f"@{src}#{i}" for i, h in enumerate(item) if safe(h)] if isinstance(item, list) else [f"@{src}"] * safe(item)
    return refs


def _rss_bytes(reset: bool = False) -> int:
    """Peak resident memory of this process (``getrusage``); ``reset`` first lowers the peak to the current RSS
    (Linux >= 4.0, ``clear_refs`` 5), so that call reads the current RSS and later ones the peak from there on."""
    if reset:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _SavedBytes:
    """Bytes autograd keeps for backward (unique storages packed by ``saved_tensors_hooks``): ``step_bytes`` since the
    last ``reset`` (each ``ITERATION_STARTED`` of a trial), ``peak`` the largest step's before it."""

    def __init__(self):
        self.peak, self.step_bytes, self.seen = 0, 0, set()

    def reset(self, engine=None) -> None:
        self.peak, self.step_bytes, self.seen = max(self.peak, self.step_bytes), 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if t.device.type != "meta":
            with contextlib.suppress(RuntimeError, NotImplementedError):
                key, nbytes = (t.device.type, t.untyped_storage().data_ptr()), t.untyped_storage().nbytes()
        if key not in self.seen:
            self.seen.add(key)
            self.step_bytes += nbytes
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _Tuner:
    """Holds the config and runs trials (each a fresh parse of the config; see the module docstring)."""

    def __init__(self, config_files: Sequence[str], overrides: dict, deadline: float, volumes: int = 4):
        from custom_components.training.workflow import check_settings

        self.config_files, self.user_overrides, self.deadline = list(config_files), dict(overrides), deadline
        base, self.trainer_id = _make_parser(self.config_files, {**self.user_overrides, "overwrite": True}), "train#trainer"
        if self.trainer_id not in base:
            raise ValueError(f"the config ({', '.join(self.config_files)}) has no '{self.trainer_id}' to tune.")
        get = lambda k, d=None: base.get_parsed_content(k) if k in base else d  # noqa: E731
        ints = {"batch_size": 2, "num_workers": 0, "prefetch": 2, "epochs": 1, "iterations_per_epoch": 1,
                "val_interval": 0, "max_levels": 6, "topology_every_n": 1}
        c = self.cfg = {"patch_size": [int(s) for s in get("patch_size")], "device": str(get("device", "cpu")),
                        "amp": bool(get("amp", False)), "val_max_volumes": get("val_max_volumes"),
                        **{k: int(d if (v := get(k)) is None else v) for k, d in ints.items()}}
        try:
            check_settings(c["patch_size"], c["batch_size"], c["device"], c["epochs"], c["iterations_per_epoch"],
                           c["max_levels"])
        except ValueError as e:
            raise ValueError(f"{e} (config: {' + '.join(self.config_files)})") from e
        self.device = torch.device(c["device"])
        self.cuda = self.device.type == "cuda"
        self.handler_refs = _handler_refs(base, self.trainer_id)
        self.determinism = [f"initialize#{i}" for i, x in enumerate(base.get("initialize", []) or [])
                            if isinstance(x, str) and "set_determinism" in x]
        self.val_entries, self.tuning_volumes, self.total_volumes = [], 0, 0
        if "preflight" in base:
            pre = base.get_parsed_content("preflight")
            _STORE["preflight"] = {**pre, "train": list(pre["train"])[: max(1, int(volumes))]}
            self.val_entries = list(pre.get("val", []))[: int(c["val_max_volumes"]) if c["val_max_volumes"] else None]
            self.tuning_volumes, self.total_volumes = len(_STORE["preflight"]["train"]), len(pre["train"])
        del base
        gc.collect()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def _parser(self, batch_size: int, num_workers: int, prefetch: int, warmup: int, steps: int) -> ConfigParser:
        """The config at these settings: the trainer runs an epoch of ``warmup`` steps (if any), then ``steps``."""
        t = self.trainer_id
        o = {**self.user_overrides, "batch_size": int(batch_size), "num_workers": int(num_workers),
             "prefetch": int(prefetch), "overwrite": True, f"{t}#max_epochs": 2 if warmup else 1,
             f"{t}#epoch_length": int(warmup or steps), f"{t}#train_handlers": list(self.handler_refs)}
        if "preflight" in _STORE:
            o["preflight"] = "$custom_components.training.autotune._STORE['preflight']"
        parser = _make_parser(self.config_files, o)
        for key in self.determinism:  # the run's own initialize step (cudnn deterministic is slower)
            parser.get_parsed_content(key)
        return parser

    def _end_epoch_past_deadline(self, engine) -> None:
        if time.time() > self.deadline:  # the measured epoch then ends after its first step
            engine.terminate_epoch()

    def trial(self, kind: str, batch_size: int, num_workers: int, prefetch: int, warmup: int, steps: int,
              host_memory: bool = False, after: Callable | None = None) -> dict:
        """One trial: the trainer built from the config at these settings runs ``warmup`` steps, then ``steps``."""
        rec = {"kind": kind, "batch_size": int(batch_size), "num_workers": int(num_workers), "prefetch": int(prefetch),
               "oom": False}
        parser = trainer = quiet = None
        saved, t_start = _SavedBytes() if host_memory else None, time.time()
        try:
            parser = self._parser(batch_size, num_workers, prefetch, warmup, steps)
            trainer = parser.get_parsed_content(self.trainer_id)
            quiet, level = trainer.logger, trainer.logger.level
            quiet.setLevel(logging.ERROR)  # no per-epoch chatter from the handlers
            ThroughputHandler(batch_size).attach(trainer)
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: setattr(e.state, "epoch_length", steps))
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._end_epoch_past_deadline)
            if saved is not None:
                trainer.add_event_handler(Events.ITERATION_STARTED, saved.reset)
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            rec["rss_before_bytes"] = _rss_bytes(reset=True)
            with saved.hooks() if saved is not None else contextlib.nullcontext():
                trainer.run()
            rec["peak_rss_bytes"] = _rss_bytes()
            self._trial_stats(trainer, rec, saved)
            if after is not None:
                after(parser, trainer, rec)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            rec.update(oom=True, note="out of memory")
        finally:
            if quiet is not None:
                quiet.setLevel(level)
            del trainer, parser  # ignite drops its loader iterator at the end of a run or on an error: the buffer stops
            gc.collect()
            if self.cuda:
                torch.cuda.synchronize(self.device)
                rec.setdefault("peak_gpu_bytes", int(torch.cuda.max_memory_allocated(self.device)))
                torch.cuda.empty_cache()
        rec["wall_s"] = time.time() - t_start
        return rec

    def _trial_stats(self, trainer, rec: dict, saved: _SavedBytes | None) -> None:
        """Into ``rec``: the measured epoch by ``ThroughputHandler`` (mean step, data wait, ``step_times``), peak GPU
        memory, parameter / optimiser-state bytes, whether a topology step was measured (the references end here)."""
        m, n = trainer.state.metrics, len(trainer.step_timer)
        if n and m.get("throughput/samples_per_s"):
            rec.update(steps=n, step_s=rec["batch_size"] / m["throughput/samples_per_s"],
                       data_wait_fraction=m["throughput/data_wait"], parts=dict(getattr(trainer.state, "step_times", {})))
        if saved is not None:
            saved.reset()
            rec["saved_bytes"] = saved.peak or None
        if self.cuda:
            rec["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            rec["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        rec["param_bytes"] = sum(p.numel() * p.element_size() for p in trainer.network.parameters())
        rec["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values()
                                           for v in st.values() if torch.is_tensor(v))
        terms = getattr(trainer.loss_function, "terms", None)
        if terms is not None and "topology" in terms and n:
            every, done = int(getattr(terms["topology"], "every_n", 1)), int(trainer.state.iteration)
            rec["topology_in_measured"] = any((c - 1) % every == 0 for c in range(done - n + 1, done + 1))

    def meta_estimate(self, batch_size: int = 1) -> dict:
        """Parameter bytes and the bytes autograd saves in the network's forward at ``batch_size``, run on the
        ``meta`` device (nothing allocated; loss and augmentation not included)."""
        net = self._parser(batch_size, 0, 2, 0, 1).get_parsed_content("network_def")
        out, saved = {"param_bytes": sum(p.numel() * p.element_size() for p in net.parameters())}, _SavedBytes()
        try:
            with saved.hooks():
                net.to("meta").train()(torch.empty(int(batch_size), 1, *self.cfg["patch_size"], device="meta"))
            out["forward_saved_bytes"] = saved.step_bytes
        except Exception as e:  # noqa: BLE001 - an op without a meta kernel: no estimate, say so
            out.update(forward_saved_bytes=None, error=f"{type(e).__name__}: {e}")
        return out

    def val_forward_s(self, parser: ConfigParser, trainer, rec: dict) -> None:
        """Seconds of one validation forward of ``val_sw_batch_size`` windows (eval, no grad), into ``rec``."""
        if "validate#inferer" not in parser:
            rec["val_note"] = "the config has no validate#inferer"
            return
        inferer, amp_key = parser.get_parsed_content("validate#inferer"), "validate#evaluator#amp"
        roi = [int(r) for r in getattr(inferer, "roi_size", self.cfg["patch_size"])]
        sw, overlap = int(getattr(inferer, "sw_batch_size", 1)), getattr(inferer, "overlap", 0.25)
        overlap = float(overlap[0] if isinstance(overlap, (list, tuple)) else overlap)
        amp = self.cuda and bool(parser.get_parsed_content(amp_key) if amp_key in parser else self.cfg["amp"])
        # a training forward (with grad) of the same windows bounds the cost; time it only if the budget allows
        guess = float(rec.get("parts", {}).get("forward", 0.0)) * sw / max(int(rec["batch_size"]), 1)
        runs = 2 if 4 * guess < self.time_left() else 1 if 3 * guess < self.time_left() else 0
        if runs == 0:
            rec["val_note"] = f"validation forward not timed: about {guess:.0f} s each, past --max_minutes"
            return
        net, x = trainer.network.eval(), torch.zeros(sw, 1, *roi, device=self.device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):  # two warm-up passes first
            t = Timer("net(x)", globals={"net": net, "x": x}, num_threads=torch.get_num_threads()).timeit(runs).mean
        net.train()
        rec.update(val_forward_s=t, val_roi=roi, val_sw_batch_size=sw, val_overlap=overlap)


def _steps_for(tuner: _Tuner, requested: int | None, cap: int) -> int:
    """Measured steps per timing trial: one topology period (``topology_every_n``), capped, so its cost is amortised."""
    return max(1, int(requested)) if requested else max(2, min(int(tuner.cfg["topology_every_n"] or 1), cap))


def _timed_val(trials: list) -> dict | None:
    """The first trial that timed a validation forward (``val_forward_s``), if any."""
    return next((t for t in trials if t.get("val_forward_s") is not None), None)


def _loader_search(tuner: _Tuner, batch: int, steps: int, trials: list, measured: dict) -> dict:
    """Loader settings tried cheapest first at ``batch`` until one keeps data wait under 5 % (or time runs out)."""
    for w, p in loader_candidates(os.cpu_count() or 1, (tuner.cfg["num_workers"], tuner.cfg["prefetch"])):
        if (w, p) not in measured:
            if measured and tuner.time_left() < 2.5 * max(m["wall_s"] for m in measured.values()):
                break
            rec = tuner.trial("loader", batch, w, p, warmup=2 if tuner.cuda else 1, steps=steps,
                              after=None if _timed_val(trials) else tuner.val_forward_s)
            trials.append(rec)
            if rec["oom"] or rec.get("step_s") is None:
                continue
            measured[(w, p)] = rec
        if float(measured[(w, p)]["data_wait_fraction"]) < MAX_DATA_WAIT:
            break
    if not measured:
        raise ValueError(f"no loader trial finished at batch_size {batch} within --max_minutes.")
    return pick_loader_settings(list(measured.values()))


def _tune_cuda(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict, dict]:
    total = torch.cuda.get_device_properties(tuner.device).total_memory
    budget, pct, gb = args.memory_fraction * total, f"{100 * args.memory_fraction:.0f} %", total / 2**30

    def fits(b: int) -> bool:
        rec = tuner.trial("batch", b, tuner.cfg["num_workers"], tuner.cfg["prefetch"], warmup=0, steps=2)
        rec["fits"] = (not rec["oom"]) and rec.get("peak_gpu_bytes", 0) <= budget
        rec.update({} if rec["oom"] else {"note": "fits" if rec["fits"] else f"over {pct} of {gb:.0f} GB"})
        trials.append(rec)
        return rec["fits"]

    half = 0.5 * max(tuner.time_left(), 0.0)  # the batch search may use half of the time left, the loader the rest
    best = search_largest_batch(fits, start=1, limit=args.max_batch, out_of_time=lambda: tuner.time_left() < half,
                                what=f"at patch_size {tuner.cfg['patch_size']} on {tuner.device} "
                                     f"({gb:.0f} GB, amp={tuner.cfg['amp']})")
    tried = [t for t in trials if t["kind"] == "batch"]
    peak = next((t["peak_gpu_bytes"] for t in tried if t["batch_size"] == best), None)
    failed_above = any(t["batch_size"] > best and not t.get("fits") for t in tried)
    cut = "" if failed_above or best >= args.max_batch else \
        "; the search ran out of --max_minutes before a batch failed: larger ones were not tried"
    mem = {"total_bytes": total, "budget_bytes": budget, "peak_at_best_bytes": peak, "search_cut_by_time": bool(cut),
           "summary": f"batch {best} peaks at {_fmt_gb(peak)} of {gb:.1f} GB (limit {pct})"
                      + ("; the search stopped at --max_batch" if best >= args.max_batch else cut)}
    if best < tuner.cfg["batch_size"] and failed_above:
        notes.append(f"the configured batch_size {tuner.cfg['batch_size']} does not fit with the safety margin here")
    elif cut:
        notes.append(f"the largest batch is not known: only up to {best} was tried in the time given (raise --max_minutes)")
    return best, _loader_search(tuner, best, _steps_for(tuner, args.steps, 20), trials, {}), mem


def _tune_cpu(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict | None, dict]:
    cfg, batch, pct = tuner.cfg, tuner.cfg["batch_size"], f"{100 * args.memory_fraction:.0f} %"
    usable = _rss_bytes(reset=True) + os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # RSS + free memory
    limit, est = args.memory_fraction * usable, tuner.meta_estimate(1)
    fwd = est["forward_saved_bytes"]
    # weights, gradients, up to two optimiser moments; x2.5 the forward's saved bytes: loss terms, augmentation, transients
    need1 = _rss_bytes(reset=True) + 4 * est["param_bytes"] + 2.5 * (fwd or 0)
    mem = {"usable_bytes": usable, "limit_bytes": limit, "meta_estimate_batch1": est, "predicted_batch1_bytes": need1}
    if fwd is None:
        notes.append(f"no meta-device memory estimate ({est.get('error')}); batch 1 runs unchecked")
    if need1 > limit:
        mem["summary"] = (f"batch 1 would need about {_fmt_gb(need1)} (meta-device estimate), over {pct} of the "
                          f"{_fmt_gb(usable)} this process can use: not run")
        notes.append("no trial ran: the CPU would run out of memory; tune on a GPU or with a smaller patch_size / filters")
        return batch, None, mem
    steps, conf, other, second = _steps_for(tuner, args.steps, 5), (cfg["num_workers"], cfg["prefetch"]), batch if batch != 1 else 2, None
    one = tuner.trial("slope", 1, *conf, warmup=1, steps=steps, host_memory=True,
                      after=tuner.val_forward_s if batch == 1 else None)
    per_sample = float(one.get("saved_bytes") or fwd or 0.0)
    predicted = one["peak_rss_bytes"] + (other - 1) * 1.5 * per_sample
    if predicted > limit:
        notes.append(f"batch {other} not tried: predicted {_fmt_gb(predicted)} > {_fmt_gb(limit)}")
    elif tuner.time_left() < 1.5 * one["wall_s"] * other:
        notes.append(f"batch {other} not tried: --max_minutes left too little time")
    else:
        second = tuner.trial("slope", other, *conf, warmup=1, steps=steps, host_memory=True,
                             after=tuner.val_forward_s if one.get("val_forward_s") is None else None)
    slopes = [t for t in (one, second) if t is not None]
    trials += slopes
    measured = {conf: t for t in slopes if t["batch_size"] == batch and t.get("step_s") is not None}
    for t in slopes:
        t.update({"note": (t.get("note", "") + " topology step measured").strip()} if t.get("topology_in_measured") else {})
    if second is not None:  # memory per sample: the largest of the RSS slope and the autograd-saved bytes per sample
        slope_saved = ((second.get("saved_bytes") or 0) - (one.get("saved_bytes") or 0)) / (other - 1)
        per_sample = max((second["peak_rss_bytes"] - one["peak_rss_bytes"]) / (other - 1), slope_saved,
                         float(one.get("saved_bytes") or 0), 1.0)
        base = second["peak_rss_bytes"] - other * per_sample
    else:
        per_sample = max(per_sample, 1.0)
        base = one["peak_rss_bytes"] - per_sample
    at_cfg, largest = base + batch * per_sample, max(0, int((limit - base) // per_sample))
    mem.update(per_sample_bytes=per_sample, predicted_at_configured_bytes=at_cfg, largest_batch_estimate=largest,
               summary=f"peak RSS about {_fmt_gb(at_cfg)} at batch {batch}, at most {_fmt_gb(per_sample)} more per sample "
                       f"(RSS slope / autograd-saved activations); by that about {largest} samples would fit in {pct} "
                       f"of the {_fmt_gb(usable)} usable here (not tried)")
    loader = None
    if at_cfg > limit:
        notes.append(f"the configured batch_size {batch} would need about {_fmt_gb(at_cfg)} > {_fmt_gb(limit)}: "
                     "loader not tuned, time extrapolated")
    else:
        try:
            loader = _loader_search(tuner, batch, min(steps, 3), trials, measured)
        except ValueError as e:
            notes.append(str(e))
    if loader is None and one.get("step_s") is not None:
        step = one["step_s"] * batch
        if second is not None and second.get("step_s") is not None:
            step = second["step_s"] + (batch - other) * (second["step_s"] - one["step_s"]) / (other - 1)
        loader = {**(second or one), "batch_size": batch, "step_s": step, "meets": None,
                  "reason": f"loader not tuned; step time extrapolated to batch {batch}"}
    return batch, loader, mem


def _validation(tuner: _Tuner, trials: list) -> tuple[dict, float | None]:
    """The validation estimate (``validation`` of the result) and its seconds, from the first timed forward."""
    from custom_components.data.io import read_tiff_header

    if not tuner.val_entries:
        return {"note": "no validation volumes"}, 0.0
    if (v := _timed_val(trials)) is None:
        why = next((t["val_note"] for t in trials if t.get("val_note")), "time ran out or no trial finished")
        return {"note": f"no validation forward was timed ({why})"}, None
    shapes = [list(read_tiff_header(e["image"])[0]) for e in tuner.val_entries]
    val_s = validation_seconds(shapes, v["val_roi"], v["val_overlap"], v["val_sw_batch_size"], v["val_forward_s"])
    windows = sum(sliding_window_count(s, v["val_roi"], v["val_overlap"]) for s in shapes)
    return {"volumes": len(shapes), "windows": windows, "forward_s": v["val_forward_s"],
            "sw_batch_size": v["val_sw_batch_size"], "seconds": val_s,
            "note": (f"network passes only, {len(shapes)} volume(s), {windows} windows, {v['val_forward_s']:.3f} s per "
                     f"{v['val_sw_batch_size']} windows; metric and blending not included")}, val_s


def run_autotune(config_files: Sequence[str], overrides: dict, args) -> dict:
    """Tune the config (CUDA: measured; CPU: estimated) and return the result dict of the module docstring."""
    t0, trials, notes = time.time(), [], []
    tuner = _Tuner(config_files, overrides, deadline=t0 + 60 * float(args.max_minutes), volumes=args.volumes)
    try:
        batch, loader, memory = (_tune_cuda if tuner.cuda else _tune_cpu)(tuner, args, trials, notes)
    finally:
        if tuner.determinism:  # as the run's finalize step does
            from monai.utils import set_determinism

            set_determinism(seed=None)
    cfg, files = tuner.cfg, list(config_files)
    recommended = {"batch_size": int(batch), "num_workers": int(loader["num_workers"]) if loader else cfg["num_workers"],
                   "prefetch": int(loader["prefetch"]) if loader else cfg["prefetch"]}
    validation, val_s = _validation(tuner, trials)
    expected, basis = None, ""
    if loader is not None and loader.get("step_s") is not None:
        expected = estimate_run_time(loader["step_s"], cfg["iterations_per_epoch"], cfg["epochs"], val_s, cfg["val_interval"])
        basis = (f"{'measured' if tuner.cuda else 'measured on this CPU'} at batch {recommended['batch_size']}, "
                 f"num_workers {loader['num_workers']}, prefetch {loader['prefetch']}, {loader.get('steps', 0)} steps"
                 + ("" if loader.get("topology_in_measured", True) else ", no topology step among them"))
    if tuner.tuning_volumes and tuner.tuning_volumes < tuner.total_volumes:
        notes.append(f"data wait measured on {tuner.tuning_volumes} of {tuner.total_volumes} training volumes "
                     "(page cache warm): a cold or slow disk waits longer")
    if recommended["batch_size"] != cfg["batch_size"]:
        notes.append("a larger batch means more samples per epoch (iterations_per_epoch x batch_size); "
                     "learning_rate is not rescaled")
    notes += [] if tuner.cuda else ["CPU figures; on a GPU run this again for measured values"]
    return {
        "mode": "cuda" if tuner.cuda else "cpu", "estimated": not tuner.cuda,
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "device": str(tuner.device),
        "device_name": torch.cuda.get_device_name(tuner.device) if tuner.cuda else f"CPU, {torch.get_num_threads()} threads",
        "config_files": files,
        "config_file_arg": files[0] if len(files) == 1 else '"[' + ",".join(f"'{f}'" for f in files) + ']"',
        "user_overrides": dict(overrides), "configured": cfg, "tuning_volumes": tuner.tuning_volumes,
        "trials": list(trials), "memory": memory,
        "loader": {k: v for k, v in (loader or {}).items()
                   if k in ("num_workers", "prefetch", "data_wait_fraction", "step_s", "meets", "reason")},
        "recommended": recommended, "recommended_cli": " ".join(f"--{k} {v}" for k, v in recommended.items()),
        "validation": validation, "expected": expected, "expected_basis": basis, "notes": notes,
        "wall_s": time.time() - t0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module docstring). Prints the report; 0 on success, 2 with a message naming the wrong setting."""
    p = argparse.ArgumentParser(prog="python -m custom_components.training.autotune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", action="append", required=True,
                   help="a config file, given several times or as \"['a.json','b.json']\"; merged in order")
    p.add_argument("--dataset_dir", default=None)
    p.add_argument("--max_minutes", type=float, default=5.0, help="time budget of the whole tuning (default 5)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--volumes", type=int, default=4, help="training volumes prepared and read for the trials (default 4)")
    p.add_argument("--max_batch", type=int, default=64, help="largest batch the CUDA search tries (default 64)")
    p.add_argument("--memory_fraction", type=float, default=0.9, help="peak memory allowed, fraction of the device (0.9)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per timing trial (default: topology_every_n, capped)")
    args, rest = p.parse_known_args(argv)
    try:
        if not 0 < args.memory_fraction <= 1:
            raise ValueError(f"--memory_fraction must be in (0, 1], got {args.memory_fraction}.")
        if args.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be > 0, got {args.max_minutes}.")
        files = []
        for v in args.config_file:  # a list read as fire reads it
            parsed = fire.parser.DefaultParseValue(v) if v.strip().startswith("[") else [v]
            if not isinstance(parsed, list):
                raise ValueError(f"--config_file {v} is not a list of paths.")
            files += parsed
        overrides = {**parse_overrides(rest), **({} if args.dataset_dir is None else {"dataset_dir": args.dataset_dir})}
        result = run_autotune([str(f) for f in files], overrides, args)
    except Exception as e:  # noqa: BLE001 - a config error is reported by name, everything else re-raised
        if isinstance(root := _root_error(e), ValueError):
            print(f"autotune: error: {root}", file=sys.stderr)
            return 2
        raise
    print(format_report(result), flush=True)
    if args.out:
        from custom_components.atomic import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"  written: {args.out}")
    return 0


if __name__ == "__main__":
    # run inside the importable module, so the configs' ``custom_components.training.autotune._STORE`` is this one
    from custom_components.training.autotune import main as _main

    raise SystemExit(_main())
