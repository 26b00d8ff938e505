"""Export a fine-tuned segmenter for deployment (``fedefm export``): ONNX, TorchScript or a MONAI Bundle.

Every export is checked against the torch model before it is kept: the exported model runs on a random batch
and on synthetic fluoroscopy frames, and the largest absolute logit difference must stay within
:data:`TOLERANCE` (1e-4; float32 rounding differences between kernels are ~1e-5). The ONNX model is run by ONNX
Runtime (CPU provider); its batch axis is dynamic (input ``image`` (B, 1, S, S) in [0, 1], output ``logits``
(B, 3, S, S)). The TorchScript model is traced and takes the same input.

A bundle (``OUT/configs/metadata.json``, ``OUT/configs/inference.json``, ``OUT/models/model.ts``) loads with
``monai.bundle.ConfigParser``; its ``network`` takes one image (B, 1, H, W) in [0, 1] at any size, resizes it to
S as ``predict`` does (bilinear, antialiased), and returns logits at the input's size, so its argmax is
``predict``'s mask. ``preprocessing`` reads an 8-bit grey PNG/TIFF as ``predict`` does (divided by 255).
Provenance (fedefm version, arch, preset, image size, the SHA-256 of the training run's config.json) goes into
the ONNX metadata, the TorchScript extra file ``fedefm.json`` and the bundle's metadata.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedefm import __version__
from fedefm.data.labels import LABEL_NAMES
from fedefm.errors import ConfigError, WeightsError, choose
from fedefm.files import write_json
from fedefm.finetune.evaluate import is_classifier, weights_path
from fedefm.models.weights import build_from_weights

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript", "bundle")
TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """Where an export went and how far the exported model's logits are from torch's."""

    path: Path
    max_abs_difference: float
    provenance: dict


class ResizingSegmenter(torch.nn.Module):
    """A segmenter that takes images of any size: (B, 1, H, W) in [0, 1] → logits (B, C, H, W), as ``predict`` resizes."""

    def __init__(self, network: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.network = network
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Resize to the training size (bilinear, antialiased), segment, resize the logits back (bilinear)."""
        height, width = image.shape[-2], image.shape[-1]
        resized = F.interpolate(image, size=(self.size, self.size), mode="bilinear", antialias=True,
                                align_corners=False)
        logits = self.network(resized)
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)


