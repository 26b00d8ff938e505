import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedefm.cli import app
from fedefm.config import FinetuneConfig
from fedefm.data.synth import write_seg_dataset
from fedefm.errors import ConfigError, DataError, WeightsError
from fedefm.finetune import train
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.predict import predict
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import load_weights, model_metadata, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "clinical"
    write_seg_dataset(root, "clinical", 24, size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def finetuned(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scratch"
    cfg = FinetuneConfig(data=dataset, out=out, shots=8, epochs=6, batch_size=4, samples_per_epoch=16,
                         warmup_steps=2, image_size=SIZE, seed=0)
    return out, train.run(cfg, progress=False)


def test_a_few_finetune_epochs_lower_the_training_loss(finetuned):
    out, _ = finetuned
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_finetune_writes_the_run_folder_with_resolved_config(finetuned):
    out, result = finetuned
    assert {"config.json", "metrics.jsonl", "model.safetensors", "log.txt"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "config.json").read_text())
    assert record["seed"] == 0 and record["config"]["image_size"] == SIZE
    assert len(record["train_images"]) == 8
    assert 1 <= result["best_epoch"] <= 6


def test_weights_record_the_training_resolution_not_the_presets(finetuned):
    out, _ = finetuned
    _, metadata = load_weights(out / "model.safetensors")
    assert get_preset("tiny").image_size != SIZE
    assert int(metadata["image_size"]) == SIZE


def test_test_split_is_never_used_for_selection(dataset, tmp_path, monkeypatch):
    from fedefm.data.datasets import find_segmentation_splits

    test_names = {item.name for item in find_segmentation_splits(dataset, 0, 0.15, 0.15)["test"]}
    seen = []
    real_load = train.load_samples
    monkeypatch.setattr(train, "load_samples", lambda items, size: seen.extend(i.name for i in items) or real_load(items, size))
    train.run(FinetuneConfig(data=dataset, out=tmp_path, shots=4, epochs=1, batch_size=4, samples_per_epoch=4,
                             image_size=SIZE), progress=False)
    assert test_names and seen and not test_names & set(seen)


def test_more_shots_than_training_images_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--shots 500: the training split has only"):
        train.run(FinetuneConfig(data=dataset, out=tmp_path, shots=500, image_size=SIZE), progress=False)


def test_no_validation_images_after_splitting_is_a_clear_error(dataset, tmp_path):
    cfg = FinetuneConfig(data=dataset, out=tmp_path / "run", shots=4, image_size=SIZE, val_fraction=0.0)
    with pytest.raises(DataError, match="no validation images"):
        train.run(cfg, progress=False)


def test_finetune_from_a_foundation_checkpoint_reports_the_transfer(dataset, tmp_path):
    preset = get_preset("tiny")
    foundation = tmp_path / "foundation.safetensors"
    classifier = Classifier(preset, n_classes=6)
    save_weights(foundation, classifier, model_metadata(classifier))
    cfg = FinetuneConfig(data=dataset, out=tmp_path / "run", init=str(foundation), shots=4, epochs=1,
                         batch_size=4, samples_per_epoch=4, image_size=SIZE)
    result = train.run(cfg, progress=False)
    assert result["transfer"].startswith("encoder: loaded 68: encoder.* (68); new ")
    assert "foundation weights from" in (tmp_path / "run" / "log.txt").read_text()


def dense_foundation(path, classes=("background", "catheter", "guidewire", "vessel")):
    """A dense pre-training run's global model: a TransUNet over ``classes``."""
    torch.manual_seed(11)
    model = TransUNet(get_preset("tiny"), n_classes=len(classes))
    save_weights(path, model, model_metadata(model) | {"classes": list(classes), "objective": "segment"})
    return path


def test_finetune_from_a_dense_pretraining_run_starts_from_its_whole_segmenter(dataset, tmp_path):
    foundation = dense_foundation(tmp_path / "global.safetensors")
    cfg = FinetuneConfig(data=dataset, out=tmp_path / "run", init=str(foundation), image_size=SIZE).validate()
    model, transfer = train.build_model(cfg)
    checkpoint, _ = load_weights(foundation)
    state = model.state_dict()
    assert transfer.parts == "all" and transfer.new == [] and transfer.loaded == list(state)
    assert all(torch.equal(state[key], checkpoint[key]) for key in state if key.startswith("decoder."))
    assert torch.equal(state["segmentation_head.bias"], checkpoint["segmentation_head.bias"][:3])
    encoder_only = train.build_model(FinetuneConfig(data=dataset, out=tmp_path / "run", init=str(foundation),
                                                    init_parts="encoder", image_size=SIZE).validate())[1]
    assert {key.split(".")[0] for key in encoder_only.new} == {"decoder", "segmentation_head"}


def test_whole_model_init_from_classification_weights_fails_before_training(dataset, tmp_path):
    foundation = tmp_path / "classifier.safetensors"
    classifier = Classifier(get_preset("tiny"), n_classes=6)
    save_weights(foundation, classifier, model_metadata(classifier))
    cfg = FinetuneConfig(data=dataset, out=tmp_path / "run", init=str(foundation), init_parts="all", image_size=SIZE)
    with pytest.raises(WeightsError, match="classifier.safetensors: --init-parts all needs a segmenter's weights"):
        train.run(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    result = CliRunner().invoke(app, ["finetune", "--data", str(dataset), "--out", str(tmp_path / "cli"), "--init",
                                      str(foundation), "--init-parts", "all", "--image-size", str(SIZE)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "classifier.safetensors: --init-parts all" in result.output


def test_whole_model_init_of_a_classifier_is_refused_by_the_config(dataset, tmp_path):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, task="classify", init=str(dense_foundation(tmp_path / "w.st")),
                         init_parts="all")
    with pytest.raises(ConfigError, match="--init-parts all: --task classify takes only the encoder"):
        cfg.validate()


def test_evaluate_json_has_the_contract_keys(finetuned, dataset):
    out, _ = finetuned
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", str(dataset), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"n_images", "per_class", "mean"}
    assert set(scores["per_class"]) == {"catheter", "guidewire"}
    assert scores == evaluate_model(out, dataset, "test")


def test_predict_writes_one_mask_and_one_overlay_per_input(finetuned, dataset, tmp_path):
    out, _ = finetuned
    images = sorted((dataset / "images").glob("*.png"))[:3]
    report = predict(out, images, tmp_path / "pred")
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert written == sorted([f"{p.stem}_mask.png" for p in images] + [f"{p.stem}_overlay.png" for p in images]
                             + ["run.json"])
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{images[0].stem}_mask.png"))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 1, 2}
    assert np.asarray(Image.open(tmp_path / "pred" / f"{images[0].stem}_overlay.png")).shape == (SIZE, SIZE, 3)
    assert report.images_per_s > 0


def test_predict_stops_at_an_unreadable_file_unless_asked_to_skip_it(finetuned, dataset, tmp_path):
    out, _ = finetuned
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = sorted((dataset / "images").glob("*.png"))[0]
    with pytest.raises(DataError, match="broken.png"):
        predict(out, [good, bad], tmp_path / "pred")
    report = predict(out, [good, bad], tmp_path / "pred2", skip_bad=True)
    assert len(report.outputs) == 1 and report.skipped[0][0] == bad
    assert "broken.png" in (tmp_path / "pred2" / "skipped.txt").read_text()


def test_cli_finetune_names_a_bad_option_without_a_traceback(dataset, tmp_path):
    result = CliRunner().invoke(app, ["finetune", "--data", str(dataset), "--out", str(tmp_path), "--arch", "transunett"])
    assert result.exit_code == 1
    assert "did you mean 'transunet'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("arch", ["unet", "swinunetr"])
def test_finetune_trains_the_monai_baselines(dataset, tmp_path, arch):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, arch=arch, shots=4, epochs=1, batch_size=4, samples_per_epoch=4,
                         image_size=SIZE)
    train.run(cfg, progress=False)
    assert (tmp_path / "model.safetensors").is_file()
    assert set(evaluate_model(tmp_path, dataset, "test")) == {"n_images", "per_class", "mean"}


def test_foundation_init_of_a_baseline_without_an_encoder_is_refused(dataset, tmp_path):
    foundation = tmp_path / "foundation.safetensors"
    classifier = Classifier(get_preset("tiny"), n_classes=6)
    save_weights(foundation, classifier, model_metadata(classifier))
    cfg = FinetuneConfig(data=dataset, out=tmp_path / "run", arch="unet", init=str(foundation), image_size=SIZE)
    with pytest.raises(ConfigError, match="unet has no foundation encoder"):
        train.run(cfg, progress=False)
