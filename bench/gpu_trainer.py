"""The real training step on a GPU: train.json's trainer, loader, augmentation, loss and handlers, measured
while it runs, against a bare forward + backward of the same network.

One run, on synthetic scroll volumes (written first, prepared into the cache like any dataset):

1. steps ``--sync_from``..``--sync_to`` under ``torch.cuda.set_sync_debug_mode("error")``: any host-device
   synchronisation other than the step's one intended read raises; the first offender is reported with
   its stack (and the run continues without the check);
2. steps after ``--measure_from``: wall seconds per step, samples/s, the share of each phase of the
   trainer's CUDA-event timer (augmentation, forward, loss, backward, optimiser), the data wait,
   NVML GPU utilisation sampled every step, peak memory;
3. the bare network: forward + backward of the same network on a random batch, same precision, timed
   with CUDA events (``step / bare`` is the overhead of everything else).

Prints a table and, last, one JSON line; ``--out FILE`` also writes the JSON. On a CPU it runs the same
code (small patch and network, sync check skipped) so that the offline rehearsal exercises it.

    python bench/gpu_trainer.py --patch 128 --batch 2 --steps 60 [--data DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_JSON = os.path.join(REPO, "bundle", "configs", "train.json")


def emit_json(result: dict, out: str | None = None) -> None:
    """The bench's last line: ``result`` as one JSON line, also written to ``out`` when given."""
    line = json.dumps(result)
    print(line)
    if out:
        with open(out, "w") as fh:
            fh.write(line + "\n")


def make_data(root: str, edge: int, volumes: int = 3) -> str:
    """Synthetic scrolls in the Kaggle layout under ``root`` (reused when already there)."""
    from custom_components.data.synthetic import write_dataset

    if not os.path.isfile(os.path.join(root, "train.csv")):
        write_dataset(root, volumes=volumes, test=0, test_labels=False, profile="34117", shape=(edge,) * 3, seed=0,
                      preview=False)
    return root


def workflow(overrides: dict, configs=(TRAIN_JSON,)):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=list(configs), workflow_type="train", **overrides)
    wf.initialize()
    return wf


