"""prepare cache, host patch sampler, device augmentation, trainer's non-finite handling."""

import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.training.augment import DeviceAugmentBatch
from custom_components.data.patch_dataset import EpochSampler, PatchDataset, shard_entries
from custom_components.data.prepare import CacheError, open_cached, prepare_cache
from custom_components.data.synthetic import write_dataset
from training_utils import TRAIN_JSON


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    ids = write_dataset(root, volumes=2, test=0, shape=(40, 44, 48), seed=1)
    return root, [{"id": i, "image": str(root / "train_images" / f"{i}.tif"), "label": str(root / "train_labels" / f"{i}.tif")} for i in ids]


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_cache(data[1], cache, workers=1, progress=False)


def test_prepare_arrays(prepared, data):
    import tifffile

    _, entries = prepared
    vol = open_cached(entries[0]["cache"])
    label = tifffile.imread(data[1][0]["label"])
    assert vol["shape"] == (40, 44, 48)
    assert np.array_equal(vol["label"], label) and np.array_equal(vol["image"], tifffile.imread(data[1][0]["image"]))
    sdm = np.asarray(vol["sdm"], np.float32)
    assert (sdm[label == 1] <= 0).all() and (sdm[(label == 0)] > 0).all()
    assert np.abs(sdm).max() <= 8.0
    assert vol["tube"].dtype == np.uint8 and vol["tube"][label == 1].mean() > 0.3
    assert (label[tuple(vol["fg"].T)] == 1).all()


def test_prepare_is_resumable_and_rebuilds_damage(prepared, data):
    cache, entries = prepared
    img = os.path.join(entries[0]["cache"], "image.npy")
    before = os.stat(img).st_mtime_ns
    prepare_cache(data[1], cache, workers=1, progress=False)
    assert os.stat(img).st_mtime_ns == before  # complete volumes are not redone
    with open(img, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CacheError, match="image.npy"):
        open_cached(entries[0]["cache"])
    prepare_cache(data[1], cache, workers=1, progress=False)
    assert open_cached(entries[0]["cache"])["image"].shape == (40, 44, 48)


def test_unreadable_source_skipped_and_counted(data, tmp_path, caplog):
    root, entries = data
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    more = entries + [{"id": "999", "image": str(bad), "label": str(bad)}]
    out = prepare_cache(more, tmp_path / "c", workers=1, progress=False)
    assert [e["id"] for e in out] == [e["id"] for e in entries]
    assert "bad.tif" in caplog.text and "1 of 3 volumes skipped" in caplog.text
    with pytest.raises(ValueError, match="only 2 of 3 volumes could be prepared.*bad.tif"):
        prepare_cache(more, tmp_path / "c", workers=1, progress=False, min_volumes=3)


def _tiny_entries(root, bad=()):
    from conftest import TINY_TRAIN

    out = [{"id": v, "image": str(root / "train_images" / f"{v}.tif"), "label": str(root / "train_labels" / f"{v}.tif")}
           for v, _ in TINY_TRAIN]
    for name in bad:
        path = root / f"{name}.tif"
        path.write_bytes(b"not a tiff at all")
        out.append({"id": name, "image": str(path), "label": str(path)})
    return out


def test_prepare_bar_follows_completion_order_results_entry_order(tiny_dataset, tmp_path, monkeypatch):
    """The first volume is held until the bar has shown the other two: only a pool read in completion order
    can show them (with pool.map the bar would wait for the first); the result keeps the entries' order."""
    from completion_gate import bar_recorder, held

    from custom_components import progress
    from custom_components.data import prepare

    entries = _tiny_entries(tiny_dataset)  # 1001, 1002, 1003
    release = str(tmp_path / "release")
    monkeypatch.setattr(prepare, "prepare_volume", held(prepare.prepare_volume, lambda e, *a: e["id"] == "1001", release))
    bar = bar_recorder(release, others=["1002", "1003"])
    monkeypatch.setattr(progress, "tqdm", bar)
    out = prepare.prepare_cache(entries, tmp_path / "cache", workers=3, progress=True)
    assert sorted(bar.shown[:2]) == ["1002", "1003"] and bar.shown[2:] == ["1001"]
    assert [e["id"] for e in out] == ["1001", "1002", "1003"]
    assert all(os.path.basename(e["cache"]) == e["id"] and e["shape"] == [16, 16, 16] for e in out)


def test_prepare_reports_failures_in_entry_order(tiny_dataset, tmp_path, monkeypatch, caplog):
    """bad_a (entry 4) is held until bad_b (entry 5) and the good volumes have finished; the warnings and the
    error still name bad_a first, as with the submission-ordered pool."""
    from completion_gate import bar_recorder, held

    from custom_components import progress
    from custom_components.data import prepare

    entries = _tiny_entries(tiny_dataset, bad=("bad_a", "bad_b"))
    release = str(tmp_path / "release")
    monkeypatch.setattr(prepare, "prepare_volume", held(prepare.prepare_volume, lambda e, *a: e["id"] == "bad_a", release))
    bar = bar_recorder(release, others=["1001", "1002", "1003", "bad_b"])
    monkeypatch.setattr(progress, "tqdm", bar)
    with pytest.raises(ValueError, match=r"only 3 of 5 volumes could be prepared \(need 5\): .*bad_a\.tif.*; .*bad_b\.tif"):
        prepare.prepare_cache(entries, tmp_path / "cache", workers=5, min_volumes=5)
    assert bar.shown[-1] == "bad_a"
    skipped = [r.getMessage() for r in caplog.records if "skipped volume" in r.getMessage()]
    assert len(skipped) == 2 and "bad_a.tif" in skipped[0] and "bad_b.tif" in skipped[1]


