"""Whole-scroll inference (predict_zarr): the block grid is MONAI's whole-volume grid, the Zarr path equals
inference.json on the same volume, per-voxel post-processing per block equals the whole volume's, OME-Zarr
in and out, intensity mapping, named missing / corrupt chunks, resume after SIGKILL, the bundle config.

Volumes are tiled from synthetic scrolls chunk by chunk (``tile_synthetic``). The networks are untrained tiny
DynUNets (window 16^3) saved as training saves them; Dask runs a local cluster of 2 worker processes of one
thread each, shared by the module (its address is the ``--scheduler ADDRESS`` path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from custom_components.inference.block_postprocess import BlockPostProcess, block_postprocess
from custom_components.inference.postprocess import (
    Binarize,
    BinaryClosing,
    BinaryMedian,
    GaussianSmooth,
    PlugHoles,
    PostProcess,
)
from custom_components.inference.predict_zarr import SLOW_BLOCK_ENV, parse_region, predict_zarr
from custom_components.inference.window_grid import (
    Member,
    WindowGrid,
    block_boxes,
    fused_logits,
    grow_box,
    intensity_scale,
    predict_box,
    window_starts,
)
from custom_components.inference.zarr_io import open_input, read_box, tile_synthetic
from training_utils import INFER_JSON, PYTHON, REPO, save_checkpoint_as_training, tiny_network

zarr = pytest.importorskip("zarr")

#: the exactness volume: not a multiple of the window interval on any axis, so last windows snap to the end
SHAPE = (72, 64, 56)


@pytest.fixture(scope="module")
def cluster():
    """A local Dask cluster of 2 single-threaded worker processes (the CI set-up); yields its address."""
    from distributed import Client, LocalCluster

    cl = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    client = Client(cl)
    client.run(__import__, "custom_components.inference.predict_zarr")  # import torch / MONAI once per worker
    yield cl.scheduler_address
    client.close()
    cl.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint_as_training(tiny_network(seed=0), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol")
    return tile_synthetic(str(root / "scroll.zarr"), SHAPE, tile=32, chunks=16, seed=0)


def _out(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[f"{name}/0"][...] for name in ("mask", "probabilities") if name in g}


# ------------------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize("size, roi, overlap, expected", [
    (70, 16, 0.25, [0, 12, 24, 36, 48, 54]),  # interval int(16 * 0.75) = 12; 60 + 16 > 70: snapped to 54
    (40, 16, 0.5, [0, 8, 16, 24]),            # 24 + 16 = 40 reaches the end exactly
    (16, 16, 0.5, [0]),                       # roi == size: one window, interval = roi
    (17, 16, 0.9, [0, 1]),                    # interval int(1.6) = 1
    (33, 8, 0.0, [0, 8, 16, 24, 25]),
])
def test_window_starts_by_hand_and_as_monai_places_them(size, roi, overlap, expected):
    from monai.data.utils import dense_patch_slices

    assert window_starts(size, roi, overlap) == expected
    interval = roi if roi == size else max(1, int(roi * (1 - overlap)))
    monai = sorted({s[0].start for s in dense_patch_slices((size, roi), (roi, roi), (interval, roi))})
    assert monai == expected


def test_padding_of_an_axis_shorter_than_the_window():
    grid = WindowGrid((23, 30, 9), (8, 8, 12), 0.5)
    assert grid.padded == (23, 30, 12) and grid.pad == (0, 0, 1)  # (12 - 9) // 2 = 1 before, 2 after
    assert grid.starts[2] == [0]


def _conv(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(2, 1, 3, padding=1))
    return net.eval()


@pytest.fixture
def one_thread():
    """Thousands of tiny tensor operations: a second OpenMP thread on a busy 2-core machine waits at every one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape, overlap", [((23, 30, 9), 0.5), ((20, 17, 26), 0.25)])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_blocks_of_any_size_reassemble_the_whole_volume_sliding_window(shape, overlap, sw_batch_size, one_thread):
    """Two members at their own windows (8^3 and 12^3, one axis shorter than 12: padded), weights 1 and 3: every
    block partition gives inference.json's ``EnsembleSlidingWindowInferer`` logits, bit for bit one window at a
    time; in batches of 3 a window's logits depend on the other windows of its batch by an ulp (the CPU
    convolution), which a block cannot reproduce (its batches hold other windows)."""
    from custom_components.inference.ensemble import EnsembleSlidingWindowInferer, LogitEnsemble

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
    ens = LogitEnsemble([_conv(1), _conv(2)], weights=[1, 3])
    rois = [(8, 8, 8), (12, 12, 12)]
    x = torch.from_numpy(raw).float()[None, None] / 255
    with torch.no_grad():
        inferer = EnsembleSlidingWindowInferer(rois, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
                                               progress=False)
        expected = inferer(x, ens)[0, 0].numpy()
    members = [Member(WindowGrid(shape, roi, overlap), lambda t, i=i: ens.member_logits(i, t), ens.weights[i])
               for i, roi in enumerate(rois)]
    reads = []

    def read(box):
        reads.append(box)
        return raw[tuple(slice(a, b) for a, b in box)]

    for block in ((7, 11, 6), (11, 16, 13)):
        logits, prob = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for k, (_, box) in enumerate(block_boxes(shape, block)):
            with torch.no_grad():
                z, _ = fused_logits(members, box, read, sw_batch_size=sw_batch_size)
            logits[tuple(slice(a, b) for a, b in box)] = z.numpy()
            if k == 0:  # predict_box is sigmoid(fused_logits)
                p, _ = predict_box(members, box, read, sw_batch_size=sw_batch_size)
                assert np.array_equal(p, torch.sigmoid(z).numpy())
            prob[tuple(slice(a, b) for a, b in box)] = torch.sigmoid(z).numpy()
        if sw_batch_size == 1:
            assert np.array_equal(logits, expected), (block, float(np.abs(logits - expected).max()))
        else:
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-expected.astype(np.float64))), rtol=0, atol=3e-7)
    assert all(a >= 0 and b <= n for box in reads for (a, b), n in zip(box, shape))  # never read outside the volume


