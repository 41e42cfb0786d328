"""nnU-Net's residual-encoder U-Net in the bundle (bundle/configs/resenc.json): built from the config, its
deep-supervision list at falling resolution through the composite loss (targets pooled by hand here), the
explicit deep-supervision weights, and a ResEnc checkpoint through inference, TorchScript / ONNX export and
``verify_net_in_out``.

Skipped when dynamic-network-architectures is not installed (`make venv` installs it with --no-deps).
"""

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out

pytest.importorskip(
    "dynamic_network_architectures.architectures.unet",
    reason="dynamic-network-architectures is not installed: pip install --no-deps dynamic-network-architectures==0.4.4",
)

from custom_components.losses import CompositeTopologyLoss, MaskedBCEWithLogitsLoss  # noqa: E402
from custom_components.losses.composite import downsample_target  # noqa: E402
from custom_components.data.targets import medial_surface_tube, signed_distance_map  # noqa: E402
from custom_components.training.network import build_network, resenc_class  # noqa: E402
from training_utils import INFER_JSON, META_JSON, PYTHON, REPO, TRAIN_JSON, make_data, tiny_overrides  # noqa: E402

RESENC_JSON = os.path.join(REPO, "bundle", "configs", "resenc.json")
KAGGLE_RESENC_JSON = os.path.join(REPO, "bundle", "configs", "kaggle_resenc.json")
TINY = {"filters": [4, 8, 16], "blocks_per_stage": [1, 1, 1], "deep_supr_num": 1}


def _config(**over):
    parser = ConfigParser()
    parser.read_config([TRAIN_JSON, RESENC_JSON])
    for k, v in over.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize("patch, stages", [(32, 4), (64, 5)])