def provenance(model: Path, metadata: dict) -> dict:
    """What travels with an exported model: fedefm version, arch, preset, image size, training config hash."""
    config = weights_path(model).parent / "config.json"
    return {"fedefm_version": metadata.get("fedefm_version", __version__), "exported_by": __version__,
            "arch": metadata["arch"], "preset": metadata.get("preset"), "image_size": int(metadata["image_size"]),
            "classes": list(LABEL_NAMES),
            "training_config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def check_inputs(size: int, seed: int = 0) -> torch.Tensor:
    """The parity batch (4, 1, size, size): two uniform-noise images and two synthetic fluoroscopy frames."""
    from fedefm.data.synth.domains import render_fluoro

    rng = np.random.default_rng(seed)
    frames = [render_fluoro("clinical", size, np.random.default_rng(seed + k))[0] for k in range(2)]
    noise = rng.random((2, size, size), dtype=np.float32)
    return torch.from_numpy(np.stack([*noise, *frames]).astype(np.float32))[:, None]


def export_model(model: Path, output_format: str, out: Path, overwrite: bool = False) -> ExportReport:
    """Export the segmenter at ``model`` (run folder or .safetensors) as ``output_format`` to ``out``.

    Raises:
        ConfigError: an unknown format, or ``out`` exists and ``overwrite`` is not set.
        WeightsError: naming the weights, when they are a classifier's (a segmentation export needs a segmenter),
            or when the exported model's logits differ from torch's by more than :data:`TOLERANCE`.
    """
    output_format = choose("--format", output_format, EXPORT_FORMATS)
    path = weights_path(model)
    network, metadata = build_from_weights(path)
    if is_classifier(metadata):
        raise WeightsError(f"{path}: holds a classifier; fedefm export writes segmentation models (ONNX, "
                           "TorchScript, MONAI Bundle) and needs a fine-tuned segmenter's weights")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: already exists; pass --overwrite to replace it")
    if out.is_dir() and not _is_fedefm_bundle(out):
        raise ConfigError(f"--out {out}: is a folder that is not a fedefm bundle; --overwrite replaces only those")
    network.eval()
    size = int(metadata["image_size"])
    info = provenance(model, metadata)
    inputs = check_inputs(size)
    with torch.no_grad():
        expected = network(inputs).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # beside out: the rename stays on one disk
    try:
        if output_format == "onnx":
            staged = staging / "model.onnx"
            _write_onnx(network, inputs, staged, info)
            difference = _max_difference(_run_onnx(staged, inputs), expected, path, "ONNX Runtime")
        elif output_format == "torchscript":
            staged = staging / "model.ts"
            _write_torchscript(network, inputs, staged, info)
            difference = _max_difference(_run_torchscript(staged, inputs), expected, path, "TorchScript")
        else:
            staged = staging / "bundle"
            difference = _write_bundle(network, size, inputs, expected, staged, info, path)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s (max abs logit difference %.2e)", path, out, difference)
    return ExportReport(out, difference, info)


def _is_fedefm_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a bundle fedefm export wrote (its metadata.json has a "fedefm" block)."""
    try:
        return "fedefm" in json.loads((folder / "configs" / "metadata.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _write_onnx(network: torch.nn.Module, inputs: torch.Tensor, path: Path, info: dict) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(network, (inputs,), path, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    exported = onnx.load(path)
    onnx.helper.set_model_props(exported, {key: json.dumps(value) for key, value in info.items()})
    onnx.save(exported, path)


def _run_onnx(path: Path, inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": inputs.numpy()})[0]


def _trace(network: torch.nn.Module, inputs: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace ``network`` at the training size; its input size is fixed there, which the parity check covers."""
    with warnings.catch_warnings():
        # The encoder compares its token grid with the preset's (a Python bool); at the traced size it always holds.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(network, inputs[:1], check_trace=False)


def _write_torchscript(network: torch.nn.Module, inputs: torch.Tensor, path: Path, info: dict) -> None:
    traced = _trace(network, inputs)
    torch.jit.save(traced, str(path), _extra_files={"fedefm.json": json.dumps(info)})


def _run_torchscript(path: Path, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(inputs).numpy()


def _max_difference(actual: np.ndarray, expected: np.ndarray, weights: Path, runtime: str) -> float:
    difference = float(np.abs(actual - expected).max())
    if not difference <= TOLERANCE:
        raise WeightsError(f"{weights}: the {runtime} export differs from the torch model by {difference:.2e} "
                           f"(max abs logit), more than the tolerance {TOLERANCE:g}; it was not written")
    return difference


def _write_bundle(network: torch.nn.Module, size: int, inputs: torch.Tensor, expected: np.ndarray, root: Path,
                  info: dict, weights: Path) -> float:
    """Write a MONAI Bundle under ``root`` and return the max abs logit difference of its network."""
    from monai.bundle import ConfigParser

    (root / "models").mkdir(parents=True)
    resizing = torch.jit.script(ResizingSegmenter(_trace(network, inputs), size))
    torch.jit.save(resizing, str(root / "models" / "model.ts"), _extra_files={"fedefm.json": json.dumps(info)})
    write_json(root / "configs" / "metadata.json", _bundle_metadata(size, info))
    write_json(root / "configs" / "inference.json", INFERENCE_CONFIG)
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser["bundle_root"] = str(root)
    with torch.no_grad():
        logits = parser.get_parsed_content("network")(inputs).numpy()
    return _max_difference(logits, expected, weights, "MONAI Bundle")


# The bundle's inference config: MONAI's expression syntax ("$" evaluates, "@" refers to another key).
INFERENCE_CONFIG = {
    "imports": ["$import torch", "$import numpy"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
    "network": "$@network_def.eval()",
    "image": "",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImage", "image_only": True, "reader": "PILReader", "reverse_indexing": False,
             "dtype": "$numpy.float32"},
            {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
            {"_target_": "ScaleIntensityRange", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0, "b_max": 1.0},
        ],
    },
    "logits": "$@network(torch.as_tensor(@preprocessing(@image))[None].to(@device))",
    "mask": "$@logits.argmax(dim=1)[0].to(torch.uint8)",
}


def _bundle_metadata(size: int, info: dict) -> dict:
    """The bundle's configs/metadata.json, in MONAI's bundle metadata schema."""
    return {
        "version": __version__,
        "monai_version": _monai_version(),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": "fedefm catheter and guidewire segmenter",
        "task": "Catheter and guidewire segmentation in X-ray fluoroscopy",
        "description": "A fedefm fine-tuned segmenter (FedEFM, Do et al. ICRA 2025), exported by fedefm export.",
        "authors": "fedefm",
        "copyright": "Apache-2.0",
        "changelog": {__version__: "exported by fedefm"},
        "fedefm": info,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "XA", "num_channels": 1,
                                 "spatial_shape": ["*", "*"], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": ["*", "*"], "dtype": "float32", "value_range": [],
                                 "is_patch_data": False,
                                 "channel_def": {"0": "background", "1": "catheter", "2": "guidewire"}}},
        },
        "training_image_size": size,
    }


def _monai_version() -> str:
    import monai

    return monai.__version__
