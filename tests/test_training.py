"""The training bundle end to end on tiny synthetic data: properties, a run, CLI, exact resume, DDP."""

import ast
import glob
import json
import os
import re
import subprocess

import pytest
import torch
from monai.bundle import ConfigWorkflow

from training_utils import MULTI_JSON, PYTHON, REPO, TRAIN_JSON, cli_args, make_data, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _workflow(**overrides):
    return ConfigWorkflow(workflow_type="train", config_file=TRAIN_JSON, **overrides)


def _train(overrides, stop_after_epoch=None):
    wf = _workflow(**overrides)
    wf.initialize()
    if stop_after_epoch:  # a stop, as a kill would do, with the schedule of the whole run
        from ignite.engine import Events

        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda e: e.terminate())
    wf.run()
    net = wf.parser.get_parsed_content("network")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    wf.finalize()
    return wf, state


def test_check_properties(data_dir, tmp_path):
    wf = _workflow(**tiny_overrides(data_dir, tmp_path / "run"))
    wf.initialize()
    assert wf.check_properties() == []


def test_run_writes_loadable_checkpoints_logs_and_terms(data_dir, tmp_path):
    out = tmp_path / "run"
    wf, state = _train(tiny_overrides(data_dir, out))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 6
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / "checkpoints" / name, weights_only=True)
        assert set(ckpt) >= {"network", "optimizer", "lr_scheduler", "trainer", "meta"}
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["meta"]["epoch"] == 2 and last["meta"]["iteration"] == 6
    assert all(torch.equal(last["network"][k], state[k]) for k in state)
    metrics = trainer.state.metrics
    assert {"loss/bce", "loss/dice", "loss/cldice", "lr", "throughput/samples_per_s", "throughput/data_wait"} <= set(metrics)
    assert "val_score" in wf.parser.get_parsed_content("validate#evaluator").state.metrics
    log = (out / "train.log").read_text()
    assert "saved checkpoint" in log and "samples/s" in log
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))


def test_refuses_to_clobber_and_resume_is_exact(data_dir, tmp_path):
    straight = tmp_path / "straight"
    _, w_straight = _train(tiny_overrides(data_dir, straight, val_interval=5))
    part = tmp_path / "part"
    _, w_epoch1 = _train(tiny_overrides(data_dir, part, val_interval=5), stop_after_epoch=1)
    with pytest.raises(Exception) as e:
        _workflow(**tiny_overrides(data_dir, part, val_interval=5)).initialize()
    assert "already holds checkpoints" in str(e.value.__cause__ or e.value)  # MONAI wraps it in a RuntimeError
    wf, w_resumed = _train(tiny_overrides(data_dir, part, resume=True, val_interval=5))
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    assert all(torch.equal(w_resumed[k], w_straight[k]) for k in w_straight)
    assert any(not torch.equal(w_resumed[k], w_epoch1[k]) for k in w_epoch1)


