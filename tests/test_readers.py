"""Readers: every supported format, the mask label rules and the bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedefm.data.readers import IMAGE_SUFFIXES, count_frames, read_image, read_mask
from fedefm.errors import DataError

GREY_8 = np.array([[0, 255, 51, 0, 0], [102, 0, 255, 0, 0]], dtype=np.uint8)  # shape: (2, 5)
GREY_16 = np.array([[0, 65535, 13107, 0, 0], [0, 65535, 0, 0, 0]], dtype=np.uint16)  # 13107 = 65535 / 5


def write_dicom(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """Write an uncompressed uint16 DICOM; frames (N, H, W) gives a multi-frame file when N > 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        ("grey8.png", GREY_8, GREY_8 / 255),
        ("grey16.png", GREY_16, GREY_16 / 65535),
        ("grey8.tif", GREY_8, GREY_8 / 255),
        ("grey16.tiff", GREY_16, GREY_16 / 65535),
    ],
)
def test_8_and_16_bit_images_are_divided_by_their_full_range(tmp_path, name, array, expected):
    Image.fromarray(array).save(tmp_path / name)

    image = read_image(tmp_path / name)

    assert image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_rgb_png_is_reduced_to_grey_by_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")

    image = read_image(tmp_path / "rgb.png")

    np.testing.assert_allclose(image, [[0.299, 0.587], [0.114, 1.0]], atol=1e-6)


def test_jpeg_reads_close_to_its_source(tmp_path):
    flat = np.full((16, 16), 128, dtype=np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.JPG", quality=95)

    image = read_image(tmp_path / "flat.JPG")

    assert image.shape == (16, 16)
    np.testing.assert_allclose(image, 128 / 255, atol=2 / 255)


def test_float_npy_is_min_max_scaled(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[-2.0, 0.0], [2.0, 1.0]], dtype=np.float32))

    np.testing.assert_allclose(read_image(tmp_path / "x.npy"), [[0.0, 0.5], [1.0, 0.75]])


def test_uint8_npy_and_single_frame_stack_read_like_png(tmp_path):
    np.save(tmp_path / "plain.npy", GREY_8)
    np.save(tmp_path / "stack1.npy", GREY_8[None])

    np.testing.assert_allclose(read_image(tmp_path / "plain.npy"), GREY_8 / 255, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "stack1.npy"), GREY_8 / 255, atol=1e-6)


def test_monochrome1_radiograph_is_inverted_so_lungs_are_darker_than_spine():
    path = Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm"))
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)

    image = read_image(path)

    assert image.shape == raw.shape
    np.testing.assert_allclose(image, 1 - (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    lung, spine = image[800:1000, 500:700].mean(), image[800:1000, 850:1050].mean()
    assert lung < spine


def test_multi_frame_dicom_reads_the_requested_frame(tmp_path):
    frames = np.stack([np.full((4, 5), 10 * k, dtype=np.uint16) for k in range(3)])
    frames[:, 0, 0] = 1000  # min-max makes frame k equal to 10k/1000 away from the corner
    path = write_dicom(tmp_path / "cine.dcm", frames)

    assert count_frames(path) == 3
    image = read_image(path, frame=2)
    assert image.shape == (4, 5)
    assert image[0, 0] == pytest.approx(1.0)
    assert image[1, 1] == pytest.approx(0.0)
    assert read_image(path, frame=2)[1, 1] == pytest.approx(read_image(path, frame=1)[1, 1])


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", np.array([[0, 1], [2, 4]], dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = -1, 100  # a negative slope flips the order
    ds.save_as(path)

    np.testing.assert_allclose(read_image(path), [[1.0, 0.75], [0.5, 0.0]])


def test_multi_frame_file_without_frame_asks_for_one(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 4), dtype=np.uint16))

    with pytest.raises(DataError, match=r"cine\.dcm: holds 3 frames; pass frame"):
        read_image(path)
    with pytest.raises(DataError, match=r"cine\.dcm: frame 3 requested but the file holds 3"):
        read_image(path, frame=3)


