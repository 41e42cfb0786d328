"""custom_components.data.io: VolumeReader / TiffWriter / read_volume / read_tiff_header / write_volume."""

import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from conftest import write_tiff
from monai.data import image_writer
from monai.transforms import LoadImage, LoadImaged, SaveImage, SaveImaged

from custom_components.data import io as vio
from custom_components.data.io import TiffWriter, VolumeReader, read_tiff_header, read_volume, write_volume

SHAPE = (4, 5, 6)  # Z, Y, X all different, so an axis swap cannot go unnoticed


@pytest.fixture
def vol():
    return np.random.default_rng(1).integers(0, 256, size=SHAPE, dtype=np.uint8)


def tmp_leftovers(folder):
    return [f for f in os.listdir(folder) if ".tmp" in f]


# ------------------------------------------------------------------------------------------ reading


def test_read_volume_keeps_zyx_order_and_dtype(tmp_path, vol):
    p = write_tiff(tmp_path / "a.tif", vol)
    out = read_volume(p)
    assert out.shape == SHAPE and out.dtype == np.uint8
    assert np.array_equal(out, vol)
    assert out[1, 2, 3] == vol[1, 2, 3]  # page 1, row 2, column 3


def test_read_tiff_header_does_not_decode(tmp_path, vol, monkeypatch):
    p = write_tiff(tmp_path / "a.tiff", vol)

    def boom(*a, **k):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", boom)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", boom)
    shape, dtype = read_tiff_header(p)
    assert shape == SHAPE and dtype == np.uint8


def test_missing_file_is_value_error_naming_it(tmp_path):
    p = str(tmp_path / "nope.tif")
    for f in (read_volume, read_tiff_header):
        with pytest.raises(ValueError, match="nope.tif: file does not exist"):
            f(p)


def test_garbage_file_is_value_error_naming_it(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"this is not a tiff" * 10)
    with pytest.raises(ValueError, match=r"bad\.tif: cannot be read as TIFF") as e:
        read_volume(p)
    assert e.type is vio.VolumeFileError  # ours, not tifffile's TiffFileError


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_tiff_is_value_error(tmp_path, keep):
    # 64 pages, incompressible: truncation cuts the IFD chain (early) or the last page's data (late);
    # tifffile alone returns a shorter (2D) series with only a log message
    arr = np.random.default_rng(2).integers(0, 256, size=(64, 32, 32), dtype=np.uint8)
    full = write_tiff(tmp_path / "full.tif", arr).read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(full[: int(len(full) * keep)])
    for f in (read_tiff_header, read_volume):
        with pytest.raises(ValueError, match=r"cut\.tif: .*(truncated|corrupt)"):
            f(p)


def test_unknown_extension(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"a\.png: unsupported file type"):
        read_volume(p)


# ------------------------------------------------------------------------------------------ writing


def test_write_volume_tiff_is_lzw_multipage_and_exact(tmp_path, vol):
    p = tmp_path / "w.tif"
    assert write_volume(p, vol) == str(p)
    with tifffile.TiffFile(p) as tf:
        assert len(tf.pages) == SHAPE[0]
        assert tf.pages[0].shape == SHAPE[1:]
        assert tf.pages[0].compression == tifffile.COMPRESSION.LZW
        assert tf.series[0].dtype == np.uint8
    assert np.array_equal(tifffile.imread(p), vol)
    assert tmp_leftovers(tmp_path) == []


def test_tiff_round_trip_is_byte_exact(tmp_path, vol):
    src = write_tiff(tmp_path / "src.tif", vol)
    a = read_volume(src)
    write_volume(tmp_path / "copy.tif", a)
    b = read_volume(tmp_path / "copy.tif")
    assert b.dtype == a.dtype and b.tobytes() == vol.tobytes()


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "V.NII.GZ"])
def test_nifti_round_trip_is_byte_exact(tmp_path, vol, name):
    p = tmp_path / name
    write_volume(p, vol)
    img = nib.load(p)
    assert img.shape == SHAPE  # NIfTI (i, j, k) = (Z, Y, X): the array is stored unchanged
    assert np.allclose(img.affine, np.eye(4)) and tuple(img.header.get_zooms()) == (1.0, 1.0, 1.0)
    assert img.get_data_dtype() == np.uint8
    out = read_volume(p)
    assert out.dtype == np.uint8 and out.tobytes() == vol.tobytes()
    assert tmp_leftovers(tmp_path) == []


