"""Tuning without a person: the largest batch that fits, loader settings that keep the GPU fed, the run's duration.

    python -m custom_components.training.autotune --config_file bundle/configs/train.json [--config_file more.json ...]
        [--dataset_dir DIR] [--max_minutes 5] [--out tune.json] [--key value ...]

The configs are read as ``python -m monai.bundle run`` reads them: the files merged in order, then every
other ``--key value`` pair (``--patch_size "[96,96,96]"``, ``--train#dataset#fg_fraction 0.5``) applied with
``ConfigParser.update``. Everything measured is built *from that config*: network, loss, optimiser, data
loader, device augmentation (``prepare_batch``) and the ``train#trainer`` itself, so a step here is a step
of the run. Only the trainer's handlers are cut down to those that work per iteration and touch no file
(``EpochSeedHandler``, ``LrScheduleHandler``, ``LossTermsHandler``, ``ThroughputHandler``): logging to files,
TensorBoard, checkpoint saving / resuming and validation are left out (validation is estimated apart).

Each trial is a fresh parse of the config with ``batch_size`` / ``num_workers`` / ``prefetch`` overridden,
a real ``trainer.run()`` of a few iterations, then everything deleted (``gc.collect``,
``torch.cuda.empty_cache``). The preflight of the config runs once (all its checks), and the tuning reads
only its first ``--volumes`` training volumes, prepared into the run's own cache (``cache_dir``), which the
run then reuses.

- CUDA: ``search_largest_batch`` doubles then bisects the batch; a batch fits when two real steps
  (forward, loss, backward, optimiser, at the config's AMP setting; the first step computes the topology
  term) run without ``torch.cuda.OutOfMemoryError`` and their ``torch.cuda.max_memory_allocated`` stays
  under ``--memory_fraction`` (90 %) of the GPU. Then loader settings (``num_workers`` x ``prefetch``, the
  cheapest first) are tried at that batch until data wait (the time from ``GET_BATCH_STARTED`` to
  ``GET_BATCH_COMPLETED``, as ``ThroughputHandler`` counts it) is under 5 % of the step.
- CPU: nothing is pushed towards an out-of-memory kill. The memory of batch 1 is first estimated on the
  ``meta`` device (no allocation); the trial runs only when it fits in host memory with room to spare,
  then one more trial at the configured batch (its memory predicted from batch 1 first). Time per step
  and memory (peak process RSS, and the bytes autograd saves for backward) are measured; the output says
  ``ESTIMATED (CPU, no out-of-memory search)`` and keeps the configured batch.

Printed: the trials, the recommended overrides (``--batch_size N --num_workers M --prefetch P`` and as
JSON) and the expected seconds per step, per epoch (``iterations_per_epoch``) and for the whole run
(``epochs``), plus validation: the sliding-window network passes (windows of ``patch_size`` at
``val_overlap``, ``val_sw_batch_size`` at a time, timed once) over ``val_max_volumes`` volumes every
``val_interval`` epochs; the metric (``LeaderboardIgniteMetric``, on the CPU) and checkpoint writes are not
included. ``--out`` writes all of it as JSON (atomically).
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime

__all__ = [
    "search_largest_batch",
    "pick_loader_settings",
    "estimate_run_time",
    "loader_candidates",
    "sliding_window_count",
    "validation_seconds",
    "parse_overrides",
    "format_report",
    "main",
]

MAX_DATA_WAIT = 0.05
SAFE_HANDLERS = ("EpochSeedHandler", "LrScheduleHandler", "LossTermsHandler", "ThroughputHandler")
_STORE: dict = {}  # the preflight result of this process, read back by every trial's config


# ----------------------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and the CUDA/cuDNN/cuBLAS allocation failures raised as RuntimeError."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg)


def search_largest_batch(
    try_batch: Callable[[int], bool],
    start: int = 1,
    limit: int = 256,
    out_of_time: Callable[[], bool] | None = None,
    what: str = "",
) -> int:
    """Largest batch ``b`` in ``[start, limit]`` with ``try_batch(b)`` true, assuming fitting is monotone.

    Doubling from ``start`` (``start, 2 start, 4 start, ...``, capped at ``limit``) until a batch fails, then
    bisection between the last batch that fit and the first that failed: about ``2 log2(b)`` calls, each
    batch tried at most once. ``try_batch`` returns False when the batch does not fit; an out-of-memory
    exception it raises (``torch.cuda.OutOfMemoryError``) counts as False too. When ``out_of_time()``
    becomes true the largest batch known to fit is returned. ``ValueError`` (naming ``what``) if ``start``
    itself does not fit.
    """
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
        raise ValueError(
            f"batch_size {start} does not fit{' ' + what if what else ''}: reduce patch_size or filters, "
            "or set amp=true (bf16 on CUDA)."
        )
    lo, hi = start, None  # lo fits; hi (if any) does not
    while hi is None and lo < limit:
        if out_of_time is not None and out_of_time():
            return lo
        b = min(2 * lo, limit)
        if fits(b):
            lo = b
        else:
            hi = b
    while hi is not None and hi - lo > 1:
        if out_of_time is not None and out_of_time():
            break
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def loader_candidates(cpu_count: int, configured: tuple[int, int] | None = None,
                      workers: Sequence[int] = (0, 1, 2, 4, 8, 16), prefetch: Sequence[int] = (2, 4)) -> list[tuple[int, int]]:
    """``(num_workers, prefetch)`` pairs to try, cheapest first (fewer workers, then a smaller buffer).

    Workers are capped at ``cpu_count - 1`` (one core stays with the trainer); the configured pair is
    always included.
    """
    cap = max(0, int(cpu_count) - 1)
    ws = {w for w in workers if w <= cap} | {0}
    ps = set(int(p) for p in prefetch)
    out = {(w, p) for w in ws for p in ps}
    if configured is not None:
        out.add((int(configured[0]), int(configured[1])))
    return sorted(out)


def pick_loader_settings(measurements: Sequence[dict], max_data_wait: float = MAX_DATA_WAIT) -> dict:
    """The cheapest loader setting whose data wait is under ``max_data_wait`` of the step.

    ``measurements``: dicts with ``num_workers``, ``prefetch``, ``data_wait_fraction`` (wait / whole step)
    and optionally ``step_s``. Cheapest = fewest workers, then smallest ``prefetch``. Returns a copy of the
    chosen measurement with ``meets`` (bool) and ``reason`` (a sentence); when none meets the threshold,
    the one with the smallest data wait, ``meets=False``, and a reason that says so.
    """
    if not measurements:
        raise ValueError("pick_loader_settings needs at least one loader measurement, got none.")
    for m in measurements:
        for k in ("num_workers", "prefetch", "data_wait_fraction"):
            if k not in m:
                raise ValueError(f"loader measurement {m} has no '{k}'.")
    ok = [m for m in measurements if float(m["data_wait_fraction"]) < max_data_wait]
    if ok:
        best = min(ok, key=lambda m: (int(m["num_workers"]), int(m["prefetch"])))
        return {**best, "meets": True, "reason": (
            f"num_workers={best['num_workers']}, prefetch={best['prefetch']} is the cheapest setting with data wait "
            f"{100 * float(best['data_wait_fraction']):.1f} % < {100 * max_data_wait:.0f} % of the step")}
    best = min(measurements, key=lambda m: (float(m["data_wait_fraction"]), int(m["num_workers"]), int(m["prefetch"])))
    return {**best, "meets": False, "reason": (
        f"no setting tried keeps data wait under {100 * max_data_wait:.0f} % of the step; the lowest was "
        f"{100 * float(best['data_wait_fraction']):.1f} % with num_workers={best['num_workers']}, prefetch={best['prefetch']} "
        "(the host cannot crop patches fast enough: more CPU cores, the cache on a local SSD, or a larger batch per step)")}


def estimate_run_time(step_s: float, iterations_per_epoch: int, epochs: int, val_s: float | None = None,
                      val_interval: int = 0) -> dict:
    """Expected seconds of the run from the measured seconds per step.

    ``epoch_s = step_s * iterations_per_epoch``; ``train_s = epoch_s * epochs``; validation runs at every
    epoch that is a multiple of ``val_interval`` (``validations = epochs // val_interval``, 0 when
    ``val_interval <= 0``), ``val_total_s = validations * val_s``; ``total_s = train_s + val_total_s``.
    ``val_s=None`` (not estimated): ``val_total_s`` is None and ``total_s`` counts training only
    (``validation_included`` False).
    """
    if step_s < 0 or not math.isfinite(step_s):
        raise ValueError(f"step_s must be a finite number >= 0, got {step_s}.")
    if int(iterations_per_epoch) < 1 or int(epochs) < 1:
        raise ValueError(f"iterations_per_epoch and epochs must be >= 1, got {iterations_per_epoch} and {epochs}.")
    epoch_s = float(step_s) * int(iterations_per_epoch)
    train_s = epoch_s * int(epochs)
    validations = int(epochs) // int(val_interval) if int(val_interval) > 0 else 0
    val_total = None if val_s is None else validations * float(val_s)
    return {
        "step_s": float(step_s),
        "epoch_s": epoch_s,
        "train_s": train_s,
        "validations": validations,
        "val_s": None if val_s is None else float(val_s),
        "val_total_s": val_total,
        "total_s": train_s + (val_total or 0.0),
        "validation_included": val_s is not None or validations == 0,
    }


def sliding_window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``SlidingWindowInferer`` takes over ``shape``: per axis 1 if ``s <= r``, else
    ``ceil((s - r) / interval) + 1`` with ``interval = max(1, int(r * (1 - overlap)))``; their product."""
    n = 1
    for s, r in zip(shape, roi):
        s, r = int(s), int(r)
        if s <= r:
            continue
        interval = max(1, int(r * (1 - float(overlap))))
        n *= math.ceil((s - r) / interval) + 1
    return n


