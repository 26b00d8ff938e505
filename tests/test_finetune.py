import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedefm.cli import app
from fedefm.data.augment import train_transforms
from fedefm.data.datasets import find_segmentation_splits
from fedefm.data.synth import write_seg_dataset
from fedefm.errors import ConfigError, DataError, WeightsError
from fedefm.finetune import loop, train
from fedefm.finetune import predict as predict_module
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.predict import predict
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import load_weights, model_metadata, save_weights

SIZE = 64


def confident_logits(labels: torch.Tensor) -> torch.Tensor:
    """Logits (B, 3, H, W) that predict label maps (B, 1, H, W) with near-certainty."""
    return 20.0 * torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float()


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
    # The per-class curves are the ones the mean is made of (a class absent from every frame is null, not 0).
    per_class = [r[f"val_dice_{c}"] for r in rows for c in ("catheter", "guidewire")]
    assert all(v is None or 0 <= v <= 1 for v in per_class)
    assert all(r["val_dice"] == pytest.approx(np.mean([r[f"val_dice_{c}"] for c in ("catheter", "guidewire")
                                                       if r[f"val_dice_{c}"] is not None]))
               for r in rows if r["val_dice"] is not None)


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
    with pytest.raises(ConfigError, match="--init-parts all: --task classify --pooling mean takes only the encoder"):
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


@pytest.mark.parametrize("arch", ["unet", "resunet", "swinunetr"])
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


@pytest.mark.parametrize("loss", ["dicece", "cldice", "dicecldice", "tips"])
@pytest.mark.parametrize("shape", [(33, 47), (64, 64)])
def test_every_loss_option_runs_forward_and_backward_at_odd_sizes(dataset, tmp_path, loss, shape):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, loss=loss, image_size=SIZE).validate()
    loss_fn = train.segmentation_loss(cfg, torch.device("cpu"))
    # shape: logits (2, 3, H, W), labels (2, 1, H, W) with a catheter block and a 1-px guidewire
    logits = torch.randn(2, 3, *shape, requires_grad=True)
    labels = torch.zeros(2, 1, *shape, dtype=torch.long)
    labels[:, 0, 5:9, 4:20] = 1
    labels[:, 0, 20, 3:30] = 2
    value = loss_fn(logits, labels)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and logits.grad.abs().sum() > 0


def test_tip_ends_mark_the_last_fifth_of_a_device_and_not_an_end_cut_by_the_border():
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 10:64, 30] = 1  # a catheter entering from below, its tip at row 10
    labels[1, 0:64, 30] = 1  # one that crosses the whole image: both ends cut, no tip in view
    ends = train.tip_ends(labels, share=0.2, margin=0)
    rows = torch.nonzero(ends[0])[:, 0]
    assert ends[0].sum() == 11 and rows.min() == 10 and rows.max() == 20
    assert not ends[1].any()
    widened = train.tip_ends(labels, share=0.2, margin=2)
    assert widened[0, 8, 30] and widened[0, 15, 28] and not widened[0, 30, 30]  # beyond the tip, beside it, not behind