def test_itk_formats_round_trip(tmp_path, vol):
    import itk

    for name in ("v.nrrd", "v.mha"):
        write_volume(tmp_path / name, vol)
        assert tuple(itk.size(itk.imread(str(tmp_path / name)))) == SHAPE[::-1]  # ITK (x, y, z) = (X, Y, Z)
        out = read_volume(tmp_path / name)
        assert out.dtype == np.uint8 and out.tobytes() == vol.tobytes()
        img = LoadImage(reader=VolumeReader(), image_only=True, dtype=None)(str(tmp_path / name))
        assert tuple(img.shape) == SHAPE


def test_write_volume_replaces_atomically_and_cleans_up(tmp_path, vol, monkeypatch):
    p = tmp_path / "w.tif"
    write_volume(p, vol)
    write_volume(p, vol[::-1].copy())
    assert np.array_equal(read_volume(p), vol[::-1])

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", fail)
    with pytest.raises(OSError, match="disk full"):
        write_volume(p, vol)
    assert np.array_equal(read_volume(p), vol[::-1])  # the old file is intact
    assert tmp_leftovers(tmp_path) == []


def test_write_volume_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        write_volume(tmp_path / "a.tif", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png"):
        write_volume(tmp_path / "a.png", np.zeros((2, 2, 2), np.uint8))


# ------------------------------------------------------------------------------------------ MONAI


def test_volume_reader_with_load_image(tmp_path, vol):
    p = str(write_tiff(tmp_path / "a.tif", vol))
    r = VolumeReader()
    assert r.verify_suffix(p) and r.verify_suffix([p, "b.TIFF"]) and not r.verify_suffix("a.nii.gz")
    img = LoadImage(reader=r, image_only=True, dtype=None)(p)
    assert tuple(img.shape) == SHAPE and img.dtype == torch.uint8
    assert np.array_equal(img.numpy(), vol)
    m = img.meta
    assert m["filename_or_obj"] == p
    assert list(m["spatial_shape"]) == list(SHAPE)
    assert np.allclose(np.asarray(m["affine"]), np.eye(4))
    assert m["original_channel_dim"] == "no_channel"
    img = LoadImage(reader=r, image_only=True, dtype=None, ensure_channel_first=True)(p)
    assert tuple(img.shape) == (1,) + SHAPE


def test_volume_reader_by_dotted_name_in_loadimaged(tmp_path, vol):
    p = str(write_tiff(tmp_path / "a.tif", vol))
    d = LoadImaged("image", reader="custom_components.data.io.VolumeReader", ensure_channel_first=True)({"image": p})
    assert tuple(d["image"].shape) == (1,) + SHAPE
    assert np.array_equal(d["image"][0].numpy(), vol.astype(np.float32))  # LoadImage's default float32


def test_volume_reader_nifti_and_stacking(tmp_path, vol):
    t = str(write_tiff(tmp_path / "a.tif", vol))
    n = write_volume(tmp_path / "b.nii.gz", 255 - vol)
    img = LoadImage(reader=VolumeReader(), image_only=True, dtype=None)(n)
    assert np.array_equal(img.numpy(), 255 - vol)
    both = LoadImage(reader=VolumeReader(), image_only=True, dtype=None)([t, n])
    assert tuple(both.shape) == (2,) + SHAPE
    assert np.array_equal(both[0].numpy(), vol) and np.array_equal(both[1].numpy(), 255 - vol)


def test_volume_reader_stacking_metadata(tmp_path, vol):
    """Several files: the first file's metadata; no channel -> stacked at a new axis 0 (channel dim 0);
    channel_dim=k -> concatenated along k, spatial_shape without it."""
    a, b = str(write_tiff(tmp_path / "a.tif", vol)), str(write_tiff(tmp_path / "b.tif", 255 - vol))
    img, meta = VolumeReader().get_data(VolumeReader().read([a, b]))
    assert img.shape == (2,) + SHAPE and np.array_equal(img[1], 255 - vol)
    assert meta["filename_or_obj"] == a and meta["original_channel_dim"] == 0
    assert list(meta["spatial_shape"]) == list(SHAPE) and np.array_equal(meta["affine"], np.eye(4))
    img, meta = VolumeReader(channel_dim=0).get_data(VolumeReader().read([a, b]))
    assert img.shape == (8, 5, 6) and np.array_equal(img[4:], 255 - vol)
    assert meta["original_channel_dim"] == 0 and list(meta["spatial_shape"]) == [5, 6]
    img, meta = VolumeReader().get_data(VolumeReader().read(a))
    assert img.shape == SHAPE and meta["original_channel_dim"] == "no_channel"


def test_reading_imports_neither_monai_nor_itk_until_the_adapters_are_named(tmp_path, vol):
    import subprocess
    import sys

    p = str(write_tiff(tmp_path / "a.tif", vol))
    code = (
        "import sys; from custom_components.data import io; "
        f"io.read_tiff_header({p!r}); io.read_volume({p!r}); "
        "print(sorted(m for m in ('monai', 'itk') if m in sys.modules)); "
        "from custom_components.data.io import TiffWriter; from monai.data import image_writer; "
        "print(image_writer.resolve_writer('tif')[0] is TiffWriter, io.TiffWriter.__module__, io.TiffWriter.__qualname__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True custom_components.data.io TiffWriter"]


def test_volume_reader_bad_file_is_value_error(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"bad\.tif: cannot be read as TIFF"):
        LoadImage(reader=VolumeReader(), image_only=True)(str(p))
    with pytest.raises(ValueError, match=r"missing\.tif: file does not exist"):
        LoadImaged("image", reader=VolumeReader())({"image": str(tmp_path / "missing.tif")})


def test_tiff_writer_registered_for_tif():
    assert image_writer.resolve_writer("tif")[0] is TiffWriter
    assert image_writer.resolve_writer(".tiff")[0] is TiffWriter
    assert image_writer.NibabelWriter in image_writer.resolve_writer("nii.gz")  # MONAI's defaults kept


@pytest.mark.parametrize("writer", ["custom_components.data.io.TiffWriter", TiffWriter, None])
def test_monai_round_trip_is_byte_exact(tmp_path, vol, writer):
    src = str(write_tiff(tmp_path / "case7.tif", vol))
    img = LoadImage(reader=VolumeReader(), image_only=True, dtype=None, ensure_channel_first=True)(src)
    out_dir = tmp_path / "out"
    SaveImage(
        output_dir=str(out_dir), output_postfix="", output_ext=".tif", output_dtype=np.uint8,
        separate_folder=False, print_log=False, writer=writer,
    )(img)
    saved = out_dir / "case7.tif"
    assert sorted(os.listdir(out_dir)) == ["case7.tif"]
    with tifffile.TiffFile(saved) as tf:
        assert tf.pages[0].compression == tifffile.COMPRESSION.LZW and len(tf.pages) == SHAPE[0]
    back = read_volume(saved)
    assert back.dtype == np.uint8 and back.tobytes() == vol.tobytes()


def test_saveimaged_float_prediction(tmp_path):
    pred = torch.zeros((1,) + SHAPE, dtype=torch.float32)
    pred[0, 1, 2, 3] = 1.0
    from monai.data import MetaTensor

    d = {"pred": MetaTensor(pred, meta={"filename_or_obj": "p1.tif", "spatial_shape": np.array(SHAPE)})}
    SaveImaged("pred", output_dir=str(tmp_path), output_postfix="", output_ext=".tif", separate_folder=False,
               print_log=False, writer="custom_components.data.io.TiffWriter")(d)
    out = read_volume(tmp_path / "p1.tif")
    assert out.dtype == np.uint8 and out.sum() == 1 and out[1, 2, 3] == 1


def test_tiff_writer_shapes_and_values(tmp_path):
    w = TiffWriter()
    w.set_data_array(np.ones((1,) + SHAPE, np.uint8))  # leading channel of size 1 squeezed
    assert w.data_obj.shape == SHAPE
    w.set_data_array(np.ones(SHAPE, np.uint8), channel_dim=None)
    assert w.data_obj.shape == SHAPE
    for bad in [(5, 6), (2,) + SHAPE, (1, 1) + SHAPE]:
        with pytest.raises(ValueError, match=str(list(bad)).replace("[", r"\[").replace("]", r"\]")):
            TiffWriter().set_data_array(np.zeros(bad, np.uint8))
    w = TiffWriter()
    w.set_data_array(np.full(SHAPE, 0.5, np.float32), channel_dim=None)
    with pytest.raises(ValueError, match=r"not integers in \[0, 255\]"):
        w.write(tmp_path / "f.tif")
    w = TiffWriter(scale=255)
    w.set_data_array(np.full(SHAPE, 0.5, np.float32), channel_dim=None)
    w.write(tmp_path / "s.tif")
    assert np.all(read_volume(tmp_path / "s.tif") == 128)  # rint(0.5 * 255) = 128
    w = TiffWriter()
    w.set_data_array(np.full(SHAPE, 300, np.int32), channel_dim=None)
    with pytest.raises(ValueError, match=r"\[300, 300\] do not fit uint8"):
        w.write(tmp_path / "i.tif")
    assert tmp_leftovers(tmp_path) == []
