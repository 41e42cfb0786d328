"""Tuning without a person: the largest batch that fits, loader settings that keep the GPU fed, the run's duration.

The configs are read as ``python -m monai.bundle run`` reads them (other ``--key value`` pairs parsed by ``fire``,
``true``/``false`` as booleans). A trial is a fresh parse and a real run of ``train#trainer`` (handlers cut to
``SAFE_HANDLERS``): an epoch of warm-up steps, then one timed by ``ThroughputHandler`` on the same loader iterator.
CUDA: the batch is doubled then bisected (a batch fits when two steps raise no ``OutOfMemoryError`` and stay under
``--memory_fraction`` of the GPU), then ``num_workers`` x ``prefetch`` are tried cheapest first until data wait is under
5 % of the step. CPU (``ESTIMATED``): batch 1, if its ``meta``-device estimate fits, and the configured batch are
measured (step time, peak RSS, bytes autograd saves) and the configured batch kept. Printed (``--out``: as JSON): the
trials, the recommended overrides, the seconds per step, epoch and run with validation's sliding-window network passes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import itertools
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
from monai.utils import set_determinism
from torch.utils.benchmark import Timer

from custom_components.training.handlers import ThroughputHandler

__all__ = ["search_largest_batch", "pick_loader_settings", "estimate_run_time", "loader_candidates",
           "sliding_window_count", "validation_seconds", "parse_overrides", "format_report", "main"]

MAX_DATA_WAIT = 0.05
SAFE_HANDLERS = ("EpochSeedHandler", "LrScheduleHandler", "LossTermsHandler")  # and a ThroughputHandler of our own
CONFIG_KEYS = ("patch_size", "device", "amp", "val_max_volumes", "batch_size", "num_workers", "prefetch", "epochs",
               "iterations_per_epoch", "val_interval", "max_levels", "topology_every_n")  # read by the tuning
_STORE: dict = {}  # the preflight result of this process, read back by every trial's config


def _is_oom(e: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and the CUDA/cuDNN/cuBLAS allocation failures raised as RuntimeError."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e).lower() for s in ("out of memory", "alloc_failed")))


def search_largest_batch(try_batch: Callable[[int], bool], start: int = 1, limit: int = 256,
                         out_of_time: Callable[[], bool] | None = None, what: str = "") -> int:
    """Largest ``b`` in ``[start, limit]`` with ``try_batch(b)`` true (an out-of-memory error counts as false), fitting
    being monotone: doubling from ``start`` until a batch fails, then bisection, each batch once (``~2 log2 b`` calls).
    Once ``out_of_time()`` is true, the largest known to fit; ``ValueError`` naming ``what`` if ``start`` does not fit."""
    if not 1 <= start <= limit:
        raise ValueError(f"batch search needs 1 <= start <= limit, got start={start}, limit={limit}.")

    @functools.cache
    def fits(b: int) -> bool:
        try:
            return bool(try_batch(b))
        except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer, the rest propagates
            if not _is_oom(e):
                raise
            return False

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
    pairs = set(itertools.product({0, *(w for w in workers if w < cpu_count)}, prefetch))
    return sorted(pairs | ({tuple(configured)} if configured is not None else set()))


def pick_loader_settings(measurements: Sequence[dict], max_data_wait: float = MAX_DATA_WAIT) -> dict:
    """The cheapest (fewest workers, then smallest ``prefetch``) measurement with ``data_wait_fraction`` under
    ``max_data_wait``, copied with ``meets`` and ``reason``; when none meets it, the smallest wait, ``meets=False``."""
    if not measurements:
        raise ValueError("pick_loader_settings needs at least one loader measurement, got none.")
    ok = [m for m in measurements if m["data_wait_fraction"] < max_data_wait]
    b = (min(ok, key=lambda m: (m["num_workers"], m["prefetch"])) if ok else
         min(measurements, key=lambda m: (m["data_wait_fraction"], m["num_workers"], m["prefetch"])))
    setting, wait = f"num_workers={b['num_workers']}, prefetch={b['prefetch']}", _pct(b["data_wait_fraction"])
    limit = f"{_pct(max_data_wait, 0)} of the step"
    reason = (f"{setting} is the cheapest setting with data wait {wait} < {limit}" if ok else
              f"no setting tried keeps data wait under {limit}; the lowest was {wait} with {setting} (the host cannot "
              "crop patches fast enough: more CPU cores, the cache on a local SSD, or a larger batch per step)")
    return {**b, "meets": bool(ok), "reason": reason}


def estimate_run_time(step_s: float, iterations_per_epoch: int, epochs: int, val_s: float | None = None,
                      val_interval: int = 0) -> dict:
    """Seconds of the run: ``epoch_s = step_s * iterations_per_epoch``, ``train_s = epoch_s * epochs``,
    ``validations = epochs // val_interval`` (0 if ``val_interval <= 0``), ``total_s = train_s + validations * val_s``;
    ``val_s=None`` (not estimated): ``val_total_s`` None, ``total_s`` training only (``validation_included`` False)."""
    if iterations_per_epoch < 1 or epochs < 1:
        raise ValueError(f"iterations_per_epoch and epochs must be >= 1, got {iterations_per_epoch} and {epochs}.")
    epoch_s = step_s * iterations_per_epoch
    validations = epochs // val_interval if val_interval > 0 else 0
    val_total = None if val_s is None else validations * val_s
    return {"step_s": step_s, "epoch_s": epoch_s, "train_s": epoch_s * epochs, "validations": validations,
            "val_s": val_s, "val_total_s": val_total, "total_s": epoch_s * epochs + (val_total or 0.0),
            "validation_included": val_s is not None or validations == 0}


def sliding_window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``SlidingWindowInferer`` takes over ``shape`` (padded to ``roi``): ``dense_patch_slices`` at its
    scan interval, ``max(1, int(r * (1 - overlap)))`` per axis (``r`` on an axis no longer than ``r``)."""
    size = [max(s, r) for s, r in zip(shape, roi)]
    step = [r if s == r else max(1, int(r * (1 - overlap))) for s, r in zip(size, roi)]
    return len(dense_patch_slices(size, roi, step))


