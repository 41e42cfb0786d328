"""Shared set-up of the training tests: tiny synthetic data and the overrides of a tiny run."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_JSON = os.path.join(REPO, "bundle", "configs", "train.json")
INFER_JSON = os.path.join(REPO, "bundle", "configs", "inference.json")
MULTI_JSON = os.path.join(REPO, "bundle", "configs", "multi_gpu_train.json")


def make_data(root, volumes=4, shape=(40, 40, 40), seed=0):
    from custom_components.synthetic import write_dataset

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


PYTHON = sys.executable
