"""Reading and writing 3D volumes: uint8 multi-page TIFF stacks (the Kaggle format), NIfTI and ITK formats.

Axis convention: every array this module returns or accepts is a numpy array in the axis order of its
file's *numpy view*, which for our data is (Z, Y, X):

- TIFF (.tif/.tiff): page index = Z, then the page's rows (Y) and columns (X): ``tifffile`` order, kept
  as is (MONAI's ``ITKReader`` would reverse it to (X, Y, Z)).
- NIfTI (.nii/.nii.gz), via ``nibabel``: the array of ``nibabel`` (``img.dataobj``), i.e. the NIfTI
  index (i, j, k) = (Z, Y, X). ``write_volume`` stores the array unchanged with an identity affine
  (spacing 1, 1, 1), so a volume written here reads back in the same order. (SimpleITK / nnU-Net's
  default reader show the same file as (X, Y, Z); being a pure transpose, that is consistent for
  images, labels and predictions alike.)
- ITK formats (.nrrd/.nhdr/.mha/.mhd), via ``itk``: the C-order array of ``itk.array_from_image``,
  (slowest ... fastest) = (Z, Y, X), i.e. ITK index (x, y, z) = (X, Y, Z), which is what
  ``itk.image_from_array`` (used by ``write_volume`` for .nrrd/.mha) writes; no axis reversal.

Reading decodes into one preallocated array (no intermediate stacks or float copies; NIfTI keeps its
stored dtype, never ``get_fdata``'s float64). TIFF headers are checked before decoding: a truncated or
corrupt file (tifffile's silent "invalid page offset" shortening, data past the end of the file) is a
``ValueError`` naming the file and the problem, as is any other unreadable file.

Writing is atomic: a temporary file in the target folder, fsync, ``os.replace``.

MONAI's side, ``VolumeReader`` (an ``ImageReader``) and ``TiffWriter`` (an ``ImageWriter``, registered for
.tif / .tiff), is defined on first use of either name, so reading a header or a volume imports neither
MONAI nor ``itk`` (MONAI's ``image_writer`` imports ``itk`` eagerly; ``itk`` itself is imported only by the
functions that read or write an ITK format).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from custom_components.atomic import fsync_dir

__all__ = [
    "VolumeFileError",
    "TIFF_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "volume_format",
    "read_tiff_header",
    "read_volume",
    "write_volume",
    "VolumeReader",
    "TiffWriter",
]

TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_ITK_WRITABLE = (".nrrd", ".mha")


class VolumeFileError(ValueError):
    """A volume file that is missing, of an unknown type, truncated or unreadable (message names the file)."""


def volume_format(path) -> str | None:
    """``"tiff"``, ``"nifti"``, ``"itk"`` from the (case-insensitive) file name ending, else ``None``."""
    name = os.fspath(path).lower()
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    return None


# --------------------------------------------------------------------------------------------- TIFF


# tifffile's error messages that mean a broken IFD chain / page structure (truncation, corruption).
# Other records (odd but harmless tags of some writers) pass through untouched.
_TIFF_CORRUPTION = (
    "invalid page offset",
    "invalid offset to page",
    "corrupted tag list",
    "invalid circular reference",
    "failed to reshape",
    "invalid shaped series metadata",
    "shaped series shape does not match",
    "missing data offset",
    "missing data bytecounts",
    "missing bytecounts",
    "incorrect stripbytecounts",
    "incorrect stripoffsets",
    "metadata invalid or corrupted",
)


_LOG = logging.getLogger(__name__)


class _TiffLogCapture(logging.Filter):
    """Silences the ``tifffile`` logger in registered threads, collecting its corruption errors.

    tifffile reports a broken IFD chain or a failed reshape only through its logger and then returns a
    shorter series; we turn those records into a ``ValueError``.
    """

    def __init__(self):
        super().__init__()
        self._records: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        tid = threading.get_ident()
        with self._lock:
            bucket = self._records.get(tid)
        if bucket is None or record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if record.levelno >= logging.ERROR and any(sig in message.lower() for sig in _TIFF_CORRUPTION):
            bucket.append(message)
        else:  # harmless oddities, or noise of a file that fails anyway: keep them out of the console
            _LOG.debug("tifffile: %s", message)
        return False

    @contextlib.contextmanager
    def capture(self):
        tid = threading.get_ident()
        bucket: list[str] = []
        with self._lock:
            outer = self._records.get(tid)
            self._records[tid] = bucket
        try:
            yield bucket
        finally:
            with self._lock:
                if outer is None:
                    self._records.pop(tid, None)
                else:
                    self._records[tid] = outer
                    outer.extend(bucket)


_TIFF_LOG = _TiffLogCapture()
logging.getLogger("tifffile").addFilter(_TIFF_LOG)


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VolumeFileError(f"{path}: file does not exist.")
    if not os.path.isfile(path):
        raise VolumeFileError(f"{path}: is not a file.")


def _tiff_series(tf, path: str, size: int, messages: list[str]):
    """Series 0 of an open ``TiffFile`` after the structural checks; raises ``ValueError``."""
    if not tf.series:
        raise VolumeFileError(f"{path}: TIFF holds no image series.")
    series = tf.series[0]
    pages = tf.pages
    pages.useframes = True  # TiffFrame: parse only what locating the data needs
    n_pages = len(pages)  # walks the whole IFD chain (logs "invalid page offset" when truncated)
    if messages:
        raise VolumeFileError(f"{path}: corrupt or truncated TIFF ({'; '.join(messages[:3])}).")
    if tf.is_shaped:
        meta = tf.shaped_metadata
        want = tuple(meta[0].get("shape", ())) if meta else ()
        if want and int(np.prod(want)) != int(np.prod(series.shape)):
            raise VolumeFileError(
                f"{path}: truncated TIFF: header says shape {list(want)}, the file holds {list(series.shape)} "
                f"({n_pages} pages)."
            )
    for i in range(n_pages):
        page = pages[i]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            if count and offset + count > size:
                raise VolumeFileError(
                    f"{path}: truncated TIFF: page {i} has data up to byte {offset + count}, the file has {size} bytes."
                )
    return series


def _tiff_open_error(path: str, e: Exception) -> VolumeFileError:
    return VolumeFileError(f"{path}: cannot be read as TIFF ({type(e).__name__}: {e}).")


def read_tiff_header(path) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a TIFF's first series from its header alone (no pixel data decoded).

    Also checks that the IFD chain is complete and every page's data lies inside the file, so a
    truncated download is caught here. Raises ``ValueError`` naming the file and the problem.
    """
    import tifffile

    path = os.fspath(path)
    _check_exists(path)
    size = os.path.getsize(path)
    with _TIFF_LOG.capture() as messages:
        try:
            with tifffile.TiffFile(path) as tf:
                series = _tiff_series(tf, path, size, messages)
                return tuple(int(s) for s in series.shape), np.dtype(series.dtype)
        except VolumeFileError:
            raise
        except Exception as e:  # tifffile / struct / OS errors on a broken file
            raise _tiff_open_error(path, e) from None