def validation_seconds(shapes: Sequence[Sequence[int]], roi: Sequence[int], overlap: float, sw_batch_size: int,
                       forward_s: float) -> float:
    """Network seconds of one validation: ``sum_v ceil(windows_v / sw_batch_size) * forward_s``."""
    return sum(math.ceil(sliding_window_count(s, roi, overlap) / sw_batch_size) for s in shapes) * forward_s


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
    is_bool = lambda v: isinstance(v, str) and v.strip().lower() in ("true", "false")  # noqa: E731
    return {k: v.strip().lower() == "true" if is_bool(v) else v for k, v in got.items()}


def _pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f} %"


def _fmt_gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GB"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "not estimated"
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


_ROW = "  {:<7} {:>5} {:>7} {:>8} {:>5} {:>8} {:>9} {:>9} {:>9} {:>10}  {}"  # the report's trial table


def _expected_lines(result: dict) -> list[str]:
    """The report's expected seconds per step, epoch, training, validation and whole run."""
    e, cfg, note = result["expected"], result["configured"], result["validation"].get("note", "")
    if e["validations"] == 0:
        val = "none (val_interval > epochs, or no validation volumes)"
    elif e["val_s"] is None:
        val = f"not estimated ({note}); {e['validations']} validations come on top"
    else:
        val = f"{_fmt_s(e['val_total_s'])} ({e['validations']} x {_fmt_s(e['val_s'])}: {note})"
    rows = [("per step", _fmt_s(e["step_s"])),
            ("per epoch", f"{_fmt_s(e['epoch_s'])} ({cfg['iterations_per_epoch']} iterations)"),
            ("training", f"{_fmt_s(e['train_s'])} ({cfg['epochs']} epochs)"), ("validation", val),
            ("whole run", _fmt_s(e["total_s"]) + ("" if e["validation_included"] else " (training only)"))]
    return [f"  expected ({result['expected_basis']}):"] + [f"    {name:<10} {text}" for name, text in rows]


