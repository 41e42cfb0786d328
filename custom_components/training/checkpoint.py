"""Atomic checkpoints and resume.

MONAI's ``CheckpointSaver`` writes in place through ignite's ``DiskSaver``, which deletes the older file
first: a crash or a full disk mid-write can leave nothing readable. ``AtomicCheckpointSaver`` writes a
temporary file in the same folder, fsyncs it, ``os.replace``s it over the target (atomic on POSIX) and
fsyncs the folder; only then is an older file removed. A failing write (disk full) removes its
temporary file, leaves the previous checkpoint intact and stops training with a message naming the
file.

Files in ``<output_dir>/checkpoints``: ``last.pt`` (end of every epoch and every ``save_interval``
iterations) and ``best.pt`` (best key validation metric). Each holds the ``state_dict`` of every object
of ``save_dict`` (network, optimizer, lr_scheduler, trainer: epoch, iteration) plus ``meta``
(epoch, iteration, best metric, skipped steps, and ``network``: the spec the network was built from,
``custom_components.training.network.build_network``).

``write_model_pt`` ends a run: the network weights alone (``{"network": state_dict, "meta": {"network":
spec, ...}}``) of the best checkpoint (else the last) to ``<output_dir>/models/model.pt``, atomically, with
``network.json`` beside it: ``{"network_spec": spec}``, a config fragment that ``ckpt_export`` / ``onnx_export``
take as a second ``--config_file`` (it sets inference.json's ``network_spec``) and that travels inside
``model.ts`` as its extra file ``network.json``.

``load_checkpoint`` reads with ``torch.load(weights_only=True)`` (no code from a foreign file runs)
and reports a network mismatch as the missing / unexpected keys and the differing shapes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from custom_components.atomic import atomic_write_json, fsync_dir
from custom_components.training.network import network_spec_of, spec_differences

__all__ = [
    "atomic_torch_save",
    "load_checkpoint",
    "load_network_weights",
    "AtomicCheckpointSaver",
    "CheckpointResumer",
    "find_last_checkpoint",
    "check_output_dir",
    "CheckpointMismatchError",
    "write_model_pt",
    "checkpoint_network_spec",
    "NetworkInitializer",
    "inference_weights",
]

logger = logging.getLogger("vesuvius.checkpoint")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the network configured."""


def _unwrap_ddp(obj):
    """The module inside a ``DistributedDataParallel`` wrapper (only that: an ``AveragedModel`` keeps its own
    state, ``n_averaged`` included)."""
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file, fsync, ``os.replace``: ``path`` is either old or new, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("VESUVIUS_SLOW_CHECKPOINT_S"):  # test hook: widen the window a SIGKILL can hit
            import time

            time.sleep(float(os.environ["VESUVIUS_SLOW_CHECKPOINT_S"]))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save wraps a failed write in a RuntimeError
            raise OSError(getattr(e, "errno", None), f"could not write checkpoint {path} ({e}); the previous file is intact") from e
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``); clear errors for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read safely: {type(e).__name__}: {e}") from e


