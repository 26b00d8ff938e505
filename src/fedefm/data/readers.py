"""Image and mask readers: PNG, JPEG, TIFF, NPY, NIfTI and DICOM (single- or multi-frame) to numpy arrays.

An image comes back as ``float32 (H, W)`` in [0, 1], grey: RGB is reduced by ITU-R 601 luminance
(as Pillow's ``L`` mode), 8-bit data is divided by 255, 16-bit data by 65535, anything else
(float, signed or 32-bit integers) is min-max scaled, and a constant image becomes all zeros.
DICOM gets its modality LUT (rescale slope and intercept) applied, is min-max scaled and, when
MONOCHROME1, inverted, so that every image reads as MONOCHROME2 displays it: 0 black, 1 white.

A mask comes back as ``uint8 (H, W)`` with labels 0 background, 1 catheter, 2 guidewire. A mask whose
values are a subset of {0, 255} is binary and 255 becomes 1 (catheter); values within {0, 1, 2}
are kept. An RGB mask is accepted when its three channels are equal.

Multi-frame containers are DICOM files with NumberOfFrames > 1, NPY stacks ``(N, H, W)`` (a 3-D
NPY whose last axis is 1, 3 or 4 is read as channels instead) and multi-page TIFFs; ``frame``
picks one frame and is required for them. A NIfTI file (``.nii``, ``.nii.gz``, as nnU-Net stores 2-D cases)
holds one 2-D image: every axis beyond two must be singleton, and its (x, y) voxel axes become (columns,
rows), so an array saved as ``nibabel.Nifti1Image(image.T[..., None], affine)`` reads back as ``image``.
Every failure raises
:class:`~fedefm.errors.DataError` whose message starts with the file path.
"""

from __future__ import annotations

import struct
import tokenize
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import tifffile
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from fedefm.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm", ".nii", ".nii.gz")

# Larger than any detector panel; beyond them a header is corrupt or a file is a decompression bomb.
# Both are checked on the header, before any pixel is decoded.
MAX_SIDE = 16384
MAX_PIXELS = 2**25  # 32 Mpx per frame (5792 x 5792), 8x a 2048 x 2048 flat panel

_LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# What decoders raise on hostile bytes (found by tests/test_fuzz_readers.py): each becomes a DataError.
_DECODER_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, struct.error, MemoryError)
_PIL_ERRORS = (UnidentifiedImageError, SyntaxError, Image.DecompressionBombError, *_DECODER_ERRORS)
_TIFF_ERRORS = (tifffile.TiffFileError, *_DECODER_ERRORS)
_DICOM_ERRORS = (
    pydicom.errors.InvalidDicomError,
    OSError,
    ValueError,
    AttributeError,
    KeyError,
    TypeError,
    NotImplementedError,
    RuntimeError,
)
_MASK_LABELS = {0, 1, 2}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_image(path: Path, frame: int | None = None) -> np.ndarray:
    """Read one image (or one frame of a multi-frame file) as float32 (H, W) in [0, 1].

    Args:
        path: a file with a suffix in :data:`IMAGE_SUFFIXES`.
        frame: index of the frame in a multi-frame file; None for single-frame files.

    Returns:
        (H, W) float32 grey image scaled to [0, 1].

    Raises:
        DataError: the file is missing, unreadable, of an unsupported kind, empty, too large,
            multi-frame without ``frame``, or holds non-numeric or NaN values.
    """
    path = Path(path)
    if _suffix(path) == ".dcm":
        return _read_dicom_image(path, frame)
    if _suffix(path) in NIFTI_SUFFIXES:
        return _scale_to_unit(_read_nifti(path, frame), by_dtype=False)
    return _to_grey(_scale_to_unit(_read_array(path, frame, palette_indices=False), by_dtype=True), path)