def test_resenc_builds_from_the_config_at_two_patch_sizes(patch, stages):
    torch.manual_seed(0)
    net = _config(patch_size=[patch] * 3, filters=[4, 8, 16, 32, 64]).get_parsed_content("network_def")
    assert isinstance(net, resenc_class())
    assert net.network_spec["kind"] == "resenc" and net.network_spec["patch_size"] == [patch] * 3
    assert len(net.encoder.stages) == stages  # stride 2 per stage down to 4 voxels: 32 -> 4 (4 stages), 64 -> 4 (5)
    assert [len(s.blocks) for s in net.encoder.stages] == [1, 3, 4, 6, 6][:stages]
    n_heads = min(3, stages - 2) + 1  # deep_supr_num 3, capped at stages - 2
    x = torch.rand(1, 1, patch, patch, patch)
    heads = net.train()(x)
    assert isinstance(heads, list) and [tuple(h.shape[2:]) for h in heads] == [(patch // 2**i,) * 3 for i in range(n_heads)]
    with torch.no_grad():
        main = net.eval()(x)
    assert isinstance(main, torch.Tensor) and main.shape == (1, 1, patch, patch, patch)
    # the heads never returned have no parameters (DDP refuses parameters without a gradient)
    assert sum(isinstance(m, torch.nn.Conv3d) for m in net.decoder.seg_layers) == n_heads


def test_resenc_m_at_128_is_the_9th_place_plan():
    """nnUNetResEncUNetMPlans.json, 3d_fullres (github.com/TingYi028/Kaggle-vesuvius-9th): 6 stages, strides
    1,2,2,2,2,2, features 32-320, blocks 1,3,4,6,6,6, one decoder convolution per stage."""
    net = _config(patch_size=[128] * 3).get_parsed_content("network_def")
    enc = net.encoder
    assert [list(s) for s in enc.strides] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert list(enc.output_channels) == [32, 64, 128, 256, 320, 320]
    assert [len(s.blocks) for s in enc.stages] == [1, 3, 4, 6, 6, 6]
    assert [len(s.convs) for s in net.decoder.stages] == [1] * 5
    # 102.3 M with all five seg layers (bench/gpu_vs_nnunet.py); two of them are not built here (deep_supr_num 3)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(102.35, abs=0.01)


def test_bad_resenc_settings_name_the_setting():
    with pytest.raises(ValueError, match=r"patch_size \[34, 32, 32\].*Nearest valid patch_size: \[32, 32, 32\]"):
        build_network("resenc", patch_size=[34, 32, 32], filters=[4, 8, 16, 32])
    with pytest.raises(ValueError, match=r"blocks_per_stage \[1, 3\] has 2 entries; patch_size \[32, 32, 32\] needs 4"):
        build_network("resenc", patch_size=[32] * 3, filters=[4, 8, 16, 32], blocks_per_stage=[1, 3])
    with pytest.raises(ValueError, match=r"filters \[4, 8\] has 2 entries"):
        build_network("resenc", patch_size=[32] * 3, filters=[4, 8])


def _sheet_label(size=32, batch=2):
    out = []
    for b in range(batch):
        lab = np.zeros((size,) * 3, np.uint8)
        lab[10 + b : 13 + b] = 1
        lab[:, :, :4] = 2
        out.append(np.stack([lab.astype(np.float32), signed_distance_map(lab, clip=8.0),
                             medial_surface_tube(lab).astype(np.float32)]))
    return torch.from_numpy(np.stack(out))


def test_resenc_deep_supervision_flows_through_the_composite_with_finite_gradients():
    torch.manual_seed(0)
    net = build_network("resenc", patch_size=[32] * 3, filters=[4, 8, 16, 32], deep_supr_num=2).train()
    loss = CompositeTopologyLoss({"bce": 1.0, "dice": 1.0, "cldice": 0.5, "skeleton_recall": 0.5, "surface_distance": 0.1,
                                  "topology": 0.05}, topology_every_n=1, topology_downsample=2, surface_clip=8.0)
    heads = net(torch.rand(2, 1, 32, 32, 32))
    assert [h.shape[-1] for h in heads] == [32, 16, 8]
    value = loss(heads, _sheet_label())
    value.backward()
    assert torch.isfinite(value) and set(loss.last_terms) == set(loss.weights)
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    for s in (0, 1, 2):  # every head's 1x1 convolution learns from its own pooled target
        assert net.decoder.seg_layers[s].weight.grad.abs().sum() > 0


def test_downsample_target_by_hand():
    """4^3 -> 2^3 (factor 2): label 1 if any voxel of the block is 1, else 2 if any is 2, else 0; signed
    distance: the block's minimum / 2; tube: the block's maximum."""
    lab = np.zeros((4, 4, 4), np.float32)
    lab[0, 0, 0] = 1            # block (0,0,0): one surface voxel among 2s -> 1
    lab[0:2, 0:2, 1] = 2
    lab[3, 3, 3] = 2            # block (1,1,1): unlabeled and background -> 2
    sdm = np.arange(64, dtype=np.float32).reshape(4, 4, 4) - 10.0   # block minimum = its (even, even, even) corner
    tube = np.zeros((4, 4, 4), np.float32)
    tube[2, 1, 3] = 1           # block (1,0,1)
    label = torch.from_numpy(np.stack([lab, sdm, tube])[None])
    got = downsample_target(label, (2, 2, 2))[0].numpy()
    want_lab = np.zeros((2, 2, 2), np.float32)
    want_lab[0, 0, 0], want_lab[1, 1, 1] = 1, 2
    corners = np.arange(64, dtype=np.float32).reshape(4, 4, 4)[::2, ::2, ::2] - 10.0
    want_tube = np.zeros((2, 2, 2), np.float32)
    want_tube[1, 0, 1] = 1
    np.testing.assert_array_equal(got[0], want_lab)
    np.testing.assert_allclose(got[1], corners / 2)
    np.testing.assert_array_equal(got[2], want_tube)
    # anisotropic factors: distances divided by the geometric mean of the factors
    got = downsample_target(label, (1, 2, 4))[0].numpy()
    assert got.shape == (3, 4, 2, 1)
    np.testing.assert_allclose(got[1, :, :, 0], (np.arange(64, dtype=np.float32).reshape(4, 4, 4)[:, ::2, 0] - 10.0) / 2)


def test_explicit_deep_supervision_weights_give_the_hand_computed_sum():
    """Heads 8^3, 4^3, 2^3, 1^3 of constant logits c_i and the weights [0.4, 0.4, 0.1, 0.1]: BCE of a constant
    logit c over n labelled voxels, k of them surface, is softplus(c) - (k / n) c. Label 8^3: surface at z = 2, 3,
    unlabeled at z = 6, 7 for x < 4. Pooled by hand: 4^3 has 16 surface voxels of 56 labelled, 2^3 4 of 6, 1^3 1 of 1."""
    lab = np.zeros((8, 8, 8), np.float32)
    lab[2:4] = 1
    lab[6:8, :, :4] = 2
    label = torch.from_numpy(lab)[None, None]
    cs = [0.5, -1.0, 2.0, 0.25]
    heads = [torch.full((1, 1) + (8 // 2**i,) * 3, c, requires_grad=True) for i, c in enumerate(cs)]
    loss = CompositeTopologyLoss({"bce": 1.0}, deep_supervision_weights=[0.4, 0.4, 0.1, 0.1])
    value = loss(heads, label)

    def bce(c, k, n):
        return math.log1p(math.exp(c)) - k / n * c

    want = 0.4 * bce(0.5, 128, 448) + 0.4 * bce(-1.0, 16, 56) + 0.1 * bce(2.0, 4, 6) + 0.1 * bce(0.25, 1, 1)
    assert float(value) == pytest.approx(want, rel=1e-6)
    assert loss.head_weights(4) == [0.4, 0.4, 0.1, 0.1]
    # the decay instead: 8/15, 4/15, 2/15, 1/15 (normalised)
    decay = CompositeTopologyLoss({"bce": 1.0})
    want = (8 * bce(0.5, 128, 448) + 4 * bce(-1.0, 16, 56) + 2 * bce(2.0, 4, 6) + bce(0.25, 1, 1)) / 15
    assert float(decay(heads, label)) == pytest.approx(want, rel=1e-6)


def test_zero_weight_heads_are_not_computed_but_get_a_zero_gradient(monkeypatch):
    lab = np.zeros((8, 8, 8), np.float32)
    lab[2:4] = 1
    label = torch.from_numpy(lab)[None, None]
    heads = [torch.full((1, 1) + (8 // 2**i,) * 3, 0.3, requires_grad=True) for i in range(3)]
    calls = []
    forward = MaskedBCEWithLogitsLoss.forward
    monkeypatch.setattr(MaskedBCEWithLogitsLoss, "forward", lambda self, x, y: calls.append(x.shape[-1]) or forward(self, x, y))
    loss = CompositeTopologyLoss({"bce": 1.0}, deep_supervision_weights=[1.0, 0.0, 0.0])
    value = loss(heads, label)
    assert calls == [8]
    assert float(value) == pytest.approx(math.log1p(math.exp(0.3)) - 0.25 * 0.3, rel=1e-6)
    value.backward()
    assert all(h.grad is not None for h in heads) and heads[1].grad.abs().sum() == 0 and heads[2].grad.abs().sum() == 0


def test_bad_deep_supervision_weights_raise_naming_the_list():
    with pytest.raises(ValueError, match=r"deep_supervision_weights must be .*\[0.4, -0.1\]"):
        CompositeTopologyLoss({"bce": 1.0}, deep_supervision_weights=[0.4, -0.1])
    with pytest.raises(ValueError, match=r"at least one > 0; got \[0, 0\]"):
        CompositeTopologyLoss({"bce": 1.0}, deep_supervision_weights=[0, 0])
    loss = CompositeTopologyLoss({"bce": 1.0}, deep_supervision_weights=[0.4, 0.4, 0.1, 0.1])
    heads = [torch.zeros((1, 1) + (8 // 2**i,) * 3) for i in range(3)]
    with pytest.raises(ValueError, match=r"has 4 entries but the network returns 3 head\(s\).*deep_supr_num 3"):
        loss(heads, torch.zeros(1, 1, 8, 8, 8))


def test_train_json_loss_takes_the_list_from_the_config():
    parser = _config()
    parser["loss#deep_supervision_weights"] = [0.4, 0.4, 0.1, 0.1]
    assert parser.get_parsed_content("loss").head_weights(4) == [0.4, 0.4, 0.1, 0.1]
    kaggle = ConfigParser()
    kaggle.read_config([TRAIN_JSON, RESENC_JSON, KAGGLE_RESENC_JSON])
    assert kaggle["network_def#kind"] == "resenc" and kaggle["patch_size"] == [128] * 3 and kaggle["batch_size"] == 2
    assert kaggle["loss_weights"] == {"bce": 1.0, "dice": 1.0}


@pytest.fixture(scope="module")
def resenc_run(tmp_path_factory):
    """A tiny ResEnc trained by train.json + resenc.json (2 epochs of 3 iterations at 16^3, validation each epoch)."""
    root = tmp_path_factory.mktemp("resenc")
    data = make_data(root / "data", volumes=3)
    over = tiny_overrides(data, root / "run", **TINY)
    wf = ConfigWorkflow(workflow_type="train", config_file=[TRAIN_JSON, RESENC_JSON], **over)
    wf.initialize()
    wf.run()
    wf.finalize()
    return root, data


@pytest.mark.slow
def test_training_validation_and_inference_with_resenc(resenc_run, tmp_path):
    root, data = resenc_run
    model_pt = root / "run" / "models" / "model.pt"
    spec = torch.load(model_pt, weights_only=True)["meta"]["network"]
    assert spec["kind"] == "resenc" and spec["blocks_per_stage"] == [1, 1, 1] and spec["deep_supr_num"] == 1
    assert json.loads((root / "run" / "models" / "network.json").read_text()) == {"network_spec": spec}
    log = (root / "run" / "train.log").read_text()
    assert "val_score" in log
    out = tmp_path / "pred"
    wf = ConfigWorkflow(workflow_type="infer", config_file=INFER_JSON, dataset_dir=data, output_dir=str(out),
                        ckpt_path=str(model_pt), device="cpu", amp=False)  # no network setting: model.pt holds it
    wf.initialize()
    wf.run()
    assert sorted(p for p in os.listdir(out) if p.endswith(".tif")) == sorted(os.listdir(os.path.join(data, "test_images")))


@pytest.mark.slow
def test_resenc_exports_with_trace_and_onnx_and_passes_verify_net_in_out(resenc_run, tmp_path):
    root, _ = resenc_run
    model_pt, network_json = root / "run" / "models" / "model.pt", root / "run" / "models" / "network.json"
    net = build_network(**torch.load(model_pt, weights_only=True)["meta"]["network"])
    net.load_state_dict(torch.load(model_pt, weights_only=True)["network"])
    net.eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        want = net(x)

    ts = tmp_path / "model.ts"
    configs = json.dumps([INFER_JSON, str(network_json)])
    common = ["--ckpt_file", str(model_pt), "--key_in_ckpt", "network", "--meta_file", META_JSON, "--config_file", configs]
    r = subprocess.run([PYTHON, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts), *common,
                        "--use_trace", "True", "--input_shape", "[1, 1, 16, 16, 16]"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    extra = {"network.json": ""}
    traced = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["network.json"])["network_spec"]["kind"] == "resenc"
    assert torch.allclose(traced(x), want, atol=1e-5)

    verify_net_in_out(net_id="network_def", meta_file=META_JSON, config_file=INFER_JSON, device="cpu",
                      ckpt_path=str(model_pt))

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    kwargs = '{"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": {0: "batch"}, "pred": {0: "batch"}}}'
    r = subprocess.run([PYTHON, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", str(path), *common,
                        "--input_shape", "[1, 1, 16, 16, 16]", "--converter_kwargs", kwargs, "--ckpt_path", str(model_pt)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["pred"]  # the main head only
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_pooling_the_targets_composes():
    """Pooling by 2 twice equals pooling by 4 (the loss pools each head's target from the previous head's)."""
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (2, 1, 16, 16, 8), generator=g).float()
    label = torch.cat([lab, torch.randn(2, 1, 16, 16, 8, generator=g) * 4, (torch.rand(2, 1, 16, 16, 8, generator=g) > 0.7).float()], 1)
    twice = downsample_target(downsample_target(label, (2, 2, 2)), (2, 2, 1))
    once = downsample_target(label, (4, 4, 2))
    torch.testing.assert_close(twice, once)
