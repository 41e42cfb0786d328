"""Export of the bundle network: ONNX through ``monai.bundle onnx_export`` run with onnxruntime, and the
metadata's ``network_data_format`` checked by ``monai.bundle verify_net_in_out``.

TorchScript export (``ckpt_export --use_trace True``) is tested in ``test_inference.py``.
"""

import subprocess

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape

from custom_components.training.network import check_patch_size, plan_dynunet
from training_utils import INFER_JSON, META_JSON, PYTHON, REPO, save_checkpoint_as_training, tiny_network

#: the ``--converter_kwargs`` of the README's ONNX command: input / output named as in metadata.json,
#: a free batch axis (the sliding window's last batch of windows can be smaller than sw_batch_size).
ONNX_CONVERTER_KWARGS = '{"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": {0: "batch"}, "pred": {0: "batch"}}}'


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny DynUNet (eval mode) and its checkpoint saved as training saves it."""
    net = tiny_network(seed=0)
    path = save_checkpoint_as_training(net, tmp_path_factory.mktemp("ckpt"))
    return net.eval(), path


def test_onnx_export_runs_in_onnxruntime_like_torch(tiny_checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net, ckpt = tiny_checkpoint
    path = tmp_path / "model.onnx"
    cmd = [PYTHON, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", str(path), "--ckpt_file", ckpt,
           "--key_in_ckpt", "network", "--meta_file", META_JSON, "--config_file", INFER_JSON,
           "--input_shape", "[1, 1, 16, 16, 16]", "--converter_kwargs", ONNX_CONVERTER_KWARGS, "--ckpt_path", ckpt]
    # no network setting repeated: the checkpoint carries patch_size, filters and deep_supr_num
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["pred"]  # the main head only: deep supervision is training-only
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 16, 16, 16]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.rand(batch, 1, 16, 16, 16, generator=gen)
        (got,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == want.shape == (batch, 1, 16, 16, 16)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_metadata_spatial_shape_fits_every_plan():
    """``32*(n+1)`` (64, 96, 128, ...): a multiple of every plan's total stride (at most 2**5 = 32 with
    max_levels 6) with >= 2 voxels per axis at the bottleneck (InstanceNorm needs more than one)."""
    meta = ConfigParser.load_config_file(META_JSON)
    fmt = meta["network_data_format"]
    shape_in = fmt["inputs"]["image"]["spatial_shape"]
    assert shape_in == fmt["outputs"]["pred"]["spatial_shape"]
    assert [_get_fake_spatial_shape(shape_in, n=n) for n in (1, 2, 3)] == [(64,) * 3, (96,) * 3, (128,) * 3]
    for patch in ([16] * 3, [32] * 3, [64] * 3, [128] * 3, [160, 128, 96], [320] * 3):
        strides = plan_dynunet(patch)["strides"]
        total = [int(np.prod([s[a] for s in strides])) for a in range(3)]
        assert max(total) <= 32
        for n in (1, 2, 3):
            shape = _get_fake_spatial_shape(shape_in, n=n)
            check_patch_size(shape, strides)
            assert all(s // t >= 2 for s, t in zip(shape, total)), (patch, shape)


def test_verify_net_in_out_passes_and_catches_wrong_metadata(tiny_checkpoint):
    def _verify(**over):
        verify_net_in_out(net_id="network_def", meta_file=META_JSON, config_file=INFER_JSON, device="cpu",
                          ckpt_path=tiny_checkpoint[1], **over)

    _verify()
    _verify(n=2)
    with pytest.raises(ValueError, match="output channel number `1` doesn't match: `2`"):
        _verify(**{"_meta_#network_data_format#outputs#pred#num_channels": 2})
    with pytest.raises(RuntimeError, match="expected input.*to have 1 channels, but got 3 channels"):
        _verify(**{"_meta_#network_data_format#inputs#image#num_channels": 3})
    with pytest.raises(ValueError, match="dtype of output data"):
        _verify(**{"_meta_#network_data_format#outputs#pred#dtype": "float64"})
