"""inference.json / evaluate.json end to end, checkpoint ensembles, TTA, OOM fallback, TorchScript export."""

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow

from custom_components.inference.sliding_window import ProbabilityEnsemble, RobustSlidingWindowInferer, parse_ckpt_paths
from custom_components.training.network import build_dynunet
from training_utils import INFER_JSON, PYTHON, REPO, TRAIN_JSON, make_data, tiny_overrides

EVAL_JSON = os.path.join(REPO, "bundle", "configs", "evaluate.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf")
    data = make_data(root / "data", volumes=3)
    wf = ConfigWorkflow(workflow_type="train", config_file=TRAIN_JSON,
                        **tiny_overrides(data, root / "run", epochs=1, iterations_per_epoch=2, val_interval=5))
    wf.initialize()
    wf.run()
    return root, data, str(root / "run" / "checkpoints" / "last.pt")


def _infer(config, **over):
    wf = ConfigWorkflow(workflow_type="infer", config_file=config, **over)
    wf.initialize()
    wf.run()
    return wf


def test_inference_writes_one_tif_per_input_and_zip(trained, tmp_path):
    root, data, ckpt = trained
    out = tmp_path / "pred"
    _infer(INFER_JSON, dataset_dir=data, output_dir=str(out), ckpt_path=ckpt,
           device="cpu", amp=False, sw_batch_size=4, overlap=0.25)  # no network setting: the checkpoint has them
    inputs = sorted(os.listdir(os.path.join(data, "test_images")))
    assert sorted(p for p in os.listdir(out) if p.endswith(".tif")) == inputs
    for name in inputs:
        pred = tifffile.imread(out / name)
        assert pred.dtype == np.uint8 and pred.shape == tifffile.imread(os.path.join(data, "test_images", name)).shape
        assert set(np.unique(pred)) <= {0, 1}
    with zipfile.ZipFile(out / "submission.zip") as z:
        assert sorted(z.namelist()) == inputs


def test_evaluate_json_scores_with_and_without_postprocessing(trained, tmp_path):
    root, data, ckpt = trained
    out = tmp_path / "eval"
    _infer([INFER_JSON, EVAL_JSON], input_dir=os.path.join(data, "test_images"), label_dir=os.path.join(data, "test_labels"),
           output_dir=str(out), ckpt_path=ckpt, device="cpu", amp=False, metric_workers=1)
    text = (out / "scores.csv").read_text()
    assert "raw" in text and "post" in text
    assert len(os.listdir(out / "raw")) == len(os.listdir(out / "postprocessed")) == 1


def test_postprocess_file_is_applied_exactly_and_logits_are_kept(trained, tmp_path):
    """--postprocess FILE: the file's pipeline and nothing else (a threshold of 1.1 leaves every mask empty
    whatever the other settings say); the run folder ends with the postprocess.json it applied; with
    --save_logits true the float16 logits sit beside the masks, their sigmoid the probabilities."""
    from custom_components.inference.postprocess import load_postprocess

    root, data, ckpt = trained
    pipeline = tmp_path / "postprocess.json"
    pipeline.write_text(json.dumps({"steps": [{"name": "binarize", "threshold": 1.1}]}))
    out = tmp_path / "pred"
    _infer(INFER_JSON, input_dir=os.path.join(data, "test_images"), output_dir=str(out), ckpt_path=ckpt,
           device="cpu", amp=False, postprocess=str(pipeline), save_logits=True, threshold=0.0)
    masks = [tifffile.imread(out / n) for n in os.listdir(out) if n.endswith(".tif")]
    assert masks and all(m.max() == 0 for m in masks)
    written = json.loads((out / "postprocess.json").read_text())
    assert [s["name"] for s in written["steps"]] == ["binarize"] and written["steps"][0]["threshold"] == 1.1
    assert load_postprocess(str(out / "postprocess.json")) is not None  # loads back
    logits = [np.load(out / "logits" / n) for n in os.listdir(out / "logits")]
    assert logits and all(x.dtype == np.float16 and x.shape == masks[0].shape for x in logits)


