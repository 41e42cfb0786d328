"""``SupervisedTrainer`` with what the stock one has no hook for, and one host read per step.

- bf16 autocast on CUDA (``amp=True``); bf16 needs no gradient scaler, so none is created. On the CPU
  ``amp`` is ignored (float32).
- Gradient clipping by global norm (``clip_grad_norm``, ``None`` disables it).
- A step whose loss or gradients are not finite is skipped (no optimiser step) and counted in
  ``state.skipped_steps``; after ``max_nonfinite_in_row`` such steps in a row training stops with
  ``NonFiniteLossError`` naming the iteration, the volume ids of the batch and the loss terms that
  were not finite. The last good checkpoint stays as it was.
- The step reads the device once: the finiteness of loss and gradient norm and the loss value travel
  together in one ``tolist()`` (``state.loss_value`` keeps the value for the progress bar). Nothing
  else in the step synchronises: the phase timings (``step_timer``: augmentation, forward, loss,
  backward, optimiser) are CUDA events on a GPU, summed and read once per epoch by the throughput
  handler (``perf_counter`` on the CPU).
"""

from __future__ import annotations

import math
import time

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from custom_components.sync import host_read, sync_allowed

__all__ = ["TopologyTrainer", "NonFiniteLossError", "StepTimer"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


class StepTimer:
    """Seconds per phase of the training step, summed over an epoch and read once (``totals``).

    On CUDA each ``mark`` records an event on the current stream (no synchronisation); ``totals`` waits for
    the last one and adds up the intervals. On the CPU ``perf_counter``.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._steps: list[list] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._steps.append([("start", self._now())])

    def mark(self, phase: str) -> None:
        self._steps[-1].append((phase, self._now()))

    def totals(self) -> dict[str, float]:
        """``{phase: seconds summed over the steps since reset}`` (one wait for the device on CUDA)."""
        out: dict[str, float] = {}
        if self.cuda and self._steps:
            with sync_allowed():
                self._steps[-1][-1][1].synchronize()
        for marks in self._steps:
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
                out[phase] = out.get(phase, 0.0) + dt
        return out

    def __len__(self) -> int:
        return len(self._steps)


class TopologyTrainer(SupervisedTrainer):
    """See module docstring. Extra args: ``clip_grad_norm``, ``max_nonfinite_in_row``; ``amp`` = bf16 on CUDA."""

    def __init__(self, *args, clip_grad_norm: float | None = 12.0, max_nonfinite_in_row: int = 5, amp: bool = False, **kwargs):
        super().__init__(*args, amp=False, **kwargs)
        self.use_bf16 = bool(amp) and torch.device(self.state.device).type == "cuda"
        self.clip_grad_norm = clip_grad_norm
        self.max_nonfinite_in_row = int(max_nonfinite_in_row)
        if self.max_nonfinite_in_row < 1:
            raise ValueError(f"max_nonfinite_in_row must be >= 1, got {max_nonfinite_in_row}.")
        self.state.skipped_steps = 0
        self.state.nonfinite_in_row = 0
        self.state.loss_value = float("nan")
        self.step_timer = StepTimer(self.state.device)
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: self.step_timer.reset())

    def _grad_norm(self, engine) -> torch.Tensor:
        params = [p for p in engine.network.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.state.device)
        if self.clip_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def _iteration(self, engine, batchdata):
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        timer = self.step_timer
        timer.start()
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        timer.mark("augment")
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16):
            pred = engine.inferer(inputs, engine.network)
            timer.mark("forward")
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(pred, targets).mean()
        timer.mark("loss")
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        # backward also on a non-finite loss: its gradients are discarded below, and deciding first would
        # cost a second read of the device
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        norm = self._grad_norm(engine)
        timer.mark("backward")
        finite, engine.state.loss_value = host_read(torch.isfinite(loss) & torch.isfinite(norm), loss)
        if finite:
            engine.optimizer.step()
            engine.state.nonfinite_in_row = 0
        else:
            engine.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite(engine, batchdata, math.isfinite(engine.state.loss_value))
        timer.mark("optimizer")
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _on_nonfinite(self, engine, batchdata, loss_finite: bool):
        engine.state.skipped_steps += 1
        engine.state.nonfinite_in_row += 1
        terms = getattr(engine.loss_function, "last_terms", {}) or {}
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))] or (["gradients"] if loss_finite else ["total"])
        ids = batchdata.get("id") if isinstance(batchdata, dict) else None
        msg = (
            f"non-finite step at iteration {engine.state.iteration} (epoch {engine.state.epoch}): "
            f"volumes {list(ids) if ids is not None else '?'}, non-finite: {', '.join(bad)}; "
            f"skipped ({engine.state.nonfinite_in_row} in a row, {engine.state.skipped_steps} in total)"
        )
        engine.logger.warning(msg)
        if engine.state.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteLossError(msg + f"; stopping after {self.max_nonfinite_in_row} in a row.")