def format_report(result: dict) -> str:
    """The printed summary of an autotune result (the dict ``main`` writes with ``--out``)."""
    cfg, cuda, rec = result["configured"], result["mode"] == "cuda", result["recommended"]
    lines = [f"autotune {result['date']}: "
             + ("MEASURED (CUDA, out-of-memory search)" if cuda else "ESTIMATED (CPU, no out-of-memory search)"),
             f"  device {result['device']} ({result['device_name']}), amp {'bf16' if cfg['amp'] and cuda else 'off'}, "
             f"patch_size {cfg['patch_size']}, configured batch_size {cfg['batch_size']}, num_workers "
             f"{cfg['num_workers']}, prefetch {cfg['prefetch']}; {result['tuning_volumes']} training volume(s) read", "",
             _ROW.format("trial", "batch", "workers", "prefetch", "steps", "s/step", "data wait", "peak GPU",
                         "peak RSS", "saved act.", "note")]
    for t in result["trials"]:
        step, wait = t.get("step_s"), t.get("data_wait_fraction")
        lines.append(_ROW.format(t["kind"], t["batch_size"], t["num_workers"], t["prefetch"], t.get("steps", 0),
                                 "-" if step is None else f"{step:.3f}", "-" if wait is None else _pct(wait),
                                 *(_fmt_gb(t.get(k)) for k in ("peak_gpu_bytes", "peak_rss_bytes", "saved_bytes")),
                                 t.get("note", "")))
    lines += [""] + [f"  {name}: {text}" for name, text in (("memory", result["memory"].get("summary")),
                                                            ("loader", result["loader"].get("reason"))) if text]
    words = ["python -m monai.bundle run training --config_file", result["config_file_arg"]]
    words += [f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v, separators=(',', ':')))}"
              for k, v in result["user_overrides"].items() if k not in rec]
    lines += ["", "  recommended overrides:", "    " + " ".join(words + [result["recommended_cli"]]),
              f"    JSON: {json.dumps(rec)}", ""]
    lines += _expected_lines(result) if result["expected"] else [
        "  expected time: not measured (no trial ran; see the notes)"]
    return "\n".join(lines + [f"  note: {n}" for n in result["notes"]])


def _make_parser(config_files: Sequence[str], overrides: dict) -> ConfigParser:
    """A ``ConfigParser`` as ``monai.bundle run`` makes it: the files merged in order, then ``overrides``."""
    if missing := [f for f in config_files if not os.path.isfile(f)]:
        raise ValueError(f"config_file '{missing[0]}' does not exist.")
    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    parser.update(pairs=dict(overrides))
    return parser


