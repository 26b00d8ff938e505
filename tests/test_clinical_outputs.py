"""predict's clinical outputs: DICOM SEG (highdicom round trip, frame references), cine overlays and device tables."""

from __future__ import annotations

import csv
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

from fedefm.errors import ConfigError, DataError
from fedefm.finetune.cine import source_frame_rate
from fedefm.finetune.dicom_seg import read_dicom_seg, write_dicom_seg
from fedefm.finetune.predict import predict
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import save_weights


def write_xa_run(path: Path, n_frames: int = 4, size: int = 48, cine_rate: int | None = 10) -> Path:
    """A multi-frame XA cine run (no Frame of Reference, as fluoroscopy files have), uint16 frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName, ds.StudyDate = "XA", "P1", "Test^Patient", "20260101"
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = n_frames
    if cine_rate is not None:
        ds.CineRate = cine_rate
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 4096, (n_frames, size, size), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "segmenter.safetensors"
    save_weights(path, TransUNet(get_preset("tiny"), n_classes=3), {})
    return path


@pytest.mark.parametrize("source", ["xa", "OBXXXX1A_2frame.dcm", "OBXXXX1A.dcm", "MR_small.dcm"])
def test_dicom_seg_reads_back_with_the_same_masks_and_a_reference_per_source_frame(tmp_path, source):
    path = write_xa_run(tmp_path / "run.dcm") if source == "xa" else Path(get_testdata_file(source))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    n_frames = int(header.get("NumberOfFrames", 1) or 1)
    labels = np.random.default_rng(1).integers(0, 3, (n_frames, header.Rows, header.Columns)).astype(np.uint8)

    write_dicom_seg(path, labels, tmp_path / "seg.dcm", "model.safetensors")

    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", header), labels)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["catheter", "guidewire"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "272224001"  # SCT Guide Wire
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == header.SeriesInstanceUID
    plain = pydicom.dcmread(tmp_path / "seg.dcm")  # pydicom alone: one frame per (source frame, segment)
    references = [item.DerivationImageSequence[0].SourceImageSequence[0] for item in
                  plain.PerFrameFunctionalGroupsSequence]
    assert {r.ReferencedSOPInstanceUID for r in references} == {header.SOPInstanceUID}
    if n_frames > 1:
        assert [int(r.ReferencedFrameNumber) for r in references] == [k for k in range(1, n_frames + 1) for _ in "cg"]


def test_predict_on_a_multi_frame_xa_writes_a_seg_a_cine_overlay_and_a_device_table(segmenter, tmp_path):
    xa = write_xa_run(tmp_path / "run.dcm", n_frames=4)
    as_png = predict(segmenter, [xa], tmp_path / "png")
    report = predict(segmenter, [xa], tmp_path / "seg", output_format="dicom-seg")

    assert [p.name for p in report.segmentations] == ["run_seg.dcm"]
    masks = np.stack([np.asarray(Image.open(mask)) for mask, _ in as_png.outputs])
    header = pydicom.dcmread(xa, stop_before_pixels=True)
    np.testing.assert_array_equal(read_dicom_seg(report.segmentations[0], header), masks)
    assert [p.name for p in report.cines] == ["run_cine.mp4"]
    import imageio.v3 as iio

    video = iio.imread(report.cines[0])
    assert video.shape[:3] == (4, 48, 48)
    assert iio.immeta(report.cines[0])["fps"] == pytest.approx(10)
    with open(report.tables[0]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["catheter_px"]) for r in rows] == [int((m == 1).sum()) for m in masks]
    assert [int(r["source_frame"]) for r in rows] == [0, 1, 2, 3]


def test_a_folder_of_frames_with_cine_becomes_one_run_at_the_given_rate(segmenter, tmp_path):
    for k in range(3):
        Image.fromarray(np.full((40, 40), 40 * k, np.uint8)).save(tmp_path / f"frame{k}.png")
    report = predict(segmenter, [tmp_path], tmp_path / "out", cine=True, fps=7.5)
    assert [p.name for p in report.cines] == ["cine_cine.mp4"]
    with open(report.tables[0]) as f:
        assert [r["frame"] for r in csv.DictReader(f)] == ["frame0", "frame1", "frame2"]


def test_a_dicom_seg_request_on_a_png_input_names_the_file_and_writes_nothing(segmenter, tmp_path):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "frame.png")
    with pytest.raises(DataError, match=r"frame\.png: --format dicom-seg needs DICOM"):
        predict(segmenter, [tmp_path / "frame.png"], tmp_path / "out", output_format="dicom-seg")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="did you mean 'dicom-seg'"):
        predict(segmenter, [tmp_path / "frame.png"], tmp_path / "out", output_format="dicom_seg")


@pytest.mark.parametrize("keywords, fps", [({"CineRate": 12}, 12.0), ({"FrameTime": "66.667"}, 15.0),
                                           ({"FrameTime": "0"}, None), ({}, None)])
def test_the_frame_rate_comes_from_cine_rate_then_frame_time(keywords, fps):
    header = Dataset()
    for keyword, value in keywords.items():
        setattr(header, keyword, value)
    assert source_frame_rate(header) == (pytest.approx(fps, abs=1e-3) if fps else None)


def test_cli_predict_dicom_seg_lists_the_seg_and_the_cine(segmenter, tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    xa = write_xa_run(tmp_path / "run.dcm", n_frames=2)
    result = CliRunner().invoke(app, ["predict", "--model", str(segmenter), str(xa), "--out", str(tmp_path / "out"),
                                      "--format", "dicom-seg"])
    assert result.exit_code == 0, result.output
    printed = result.output.replace("\n", "")  # rich wraps long paths
    assert "run_seg.dcm" in printed and "run_cine.mp4" in printed and "run_frames.csv" in printed