def test_cli_from_repo_root_and_bundle_dir(data_dir, tmp_path):
    o = tiny_overrides(data_dir, tmp_path / "cli", epochs=1, iterations_per_epoch=2, val_interval=5)
    r = subprocess.run([PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json", *cli_args(o)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "cli" / "checkpoints" / "last.pt").is_file()
    o["output_dir"] = str(tmp_path / "cli2")
    r = subprocess.run([PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *cli_args(o)],
                       cwd=os.path.join(REPO, "bundle"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_torchrun_gloo_two_ranks(data_dir, tmp_path):
    out = tmp_path / "ddp"
    o = tiny_overrides(data_dir, out, epochs=1, iterations_per_epoch=2, val_interval=1, val_fraction=0.5, val_max_volumes=2)
    cfg = json.dumps([TRAIN_JSON, MULTI_JSON])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "monai.bundle", "run", "training",
                        "--config_file", cfg, *cli_args(o)], cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    shards = {}
    for rank, world, ids in re.findall(r"\[rank (\d+)/(\d+)\] training volumes: (\[[^\]]*\])", text):
        assert world == "2"
        shards[int(rank)] = set(ast.literal_eval(ids))
    assert set(shards) == {0, 1}
    assert shards[0] and shards[1] and not (shards[0] & shards[1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) in (["last.pt"], ["best.pt", "last.pt"])
    assert (out / "train.log").is_file()
    log = (out / "train.log").read_text()
    assert log.count("samples/s") == 1  # one epoch, logged by rank 0 only
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(out)) & {"cache", "checkpoints", "models", "tensorboard", "train.log"})
    assert sorted(os.listdir(out / "models")) == ["model.pt", "network.json"]  # rank 0 only wrote it


def test_torchrun_two_ranks_one_validation_volume_scores_as_one_process(data_dir, tmp_path):
    """Fewer validation volumes than ranks: rank 1 validates a weight-0 copy, the score is rank 0's volume's."""
    out = tmp_path / "ddp1"
    o = tiny_overrides(data_dir, out, epochs=1, iterations_per_epoch=2, val_interval=1, val_fraction=0.5, val_max_volumes=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518", "-m", "monai.bundle",
                        "run", "training", "--config_file", json.dumps([TRAIN_JSON, MULTI_JSON]), *cli_args(o)],
                       cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    ddp_score = best["meta"]["best_metric"]
    assert 0 < ddp_score <= 1

    single = tiny_overrides(data_dir, tmp_path / "single", epochs=1, iterations_per_epoch=2, val_interval=1, val_fraction=0.5,
                            val_max_volumes=1)
    wf = _workflow(**single)
    wf.initialize()
    wf.parser.get_parsed_content("network").load_state_dict(best["network"])
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert len(wf.parser.get_parsed_content("validate#records")) == 1
    evaluator.run()
    assert evaluator.state.metrics["val_score"] == pytest.approx(ddp_score, abs=1e-6)


def test_val_records_share_volumes_and_pad_with_weight_zero():
    from custom_components.training.workflow import val_records

    prepared = [{"id": str(i), "cache": f"/c/{i}"} for i in range(3)]
    assert [(r["id"], r["weight"]) for r in val_records(prepared)] == [("0", 1.0), ("1", 1.0), ("2", 1.0)]
    assert [r["id"] for r in val_records(prepared, 2, rank=1, world_size=2)] == ["1"]
    assert [r["id"] for r in val_records(prepared, None, rank=0, world_size=2)] == ["0", "2"]
    # 8 ranks, 3 volumes: ranks 3..7 validate a weight-0 copy of volume rank % 3
    padded = [val_records(prepared, None, rank=r, world_size=8) for r in range(8)]
    assert [(p[0]["id"], p[0]["weight"]) for p in padded[3:]] == [("0", 0.0), ("1", 0.0), ("2", 0.0), ("0", 0.0), ("1", 0.0)]
    assert sum(r["weight"] for p in padded for r in p) == 3
    with pytest.raises(ValueError, match="rank 2 is not in"):
        val_records(prepared, rank=2, world_size=2)


def test_fold_all_trains_on_every_volume_and_never_builds_validation(data_dir, tmp_path):
    from monai.handlers import ValidationHandler

    out = tmp_path / "all"
    wf, _ = _train(tiny_overrides(data_dir, out, epochs=1, iterations_per_epoch=2, fold="all", val_fraction=0.25))
    pre = wf.parser.get_parsed_content("preflight")
    assert pre["val"] == [] and len(pre["train"]) == 4  # the fixture's 4 training volumes, none held out
    assert wf.parser.get_parsed_content("validate#dataloader") is None
    assert wf.parser.get_parsed_content("validate#evaluator") is None
    trainer = wf.parser.get_parsed_content("train#trainer")
    handlers = wf.parser.get_parsed_content("train#handlers")
    assert not any(isinstance(h, ValidationHandler) for h in handlers)
    assert trainer.state.epoch == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt"]  # no validation, so no best.pt
    model = torch.load(out / "models" / "model.pt", weights_only=True)
    assert model["meta"]["source"] == "last.pt"


def test_init_from_loads_weights_only_and_names_mismatched_keys(data_dir, tmp_path):
    from custom_components.training.checkpoint import CheckpointMismatchError

    first = tmp_path / "first"
    _train(tiny_overrides(data_dir, first, epochs=1, iterations_per_epoch=2, val_interval=5))
    source = torch.load(first / "models" / "model.pt", weights_only=True)["network"]
    # fine-tuning at another patch with the same network: weights taken, epoch and optimiser start afresh
    wf = _workflow(**tiny_overrides(data_dir, tmp_path / "tuned", patch_size=[24, 24, 24], epochs=1,
                                    iterations_per_epoch=1, init_from=str(first / "models" / "model.pt")))
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    net = wf.parser.get_parsed_content("network")
    assert all(torch.equal(net.state_dict()[k], source[k]) for k in source)
    assert trainer.state.epoch == 0 and wf.parser.get_parsed_content("optimizer").state == {}
    # another network: the mismatched keys are named before any step
    wf = _workflow(**tiny_overrides(data_dir, tmp_path / "bad", filters=[4, 8, 32], init_from=str(first / "models" / "model.pt")))
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#trainer")
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(x, CheckpointMismatchError) and "shape mismatches" in str(x) and "[32" in str(x) for x in chain)


def test_ema_weights_resume_exactly_validate_and_become_model_pt(data_dir, tmp_path):
    o = dict(val_interval=1, ema_decay=0.9)
    straight, part = tmp_path / "ema_straight", tmp_path / "ema_part"
    wf, _ = _train(tiny_overrides(data_dir, straight, **o))
    ema = wf.parser.get_parsed_content("ema")
    assert int(ema.n_averaged) == 6  # 2 epochs x 3 steps, every step averaged in
    assert wf.parser.get_parsed_content("validate#evaluator").network is ema.module  # validation on the EMA weights
    ema_straight = {k: v.clone() for k, v in ema.state_dict().items()}
    _train(tiny_overrides(data_dir, part, **o), stop_after_epoch=1)
    wf, _ = _train(tiny_overrides(data_dir, part, resume=True, **o))
    resumed = wf.parser.get_parsed_content("ema").state_dict()
    assert set(resumed) == set(ema_straight) and all(torch.equal(resumed[k], ema_straight[k]) for k in resumed)
    model = torch.load(straight / "models" / "model.pt", weights_only=True)
    best = torch.load(straight / "checkpoints" / model["meta"]["source"], weights_only=True)
    assert model["meta"]["weights"] == "ema"
    assert all(torch.equal(model["network"][k], best["ema"]["module." + k]) for k in model["network"])


def test_ema_update_by_hand():
    from custom_components.training.ema import build_ema

    net = torch.nn.Linear(2, 1)
    ema = build_ema(net, 0.9)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
            net.bias.fill_(-value)
        ema.update_parameters(net)
    # first update copies (1), then 0.9 * 1 + 0.1 * 2 = 1.1, then 0.9 * 1.1 + 0.1 * 3 = 1.29
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.29)) and torch.allclose(ema.module.bias, torch.tensor([-1.29]))
    assert int(ema.n_averaged) == 3 and ema.n_averaged.device.type == "cpu"
    assert build_ema(net, 0.0) is None
    with pytest.raises(ValueError, match="ema_decay"):
        build_ema(net, 1.0)
