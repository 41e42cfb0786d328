"""A training step of train.json's defaults reads the device at most once (the trainer's guard).

Real steps on the CPU, built from train.json (default loss weights and handlers, tiny network), with every
way of reading a tensor on the host patched to count: ``Tensor.item``, ``__bool__``, ``__float__``,
``cpu``, ``tolist`` and ``torch.cuda.synchronize``. On a GPU each would stall the host until the device
drains its queue. Counted from ``ITERATION_STARTED`` (first handler) to ``ITERATION_COMPLETED`` (last
handler), so the device augmentation, the step and every per-iteration handler are inside.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from training_utils import TRAIN_JSON, make_data, tiny_overrides

READERS = ("item", "__bool__", "__float__", "cpu", "tolist")


class ReadCounter:
    """Counts host reads; ``where`` keeps a short stack of each for the failure message."""

    def __init__(self, monkeypatch):
        import traceback

        self.n, self.where = 0, []
        for name in READERS:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, _name=name, **k):
                self.n += 1
                self.where.append(f"{_name}: " + " <- ".join(
                    f"{f.name}@{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in traceback.extract_stack()[-6:-1][::-1]))
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

        def sync(*a, **k):
            self.n += 1
            self.where.append("torch.cuda.synchronize")

        monkeypatch.setattr(torch.cuda, "synchronize", sync)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("reads") / "data", volumes=4, shape=(32, 32, 32))


def test_counter_sees_each_kind_of_read(monkeypatch):
    counter = ReadCounter(monkeypatch)
    t = torch.ones(2)
    t[0].item(), bool(t[0]), float(t[0]), t.cpu(), t.tolist(), torch.cuda.synchronize()
    assert counter.n == 6


@pytest.mark.parametrize("ema_decay", [0.0, 0.999], ids=["ema_off", "ema_on"])
def test_a_training_step_reads_the_device_once(data_dir, tmp_path, monkeypatch, ema_decay):
    o = tiny_overrides(data_dir, tmp_path / "run", epochs=1, iterations_per_epoch=7, val_interval=5,
                       topology_every_n=3, ema_decay=ema_decay)
    o.pop("topology_downsample")
    wf = ConfigWorkflow(config_file=TRAIN_JSON, workflow_type="train", **o)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    topology = wf.parser.get_parsed_content("loss").terms["topology"]
    counter = ReadCounter(monkeypatch)
    per_step, starts, topo_steps = [], {}, set()

    def started(engine):
        starts["n"], starts["topo"] = counter.n, topology.computed_calls

    def completed(engine):
        per_step.append((engine.state.iteration, counter.n - starts["n"], counter.where[starts["n"]:]))
        if topology.computed_calls > starts["topo"]:
            topo_steps.add(engine.state.iteration)

    # train.json's handlers use no ITERATION_STARTED event; ``completed`` runs after every other handler
    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    trainer.run()
    assert len(per_step) == 7 and topo_steps == {1, 4, 7}
    for iteration, reads, where in per_step:
        if iteration in topo_steps:
            continue  # a topology step adds the copy of its pooled maps (and the matching's own work)
        assert reads == 1, f"iteration {iteration}: {reads} host reads:\n  " + "\n  ".join(where)
    assert isinstance(trainer.state.loss_value, float)
    assert {"loss/bce", "loss/topology", "throughput/augment", "throughput/forward"} <= set(trainer.state.metrics)