def _read_tiff(path: str) -> np.ndarray:
    import tifffile

    _check_exists(path)
    size = os.path.getsize(path)
    with _TIFF_LOG.capture() as messages:
        try:
            with tifffile.TiffFile(path) as tf:
                series = _tiff_series(tf, path, size, messages)
                arr = series.asarray()
        except VolumeFileError:
            raise
        except Exception as e:
            raise _tiff_open_error(path, e) from None
        if messages:
            raise VolumeFileError(f"{path}: corrupt TIFF data ({'; '.join(messages[:3])}).")
    return arr


# --------------------------------------------------------------------------------------------- other


def _read_nifti(path: str) -> np.ndarray:
    import nibabel as nib

    _check_exists(path)
    try:
        img = nib.load(path)
        # dataobj keeps the stored dtype (uint8 stays uint8) unless the header asks for scaling
        arr = np.asarray(img.dataobj)
    except Exception as e:
        raise VolumeFileError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e}).") from None
    return arr


def _read_itk(path: str) -> np.ndarray:
    _check_exists(path)
    try:
        import itk

        arr = itk.array_from_image(itk.imread(path))  # C order (z, y, x) of ITK index (x, y, z)
    except Exception as e:
        raise VolumeFileError(f"{path}: cannot be read with ITK ({type(e).__name__}: {e}).") from None
    return np.asarray(arr)