def validation_seconds(shapes: Sequence[Sequence[int]], roi: Sequence[int], overlap: float, sw_batch_size: int,
                       forward_s: float) -> float:
    """Seconds of one validation's network passes: ``sum_v ceil(windows_v / sw_batch_size) * forward_s``,
    ``forward_s`` being one forward of ``sw_batch_size`` windows."""
    return sum(math.ceil(sliding_window_count(s, roi, overlap) / int(sw_batch_size)) for s in shapes) * float(forward_s)


def _literal(text: str):
    """A command-line value as ``monai.bundle`` (fire) reads it: JSON / a Python literal, else the string."""
    for conv in (json.loads, ast.literal_eval):
        try:
            return conv(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def parse_overrides(args: Sequence[str]) -> dict:
    """``["--a", "1", "--b#c", "[2, 3]", "--d=x"]`` -> ``{"a": 1, "b#c": [2, 3], "d": "x"}``; ValueError on a stray value."""
    out, i, args = {}, 0, list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ValueError(f"unexpected argument '{a}': overrides are '--id value' pairs.")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key] = _literal(value)
    return out


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "not estimated"
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GB"


def _cli_value(v) -> str:
    """A value as a shell word for ``monai.bundle run``: JSON without spaces for non-strings, shell-quoted."""
    import shlex

    return shlex.quote(v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))