def test_patches_depend_only_on_seed_epoch_index(prepared):
    _, entries = prepared
    ds = PatchDataset(entries, [16, 16, 16], margin=2, samples_per_epoch=4, seed=3)
    a, b, c = ds[(1, 2)], ds[(1, 2)], ds[(2, 2)]
    assert a["image"].shape == (1, 20, 20, 20) and a["sdm"].dtype == torch.float16
    assert torch.equal(a["image"], b["image"]) and a["origin"].tolist() == b["origin"].tolist()
    assert a["origin"].tolist() != c["origin"].tolist() or a["id"] != c["id"]
    sampler = EpochSampler(4)
    sampler.set_epoch(7)
    assert list(sampler) == [(7, 0), (7, 1), (7, 2), (7, 3)]


def test_foreground_oversampling(prepared):
    _, entries = prepared
    ds_fg = PatchDataset(entries, [8, 8, 8], fg_fraction=1.0, samples_per_epoch=1, seed=0)
    assert all(bool((ds_fg[(0, i)]["label"] == 1).any()) for i in range(30))  # each holds its label-1 centre
    def share(fraction):
        ds = PatchDataset(entries, [8, 8, 8], fg_fraction=fraction, samples_per_epoch=1, seed=0)
        return np.mean([bool((ds[(0, i)]["label"] == 1).any()) for i in range(300)])

    s0, s3 = share(0.0), share(1 / 3)
    # random patches hit surface with probability s0; a third forced: s0 + (1 - s0) / 3 expected
    expected = s0 + (1 - s0) / 3
    assert abs(s3 - expected) < 4 * np.sqrt(expected * (1 - expected) / 300), (s0, s3)


def test_padding_outside_volume_is_unlabeled(prepared):
    _, entries = prepared
    ds = PatchDataset(entries, [48, 48, 48], margin=4, samples_per_epoch=1, seed=0)
    s = ds[(0, 0)]
    assert s["label"].shape == (1, 56, 56, 56)
    assert (s["label"][0, 52:] == 2).all()  # beyond the 40-voxel Z extent


def test_shard_entries_disjoint():
    e = [{"id": str(i)} for i in range(5)]
    a, b = shard_entries(e, 0, 2), shard_entries(e, 1, 2)
    assert {x["id"] for x in a}.isdisjoint({x["id"] for x in b}) and len(a) + len(b) == 5
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_entries(e, 2, 2)


def _augment(patch, elastic_prob=1.0):
    """The MONAI per-sample augmentation of ``monai_augment.json``."""
    parser = ConfigParser()
    parser.read_config([TRAIN_JSON, os.path.join(os.path.dirname(TRAIN_JSON), "monai_augment.json")])
    parser["patch_size"] = patch
    parser["device"] = "cpu"
    parser["train#device_transforms"][0]["prob"] = elastic_prob
    return parser.get_parsed_content("train#augment")


def test_device_augmentation_crops_and_concatenates(prepared):
    _, entries = prepared
    ds = PatchDataset(entries, [16, 16, 16], margin=4, samples_per_epoch=2, seed=0)
    batch = torch.utils.data.default_collate([ds[(0, 0)], ds[(0, 1)]])
    aug = _augment([16, 16, 16])
    aug.set_random_state(5)
    image, label = aug(batch, "cpu")
    assert image.shape == (2, 1, 16, 16, 16) and label.shape == (2, 3, 16, 16, 16)
    assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 2
    assert set(torch.unique(label[:, 0]).tolist()) <= {0.0, 1.0, 2.0}  # nearest for labels
    assert set(torch.unique(label[:, 2]).tolist()) <= {0.0, 1.0}
    aug.set_random_state(5)
    image2, label2 = aug(batch, "cpu")
    assert torch.equal(image, image2) and torch.equal(label, label2)  # reproducible per seed
    assert aug.last_seconds > 0


def test_without_elastic_the_crop_is_the_centre(prepared):
    _, entries = prepared
    ds = PatchDataset(entries, [16, 16, 16], margin=4, samples_per_epoch=1, seed=0)
    s = ds[(0, 0)]
    aug = DeviceAugmentBatch(transform=_augment([16, 16, 16], elastic_prob=0.0).transform.transforms[0])
    image, label = aug({k: v[None] for k, v in s.items() if k != "id"}, "cpu")
    assert torch.equal(label[0, 0], s["label"][0, 4:20, 4:20, 4:20].float())


def test_nonfinite_steps_skipped_then_stop():
    from monai.engines import SupervisedTrainer  # noqa: F401

    from custom_components.training.trainer import NonFiniteLossError, TopologyTrainer

    net = torch.nn.Conv3d(1, 1, 1)

    class NanLoss(torch.nn.Module):
        last_terms = {"bce": 0.5, "topology": float("nan")}

        def forward(self, pred, label):
            return pred.mean() * float("nan")

    data = [{"image": torch.zeros(1, 1, 4, 4, 4), "label": torch.zeros(1, 1, 4, 4, 4), "id": ["vol7"]}] * 4
    trainer = TopologyTrainer(device="cpu", max_epochs=1, train_data_loader=data, network=net,
                              optimizer=torch.optim.SGD(net.parameters(), lr=1.0), loss_function=NanLoss(),
                              max_nonfinite_in_row=3, prepare_batch=lambda b, d, nb, **k: (b["image"], b["label"]))
    w = net.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"iteration 3 .*\['vol7'\].*topology.*3 in a row"):
        trainer.run()
    assert trainer.state.skipped_steps == 3
    assert torch.equal(net.weight, w)  # no step was taken