def test_npy_stack_is_a_multi_frame_container(tmp_path):
    stack = np.stack([np.zeros((5, 5), np.uint8), np.eye(5, dtype=np.uint8) * 2])  # shape: (2, 5, 5)
    np.save(tmp_path / "masks.npy", stack)

    assert count_frames(tmp_path / "masks.npy") == 2
    np.testing.assert_array_equal(read_mask(tmp_path / "masks.npy", frame=1), np.eye(5) * 2)


def test_count_frames_is_one_for_a_plain_png(tmp_path):
    Image.fromarray(GREY_8).save(tmp_path / "a.png")

    assert count_frames(tmp_path / "a.png") == 1


def test_mask_of_0_and_255_reads_as_binary_catheter(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "m.png")

    mask = read_mask(tmp_path / "m.png")

    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[0, 1], [1, 0]])


@pytest.mark.parametrize("labels", [[[0, 1], [2, 0]], [[0, 1], [1, 0]], [[0, 0], [0, 0]]])
def test_mask_labels_within_0_1_2_are_kept(tmp_path, labels):
    Image.fromarray(np.array(labels, dtype=np.uint8)).save(tmp_path / "m.png")

    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), labels)


def test_rgb_mask_with_equal_channels_reads_as_labels(tmp_path):
    grey = np.array([[0, 2], [1, 0]], dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "m.png")

    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), grey)


def test_rgb_mask_with_differing_channels_is_rejected(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "colour.png")

    with pytest.raises(DataError, match=r"colour\.png: RGB mask has differing channels"):
        read_mask(tmp_path / "colour.png")


def test_mask_of_0_and_7_is_rejected_naming_file_and_values(tmp_path):
    Image.fromarray(np.array([[0, 7]], dtype=np.uint8)).save(tmp_path / "case_012.png")

    with pytest.raises(DataError, match=r"case_012\.png: mask holds values \{0, 7\}"):
        read_mask(tmp_path / "case_012.png")


def test_fractional_npy_mask_is_rejected(tmp_path):
    np.save(tmp_path / "soft.npy", np.array([[0.0, 0.5]], dtype=np.float32))

    with pytest.raises(DataError, match=r"soft\.npy: mask holds values \{0, 0\.5\}"):
        read_mask(tmp_path / "soft.npy")


def test_truncated_png_is_rejected_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError, match=r"cut\.png: unreadable or truncated"):
        read_image(tmp_path / "cut.png")


def test_truncated_dicom_is_rejected_naming_the_file(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.ones((2, 8, 8), dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:-100])

    with pytest.raises(DataError, match=r"cine\.dcm: pixel data cannot be decoded"):
        read_image(path, frame=1)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "file not found"),
        ("notes.txt", b"hello", "unsupported file type '.txt'"),
        ("garbage.png", b"not a png at all", "unreadable or truncated image"),
        ("garbage.tif", b"not a tiff either", "unreadable or truncated TIFF"),
        ("garbage.dcm", b"not a dicom file", "unreadable DICOM file"),
        ("garbage.npy", b"\x93NUMPY broken", "unreadable or truncated NPY"),
    ],
)
def test_unreadable_files_raise_data_error_starting_with_the_path(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)

    with pytest.raises(DataError, match=f"^{tmp_path / name}: {message}"):
        read_image(tmp_path / name)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 4), np.float32), "the image is empty"),
        (np.zeros((2, 2, 2, 2), np.float32), r"NPY array of shape \(2, 2, 2, 2\) is not an image"),
        (np.array([["a", "b"]]), "pixel type <U1 is not numeric"),
        (np.array([[0.0, np.nan]]), "holds NaN or infinite values"),
        (np.zeros((2, 16385), np.uint8), "image of 2x16385 pixels exceeds the 16384 px limit"),
        (np.zeros((3, 5, 5), np.float32), "holds 3 frames; pass frame"),
    ],
)
def test_bad_npy_arrays_raise_data_error_naming_the_file(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)

    with pytest.raises(DataError, match=rf"bad\.npy: {message}"):
        read_image(tmp_path / "bad.npy")


