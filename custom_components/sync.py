"""The project's intended host-device synchronisations, named so that everything else can be checked free
of them.

A CUDA program runs ahead of the GPU until the host needs a value from it (``.item()``, ``float(t)``,
``bool(t)``, ``.cpu()``, a blocking copy): then the host waits for every queued kernel. A training step
here reads the device once (``host_read`` in the trainer) and a topology step also copies its pooled maps
to the host (``sync_allowed`` in the loss); ``torch.cuda.set_sync_debug_mode("error")`` then fails on any
other synchronisation (``bench/gpu_check.sh`` runs steps that way).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["sync_allowed", "host_read"]


@contextlib.contextmanager
def sync_allowed():
    """Suspend ``torch.cuda.set_sync_debug_mode`` around one intended read (no-op without CUDA)."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def host_read(*values: torch.Tensor) -> list[float]:
    """The values of scalar tensors as floats, read from the device in one transfer."""
    with sync_allowed():
        return torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values]).tolist()