def read_mask(path: Path, frame: int | None = None) -> np.ndarray:
    """Read one mask (or one frame of a multi-frame mask) as uint8 (H, W) labels {0, 1, 2}.

    Args:
        path: a file with a suffix in :data:`IMAGE_SUFFIXES`.
        frame: index of the frame in a multi-frame file; None for single-frame files.

    Returns:
        (H, W) uint8 labels: 0 background, 1 catheter, 2 guidewire.

    Raises:
        DataError: as :func:`read_image`, and when values lie outside {0, 1, 2} without being a
            {0, 255} binary mask, or an RGB mask has unequal channels.
    """
    path = Path(path)
    return _to_labels(read_label_values(path, frame), path)


def read_label_values(path: Path, frame: int | None = None) -> np.ndarray:
    """The raw pixel values of a label image (one frame of a multi-frame one): (H, W), values as stored.

    Palette images give their indices and RGB images with equal channels one channel.

    Raises:
        DataError: as :func:`read_image`, and when an RGB mask has unequal channels or the mask is not 2-D.
    """
    path = Path(path)
    if _suffix(path) == ".dcm":
        array = _read_dicom_pixels(path, frame)[0]
    elif _suffix(path) in NIFTI_SUFFIXES:
        array = _read_nifti(path, frame)
    else:
        # Palette masks store labels as palette indices.
        array = _read_array(path, frame, palette_indices=True)
    return _mask_channel(array, path)


def count_frames(path: Path) -> int:
    """Number of frames in a file: NumberOfFrames for DICOM, N for an (N, H, W) NPY stack, pages of a TIFF, else 1.

    Only headers are read, never the pixel data of a DICOM or NPY file.

    Raises:
        DataError: the file is missing, unreadable, of an unsupported kind, or holds no frame.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".dcm":
        n_frames = _dicom_frame_count(_read_dicom_header(path), path)
    elif suffix == ".npy":
        n_frames = _npy_frame_count(_open_npy(path).shape)
    elif suffix in (".tif", ".tiff"):
        n_frames = _tiff_page_count(path)
    elif suffix in NIFTI_SUFFIXES:
        _nifti_plane_shape(_open_nifti(path), path)
        n_frames = 1
    else:
        _check_exists(path)
        n_frames = 1
    if n_frames < 1:
        raise DataError(f"{path}: holds no image ({n_frames} frames)")
    return n_frames


def image_suffix(path: Path) -> str:
    """A file's suffix as :data:`IMAGE_SUFFIXES` spells it, lower case: ``.nii.gz`` for gzipped NIfTI, else the last."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_stem(path: Path) -> str:
    """A file's name without its image suffix: ``case_0000`` for ``case_0000.nii.gz`` (``Path.stem`` keeps ``.nii``)."""
    return Path(path).name[: len(Path(path).name) - len(image_suffix(path))]


def _suffix(path: Path) -> str:
    suffix = image_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(IMAGE_SUFFIXES)}")
    return suffix


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _check_frame(path: Path, frame: int | None, n_frames: int) -> None:
    if frame is None and n_frames > 1:
        raise DataError(f"{path}: holds {n_frames} frames; pass frame=0..{n_frames - 1} to read one of them")
    if frame is not None and not 0 <= frame < n_frames:
        raise DataError(f"{path}: frame {frame} requested but the file holds {n_frames} frame(s)")


def _check_shape(path: Path, shape: tuple[int, ...]) -> None:
    if 0 in shape:
        raise DataError(f"{path}: the image is empty (shape {shape})")
    if max(shape[:2]) > MAX_SIDE:
        raise DataError(f"{path}: image of {shape[0]}x{shape[1]} pixels exceeds the {MAX_SIDE} px limit per side")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise DataError(f"{path}: image of {shape[0]}x{shape[1]} pixels exceeds the {MAX_PIXELS} pixel limit")