# ------------------------------------------------------------------------------------------ exactness vs inference.json


@pytest.mark.slow
def test_zarr_mask_equals_inference_json_on_the_same_volume_as_tiff(volume, ckpt, cluster, tmp_path, one_thread):
    """Raw mask (threshold only) of the Zarr path = inference.json's on the TIFF, except voxels whose probability
    is within 1/255 of the threshold, for blocks of 32 and 48 on 1 and 2 workers; the uint8 probabilities of the
    two block sizes differ by at most 1 (rounding of an ulp apart); each worker loads the network once."""
    import tifffile
    from monai.bundle import ConfigWorkflow

    tif = tmp_path / "tif"
    tif.mkdir()
    tifffile.imwrite(tif / "vol.tif", zarr.open_array(volume, mode="r")[...])
    wf = ConfigWorkflow(workflow_type="infer", config_file=INFER_JSON, dataset_dir=str(tif), ckpt_path=ckpt, device="cpu",
                        amp=False, min_component_size=0, fill_holes=False, output_dir=str(tmp_path / "pred"),
                        window_progress=False)
    wf.initialize()
    wf.run()
    reference = tifffile.imread(tmp_path / "pred" / "vol.tif")
    runs = {}
    for block, scheduler, workers in ((32, "local", 1), (48, cluster, None)):
        out = tmp_path / f"b{block}.zarr"
        summary = predict_zarr(volume, str(out), ckpt, block=block, chunk=16, scheduler=scheduler, workers=workers,
                               save_probabilities=True, progress=False)
        assert summary["blocks_run"] == summary["blocks_total"] == len(block_boxes(SHAPE, (block,) * 3))
        runs[block] = _out(out)
        near = np.abs(runs[block]["probabilities"] / 255.0 - 0.5) <= 1 / 255
        differ = runs[block]["mask"] != reference
        assert not (differ & ~near).any(), f"block {block}: {int((differ & ~near).sum())} voxels differ away from 0.5"
        print(f"block {block}: {int(differ.sum())} voxels differ from inference.json, {int(near.sum())} lie within 1/255")
        if workers == 1:
            (w,) = summary["workers"].values()
            assert w["blocks"] == summary["blocks_run"] > 1 and w["network_loads"] == 1
        else:
            assert sum(w["blocks"] for w in summary["workers"].values()) == summary["blocks_run"]
    assert np.abs(runs[32]["probabilities"].astype(int) - runs[48]["probabilities"]).max() <= 1
    near = np.abs(runs[32]["probabilities"] / 255.0 - 0.5) <= 1 / 255
    assert not ((runs[32]["mask"] != runs[48]["mask"]) & ~near).any()


