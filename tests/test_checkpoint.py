"""Atomic checkpoint writes, safe loading, readable mismatch errors, output-folder protection."""

import builtins

import pytest
import torch

from custom_components.training.checkpoint import (
    CheckpointMismatchError,
    atomic_torch_save,
    check_output_dir,
    load_checkpoint,
    load_network_weights,
)


class NotAllowed:
    """Any class: unpickling it would run code, which weights_only refuses."""


def test_atomic_save_roundtrip(tmp_path):
    path = tmp_path / "sub" / "last.pt"  # parent created: the earlier trainer crashed on exactly that
    atomic_torch_save({"w": torch.arange(5)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_failed_write_keeps_previous_and_names_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.tensor(1)}, path)
    real_open = builtins.open

    class FullDisk:
        """A file that accepts 100 bytes, then fails like a full disk."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(p, mode="r", *a, **k):
        f = real_open(p, mode, *a, **k)
        return FullDisk(f) if "w" in mode and ".tmp" in str(p) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(OSError, match="last.pt.*previous file is intact"):
        atomic_torch_save({"v": torch.randn(10000)}, path)
    monkeypatch.setattr(builtins, "open", real_open)
    assert int(load_checkpoint(path)["v"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": NotAllowed()}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_mismatch_names_keys_and_shapes():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 1, 1))
    other = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3))
    with pytest.raises(CheckpointMismatchError) as e:
        load_network_weights(net, other.state_dict())
    msg = str(e.value)
    assert "missing keys: 1.bias, 1.weight" in msg
    assert "0.weight: checkpoint [8, 1, 3, 3, 3] vs network [4, 1, 3, 3, 3]" in msg


def test_ddp_prefix_accepted():
    net = torch.nn.Conv3d(1, 2, 1)
    state = {f"module.{k}": v + 1 for k, v in net.state_dict().items()}
    load_network_weights(net, state)
    assert torch.equal(net.bias, state["module.bias"])


def test_output_dir_not_clobbered(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    atomic_torch_save({}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=true.*overwrite=true"):
        check_output_dir(tmp_path)
    assert check_output_dir(tmp_path, resume=True).endswith("last.pt")
    assert check_output_dir(tmp_path, overwrite=True) == ""
    assert check_output_dir(tmp_path / "fresh") == ""


def test_ema_checkpoint_loads_its_averaged_weights_for_inference_and_init_from(tmp_path):
    """A ``best.pt`` of a run with ``ema_decay`` > 0 holds the raw weights under "network" and the averaged
    ones under "ema" (AveragedModel's keys: "module." prefix and "n_averaged"): inference and ``--init_from``
    take the averaged ones, as ``model.pt`` does."""
    from custom_components.inference.sliding_window import load_networks
    from custom_components.training.checkpoint import NetworkInitializer

    net = torch.nn.Conv3d(1, 1, 1)
    raw = {"weight": torch.full((1, 1, 1, 1, 1), 1.0), "bias": torch.tensor([1.0])}
    ema = {"module.weight": torch.full((1, 1, 1, 1, 1), 2.0), "module.bias": torch.tensor([2.0]), "n_averaged": torch.tensor(5)}
    atomic_torch_save({"network": raw, "ema": ema}, tmp_path / "best.pt")
    atomic_torch_save({"network": raw}, tmp_path / "plain.pt")
    (loaded,) = load_networks(net, str(tmp_path / "best.pt"))
    assert loaded.weight.item() == 2.0 and loaded.bias.item() == 2.0
    (plain,) = load_networks(net, str(tmp_path / "plain.pt"))
    assert plain.weight.item() == 1.0 and plain.bias.item() == 1.0
    NetworkInitializer(str(tmp_path / "best.pt"), net)
    assert net.weight.item() == 2.0 and net.bias.item() == 2.0
