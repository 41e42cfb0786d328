"""custom_components.data.convert_nnunet: nnU-Net v2 raw layout, dataset.json, NIfTI contents == TIFFs."""

import json
import os
import runpy
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import write_tiff

from custom_components.data.convert_nnunet import convert, dataset_folder_name, main

TRAIN_IDS = ["1001", "1002", "1003"]


def nifti(path):
    img = nib.load(path)
    return img, np.asanyarray(img.dataobj)


def test_layout_contents_and_dataset_json(tiny_dataset, tmp_path):
    folder = convert(tiny_dataset, tmp_path / "raw", dataset_id=101, name="VesuviusSurface", workers=2)
    assert folder == str(tmp_path / "raw" / "Dataset101_VesuviusSurface")
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [f"{i}_0000.nii.gz" for i in TRAIN_IDS]
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"{i}.nii.gz" for i in TRAIN_IDS]
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == ["2001_0000.nii.gz"]
    assert not os.path.exists(os.path.join(folder, "labelsTs"))
    assert sorted(os.listdir(folder)) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]  # no tmp files

    for vid in TRAIN_IDS:
        for src, dst in (
            (f"train_images/{vid}.tif", f"imagesTr/{vid}_0000.nii.gz"),
            (f"train_labels/{vid}.tif", f"labelsTr/{vid}.nii.gz"),
        ):
            want = tifffile.imread(tiny_dataset / src)
            img, got = nifti(os.path.join(folder, dst))
            assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)
            assert tuple(float(z) for z in img.header.get_zooms()) == (1.0, 1.0, 1.0)
            assert np.allclose(img.affine, np.eye(4))
    _, lab = nifti(os.path.join(folder, "labelsTr", "1001.nii.gz"))
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    _, ts = nifti(os.path.join(folder, "imagesTs", "2001_0000.nii.gz"))
    assert np.array_equal(ts, tifffile.imread(tiny_dataset / "test_images" / "2001.tif"))

    with open(os.path.join(folder, "dataset.json")) as fh:
        dj = json.load(fh)
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "surface": 1, "ignore": 2}
    assert max(dj["labels"].values()) == dj["labels"]["ignore"]  # nnU-Net: ignore is the highest label
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    # nnU-Net's rule: every training case has exactly one label and one image per channel
    cases = {f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(folder, "imagesTr"))}
    assert cases == {f[: -len(".nii.gz")] for f in os.listdir(os.path.join(folder, "labelsTr"))}
    assert len(cases) == dj["numTraining"]


def test_test_labels_and_overwrite(tiny_dataset, tmp_path):
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[3, 4, 5] = 1
    write_tiff(tiny_dataset / "test_labels" / "2001.tif", lab)
    folder = convert(tiny_dataset, tmp_path / "raw", workers=1)
    _, got = nifti(os.path.join(folder, "labelsTs", "2001.nii.gz"))
    assert np.array_equal(got, lab)
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert(tiny_dataset, tmp_path / "raw")
    # drop a case: an overwrite removes its old files
    (tiny_dataset / "train.csv").write_text("id,scroll_id\n1001,34117\n1002,34117\n")
    os.remove(tiny_dataset / "train_images" / "1003.tif")
    os.remove(tiny_dataset / "train_labels" / "1003.tif")
    convert(tiny_dataset, tmp_path / "raw", overwrite=True)
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == ["1001.nii.gz", "1002.nii.gz"]
    assert json.load(open(os.path.join(folder, "dataset.json")))["numTraining"] == 2


def test_invalid_dataset_is_refused_before_writing(tiny_dataset, tmp_path):
    os.remove(tiny_dataset / "train_labels" / "1002.tif")
    with pytest.raises(ValueError, match="train_labels/1002.tif: missing label"):
        convert(tiny_dataset, tmp_path / "raw")
    assert not os.path.exists(tmp_path / "raw")


def test_dataset_folder_name():
    assert dataset_folder_name(7, "Ves") == "Dataset007_Ves"
    for bad in (0, 1000, 1.5):
        with pytest.raises(ValueError, match="dataset_id must be an integer in 1..999"):
            dataset_folder_name(bad, "Ves")
    with pytest.raises(ValueError, match="name must be"):
        dataset_folder_name(5, "has space")


def test_cli(tiny_dataset, tmp_path, monkeypatch, capsys):
    assert main(["--data_root", str(tiny_dataset), "--out", str(tmp_path / "a"), "--dataset_id", "5", "--name", "T"]) == 0
    assert os.path.isfile(tmp_path / "a" / "Dataset005_T" / "dataset.json")
    assert "3 training cases" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["convert_nnunet", "--data_root", str(tiny_dataset), "--out", str(tmp_path / "b")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.data.convert_nnunet", run_name="__main__")
    assert e.value.code == 0
    assert os.path.isfile(tmp_path / "b" / "Dataset101_VesuviusSurface" / "imagesTr" / "1001_0000.nii.gz")
    assert main(["--data_root", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 1


def test_bar_names_every_written_file_once(tiny_dataset, tmp_path, monkeypatch):
    """The bar shows each written file once (3 images + 3 labels + 1 test image), named by its nnU-Net file."""
    from completion_gate import bar_recorder

    from custom_components import progress

    bar = bar_recorder(str(tmp_path / "unused"), others=["never"])
    monkeypatch.setattr(progress, "tqdm", bar)
    convert(tiny_dataset, tmp_path / "raw", workers=2)
    written = [n for n in bar.shown if n.endswith(".nii.gz")]
    assert sorted(written) == sorted([f"{i}_0000.nii.gz" for i in TRAIN_IDS] + [f"{i}.nii.gz" for i in TRAIN_IDS]
                                     + ["2001_0000.nii.gz"])