# ------------------------------------------------------------------------------------------ post-processing per block


def _smooth_probability(shape, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return ((p - p.min()) / (p.max() - p.min())).astype(np.float32)


def _per_block(post: BlockPostProcess, prob: np.ndarray, block) -> np.ndarray:
    out = np.zeros(prob.shape, np.uint8)
    for _, box in block_boxes(prob.shape, block):
        grown = grow_box(box, post.margin, prob.shape)
        out[tuple(slice(a, b) for a, b in box)] = post(prob[tuple(slice(a, b) for a, b in grown)], grown, box)
    return out


@pytest.mark.parametrize("steps", [
    [GaussianSmooth(1.0), Binarize(0.5), BinaryMedian(2), BinaryClosing(1), PlugHoles()],
    [Binarize(0.45), BinaryClosing(2, structure="ball"), BinaryMedian(1)],
])
def test_per_voxel_steps_per_block_equal_the_whole_volume(steps):
    prob = _smooth_probability((26, 21, 30))
    post = BlockPostProcess(PostProcess(steps=steps))
    reach = {GaussianSmooth: 4, Binarize: 0, BinaryMedian: None, BinaryClosing: None, PlugHoles: 1}
    expected_margin = sum(4 if isinstance(s, GaussianSmooth) else s.iterations if isinstance(s, BinaryMedian)
                          else 2 * s.radius if isinstance(s, BinaryClosing) else reach[type(s)] for s in steps)
    assert post.margin == expected_margin and post.exact
    whole = PostProcess(steps=steps).apply_volume(prob).astype(np.uint8)
    assert whole.any() and not whole.all()
    for block in ((8, 8, 8), (7, 11, 5)):
        assert np.array_equal(_per_block(post, prob, block), whole), block


def test_hysteresis_is_per_block_context_and_says_so():
    prob = _smooth_probability((24, 24, 24), seed=3)
    steps = [Binarize(0.6, hysteresis_low=0.4)]
    whole = PostProcess(steps=steps).apply_volume(prob).astype(np.uint8)
    wide = BlockPostProcess(PostProcess(steps=steps), hysteresis_margin=24)  # the context holds the whole volume
    assert not wide.exact and wide.margin == 24
    assert np.array_equal(_per_block(wide, prob, (8, 8, 8)), whole)
    narrow = _per_block(BlockPostProcess(PostProcess(steps=steps), hysteresis_margin=1), prob, (8, 8, 8))
    assert np.array_equal(narrow & ~whole, np.zeros_like(whole))  # only ever drops weak voxels, never adds


@pytest.mark.parametrize("settings, step", [
    ({"min_component_size": 64}, "dust"),
    ({"fill_holes": True}, "fill_holes"),
])
def test_steps_that_need_whole_components_are_refused_by_name(settings, step, tmp_path, volume, ckpt):
    with pytest.raises(ValueError, match=rf"step '{step}' needs whole connected components"):
        block_postprocess(**settings)
    pipeline = tmp_path / "post.json"
    pipeline.write_text(json.dumps({"steps": [{"name": "binarize", "threshold": 0.5}, {"name": "tunnel_repair"}]}))
    with pytest.raises(ValueError, match="step 'tunnel_repair' needs whole connected components"):
        block_postprocess(path=str(pipeline))
    with pytest.raises(ValueError, match=step):
        predict_zarr(volume, str(tmp_path / "o.zarr"), ckpt, **settings)
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------------------ input and output


def test_intensity_mapping_by_hand():
    x = torch.tensor([0, 1000, 1500, 2000, 3000], dtype=torch.int32)
    assert intensity_scale(x, 1000, 2000).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(intensity_scale(u8, 0, 255), u8.float() / 255)


def test_uint16_needs_an_intensity_range_and_clipped_voxels_are_counted(tmp_path, ckpt, cluster):
    u8 = tile_synthetic(str(tmp_path / "u8.zarr"), (32, 32, 32), tile=32, chunks=16, seed=1)
    u16 = tile_synthetic(str(tmp_path / "u16.zarr"), (32, 32, 32), tile=32, chunks=16, seed=1, dtype="uint16", scale=257)
    with pytest.raises(ValueError, match=r"uint16.*--intensity_range LO HI"):
        predict_zarr(u16, str(tmp_path / "a.zarr"), ckpt, block=32)
    common = dict(block=32, scheduler=cluster, save_probabilities=True, progress=False)
    predict_zarr(u8, str(tmp_path / "ref.zarr"), ckpt, **common)
    predict_zarr(u16, str(tmp_path / "full.zarr"), ckpt, intensity_range=(0, 65535), **common)
    ref, full = _out(tmp_path / "ref.zarr"), _out(tmp_path / "full.zarr")
    near = np.abs(ref["probabilities"] / 255.0 - 0.5) <= 1 / 255
    assert not ((ref["mask"] != full["mask"]) & ~near).any()  # 257 x / 65535 = x / 255
    s = predict_zarr(u16, str(tmp_path / "part.zarr"), ckpt, intensity_range=(0, 30000), **common)
    raw = zarr.open_array(u16, mode="r")[...]
    assert s["clipped_voxels"] == int((raw > 30000).sum()) > 0


def _multiscale(path, zarr_format):
    """A two-level OME-Zarr group written by hand: level 0 (32^3, 7.91 um), level 1 (16^3, 15.82 um, shifted)."""
    rng = np.random.default_rng(0)
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [7.91] * 3}]},
                {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [15.82] * 3},
                                                            {"type": "translation", "translation": [3.955] * 3}]}]
    ms = {"name": "scan", "axes": axes, "datasets": datasets}
    attrs = {"multiscales": [{"version": "0.4", **ms}]} if zarr_format == 2 else {"ome": {"version": "0.5", "multiscales": [ms]}}
    g = zarr.open_group(path, mode="w", zarr_format=zarr_format, attributes=attrs)
    g.create_array("0", data=rng.integers(0, 256, (32, 32, 32), dtype=np.uint8), chunks=(16, 16, 16))
    g.create_array("1", data=rng.integers(0, 256, (16, 16, 16), dtype=np.uint8), chunks=(16, 16, 16))
    return path


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_levels_and_voxel_size_are_read(tmp_path, zarr_format):
    path = _multiscale(str(tmp_path / "scan.zarr"), zarr_format)
    level0, level1 = open_input(path), open_input(path, level=1)
    assert level0.shape == (32, 32, 32) and level0.voxel_size_um() == (7.91, 7.91, 7.91)
    assert level1.shape == (16, 16, 16) and level1.voxel_size_um() == (15.82, 15.82, 15.82)
    assert level1.translation == (3.955, 3.955, 3.955)
    named = open_input(f"{path}::1")  # the level's array named directly: its group still gives the voxel size
    assert named.voxel_size_um() == (15.82,) * 3 and named.level == 1
    with pytest.raises(ValueError, match=r"--level 2 does not exist.*levels 0..1"):
        open_input(path, level=2)
    with pytest.raises(ValueError, match="no array or group 'nope'"):
        open_input(f"{path}::nope")


