"""Faults: configuration errors fail first and name the setting; SIGKILL mid-checkpoint loses nothing."""

import os
import signal
import subprocess
import time

import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_components.training.workflow import check_device, preflight
from training_utils import PYTHON, REPO, TRAIN_JSON, cli_args, make_data, tiny_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("rel"), volumes=3)


def _pre(data_dir, tmp_path, **kw):
    args = dict(dataset_dir=data_dir, datalist=None, output_dir=str(tmp_path / "out"), patch_size=[16, 16, 16],
                batch_size=2, device="cpu", val_fraction=0.34)
    args.update(kw)
    return preflight(**args)


def test_preflight_ok(data_dir, tmp_path):
    r = _pre(data_dir, tmp_path)
    assert len(r["train"]) == 2 and len(r["val"]) == 1 and r["resume_path"] == ""


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"patch_size": [18, 16, 16]}, r"patch_size \[18, 16, 16\] cannot be taken.*Nearest valid patch_size: \[20, 16, 16\]"),
    ({"patch_size": [64, 64, 64]}, r"patch_size \[64, 64, 64\] is larger than volume .* of shape \[40, 40, 40\]"),
    ({"device": "cuda:3"}, "device 'cuda:3'"),
    ({"dataset_dir": "/nonexistent/data"}, "dataset_dir '/nonexistent/data' does not exist"),
    ({"datalist": "/nonexistent/list.json"}, "datalist '/nonexistent/list.json' does not exist"),
    ({"epochs": 0}, "epochs must be >= 1"),
])
def test_config_errors_name_the_setting(data_dir, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _pre(data_dir, tmp_path, **kw)


def test_bad_tiff_named_before_any_decoding(data_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    victim = sorted((bad / "train_labels").iterdir())[0]
    victim.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=victim.name):
        _pre(str(bad), tmp_path)


def test_unknown_term_and_negative_weight_fail_in_initialize(data_dir, tmp_path):
    for weights, message in (({"bce": 1, "focal": 1}, 'unknown loss term "focal"'), ({"dice": -1}, "weights must be finite and >= 0")):
        wf = ConfigWorkflow(workflow_type="train", config_file=TRAIN_JSON,
                            **tiny_overrides(data_dir, tmp_path / "o", loss_weights=weights))
        with pytest.raises(Exception) as e:
            wf.initialize()
        chain, c = [], e.value
        while c is not None:
            chain.append(str(c))
            c = c.__cause__
        assert any(message in m for m in chain), chain
        assert not (tmp_path / "o" / "cache").exists()  # failed before any volume was decoded


def test_check_device_cpu():
    assert check_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="not a valid torch device"):
        check_device("gpu7")


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    o = tiny_overrides(data_dir, out, epochs=3, iterations_per_epoch=2, val_interval=10)
    cmd = [PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_JSON, *cli_args(o)]
    env = {**os.environ, "VESUVIUS_SLOW_CHECKPOINT_S": "3"}
    log = open(tmp_path / "first_run.txt", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = out / "checkpoints"
    deadline = time.time() + 240
    # wait for the first checkpoint, then for the second write to be in flight (its temporary file exists)
    while time.time() < deadline and not (ckpt / "last.pt").exists():
        assert proc.poll() is None, (tmp_path / "first_run.txt").read_text()[-3000:]
        time.sleep(0.1)
    assert (ckpt / "last.pt").exists(), "no first checkpoint"
    while time.time() < deadline and not any(p.name.startswith(".last.pt.tmp") for p in ckpt.iterdir()):
        assert proc.poll() is None, "training ended before the second checkpoint write"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = torch.load(ckpt / "last.pt", weights_only=True)
    assert first["meta"]["epoch"] == 1
    r = subprocess.run(cmd + ["--resume", "true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    final = torch.load(ckpt / "last.pt", weights_only=True)
    assert final["meta"]["epoch"] == 3 and final["meta"]["iteration"] == 6
    assert "resumed from" in (out / "train.log").read_text()
