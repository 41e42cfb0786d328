"""custom_components.inference.submission: the zip's members, checks that name the files, atomic writing, the CLI."""

import os
import runpy
import sys
import warnings
import zipfile

import numpy as np
import pytest
from conftest import write_tiff

from custom_components.inference import submission
from custom_components.inference.submission import main, write_submission_zip

SHAPE = (4, 5, 6)


def _vol(seed, shape=SHAPE, dtype=np.uint8):
    return (np.random.default_rng(seed).random(shape) > 0.5).astype(dtype)


@pytest.fixture
def preds(tmp_path):
    d = tmp_path / "pred"
    write_tiff(d / "1001.tif", _vol(1))
    write_tiff(d / "1002.tif", _vol(2), compression=None)
    (d / "notes.txt").write_text("not a prediction")
    (d / "sub").mkdir()
    write_tiff(d / "sub" / "9999.tif", _vol(9))       # in a sub-folder: not packed
    (d / "submission.zip").write_bytes(b"an old zip kept in the folder")
    return d


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "test_images"
    write_tiff(d / "1001.tif", _vol(11))
    write_tiff(d / "1002.tif", _vol(12))
    return d


def tmp_leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_members_exactly_the_tifs_at_root_bytes_equal(preds, tmp_path):
    out = tmp_path / "out" / "submission.zip"        # folder created
    assert write_submission_zip(preds, out) == str(out)
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["1001.tif", "1002.tif"]
        assert all(i.compress_type in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED) for i in z.infolist())
        for name in z.namelist():
            assert z.read(name) == (preds / name).read_bytes()
    assert tmp_leftovers(out.parent) == []


def test_zip_inside_pred_dir_and_tiff_suffix(preds):
    os.rename(preds / "1002.tif", preds / "1002.tiff")
    out = preds / "submission.zip"                   # where inference.json writes it
    write_submission_zip(preds, out, ids=["1001", "1002.tif"], compression="stored")
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["1001.tif", "1002.tif"]
        assert [i.compress_type for i in z.infolist()] == [zipfile.ZIP_STORED] * 2
        assert z.read("1002.tif") == (preds / "1002.tiff").read_bytes()
    write_submission_zip(preds, out)                 # again: the zip itself is never packed
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["1001.tif", "1002.tif"]


def test_missing_and_extra_ids_named(preds, tmp_path):
    out = tmp_path / "s.zip"
    with pytest.raises(ValueError) as e:
        write_submission_zip(preds, out, ids=["1001", "1003", "1004"])
    msg = str(e.value)
    assert "missing prediction(s) for 2 id(s): 1003.tif, 1004.tif" in msg
    assert "1 prediction(s) not among the expected ids: 1002.tif" in msg
    assert not out.exists()
    with pytest.raises(ValueError, match="missing prediction"):
        write_submission_zip(preds, out, ids="1001,1002,1003")


