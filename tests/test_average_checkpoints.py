"""Checkpoint averaging: hand-made state dicts, the same-network check, the CLI."""

from __future__ import annotations

import subprocess

import pytest
import torch

from custom_components.training.average_checkpoints import average_checkpoints, average_state_dicts
from training_utils import PYTHON, REPO, save_checkpoint_as_training, tiny_network


def test_weighted_mean_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(7)}
    assert torch.equal(average_state_dicts([a, b])["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(average_state_dicts([a, b], weights=[3, 1])["w"], torch.tensor([1.5, 3.0]))  # (3a + b) / 4
    assert int(average_state_dicts([a, b])["steps"]) == 7
    with pytest.raises(ValueError, match="shape at w"):
        average_state_dicts([a, {"w": torch.zeros(3), "steps": torch.tensor(7)}], names=["A.pt", "B.pt"])
    with pytest.raises(ValueError, match="integer tensor steps"):
        average_state_dicts([a, {"w": torch.zeros(2), "steps": torch.tensor(8)}])


def test_checkpoints_of_one_network_average_and_others_are_named(tmp_path):
    one = save_checkpoint_as_training(tiny_network(seed=0), tmp_path / "one")
    two = save_checkpoint_as_training(tiny_network(seed=1), tmp_path / "two")
    out = tmp_path / "avg" / "model.pt"
    average_checkpoints([one, two], str(out))
    avg = torch.load(out, weights_only=True)
    w1, w2 = (torch.load(p, weights_only=True)["network"] for p in (one, two))
    assert all(torch.allclose(avg["network"][k], (w1[k] + w2[k]) / 2) for k in w1 if w1[k].is_floating_point())
    assert avg["meta"]["network"]["filters"] == [4, 8, 16] and (out.parent / "network.json").is_file()
    other = save_checkpoint_as_training(tiny_network({"patch_size": [16, 16, 16], "filters": [4, 8, 32], "deep_supr_num": 1}),
                                        tmp_path / "other")
    r = subprocess.run([PYTHON, "-m", "custom_components.training.average_checkpoints", one, other, "--out",
                        str(tmp_path / "bad.pt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not the same network" in r.stderr and "filters" in r.stderr
    assert not (tmp_path / "bad.pt").exists()
