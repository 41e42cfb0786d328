"""nnU-Net v2 baseline (issue 8): nnU-Net trained on our data for a wall-clock budget on this machine, then predicted.

What it does, as an nnU-Net user would, with nnU-Net's own default 3d_fullres plan (nothing of the plan
is changed):

1. ``ensure_venv``: a separate venv (default ``<repo>/.venv-nnunet``, git-ignored; never the project's
   ``.venv``) with ``torch==2.14.1 torchvision==0.29.1 nnunetv2==2.8.1`` (torch / torchvision from this
   machine's local wheel index; about 6.4 GB, mostly CUDA libraries; ~3.5 min). A stamp file makes it
   idempotent.
2. The Kaggle-layout ``data_root`` is converted with the project's converter
   (``python -m custom_components.data.convert_nnunet``; label 2 = nnU-Net's ignore label, channel "CT");
   the test TIFFs become ``<id>_0000.nii.gz`` the same way (``custom_components.data.io``).
3. ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np 1 -npfp THREADS --verify_dataset_integrity``
   (``-npfp``: fingerprint processes, nnU-Net's default 8).
4. ``nnUNetv2_train ID 3d_fullres all -tr nnUNetTrainer_WallClock -device cpu`` (``--device cuda`` on a GPU). nnU-Net has no time
   limit, so a trainer class file is generated into the venv's ``nnunetv2/training/nnUNetTrainer/``
   package (nnU-Net's documented way to add a trainer): ``nnUNetTrainer`` with short epochs
   (``iters_per_epoch`` = 25 train + ``val_iters`` = 5 validation iterations: nnU-Net's 250 / 50 ratio),
   ``num_epochs`` huge, ``save_every = 1``. The deadline is the launch of ``nnUNetv2_train`` + ``budget_s``
   (passed in the environment), so imports, data loader start-up, validation, logging and checkpoints
   all count. From the times measured in the run (last 10 training iterations, last validation
   iteration, the rest of the last epoch's end + 3 s for the final checkpoint) the trainer never starts
   what would end past the deadline: a training iteration is skipped if it and a 1-iteration validation
   and the epoch's end would not fit (the epoch is then cut short, >= 1 iteration, and is the last);
   the full validation is replaced by 1 iteration if it would not fit; an epoch is not started if one
   iteration would not. ``on_epoch_end`` then sets ``num_epochs`` to the current epoch, the loop ends and
   nnU-Net's ``on_train_end`` writes ``checkpoint_final.pth``. (nnU-Net's ``run_training`` iterates over
   a ``range`` fixed at its start, so the subclass's ``run_training`` is the same loop written as ``while
   current_epoch < num_epochs``, with the cut and timings added.) The process is killed at ``budget_s +
   grace_s`` as a last resort (then ``checkpoint_latest.pth`` is predicted with). Learning rate:
   nnU-Net's poly schedule ``lr = 0.01 (1 - f)^0.9`` with ``f`` = elapsed / (deadline - loop start),
   updated every iteration, instead of ``epoch / num_epochs`` (``lr_schedule="time"``: what a user who
   sets the epoch count to fill the budget gets, decaying to ~0 at the deadline; ``"epochs"`` keeps
   nnU-Net's formula over the huge ``num_epochs``, i.e. an almost constant 0.01). nnU-Net's
   post-training validation (``perform_actual_validation``: a sliding-window prediction of the
   validation cases, outside the budget, not used here) is skipped.
   Fold ``all``: nnU-Net trains on every case given (as our trainer does with the same data), works for
   any number of cases (fold 0 of the 5-fold split needs >= 5), and the per-epoch pseudo-Dice is then
   measured on training cases (it only feeds ``checkpoint_best``, which is not used:
   ``checkpoint_final.pth`` is).
   Threads: ``OMP/MKL_NUM_THREADS = threads`` and ``torch.set_num_threads(threads)`` in the trainer
   (nnU-Net's CLI sets ``multiprocessing.cpu_count()``); augmentation processes ``nnUNet_n_proc_DA``
   (default ``threads``, which is nnU-Net's own default ``min(12, cpu_count)`` on a 2-core machine).
5. ``nnUNetv2_predict -i imagesTs -o OUT -d ID -c 3d_fullres -f all -tr nnUNetTrainer_WallClock -chk
   checkpoint_final.pth -device cpu -npp 1 -nps 1`` (test-time mirroring on, nnU-Net's default, unless
   ``disable_tta``).
6. The predicted NIfTIs become ``pred_dir/<id>.tif`` (uint8 0/1) in the (Z, Y, X) order of our labels:
   our converter stores the TIFF array unchanged in the NIfTI (nibabel), nnU-Net's SimpleITK reader sees
   its transpose (X, Y, Z) and writes the prediction with the input's geometry, so nibabel reads the
   prediction back as (Z, Y, X). ``check_axis_roundtrip`` verifies that chain with nnU-Net's own
   reader / writer on a 24x32x40 volume (run by ``train_and_predict`` before anything else), and every
   prediction's shape is checked against its test TIFF.

Run with the project's interpreter (it converts volumes with ``custom_components.data.io``)::

    .venv/bin/python bench/nnunet_baseline.py --data_root DIR --test_images DIR --work_dir DIR --budget_s 300
        [--threads 2] [--label_dir DIR] [--iters_per_epoch 25] [--val_iters 5] [--disable_tta]

prints a table and writes ``work_dir/summary.json`` (the dict ``train_and_predict`` returns; with
``--label_dir`` also the competition score of the predictions, ``custom_components.metrics.evaluate``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from custom_components.atomic import atomic_write_json, atomic_write_text  # noqa: E402  (stdlib only)

__all__ = [
    "PINS",
    "DEFAULT_VENV",
    "TRAINER_NAME",
    "ensure_venv",
    "install_trainer",
    "check_axis_roundtrip",
    "train_and_predict",
    "score",
    "main",
]

TORCH_PIN = "torch==2.14.1"
TORCHVISION_PIN = "torchvision==0.29.1"
NNUNET_PIN = "nnunetv2==2.8.1"
PINS = (TORCH_PIN, TORCHVISION_PIN, NNUNET_PIN)
DEFAULT_VENV = os.path.join(REPO, ".venv-nnunet")
PROJECT_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
STAMP = ".nnunet_baseline_installed.json"
TRAINER_NAME = "nnUNetTrainer_WallClock"
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"

# ------------------------------------------------------------------------------------------- venv


def _venv_python(path: str) -> str:
    return os.path.join(path, "bin", "python")


def ensure_venv(path=DEFAULT_VENV, python: str = "python3.11", log=print) -> str:
    """Create (once) the separate nnU-Net venv at ``path``; returns its python executable.

    ``python -m venv path``, then ``pip install torch==2.14.1 torchvision==0.29.1 nnunetv2==2.8.1`` (torch
    and torchvision come from this machine's local wheel index; several GB). Idempotent: a stamp file in
    the venv records the pins, the install time and ``pip freeze``; a venv whose stamp names the same pins
    is reused as is. ``ValueError`` for the project's own ``.venv``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.realpath(path) == os.path.realpath(os.path.join(REPO, ".venv")):
        raise ValueError(f"ensure_venv refuses the project's environment {path}; use a separate folder (default {DEFAULT_VENV}).")
    exe = _venv_python(path)
    stamp = os.path.join(path, STAMP)
    if os.path.isfile(stamp) and os.path.isfile(exe):
        with open(stamp) as fh:
            if json.load(fh).get("pins") == list(PINS):
                return exe
    t0 = time.time()
    log(f"creating the nnU-Net venv {path} ({' '.join(PINS)}; several GB from local wheels) ...")
    subprocess.run([python, "-m", "venv", path], check=True)
    subprocess.run([exe, "-m", "pip", "install", *PINS], check=True)
    freeze = subprocess.run([exe, "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout.split()
    want = {p.split("==")[0]: p.split("==")[1] for p in PINS}
    got = {line.split("==")[0].lower(): line.split("==")[1].split("+")[0] for line in freeze if "==" in line}
    wrong = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: pip installed {wrong} instead of {want}.")
    atomic_write_json(stamp, {"pins": list(PINS), "install_s": round(time.time() - t0, 1), "freeze": freeze})
    log(f"nnU-Net venv ready in {time.time() - t0:.0f} s")
    return exe


# ---------------------------------------------------------------------------------------- trainer

TRAINER_SOURCE = '''"""nnUNetTrainer_WallClock: nnU-Net's default trainer stopped by a wall-clock budget.

Generated by bench/nnunet_baseline.py of the Vesuvius surface bundle (do not edit: it is rewritten).
Environment: NNUNET_WALLCLOCK_BUDGET_S (required), NNUNET_WALLCLOCK_DEADLINE (unix time; default
construction time + budget), NNUNET_WALLCLOCK_ITERS (train iterations per epoch, 25),
NNUNET_WALLCLOCK_VAL_ITERS (5), NNUNET_WALLCLOCK_THREADS (torch threads), NNUNET_WALLCLOCK_LR ("time":
poly lr over the elapsed fraction of the loop's time budget; "epochs": nnU-Net's poly over num_epochs),
NNUNET_WALLCLOCK_SKIP_FINAL_VAL ("1": skip perform_actual_validation). Writes wallclock_summary.json
into the fold folder at the end of training.
"""

import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _apply_thread_limit():
    n = os.environ.get("NNUNET_WALLCLOCK_THREADS")
    if n:
        torch.set_num_threads(int(n))


class _TimePolyLR:
    """lr = initial_lr * (1 - f) ** 0.9, f = (now - t0) / (deadline - t0), t0 = the first step (loop start)."""

    def __init__(self, optimizer, initial_lr, deadline, exponent=0.9):
        self.optimizer, self.initial_lr, self.deadline, self.exponent = optimizer, initial_lr, deadline, exponent
        self.t0 = None
        self._last_lr = [initial_lr]

    def step(self, current_step=None):
        now = time.time()
        if self.t0 is None:
            self.t0 = now
        f = min(max((now - self.t0) / max(self.deadline - self.t0, 1e-6), 0.0), 1.0)
        lr = self.initial_lr * (1.0 - f) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr]

    def get_last_lr(self):
        return self._last_lr


class nnUNetTrainer_WallClock(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_thread_limit()
        if "NNUNET_WALLCLOCK_BUDGET_S" not in os.environ:
            raise ValueError("nnUNetTrainer_WallClock needs NNUNET_WALLCLOCK_BUDGET_S (seconds) in the environment.")
        self.wallclock_budget_s = float(os.environ["NNUNET_WALLCLOCK_BUDGET_S"])
        self.wallclock_deadline = float(os.environ.get("NNUNET_WALLCLOCK_DEADLINE", time.time() + self.wallclock_budget_s))
        self.wallclock_lr = os.environ.get("NNUNET_WALLCLOCK_LR", "time")
        if self.wallclock_lr not in ("time", "epochs"):
            raise ValueError(f"NNUNET_WALLCLOCK_LR must be 'time' or 'epochs', got {self.wallclock_lr!r}.")
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_WALLCLOCK_ITERS", "25"))
        self.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_WALLCLOCK_VAL_ITERS", "5"))
        self.num_epochs = 1_000_000
        self.save_every = 1
        self._wc = {"budget_s": self.wallclock_budget_s, "deadline": self.wallclock_deadline,
                    "iters_per_epoch": self.num_iterations_per_epoch,
                    "val_iters_per_epoch": self.num_val_iterations_per_epoch, "lr_schedule": self.wallclock_lr,
                    "epochs": 0, "train_iterations": 0, "val_iterations": 0, "iter_s": [], "epoch_iterations": [],
                    "epoch_val_iterations": [], "train_phase_s": [], "val_phase_s": [], "epoch_s": [], "lr": [],
                    "stop_reason": None}
        self._wc_epoch_t0 = None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # the thread limit also reaches nnUNetv2_predict, which builds the network through this method
        _apply_thread_limit()
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def configure_optimizers(self):
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.wallclock_lr == "time":
            lr_scheduler = _TimePolyLR(optimizer, self.initial_lr, self.wallclock_deadline)
        return optimizer, lr_scheduler

    def on_epoch_start(self):
        self._wc_epoch_t0 = time.time()
        super().on_epoch_start()

    # time estimates from this run: a training iteration, a validation iteration, the rest of an epoch's end
    # (logging, plot, checkpoints; a guess until one epoch has ended) plus the final checkpoint
    def _it_s(self):
        last = self._wc["iter_s"][-10:]
        return sum(last) / max(1, len(last))

    def _val_it_s(self):
        if self._wc["val_phase_s"]:
            return self._wc["val_phase_s"][-1] / max(1, self._wc["epoch_val_iterations"][-1])
        return 0.5 * self._it_s()

    def _end_s(self):
        wc = self._wc
        rest = [e - t - v for e, t, v in zip(wc["epoch_s"], wc["train_phase_s"], wc["val_phase_s"])]
        return (max(rest[-1], 0.0) if rest else 5.0) + 3.0

    def _fits(self, seconds):
        return time.time() + seconds <= self.wallclock_deadline

    def _last_epoch(self, reason):
        self._wc["stop_reason"] = f"{reason} ({self.wallclock_deadline - time.time():.1f} s of the budget left)"

    def on_epoch_end(self):
        if self._wc["stop_reason"] is not None:
            self.num_epochs = self.current_epoch + 1  # the last epoch: no checkpoint_latest, on_train_end saves final
        super().on_epoch_end()  # logs, checkpoint_latest (save_every = 1), checkpoint_best, current_epoch += 1
        now = time.time()
        epoch_s = now - self._wc_epoch_t0
        self._wc["epoch_s"].append(round(epoch_s, 3))
        self._wc["epochs"] = self.current_epoch
        n_it = self._wc["epoch_iterations"][-1]
        self.print_to_log_file(f"wallclock: epoch {self.current_epoch - 1}: {epoch_s:.2f} s in all, "
                               f"train {n_it} it in {self._wc['train_phase_s'][-1]:.2f} s "
                               f"({self._wc['train_phase_s'][-1] / max(1, n_it):.3f} s/it), "
                               f"val {self._wc['val_phase_s'][-1]:.2f} s; "
                               f"{self.wallclock_deadline - now:.1f} s of the budget left")
        if self._wc["stop_reason"] is None and not self._fits(self._it_s() + self._val_it_s() + self._end_s()):
            self._last_epoch(f"no time for another epoch of >= 1 iteration after epoch {self.current_epoch - 1}")
        if self._wc["stop_reason"] is not None:  # sets num_epochs: the loop ends, on_train_end saves checkpoint_final
            self.print_to_log_file(f"wallclock: stopping after {self.current_epoch} epochs: {self._wc['stop_reason']}")
            self.num_epochs = self.current_epoch

    def run_training(self):
        # nnUNetTrainer.run_training, with: `while` instead of a range fixed at the start (so that on_epoch_end
        # can end it); the epoch's training iterations cut short (>= 1) when the next one, plus the time the
        # end of an epoch takes, would pass the deadline (then 1 validation iteration and the loop ends);
        # the time-poly lr updated every iteration; timings.
        wc = self._wc
        self.on_train_start()
        wc["loop_start"] = time.time()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            wc["lr"].append(float(self.optimizer.param_groups[0]["lr"]))
            t0 = time.time()
            train_outputs = []
            for batch_id in range(self.num_iterations_per_epoch):
                if train_outputs and not self._fits(self._it_s() + self._val_it_s() + self._end_s()):
                    self._last_epoch(f"epoch {self.current_epoch} cut after {batch_id} of "
                                     f"{self.num_iterations_per_epoch} iterations")
                    break
                if batch_id and self.wallclock_lr == "time":
                    self.lr_scheduler.step()
                ti = time.time()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                wc["iter_s"].append(round(time.time() - ti, 3))
            if wc["stop_reason"] is None and not self._fits(self._val_it_s() * self.num_val_iterations_per_epoch + self._end_s()):
                self._last_epoch(f"no time for the {self.num_val_iterations_per_epoch} validation iterations of epoch "
                                 f"{self.current_epoch}: 1 instead, and the last epoch")
            wc["train_phase_s"].append(round(time.time() - t0, 3))
            wc["epoch_iterations"].append(len(train_outputs))
            wc["train_iterations"] += len(train_outputs)
            self.on_train_epoch_end(train_outputs)
            t0 = time.time()
            n_val = 1 if wc["stop_reason"] is not None else self.num_val_iterations_per_epoch
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for batch_id in range(n_val):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(val_outputs)
            wc["val_phase_s"].append(round(time.time() - t0, 3))
            wc["val_iterations"] += n_val
            wc["epoch_val_iterations"].append(n_val)
            self.on_epoch_end()
        wc["loop_end"] = time.time()
        self.on_train_end()
        wc["train_end"] = time.time()
        wc["n_parameters"] = int(sum(p.numel() for p in self.network.parameters()))
        wc["batch_size"] = int(self.batch_size)
        wc["patch_size"] = [int(s) for s in self.configuration_manager.patch_size]
        wc["torch_threads"] = torch.get_num_threads()
        path = os.path.join(self.output_folder, "wallclock_summary.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(wc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".tmp", path)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("NNUNET_WALLCLOCK_SKIP_FINAL_VAL", "1") == "1":
            self.print_to_log_file("wallclock: final validation (perform_actual_validation) skipped")
            return
        super().perform_actual_validation(save_probabilities)
'''


def _nnunet_package_dir(python_exe: str) -> str:
    out = subprocess.run([python_exe, "-c", "import os, nnunetv2; print(os.path.dirname(nnunetv2.__file__))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1]


def install_trainer(python_exe: str) -> str:
    """Write ``nnUNetTrainer_WallClock.py`` (``TRAINER_SOURCE``) into the venv's
    ``nnunetv2/training/nnUNetTrainer/`` package (atomically, only if it differs); returns its path."""
    path = os.path.join(_nnunet_package_dir(python_exe), "training", "nnUNetTrainer", f"{TRAINER_NAME}.py")
    if not os.path.isfile(path) or open(path).read() != TRAINER_SOURCE:
        atomic_write_text(path, TRAINER_SOURCE)
    return path


# ------------------------------------------------------------------------------------------- axes

_AXIS_CHECK = r'''
import json, sys
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
src, dst = sys.argv[1], sys.argv[2]
rw = determine_reader_writer_from_dataset_json({"file_ending": ".nii.gz"}, src, allow_nonmatching_filename=True)()
img, props = rw.read_images([src])
rw.write_seg(img[0].astype("uint8"), dst, props)
print(json.dumps({"reader": type(rw).__name__, "nnunet_shape": list(img.shape[1:])}))
'''


def check_axis_roundtrip(python_exe: str, tmp_dir, shape=(24, 32, 40)) -> dict:
    """Check that a (Z, Y, X) TIFF array survives our NIfTI conversion, nnU-Net's reader and its segmentation
    writer (the path of a prediction) and our reading back, with three different sides so that any axis
    swap or flip is caught. Returns ``{"ok", "shape", "reader", "nnunet_shape"}``; ``ValueError`` if not."""
    import numpy as np

    from custom_components.data.io import read_volume, write_volume

    os.makedirs(tmp_dir, exist_ok=True)
    n = int(np.prod(shape))
    vol = (np.arange(n, dtype=np.int64) * 7919 % 251).astype(np.uint8).reshape(shape)  # no symmetry
    tif = os.path.join(tmp_dir, "axes.tif")
    write_volume(tif, vol)
    src = os.path.join(tmp_dir, "axes_0000.nii.gz")
    write_volume(src, read_volume(tif))  # what convert_nnunet does
    dst = os.path.join(tmp_dir, "axes_pred.nii.gz")
    out = subprocess.run([python_exe, "-c", _AXIS_CHECK, src, dst], check=True, capture_output=True, text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    back = read_volume(dst)
    if back.shape != vol.shape or not np.array_equal(back, vol):
        raise ValueError(f"axis round trip failed: wrote {vol.shape}, nnU-Net ({info['reader']}) saw "
                         f"{info['nnunet_shape']}, read back {back.shape} (equal values: {back.shape == vol.shape and np.array_equal(back, vol)}).")
    return {"ok": True, "shape": list(shape), **info}


# -------------------------------------------------------------------------------------- pipeline


def _run(cmd, env, log_path, timeout=None, log=print, cwd=None) -> float:
    """Run ``cmd`` (own process group, in ``cwd``) with stdout+stderr appended to ``log_path``; returns wall seconds.
    ``subprocess.TimeoutExpired`` after killing the group on timeout; ``RuntimeError`` on a non-zero exit."""
    log("$ " + " ".join(cmd))
    t0 = time.time()
    with open(log_path, "a") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{cmd[0]} exited with {rc}; log {log_path}:\n{tail}")
    return time.time() - t0


def _plan_summary(plans_path: str) -> dict:
    with open(plans_path) as fh:
        plans = json.load(fh)
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg.get("architecture", {})
    kw = arch.get("arch_kwargs", {})
    return {
        "patch_size": cfg.get("patch_size"),
        "batch_size": cfg.get("batch_size"),
        "spacing": cfg.get("spacing"),
        "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels"),
        "normalization_schemes": cfg.get("normalization_schemes"),
        "transpose_forward": plans.get("transpose_forward", [0, 1, 2]),
        "network": arch.get("network_class_name"),
        "n_stages": kw.get("n_stages"),
        "features_per_stage": kw.get("features_per_stage"),
        "strides": kw.get("strides"),
        "kernel_sizes": kw.get("kernel_sizes"),
        "n_conv_per_stage": kw.get("n_conv_per_stage"),
    }


def _tiffs(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if not name.startswith(".") and ext.lower() in (".tif", ".tiff"):
            out[stem] = os.path.join(folder, name)
    return out


def train_and_predict(
    data_root,
    test_images_dir,
    work_dir,
    budget_s: float,
    threads: int = 2,
    *,
    dataset_id: int = 101,
    name: str = "VesuviusSurface",
    fold: str = "all",
    iters_per_epoch: int = 25,
    val_iters: int = 5,
    lr_schedule: str = "time",
    disable_tta: bool = False,
    n_proc_da: int | None = None,
    venv=DEFAULT_VENV,
    grace_s: float | None = None,
    device: str = "cpu",
    log=print,
) -> dict:
    """Convert ``data_root`` (Kaggle layout), plan + preprocess, train nnU-Net v2 3d_fullres on the CPU for
    ``budget_s`` wall seconds, predict ``test_images_dir/*.tif`` into ``work_dir/pred/<id>.tif`` (uint8 0/1,
    (Z, Y, X) like our labels). Steps and choices: module docstring. Everything is written under
    ``work_dir`` (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``, ``logs``, ``pred``); an earlier
    run there is replaced.

    ``budget_s`` counts the whole ``nnUNetv2_train`` process from its launch (imports, data loaders,
    epochs, checkpoints); nothing is started that is expected to end past the deadline (an epoch may be
    cut short). The process is killed at ``budget_s + grace_s`` (default ``max(120, budget_s / 2)``), and
    then the last ``checkpoint_latest.pth`` (written every epoch) is predicted with.

    Returns a dict: ``pred_dir``, ``convert_s``, ``plan_preprocess_s``, ``train_s`` (wall time of
    ``nnUNetv2_train``), ``predict_s``, ``export_s``, ``total_s``, ``budget_s``, ``epochs``,
    ``train_iterations``, ``val_iterations``, ``s_per_iter`` (training-phase seconds per training
    iteration, data loading included, from the ``wallclock: epoch ...`` lines of nnU-Net's training log),
    ``s_per_iter_median`` (median single iteration), ``s_per_iter_epoch_time`` (nnU-Net's ``Epoch time``
    log lines summed / training iterations: with validation, logging), ``epoch_time_s`` (mean),
    ``loop_s`` (training loop), ``startup_s`` (launch to loop start), ``stop_reason``, ``checkpoint``,
    ``killed``, ``plan`` (patch size in nnU-Net's order and ``patch_size_zyx``, batch size, network,
    stages, features, ...), ``n_parameters``, ``axis_check``, ``settings`` (threads, fold, iterations
    per epoch, lr schedule, TTA, ...), ``pins``, ``cases`` (test ids), ``logs``.
    """
    t_all = time.time()
    try:
        import numpy as np

        from custom_components.data.io import read_tiff_header, read_volume, write_volume
    except ImportError as e:
        raise ValueError(f"train_and_predict converts volumes with custom_components.data.io; run it with the "
                         f"project's interpreter {PROJECT_PYTHON} ({e}).") from None
    budget_s = float(budget_s)
    threads = int(threads)
    if budget_s <= 0 or threads < 1:
        raise ValueError(f"budget_s must be > 0 and threads >= 1, got budget_s={budget_s}, threads={threads}.")
    if lr_schedule not in ("time", "epochs"):
        raise ValueError(f"lr_schedule must be 'time' or 'epochs', got {lr_schedule!r}.")
    if str(fold) != "all" and str(fold) not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"fold must be 'all' or 0..4, got {fold!r}.")
    data_root, test_images_dir, work_dir = (os.path.abspath(os.fspath(p)) for p in (data_root, test_images_dir, work_dir))
    test_cases = _tiffs(test_images_dir) if os.path.isdir(test_images_dir) else {}
    if not test_cases:
        raise ValueError(f"no test volumes (*.tif) in {test_images_dir}.")
    n_proc_da = threads if n_proc_da is None else int(n_proc_da)

    py = ensure_venv(venv, log=log)
    trainer_file = install_trainer(py)
    bindir = os.path.dirname(py)
    os.makedirs(work_dir, exist_ok=True)
    axis_check = check_axis_roundtrip(py, os.path.join(work_dir, "axis_check"))
    log(f"axis round trip ok: (Z, Y, X) {axis_check['shape']} -> nnU-Net {axis_check['reader']} sees "
        f"{axis_check['nnunet_shape']} -> back {axis_check['shape']}")

    raw, pre, res = (os.path.join(work_dir, d) for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    logs = os.path.join(work_dir, "logs")
    for d in (raw, pre, res, logs):
        os.makedirs(d, exist_ok=True)
    for f in glob.glob(os.path.join(logs, "*.log")):
        os.unlink(f)
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": raw, "nnUNet_preprocessed": pre, "nnUNet_results": res,
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
        "nnUNet_n_proc_DA": str(n_proc_da), "nnUNet_def_n_proc": str(threads), "nnUNet_compile": "false",
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
    })
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)

    # 1. conversion (the project's converter), test images the same way
    t0 = time.time()
    project_env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    _run([PROJECT_PYTHON if os.path.isfile(PROJECT_PYTHON) else sys.executable, "-m", "custom_components.data.convert_nnunet",
          "--data_root", data_root, "--out", raw, "--dataset_id", str(dataset_id), "--name", name,
          "--workers", str(threads), "--overwrite"], dict(project_env, PYTHONPATH=REPO), os.path.join(logs, "convert.log"), log=log)
    ds_name = f"Dataset{int(dataset_id):03d}_{name}"
    test_in = os.path.join(work_dir, "test_input")
    shutil.rmtree(test_in, ignore_errors=True)
    os.makedirs(test_in)
    shapes = {}
    for vid, path in test_cases.items():
        vol = read_volume(path)
        shapes[vid] = tuple(vol.shape)
        write_volume(os.path.join(test_in, f"{vid}_0000.nii.gz"), vol)
    convert_s = time.time() - t0

    # 2. plan and preprocess (nnU-Net's default planner, 3d_fullres only)
    shutil.rmtree(os.path.join(pre, ds_name), ignore_errors=True)
    plan_s = _run([os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", CONFIGURATION,
                   "-np", "1", "-npfp", str(threads), "--verify_dataset_integrity", "--no_pbar"], env, os.path.join(logs, "plan_and_preprocess.log"), log=log)
    plan = _plan_summary(os.path.join(pre, ds_name, f"{PLANS}.json"))
    if plan["patch_size"] and axis_check["nnunet_shape"] == axis_check["shape"][::-1]:
        # the plan is in nnU-Net's order (its reader's (X, Y, Z) view, then transpose_forward): ours is (Z, Y, X)
        reader_order = [0] * len(plan["patch_size"])
        for i, t in enumerate(plan["transpose_forward"]):
            reader_order[t] = plan["patch_size"][i]
        plan["patch_size_zyx"] = reader_order[::-1]
    log(f"plan: patch {plan['patch_size']}, batch {plan['batch_size']}, {plan['network']} with "
        f"{plan['n_stages']} stages, features {plan['features_per_stage']}")

    # 3. training for the budget
    out_base = os.path.join(res, ds_name, f"{TRAINER_NAME}__{PLANS}__{CONFIGURATION}")
    fold_dir = os.path.join(out_base, f"fold_{fold}")
    shutil.rmtree(out_base, ignore_errors=True)
    grace = max(120.0, budget_s / 2) if grace_s is None else float(grace_s)
    train_env = dict(env, NNUNET_WALLCLOCK_BUDGET_S=str(budget_s), NNUNET_WALLCLOCK_ITERS=str(int(iters_per_epoch)),
                     NNUNET_WALLCLOCK_VAL_ITERS=str(int(val_iters)), NNUNET_WALLCLOCK_THREADS=str(threads),
                     NNUNET_WALLCLOCK_LR=lr_schedule, NNUNET_WALLCLOCK_SKIP_FINAL_VAL="1")
    train_log = os.path.join(logs, "train.log")
    killed = False
    train_env["NNUNET_WALLCLOCK_DEADLINE"] = repr(time.time() + budget_s)
    t0 = time.time()
    try:
        _run([os.path.join(bindir, "nnUNetv2_train"), str(dataset_id), CONFIGURATION, str(fold), "-tr", TRAINER_NAME,
              "-device", device], train_env, train_log, timeout=budget_s + grace, log=log)
    except subprocess.TimeoutExpired:
        killed = True
        log(f"nnUNetv2_train killed at budget + {grace:.0f} s; predicting with checkpoint_latest.pth")
    train_s = time.time() - t0
    checkpoint = "checkpoint_final.pth"
    if killed or not os.path.isfile(os.path.join(fold_dir, checkpoint)):
        checkpoint = "checkpoint_latest.pth"
        if not os.path.isfile(os.path.join(fold_dir, checkpoint)):
            raise RuntimeError(f"no checkpoint in {fold_dir} after training; see {train_log}.")
    wc_path = os.path.join(fold_dir, "wallclock_summary.json")
    wc = json.load(open(wc_path)) if os.path.isfile(wc_path) else {}
    nn_logs = sorted(glob.glob(os.path.join(fold_dir, "training_log_*.txt")))
    nn_log_text = open(nn_logs[-1]).read() if nn_logs else open(train_log).read()
    epoch_times = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", nn_log_text)]
    wc_train = [(int(n), float(t)) for n, t in
                re.findall(r"wallclock: epoch \d+: [0-9.]+ s in all, train (\d+) it in ([0-9.]+) s", nn_log_text)]
    epochs = wc.get("epochs", len(epoch_times))
    train_iters = wc.get("train_iterations", sum(n for n, _ in wc_train))
    iter_s = sorted(wc.get("iter_s", []))

    # 4. prediction
    pred_nii = os.path.join(work_dir, "pred_nifti")
    shutil.rmtree(pred_nii, ignore_errors=True)
    cmd = [os.path.join(bindir, "nnUNetv2_predict"), "-i", test_in, "-o", pred_nii, "-d", str(dataset_id),
           "-c", CONFIGURATION, "-f", str(fold), "-tr", TRAINER_NAME, "-chk", checkpoint, "-device", device,
           "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    if disable_tta:
        cmd.append("--disable_tta")
    predict_s = _run(cmd, dict(env, NNUNET_WALLCLOCK_THREADS=str(threads)), os.path.join(logs, "predict.log"), log=log)

    # 5. NIfTI -> <id>.tif uint8 0/1, (Z, Y, X)
    t0 = time.time()
    pred_dir = os.path.join(work_dir, "pred")
    shutil.rmtree(pred_dir, ignore_errors=True)
    os.makedirs(pred_dir)
    for vid, path in test_cases.items():
        seg = read_volume(os.path.join(pred_nii, f"{vid}.nii.gz"))
        if tuple(seg.shape) != shapes[vid] or tuple(read_tiff_header(path)[0]) != shapes[vid]:
            raise ValueError(f"prediction of {vid} has shape {seg.shape}, its test image {path} {shapes[vid]}.")
        vals = np.unique(seg)
        if not set(vals.tolist()) <= {0, 1}:
            raise ValueError(f"prediction of {vid} holds values {vals.tolist()}, expected 0/1.")
        write_volume(os.path.join(pred_dir, f"{vid}.tif"), seg.astype(np.uint8))
    export_s = time.time() - t0

    sum_epoch = sum(epoch_times)
    summary = {
        "pred_dir": pred_dir,
        "convert_s": round(convert_s, 2),
        "plan_preprocess_s": round(plan_s, 2),
        "train_s": round(train_s, 2),
        "predict_s": round(predict_s, 2),
        "export_s": round(export_s, 2),
        "total_s": round(time.time() - t_all, 2),
        "budget_s": budget_s,
        "epochs": epochs,
        "train_iterations": train_iters,
        "val_iterations": wc.get("val_iterations", len(epoch_times) * int(val_iters)),
        "s_per_iter": round(sum(t for _, t in wc_train) / max(1, sum(n for n, _ in wc_train)), 4) if wc_train else None,
        "s_per_iter_median": round(iter_s[len(iter_s) // 2], 4) if iter_s else None,
        "s_per_iter_epoch_time": round(sum_epoch / max(1, train_iters), 4) if epoch_times else None,
        "epoch_time_s": round(sum_epoch / len(epoch_times), 3) if epoch_times else None,
        "loop_s": round(wc["loop_end"] - wc["loop_start"], 2) if "loop_end" in wc else None,
        "startup_s": round(wc["loop_start"] - (float(train_env["NNUNET_WALLCLOCK_DEADLINE"]) - budget_s), 2) if "loop_start" in wc else None,
        "stop_reason": wc.get("stop_reason"),
        "checkpoint": checkpoint,
        "killed": killed,
        "plan": plan,
        "n_parameters": wc.get("n_parameters"),
        "axis_check": axis_check,
        "settings": {"threads": threads, "n_proc_da": n_proc_da, "fold": str(fold), "iters_per_epoch": int(iters_per_epoch),
                     "val_iters": int(val_iters), "lr_schedule": lr_schedule, "tta_mirroring": not disable_tta,
                     "configuration": CONFIGURATION, "trainer": TRAINER_NAME, "trainer_file": trainer_file,
                     "dataset": ds_name, "venv": os.path.abspath(os.fspath(venv))},
        "pins": list(PINS),
        "cases": sorted(test_cases),
        "logs": {"dir": logs, "nnunet_training_log": nn_logs[-1] if nn_logs else None},
    }
    return summary


def score(pred_dir, label_dir, out_csv, workers: int = 2) -> dict:
    """The competition score of ``pred_dir`` against ``label_dir`` (``custom_components.metrics.evaluate``, project
    interpreter); returns the mean row (floats) and writes the per-volume CSV ``out_csv``."""
    py = PROJECT_PYTHON if os.path.isfile(PROJECT_PYTHON) else sys.executable
    subprocess.run([py, "-m", "custom_components.metrics.evaluate", "--pred_dir", os.fspath(pred_dir), "--label_dir",
                    os.fspath(label_dir), "--out", os.fspath(out_csv), "--workers", str(int(workers))],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    with open(out_csv) as fh:
        rows = list(csv.DictReader(fh))
    mean = next(r for r in rows if r["id"] == "mean")
    return {k: (float(v) if k != "id" else v) for k, v in mean.items()}


# ------------------------------------------------------------------------------------------- CLI


def _table(s: dict) -> str:
    p = s["plan"]
    rows = [
        ("plan", f"patch {p['patch_size']} (ours (Z, Y, X): {p.get('patch_size_zyx', '?')}), batch {p['batch_size']}, {p['network']} {p['n_stages']} stages, "
                 f"features {p['features_per_stage']}, {s.get('n_parameters') or '?'} parameters"),
        ("convert", f"{s['convert_s']:.1f} s"),
        ("plan + preprocess", f"{s['plan_preprocess_s']:.1f} s"),
        ("train", f"{s['train_s']:.1f} s (budget {s['budget_s']:.0f} s; startup {s['startup_s']} s, loop {s['loop_s']} s)"),
        ("epochs / iterations", f"{s['epochs']} epochs, {s['train_iterations']} train + {s['val_iterations']} val iterations"),
        ("s per train iteration", f"{s['s_per_iter']} (epoch time / train its: {s['s_per_iter_epoch_time']})"),
        ("stop", f"{s['stop_reason']} ({s['checkpoint']}{', killed' if s['killed'] else ''})"),
        ("predict", f"{s['predict_s']:.1f} s (TTA mirroring {'on' if s['settings']['tta_mirroring'] else 'off'}), export {s['export_s']:.1f} s"),
        ("total", f"{s['total_s']:.1f} s"),
        ("pred_dir", s["pred_dir"]),
    ]
    if "score" in s:
        sc = s["score"]
        rows.append(("score (mean)", f"{sc['score']:.4f} (topo {sc['topo_score']:.4f}, surface dice "
                                     f"{sc['surface_dice']:.4f}, voi {sc['voi_score']:.4f})"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def main(argv=None) -> int:
    """Command line (module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(prog="bench/nnunet_baseline.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_root", required=True, help="Kaggle-layout training data (train.csv, train_images/, train_labels/)")
    ap.add_argument("--test_images", required=True, help="folder of test <id>.tif volumes to predict")
    ap.add_argument("--work_dir", required=True, help="nnU-Net folders, logs, predictions (replaced)")
    ap.add_argument("--budget_s", type=float, required=True, help="wall seconds of nnUNetv2_train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label_dir", default=None, help="labels of the test volumes: score the predictions")
    ap.add_argument("--dataset_id", type=int, default=101)
    ap.add_argument("--fold", default="all")
    ap.add_argument("--iters_per_epoch", type=int, default=25)
    ap.add_argument("--val_iters", type=int, default=5)
    ap.add_argument("--lr_schedule", choices=("time", "epochs"), default="time")
    ap.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (8x faster prediction)")
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="nnU-Net's -device (cuda for a GPU comparison)")
    ap.add_argument("--summary", default=None, help="JSON summary path (default WORK_DIR/summary.json)")
    ap.add_argument("--check_axes", action="store_true", help="only run the axis round-trip check")
    args = ap.parse_args(argv)
    try:
        if args.check_axes:
            py = ensure_venv(args.venv)
            print(json.dumps(check_axis_roundtrip(py, os.path.join(args.work_dir, "axis_check"))))
            return 0
        s = train_and_predict(args.data_root, args.test_images, args.work_dir, args.budget_s, args.threads,
                              dataset_id=args.dataset_id, fold=args.fold, iters_per_epoch=args.iters_per_epoch,
                              val_iters=args.val_iters, lr_schedule=args.lr_schedule, disable_tta=args.disable_tta,
                              venv=args.venv, device=args.device)
        if args.label_dir:
            s["score"] = score(s["pred_dir"], args.label_dir, os.path.join(args.work_dir, "results.csv"), args.threads)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = args.summary or os.path.join(args.work_dir, "summary.json")
    atomic_write_json(path, s)
    print(_table(s))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
