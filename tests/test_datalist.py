"""custom_components.data.datalist: splits, folds, relative paths, load_datalist, CLI, errors."""

import json
import os
import runpy
import sys
import warnings

import numpy as np
import pytest
from conftest import write_tiff

from custom_components.data.datalist import load_datalist, main, make_datalist, write_datalist


def csv_only(root, scrolls):
    """A data root with only train.csv: ``scrolls`` maps scroll_id -> number of volumes (ids v000, v001, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    lines, k = ["id,scroll_id"], 0
    for s, n in scrolls.items():
        for _ in range(n):
            lines.append(f"v{k:03d},{s}")
            k += 1
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def ids(entries):
    return [e["id"] for e in entries]


def scrolls_of(entries):
    return {e["scroll_id"] for e in entries}


def test_random_split_of_tiny_dataset(tiny_dataset):
    dl = make_datalist(tiny_dataset, val_fraction=0.2, seed=0)
    assert len(dl["validation"]) == 1 and len(dl["training"]) == 2  # round(0.6) = 1, at least one anyway
    assert sorted(ids(dl["training"]) + ids(dl["validation"])) == ["1001", "1002", "1003"]
    e = dl["training"][0]
    assert set(e) == {"id", "scroll_id", "image", "label"}
    assert e["image"] == f"train_images/{e['id']}.tif" and e["label"] == f"train_labels/{e['id']}.tif"
    assert dl["test"] == [{"id": "2001", "image": "test_images/2001.tif"}]
    assert dl["numTraining"] == 3


def test_deterministic_per_seed_and_seed_matters(tmp_path):
    root = csv_only(tmp_path / "d", {"a": 30, "b": 30})
    a = make_datalist(root, val_fraction=0.25, seed=3)
    assert a == make_datalist(root, val_fraction=0.25, seed=3)
    assert len(a["validation"]) == 15  # round(0.25 * 60)
    others = [ids(make_datalist(root, val_fraction=0.25, seed=s)["validation"]) for s in range(4, 8)]
    assert any(o != ids(a["validation"]) for o in others)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_at_least_one_validation_volume(tmp_path, n):
    root = csv_only(tmp_path / "d", {"a": n})
    dl = make_datalist(root, val_fraction=0.01, seed=0)
    assert len(dl["validation"]) == 1 and len(dl["training"]) == n - 1
    dl = make_datalist(root, val_fraction=0.99, seed=0)
    assert len(dl["training"]) == 1  # and at least one training volume


def test_single_volume_has_no_validation(tmp_path):
    root = csv_only(tmp_path / "d", {"a": 1})
    dl = make_datalist(root, val_fraction=0.5, seed=0)
    assert len(dl["training"]) == 1 and dl["validation"] == []


def test_scroll_split_keeps_scrolls_apart(tmp_path):
    root = csv_only(tmp_path / "d", {"s1": 10, "s2": 4, "s3": 6, "s4": 3})
    for seed in range(6):
        dl = make_datalist(root, val_fraction=0.2, seed=seed, split="scroll")
        tr, va = scrolls_of(dl["training"]), scrolls_of(dl["validation"])
        assert tr and va and not (tr & va)
        assert len(dl["training"]) + len(dl["validation"]) == 23
        # whole scrolls: every volume of a validation scroll is in validation
        assert len(dl["validation"]) == sum({"s1": 10, "s2": 4, "s3": 6, "s4": 3}[s] for s in va)


def test_scroll_split_of_tiny_dataset(tiny_dataset):
    dl = make_datalist(tiny_dataset, val_fraction=0.3, seed=0, split="scroll")
    assert not (scrolls_of(dl["training"]) & scrolls_of(dl["validation"]))
    assert dl["validation"]


def test_random_folds(tmp_path):
    root = csv_only(tmp_path / "d", {"a": 11})
    dl = make_datalist(root, val_fraction=0.2, seed=1, folds=3)
    folds = [e["fold"] for e in dl["training"]]
    assert len(dl["training"]) == 11
    assert sorted(folds.count(k) for k in range(3)) == [3, 4, 4]
    assert ids(dl["validation"]) == [e["id"] for e in dl["training"] if e["fold"] == 0]
    assert all(e["fold"] == 0 for e in dl["validation"])


def test_scroll_folds(tmp_path):
    sizes = {"s1": 10, "s2": 4, "s3": 6, "s4": 3, "s5": 5}
    root = csv_only(tmp_path / "d", sizes)
    dl = make_datalist(root, val_fraction=0.2, seed=2, split="scroll", folds=3)
    fold_of_scroll = {}
    for e in dl["training"]:
        assert fold_of_scroll.setdefault(e["scroll_id"], e["fold"]) == e["fold"]  # one fold per scroll
    assert set(fold_of_scroll.values()) == {0, 1, 2}
    loads = sorted(sum(sizes[s] for s, k in fold_of_scroll.items() if k == f) for f in range(3))
    assert loads == [9, 9, 10]  # largest first to the emptiest fold: {10}, {6, 3}, {5, 4}
    assert scrolls_of(dl["validation"]) == {s for s, k in fold_of_scroll.items() if k == 0}


def test_errors_name_the_problem(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="unknown split 'stratified'"):
        make_datalist(tiny_dataset, 0.2, 0, split="stratified")
    for vf in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
            make_datalist(tiny_dataset, vf, 0)
    with pytest.raises(ValueError, match="folds=4 > the 3 training volumes"):
        make_datalist(tiny_dataset, 0.2, 0, folds=4)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        make_datalist(tiny_dataset, 0.2, 0, folds=1)
    with pytest.raises(ValueError, match="split 'scroll' with folds=3 needs at least 3 scrolls; train.csv has 2"):
        make_datalist(tiny_dataset, 0.2, 0, split="scroll", folds=3)
    one = csv_only(tmp_path / "one", {"only": 5})
    with pytest.raises(ValueError, match="needs at least 2 scrolls.*has 1"):
        make_datalist(one, 0.2, 0, split="scroll")
    with pytest.raises(ValueError, match="does not exist"):
        make_datalist(tmp_path / "nope", 0.2, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("id,scroll_id\n1,a\n1,b\n")
    with pytest.raises(ValueError, match="duplicate id '1'"):
        make_datalist(bad, 0.2, 0)


def test_cli_writes_decathlon_datalist(tiny_dataset, tmp_path, capsys):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "lists" / "tiny.json"
    rc = main(["--data_root", str(tiny_dataset), "--out", str(out), "--val_fraction", "0.3", "--seed", "1"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert [f for f in os.listdir(out.parent)] == ["tiny.json"]  # no temporary file left
    for key in ("training", "validation", "test"):
        entries = load_decathlon_datalist(str(out), data_list_key=key, base_dir=str(tiny_dataset))
        assert entries and all(os.path.isfile(e["image"]) for e in entries)
    tr = load_decathlon_datalist(str(out), data_list_key="training", base_dir=str(tiny_dataset))
    assert all(os.path.isfile(e["label"]) for e in tr)
    rc = main(["--data_root", str(tiny_dataset), "--out", str(out), "--split", "scroll", "--folds", "3"])
    assert rc == 2 and "needs at least 3 scrolls" in capsys.readouterr().err


def test_cli_as_module(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "f.json"
    argv = ["datalist", "--data_root", str(tiny_dataset), "--out", str(out), "--split", "scroll", "--folds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as e:
            runpy.run_module("custom_components.data.datalist", run_name="__main__")
    assert e.value.code == 0
    dl = json.loads(out.read_text())
    assert dl["folds"] == 2 and {e["fold"] for e in dl["training"]} == {0, 1}


def test_load_datalist_absolute_paths_and_folds(tiny_dataset, tmp_path):
    write_tiff(tiny_dataset / "test_labels" / "2001.tif", np.zeros((16, 16, 16), np.uint8))
    path = tmp_path / "folds.json"
    write_datalist(make_datalist(tiny_dataset, 0.2, 0, split="random", folds=3), path)
    seen = []
    for k in range(3):
        train, val, test = load_datalist(path, tiny_dataset, fold=k)
        assert len(val) == 1 and len(train) == 2 and not (set(ids(train)) & set(ids(val)))
        assert all(os.path.isabs(e["image"]) and os.path.isfile(e["image"]) and os.path.isfile(e["label"])
                   for e in train + val)
        seen += ids(val)
        assert test[0]["label"] == os.path.join(str(tiny_dataset), "test_labels", "2001.tif")
    assert sorted(seen) == ["1001", "1002", "1003"]
    assert ids(load_datalist(path, tiny_dataset)[1]) == ids(load_datalist(path, tiny_dataset, fold=0)[1])
    with pytest.raises(ValueError, match=r"fold 3 not among its folds \[0, 1, 2\]"):
        load_datalist(path, tiny_dataset, fold=3)


def test_load_datalist_without_folds(tiny_dataset, tmp_path):
    path = tmp_path / "plain.json"
    dl = make_datalist(tiny_dataset, 0.3, 0)
    write_datalist(dl, path)
    train, val, test = load_datalist(path, str(tiny_dataset))
    assert ids(train) == ids(dl["training"]) and ids(val) == ids(dl["validation"])
    assert train[0]["image"] == os.path.join(str(tiny_dataset), dl["training"][0]["image"])
    with pytest.raises(ValueError, match="has no folds"):
        load_datalist(path, tiny_dataset, fold=1)
    with pytest.raises(ValueError, match="cannot be read"):
        load_datalist(tmp_path / "missing.json", tiny_dataset)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'training' list"):
        load_datalist(tmp_path / "x.json", tiny_dataset)


def test_load_datalist_paths_joined_ids_kept(tiny_dataset, tmp_path):
    """Relative paths are joined to data_root and normalised, absolute ones kept; an id that names a folder
    of data_root stays the id (MONAI's loader alone would turn it into a path); bare test paths are images."""
    (tiny_dataset / "1001").mkdir()
    absolute = str(tiny_dataset / "train_labels" / "1001.tif")
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({
        "training": [{"id": "1001", "scroll_id": "34117", "image": "./train_images/../train_images/1001.tif",
                      "label": absolute}],
        "test": ["test_images/2001.tif"],
    }))
    train, val, test = load_datalist(path, tiny_dataset)
    assert train == [{"id": "1001", "scroll_id": "34117", "image": str(tiny_dataset / "train_images" / "1001.tif"),
                      "label": absolute}]
    assert val == [] and test == [{"image": str(tiny_dataset / "test_images" / "2001.tif")}]
    path.write_text(json.dumps({"training": [{"image": "a.tif"}], "test": ["a.tif", {"image": "b.tif"}]}))
    with pytest.raises(ValueError, match=r"dl\.json': 'test' entries must all be dicts \(or, in 'test', all image paths\)"):
        load_datalist(path, tiny_dataset)
