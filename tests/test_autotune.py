"""custom_components.training.autotune: the pure pieces by hand-computed values, and one tiny CPU run of the CLI."""

import json
import math
import time

import pytest
import torch

from custom_components.training.autotune import (
    estimate_run_time,
    loader_candidates,
    main,
    parse_overrides,
    pick_loader_settings,
    search_largest_batch,
    sliding_window_count,
    validation_seconds,
)
from training_utils import DEMO_JSON, TRAIN_JSON, autotune_args, make_data, tiny_overrides


class Fits:
    """A predicate that "fits" up to ``n``, counting its calls and the batches it saw."""

    def __init__(self, n, oom=False):
        self.n, self.oom, self.calls = n, oom, []

    def __call__(self, b):
        self.calls.append(b)
        if b <= self.n:
            return True
        if self.oom:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {b})")
        return False


def test_search_finds_13_in_log_calls():
    f = Fits(13)
    assert search_largest_batch(f, start=1, limit=1024) == 13
    # doubling 1, 2, 4, 8, 16 (fails), bisection 12, 14 (fails), 13: 8 calls, each batch once
    assert f.calls == [1, 2, 4, 8, 16, 12, 14, 13]
    assert len(f.calls) <= 2 * math.ceil(math.log2(13)) + 1


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 255])
def test_search_exact_and_logarithmic(n):
    f = Fits(n)
    assert search_largest_batch(f, limit=256) == n
    assert len(f.calls) == len(set(f.calls)) <= 2 * math.ceil(math.log2(n + 1)) + 1


def test_search_stops_at_limit():
    f = Fits(10**6)
    assert search_largest_batch(f, start=1, limit=48) == 48
    assert f.calls == [1, 2, 4, 8, 16, 32, 48]


def test_cuda_oom_exception_is_a_no():
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)  # constructible on the CPU build too
    f = Fits(5, oom=True)
    assert search_largest_batch(f, limit=64) == 5
    assert f.calls == [1, 2, 4, 8, 6, 5]


def test_other_errors_propagate():
    def broken(b):
        raise KeyError("not memory")

    with pytest.raises(KeyError):
        search_largest_batch(broken)


def test_batch_one_not_fitting_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size 1 does not fit at patch_size \[128, 128, 128\].*reduce patch_size"):
        search_largest_batch(Fits(0, oom=True), what="at patch_size [128, 128, 128]")


def test_search_out_of_time_returns_best_known():
    f = Fits(100)
    ticks = iter([False, False, True])
    assert search_largest_batch(f, limit=256, out_of_time=lambda: next(ticks)) == 4
    assert f.calls == [1, 2, 4]