def catheter_and_short_of_its_tip() -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (1, 1, 64, 64) of a catheter entering from below with its tip at row 10, and the same without its last
    fifth (a prediction that stops short of the tip)."""
    labels = torch.zeros(1, 1, 64, 64, dtype=torch.long)
    labels[0, 0, 10:64, 30] = 1
    short = labels.clone()
    short[0, 0, 10:22, 30] = 0
    return labels, short


def test_the_tips_loss_punishes_a_prediction_that_stops_short_of_the_tip_more_than_dicece(dataset, tmp_path):
    labels, short = catheter_and_short_of_its_tip()
    logits = confident_logits(short)
    losses = {}
    for loss in ("dicece", "tips"):
        cfg = FinetuneConfig(data=dataset, out=tmp_path, loss=loss, image_size=SIZE).validate()
        loss_fn = train.segmentation_loss(cfg, torch.device("cpu"))
        perfect = confident_logits(labels)
        losses[loss] = loss_fn(logits, labels) - loss_fn(perfect, labels)
    assert losses["tips"] > losses["dicece"] + 1.0


def test_the_tips_term_weighs_a_pixel_past_the_tip_as_much_as_one_missed_at_it(dataset, tmp_path):
    labels = torch.zeros(1, 1, 64, 64, dtype=torch.long)
    labels[0, 0, 10:64, 30] = 1  # tip at row 10
    overshoot, short = labels.clone(), labels.clone()
    overshoot[0, 0, 8:10, 30] = 1  # 2 background pixels past the tip marked catheter
    short[0, 0, 10:12, 30] = 0  # 2 catheter pixels at the tip missed
    tips, dicece = (train.segmentation_loss(FinetuneConfig(data=dataset, out=tmp_path, loss=loss, image_size=SIZE)
                                            .validate(), torch.device("cpu")) for loss in ("tips", "dicece"))

    def tip_term(predicted: torch.Tensor) -> float:
        logits = confident_logits(predicted)
        return float(tips(logits, labels) - dicece(logits, labels))

    assert tip_term(overshoot) == pytest.approx(tip_term(short), rel=1e-3)  # class-weighted: a tenth of it
    assert tip_term(overshoot) > 0.5


def test_the_tip_weight_scales_the_tips_term_alone(dataset, tmp_path):
    labels, short = catheter_and_short_of_its_tip()
    logits = confident_logits(short)
    dicece, once, thrice = (
        train.segmentation_loss(FinetuneConfig(data=dataset, out=tmp_path, image_size=SIZE, **options).validate(),
                                torch.device("cpu"))(logits, labels).item()
        for options in ({"loss": "dicece"}, {"loss": "tips"}, {"loss": "tips", "tip_weight": 3.0}))
    assert once - dicece > 1.0
    assert thrice - dicece == pytest.approx(3 * (once - dicece), rel=1e-5)


@pytest.mark.parametrize("options, match", [
    ({"loss": "dicece", "tip_weight": 3.0}, "--tip-weight 3.0 belongs to --loss tips"),
    ({"loss": "tips", "tip_weight": 0.0}, "--tip-weight 0.0: must be a positive number"),
    ({"loss": "tips", "tip_weight": float("nan")}, "--tip-weight nan: must be a positive number")])
def test_a_tip_weight_without_the_tips_loss_or_not_positive_is_refused(dataset, tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(data=dataset, out=tmp_path, image_size=SIZE, **options).validate()


@pytest.mark.parametrize("loss", ["cldice", "dicecldice"])
def test_cldice_losses_are_lowest_for_a_confident_prediction_equal_to_the_mask(dataset, tmp_path, loss):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, loss=loss, image_size=SIZE).validate()
    loss_fn = train.segmentation_loss(cfg, torch.device("cpu"))
    labels = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    labels[0, 0, 4:8, 2:30] = 1
    labels[0, 0, 16, 2:30] = 2
    perfect = confident_logits(labels)
    shifted = perfect.roll(3, dims=2)
    assert loss_fn(perfect, labels) < 0.05 < loss_fn(shifted, labels)


def test_crops_are_the_crop_size_and_centre_on_devices_more_often_than_chance(dataset):
    items = loop.select_shots(find_segmentation_splits(dataset, 0, 0.15, 0.15)["train"], 8, 0)
    samples = train.load_samples(items, SIZE)
    batches = loop.training_batches(samples, 4, train_transforms(0, crop=32), seed=0)
    device_share = []
    for _ in range(8):
        batch = next(batches)
        assert batch["image"].shape == (4, 1, 32, 32) and batch["mask"].shape == (4, 32, 32)
        device_share.append((batch["mask"] > 0).float().mean().item())
    whole = (samples["mask"] > 0).float().mean().item()
    assert np.mean(device_share) > 1.5 * whole


@pytest.mark.parametrize(
    "image_size, shots, epochs, samples_per_epoch",
    [(128, 16, 30, 64), (256, 16, 60, 64), (256, 64, 60, 256), (64, None, 30, 64)],
)
def test_the_default_budget_scales_with_image_size_and_shots(dataset, tmp_path, image_size, shots, epochs,
                                                             samples_per_epoch):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, image_size=image_size, shots=shots).validate()
    assert (cfg.epochs, cfg.samples_per_epoch) == (epochs, samples_per_epoch)


@pytest.mark.parametrize("image_size, crop, expected", [(128, None, None), (256, None, 128), (256, 256, 256),
                                                        (256, 64, 64), (64, None, None)])
def test_images_above_128_px_train_on_128_px_crops_unless_told_otherwise(dataset, tmp_path, image_size, crop,
                                                                        expected):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, image_size=image_size, crop=crop).validate()
    assert cfg.crop == expected


@pytest.mark.parametrize("image_size, crop, expected", [(128, None, 1), (256, None, 2), (256, 256, 1), (256, 64, 8)])
def test_runs_on_crops_validate_less_often_by_default(dataset, tmp_path, image_size, crop, expected):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, image_size=image_size, crop=crop).validate()
    assert cfg.eval_every == expected


def test_eval_every_validates_those_epochs_and_the_last_and_selects_among_them(dataset, tmp_path):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, shots=4, epochs=3, batch_size=4, samples_per_epoch=4,
                         warmup_steps=1, image_size=SIZE, eval_every=2)
    result = train.run(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["val_dice" in row for row in rows] == [False, True, True]
    assert not rows[0]["selected"] and result["best_epoch"] in (2, 3)


def test_eval_every_below_one_is_refused(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--eval-every 0: must be at least 1"):
        FinetuneConfig(data=dataset, out=tmp_path, image_size=SIZE, eval_every=0).validate()


def test_a_classifier_gets_no_default_crop(dataset, tmp_path):
    assert FinetuneConfig(data=dataset, out=tmp_path, task="classify", image_size=256).validate().crop is None


@pytest.mark.parametrize("crop, match", [(40, "--crop 40: must be a multiple of 32"), (96, "--crop 96")])
def test_a_crop_that_is_not_a_multiple_of_32_or_exceeds_the_image_is_refused(dataset, tmp_path, crop, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(data=dataset, out=tmp_path, image_size=SIZE, crop=crop).validate()


def test_unknown_loss_suggests_the_right_one(dataset, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cldice'"):
        FinetuneConfig(data=dataset, out=tmp_path, image_size=SIZE, loss="cldic").validate()


def test_finetune_on_crops_with_the_cldice_loss_selects_on_whole_validation_images(dataset, tmp_path):
    cfg = FinetuneConfig(data=dataset, out=tmp_path, shots=8, epochs=2, batch_size=4, samples_per_epoch=8,
                         warmup_steps=2, image_size=SIZE, crop=32, loss="cldice")
    result = train.run(cfg, progress=False)
    assert result["val"]["n_images"] >= 1 and 1 <= result["best_epoch"] <= 2
    assert json.loads((tmp_path / "config.json").read_text())["config"]["crop"] == 32


def test_predict_writes_per_class_probabilities_whose_argmax_is_the_mask(finetuned, dataset, tmp_path):
    out, _ = finetuned
    images = sorted((dataset / "images").glob("*.png"))[:2]
    report = predict(out, images, tmp_path / "pred", probabilities=True)
    assert [p.name for p in report.probabilities] == [f"{p.stem}_probabilities.npy" for p in images]
    probability = np.load(report.probabilities[0], allow_pickle=False)
    assert probability.dtype == np.float32 and probability.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(probability.sum(0), 1.0, atol=1e-5)
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{images[0].stem}_mask.png"))
    np.testing.assert_array_equal(probability.argmax(0), mask)


def test_small_components_go_and_a_thin_diagonal_wire_stays():
    # shape: (16, 16) labels; a 1-px diagonal guidewire of 10 px (8-connected), a 3-px catheter speck, a 6-px bar
    labels = np.zeros((16, 16), np.uint8)
    labels[np.arange(3, 13), np.arange(2, 12)] = 2
    labels[0, 13:16] = 1
    labels[14, 2:8] = 1
    cleaned = predict_module.remove_small_components(labels, 5)
    assert (cleaned == 2).sum() == 10  # kept whole: diagonal neighbours connect
    assert (cleaned[0] == 0).all() and (cleaned[14, 2:8] == 1).all()
    np.testing.assert_array_equal(predict_module.remove_small_components(labels, 0), labels)


def test_predict_with_component_clean_up_removes_only_foreground(finetuned, dataset, tmp_path):
    out, _ = finetuned
    image = sorted((dataset / "images").glob("*.png"))[0]
    predict(out, [image], tmp_path / "plain")
    predict(out, [image], tmp_path / "clean", min_component_px=10**6)
    assert (np.asarray(Image.open(tmp_path / "clean" / f"{image.stem}_mask.png")) == 0).all()
    with pytest.raises(ConfigError, match="--min-component-px -1"):
        predict(out, [image], tmp_path / "bad", min_component_px=-1)


def test_cli_predict_writes_probabilities(finetuned, dataset, tmp_path):
    out, _ = finetuned
    image = sorted((dataset / "images").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["predict", "--model", str(out), str(image), "--out", str(tmp_path / "p"),
                                      "--probabilities", "--min-component-px", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / f"{image.stem}_probabilities.npy").is_file()