def _root_error(e: BaseException | None) -> BaseException | None:
    """The innermost ValueError of an exception chain (MONAI wraps config errors in RuntimeError), else None."""
    inner = _root_error(e.__cause__ or e.__context__) if e is not None else None
    return inner or (e if isinstance(e, ValueError) else None)


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


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage``: it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _SavedBytes:
    """Bytes autograd keeps for backward (unique storages packed by ``saved_tensors_hooks``): ``step_bytes`` since the
    last ``reset`` (each ``ITERATION_STARTED`` of a trial), ``peak`` the largest step's before it."""

    def __init__(self):
        self.peak, self.step_bytes, self.seen = 0, 0, set()

    def reset(self, engine=None) -> None:
        self.peak, self.step_bytes, self.seen = max(self.peak, self.step_bytes), 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        meta = t.device.type == "meta"  # no storage there: each tensor counts
        key = id(t) if meta else (t.device.type, t.untyped_storage().data_ptr())
        if key not in self.seen:
            self.seen.add(key)
            self.step_bytes += t.numel() * t.element_size() if meta else t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _Tuner:
    """Holds the config and runs trials (each a fresh parse of the config; see the module docstring)."""

    trainer_id = "train#trainer"

    def __init__(self, config_files: Sequence[str], overrides: dict, deadline: float, volumes: int = 4):
        from custom_components.training.workflow import check_settings

        self.config_files, self.user_overrides, self.deadline = list(config_files), dict(overrides), deadline
        base = _make_parser(self.config_files, {**self.user_overrides, "overwrite": True})
        c = self.cfg = {k: base.get_parsed_content(k) for k in CONFIG_KEYS}
        check_settings(c["patch_size"], c["batch_size"], c["device"], c["epochs"], c["iterations_per_epoch"],
                       c["max_levels"])
        self.device = torch.device(c["device"])
        self.cuda = self.device.type == "cuda"
        self.handler_refs = _handler_refs(base, self.trainer_id)
        self.determinism = [f"initialize#{i}" for i, x in enumerate(base["initialize"]) if "set_determinism" in x]
        pre = base.get_parsed_content("preflight")
        _STORE["preflight"] = {**pre, "train": list(pre["train"])[: max(1, volumes)]}
        self.val_entries = list(pre["val"])[: c["val_max_volumes"] or None]
        self.tuning_volumes, self.total_volumes = len(_STORE["preflight"]["train"]), len(pre["train"])
        del base
        gc.collect()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def _parser(self, batch_size: int, num_workers: int, prefetch: int, warmup: int, steps: int) -> ConfigParser:
        """The config at these settings: the trainer runs an epoch of ``warmup`` steps (if any), then ``steps``."""
        t = self.trainer_id
        parser = _make_parser(self.config_files, {
            **self.user_overrides, "batch_size": batch_size, "num_workers": num_workers, "prefetch": prefetch,
            "overwrite": True, "preflight": "$custom_components.training.autotune._STORE['preflight']",
            f"{t}#max_epochs": 2 if warmup else 1, f"{t}#epoch_length": warmup or steps,
            f"{t}#train_handlers": list(self.handler_refs)})
        for key in self.determinism:  # the run's own initialize step (cudnn deterministic is slower)
            parser.get_parsed_content(key)
        return parser

    def trial(self, kind: str, batch_size: int, num_workers: int, prefetch: int, warmup: int, steps: int,
              host_memory: bool = False, after: Callable | None = None) -> dict:
        """One trial: the trainer built from the config at these settings runs ``warmup`` steps, then ``steps``
        (the measured epoch ends after its first step once past the deadline); ``after(parser, trainer, rec)``."""
        rec = {"kind": kind, "batch_size": batch_size, "num_workers": num_workers, "prefetch": prefetch, "oom": False}
        parser = trainer = None
        saved, t_start = _SavedBytes() if host_memory else None, time.time()
        try:
            parser = self._parser(batch_size, num_workers, prefetch, warmup, steps)
            trainer = parser.get_parsed_content(self.trainer_id)
            ThroughputHandler(batch_size).attach(trainer)
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: setattr(e.state, "epoch_length", steps))
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      lambda e: e.terminate_epoch() if time.time() > self.deadline else None)
            if saved is not None:
                trainer.add_event_handler(Events.ITERATION_STARTED, saved.reset)
            rec["rss_before_bytes"] = _peak_rss_bytes()
            with contextlib.ExitStack() as stack:
                stack.callback(trainer.logger.setLevel, trainer.logger.level)
                trainer.logger.setLevel(logging.ERROR)  # no per-epoch chatter from the handlers
                stack.enter_context(saved.hooks() if saved is not None else contextlib.nullcontext())
                trainer.run()
            rec["peak_rss_bytes"] = _peak_rss_bytes()
            self._trial_stats(trainer, rec, saved)
            if after is not None:
                after(parser, trainer, rec)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            rec.update(oom=True, note="out of memory")
        finally:
            del trainer, parser  # ignite drops its loader iterator at the end of a run or on an error: the buffer stops
            gc.collect()
            if self.cuda:
                rec.setdefault("peak_gpu_bytes", torch.cuda.max_memory_allocated(self.device))
                torch.cuda.empty_cache()
        rec["wall_s"] = time.time() - t_start
        return rec

    def _trial_stats(self, trainer, rec: dict, saved: _SavedBytes | None) -> None:
        """Into ``rec``: the measured epoch by ``ThroughputHandler`` (mean step, data wait, ``step_times``), peak GPU
        memory, autograd-saved bytes, whether a topology step was measured (the references end here)."""
        m, n = trainer.state.metrics, len(trainer.step_timer)
        if n and m.get("throughput/samples_per_s"):
            rec.update(steps=n, step_s=rec["batch_size"] / m["throughput/samples_per_s"],
                       data_wait_fraction=m["throughput/data_wait"], parts=dict(trainer.state.step_times))
        if saved is not None:
            saved.reset()
            rec["saved_bytes"] = saved.peak or None
        if self.cuda:
            rec["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        terms = getattr(trainer.loss_function, "terms", {})
        if "topology" in terms and n:
            every, done = terms["topology"].every_n, trainer.state.iteration
            rec["topology_in_measured"] = any((c - 1) % every == 0 for c in range(done - n + 1, done + 1))

    def meta_estimate(self, batch_size: int = 1) -> dict:
        """Parameter bytes and the bytes autograd saves in the network's forward at ``batch_size``, run on the
        ``meta`` device (nothing allocated; loss and augmentation not included)."""
        net = self._parser(batch_size, 0, 2, 0, 1).get_parsed_content("network_def").to("meta").train()
        saved = _SavedBytes()
        with saved.hooks():
            net(torch.empty(batch_size, 1, *self.cfg["patch_size"], device="meta"))
        return {"param_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
                "forward_saved_bytes": saved.step_bytes}

    def val_forward_s(self, parser: ConfigParser, trainer, rec: dict) -> None:
        """Seconds of one validation forward of ``val_sw_batch_size`` windows (eval, no grad), into ``rec``."""
        inferer = parser.get_parsed_content("validate#inferer")
        roi, sw, overlap = list(inferer.roi_size), inferer.sw_batch_size, float(inferer.overlap)
        amp = self.cuda and parser.get_parsed_content("validate#evaluator#amp")
        # a training forward (with grad) of the same windows bounds the cost; time it only if the budget allows
        guess = rec.get("parts", {}).get("forward", 0.0) * sw / rec["batch_size"]
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
    return max(1, requested) if requested else max(2, min(tuner.cfg["topology_every_n"], cap))


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
        if measured[(w, p)]["data_wait_fraction"] < MAX_DATA_WAIT:
            break
    if not measured:
        raise ValueError(f"no loader trial finished at batch_size {batch} within --max_minutes.")
    return pick_loader_settings(list(measured.values()))


def _tune_cuda(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict, dict]:
    """The largest batch (doubling, then bisection, in half the time left), then the loader at that batch."""
    total = torch.cuda.get_device_properties(tuner.device).total_memory
    budget, pct, gb = args.memory_fraction * total, _pct(args.memory_fraction, 0), total / 2**30

    def fits(b: int) -> bool:
        rec = tuner.trial("batch", b, tuner.cfg["num_workers"], tuner.cfg["prefetch"], warmup=0, steps=2)
        rec["fits"] = not rec["oom"] and rec["peak_gpu_bytes"] <= budget
        if not rec["oom"]:
            rec["note"] = "fits" if rec["fits"] else f"over {pct} of {gb:.0f} GB"
        trials.append(rec)
        return rec["fits"]

    half = 0.5 * max(tuner.time_left(), 0.0)  # the batch search may use half of the time left, the loader the rest
    what = f"at patch_size {tuner.cfg['patch_size']} on {tuner.device} ({gb:.0f} GB, amp={tuner.cfg['amp']})"
    best = search_largest_batch(fits, limit=args.max_batch, out_of_time=lambda: tuner.time_left() < half, what=what)
    peak = next(t["peak_gpu_bytes"] for t in trials if t["batch_size"] == best)
    failed_above = any(t["batch_size"] > best and not t["fits"] for t in trials)
    cut = not failed_above and best < args.max_batch
    summary = f"batch {best} peaks at {_fmt_gb(peak)} of {gb:.1f} GB (limit {pct})" + (
        "; the search stopped at --max_batch" if best >= args.max_batch else
        "; the search ran out of --max_minutes before a batch failed: larger ones were not tried" if cut else "")
    if best < tuner.cfg["batch_size"] and failed_above:
        notes.append(f"the configured batch_size {tuner.cfg['batch_size']} does not fit with the safety margin here")
    elif cut:
        notes.append(f"the largest batch is not known: only up to {best} was tried in the time given (raise --max_minutes)")
    mem = {"total_bytes": total, "budget_bytes": budget, "peak_at_best_bytes": peak, "search_cut_by_time": cut,
           "summary": summary}
    return best, _loader_search(tuner, best, _steps_for(tuner, args.steps, 20), trials, {}), mem


def _cpu_slopes(tuner: _Tuner, steps: int, limit: float, meta_saved: int, notes: list) -> list[dict]:
    """Batch 1, then the configured batch (2 if that is 1) if its memory predicted from batch 1 is under ``limit``
    and the time left allows it; each with a note when a topology step was among the measured ones."""
    batch, conf = tuner.cfg["batch_size"], (tuner.cfg["num_workers"], tuner.cfg["prefetch"])
    other = batch if batch != 1 else 2
    run = functools.partial(tuner.trial, "slope", num_workers=conf[0], prefetch=conf[1], warmup=1, steps=steps,
                            host_memory=True)
    slopes = [run(1, after=tuner.val_forward_s if batch == 1 else None)]
    one = slopes[0]
    predicted = one["peak_rss_bytes"] + (other - 1) * 1.5 * (one.get("saved_bytes") or meta_saved)
    if predicted > limit:
        notes.append(f"batch {other} not tried: predicted {_fmt_gb(predicted)} > {_fmt_gb(limit)}")
    elif tuner.time_left() < 1.5 * one["wall_s"] * other:
        notes.append(f"batch {other} not tried: --max_minutes left too little time")
    else:
        slopes.append(run(other, after=None if _timed_val(slopes) else tuner.val_forward_s))
    for t in slopes:
        if t.get("topology_in_measured"):
            t["note"] = (t.get("note", "") + " topology step measured").strip()
    return slopes


def _cpu_memory(slopes: list[dict], batch: int, limit: float, meta_saved: int) -> dict:
    """Memory per sample (the largest of the peak-RSS slope, the autograd-saved bytes' slope and batch 1's saved
    bytes, or the meta estimate's when batch 1 ran alone), at the configured ``batch`` and the batch ``limit`` allows."""
    one, last = slopes[0], slopes[-1]
    n = max(last["batch_size"] - 1, 1)
    saved1 = one.get("saved_bytes") or (0 if len(slopes) > 1 else meta_saved)
    per_sample = max((last["peak_rss_bytes"] - one["peak_rss_bytes"]) / n,
                     ((last.get("saved_bytes") or 0) - (one.get("saved_bytes") or 0)) / n, saved1, 1.0)
    base = last["peak_rss_bytes"] - last["batch_size"] * per_sample
    return {"per_sample_bytes": per_sample, "predicted_at_configured_bytes": base + batch * per_sample,
            "largest_batch_estimate": max(0, int((limit - base) // per_sample))}


def _extrapolated(slopes: list[dict], batch: int) -> dict:
    """The loader not tuned: the step time at ``batch`` on the line through the slope trials (batch 1 alone: x batch)."""
    one, last = slopes[0], slopes[-1]
    step = one["step_s"] * batch
    if len(slopes) > 1 and last.get("step_s") is not None:
        n = last["batch_size"]
        step = last["step_s"] + (batch - n) * (last["step_s"] - one["step_s"]) / (n - 1)
    return {**last, "batch_size": batch, "step_s": step, "meets": None,
            "reason": f"loader not tuned; step time extrapolated to batch {batch}"}


def _tune_cpu(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict | None, dict]:
    """The configured batch kept: batch 1 (if its meta-device estimate fits) and it measured, the loader tuned at it."""
    batch, pct = tuner.cfg["batch_size"], _pct(args.memory_fraction, 0)
    usable = _peak_rss_bytes() + os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # RSS + free memory
    limit, est = args.memory_fraction * usable, tuner.meta_estimate(1)
    # weights, gradients, up to two optimiser moments; x2.5 the forward's saved bytes: loss terms, augmentation, transients
    need1 = _peak_rss_bytes() + 4 * est["param_bytes"] + 2.5 * est["forward_saved_bytes"]
    mem = {"usable_bytes": usable, "limit_bytes": limit, "meta_estimate_batch1": est, "predicted_batch1_bytes": need1}
    if need1 > limit:
        mem["summary"] = (f"batch 1 would need about {_fmt_gb(need1)} (meta-device estimate), over {pct} of the "
                          f"{_fmt_gb(usable)} this process can use: not run")
        notes.append("no trial ran: the CPU would run out of memory; tune on a GPU or with a smaller patch_size / filters")
        return batch, None, mem
    steps = _steps_for(tuner, args.steps, 5)
    slopes = _cpu_slopes(tuner, steps, limit, est["forward_saved_bytes"], notes)
    trials += slopes
    mem.update(_cpu_memory(slopes, batch, limit, est["forward_saved_bytes"]))
    at_cfg, per_sample = mem["predicted_at_configured_bytes"], mem["per_sample_bytes"]
    mem["summary"] = (f"peak RSS about {_fmt_gb(at_cfg)} at batch {batch}, at most {_fmt_gb(per_sample)} more per "
                      f"sample (RSS slope / autograd-saved activations); by that about {mem['largest_batch_estimate']} "
                      f"samples would fit in {pct} of the {_fmt_gb(usable)} usable here (not tried)")
    loader = None
    if at_cfg > limit:
        notes.append(f"the configured batch_size {batch} would need about {_fmt_gb(at_cfg)} > {_fmt_gb(limit)}: "
                     "loader not tuned, time extrapolated")
    else:
        measured = {(t["num_workers"], t["prefetch"]): t for t in slopes
                    if t["batch_size"] == batch and t.get("step_s") is not None}
        try:
            loader = _loader_search(tuner, batch, min(steps, 3), trials, measured)
        except ValueError as e:
            notes.append(str(e))
    if loader is None and slopes[0].get("step_s") is not None:
        loader = _extrapolated(slopes, batch)
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
    tuner = _Tuner(config_files, overrides, deadline=t0 + 60 * args.max_minutes, volumes=args.volumes)
    try:
        batch, loader, memory = (_tune_cuda if tuner.cuda else _tune_cpu)(tuner, args, trials, notes)
    finally:
        if tuner.determinism:  # as the run's finalize step does
            set_determinism(seed=None)
    cfg, files, loader = tuner.cfg, list(config_files), loader or {}
    rec = {"batch_size": batch, "num_workers": loader.get("num_workers", cfg["num_workers"]),
           "prefetch": loader.get("prefetch", cfg["prefetch"])}
    validation, val_s = _validation(tuner, trials)
    expected, basis = None, ""
    if loader.get("step_s") is not None:
        expected = estimate_run_time(loader["step_s"], cfg["iterations_per_epoch"], cfg["epochs"], val_s, cfg["val_interval"])
        basis = (f"{'measured' if tuner.cuda else 'measured on this CPU'} at batch {batch}, num_workers "
                 f"{loader['num_workers']}, prefetch {loader['prefetch']}, {loader.get('steps', 0)} steps"
                 + ("" if loader.get("topology_in_measured", True) else ", no topology step among them"))
    if tuner.tuning_volumes < tuner.total_volumes:
        notes.append(f"data wait measured on {tuner.tuning_volumes} of {tuner.total_volumes} training volumes "
                     "(page cache warm): a cold or slow disk waits longer")
    if batch != cfg["batch_size"]:
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
        "trials": trials, "memory": memory,
        "loader": {k: loader[k] for k in ("num_workers", "prefetch", "data_wait_fraction", "step_s", "meets", "reason")
                   if k in loader},
        "recommended": rec, "recommended_cli": " ".join(f"--{k} {v}" for k, v in rec.items()),
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
        if (root := _root_error(e)) is not None:
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