def test_image_suffixes_cover_every_supported_format():
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm", ".nii", ".nii.gz"}


def test_float64_tiff_that_pillow_cannot_open_is_read_by_tifffile(tmp_path):
    tifffile.imwrite(tmp_path / "f64.tif", np.array([[0.0, 2.0], [4.0, 8.0]]))

    assert count_frames(tmp_path / "f64.tif") == 1
    np.testing.assert_allclose(read_image(tmp_path / "f64.tif"), [[0.0, 0.25], [0.5, 1.0]])


def test_multi_page_tiff_reads_the_requested_page(tmp_path):
    pages = np.stack([np.zeros((5, 5), np.uint8), np.full((5, 5), 255, np.uint8)])  # shape: (2, 5, 5)
    tifffile.imwrite(tmp_path / "pages.tif", pages)

    assert count_frames(tmp_path / "pages.tif") == 2
    np.testing.assert_allclose(read_image(tmp_path / "pages.tif", frame=1), np.ones((5, 5)))


def test_palette_mask_reads_its_indices_as_labels(tmp_path):
    mask = Image.fromarray(np.array([[0, 1], [2, 0]], dtype=np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    mask.save(tmp_path / "palette.png")

    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), [[0, 1], [2, 0]])


@pytest.mark.parametrize("value", [b"1A", b"-3", b"x "])
def test_dicom_with_a_malformed_number_of_frames_is_a_data_error_naming_the_file(tmp_path, value):
    path = write_dicom(tmp_path / "cine.dcm", np.ones((2, 8, 8), dtype=np.uint16))
    data = path.read_bytes()
    at = data.index(b"\x28\x00\x08\x00IS\x02\x00") + 8  # (0028,0008) NumberOfFrames, IS, 2 bytes: "2 "
    path.write_bytes(data[:at] + value + data[at + 2 :])
    with pytest.raises(DataError, match=r"cine\.dcm: (NumberOfFrames is not a whole number|holds no image)"):
        count_frames(path)
    with pytest.raises(DataError, match=r"cine\.dcm: "):
        read_image(path, frame=0)


@pytest.mark.parametrize("writer", ["tifffile", "pillow"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_float_tiff_holding_nan_or_inf_is_refused(tmp_path, writer, bad):
    array = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    array[2, 3] = bad
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, array) if writer == "tifffile" else Image.fromarray(array).save(path)
    with pytest.raises(DataError, match=r"float\.tif: holds NaN or infinite values"):
        read_image(path)


def pydicom_test_file(name: str) -> Path:
    return Path(pydicom.data.get_testdata_file(name))


@pytest.mark.parametrize(
    ("compressed", "reference", "frame"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", None),  # JPEG Lossless SV1, 1.2.840.10008.1.2.4.70 (most XA runs)
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", None),  # JPEG-LS lossless, .4.80
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", 7),  # JPEG-LS, 10 frames
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", None),  # JPEG 2000 lossless, .4.90
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", 7),  # JPEG 2000, 10 frames
    ],
)
def test_lossless_compressed_dicom_reads_as_its_uncompressed_twin(compressed, reference, frame):
    path = pydicom_test_file(compressed)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID).startswith("1.2.840.10008.1.2.4.")
    np.testing.assert_array_equal(read_image(path, frame), read_image(pydicom_test_file(reference), frame))


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),  # 16-bit JPEG Lossless
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70"),
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),  # 12-bit JPEG Extended
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000 lossy
    ],
)
def test_compressed_dicom_of_every_xa_transfer_syntax_reads(name, syntax):
    path = pydicom_test_file(name)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    image = read_image(path)
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0


def test_12_bit_jpeg_extended_matches_the_lossless_copy_of_the_same_image():
    lossy, lossless = read_image(pydicom_test_file("JPGExtended.dcm")), read_image(pydicom_test_file("JPEG-LL.dcm"))
    assert np.corrcoef(lossy.ravel(), lossless.ravel())[0, 1] > 0.98