def test_postprocess_file_naming_an_unknown_step_fails_at_load(trained, tmp_path):
    root, data, ckpt = trained
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": [{"name": "binarize", "threshold": 0.5}, {"name": "sharpen"}]}))
    with pytest.raises(Exception) as info:
        _infer(INFER_JSON, input_dir=os.path.join(data, "test_images"), output_dir=str(tmp_path / "p"), ckpt_path=ckpt,
               device="cpu", amp=False, postprocess=str(bad))
    chain, e = [], info.value
    while e is not None:  # MONAI wraps the loader's error; the cause names the step and the file
        chain.append(str(e))
        e = e.__cause__
    assert any("sharpen" in m and "bad.json" in m for m in chain), chain
    assert not (tmp_path / "p").exists() or not any(n.endswith(".tif") for n in os.listdir(tmp_path / "p"))


def test_model_pt_holds_the_weights_of_best_and_builds_from_its_own_spec(trained):
    from custom_components.training.network import build_network

    root, data, ckpt = trained
    models = root / "run" / "models"
    assert sorted(os.listdir(models)) == ["model.pt", "network.json"]  # no temporary file left behind
    model = torch.load(models / "model.pt", weights_only=True)
    spec = model["meta"]["network"]
    assert spec == {"kind": "dynunet", "patch_size": [16, 16, 16], "filters": [4, 8, 16], "deep_supervision": True,
                    "deep_supr_num": 1, "max_levels": 6}
    assert json.loads((models / "network.json").read_text()) == {"network_spec": spec}
    source = "best.pt" if (root / "run" / "checkpoints" / "best.pt").exists() else "last.pt"
    assert model["meta"]["source"] == source and set(model) == {"network", "meta"}  # weights alone, no optimiser
    best = torch.load(root / "run" / "checkpoints" / source, weights_only=True)["network"]
    net = build_network(**spec)
    net.load_state_dict(model["network"])
    assert all(torch.equal(net.state_dict()[k], best[k]) for k in best)


def test_a_setting_that_contradicts_the_checkpoint_fails_before_any_volume(trained, tmp_path):
    root, data, ckpt = trained
    out = tmp_path / "pred"
    with pytest.raises(Exception) as info:
        _infer(INFER_JSON, dataset_dir=data, output_dir=str(out), ckpt_path=ckpt, device="cpu", amp=False,
               filters=[8, 16, 32])
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("--filters [8, 16, 32]" in m and "filters=[4, 8, 16]" in m for m in chain), chain
    assert not out.exists()  # failed in initialize, before the output folder or any volume
    # the same value as the checkpoint is fine
    _infer(INFER_JSON, dataset_dir=data, output_dir=str(out), ckpt_path=ckpt, device="cpu", amp=False,
           filters=[4, 8, 16], patch_size=[16, 16, 16])
    assert any(n.endswith(".tif") for n in os.listdir(out))


def test_probability_ensemble_is_the_sigmoid_of_fused_logits():
    torch.manual_seed(0)
    a, b = torch.nn.Conv3d(1, 1, 3, padding=1), torch.nn.Conv3d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 6, 6, 6)
    both = ProbabilityEnsemble([a, b])(x)
    assert torch.allclose(both, torch.sigmoid((a(x) + b(x)) / 2), atol=1e-6)
    flip = ProbabilityEnsemble([a], tta_flips=2)(x)  # identity and a flip of the last axis, logits averaged
    manual = torch.sigmoid((a(x) + torch.flip(a(torch.flip(x, (2,))), (2,))) / 2)
    assert torch.allclose(flip, manual, atol=1e-6)
    with pytest.raises(ValueError, match="tta_flips must be in 1..8"):
        ProbabilityEnsemble([a], tta_flips=9)


def test_oom_halves_window_batch(monkeypatch):
    calls = []

    def net(x):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return x

    inferer = RobustSlidingWindowInferer(roi_size=(4, 4, 4), sw_batch_size=4, overlap=0)
    out = inferer(torch.ones(1, 1, 8, 8, 8), net)
    assert out.shape == (1, 1, 8, 8, 8) and inferer.sw_batch_size == 1 and 4 in calls and 2 in calls