def _network_state(ckpt: dict) -> dict:
    """The network weights inside a checkpoint (ours, MONAI's ``{"network": ...}`` or a bare state dict)."""
    for key in ("network", "model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def load_network_weights(network: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable report of the mismatch."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs network {list(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def cut(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {cut(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {cut(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {cut(shapes)}")
        raise CheckpointMismatchError(
            f"{source} does not fit the configured network (another patch_size / filters / deep supervision?): "
            + "; ".join(parts)
        )
    network.load_state_dict(state, strict=True)


def find_last_checkpoint(output_dir: str | Path) -> str | None:
    """``<output_dir>/checkpoints/last.pt`` if it exists."""
    path = Path(output_dir) / "checkpoints" / "last.pt"
    return str(path) if path.is_file() else None


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> str:
    """Refuse to start a new run in a folder holding another run's checkpoints.

    Returns the resume checkpoint path ("" for a fresh start). ``resume`` continues from ``last.pt``;
    ``overwrite`` starts afresh (older files are replaced only when new ones are written).
    """
    output_dir = Path(output_dir)
    last = find_last_checkpoint(output_dir)
    existing = sorted(p.name for p in (output_dir / "checkpoints").glob("*.pt")) if (output_dir / "checkpoints").is_dir() else []
    if resume:
        if last is None:
            logger.warning("resume requested but %s holds no last.pt: starting afresh.", output_dir / "checkpoints")
            return ""
        return last
    if existing and not overwrite:
        raise ValueError(
            f"output_dir {output_dir} already holds checkpoints ({', '.join(existing)}) of another run: "
            "set resume=true to continue it, overwrite=true to start afresh there, or choose another output_dir."
        )
    return ""


class AtomicCheckpointSaver:
    """Save ``last.pt`` every epoch (and every ``save_interval`` iterations) and ``best.pt`` by a metric.

    Args:
        save_dir: folder of the checkpoints (created).
        save_dict: ``{"network": net, "optimizer": opt, "lr_scheduler": sched}``; the trainer it is attached to
            is saved as ``trainer`` too (epoch, iteration).
        key_metric_engine: evaluator whose ``state.metrics[key_metric_name]`` picks ``best.pt``.
        save_interval: also save ``last.pt`` every N iterations (0: only at epoch ends).
        rank: only rank 0 writes.
    """

    def __init__(self, save_dir: str, save_dict: dict, key_metric_engine: Engine | None = None,
                 key_metric_name: str | None = None, save_interval: int = 0, rank: int = 0):
        self.save_dir = Path(save_dir)
        self.save_dict = save_dict
        self.key_metric_engine = key_metric_engine
        self.key_metric_name = key_metric_name
        self.save_interval = int(save_interval)
        self.rank = int(rank)
        self.best_metric = -float("inf")
        self.best_epoch = -1
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        if self.rank != 0:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save_last)
        if self.key_metric_engine is not None:
            self.key_metric_engine.add_event_handler(Events.COMPLETED, self.save_best)

    def state(self) -> dict:
        obj = {}
        for name, o in {**self.save_dict, "trainer": self.trainer}.items():
            if o is None:
                continue
            o = _unwrap_ddp(o)
            obj[name] = o.state_dict()
        st = self.trainer.state
        obj["meta"] = {
            "network": network_spec_of(self.save_dict.get("network")),
            "epoch": int(st.epoch),
            "iteration": int(st.iteration),
            "best_metric": float(self.best_metric),
            "best_epoch": int(self.best_epoch),
            "skipped_steps": int(getattr(st, "skipped_steps", 0)),
        }
        return obj

    def _write(self, name: str) -> None:
        path = self.save_dir / name
        try:
            atomic_torch_save(self.state(), path)
        except OSError as e:
            self.trainer.logger.error("%s", e)
            raise
        self.trainer.logger.info(f"saved checkpoint {path} (epoch {self.trainer.state.epoch}, iteration {self.trainer.state.iteration})")

    def save_last(self, engine: Engine | None = None) -> None:
        self._write("last.pt")

    def save_best(self, evaluator: Engine) -> None:
        value = evaluator.state.metrics.get(self.key_metric_name) if self.key_metric_name else None
        if value is None:
            return
        value = float(value)
        if value > self.best_metric:
            self.best_metric, self.best_epoch = value, int(self.trainer.state.epoch)
            self._write("best.pt")


class CheckpointResumer:
    """At ``STARTED``, restore every object of ``load_dict`` and the trainer from ``load_path`` (no-op when empty).

    The trainer's epoch and iteration are restored and its ``max_epochs`` kept as configured now, so a
    run can be extended. A network of another configuration fails with ``CheckpointMismatchError``.
    """

    def __init__(self, load_path: str | None, load_dict: dict, saver: AtomicCheckpointSaver | None = None,
                 map_location="cpu"):
        self.load_path = load_path or ""
        self.load_dict = load_dict
        self.saver = saver
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.load_path:
            return
        ckpt = load_checkpoint(self.load_path, self.map_location)
        own, saved = network_spec_of(self.load_dict.get("network")), checkpoint_network_spec(ckpt)
        if own and saved and spec_differences(saved, own):
            raise CheckpointMismatchError(
                f"checkpoint {self.load_path} was trained with another network than this run configures "
                f"(checkpoint vs now): {'; '.join(spec_differences(saved, own))}.")
        for name, obj in {**self.load_dict, "trainer": engine}.items():
            if obj is None:
                continue
            if name not in ckpt:
                raise CheckpointMismatchError(f"checkpoint {self.load_path} has no '{name}' (it holds {sorted(ckpt)}).")
            target = _unwrap_ddp(obj)
            if name == "network":
                load_network_weights(target, ckpt[name], source=f"checkpoint {self.load_path}")
            elif isinstance(target, Engine):
                max_epochs = target.state.max_epochs
                target.load_state_dict(ckpt[name])
                target.state.max_epochs = max_epochs
            else:
                target.load_state_dict(ckpt[name])
        meta = ckpt.get("meta", {})
        engine.state.skipped_steps = int(meta.get("skipped_steps", 0))
        if self.saver is not None:
            self.saver.best_metric = float(meta.get("best_metric", -float("inf")))
            self.saver.best_epoch = int(meta.get("best_epoch", -1))
        engine.logger.info(f"resumed from {self.load_path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")


def checkpoint_network_spec(ckpt: dict) -> dict | None:
    """The network spec a checkpoint or ``model.pt`` carries (None for one written before specs existed)."""
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    spec = meta.get("network") if isinstance(meta, dict) else None
    return dict(spec) if spec else None


def inference_weights(ckpt: dict) -> tuple[dict, str]:
    """``(state_dict, "ema" | "network")``: a checkpoint's EMA weights when it holds them, else its network's."""
    if isinstance(ckpt.get("ema"), dict):  # weight averaging on: the averaged weights are the inference weights
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}, "ema"
    return _network_state(ckpt), "network"


def write_model_pt(ckpt_dir: str | Path, model_path: str | Path, prefer: tuple[str, ...] = ("best.pt", "last.pt"),
                   rank: int = 0) -> str | None:
    """The inference weights of a run: the first of ``prefer`` found in ``ckpt_dir``, network weights (the
    EMA weights when the checkpoint holds them) and spec only, atomically to ``model_path`` (and ``{"network_spec": spec}`` to ``network.json`` beside it).
    Rank 0 only."""
    if rank != 0:
        return None
    ckpt_dir, model_path = Path(ckpt_dir), Path(model_path)
    source = next((ckpt_dir / name for name in prefer if (ckpt_dir / name).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no checkpoint among {list(prefer)} in {ckpt_dir} to write {model_path} from.")
    ckpt = load_checkpoint(source)
    spec = checkpoint_network_spec(ckpt)
    meta = {k: v for k, v in ckpt.get("meta", {}).items() if k in ("network", "epoch", "iteration", "best_metric")}
    weights, kind = inference_weights(ckpt)
    atomic_torch_save({"network": weights, "meta": {**meta, "source": source.name, "weights": kind}}, model_path)
    atomic_write_json(str(model_path.with_name("network.json")), {"network_spec": spec})
    logger.info("wrote %s (network weights of %s, epoch %s)", model_path, source, meta.get("epoch"))
    return str(model_path)


class NetworkInitializer:
    """``--init_from CKPT``: the network starts from another run's weights (a checkpoint or ``model.pt``),
    weights only (its EMA weights when it keeps them): optimiser, schedule and epoch start afresh
    (fine-tuning, e.g. a 128^3 model continued at 192^3). Checked when built, before training starts: a
    missing file or a network that does not fit (missing / unexpected keys, shapes) is named. Ignored when the run resumes (its own ``last.pt`` wins)."""

    def __init__(self, path: str | None, network: torch.nn.Module, resume_path: str | None = ""):
        self.path, self.network, self.resume_path = path or "", _unwrap_ddp(network), resume_path or ""
        if self.path and not self.resume_path:
            if not os.path.isfile(self.path):
                raise ValueError(f"init_from '{self.path}' does not exist.")
            weights, kind = inference_weights(load_checkpoint(self.path))
            load_network_weights(self.network, weights, source=f"init_from {self.path} ({kind} weights)")
            logger.info("network initialised from %s (%s weights only)", self.path, kind)

    def attach(self, engine: Engine) -> None:
        """Nothing to do at run time: the weights were loaded when the handler was built."""
