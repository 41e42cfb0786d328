"""Training handlers MONAI lacks: per-epoch seeding, loss-term logging, throughput, run progress, log file.

- ``EpochSeedHandler``: at every epoch start, ``sampler.set_epoch(epoch)`` and
  ``augment.set_random_state(seed + epoch)``: an epoch's patches and augmentations depend only on
  (seed, epoch), so resuming from an end-of-epoch checkpoint is exact.
- ``LossTermsHandler``: sums the composite loss's terms on the device every iteration and, at the
  epoch's end, reads them once into ``engine.state.metrics`` as ``loss/<term>`` (epoch means), with
  ``lr``; MONAI's ``StatsHandler`` / ``TensorBoardStatsHandler`` then log them like any metric.
- ``ThroughputHandler``: per epoch samples/s, the fraction of the step spent waiting for data and in
  each phase of the trainer's ``step_timer`` (read once per epoch), peak GPU memory and GPU utilisation
  (NVML, where ``nvidia-ml-py`` is installed); warns when data wait exceeds ``warn_data_wait`` and names
  the likely cause and the override that helps.
- ``RunProgressHandler``: a tqdm bar for the epoch (showing the loss the trainer already read, every
  ``loss_every`` iterations), and the ETA of the whole run in the log.

None of them reads the device during an iteration: a training step reads it once (the trainer).
- ``FinalValidationHandler``: MONAI's ``ValidationHandler`` that also validates after the last epoch when
  ``epochs`` is not a multiple of ``interval``: the last epochs' weights are scored and can become
  ``best.pt`` (and so ``model.pt``) instead of being thrown away.
- ``FileLogHandler``: creates ``output_dir`` first (the earlier trainer crashed on exactly that) and
  adds ``<output_dir>/train.log`` to the loggers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

__all__ = ["EpochSeedHandler", "LossTermsHandler", "ThroughputHandler", "RunProgressHandler", "FinalValidationHandler",
           "FileLogHandler"]


class EpochSeedHandler:
    """Seed the sampler and the device augmentation per epoch (see module docstring)."""

    def __init__(self, sampler=None, augment=None, seed: int = 0):
        self.sampler, self.augment, self.seed = sampler, augment, int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        for s in (self.sampler, getattr(engine.state.dataloader, "sampler", None)):
            if s is not None and hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        if self.augment is not None:
            self.augment.set_random_state(self.seed * 100003 + epoch)


class LossTermsHandler:
    """Epoch means of the loss terms into ``state.metrics['loss/<term>']``, and ``lr``.

    Each iteration adds ``loss_function.last_term_tensors`` (detached device scalars) to device sums; the
    sums are read once, at the epoch's end. A loss with only ``last_terms`` (floats) works too.
    """

    def __init__(self, loss_function, optimizer=None):
        self.loss_function, self.optimizer = loss_function, optimizer
        self._sums: dict = {}
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._n = {}, 0

    def _update(self, engine: Engine) -> None:
        terms = getattr(self.loss_function, "last_term_tensors", None)
        if terms is None:
            terms = getattr(self.loss_function, "last_terms", {}) or {}
        self._n += 1
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v

    def _write(self, engine: Engine) -> None:
        if self._sums:
            from custom_components.sync import host_read

            names = list(self._sums)
            values = host_read(*(torch.as_tensor(self._sums[k]) for k in names))
            for k, v in zip(names, values):
                engine.state.metrics[f"loss/{k}"] = v / max(self._n, 1)
        if self.optimizer is not None:
            engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])


def _nvml_handle(device):
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None, None


class ThroughputHandler:
    """Samples/s, data-wait and augmentation fractions, peak GPU memory and utilisation per epoch.

    Values go to ``engine.state.metrics`` (``throughput/samples_per_s``, ``throughput/data_wait``,
    ``throughput/augment``, ``throughput/peak_gpu_mem_gb``, ``throughput/gpu_util``) and the log.
    """

    def __init__(self, batch_size: int, warn_data_wait: float = 0.20, num_workers: int | None = None):
        self.batch_size = int(batch_size)
        self.warn_data_wait = float(warn_data_wait)
        self.num_workers = num_workers
        self._nvml = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self.t_epoch = time.perf_counter()
        self.wait = 0.0
        self.iters = 0
        self.util = []
        self.cuda = torch.device(engine.state.device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(engine.state.device)
            if self._nvml is None:
                self._nvml = _nvml_handle(engine.state.device)

    def _batch_started(self, engine: Engine) -> None:
        self.t_batch = time.perf_counter()

    def _batch_completed(self, engine: Engine) -> None:
        self.wait += time.perf_counter() - self.t_batch

    def _iteration_completed(self, engine: Engine) -> None:
        self.iters += 1
        pynvml, handle = self._nvml or (None, None)
        if handle is not None and self.iters % 10 == 0:
            self.util.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _epoch_completed(self, engine: Engine) -> None:
        timer = getattr(engine, "step_timer", None)
        phases = timer.totals() if timer is not None else {}
        elapsed = max(time.perf_counter() - self.t_epoch, 1e-9)
        m = engine.state.metrics
        m["throughput/samples_per_s"] = self.iters * self.batch_size / elapsed
        m["throughput/data_wait"] = self.wait / elapsed
        for phase, seconds in phases.items():
            m[f"throughput/{phase}"] = seconds / elapsed
        engine.state.step_times = {k: v / max(len(timer), 1) for k, v in phases.items()} if phases else {}
        msg = (f"epoch {engine.state.epoch}: {m['throughput/samples_per_s']:.2f} samples/s, "
               f"data wait {100 * m['throughput/data_wait']:.1f} %, augmentation {100 * m.get('throughput/augment', 0.0):.1f} %")
        if self.cuda:
            m["throughput/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(engine.state.device) / 2**30
            msg += f", peak GPU memory {m['throughput/peak_gpu_mem_gb']:.1f} GB"
        if self.util:
            m["throughput/gpu_util"] = sum(self.util) / len(self.util)
            msg += f", GPU utilisation {m['throughput/gpu_util']:.0f} %"
        engine.logger.info(msg)
        if m["throughput/data_wait"] > self.warn_data_wait:
            workers = self.num_workers if self.num_workers is not None else "?"
            engine.logger.warning(
                f"data wait is {100 * m['throughput/data_wait']:.0f} % of epoch {engine.state.epoch} "
                f"(> {100 * self.warn_data_wait:.0f} %): the host loader cannot keep up (num_workers={workers}; "
                "reading patches from a slow disk or a cold page cache). Try a larger `num_workers` override "
                "(e.g. --num_workers 8), `prefetch` 4, or keep the cache on a local SSD."
            )


class RunProgressHandler:
    """tqdm bar over the epoch's iterations and, at each epoch end, the ETA of the whole run."""

    def __init__(self, enabled: bool = True, rank: int = 0, loss_every: int = 10):
        self.enabled = enabled and rank == 0
        self.loss_every = max(1, int(loss_every))
        self.bar = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    def _started(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()
        self.start_iteration = int(engine.state.iteration)
        self.bar = None

    def _epoch_started(self, engine: Engine) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=engine.state.epoch_length, desc=f"epoch {engine.state.epoch}/{engine.state.max_epochs}",
                        leave=False, dynamic_ncols=True)

    def _iteration(self, engine: Engine) -> None:
        if self.bar is not None:
            loss = getattr(engine.state, "loss_value", None)  # a float the trainer read; never the tensor
            if isinstance(loss, float) and engine.state.iteration % self.loss_every == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)

    def _epoch_completed(self, engine: Engine) -> None:
        self._close(engine)
        done = engine.state.iteration - self.start_iteration
        total = engine.state.epoch_length * engine.state.max_epochs - engine.state.iteration
        rate = (time.perf_counter() - self.t0) / max(done, 1)
        engine.logger.info(
            f"epoch {engine.state.epoch}/{engine.state.max_epochs} done; run ETA {total * rate / 60:.1f} min "
            f"({rate:.3f} s per iteration, validation included)"
        )

    def _close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _close_on_error(self, engine: Engine, e: Exception) -> None:
        self._close(engine)
        raise e


class FinalValidationHandler(ValidationHandler):
    """``ValidationHandler`` (epoch level) run every ``interval`` epochs and after the last epoch: with
    ``epochs`` 7 and ``interval`` 3 it validates after epochs 3, 6 and 7."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._last_off_interval), self)

    def _last_off_interval(self, engine: Engine, epoch: int) -> bool:
        return epoch == engine.state.max_epochs and epoch % self.interval != 0


class FileLogHandler:
    """Create ``output_dir`` and log to ``<output_dir>/<filename>`` (rank 0 only)."""

    def __init__(self, output_dir: str, filename: str = "train.log", rank: int = 0,
                 loggers=("ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator",
                          "ignite.engine.engine.TopologyTrainer", "vesuvius")):
        self.path = Path(output_dir) / filename
        self.rank = rank
        self.loggers = loggers

    def attach(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in {*self.loggers, engine.logger.name}:
            lg = logging.getLogger(name)
            lg.addHandler(handler)
            if lg.level == logging.NOTSET or lg.level > logging.INFO:
                lg.setLevel(logging.INFO)
