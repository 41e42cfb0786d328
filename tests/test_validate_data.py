"""custom_components.data.validate_data: every kind of bad input is reported, one line naming the file."""

import os
import runpy
import sys
import warnings

import numpy as np
import pytest
from conftest import TINY_SHAPE, tiny_label, write_tiff

from custom_components.data.validate_data import check_or_raise, main, read_train_csv, validate_dataset, validate_volumes


def only(problems, *needles):
    """The single problem line; it must contain every needle."""
    assert len(problems) == 1, problems
    for n in needles:
        assert n in problems[0], (n, problems[0])
    return problems[0]


def test_valid_dataset_has_no_problems(tiny_dataset):
    assert validate_dataset(tiny_dataset) == []
    assert validate_dataset(tiny_dataset, decode=False) == []
    assert check_or_raise(tiny_dataset) == (3, 1)
    assert check_or_raise(tiny_dataset, decode=True) == (3, 1)


def test_cli_ok_and_exit_codes(tiny_dataset, capsys):
    assert main(["--data_root", str(tiny_dataset)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 training volumes, 1 test volumes"
    assert main(["--data_root", str(tiny_dataset), "--headers_only"]) == 0
    capsys.readouterr()
    os.remove(tiny_dataset / "train_labels" / "1002.tif")
    assert main(["--data_root", str(tiny_dataset)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "1002.tif" in out[0] and "missing label" in out[0]


def test_cli_as_module(tiny_dataset, monkeypatch, capsys):
    # `python -m` semantics in this process (a fresh interpreter spends ~9 s importing MONAI)
    monkeypatch.setattr(sys, "argv", ["validate_data", "--data_root", str(tiny_dataset), "--headers_only"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" of runpy
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.data.validate_data", run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == "OK: 3 training volumes, 1 test volumes"
    os.remove(tiny_dataset / "test_images" / "2001.tif")
    write_tiff(tiny_dataset / "test_images" / "2001.tif", np.zeros((3, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.data.validate_data", run_name="__main__")
    assert e.value.code == 1
    assert "test_images/2001.tif" in capsys.readouterr().out


def test_missing_image(tiny_dataset):
    os.remove(tiny_dataset / "train_images" / "1001.tif")
    only(validate_dataset(tiny_dataset), "train_images/1001.tif", "missing image", "'1001'")


def test_missing_label(tiny_dataset):
    os.remove(tiny_dataset / "train_labels" / "1003.tif")
    only(validate_dataset(tiny_dataset, decode=False), "train_labels/1003.tif", "missing label")


def test_missing_folder(tiny_dataset):
    import shutil

    shutil.rmtree(tiny_dataset / "train_labels")
    only(validate_dataset(tiny_dataset), "train_labels", "folder missing")


def test_stray_files(tiny_dataset):
    write_tiff(tiny_dataset / "train_images" / "9999.tif", np.zeros(TINY_SHAPE, np.uint8))
    (tiny_dataset / "train_labels" / "notes.txt").write_text("x")
    (tiny_dataset / ".hidden").write_text("ignored")
    (tiny_dataset / "train_labels" / ".DS_Store").write_text("ignored")
    problems = validate_dataset(tiny_dataset)
    assert len(problems) == 2, problems
    assert any("train_images/9999.tif" in p and "stray" in p for p in problems)
    assert any("train_labels/notes.txt" in p and "stray" in p for p in problems)


def test_truncated_tiff(tiny_dataset):
    p = tiny_dataset / "train_images" / "1002.tif"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    for decode in (True, False):
        only(validate_dataset(tiny_dataset, decode=decode), "train_images/1002.tif", "truncated")


def test_garbage_tiff(tiny_dataset):
    (tiny_dataset / "train_labels" / "1001.tif").write_bytes(b"\x00" * 100)
    only(validate_dataset(tiny_dataset), "train_labels/1001.tif", "cannot be read as TIFF")


def test_2d_image(tiny_dataset):
    write_tiff(tiny_dataset / "train_images" / "1001.tif", np.zeros((16, 16), np.uint8))
    problems = validate_dataset(tiny_dataset, decode=False)
    assert any("train_images/1001.tif" in p and "2D" in p for p in problems), problems
    # the label's shape check names both files
    assert all("1001.tif" in p for p in problems) and len(problems) == 2, problems


def test_wrong_dtype(tiny_dataset):
    write_tiff(tiny_dataset / "train_images" / "1003.tif", np.zeros(TINY_SHAPE, np.uint16))
    for decode in (True, False):
        only(validate_dataset(tiny_dataset, decode=decode), "train_images/1003.tif", "uint16", "expected uint8")


def test_shape_mismatch(tiny_dataset):
    write_tiff(tiny_dataset / "train_labels" / "1002.tif", np.zeros((16, 16, 15), np.uint8))
    for decode in (True, False):
        only(validate_dataset(tiny_dataset, decode=decode), "train_labels/1002.tif", "[16, 16, 15]", "[16, 16, 16]")


def test_label_value_3(tiny_dataset):
    lab = tiny_label(0)
    lab[5, 5, 5] = 3
    lab[6, 6, 6] = 7
    write_tiff(tiny_dataset / "train_labels" / "1001.tif", lab)
    only(validate_dataset(tiny_dataset), "train_labels/1001.tif", "{3, 7}", "outside {0, 1, 2}", "2 voxels")
    assert validate_dataset(tiny_dataset, decode=False) == []  # headers cannot see values


def test_bad_csv_header(tiny_dataset):
    (tiny_dataset / "train.csv").write_text("image,scroll\n1001,34117\n1002,34117\n1003,35360\n")
    problems = validate_dataset(tiny_dataset)
    assert any("train.csv" in p and "header" in p and "'image,scroll'" in p for p in problems), problems
    # without ids every file is a stray
    assert sum("stray" in p for p in problems) == 6


def test_missing_csv(tiny_dataset):
    os.remove(tiny_dataset / "train.csv")
    problems = validate_dataset(tiny_dataset)
    assert "train.csv: missing" in problems[0]


def test_duplicate_id(tiny_dataset):
    (tiny_dataset / "train.csv").write_text("id,scroll_id\n1001,34117\n1002,34117\n1003,35360\n1002,35360\n")
    only(validate_dataset(tiny_dataset), "train.csv line 5", "duplicate id '1002'", "line 3")


def test_read_train_csv_rows(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("\ufeffid,scroll_id\n 7 ,34117\n\n8,\n9,1,extra\n")
    rows, problems = read_train_csv(p)
    assert rows == [{"id": "7", "scroll_id": "34117"}]
    assert len(problems) == 2 and "line 4: empty scroll_id" in problems[0] and "line 5: 3 fields" in problems[1]


def test_test_images_checked(tiny_dataset):
    write_tiff(tiny_dataset / "test_images" / "2002.tif", np.zeros((16, 16), np.uint8))
    write_tiff(tiny_dataset / "test_images" / "2003.tif", np.zeros(TINY_SHAPE, np.uint16))
    (tiny_dataset / "test_images" / "readme.md").write_text("x")
    problems = validate_dataset(tiny_dataset)
    assert len(problems) == 3, problems
    assert any("test_images/2002.tif" in p and "2D" in p for p in problems)
    assert any("test_images/2003.tif" in p and "uint16" in p for p in problems)
    assert any("test_images/readme.md" in p and "stray" in p for p in problems)
    assert validate_dataset(tiny_dataset, check_test=False) == []


def test_test_labels_checked(tiny_dataset):
    write_tiff(tiny_dataset / "test_labels" / "2001.tif", np.full(TINY_SHAPE, 4, np.uint8))
    write_tiff(tiny_dataset / "test_labels" / "2999.tif", np.zeros(TINY_SHAPE, np.uint8))
    problems = validate_dataset(tiny_dataset)
    assert len(problems) == 2, problems
    assert any("test_labels/2001.tif" in p and "{4}" in p for p in problems)
    assert any("test_labels/2999.tif" in p and "stray" in p for p in problems)


def test_every_problem_reported_and_check_or_raise(tiny_dataset):
    os.remove(tiny_dataset / "train_images" / "1001.tif")
    write_tiff(tiny_dataset / "train_labels" / "1002.tif", np.zeros((16, 16, 15), np.uint8))
    lab = tiny_label(2)
    lab[0, 0, 0] = 3
    write_tiff(tiny_dataset / "train_labels" / "1003.tif", lab)
    problems = validate_dataset(tiny_dataset)
    assert len(problems) == 3, problems
    with pytest.raises(ValueError) as e:
        check_or_raise(tiny_dataset, decode=True)
    msg = str(e.value)
    assert msg.startswith("3 problem(s)") and all(p in msg for p in problems)
    with pytest.raises(ValueError, match="does not exist"):
        check_or_raise(tiny_dataset / "nope")


def test_validate_volumes_api(tiny_dataset):
    imgs = [tiny_dataset / "train_images" / f"{i}.tif" for i in ("1001", "1002")]
    labs = [tiny_dataset / "train_labels" / "1001.tif", None]
    assert validate_volumes(imgs, labs) == []
    assert validate_volumes(imgs, decode=False, workers=1) == []
    with pytest.raises(ValueError, match="2 image paths but 1 label paths"):
        validate_volumes(imgs, labs[:1])
    only(validate_volumes([tiny_dataset / "x.tif"]), "x.tif: file does not exist")


def test_bar_follows_completion_order_problems_input_order(tmp_path, monkeypatch):
    """a.tif's check waits until the bar has shown b.tif and c.tif (only a pool read in completion order can
    show them first); its problem still comes first, in input order."""
    from completion_gate import bar_recorder, held

    from custom_components import progress
    from custom_components.data import validate_data

    paths = [tmp_path / f"{n}.tif" for n in "abc"]  # none exists: one problem each
    release = str(tmp_path / "release")
    monkeypatch.setattr(validate_data, "_check_pair", held(validate_data._check_pair, lambda i, *a: i == str(paths[0]), release))
    bar = bar_recorder(release, others=["b.tif", "c.tif"])
    monkeypatch.setattr(progress, "tqdm", bar)
    problems = validate_volumes(paths, workers=3)
    assert sorted(bar.shown[:2]) == ["b.tif", "c.tif"] and bar.shown[2:] == ["a.tif"]
    assert [p.split(":")[0] for p in problems] == [str(p) for p in paths]