def format_report(result: dict) -> str:
    """The printed summary of an autotune result (the dict ``main`` writes with ``--out``)."""
    lines = []
    cfg = result["configured"]
    head = ("MEASURED (CUDA, out-of-memory search)" if result["mode"] == "cuda"
            else "ESTIMATED (CPU, no out-of-memory search)")
    lines.append(f"autotune {result['date']}: {head}")
    amp = "bf16" if cfg["amp"] and result["mode"] == "cuda" else "off"
    lines.append(f"  device {result['device']} ({result['device_name']}), amp {amp}, "
                 f"patch_size {cfg['patch_size']}, configured batch_size {cfg['batch_size']}, num_workers {cfg['num_workers']}, "
                 f"prefetch {cfg['prefetch']}; {result['tuning_volumes']} training volume(s) read")
    lines.append("")
    lines.append(f"  {'trial':<7} {'batch':>5} {'workers':>7} {'prefetch':>8} {'steps':>5} {'s/step':>8} {'data wait':>9} "
                 f"{'peak GPU':>9} {'peak RSS':>9} {'saved act.':>10}  note")
    for t in result["trials"]:
        wait = "-" if t.get("data_wait_fraction") is None else f"{100 * t['data_wait_fraction']:.1f} %"
        step = "-" if t.get("step_s") is None else f"{t['step_s']:.3f}"
        lines.append(f"  {t['kind']:<7} {t['batch_size']:>5} {t['num_workers']:>7} {t['prefetch']:>8} {t.get('steps', 0):>5} {step:>8} "
                     f"{wait:>9} {_fmt_gb(t.get('peak_gpu_bytes')):>9} {_fmt_gb(t.get('peak_rss_bytes')):>9} "
                     f"{_fmt_gb(t.get('saved_bytes')):>10}  {t.get('note', '')}")
    lines.append("")
    mem = result.get("memory", {})
    if mem.get("summary"):
        lines.append(f"  memory: {mem['summary']}")
    lo = result.get("loader", {})
    if lo.get("reason"):
        lines.append(f"  loader: {lo['reason']}")
    rec = result["recommended"]
    lines.append("")
    lines.append("  recommended overrides:")
    words = ["python -m monai.bundle run training --config_file", result["config_file_arg"]]
    words += [f"--{k} {_cli_value(v)}" for k, v in result.get("user_overrides", {}).items() if k not in rec]
    lines.append("    " + " ".join(words + [result["recommended_cli"]]))
    lines.append(f"    JSON: {json.dumps(rec)}")
    e = result.get("expected")
    lines.append("")
    if e:
        lines.append(f"  expected ({result['expected_basis']}):")
        lines.append(f"    per step   {_fmt_s(e['step_s'])}")
        lines.append(f"    per epoch  {_fmt_s(e['epoch_s'])} ({cfg['iterations_per_epoch']} iterations)")
        lines.append(f"    training   {_fmt_s(e['train_s'])} ({cfg['epochs']} epochs)")
        if e["validations"] == 0:
            lines.append("    validation none (val_interval > epochs, or no validation volumes)")
        elif e["val_s"] is None:
            lines.append(f"    validation not estimated ({result.get('validation', {}).get('note', '')}); "
                         f"{e['validations']} validations come on top")
        else:
            lines.append(f"    validation {_fmt_s(e['val_total_s'])} ({e['validations']} x {_fmt_s(e['val_s'])}: "
                         f"{result['validation']['note']})")
        lines.append(f"    whole run  {_fmt_s(e['total_s'])}{'' if e['validation_included'] else ' (training only)'}")
    else:
        lines.append("  expected time: not measured (no trial ran; see the notes)")
    for n in result.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# config and trials
# ----------------------------------------------------------------------------------------------------------
def _make_parser(config_files: Sequence[str], overrides: dict):
    """A ``ConfigParser`` as ``monai.bundle run`` makes it: the files merged in order, then ``overrides``."""
    from monai.bundle import ConfigParser

    for f in config_files:
        if not os.path.isfile(f):
            raise ValueError(f"config_file '{f}' does not exist.")
    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    parser.update(pairs=dict(overrides))
    return parser


def _value(parser, key: str, default=None):
    """The evaluated value of config id ``key``, ``default`` when the config has no such id."""
    if key not in parser:
        return default
    return parser.get_parsed_content(key)


def _root_error(e: BaseException) -> BaseException:
    """The innermost ValueError of an exception chain (MONAI wraps config errors in RuntimeError), else ``e``."""
    seen, cur, found = set(), e, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ValueError):
            found = cur
        cur = cur.__cause__ or cur.__context__
    return found or e