def test_estimate_run_time_by_hand():
    e = estimate_run_time(0.5, iterations_per_epoch=250, epochs=300, val_s=40.0, val_interval=10)
    assert e["epoch_s"] == pytest.approx(125.0)  # 0.5 * 250
    assert e["train_s"] == pytest.approx(37500.0)  # 125 * 300
    assert e["validations"] == 30 and e["val_total_s"] == pytest.approx(1200.0)
    assert e["total_s"] == pytest.approx(38700.0) and e["validation_included"]
    e = estimate_run_time(2.0, 30, 10, val_s=None, val_interval=3)
    assert e["validations"] == 3 and e["val_total_s"] is None
    assert e["total_s"] == pytest.approx(600.0) and not e["validation_included"]
    assert estimate_run_time(1.0, 1, 4, 5.0, 0)["total_s"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        estimate_run_time(1.0, 0, 1)


def test_pick_loader_settings_cheapest_under_5_percent():
    ms = [
        {"num_workers": 0, "prefetch": 2, "data_wait_fraction": 0.30, "step_s": 1.0},
        {"num_workers": 4, "prefetch": 4, "data_wait_fraction": 0.01, "step_s": 0.7},
        {"num_workers": 2, "prefetch": 4, "data_wait_fraction": 0.04, "step_s": 0.72},
        {"num_workers": 2, "prefetch": 2, "data_wait_fraction": 0.049, "step_s": 0.73},
        {"num_workers": 1, "prefetch": 2, "data_wait_fraction": 0.05, "step_s": 0.75},  # not *under* 5 %
    ]
    best = pick_loader_settings(ms)
    assert (best["num_workers"], best["prefetch"], best["meets"]) == (2, 2, True)
    assert "cheapest" in best["reason"]


def test_pick_loader_settings_says_when_none_meets():
    ms = [{"num_workers": 0, "prefetch": 2, "data_wait_fraction": 0.4},
          {"num_workers": 8, "prefetch": 4, "data_wait_fraction": 0.12}]
    best = pick_loader_settings(ms)
    assert (best["num_workers"], best["meets"]) == (8, False)
    assert "no setting tried keeps data wait under 5 %" in best["reason"] and "12.0 %" in best["reason"]
    with pytest.raises(ValueError, match="at least one"):
        pick_loader_settings([])


def test_loader_candidates_cheapest_first():
    assert loader_candidates(2) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    c = loader_candidates(16, configured=(6, 3))  # workers 0, 1, 2, 4, 8 (16 > 15 cores left) x prefetch 2, 4
    assert c[0] == (0, 2) and (6, 3) in c and len(c) == 11 and max(w for w, _ in c) == 8
    assert c == sorted(c)


def test_sliding_windows_by_hand():
    # 320 at roi 128, overlap 0.5: interval 64, ceil(192 / 64) + 1 = 4 per axis
    assert sliding_window_count([320, 320, 320], [128] * 3, 0.5) == 64
    # 64 at roi 32, overlap 0.25: interval 24, ceil(32 / 24) + 1 = 3 per axis; an axis <= roi: 1
    assert sliding_window_count([64, 64, 20], [32] * 3, 0.25) == 9
    # 64 windows (320^3) and 27 windows (64^3 at roi 32, overlap 0.25), 4 per forward: 16 + 7 forwards of 0.1 s
    assert validation_seconds([[320] * 3], [128] * 3, 0.5, 4, 0.1) == pytest.approx(1.6)
    assert validation_seconds([[320] * 3, [64] * 3], [128] * 3, 0.5, 4, 0.1) == pytest.approx(1.7)  # 64^3 <= roi: 1 window
    assert validation_seconds([[64] * 3], [32] * 3, 0.25, 4, 0.1) == pytest.approx(0.7)


def test_parse_overrides_like_monai_bundle():
    o = parse_overrides(["--batch_size", "4", "--patch_size", "[96,96,96]", "--datalist", "", "--amp", "false",
                         "--train#dataset#fg_fraction=0.5", "--output_dir", "runs/x"])
    assert o == {"batch_size": 4, "patch_size": [96, 96, 96], "datalist": "", "amp": False,
                 "train#dataset#fg_fraction": 0.5, "output_dir": "runs/x"}
    with pytest.raises(ValueError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_bad_patch_is_named(tmp_path, capsys):
    rc = main(["--config_file", TRAIN_JSON, "--config_file", DEMO_JSON, "--dataset_dir", str(tmp_path),
               "--patch_size", "[30,32,32]", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "patch_size [30, 32, 32] cannot be taken by the network" in err and "Nearest valid patch_size" in err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_trial_turns_cuda_oom_into_a_record(data_dir, tmp_path, monkeypatch):
    """An OutOfMemoryError raised inside the real trainer's step (simulated on the CPU) is a result, not a crash."""
    import threading

    from custom_components.training import autotune
    from custom_components.training.trainer import TopologyTrainer

    o = tiny_overrides(data_dir, tmp_path / "run", datalist="")
    tuner = autotune._Tuner([TRAIN_JSON, DEMO_JSON], o, deadline=time.time() + 60, volumes=2)
    assert tuner.tuning_volumes == 2 and not tuner.cuda
    ok = tuner.trial("batch", 1, 0, 2, warmup=0, steps=1)
    assert not ok["oom"] and ok["steps"] == 1 and ok["step_s"] > 0
    threads = threading.active_count()

    def oom(self, engine, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TopologyTrainer, "_iteration", oom)
    rec = tuner.trial("batch", 4, 0, 2, warmup=0, steps=2)
    assert rec["oom"] and rec["note"] == "out of memory"
    assert threading.active_count() <= threads  # the loader's buffer thread was shut down


@pytest.mark.slow
def test_cpu_end_to_end_on_the_demo_config(data_dir, tmp_path, capsys):
    data = data_dir
    out = tmp_path / "tune.json"
    t0 = time.time()
    rc = main(autotune_args(data, tmp_path / "run", out, max_minutes=0.5))
    wall = time.time() - t0
    text = capsys.readouterr().out
    assert rc == 0
    assert "ESTIMATED (CPU, no out-of-memory search)" in text
    assert "--batch_size 2 --num_workers" in text and "per epoch" in text
    r = json.loads(out.read_text())
    assert r["estimated"] is True and r["mode"] == "cpu"
    assert r["recommended"]["batch_size"] == 2  # the configured batch: no search on a CPU
    assert isinstance(r["recommended"]["num_workers"], int) and isinstance(r["recommended"]["prefetch"], int)
    e = r["expected"]
    assert e["step_s"] > 0
    assert e["epoch_s"] == pytest.approx(e["step_s"] * 3)  # iterations_per_epoch 3 (tiny overrides)
    assert e["train_s"] == pytest.approx(e["epoch_s"] * 2)  # epochs 2
    assert all(t["batch_size"] <= 2 for t in r["trials"])
    assert all(not t["oom"] for t in r["trials"])
    assert not (tmp_path / "run" / "checkpoints").exists()  # trials write no checkpoint
    assert wall < 60, f"autotune took {wall:.0f} s"


class FakeCudaTuner:
    """Stands in for ``_Tuner`` on a pretend 16 GB GPU: batch b peaks at b GB, batch > 13 raises OOM;
    data wait 20 % with 0 loader workers, 3 % with 1 or more; one step 0.5 s."""

    def __init__(self, val_image):
        self.cuda, self.device = True, "cuda:0"
        self.cfg = {"patch_size": [128] * 3, "batch_size": 2, "num_workers": 0, "prefetch": 2, "device": "cuda:0",
                    "amp": True, "epochs": 300, "iterations_per_epoch": 250, "val_interval": 10,
                    "val_max_volumes": 1, "max_levels": 6, "topology_every_n": 10}
        self.val_entries = [{"id": "v", "image": str(val_image)}]
        self.tuning_volumes, self.total_volumes, self.determinism = 4, 806, []
        self.calls = []

    def time_left(self):
        return 1000.0

    def trial(self, kind, batch_size, num_workers, prefetch, warmup, steps, host_memory=False, after=None):
        self.calls.append((kind, batch_size, num_workers, prefetch))
        rec = {"kind": kind, "batch_size": batch_size, "num_workers": num_workers, "prefetch": prefetch,
               "oom": batch_size > 13, "wall_s": 1.0, "steps": steps}
        if rec["oom"]:
            return {**rec, "note": "out of memory", "peak_gpu_bytes": 16 * 2**30, "step_s": None}
        rec.update(peak_gpu_bytes=batch_size * 2**30, step_s=0.5, data_wait_fraction=0.2 if num_workers == 0 else 0.03,
                   parts={"forward": 0.1})
        if after is not None:
            after(None, None, rec)
        return rec

    def val_forward_s(self, parser, trainer, rec):
        rec.update(val_forward_s=0.1, val_roi=[128] * 3, val_sw_batch_size=2, val_overlap=0.5)


def test_cuda_procedure_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    """The CUDA path end to end (search, loader choice, report, JSON) against FakeCudaTuner: no GPU needed."""
    import types

    import numpy as np
    import tifffile

    from custom_components.training import autotune

    image = tmp_path / "v.tif"
    tifffile.imwrite(image, np.zeros((320, 320, 320), np.uint8), photometric="minisblack", compression="zlib")
    fake = FakeCudaTuner(image)
    monkeypatch.setattr(autotune, "_Tuner", lambda *a, **k: fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=16 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU")
    monkeypatch.setattr(autotune.os, "cpu_count", lambda: 2)
    out = tmp_path / "tune.json"
    assert main(["--config_file", TRAIN_JSON, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["mode"] == "cuda" and not r["estimated"] and "MEASURED (CUDA" in text
    # 13 GB <= 90 % of 16 GB fits, 14 raises OOM: batch 13 after 1, 2, 4, 8, 16, 12, 14, 13
    batches = [c[1] for c in fake.calls if c[0] == "batch"]
    assert batches == [1, 2, 4, 8, 16, 12, 14, 13]
    assert r["recommended"] == {"batch_size": 13, "num_workers": 1, "prefetch": 2}
    assert [c[2:] for c in fake.calls if c[0] == "loader"] == [(0, 2), (0, 4), (1, 2)]  # stops at the first under 5 %
    assert "--batch_size 13 --num_workers 1 --prefetch 2" in text
    # 0.5 s x 250 x 300 = 37500 s; validation: 64 windows / 2 per forward x 0.1 s = 3.2 s, 30 times = 96 s
    e = r["expected"]
    assert e["train_s"] == pytest.approx(37500.0) and e["val_s"] == pytest.approx(3.2)
    assert e["total_s"] == pytest.approx(37596.0)
    assert "data wait measured on 4 of 806" in text


def test_cuda_search_cut_by_time_says_so_not_does_not_fit(tmp_path, monkeypatch, capsys):
    """A batch search stopped by --max_minutes before any batch failed reports the cut, never "does not fit"."""
    import types

    import numpy as np
    import tifffile

    from custom_components.training import autotune

    image = tmp_path / "v.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 64), np.uint8), photometric="minisblack", compression="zlib")
    fake = FakeCudaTuner(image)
    fake.cfg["batch_size"] = 8
    # 1000 s left at the start: the batch search may use half; batches 1, 2, 4 run, then only 100 s are left
    ticks = iter([1000.0, 900.0, 900.0] + [100.0] * 100)
    fake.time_left = lambda: next(ticks)
    monkeypatch.setattr(autotune, "_Tuner", lambda *a, **k: fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=16 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU")
    monkeypatch.setattr(autotune.os, "cpu_count", lambda: 2)
    out = tmp_path / "tune.json"
    assert main(["--config_file", TRAIN_JSON, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert [c[1] for c in fake.calls if c[0] == "batch"] == [1, 2, 4]
    assert r["recommended"]["batch_size"] == 4 and r["memory"]["search_cut_by_time"] is True
    assert "ran out of --max_minutes" in r["memory"]["summary"] and "does not fit" not in text
    assert any("the largest batch is not known: only up to 4" in n for n in r["notes"])


def test_peak_rss_is_the_getrusage_peak():
    """``_peak_rss_bytes`` is ``ru_maxrss`` in bytes: an array 64 MiB larger than the peak so far (importing torch
    peaks above what stays resident) raises it by at least 64 MiB, and freeing the array does not lower it."""
    import subprocess
    import sys

    code = ("import numpy as np; from custom_components.training.autotune import _peak_rss_bytes as peak; "
            "before = peak(); a = np.ones(before + 64 * 2**20, np.uint8); during = peak(); del a; "
            "print(before, during, peak())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, during, after = map(int, out.stdout.split())
    assert during - before >= 64 * 2**20  # the touched array is resident
    assert after == during  # a peak: freeing does not lower it


def test_saved_bytes_count_each_storage_once():
    """``x * x`` saves ``x`` twice (one storage, 4000 bytes) and ``exp`` its output (4000 bytes): 8000, on the CPU
    (by storage) and on the meta device (by tensor)."""
    from custom_components.training.autotune import _SavedBytes

    for device in ("cpu", "meta"):
        saved = _SavedBytes()
        x = torch.ones(1000, device=device, requires_grad=True)
        with saved.hooks():
            (x * x).exp()
        assert saved.step_bytes == 8000
        saved.reset()
        assert (saved.peak, saved.step_bytes) == (8000, 0)


def test_cpu_memory_per_sample_by_hand():
    """Batch 1 peaks at 1000 MiB (40 MiB saved), batch 2 at 1100 MiB (80 MiB saved): the RSS slope (100 MiB) is the
    largest, batch 0 is at 900 MiB, batch 2 at 1100 MiB, and (2000 - 900) / 100 = 11 samples fit in 2000 MiB."""
    from custom_components.training.autotune import _cpu_memory, _extrapolated

    mib = 2**20
    one = {"batch_size": 1, "peak_rss_bytes": 1000 * mib, "saved_bytes": 40 * mib, "step_s": 1.0}
    two = {"batch_size": 2, "peak_rss_bytes": 1100 * mib, "saved_bytes": 80 * mib, "step_s": 1.5}
    m = _cpu_memory([one, two], batch=2, limit=2000 * mib, meta_saved=10 * mib)
    assert m == {"per_sample_bytes": 100 * mib, "predicted_at_configured_bytes": 1100 * mib,
                 "largest_batch_estimate": 11}
    # batch 1 alone: its saved bytes per sample (or the meta estimate's when it has none)
    assert _cpu_memory([one], batch=2, limit=2000 * mib, meta_saved=10 * mib)["predicted_at_configured_bytes"] == 1040 * mib
    assert _cpu_memory([{**one, "saved_bytes": None}], 2, 2000 * mib, 10 * mib)["per_sample_bytes"] == 10 * mib
    # step time on the line through (1, 1.0 s) and (2, 1.5 s): 2.5 s at batch 4; batch 1 alone: 4 x 1.0 s
    assert _extrapolated([one, two], 4)["step_s"] == pytest.approx(2.5)
    assert _extrapolated([one], 4)["step_s"] == pytest.approx(4.0)
    assert _extrapolated([one], 4)["reason"] == "loader not tuned; step time extrapolated to batch 4"


def test_root_error_finds_the_config_error_monai_wrapped():
    from custom_components.training.autotune import _root_error

    try:
        try:
            raise ValueError("patch_size [30, 32, 32] cannot be taken by the network")
        except ValueError as inner:
            raise RuntimeError("Failed to instantiate") from inner
    except RuntimeError as e:
        assert str(_root_error(e)) == "patch_size [30, 32, 32] cannot be taken by the network"
    assert _root_error(KeyError("not a config error")) is None


@pytest.mark.slow
def test_trial_times_only_the_steps_after_the_warmup(data_dir, tmp_path):
    """A trial runs ``warmup`` steps, then ``steps`` measured ones on the same loader: 1 + 2 iterations in all, the
    figures (from ``ThroughputHandler`` and the trainer's ``step_timer``) over the last 2."""
    from custom_components.training import autotune

    o = tiny_overrides(data_dir, tmp_path / "run", datalist="")
    tuner = autotune._Tuner([TRAIN_JSON, DEMO_JSON], o, deadline=time.time() + 60, volumes=2)
    seen = {}
    rec = tuner.trial("loader", 2, 0, 2, warmup=1, steps=2, host_memory=True,
                      after=lambda parser, trainer, r: seen.update(iteration=trainer.state.iteration))
    assert not rec["oom"] and rec["steps"] == 2 and seen["iteration"] == 3
    assert rec["step_s"] > 0 and 0 <= rec["data_wait_fraction"] < 1
    assert set(rec["parts"]) == {"augment", "forward", "loss", "backward", "optimizer"}
    assert rec["saved_bytes"] > 0 and rec["peak_rss_bytes"] >= rec["rss_before_bytes"]
    # topology_every_n 2: iterations 1 and 3 compute the topology term, and 3 is among the measured
    assert rec["topology_in_measured"] is True
