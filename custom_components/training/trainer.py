"""``SupervisedTrainer`` with what the stock one has no hook for.

- bf16 autocast on CUDA (``amp=True``); bf16 needs no gradient scaler, so none is created. On the CPU
  ``amp`` is ignored (float32).
- Gradient clipping by global norm (``clip_grad_norm``, ``None`` disables it).
- A step whose loss or gradients are not finite is skipped (no optimiser step) and counted in
  ``state.skipped_steps``; after ``max_nonfinite_in_row`` such steps in a row training stops with
  ``NonFiniteLossError`` naming the iteration, the volume ids of the batch and the loss terms that
  were not finite. The last good checkpoint stays as it was.
- The time spent in ``prepare_batch`` (device augmentation) and in forward / loss / backward /
  optimiser is kept in ``state.step_times`` for the throughput handler.
"""

from __future__ import annotations

import math
import time

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["TopologyTrainer", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


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
        self.state.step_times = {}

    def _sync(self):
        if torch.device(self.state.device).type == "cuda":
            torch.cuda.synchronize(self.state.device)

    def _iteration(self, engine, batchdata):
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        times = {}
        t0 = time.perf_counter()
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        t1 = time.perf_counter()
        times["augment"] = t1 - t0
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16):
            pred = engine.inferer(inputs, engine.network)
            self._sync()
            t2 = time.perf_counter()
            times["forward"] = t2 - t1
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(pred, targets).mean()
        self._sync()
        t3 = time.perf_counter()
        times["loss"] = t3 - t2
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            params = [p for p in engine.network.parameters() if p.grad is not None]
            if self.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            finite = bool(torch.isfinite(norm))
        self._sync()
        t4 = time.perf_counter()
        times["backward"] = t4 - t3
        if finite:
            engine.optimizer.step()
            engine.state.nonfinite_in_row = 0
        else:
            engine.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite(engine, batchdata, loss)
        self._sync()
        times["optimizer"] = time.perf_counter() - t4
        engine.state.step_times = times
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _on_nonfinite(self, engine, batchdata, loss):
        engine.state.skipped_steps += 1
        engine.state.nonfinite_in_row += 1
        terms = getattr(engine.loss_function, "last_terms", {}) or {}
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))] or (["total"] if not torch.isfinite(loss) else ["gradients"])
        ids = batchdata.get("id") if isinstance(batchdata, dict) else None
        msg = (
            f"non-finite step at iteration {engine.state.iteration} (epoch {engine.state.epoch}): "
            f"volumes {list(ids) if ids is not None else '?'}, non-finite: {', '.join(bad)}; "
            f"skipped ({engine.state.nonfinite_in_row} in a row, {engine.state.skipped_steps} in total)"
        )
        engine.logger.warning(msg)
        if engine.state.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteLossError(msg + f"; stopping after {self.max_nonfinite_in_row} in a row.")
