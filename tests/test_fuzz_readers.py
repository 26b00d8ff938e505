"""Hostile input: fuzzed image and mask files end in a DataError naming the file, never another exception or a hang.

Hypothesis draws malformed PNG / JPEG / TIFF / DICOM / NPY bytes (random, and valid files with bytes
flipped, cut or inserted), headers declaring huge dimensions, arrays of the wrong dtype and file
names with odd characters. Each test is bounded by max_examples and a per-example deadline; the
number of cases that ran is printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_readers import write_dicom

from fedefm.data.datasets import check_dataset
from fedefm.data.readers import MAX_PIXELS, MAX_SIDE, count_frames, read_image, read_mask
from fedefm.errors import DataError

BOUNDED = settings(max_examples=100, deadline=timedelta(seconds=5), derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CASES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\nfuzz cases run: {sum(CASES.values())} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")


def read_everything(path: Path) -> None:
    """Every reader on ``path``: a result must be a sane array, a failure a DataError that names the file."""
    for read in (count_frames, read_image, read_mask):
        try:
            result = read(path) if read is count_frames else read(path, frame=None)
        except DataError as exc:
            assert str(exc).startswith(str(path)), str(exc)
            continue
        if read is count_frames:
            assert result >= 1
        else:
            assert result.ndim == 2 and 0 < result.size <= MAX_PIXELS


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def valid_files(tmp: Path) -> dict[str, bytes]:
    """One small valid file per format, the seeds the mutations start from."""
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4) % 3
    buffer = io.BytesIO()
    np.save(buffer, grey)
    files = {".png": png_bytes(grey), ".npy": buffer.getvalue()}
    for suffix, fmt in ((".jpg", "JPEG"), (".tif", "TIFF")):
        out = io.BytesIO()
        Image.fromarray(grey).save(out, format=fmt)
        files[suffix] = out.getvalue()
    files[".dcm"] = write_dicom(tmp / "seed.dcm", np.stack([grey, grey]).astype(np.uint16)).read_bytes()
    files[".nii"] = nibabel.Nifti1Image(grey.T[..., None], np.eye(4)).to_bytes()
    files[".nii.gz"] = gzip.compress(files[".nii"])
    return files


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return valid_files(tmp_path_factory.mktemp("seeds"))


SUFFIXES = st.sampled_from([".png", ".jpg", ".tif", ".npy", ".dcm", ".nii", ".nii.gz"])


@BOUNDED
@given(suffix=SUFFIXES, data=st.binary(max_size=512))
def test_random_bytes_under_any_image_suffix_are_a_data_error(tmp_path, suffix, data):
    CASES["random bytes"] += 1
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    read_everything(path)


@BOUNDED
@given(suffix=SUFFIXES, edits=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1),
                                                 st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
def test_valid_files_with_flipped_cut_or_inserted_bytes_are_read_or_a_data_error(tmp_path, seeds, suffix, edits):
    CASES["mutated files"] += 1
    data = bytearray(seeds[suffix])
    for kind, where, chunk in edits:
        at = int(where * (len(data) - 1))
        if kind == "flip":
            data[at] ^= chunk[0] or 0xFF
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = chunk
        if not data:
            break
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(bytes(data))
    read_everything(path)


def png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose IHDR declares width x height, followed by one tiny compressed row stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


HUGE = st.integers(MAX_SIDE // 2, 2**31 - 1)


@BOUNDED
@given(width=HUGE, height=HUGE)
def test_png_declaring_huge_dimensions_is_refused_before_decoding(tmp_path, width, height):
    CASES["huge png"] += 1
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(DataError, match="bomb.png: (image of .* exceeds|unreadable)"):
        read_image(path)


def test_a_compressed_png_bomb_is_refused_before_its_pixels_are_decoded(tmp_path):
    CASES["png bomb"] += 1
    side = 8192  # 64 Mpx of zeros compress to a few kB
    row = b"\x00" * (side + 1)
    stream = zlib.compressobj(9)
    idat = b"".join(stream.compress(row) for _ in range(side)) + stream.flush()
    data = png_header_only(side, side)
    data = data[: data.index(b"IDAT") - 4] + struct.pack(">I", len(idat)) + b"IDAT" + idat + \
        struct.pack(">I", zlib.crc32(b"IDAT" + idat) & 0xFFFFFFFF) + png_header_only(1, 1)[-12:]
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert len(data) < 200_000
    with pytest.raises(DataError, match=rf"bomb.png: image of {side}x{side} pixels exceeds the {MAX_PIXELS} pixel limit"):
        read_image(path)


@BOUNDED
@given(shape=st.lists(st.integers(0, 2**40), min_size=1, max_size=4))
def test_npy_header_declaring_any_shape_is_read_or_refused_without_allocating_it(tmp_path, shape):
    CASES["npy shapes"] += 1
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    path = tmp_path / "shape.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 256)
    read_everything(path)


@BOUNDED
@given(rows=st.integers(1, 65535), columns=st.integers(1, 65535), frames=st.integers(1, 2**31 - 1))
def test_dicom_declaring_huge_rows_columns_or_frames_is_refused_or_read_within_bounds(tmp_path, rows, columns, frames):
    CASES["huge dicom"] += 1
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((2, 4, 4), dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.save_as(path)
    read_everything(path)
    for frame in (0, frames - 1):
        try:
            image = read_image(path, frame=frame)
        except DataError as exc:
            assert str(exc).startswith(str(path))
        else:
            assert image.size <= MAX_PIXELS


WRONG_DTYPES = [np.complex64, np.str_, np.bytes_, "datetime64[s]", "timedelta64[s]", object,
                [("a", "<f4"), ("b", "<i4")], np.float16, np.int64, np.bool_]


@pytest.mark.parametrize("dtype", WRONG_DTYPES, ids=str)
def test_npy_of_any_dtype_is_read_as_numbers_or_refused_without_unpickling(tmp_path, dtype):
    CASES["npy dtypes"] += 1
    path = tmp_path / "typed.npy"
    array = np.zeros((4, 4), dtype=dtype)
    np.save(path, array, allow_pickle=True)  # an object array is a pickle inside; the reader must not load it
    read_everything(path)
    if np.dtype(dtype).kind in "OUSVMmc":
        with pytest.raises(DataError):
            read_image(path)


ODD_NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                    max_size=40).filter(lambda name: name not in (".", "..") and len(name.encode()) < 200)


@BOUNDED
@given(name=ODD_NAMES, suffix=SUFFIXES)
def test_paths_with_odd_characters_read_like_any_other(tmp_path, seeds, name, suffix):
    CASES["odd paths"] += 1
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(seeds[suffix])
    read_everything(path)
    if suffix in (".png", ".npy"):
        assert read_image(path).shape == (8, 8)


@settings(max_examples=15, deadline=timedelta(seconds=20), derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.tuples(SUFFIXES, st.binary(max_size=64)), min_size=1, max_size=5))
def test_dataset_checker_reports_every_bad_file_at_once(tmp_path_factory, seeds, bad):
    CASES["dataset checks"] += 1
    root = tmp_path_factory.mktemp("dataset")
    for name in ("a", "b"):
        (root / name).mkdir()
        for k in range(3):
            (root / name / f"good{k}.png").write_bytes(seeds[".png"])
    broken = []
    for k, (suffix, data) in enumerate(bad):
        path = root / "a" / f"bad{k}{suffix}"
        path.write_bytes(data)
        broken.append(path)
    report = check_dataset(root)
    flagged = {Path(p) for p, _ in report.bad_files}
    readable = set()
    for path in broken:
        try:
            read_image(path)
            readable.add(path)
        except DataError:
            pass
    assert flagged == set(broken) - readable
