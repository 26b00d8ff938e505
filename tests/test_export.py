"""fedefm export: ONNX (ONNX Runtime parity, dynamic batch), TorchScript and a MONAI Bundle that predicts predict's mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from fedefm.data.synth.domains import render_fluoro
from fedefm.errors import ConfigError, WeightsError
from fedefm.finetune.export import TOLERANCE, check_inputs, export_model
from fedefm.finetune.predict import predict
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import model_metadata, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "segmenter.safetensors"
    save_weights(path, TransUNet(get_preset("tiny"), n_classes=3), {"image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def onnx_export(segmenter, tmp_path_factory):
    return export_model(segmenter, "onnx", tmp_path_factory.mktemp("export") / "model.onnx")


def torch_logits(segmenter: Path, images: torch.Tensor) -> np.ndarray:
    from fedefm.models.weights import build_from_weights

    network = build_from_weights(segmenter)[0].eval()
    with torch.no_grad():
        return network(images).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_runtime_matches_torch_on_random_and_real_inputs_at_any_batch(segmenter, onnx_export, batch):
    assert onnx_export.max_abs_difference <= TOLERANCE
    rng = np.random.default_rng(batch)
    frames = [render_fluoro("clinical", SIZE, np.random.default_rng(100 + k))[0] for k in range(batch // 2)]
    noise = rng.random((batch - len(frames), SIZE, SIZE), dtype=np.float32)
    images = torch.from_numpy(np.stack([*frames, *noise]).astype(np.float32))[:, None]
    session = onnxruntime.InferenceSession(str(onnx_export.path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images.numpy()})[0]
    assert np.abs(logits - torch_logits(segmenter, images)).max() <= TOLERANCE


@pytest.mark.slow
def test_the_onnx_file_carries_the_weights_provenance(onnx_export):
    props = {p.key: json.loads(p.value) for p in onnx.load(onnx_export.path).metadata_props}
    assert props["arch"] == "transunet" and props["preset"] == "tiny" and props["image_size"] == SIZE
    assert "fedefm_version" in props and "training_config_sha256" in props


def test_torchscript_export_matches_torch(segmenter, tmp_path):
    report = export_model(segmenter, "torchscript", tmp_path / "model.ts")
    extra = {"fedefm.json": ""}
    loaded = torch.jit.load(str(report.path), _extra_files=extra)
    images = check_inputs(SIZE, seed=5)
    with torch.no_grad():
        assert np.abs(loaded(images).numpy() - torch_logits(segmenter, images)).max() <= TOLERANCE
    assert json.loads(extra["fedefm.json"])["arch"] == "transunet"


def test_the_bundle_loads_with_monai_and_predicts_the_same_mask_as_predict(segmenter, tmp_path):
    from monai.bundle import ConfigParser

    bundle = export_model(segmenter, "bundle", tmp_path / "bundle").path
    image = (render_fluoro("clinical", 80, np.random.default_rng(7))[0] * 255).round().astype(np.uint8)
    Image.fromarray(image[:, :72]).save(tmp_path / "frame.png")  # not square, not the training size
    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["image"] = str(tmp_path / "frame.png")
    mask = parser.get_parsed_content("mask").numpy()

    report = predict(segmenter, [tmp_path / "frame.png"], tmp_path / "predicted")
    expected = np.asarray(Image.open(report.outputs[0][0]))
    assert mask.shape == expected.shape == (80, 72)
    assert (mask == expected).mean() > 0.999  # resampling in two graphs: a rare tie may flip
    assert parser["_meta_"]["fedefm"]["preset"] == "tiny"


def test_exporting_a_classifier_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "classifier.safetensors"
    classifier = Classifier(get_preset("tiny"), n_classes=4)
    save_weights(path, classifier, model_metadata(classifier))
    with pytest.raises(WeightsError, match=r"classifier\.safetensors: holds a classifier"):
        export_model(path, "bundle", tmp_path / "bundle")


def test_an_existing_output_is_kept_unless_overwrite(segmenter, tmp_path):
    (tmp_path / "model.ts").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_model(segmenter, "torchscript", tmp_path / "model.ts")
    assert (tmp_path / "model.ts").read_text() == "keep me"
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match="not a fedefm bundle; --overwrite replaces only those"):
        export_model(segmenter, "bundle", tmp_path / "notes", overwrite=True)
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        export_model(segmenter, "onxx", tmp_path / "m.onnx")


def test_cli_export_prints_the_difference_and_a_classifier_gets_one_line(segmenter, tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    result = CliRunner().invoke(app, ["export", str(segmenter), "--format", "torchscript", "--out",
                                      str(tmp_path / "m.ts")])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps long lines at a space
    assert "max abs logit difference to torch" in printed and (tmp_path / "m.ts").is_file()
    path = tmp_path / "classifier.safetensors"
    classifier = Classifier(get_preset("tiny"), n_classes=4)
    save_weights(path, classifier, model_metadata(classifier))
    result = CliRunner().invoke(app, ["export", str(path), "--format", "onnx", "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code != 0 and "holds a classifier" in result.output and "Traceback" not in result.output