def test_ckpt_paths_parsed_and_checked(tmp_path):
    p = tmp_path / "a.pt"
    p.write_bytes(b"")
    assert parse_ckpt_paths(f"{p}, {p}") == [str(p), str(p)]
    with pytest.raises(ValueError, match="not found: .*missing.pt"):
        parse_ckpt_paths(str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_torchscript_export_loads_in_inference_with_equal_output(trained, tmp_path):
    """Exported from the run's model.pt with no network setting repeated: the spec comes from the run's
    network.json (written beside model.pt), travels inside model.ts, and inference reads it back from there."""
    root, data, ckpt = trained
    model_pt, network_json = root / "run" / "models" / "model.pt", root / "run" / "models" / "network.json"
    ts = tmp_path / "model.ts"
    configs = json.dumps([INFER_JSON, str(network_json)])
    cmd = [PYTHON, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(model_pt),
           "--key_in_ckpt", "network", "--meta_file", os.path.join(REPO, "bundle", "configs", "metadata.json"),
           "--config_file", configs, "--use_trace", "True", "--input_shape", "[1, 1, 16, 16, 16]"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    net = build_dynunet([16, 16, 16], filters=[4, 8, 16], deep_supr_num=1)
    net.load_state_dict(torch.load(model_pt, weights_only=True)["network"])
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    traced = torch.jit.load(str(ts))
    assert torch.allclose(traced(x), net(x), atol=1e-5)
    out_ckpt, out_ts = tmp_path / "p1", tmp_path / "p2"
    for out, path in ((out_ckpt, ckpt), (out_ts, str(ts))):
        _infer(INFER_JSON, dataset_dir=data, output_dir=str(out), ckpt_path=path, device="cpu", amp=False,
               min_component_size=0)
    for name in os.listdir(os.path.join(data, "test_images")):
        assert np.array_equal(tifffile.imread(out_ckpt / name), tifffile.imread(out_ts / name))




def test_two_checkpoints_of_other_window_sizes_fuse_in_inference_json(trained, tmp_path):
    """An ensemble of networks trained at 16^3 and 24^3: each runs its own sliding window (its own size), the
    logits are fused, the sigmoid taken once. Both members hold the same weights, so the fused logits stay
    close to that network's alone (they differ only by how the two window grids blend)."""
    from training_utils import save_checkpoint_as_training, tiny_network

    root, data, ckpt = trained
    model_pt = root / "run" / "models" / "model.pt"
    wider = tiny_network({"patch_size": [24, 24, 24], "filters": [4, 8, 16], "deep_supr_num": 1})
    wider.load_state_dict(torch.load(model_pt, weights_only=True)["network"])  # same weights, a 24^3 window
    ckpt24 = save_checkpoint_as_training(wider, tmp_path / "w24")
    runs = {}
    for name, paths in (("single16", str(model_pt)), ("pair", f"{model_pt},{ckpt24}")):
        out = tmp_path / name
        wf = _infer(INFER_JSON, dataset_dir=data, output_dir=str(out), ckpt_path=paths, device="cpu", amp=False,
                    min_component_size=0, save_logits=True)
        runs[name] = out
    assert [s["patch_size"] for s in wf.parser.get_parsed_content("network_specs")] == [[16, 16, 16], [24, 24, 24]]
    assert [list(i.roi_size) for i in wf.parser.get_parsed_content("inferer").inferers] == [[16, 16, 16], [24, 24, 24]]
    for name in os.listdir(runs["pair"] / "logits"):
        single = np.load(runs["single16"] / "logits" / name).astype(np.float32)
        pair = np.load(runs["pair"] / "logits" / name).astype(np.float32)
        assert pair.shape == single.shape and np.isfinite(pair).all()
        assert 0 < np.abs(pair - single).max() < 4  # the 24^3 windows blend differently: close, not equal