def _read_array(path: Path, frame: int | None, palette_indices: bool) -> np.ndarray:
    """Raw pixels of a PNG/JPEG/TIFF/NPY file; palette images give indices or RGB."""
    _check_exists(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        return _read_npy(path, frame)
    try:
        return _check_numeric(_read_pillow(path, frame, palette_indices), path)
    except DataError:
        raise
    except _PIL_ERRORS as exc:
        if suffix not in (".tif", ".tiff"):
            raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
    return _read_tifffile(path, frame)


def _read_pillow(path: Path, frame: int | None, palette_indices: bool) -> np.ndarray:
    with Image.open(path) as img:
        _check_shape(path, (img.height, img.width))
        _check_frame(path, frame, getattr(img, "n_frames", 1))
        if frame:
            img.seek(frame)
        img.load()
        if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
            # 16-bit PNGs open as 'I;16' or as 32-bit 'I' depending on Pillow; both hold 0..65535.
            return np.asarray(img).astype(np.uint16)
        if img.mode in ("1", "L", "I", "F", "RGB") or (img.mode == "P" and palette_indices):
            return np.asarray(img)
        return np.asarray(img.convert("RGB"))


def _read_tifffile(path: Path, frame: int | None) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tif:
            _check_frame(path, frame, len(tif.pages))
            page = tif.pages[frame or 0]
            _check_shape(path, page.shape)
            array = page.asarray()
    except DataError:
        raise
    except _TIFF_ERRORS as exc:
        raise DataError(f"{path}: unreadable or truncated TIFF ({exc})") from exc
    return _check_numeric(array, path)


def _tiff_page_count(path: Path) -> int:
    _check_exists(path)
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1)
    except _PIL_ERRORS:
        pass
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages)
    except _TIFF_ERRORS as exc:
        raise DataError(f"{path}: unreadable or truncated TIFF ({exc})") from exc


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map an NPY file so that its shape is known before any pixel is read."""
    _check_exists(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    # Overflow: a header's shape too large to map; SyntaxError / TokenError: numpy parses a mangled header as Python.
    except (OSError, ValueError, EOFError, OverflowError, MemoryError, SyntaxError, tokenize.TokenError) as exc:
        raise DataError(f"{path}: unreadable or truncated NPY file ({exc}); save it with numpy.save") from exc


def _npy_frame_count(shape: tuple[int, ...]) -> int:
    is_stack = len(shape) == 3 and shape[-1] not in (1, 3, 4)
    return shape[0] if is_stack else 1


def _read_npy(path: Path, frame: int | None) -> np.ndarray:
    array = _open_npy(path)
    n_frames = _npy_frame_count(array.shape)
    if array.ndim not in (2, 3):
        raise DataError(
            f"{path}: NPY array of shape {array.shape} is not an image; expected (H, W), (H, W, 3) or a stack (N, H, W)"
        )
    _check_frame(path, frame, n_frames)
    if n_frames > 1:
        array = array[frame]
    elif array.ndim == 3 and array.shape[0] == 1 and array.shape[-1] not in (1, 3, 4):
        array = array[0]
    _check_shape(path, array.shape)
    return _check_numeric(np.array(array), path)


def _open_nifti(path: Path):
    """The NIfTI image at ``path`` with only its header read (nibabel maps the voxels lazily)."""
    import nibabel  # a few hundred ms; only NIfTI inputs pay it

    _check_exists(path)
    try:
        return nibabel.load(path)
    except (nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError, zlib.error,
            *_DECODER_ERRORS) as exc:
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({exc})") from exc


def _nifti_plane_shape(nifti, path: Path) -> tuple[int, int]:
    """(x, y) of a NIfTI that holds one 2-D image: its axes beyond the first two must all be 1."""
    shape = tuple(int(n) for n in nifti.shape)
    if len(shape) < 2 or any(n != 1 for n in shape[2:]):
        raise DataError(f"{path}: NIfTI of shape {shape} is not a 2-D image; fedefm reads 2-D cases stored as "
                        "(x, y) or (x, y, 1) - save one file per frame")
    _check_shape(path, shape[1::-1])
    return shape[0], shape[1]


def _read_nifti(path: Path, frame: int | None) -> np.ndarray:
    """The voxels of a 2-D NIfTI as stored, (rows, columns) = (y, x)."""
    nifti = _open_nifti(path)
    x, y = _nifti_plane_shape(nifti, path)
    _check_frame(path, frame, 1)
    try:
        array = np.asanyarray(nifti.dataobj).reshape(x, y).T
    except (zlib.error, *_DECODER_ERRORS) as exc:
        raise DataError(f"{path}: NIfTI voxels cannot be read ({exc}); the file may be truncated") from exc
    return _check_numeric(np.ascontiguousarray(array), path)


def _check_numeric(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "biuf":  # not "m": numpy counts timedelta64 among the integers
        raise DataError(f"{path}: pixel type {array.dtype} is not numeric; store integers or floats")
    if array.size == 0:
        raise DataError(f"{path}: the image is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"{path}: holds NaN or infinite values; replace them before use")
    return array


def _read_dicom_header(path: Path) -> pydicom.Dataset:
    _check_exists(path)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
    except _DICOM_ERRORS as exc:
        raise DataError(f"{path}: unreadable DICOM file or no image in it ({exc})") from exc
    _check_shape(path, (rows, columns))
    return header


def _dicom_frame_count(header: pydicom.Dataset, path: Path) -> int:
    try:
        value = header.get("NumberOfFrames", 1)
        return int(value or 1)
    except _DICOM_ERRORS as exc:
        raise DataError(f"{path}: NumberOfFrames is not a whole number ({exc}); correct the DICOM header") from exc


def _read_dicom_pixels(path: Path, frame: int | None) -> tuple[np.ndarray, pydicom.Dataset]:
    """Decode only the requested frame; returns the raw pixels and the image pixel module."""
    header = _read_dicom_header(path)
    _check_frame(path, frame, _dicom_frame_count(header, path))
    pixel_module = pydicom.Dataset()
    try:
        array = pixel_array(path, index=frame, ds_out=pixel_module)
    except _DICOM_ERRORS as exc:
        raise DataError(
            f"{path}: pixel data cannot be decoded ({exc}); a compressed transfer syntax may need "
            "pylibjpeg or gdcm, or the file is truncated"
        ) from exc
    return _check_numeric(array, path), pixel_module


def _read_dicom_image(path: Path, frame: int | None) -> np.ndarray:
    array, pixel_module = _read_dicom_pixels(path, frame)
    photometric = str(pixel_module.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, pixel_module)
    elif photometric.startswith("MONOCHROME"):
        with np.errstate(over="ignore", invalid="ignore"):
            array = _check_numeric(apply_modality_lut(array, pixel_module), path)
    image = _to_grey(_scale_to_unit(array, by_dtype=False), path)
    return 1.0 - image if photometric == "MONOCHROME1" else image


def _to_grey(array: np.ndarray, path: Path) -> np.ndarray:
    """Reduce a [0, 1] array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to float32 (H, W)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return (array[..., :3] @ _LUMINANCE).astype(np.float32)
    if array.ndim != 2:
        raise DataError(f"{path}: pixel array of shape {array.shape} is not a grey or RGB image")
    return array


def _scale_to_unit(array: np.ndarray, by_dtype: bool) -> np.ndarray:
    """Divide 8- and 16-bit data by their full range when ``by_dtype``; min-max scale the rest."""
    if array.dtype == bool:
        return array.astype(np.float32)
    if by_dtype and array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if by_dtype and array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    array = array.astype(np.float64)
    low, high = array.min(), array.max()
    if high == low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _mask_channel(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise DataError(f"{path}: RGB mask has differing channels; save masks as single-channel label images")
        return rgb[..., 0]
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: mask of shape {array.shape} is not a 2-D label image")
    return array


def _to_labels(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    found = {float(v) for v in values}
    if found <= _MASK_LABELS:
        return array.astype(np.uint8)
    if found <= {0, 255}:
        return (array == 255).astype(np.uint8)
    shown = ", ".join(f"{float(v):g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
    hint = "; JPEG is lossy, save masks as PNG" if path.suffix.lower() in (".jpg", ".jpeg") else ""
    raise DataError(
        f"{path}: mask holds values {{{shown}}}; expected labels 0 background, 1 catheter, "
        f"2 guidewire or a binary 0/255 mask{hint}"
    )
