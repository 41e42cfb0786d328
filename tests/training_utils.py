"""Shared set-up of the training tests: tiny synthetic data and the overrides of a tiny run."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_JSON = os.path.join(REPO, "bundle", "configs", "train.json")
INFER_JSON = os.path.join(REPO, "bundle", "configs", "inference.json")
MULTI_JSON = os.path.join(REPO, "bundle", "configs", "multi_gpu_train.json")
META_JSON = os.path.join(REPO, "bundle", "configs", "metadata.json")

#: inference.json overrides of a tiny DynUNet (total stride 4, 3 levels) for the inference / export tests.
TINY_NET = {"patch_size": [16, 16, 16], "filters": [4, 8, 16], "deep_supr_num": 1}


def make_data(root, volumes=4, shape=(40, 40, 40), seed=0):
    from custom_components.data.synthetic import write_dataset

    write_dataset(str(root), volumes=volumes, test=1, test_labels=True, profile="34117", shape=shape, seed=seed, preview=False)
    return str(root)


def tiny_overrides(data_dir, output_dir, **kw):
    o = {
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "device": "cpu",
        "amp": False,
        "epochs": 2,
        "iterations_per_epoch": 3,
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "aug_margin": 2,
        "num_workers": 0,
        "prepare_workers": 1,
        "val_interval": 1,
        "val_max_volumes": 1,
        "val_overlap": 0.0,
        "val_sw_batch_size": 8,
        "metric_workers": 1,
        "filters": [4, 8, 16],
        "deep_supr_num": 1,
        "topology_every_n": 2,
        "topology_downsample": 2,
        "val_fraction": 0.25,
    }
    o.update(kw)
    return o


def cli_args(overrides):
    """``--key value`` pairs for ``python -m monai.bundle run``."""
    import json

    args = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


def tiny_network(net=None, seed=0):
    """A DynUNet of the ``TINY_NET`` settings (or ``net``) built as train.json builds it (``build_network``,
    so its checkpoints carry the spec), weights from ``torch.manual_seed(seed)``."""
    import torch

    from custom_components.training.network import build_network

    torch.manual_seed(seed)
    return build_network("dynunet", **dict(TINY_NET if net is None else net))


def save_checkpoint_as_training(network, save_dir):
    """Save ``network`` the way training does (``AtomicCheckpointSaver`` at the end of a 1-iteration epoch).

    Returns the path of ``<save_dir>/last.pt``: ``{"network", "trainer", "meta"}``, the weights under
    ``"network"`` (``--key_in_ckpt network`` for ``monai.bundle ckpt_export`` / ``onnx_export``).
    """
    from ignite.engine import Engine

    from custom_components.training.checkpoint import AtomicCheckpointSaver

    engine = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(str(save_dir), {"network": network}).attach(engine)
    engine.run([0], max_epochs=1)
    return os.path.join(str(save_dir), "last.pt")


PYTHON = sys.executable


DEMO_JSON = os.path.join(REPO, "bundle", "configs", "demo.json")


def autotune_args(data_dir, output_dir, out_json, max_minutes=0.5, **kw):
    """``custom_components.training.autotune.main`` arguments: train.json + demo.json made tiny by ``tiny_overrides``
    (the datalist built from ``data_dir``, not demo.json's)."""
    o = tiny_overrides(data_dir, output_dir, datalist="", **kw)
    o.pop("dataset_dir")
    return ["--config_file", TRAIN_JSON, "--config_file", DEMO_JSON, "--dataset_dir", str(data_dir),
            "--max_minutes", str(max_minutes), "--out", str(out_json), *cli_args(o)]