def test_ome_zarr_output_metadata_and_voxel_size_warning(tmp_path, ckpt, cluster):
    path = _multiscale(str(tmp_path / "scan.zarr"), 3)
    out = tmp_path / "pred.zarr"
    s = predict_zarr(path, str(out), ckpt, level=1, block=16, scheduler=cluster, progress=False)
    assert "15.82" in s["voxel_size_warning"] and "7.91" in s["voxel_size_warning"]
    meta = json.loads((out / "mask" / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5"
    (ms,) = meta["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and {a["unit"] for a in ms["axes"]} == {"micrometer"}
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [15.82] * 3}, {"type": "translation", "translation": [3.955] * 3}]}]
    assert zarr.open_array(str(out / "mask" / "0"), mode="r").shape == (16, 16, 16)
    out2 = tmp_path / "pred_v2.zarr"
    predict_zarr(_multiscale(str(tmp_path / "scan2.zarr"), 2), str(out2), ckpt, block=16, scheduler=cluster,
                 progress=False, save_probabilities=True)
    attrs = json.loads((out2 / "probabilities" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [7.91] * 3}]
    assert (out2 / "mask" / "0" / "1" / "1" / "1").is_file()  # '/'-separated chunk keys; all 8 chunks stored


def test_missing_and_corrupt_input_chunks_are_named(tmp_path, ckpt, cluster):
    path = tile_synthetic(str(tmp_path / "in.zarr"), (32, 32, 32), tile=32, chunks=16, seed=2)
    vol = open_input(path)
    os.remove(os.path.join(path, "c", "1", "0", "1"))
    with pytest.raises(ValueError, match=r"chunk 'c/1/0/1' \(voxels z 16:32, y 0:16, x 16:32\).*--missing_chunks fill"):
        read_box(vol, ((8, 24), (0, 8), (8, 24)))
    filled = read_box(vol, ((16, 32), (0, 16), (16, 32)), missing="fill")
    assert filled.shape == (16, 16, 16) and not filled.any()
    assert read_box(vol, ((0, 16), (0, 16), (0, 16))).shape == (16, 16, 16)  # untouched chunks read
    with open(os.path.join(path, "c", "0", "0", "0"), "wb") as fh:
        fh.write(b"not a zstd frame")
    with pytest.raises(ValueError, match=r"chunk 'c/0/0/0' \(voxels z 0:16, y 0:16, x 0:16\)"):
        read_box(vol, ((0, 16), (0, 20), (0, 16)))  # c/0/0/0 and c/0/1/0
    with pytest.raises(ValueError, match=r"block \[\d, \d, \d\].*chunk 'c/(0/0/0|1/0/1)'.*rerun the same command"):
        predict_zarr(path, str(tmp_path / "o.zarr"), ckpt, block=16, scheduler=cluster, progress=False)


