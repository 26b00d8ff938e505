"""Clinical pipeline speed: predict throughput per output format at 256 px, ONNX Runtime vs torch latency.

    OMP_NUM_THREADS=1 python benchmarks/bench_clinical.py --threads 1          # tiny preset, 256 px, 16 frames

Predict is timed end to end (reading, predicting, writing; PredictReport.images_per_s) on the same 16
synthetic clinical frames stored three ways: PNG files (--format png), the PNG files as one run (--cine,
adds the MP4 and the device table) and one multi-frame XA DICOM (--format png, then --format dicom-seg;
both also write the run's MP4 and table). Latency is the median of --repeats calls (after one warm-up; torch and ONNX Runtime
called alternately, so both meet the same load) of the torch model and of its ONNX export (fedefm export, ONNX Runtime CPU provider, the same thread count) on a batch of 1 and 8.
The weights are freshly initialised: speed does not depend on their values. Prints a table; writes no
result file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_checkpoint import median_seconds
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

from fedefm.data.synth.domains import render_fluoro
from fedefm.finetune.export import export_model
from fedefm.finetune.predict import predict
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import save_weights


def write_frames(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    """n synthetic clinical frames as PNG files in folder/png and as one multi-frame XA, folder/run.dcm."""
    frames = np.stack([(render_fluoro("clinical", size, np.random.default_rng(k))[0] * 255).round()
                       for k in range(n)]).astype(np.uint8)
    (folder / "png").mkdir(parents=True)
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / "png" / f"frame{k:03d}.png")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = XRayAngiographicImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.CineRate = generate_uid(), generate_uid(), "XA", 15
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = n, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.tobytes()
    ds.save_as(folder / "run.dcm", enforce_file_format=True)
    return folder / "png", folder / "run.dcm"


def paired_median_ms(network: torch.nn.Module, session, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms per call of torch and of ONNX Runtime on ``images``, called alternately (after one warm-up each)
    so that both meet the same load on a shared machine."""
    def run_torch() -> None:
        with torch.no_grad():
            network(images)

    def run_onnx() -> None:
        session.run(["logits"], {"image": images.numpy()})

    run_torch(), run_onnx()
    pairs = [(median_seconds(run_torch, 1), median_seconds(run_onnx, 1)) for _ in range(repeats)]
    return tuple(1000 * statistics.median(times) for times in zip(*pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = root / "model.safetensors"
        save_weights(weights, TransUNet(get_preset(args.preset), n_classes=3), {"image_size": args.size})
        png, dicom = write_frames(root / "data", args.frames, args.size)
        print(f"predict, {args.frames} frames of {args.size} px, {args.preset} preset, {args.threads} thread(s)")
        cases = [("png files, --format png", [png], {}), ("png files, --cine", [png], {"cine": True}),
                 ("XA DICOM, --format png", [dicom], {}),
                 ("XA DICOM, --format dicom-seg", [dicom], {"output_format": "dicom-seg"})]
        for k, (name, inputs, options) in enumerate(cases):
            report = predict(weights, inputs, root / f"out{k}", **options)
            print(f"  {name:32s} {report.images_per_s:6.2f} images/s")

        import onnxruntime

        onnx = export_model(weights, "onnx", root / "model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(onnx.path), options, providers=["CPUExecutionProvider"])
        from fedefm.models.weights import build_from_weights

        network = build_from_weights(weights)[0].eval()
        print(f"latency (median of {args.repeats}), max abs logit difference of the export {onnx.max_abs_difference:.1e}")
        for batch in (1, 8):
            images = torch.rand(batch, 1, args.size, args.size)
            torch_ms, ort_ms = paired_median_ms(network, session, images, args.repeats)
            print(f"  batch {batch}: torch {torch_ms:8.1f} ms  ONNX Runtime {ort_ms:8.1f} ms  "
                  f"(torch / ORT {torch_ms / ort_ms:.2f})")


if __name__ == "__main__":
    main()