class Probe:
    """Per-step wall times, data wait, NVML utilisation and the sync-debug window, as ignite handlers."""

    def __init__(self, cuda: bool, sync_window: tuple[int, int] | None, measure_from: int):
        self.cuda, self.sync_window, self.measure_from = cuda, sync_window, measure_from
        self.step_s, self.wait_s, self.util = [], [], []
        self.nvml = None
        if cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()))
            except Exception as e:  # noqa: BLE001 - utilisation is optional
                self.nvml_error = f"{type(e).__name__}: {e}"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_completed)
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _get_started(self, engine):
        self.t_get = time.perf_counter()

    def _get_completed(self, engine):
        self.wait = time.perf_counter() - self.t_get

    def _started(self, engine):
        it = engine.state.iteration
        if self.cuda and self.sync_window and it == self.sync_window[0]:
            torch.cuda.set_sync_debug_mode("error")
        if it == self.measure_from:
            engine.step_timer.reset()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        self.t_step = time.perf_counter() - self.wait

    def _completed(self, engine):
        it = engine.state.iteration
        if self.cuda and self.sync_window and it == self.sync_window[1]:
            torch.cuda.set_sync_debug_mode(0)
        if it >= self.measure_from:
            self.step_s.append(time.perf_counter() - self.t_step)
            self.wait_s.append(self.wait)
            if self.nvml is not None:
                pynvml, handle = self.nvml
                self.util.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def bare_step_s(network, batch: int, patch: int, amp: bool, device, steps: int = 10) -> float:
    """Seconds of a forward + backward of ``network`` on a random batch (CUDA events; perf_counter on CPU)."""
    x = torch.randn(batch, 1, patch, patch, patch, device=device)
    network.train()

    def step():
        network.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = network(x)
        heads = out if isinstance(out, (list, tuple)) else [out]  # nnU-Net's networks return the DS heads as a list
        sum(h.float().mean() for h in heads).backward()

    for _ in range(3):
        step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def run_trainer(data: str, out_dir: str, patch: int, batch: int, steps: int, sync_window, measure_from: int,
                extra: dict | None = None) -> dict:
    """Train ``steps`` iterations of train.json (one epoch, no validation) with the probe attached."""
    cuda = torch.cuda.is_available()
    o = {"dataset_dir": data, "output_dir": out_dir, "overwrite": True, "patch_size": [patch] * 3, "batch_size": batch,
         "epochs": 1, "iterations_per_epoch": steps, "val_interval": 10**6, "val_fraction": 0.34,
         "device": "cuda:0" if cuda else "cpu", "amp": cuda, **(extra or {})}
    wf = workflow(o)
    trainer = wf.parser.get_parsed_content("train#trainer")
    probe = Probe(cuda, sync_window, measure_from)
    probe.attach(trainer)
    result = {"sync_check": "not run (CPU)" if not cuda else "pass"}
    try:
        trainer.run()
    except RuntimeError as e:
        if cuda and torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode(0)
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)][-6:]
            result["sync_check"] = f"FAIL at iteration {trainer.state.iteration}: {str(e).splitlines()[0]} | " + " <- ".join(frames[::-1])
            return {**result, "rerun": True}
        raise
    n = len(probe.step_s)
    step = sum(probe.step_s) / max(n, 1)
    phases = trainer.step_timer.totals()
    total_phase = sum(phases.values()) or 1.0
    result.update({
        "steps_measured": n, "step_s": step, "samples_per_s": batch / step,
        "data_wait_pct": 100 * sum(probe.wait_s) / max(sum(probe.step_s), 1e-9),
        "phase_pct": {k: 100 * v / max(sum(probe.step_s), 1e-9) for k, v in phases.items()},
        "phase_share_of_timed_pct": {k: 100 * v / total_phase for k, v in phases.items()},
        "gpu_util_pct": sum(probe.util) / len(probe.util) if probe.util else None,
        "gpu_util_samples": len(probe.util),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss_value": trainer.state.loss_value,
    })
    network = wf.parser.get_parsed_content("network")
    result["bare_s"] = bare_step_s(network, batch, patch, cuda, torch.device(o["device"]))
    result["step_over_bare"] = step / result["bare_s"]
    return result


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=128 if cuda else 32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=80 if cuda else 12)
    p.add_argument("--sync_from", type=int, default=5)
    p.add_argument("--sync_to", type=int, default=20)
    p.add_argument("--measure_from", type=int, default=21 if cuda else 4)
    p.add_argument("--data", default=None, help="dataset folder (made when missing)")
    p.add_argument("--edge", type=int, default=None, help="synthetic volume edge (default patch + 64)")
    p.add_argument("--filters", default=None, help="comma list (default train.json's on CUDA, 8,16,32,64 on CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="gpu_trainer_")
    data = make_data(a.data or os.path.join(tmp, "data"), a.edge or a.patch + 64)
    extra = {}
    if a.filters or not cuda:
        extra["filters"] = [int(f) for f in (a.filters or "8,16,32,64").split(",")]
    t0 = time.perf_counter()
    res = run_trainer(data, os.path.join(tmp, "run"), a.patch, a.batch, a.steps, (a.sync_from, a.sync_to), a.measure_from, extra)
    if res.pop("rerun", False):  # the sync check failed: measure again without it
        sync = res["sync_check"]
        res = {**run_trainer(data, os.path.join(tmp, "run2"), a.patch, a.batch, a.steps, None, a.measure_from, extra),
               "sync_check": sync}
    res.update({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                "patch": a.patch, "batch": a.batch, "amp": "bf16" if cuda else "off", "wall_s": time.perf_counter() - t0})
    print(f"train.json trainer, {res['device']}, torch {res['torch']}, patch {a.patch}^3, batch {a.batch}, {res['amp']}, "
          f"{res['steps_measured']} steps measured")
    rows = [("whole step (s)", res["step_s"]), ("bare network fwd+bwd (s)", res["bare_s"]),
            ("step / bare", res["step_over_bare"]), ("samples/s", res["samples_per_s"]),
            ("data wait (% of step)", res["data_wait_pct"])]
    rows += [(f"{k} (% of step)", v) for k, v in res["phase_pct"].items()]
    rows += [("GPU utilisation (NVML, %)", res["gpu_util_pct"]), ("peak memory (GB)", res["peak_mem_gb"])]
    for name, v in rows:
        print(f"{name:<30} {'-' if v is None else f'{v:.4g}':>10}")
    print(f"{'sync check (steps %d-%d)' % (a.sync_from, a.sync_to):<30} {res['sync_check']}")
    emit_json(res, a.out)


if __name__ == "__main__":
    main()