def _handler_refs(parser, trainer_id: str) -> list[str]:
    """References to the trainer's handlers that work per iteration and write no file (``SAFE_HANDLERS``).

    ``train_handlers`` may be a list, a reference to one, or an expression joining references
    (``"$[@train#checkpoint_resumer] + @train#handlers + [@train#checkpoint_saver]"``): every referenced
    list is scanned item by item, every referenced component on its own.
    """
    import re

    key = f"{trainer_id}#train_handlers"
    raw = parser.get(key)
    if isinstance(raw, list):
        sources = [key]
    elif isinstance(raw, str):
        sources = re.findall(r"@([\w#]+)", raw)
    else:
        return []

    def safe(h) -> bool:
        target = h.get("_target_", "") if isinstance(h, dict) else ""
        return isinstance(target, str) and target.rsplit(".", 1)[-1] in SAFE_HANDLERS

    refs = []
    for src in sources:
        item = parser.get(src)
        if isinstance(item, list):
            refs += [f"@{src}#{i}" for i, h in enumerate(item) if safe(h)]
        elif safe(item):
            refs.append(f"@{src}")
    return refs


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (memory the kernel can give without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _RssSampler:
    """Peak resident memory of this process while the ``with`` block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


class _SavedBytes:
    """Bytes autograd keeps for backward (unique storages packed by ``saved_tensors_hooks``), per step."""

    def __init__(self):
        self.step_bytes = 0
        self._seen: set = set()

    def reset(self):
        self.step_bytes, self._seen = 0, set()

    def pack(self, t):
        try:
            s = t.untyped_storage()
            key, nbytes = (t.device.type, s.data_ptr()), s.nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if t.device.type == "meta":
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.step_bytes += nbytes
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _StepRecorder:
    """Per-iteration data wait and step time (``GET_BATCH_STARTED`` -> ``ITERATION_COMPLETED``), the mean
    phases of the trainer's ``step_timer`` over the measured steps (restarted after the warm-up, read once at
    the end) and saved-tensor bytes; ends the run at ``deadline`` once a measured step is in."""

    def __init__(self, warmup: int, deadline: float, saved: _SavedBytes | None = None):
        self.warmup, self.deadline, self.saved = int(warmup), float(deadline), saved
        self.steps: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _batch_started(self, engine):
        self.t0 = time.perf_counter()
        if self.saved is not None:
            self.saved.reset()

    def _batch_completed(self, engine):
        self.wait = time.perf_counter() - self.t0

    def _completed(self, engine):
        now = time.perf_counter()
        self.timer = getattr(engine, "step_timer", None)
        self.steps.append({"total": now - self.t0, "wait": self.wait,
                           "saved": self.saved.step_bytes if self.saved is not None else None})
        if len(self.steps) == self.warmup and self.timer is not None:
            self.timer.reset()
        if time.time() > self.deadline:  # out of time: stop after this step (warm-up only, if need be)
            engine.terminate()

    def summary(self) -> dict:
        measured = self.steps[self.warmup:] or self.steps
        if not measured:
            return {"steps": 0, "step_s": None, "data_wait_fraction": None, "parts": {}, "warmup_only": True}
        total = sum(s["total"] for s in measured)
        timer = getattr(self, "timer", None)
        parts = {k: v / len(timer) for k, v in timer.totals().items()} if timer is not None and len(timer) else {}
        saved = [s["saved"] for s in self.steps if s["saved"] is not None]
        return {
            "steps": len(measured),
            "step_s": total / len(measured),
            "data_wait_fraction": sum(s["wait"] for s in measured) / max(total, 1e-12),
            "parts": parts,
            "warmup_only": len(self.steps) <= self.warmup,
            "first_step_s": self.steps[0]["total"],
            "saved_bytes": max(saved) if saved else None,
        }


class _Tuner:
    """Holds the config and runs trials (each a fresh parse of the config; see the module docstring)."""

    def __init__(self, config_files: Sequence[str], overrides: dict, deadline: float, volumes: int = 4):
        import torch

        self.config_files = list(config_files)
        self.user_overrides = dict(overrides)
        self.deadline = deadline
        base = _make_parser(self.config_files, {**self.user_overrides, "overwrite": True})
        self.trainer_id = "train#trainer"
        if self.trainer_id not in base:
            raise ValueError(f"the config ({', '.join(self.config_files)}) has no '{self.trainer_id}' to tune.")
        get = lambda k, d=None: _value(base, k, d)  # noqa: E731
        self.cfg = {
            "patch_size": [int(s) for s in get("patch_size")],
            "batch_size": int(get("batch_size", 2)),
            "num_workers": int(get("num_workers", 0)),
            "prefetch": int(get("prefetch", 2)),
            "device": str(get("device", "cpu")),
            "amp": bool(get("amp", False)),
            "epochs": int(get("epochs", 1)),
            "iterations_per_epoch": int(get("iterations_per_epoch", 1)),
            "val_interval": int(get("val_interval", 0) or 0),
            "val_max_volumes": get("val_max_volumes", None),
            "max_levels": int(get("max_levels", 6)),
            "topology_every_n": int(get("topology_every_n", 1) or 1),
        }
        from custom_components.training.workflow import check_settings

        try:
            check_settings(self.cfg["patch_size"], self.cfg["batch_size"], self.cfg["device"], self.cfg["epochs"],
                           self.cfg["iterations_per_epoch"], self.cfg["max_levels"])
        except ValueError as e:
            raise ValueError(f"{e} (config: {' + '.join(self.config_files)})") from e
        self.device = torch.device(self.cfg["device"])
        self.cuda = self.device.type == "cuda"
        self.handler_refs = _handler_refs(base, self.trainer_id)
        self.determinism = [f"initialize#{i}" for i, x in enumerate(base.get("initialize", []) or [])
                            if isinstance(x, str) and "set_determinism" in x]
        if "preflight" in base:
            pre = base.get_parsed_content("preflight")
            volumes = max(1, int(volumes))
            _STORE["preflight"] = {**pre, "train": list(pre["train"])[:volumes]}
            self.val_entries = list(pre.get("val", []))
            if self.cfg["val_max_volumes"]:
                self.val_entries = self.val_entries[: int(self.cfg["val_max_volumes"])]
            self.tuning_volumes = len(_STORE["preflight"]["train"])
            self.total_volumes = len(pre["train"])
        else:
            self.val_entries, self.tuning_volumes, self.total_volumes = [], 0, 0
        del base
        gc.collect()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def _parser(self, batch_size: int, num_workers: int, prefetch: int, steps: int):
        o = {**self.user_overrides, "batch_size": int(batch_size), "num_workers": int(num_workers),
             "prefetch": int(prefetch), "overwrite": True,
             f"{self.trainer_id}#max_epochs": 1, f"{self.trainer_id}#epoch_length": int(steps),
             f"{self.trainer_id}#train_handlers": list(self.handler_refs)}
        if "preflight" in _STORE:
            o["preflight"] = "$custom_components.training.autotune._STORE['preflight']"
        parser = _make_parser(self.config_files, o)
        for key in self.determinism:  # the run's own initialize step (cudnn deterministic is slower)
            parser.get_parsed_content(key)
        return parser

    def trial(self, kind: str, batch_size: int, num_workers: int, prefetch: int, warmup: int, steps: int,
              host_memory: bool = False, after: Callable | None = None) -> dict:
        """One trial: build the trainer from the config at these settings, run ``warmup + steps`` iterations."""
        import torch

        rec = {"kind": kind, "batch_size": int(batch_size), "num_workers": int(num_workers), "prefetch": int(prefetch),
               "oom": False}
        parser = trainer = quiet = None
        quiet_level = logging.NOTSET
        saved = _SavedBytes() if host_memory else None
        recorder = _StepRecorder(warmup, self.deadline, saved)
        t_start = time.time()
        try:
            parser = self._parser(batch_size, num_workers, prefetch, warmup + steps)
            trainer = parser.get_parsed_content(self.trainer_id)
            quiet = logging.getLogger(trainer.logger.name)
            quiet_level = quiet.level
            quiet.setLevel(logging.ERROR)  # no per-epoch chatter from the handlers
            recorder.attach(trainer)
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            rss0 = _rss_bytes()
            with _RssSampler() as rss:
                if saved is not None:
                    with saved.hooks():
                        trainer.run()
                else:
                    trainer.run()
            rec.update(recorder.summary())
            rec["peak_rss_bytes"] = rss.peak
            rec["rss_before_bytes"] = rss0
            self._trial_stats(parser, trainer, recorder, rec)
            if after is not None:
                after(parser, trainer, rec)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            rec["oom"] = True
            rec["note"] = "out of memory"
            rec.update({k: v for k, v in recorder.summary().items() if k not in rec})
        finally:
            if quiet is not None:
                quiet.setLevel(quiet_level)
            it = getattr(trainer, "_dataloader_iter", None) if trainer is not None else None
            if it is not None and hasattr(it, "close"):
                try:
                    it.close()
                except Exception:  # noqa: BLE001 - shutting a loader down must not hide the result
                    pass
            del it, trainer, parser
            gc.collect()
            if self.cuda:
                torch.cuda.synchronize(self.device)
                rec["peak_gpu_bytes"] = rec.get("peak_gpu_bytes", int(torch.cuda.max_memory_allocated(self.device)))
                torch.cuda.empty_cache()
        rec["wall_s"] = time.time() - t_start
        return rec

    def _trial_stats(self, parser, trainer, recorder: _StepRecorder, rec: dict) -> None:
        """Peak GPU memory, parameter / optimiser-state bytes, whether a topology step was measured (into ``rec``).

        A method of its own so that its references to the network and optimiser end with it."""
        import torch

        if self.cuda:
            rec["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            rec["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        rec["param_bytes"] = sum(p.numel() * p.element_size() for p in trainer.network.parameters())
        rec["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values()
                                           for v in st.values() if torch.is_tensor(v))
        terms = getattr(trainer.loss_function, "terms", None)
        topo = terms["topology"] if terms is not None and "topology" in terms else None
        if topo is not None and rec.get("steps"):
            every = int(getattr(topo, "every_n", 1))
            done = len(recorder.steps)
            rec["topology_in_measured"] = any((c - 1) % every == 0 for c in range(done - rec["steps"] + 1, done + 1))

    def meta_estimate(self, batch_size: int = 1) -> dict:
        """Memory of batch ``batch_size`` without allocating it: parameters and the bytes autograd saves in the
        network's forward, run on the ``meta`` device (the loss and augmentation are not included)."""
        import torch

        parser = self._parser(batch_size, 0, 2, 1)
        net = parser.get_parsed_content("network_def")
        params = sum(p.numel() * p.element_size() for p in net.parameters())
        out = {"param_bytes": params, "forward_saved_bytes": None}
        try:
            meta = copy.deepcopy(net).to("meta")
            meta.train()
            saved = _SavedBytes()
            x = torch.empty(int(batch_size), 1, *self.cfg["patch_size"], device="meta")
            with saved.hooks():
                meta(x)
            out["forward_saved_bytes"] = saved.step_bytes
        except Exception as e:  # noqa: BLE001 - an op without a meta kernel: no estimate, say so
            out["error"] = f"{type(e).__name__}: {e}"
        del parser, net
        gc.collect()
        return out

    def val_forward_s(self, parser, trainer, rec) -> None:
        """Seconds of one validation forward of ``val_sw_batch_size`` windows (eval, no grad), into ``rec``."""
        import torch

        if "validate#inferer" not in parser:
            rec["val_note"] = "the config has no validate#inferer"
            return
        inferer = parser.get_parsed_content("validate#inferer")
        roi = [int(r) for r in getattr(inferer, "roi_size", self.cfg["patch_size"])]
        sw = int(getattr(inferer, "sw_batch_size", 1))
        overlap = getattr(inferer, "overlap", 0.25)
        overlap = float(overlap[0] if isinstance(overlap, (list, tuple)) else overlap)
        amp = bool(_value(parser, "validate#evaluator#amp", self.cfg["amp"] and self.cuda)) and self.cuda
        # a training forward (with grad) of the same windows bounds the cost; time it only if the budget allows
        guess = float(rec.get("parts", {}).get("forward", 0.0)) * sw / max(int(rec["batch_size"]), 1)
        runs = 4 if 4 * guess < self.time_left() else 2 if 2 * guess < self.time_left() else 0
        if runs == 0:
            rec["val_note"] = f"validation forward not timed: about {guess:.0f} s each, past --max_minutes"
            return
        net = trainer.network
        net.eval()
        x = torch.zeros(sw, 1, *roi, device=self.device)
        times = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for _ in range(runs):  # one warm-up, then the median of the rest
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                t = time.perf_counter()
                net(x)
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t)
        net.train()
        rest = sorted(times[1:])
        rec["val_forward_s"] = rest[len(rest) // 2]
        rec["val_roi"], rec["val_sw_batch_size"], rec["val_overlap"] = roi, sw, overlap


# ----------------------------------------------------------------------------------------------------------
# the two procedures
# ----------------------------------------------------------------------------------------------------------
def _steps_for(tuner: _Tuner, requested: int | None, cap: int) -> int:
    """Measured steps per timing trial: one topology period (``topology_every_n``) so its cost is amortised, capped."""
    if requested:
        return max(1, int(requested))
    return max(2, min(int(tuner.cfg["topology_every_n"] or 1), cap))


def _loader_search(tuner: _Tuner, batch: int, steps: int, trials: list, measured: dict, validate: list) -> dict:
    """Try loader settings cheapest first at ``batch`` until one keeps data wait under 5 % (or time runs out)."""
    cands = loader_candidates(os.cpu_count() or 1, (tuner.cfg["num_workers"], tuner.cfg["prefetch"]))
    for w, p in cands:
        if (w, p) not in measured:
            if measured and tuner.time_left() < 2.5 * max(m["wall_s"] for m in measured.values()):
                break
            after = tuner.val_forward_s if not validate else None
            rec = tuner.trial("loader", batch, w, p, warmup=2 if tuner.cuda else 1, steps=steps, after=after)
            trials.append(rec)
            if rec.get("val_forward_s") is not None:
                validate.append(rec)
            if rec["oom"] or rec.get("step_s") is None:
                continue
            measured[(w, p)] = rec
        if float(measured[(w, p)]["data_wait_fraction"]) < MAX_DATA_WAIT:
            break
    if not measured:
        raise ValueError(f"no loader trial finished at batch_size {batch} within --max_minutes.")
    return pick_loader_settings(list(measured.values()))


def _tune_cuda(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict, dict]:
    import torch

    total = torch.cuda.get_device_properties(tuner.device).total_memory
    budget = args.memory_fraction * total

    def fits(b: int) -> bool:
        rec = tuner.trial("batch", b, tuner.cfg["num_workers"], tuner.cfg["prefetch"], warmup=0, steps=2)
        rec["fits"] = (not rec["oom"]) and rec.get("peak_gpu_bytes", 0) <= budget
        if not rec["oom"]:
            rec["note"] = "fits" if rec["fits"] else f"over {100 * args.memory_fraction:.0f} % of {total / 2**30:.0f} GB"
        trials.append(rec)
        return rec["fits"]

    half = 0.5 * max(tuner.time_left(), 0.0)  # the batch search may use half of the time left, the loader the rest
    reserve = lambda: tuner.time_left() < half  # noqa: E731
    best = search_largest_batch(fits, start=1, limit=args.max_batch, out_of_time=reserve,
                                what=f"at patch_size {tuner.cfg['patch_size']} on {tuner.device} "
                                     f"({total / 2**30:.0f} GB, amp={tuner.cfg['amp']})")
    peak = next((t["peak_gpu_bytes"] for t in trials if t["kind"] == "batch" and t["batch_size"] == best), None)
    failed_above = any(t["kind"] == "batch" and t["batch_size"] > best and not t.get("fits") for t in trials)
    cut = "" if failed_above or best >= args.max_batch else "; the search ran out of --max_minutes before a batch failed: larger ones were not tried"
    mem = {"total_bytes": total, "budget_bytes": budget, "peak_at_best_bytes": peak, "search_cut_by_time": bool(cut),
           "summary": (f"batch {best} peaks at {_fmt_gb(peak)} of {total / 2**30:.1f} GB (limit {100 * args.memory_fraction:.0f} %)"
                       + ("; the search stopped at --max_batch" if best >= args.max_batch else cut))}
    if best < tuner.cfg["batch_size"] and failed_above:
        notes.append(f"the configured batch_size {tuner.cfg['batch_size']} does not fit with the safety margin here")
    elif cut:
        notes.append(f"the largest batch is not known: only up to {best} was tried in the time given (raise --max_minutes)")
    steps = _steps_for(tuner, args.steps, cap=20)
    validate: list = []
    loader = _loader_search(tuner, best, steps, trials, {}, validate)
    return best, loader, {"memory": mem, "validate": validate}


def _tune_cpu(tuner: _Tuner, args, trials: list, notes: list) -> tuple[int, dict | None, dict]:
    cfg = tuner.cfg
    usable = _rss_bytes() + _available_bytes()
    limit = args.memory_fraction * usable
    est = tuner.meta_estimate(1)
    mem: dict = {"usable_bytes": usable, "limit_bytes": limit, "meta_estimate_batch1": est}
    static = 4 * est["param_bytes"]  # weights, gradients, up to two optimiser moments
    if est.get("forward_saved_bytes") is None:
        notes.append(f"no meta-device memory estimate ({est.get('error')}); batch 1 runs unchecked")
        need1 = _rss_bytes() + static
    else:
        need1 = _rss_bytes() + static + 2.5 * est["forward_saved_bytes"]  # x2.5: loss terms, augmentation, transients
    mem["predicted_batch1_bytes"] = need1
    batch = cfg["batch_size"]
    if need1 > limit:
        mem["summary"] = (f"batch 1 would need about {_fmt_gb(need1)} (meta-device estimate), over "
                          f"{100 * args.memory_fraction:.0f} % of the {_fmt_gb(usable)} this process can use: not run")
        notes.append("no trial ran: the CPU would run out of memory; tune on a GPU or with a smaller patch_size / filters")
        return batch, None, {"memory": mem, "validate": []}
    steps = _steps_for(tuner, args.steps, cap=5)
    validate: list = []
    configured = (cfg["num_workers"], cfg["prefetch"])
    other = batch if batch != 1 else 2
    one = tuner.trial("slope", 1, *configured, warmup=1, steps=steps, host_memory=True,
                      after=tuner.val_forward_s if batch == 1 else None)
    trials.append(one)
    measured: dict = {}
    if batch == 1:
        if one.get("step_s") is not None:
            measured[configured] = one
        if one.get("val_forward_s") is not None:
            validate.append(one)
    per_sample = float(one.get("saved_bytes") or est.get("forward_saved_bytes") or 0.0)
    predicted = one["peak_rss_bytes"] + (other - 1) * 1.5 * per_sample
    second = None
    if predicted > limit:
        notes.append(f"batch {other} not tried: predicted {_fmt_gb(predicted)} > {_fmt_gb(limit)}")
    elif tuner.time_left() < 1.5 * one["wall_s"] * other:
        notes.append(f"batch {other} not tried: --max_minutes left too little time")
    else:
        second = tuner.trial("slope", other, *configured, warmup=1, steps=steps, host_memory=True,
                             after=tuner.val_forward_s if not validate else None)
        trials.append(second)
        if second.get("val_forward_s") is not None:
            validate.append(second)
        if batch == other and second.get("step_s") is not None:
            measured[configured] = second
    # memory per sample: the larger of the RSS slope and the autograd-saved bytes per sample
    if second is not None:
        slope_rss = (second["peak_rss_bytes"] - one["peak_rss_bytes"]) / (other - 1)
        slope_saved = ((second.get("saved_bytes") or 0) - (one.get("saved_bytes") or 0)) / (other - 1)
        per_sample = max(slope_rss, slope_saved, float(one.get("saved_bytes") or 0), 1.0)
        base = second["peak_rss_bytes"] - other * per_sample
    else:
        per_sample = max(per_sample, 1.0)
        base = one["peak_rss_bytes"] - per_sample
    at_cfg = base + batch * per_sample
    largest = max(0, int((limit - base) // per_sample))
    mem.update({"per_sample_bytes": per_sample, "predicted_at_configured_bytes": at_cfg, "largest_batch_estimate": largest})
    mem["summary"] = (f"peak RSS about {_fmt_gb(at_cfg)} at batch {batch}, at most {_fmt_gb(per_sample)} more per sample "
                      f"(RSS slope / autograd-saved activations); by that about {largest} samples would fit in "
                      f"{100 * args.memory_fraction:.0f} % of the {_fmt_gb(usable)} usable here (not tried)")
    for t in (one, second):
        if t is not None and t.get("topology_in_measured"):
            t["note"] = (t.get("note", "") + " topology step measured").strip()
    loader = None
    if at_cfg > limit:
        notes.append(f"the configured batch_size {batch} would need about {_fmt_gb(at_cfg)} > {_fmt_gb(limit)}: "
                     "loader not tuned, time extrapolated")
    else:
        try:
            loader = _loader_search(tuner, batch, min(steps, 3), trials, measured, validate)
        except ValueError as e:
            notes.append(str(e))
    if loader is None and one.get("step_s") is not None:
        step = one["step_s"] * batch
        if second is not None and second.get("step_s") is not None:
            step = second["step_s"] + (batch - other) * (second["step_s"] - one["step_s"]) / (other - 1)
        loader = {**(second or one), "batch_size": batch, "step_s": step, "meets": None,
                  "reason": f"loader not tuned; step time extrapolated to batch {batch}"}
    return batch, loader, {"memory": mem, "validate": validate}


def _config_file_arg(files: Sequence[str]) -> str:
    if len(files) == 1:
        return files[0]
    return '"' + "[" + ",".join(f"'{f}'" for f in files) + "]" + '"'


def _split_config_files(values: Sequence[str]) -> list[str]:
    out = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            parsed = _literal(v)
            if not isinstance(parsed, list):
                raise ValueError(f"--config_file {v} is not a list of paths.")
            out += [str(x) for x in parsed]
        else:
            out.append(v)
    return out


def run_autotune(config_files: Sequence[str], overrides: dict, args) -> dict:
    """Tune the config (CUDA: measured; CPU: estimated) and return the result dict of the module docstring."""
    import torch

    t0 = time.time()
    tuner = _Tuner(config_files, overrides, deadline=t0 + 60 * float(args.max_minutes), volumes=args.volumes)
    trials: list = []
    notes: list = []
    try:
        if tuner.cuda:
            batch, loader, extra = _tune_cuda(tuner, args, trials, notes)
            name = torch.cuda.get_device_name(tuner.device)
        else:
            batch, loader, extra = _tune_cpu(tuner, args, trials, notes)
            name = f"CPU, {torch.get_num_threads()} threads"
    finally:
        if tuner.determinism:  # as the run's finalize step does
            from monai.utils import set_determinism

            set_determinism(seed=None)
    cfg = tuner.cfg
    recommended = {"batch_size": int(batch),
                   "num_workers": int(loader["num_workers"]) if loader else cfg["num_workers"],
                   "prefetch": int(loader["prefetch"]) if loader else cfg["prefetch"]}
    # validation: network passes over the validation volumes' sliding windows
    validation: dict = {}
    val_s = None
    v = extra["validate"][0] if extra["validate"] else None
    if not tuner.val_entries:
        validation["note"] = "no validation volumes"
        val_s = 0.0
    elif v is None or v.get("val_forward_s") is None:
        why = next((t["val_note"] for t in trials if t.get("val_note")), "time ran out or no trial finished")
        validation["note"] = f"no validation forward was timed ({why})"
    else:
        from custom_components.data.io import read_tiff_header

        shapes = [list(read_tiff_header(e["image"])[0]) for e in tuner.val_entries]
        val_s = validation_seconds(shapes, v["val_roi"], v["val_overlap"], v["val_sw_batch_size"], v["val_forward_s"])
        windows = sum(sliding_window_count(s, v["val_roi"], v["val_overlap"]) for s in shapes)
        validation = {"volumes": len(shapes), "windows": windows, "forward_s": v["val_forward_s"],
                      "sw_batch_size": v["val_sw_batch_size"], "seconds": val_s,
                      "note": (f"network passes only, {len(shapes)} volume(s), {windows} windows, "
                               f"{v['val_forward_s']:.3f} s per {v['val_sw_batch_size']} windows; metric and blending not included")}
    expected = None
    basis = ""
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
    if not tuner.cuda:
        notes.append("CPU figures; on a GPU run this again for measured values")
    cli = " ".join(f"--{k} {v}" for k, v in recommended.items())
    result = {
        "mode": "cuda" if tuner.cuda else "cpu",
        "estimated": not tuner.cuda,
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": str(tuner.device),
        "device_name": name,
        "config_files": list(config_files),
        "config_file_arg": _config_file_arg(config_files),
        "user_overrides": dict(overrides),
        "configured": cfg,
        "tuning_volumes": tuner.tuning_volumes,
        "trials": list(trials),
        "memory": extra["memory"],
        "loader": {k: v for k, v in (loader or {}).items()
                   if k in ("num_workers", "prefetch", "data_wait_fraction", "step_s", "meets", "reason")},
        "recommended": recommended,
        "recommended_cli": cli,
        "validation": validation,
        "expected": expected,
        "expected_basis": basis,
        "notes": notes,
        "wall_s": time.time() - t0,
    }
    return result


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
        files = _split_config_files(args.config_file)
        overrides = parse_overrides(rest)
        if args.dataset_dir is not None:
            overrides["dataset_dir"] = args.dataset_dir
        result = run_autotune(files, overrides, args)
    except Exception as e:  # noqa: BLE001 - a config error is reported by name, everything else re-raised
        root = _root_error(e)
        if isinstance(root, ValueError):
            print(f"autotune: error: {root}", file=sys.stderr)
            return 2
        raise
    print(format_report(result), flush=True)
    if args.out:
        from custom_components.atomic import atomic_write_json

        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"  written: {args.out}")
    return 0


if __name__ == "__main__":
    # run inside the importable module, so the configs' ``custom_components.training.autotune._STORE`` is this one
    from custom_components.training.autotune import main as _main

    raise SystemExit(_main())
