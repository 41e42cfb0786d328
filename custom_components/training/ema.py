"""Exponential moving average of the network's weights (Polyak averaging), kept by PyTorch's own
``torch.optim.swa_utils.AveragedModel``.

After every optimiser step the averaged weights move towards the trained ones:

    theta_ema <- decay * theta_ema + (1 - decay) * theta          (the first update copies theta)

(the update of ``get_ema_multi_avg_fn(decay)``: one ``torch._foreach_lerp_``; Polyak & Juditsky 1992, as
the 10th place of the competition used with decay 0.999). ``DeviceEMA`` is an ``AveragedModel`` whose
update never waits for the device: the stock one tests ``n_averaged == 0`` and copies ``n_averaged`` to
the device at every call, a host-device synchronisation per step; here ``n_averaged`` stays a CPU
counter. ``build_ema`` wraps the network (through a DDP wrapper) or returns None when ``decay`` is 0;
``EMAUpdateHandler`` updates it at every iteration whose step was taken (a skipped non-finite step is not
averaged in). The averaged model's ``state_dict`` (its weights and ``n_averaged``) travels in every
checkpoint, so a resumed run continues the same average; when it is on, validation and ``models/model.pt``
use the averaged weights (``custom_components.training.checkpoint.write_model_pt``).
"""

from __future__ import annotations

import itertools

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["DeviceEMA", "build_ema", "EMAUpdateHandler", "validation_network"]


class DeviceEMA(AveragedModel):
    """``AveragedModel`` with the EMA of ``decay``; ``update_parameters`` copies on the first call, then
    ``theta_ema <- decay theta_ema + (1 - decay) theta`` for floating tensors (others copied), and counts
    in ``n_averaged`` (kept on the CPU)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = float(decay)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers())))
        first = int(self.n_averaged) == 0  # a CPU counter: no device read
        floats = [(a, b.detach()) for a, b in pairs if a.is_floating_point() and not first]
        copies = [(a, b.detach()) for a, b in pairs if first or not a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)
        for a, b in copies:
            a.copy_(b)
        self.n_averaged += 1


def build_ema(network: torch.nn.Module, decay: float) -> DeviceEMA | None:
    """A ``DeviceEMA`` of ``network``'s weights (and buffers), or None for ``decay`` 0."""
    decay = float(decay)
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {decay}.")
    return DeviceEMA(getattr(network, "module", network), decay)  # DDP: average the module itself


def validation_network(network: torch.nn.Module, ema: AveragedModel | None) -> torch.nn.Module:
    """The averaged network when EMA is on, else ``network``."""
    return ema.module if ema is not None else network


class EMAUpdateHandler:
    """``ema.update_parameters(network)`` after every iteration whose optimiser step was taken."""

    def __init__(self, ema: AveragedModel | None, network: torch.nn.Module):
        self.ema, self.network = ema, getattr(network, "module", network)

    def attach(self, engine: Engine) -> None:
        if self.ema is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine.state, "nonfinite_in_row", 0) == 0:  # the trainer skipped a non-finite step
            self.ema.update_parameters(self.network)
