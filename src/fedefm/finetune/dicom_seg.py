"""DICOM Segmentation objects of predicted masks (``predict --format dicom-seg``), written with highdicom.

One SEG per source DICOM file: a BINARY segmentation with segment 1 catheter and segment 2 guidewire
(category SCT 260787004 "Physical object", types SCT 19923001 "Catheter" and SCT 272224001 "Guide Wire",
algorithm type AUTOMATIC, family DCM "Artificial Intelligence"), one frame per segment and source frame
(empty frames kept, so a reader gets every source frame back). Every frame references its source image
(and, for a multi-frame source, its source frame number) through the Derivation Image Sequence.

highdicom 0.28 builds a multi-frame SEG only for sources with a patient or slide coordinate system (CT,
MR, enhanced images); a multi-frame XA or US run has none (highdicom issue #284). For those, each source frame is
encoded by highdicom as a single-frame SEG and the frames are joined here into one object: the shared
attributes are highdicom's, each per-frame item gets its ReferencedFrameNumber, and the bit-packed
pixel data is re-packed across all frames.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
from pydicom.uid import SecondaryCaptureImageStorage

from fedefm import __version__
from fedefm.data.readers import image_suffix
from fedefm.errors import DataError
from fedefm.files import atomic_write

SEG_SERIES_NUMBER = 900  # away from the modality's own series numbers, so viewers list the SEG apart
# Type 2 patient and study attributes the SEG copies from its source: an anonymised run may lack them, and
# type 2 allows them empty.
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
           "AccessionNumber", "ReferringPhysicianName")


def segment_descriptions(algorithm: str) -> list:
    """highdicom SegmentDescriptions of fedefm's two foreground classes (segment numbers = our labels 1, 2)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(name="fedefm", version=__version__,
                                                        family=codes.DCM.ArtificialIntelligence,
                                                        parameters={"model": algorithm[:64]})
    devices = (("catheter", codes.SCT.Catheter), ("guidewire", codes.SCT.GuideWire))
    return [hd.seg.SegmentDescription(segment_number=number, segment_label=label,
                                      segmented_property_category=codes.SCT.PhysicalObject,
                                      segmented_property_type=code, algorithm_type="AUTOMATIC",
                                      algorithm_identification=identification)
            for number, (label, code) in enumerate(devices, start=1)]


def require_dicom_suffix(path: Path) -> None:
    """Refuse a non-DICOM input of ``--format dicom-seg`` by its suffix, before anything is predicted.

    Raises:
        DataError: naming the file.
    """
    if image_suffix(path) != ".dcm":
        raise DataError(f"{path}: --format dicom-seg needs DICOM (.dcm) inputs, since a SEG references its source "
                        "image; use --format png for PNG, TIFF, NPY or NIfTI inputs")


def require_dicom(path: Path) -> pydicom.Dataset:
    """The header of a DICOM input of ``--format dicom-seg``.

    Raises:
        DataError: naming the file, when it is not DICOM (a SEG must reference a DICOM source image).
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise DataError(f"{path}: --format dicom-seg needs DICOM inputs (a SEG references its source image), "
                        f"but this is not DICOM ({exc}); use --format png for it") from exc


def write_dicom_seg(source: Path, labels: np.ndarray, out: Path, model: str) -> Path:
    """Write the SEG of ``labels`` (N, H, W) uint8 {0, 1, 2}, the masks of the N frames of ``source``, to ``out``.

    Raises:
        DataError: naming ``source``, when it is not DICOM or its frame count or size differs from ``labels``.
    """
    import highdicom as hd
    from highdicom.spatial import get_image_coordinate_system

    header = require_dicom(source)
    n_frames = int(header.get("NumberOfFrames", 1) or 1)
    if labels.shape != (n_frames, header.Rows, header.Columns):
        raise DataError(f"{source}: holds {n_frames} frame(s) of {header.Rows}x{header.Columns} but the masks are "
                        f"{labels.shape}")
    for keyword in _TYPE_2:
        if keyword not in header:
            setattr(header, keyword, "")
    stacked = np.stack([labels == 1, labels == 2], axis=-1).astype(np.uint8)  # (N, H, W, 2) segments
    common = dict(segmentation_type="BINARY", segment_descriptions=segment_descriptions(model),
                  series_number=SEG_SERIES_NUMBER, instance_number=1, manufacturer="fedefm",
                  manufacturer_model_name="fedefm predict", software_versions=__version__,
                  device_serial_number="none", omit_empty_frames=False,
                  content_description="catheter and guidewire masks", content_label="DEVICES")
    series, instance = hd.UID(), hd.UID()
    if n_frames == 1 or get_image_coordinate_system(header) is not None:
        seg = hd.seg.Segmentation(source_images=[header], pixel_array=stacked, series_instance_uid=series,
                                  sop_instance_uid=instance, **common)
    else:
        # Each frame stands in as a single-frame image: highdicom wants functional groups of a multi-frame IOD
        # (XA, XRF), which a projection run lacks, so the stand-in is Secondary Capture; _join_frames puts the
        # source's own SOP class back into every reference.
        single = copy.deepcopy(header)
        del single.NumberOfFrames
        single.SOPClassUID = SecondaryCaptureImageStorage
        frames = [hd.seg.Segmentation(source_images=[single], pixel_array=stacked[k:k + 1],
                                      series_instance_uid=series, sop_instance_uid=instance, **common)
                  for k in range(n_frames)]
        seg = _join_frames(frames, stacked, header.SOPClassUID)
    with atomic_write(out, "wb") as f:
        seg.save_as(f, enforce_file_format=True)
    return out


def _join_frames(frames: list, stacked: np.ndarray, source_class: str) -> pydicom.Dataset:
    """One SEG holding the frames of per-source-frame SEGs ``frames``; frame k references source frame k + 1.

    ``stacked`` (N, H, W, 2) holds the segments' masks; ``source_class`` replaces the stand-in SOP class in
    every reference.
    """
    from pydicom.pixels import pack_bits

    def restore_class(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.keyword == "ReferencedSOPClassUID" and element.value == SecondaryCaptureImageStorage:
            element.value = source_class

    seg = frames[0]
    items = []
    for number, single in enumerate(frames, start=1):
        for item in single.PerFrameFunctionalGroupsSequence:
            for derivation in item.DerivationImageSequence:
                for reference in derivation.SourceImageSequence:
                    reference.ReferencedFrameNumber = number
            items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    seg.NumberOfFrames = len(items)
    # Frame order: source frame, then segment, as the per-frame items above; BINARY packs bits across frames.
    seg.PixelData = pack_bits(np.moveaxis(stacked, -1, 1).reshape(-1, *stacked.shape[1:3]))
    seg.walk(restore_class)
    return seg


def read_dicom_seg(path: Path, source: pydicom.Dataset) -> np.ndarray:
    """The labels (N, H, W) uint8 {0, 1, 2} of a fedefm SEG, read back by highdicom frame by source frame."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    else:
        pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, n_frames + 1)),
                                                combine_segments=True)
    return pixels.astype(np.uint8)