# ------------------------------------------------------------------------------------------ blocks, regions, resume


def test_blocks_are_whole_chunks_and_regions_widen_to_blocks():
    boxes = block_boxes((70, 40, 33), (32, 32, 32), parse_region("10:20,:,30:33", (70, 40, 33)))
    assert sorted(i for i, _ in boxes) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]  # z 10:20 -> block z 0:32
    assert dict(boxes)[(0, 1, 1)] == ((0, 32), (32, 40), (32, 33))  # clipped to the volume
    for region, message in (("0:5,0:5", "three ranges"), ("5:5,:,:", "empty or outside"), ("0:80,:,:", "outside")):
        with pytest.raises(ValueError, match=message):
            parse_region(region, (70, 40, 33))


def test_block_not_a_multiple_of_the_chunk_is_refused(volume, ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--block \[40, 40, 40\] must be a multiple of the output --chunk \[16, 16, 16\]"):
        predict_zarr(volume, str(tmp_path / "o.zarr"), ckpt, block=40, chunk=16)


def test_finished_run_is_skipped_and_other_settings_are_refused(tmp_path, ckpt, cluster):
    path = tile_synthetic(str(tmp_path / "in.zarr"), (32, 32, 32), tile=32, chunks=16, seed=4)
    out = str(tmp_path / "o.zarr")
    first = predict_zarr(path, out, ckpt, block=16, scheduler=cluster, progress=False, region="0:10,:,:")
    assert first["blocks_run"] == 4 and not first["resumed"]  # z 0:10 widened to the blocks z 0:16
    again = predict_zarr(path, out, ckpt, block=16, scheduler=cluster, progress=False)
    assert again["resumed"] and again["blocks_skipped"] == 4 and again["blocks_run"] == 4
    done = predict_zarr(path, out, ckpt, block=16, scheduler="nowhere:1", progress=False)  # nothing left: no cluster
    assert done["blocks_run"] == 0 and done["blocks_skipped"] == 8
    with pytest.raises(ValueError, match=r"other settings \(overlap: 0.5 then, 0.25 now\)"):
        predict_zarr(path, out, ckpt, block=16, overlap=0.25, scheduler=cluster, progress=False)
    redo = predict_zarr(path, out, ckpt, block=16, overlap=0.25, scheduler=cluster, progress=False, overwrite=True)
    assert redo["blocks_run"] == 8 and not redo["resumed"]


def _cli(args, env=None, **kw):
    return subprocess.Popen([PYTHON, "-m", "custom_components.inference.predict_zarr", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(tmp_path, ckpt, cluster):
    path = tile_synthetic(str(tmp_path / "in.zarr"), (48, 48, 32), tile=32, chunks=16, seed=5)
    out = tmp_path / "killed.zarr"
    args = ["--input", path, "--output", str(out), "--ckpt_path", ckpt, "--block", "16", "--workers", "1",
            "--save_probabilities", "true", "--progress", "false"]
    env = {**os.environ, SLOW_BLOCK_ENV: "0.5", "OMP_NUM_THREADS": "1"}
    proc = _cli(args, env=env, start_new_session=True)
    markers = out / "blocks_done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and any(f.is_file() for f in markers.rglob("*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler and its worker processes
    proc.communicate()
    done_before = sum(1 for f in markers.rglob("*") if f.is_file())
    assert 1 <= done_before < 18
    proc = _cli(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["blocks_skipped"] >= done_before
    assert summary["blocks_skipped"] + summary["blocks_run"] == 18
    predict_zarr(path, str(tmp_path / "whole.zarr"), ckpt, block=16, scheduler=cluster, save_probabilities=True,
                 progress=False)
    resumed, whole = _out(out), _out(tmp_path / "whole.zarr")
    assert np.array_equal(resumed["mask"], whole["mask"]) and np.array_equal(resumed["probabilities"], whole["probabilities"])


def test_bundle_config_predicts_as_the_function_does(tmp_path, volume, ckpt, cluster):
    from monai.bundle import ConfigWorkflow

    config = os.path.join(REPO, "bundle", "configs", "predict_zarr.json")
    region = "0:32,0:32,0:32"
    wf = ConfigWorkflow(workflow_type=None, config_file=config, input=volume, output=str(tmp_path / "bundle.zarr"),
                        ckpt_path=ckpt, block=32, scheduler=cluster, save_probabilities=True, progress=False,
                        region=region)
    wf.initialize()
    wf.run()
    summary = wf.parser.get_parsed_content("summary")
    assert summary["blocks_run"] == 1
    predict_zarr(volume, str(tmp_path / "fn.zarr"), ckpt, block=32, scheduler=cluster, save_probabilities=True,
                 progress=False, region=region)
    a, b = _out(tmp_path / "bundle.zarr"), _out(tmp_path / "fn.zarr")
    assert np.array_equal(a["probabilities"], b["probabilities"]) and a["probabilities"][:32, :32, :32].any()


def test_cli_rejects_a_contradicting_network_setting_before_any_volume(tmp_path, volume, ckpt):
    proc = _cli(["--input", volume, "--output", str(tmp_path / "o.zarr"), "--ckpt_path", ckpt, "--filters", "8", "16", "32"])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--filters [8, 16, 32] contradicts checkpoint" in stderr
    assert not (tmp_path / "o.zarr").exists()