def read_volume(path) -> np.ndarray:
    """The array of a TIFF / NIfTI / ITK file, chosen by extension, in the order of the module docstring.

    Raises ``ValueError`` naming the file for a missing, unknown-format or unreadable file.
    """
    path = os.fspath(path)
    fmt = volume_format(path)
    if fmt == "tiff":
        return _read_tiff(path)
    if fmt == "nifti":
        return _read_nifti(path)
    if fmt == "itk":
        return _read_itk(path)
    raise VolumeFileError(
        f"{path}: unsupported file type; expected one of {list(TIFF_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES)}."
    )


# --------------------------------------------------------------------------------------------- writing


def _suffix_of(path: str) -> str:
    low = path.lower()
    for s in (".nii.gz",) + TIFF_SUFFIXES + (".nii",) + ITK_SUFFIXES:
        if low.endswith(s):
            return path[len(path) - len(s):]
    return os.path.splitext(path)[1]


def write_volume(path, array, compression: str | None = "lzw") -> str:
    """Write a 3D array to ``path`` atomically (tmp file in the same folder, fsync, ``os.replace``).

    - .tif/.tiff: multi-page TIFF, one page per index of axis 0, dtype kept, ``compression`` as
      tifffile names it ("lzw" default, ``None`` for none), photometric minisblack.
    - .nii/.nii.gz: NIfTI-1, array stored unchanged, identity affine (spacing 1, 1, 1), sform/qform code 1.
    - .nrrd/.mha: ``itk.image_from_array`` (see the module docstring for the axis convention).

    Returns ``path``. Raises ``ValueError`` naming the shape for a non-3D array, or the file for an
    unsupported extension.
    """
    path = os.fspath(path)
    arr = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    if arr.ndim != 3:
        raise ValueError(f"{path}: write_volume expects a 3D (Z, Y, X) array, got shape {list(arr.shape)}.")
    low = path.lower()
    if not (low.endswith(TIFF_SUFFIXES) or low.endswith(NIFTI_SUFFIXES) or low.endswith(_ITK_WRITABLE)):
        raise ValueError(
            f"{path}: write_volume supports {list(TIFF_SUFFIXES + NIFTI_SUFFIXES + _ITK_WRITABLE)}, not this extension."
        )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = _suffix_of(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[: -len(suffix) or None]}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        if low.endswith(TIFF_SUFFIXES):
            import tifffile

            with open(tmp, "wb") as fh:
                tifffile.imwrite(fh, np.ascontiguousarray(arr), compression=compression, photometric="minisblack")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            if low.endswith(NIFTI_SUFFIXES):
                import nibabel as nib

                img = nib.Nifti1Image(np.ascontiguousarray(arr), np.eye(4))
                img.header.set_xyzt_units("mm")
                img.set_sform(np.eye(4), code=1)
                img.set_qform(np.eye(4), code=1)
                nib.save(img, tmp)
            else:
                import itk

                itk.imwrite(itk.image_from_array(np.ascontiguousarray(arr)), tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return path


# --------------------------------------------------------------------------------------------- MONAI


class _VolumeFile:
    """What ``VolumeReader.read`` returns: a file name; decoding waits for ``get_data``."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"_VolumeFile({self.path!r})"


def _to_uint8(arr: np.ndarray, scale: float | None, where: str) -> np.ndarray:
    """``arr`` as uint8, exactly; raises ``ValueError`` when values are not integers in [0, 255]."""
    if scale:
        arr = np.clip(np.asarray(arr, np.float64), 0.0, 1.0) * float(scale)
        arr = np.rint(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: values in [{lo}, {hi}] do not fit uint8 (dtype {arr.dtype}).")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: NaN/inf values cannot be written as uint8 (dtype {arr.dtype}).")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255 or not np.array_equal(arr, np.rint(arr)):
            raise ValueError(
                f"{where}: {arr.dtype} values in [{lo}, {hi}] are not integers in [0, 255]; threshold the "
                "prediction first or pass scale=255 for values in [0, 1]."
            )
        return arr.astype(np.uint8)
    raise ValueError(f"{where}: dtype {arr.dtype} cannot be written as uint8.")


_MONAI_NAMES = ("VolumeReader", "TiffWriter")
_BUILD_LOCK = threading.Lock()


def _monai_adapters() -> dict:
    """``{"VolumeReader": ..., "TiffWriter": ...}``, MONAI subclasses, with the writer registered for ".tif" /
    ".tiff". Defined on first use (module ``__getattr__``) so that the file functions above never import
    MONAI, and with it ``itk`` (``monai.data.image_writer`` imports it eagerly).
    """
    from monai.data import ImageReader, ImageWriter
    from monai.data import image_writer

    class VolumeReader(ImageReader):
        """MONAI ``ImageReader`` for 3D TIFF stacks (tifffile), NIfTI (nibabel) and ITK formats, keeping (Z, Y, X).

        ``LoadImaged(keys, reader=VolumeReader())`` or ``"reader": "custom_components.data.io.VolumeReader"``.
        Metadata: ``filename_or_obj``, ``spatial_shape``, identity ``affine`` / ``original_affine``
        (spacing 1), ``original_channel_dim`` = ``"no_channel"`` (so ``ensure_channel_first`` adds the
        channel). Several files are stacked as channels (same shape required). The dtype of the file is kept;
        note that ``LoadImage`` itself casts to float32 unless given ``dtype=None`` / ``numpy.uint8``.
        """

        def __init__(self, channel_dim: int | str | None = None, **kwargs):
            super().__init__()
            self.channel_dim = channel_dim
            self.kwargs = kwargs

        def verify_suffix(self, filename: Sequence | os.PathLike | str) -> bool:
            """True when every name ends in .tif/.tiff (the reader also takes NIfTI / ITK files when named)."""
            names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
            return bool(names) and all(os.fspath(n).lower().endswith(TIFF_SUFFIXES) for n in names)

        def read(self, data, **kwargs) -> _VolumeFile | list[_VolumeFile]:
            """Handles for the file(s), no I/O; raises ``ValueError`` for an unknown extension.

            A missing / broken file is reported by ``get_data`` (so ``LoadImage`` passes our ``ValueError``
            through instead of its generic "cannot find a suitable reader").
            """
            names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
            out = []
            for name in names:
                path = os.fspath(name)
                if volume_format(path) is None:
                    raise VolumeFileError(f"{path}: VolumeReader cannot read this file type.")
                out.append(_VolumeFile(path))
            return out if len(out) > 1 else out[0]

        def get_data(self, img) -> tuple[np.ndarray, dict]:
            """Decode the file(s): ``(array, metadata)``; arrays of several files are stacked at a new axis 0."""
            files = img if isinstance(img, (list, tuple)) else [img]
            arrays: list[np.ndarray] = []
            meta: dict[str, Any] = {}
            for f in files:
                path = f.path if isinstance(f, _VolumeFile) else os.fspath(f)
                arr = read_volume(path)
                header = {
                    "filename_or_obj": path,
                    "spatial_shape": np.asarray(
                        arr.shape if not isinstance(self.channel_dim, int) else np.delete(arr.shape, self.channel_dim)
                    ),
                    "affine": np.eye(4),
                    "original_affine": np.eye(4),
                    "original_channel_dim": "no_channel" if self.channel_dim is None else self.channel_dim,
                }
                if arrays and arr.shape != arrays[0].shape:
                    raise ValueError(
                        f"{path}: shape {list(arr.shape)} differs from {files[0].path if isinstance(files[0], _VolumeFile) else files[0]} "
                        f"shape {list(arrays[0].shape)}; cannot stack them as channels."
                    )
                arrays.append(arr)
                meta = meta or header  # the first file's (same shape, identity affine for all)
            if len(arrays) == 1:
                return arrays[0], meta
            if meta["original_channel_dim"] == "no_channel":  # stacked at a new axis 0, which is the channel
                meta["original_channel_dim"] = 0
                return np.stack(arrays, axis=0), meta
            return np.concatenate(arrays, axis=int(meta["original_channel_dim"])), meta

    class TiffWriter(ImageWriter):
        """MONAI ``ImageWriter`` writing a uint8 multi-page LZW TIFF (Z pages of Y x X) of the input's shape.

        Registered for ".tif"/".tiff" (before MONAI's writers) when this module's ``VolumeReader`` or
        ``TiffWriter`` is first named; ``SaveImage(..., writer="custom_components.data.io.TiffWriter")``.
        A leading channel of size 1 (``channel_dim`` 0, the MONAI default) is squeezed; any other non-3D
        shape is a ``ValueError`` naming it. No resampling (a TIFF has no geometry): the array is written
        in its own (Z, Y, X) order. Values must be integers in [0, 255] (bool / ints / integral floats are
        cast exactly); ``scale=255`` maps [0, 1] floats to 0..255. ``output_dtype`` is accepted for
        ``SaveImage`` compatibility; the file is uint8 regardless. Written atomically (``write_volume``).
        """

        def __init__(self, output_dtype=np.uint8, scale: float | None = None, compression: str | None = "lzw", **kwargs):
            super().__init__(output_dtype=output_dtype, scale=scale, compression=compression, **kwargs)

        def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
            """Keep ``data_array`` (numpy / tensor) as a 3D (Z, Y, X) numpy array."""
            arr = data_array.detach().cpu().numpy() if hasattr(data_array, "detach") else np.asarray(data_array)
            arr = np.asarray(arr)
            shape = list(arr.shape)
            if channel_dim is not None and arr.ndim == 4:
                c = int(channel_dim) % 4
                if arr.shape[c] != 1:
                    raise ValueError(f"TiffWriter writes one channel; got shape {shape} with {arr.shape[c]} channels at dim {c}.")
                arr = np.squeeze(arr, axis=c)
            elif arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 3:
                raise ValueError(f"TiffWriter expects a 3D (Z, Y, X) volume (or (1, Z, Y, X)), got shape {shape}.")
            self.data_obj = arr

        def set_metadata(self, meta_dict=None, resample: bool = False, **options):
            """Nothing to set: a TIFF stack carries no affine; ``resample`` is ignored (no resampling)."""
            self.meta_dict = meta_dict

        def write(self, filename, verbose: bool = False, **kwargs):
            """Write ``self.data_obj`` to ``filename`` as uint8 (atomically)."""
            super().write(filename, verbose=verbose)
            if self.data_obj is None:
                raise ValueError(f"{filename}: TiffWriter.write called before set_data_array.")
            data = _to_uint8(np.asarray(self.data_obj), getattr(self, "scale", None), os.fspath(filename))
            write_volume(filename, data, compression=getattr(self, "compression", "lzw"))

        @classmethod
        def create_backend_obj(cls, data_array, **kwargs) -> np.ndarray:
            """The uint8 numpy array that ``write`` stores."""
            return _to_uint8(np.asarray(super().create_backend_obj(data_array)), kwargs.get("scale"), "TiffWriter")

    for cls in (VolumeReader, TiffWriter):
        cls.__qualname__ = cls.__name__  # pickled by reference, as custom_components.data.io.<name>
    if not image_writer.SUPPORTED_WRITERS:
        image_writer.init()  # MONAI's defaults first: resolve_writer only calls init() on an empty registry
    image_writer.register_writer("tif", TiffWriter)
    image_writer.register_writer("tiff", TiffWriter)
    return {"VolumeReader": VolumeReader, "TiffWriter": TiffWriter}


def __getattr__(name: str):
    """``VolumeReader`` / ``TiffWriter``: defined (once, under a lock) on first use; see ``_monai_adapters``."""
    if name in _MONAI_NAMES:
        with _BUILD_LOCK:
            if name not in globals():
                globals().update(_monai_adapters())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MONAI_NAMES))