def test_not_uint8_and_not_3d_named(preds, tmp_path):
    write_tiff(preds / "1003.tif", _vol(3, dtype=np.uint16))
    write_tiff(preds / "1004.tif", _vol(4, dtype=np.float32))
    write_tiff(preds / "1005.tif", np.zeros((5, 6), np.uint8))
    (preds / "1006.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError) as e:
        write_submission_zip(preds, tmp_path / "s.zip")
    msg = str(e.value)
    assert f"{preds / '1003.tif'}: dtype uint16, expected uint8" in msg
    assert f"{preds / '1004.tif'}: dtype float32, expected uint8" in msg
    assert f"{preds / '1005.tif'}: not a 3D volume (shape [5, 6])" in msg
    assert "1006.tif" in msg and "4 problem(s)" in msg
    assert "1001.tif" not in msg and not (tmp_path / "s.zip").exists()


def test_shapes_checked_against_input_dir(preds, inputs, tmp_path):
    out = tmp_path / "s.zip"
    write_submission_zip(preds, out, input_dir=inputs)
    write_tiff(inputs / "1002.tif", _vol(12, shape=(4, 5, 7)))
    write_tiff(inputs / "1003.tif", _vol(13))
    with pytest.raises(ValueError) as e:
        write_submission_zip(preds, out, input_dir=inputs)     # ids default to those of input_dir
    msg = str(e.value)
    assert f"{preds / '1002.tif'}: shape [4, 5, 6] differs from its input {inputs / '1002.tif'} shape [4, 5, 7]" in msg
    assert "missing prediction(s) for 1 id(s): 1003.tif" in msg
    with pytest.raises(ValueError, match=r"1001.tif: no input volume 1001.tif in input_dir"):
        os.remove(inputs / "1001.tif")
        write_submission_zip(preds, out, ids=["1001", "1002"], input_dir=inputs)


def test_empty_or_missing_pred_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .tif predictions"):
        write_submission_zip(tmp_path / "empty", tmp_path / "s.zip")
    with pytest.raises(ValueError, match="pred_dir '.*nope' does not exist"):
        write_submission_zip(tmp_path / "nope", tmp_path / "s.zip")


def test_failed_check_keeps_previous_zip(preds, tmp_path):
    out = tmp_path / "s.zip"
    write_submission_zip(preds, out)
    before = out.read_bytes()
    write_tiff(preds / "1003.tif", _vol(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="1003.tif: dtype uint16"):
        write_submission_zip(preds, out)
    assert out.read_bytes() == before and tmp_leftovers(tmp_path) == []


def test_crash_mid_write_leaves_no_zip_and_previous_zip_intact(preds, tmp_path, monkeypatch):
    out = tmp_path / "s.zip"
    real_write = zipfile.ZipFile.write
    calls = []

    def failing_write(self, filename, arcname=None, *a, **k):
        calls.append(arcname)
        if len(calls) == 2:
            raise OSError("disk full (simulated) while writing the second member")
        return real_write(self, filename, arcname, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_submission_zip(preds, out)
    assert not out.exists() and tmp_leftovers(tmp_path) == []

    monkeypatch.setattr(zipfile.ZipFile, "write", real_write)
    write_submission_zip(preds, out)
    before = out.read_bytes()
    calls.clear()
    monkeypatch.setattr(zipfile.ZipFile, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_submission_zip(preds, out)
    assert out.read_bytes() == before and tmp_leftovers(tmp_path) == []
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["1001.tif", "1002.tif"]


def test_crash_at_replace_keeps_previous_zip(preds, tmp_path, monkeypatch):
    out = tmp_path / "s.zip"
    out.write_bytes(b"previous")

    def failing_replace(src, dst):
        raise OSError("simulated crash at os.replace")

    monkeypatch.setattr(submission.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        write_submission_zip(preds, out)
    assert out.read_bytes() == b"previous" and tmp_leftovers(tmp_path) == []


def test_cli(preds, inputs, tmp_path, capsys):
    out = tmp_path / "cli.zip"
    assert main(["--pred_dir", str(preds), "--out", str(out), "--input_dir", str(inputs)]) == 0
    assert f"wrote {out}: 2 volume(s)" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["--pred_dir", str(preds), "--out", str(out), "--ids", "1001"]) == 1
    assert "not among the expected ids: 1002.tif" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_as_module(preds, tmp_path, monkeypatch, capsys):
    # `python -m` semantics in this process (a fresh interpreter spends seconds importing MONAI)
    out = tmp_path / "m.zip"
    monkeypatch.setattr(sys, "argv", ["submission", "--pred_dir", str(preds), "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" of runpy
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.inference.submission", run_name="__main__")
    assert e.value.code == 0 and out.is_file()
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["1001.tif", "1002.tif"]
    write_tiff(preds / "1003.tif", _vol(3, dtype=np.float32))
    monkeypatch.setattr(sys, "argv", ["submission", "--pred_dir", str(preds), "--out", str(tmp_path / "bad.zip")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.inference.submission", run_name="__main__")
    assert e.value.code == 1 and "1003.tif: dtype float32, expected uint8" in capsys.readouterr().err
    assert not (tmp_path / "bad.zip").exists()
