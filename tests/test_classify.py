"""Few-shot fine-tuning of a classifier: layouts, head swap, selection, evaluate/predict, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedefm.cli import app
from fedefm.data.datasets import find_multilabel_splits
from fedefm.data.synth import POSITION_CLASSES, write_position_dataset
from fedefm.errors import ConfigError, DataError
from fedefm.finetune import classify, loop
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.predict import classify_images
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import load_weights, model_metadata, save_weights

SIZE = 32
runner = CliRunner()


def quick_config(data, out, **changes):
    settings = dict(task="classify", shots=3, epochs=2, batch_size=4, samples_per_epoch=8, warmup_steps=2,
                    image_size=SIZE, seed=0)
    return FinetuneConfig(data=data, out=out, **(settings | changes))


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    """Pre-training weights: a 6-class classifier whose tensors differ from a fresh model's."""
    torch.manual_seed(123)
    model = Classifier(get_preset("tiny"), 6)
    path = tmp_path_factory.mktemp("foundation") / "global.safetensors"
    save_weights(path, model, {"classes": [f"type_{k}" for k in range(6)]})
    return path


@pytest.fixture(scope="module")
def finetuned(positions, foundation, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fedefm"
    return out, classify.run(quick_config(positions, out, init=str(foundation)), progress=False)


def write_multilabel(root, rows, header="image,ett_abnormal,cvc_normal"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [header]
    for name, *labels in rows:
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(root / name)
        lines.append(",".join([name, *labels]))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- training


def test_a_few_steps_lower_the_classification_loss():
    torch.manual_seed(0)
    model = Classifier(get_preset("tiny"), 4)
    images, labels = torch.rand(8, 1, SIZE, SIZE), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [loop.optimisation_step(classify.classification_loss(model(images), labels), model, optimizer, 1.0,
                                      f"step {k}") for k in range(6)]
    assert losses[-1] < losses[0]


def test_head_swap_keeps_every_encoder_tensor_of_the_checkpoint(positions, foundation, tmp_path):
    cfg = quick_config(positions, tmp_path, init=str(foundation)).validate()
    model, transfer = classify.build_model(cfg, len(POSITION_CLASSES))
    checkpoint, _ = load_weights(foundation)
    state = model.state_dict()
    encoder_keys = [key for key in state if key.startswith("encoder.")]
    assert transfer.loaded == encoder_keys
    assert all(torch.equal(state[key], checkpoint[key]) for key in encoder_keys)
    assert state["head.linear.weight"].shape == (4, get_preset("tiny").hidden)
    assert set(transfer.ignored) == {"head.linear.weight", "head.linear.bias", "head.norm.weight", "head.norm.bias"}


def test_a_segmenters_weights_give_the_classifier_their_encoder(positions, tmp_path):
    torch.manual_seed(5)
    segmenter = TransUNet(get_preset("tiny"), n_classes=4)
    path = tmp_path / "dense.safetensors"
    save_weights(path, segmenter, {"classes": ["background", "catheter", "guidewire", "vessel"]})
    model, transfer = classify.build_model(quick_config(positions, tmp_path / "run", init=str(path)).validate(), 4)
    assert transfer.parts == "encoder" and {key.split(".")[0] for key in transfer.ignored} == {"decoder",
                                                                                               "segmentation_head"}
    assert all(torch.equal(model.state_dict()[key], value) for key, value in segmenter.state_dict().items()
               if key.startswith("encoder."))


def test_finetune_writes_the_run_folder_with_classes_and_k_images_per_class(finetuned):
    out, result = finetuned
    assert {"config.json", "metrics.jsonl", "model.safetensors", "log.txt"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "config.json").read_text())
    assert record["classes"] == list(POSITION_CLASSES) and record["config"]["task"] == "classify"
    assert sorted(name.split("/")[0] for name in record["train_images"]) == sorted(list(POSITION_CLASSES) * 3)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and sum(row["selected"] for row in rows) >= 1
    _, metadata = load_weights(out / "model.safetensors")
    assert metadata["task"] == "classify" and metadata["classes"] == list(POSITION_CLASSES)
    assert metadata["image_size"] == SIZE and result["transfer"].startswith("encoder: loaded 68: encoder.* (68)")
    assert "encoder: loaded 68: encoder.* (68)" in (out / "log.txt").read_text()
    assert 1 <= result["best_epoch"] <= 2


def test_the_selected_epoch_is_the_best_on_validation(finetuned):
    out, result = finetuned
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda row: (row["val_balanced_accuracy"], -row["val_loss"]))
    assert result["best_epoch"] == best["epoch"]


def test_test_split_is_never_used_for_selection(positions, tmp_path, monkeypatch):
    from fedefm.data.datasets import find_classification_splits

    test_names = {item.name for item in find_classification_splits(positions, 0, 0.15, 0.15)[0]["test"]}
    seen = []
    real_load = classify.load_samples
    monkeypatch.setattr(classify, "load_samples",
                        lambda items, size, multilabel: seen.extend(i.name for i in items) or real_load(items, size,
                                                                                                     multilabel))
    classify.run(quick_config(positions, tmp_path, epochs=1), progress=False)
    assert seen and not test_names & set(seen)


def test_same_seed_gives_the_same_classifier(positions, tmp_path):
    for name in ("a", "b"):
        classify.run(quick_config(positions, tmp_path / name, epochs=1), progress=False)
    first, _ = load_weights(tmp_path / "a" / "model.safetensors")
    second, _ = load_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_shots_above_a_class_size_name_the_class(positions, tmp_path):
    with pytest.raises(ConfigError, match="class 'aortic_arch' of the training split has only"):
        classify.run(quick_config(positions, tmp_path, shots=50), progress=False)


# --------------------------------------------------------------------------- evaluate and predict


def test_evaluate_scores_a_classifier_told_apart_by_its_metadata(finetuned, positions):
    out, _ = finetuned
    result = evaluate_model(out, positions, "test")
    assert set(result) == {"n_images", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion",
                           "classes"}
    assert set(result["per_class"]) == set(POSITION_CLASSES)
    assert set(result["per_class"]["looped"]) == {"precision", "recall", "f1"}
    assert np.array(result["confusion"]).sum() == result["n_images"] == 4  # 1 test image per class of 8
    assert np.trace(result["confusion"]) / result["n_images"] == pytest.approx(result["accuracy"])


def test_evaluate_refuses_a_dataset_with_other_classes(finetuned, tmp_path):
    out, _ = finetuned
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / cls / f"{k}.png")
    with pytest.raises(DataError, match="classes cat, dog differ from the model's"):
        evaluate_model(out, tmp_path, "test")


def test_predict_gives_a_class_and_probabilities_per_image(finetuned, positions, tmp_path):
    out, _ = finetuned
    rows, _ = classify_images(out, [positions / "looped"], tmp_path / "pred")
    assert len(rows) == 8
    for row in rows:
        assert row["class"] in POSITION_CLASSES and set(row["probabilities"]) == set(POSITION_CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
    assert len((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()) == 8


def test_cli_finetunes_evaluates_and_predicts_a_classifier(positions, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--task", "classify", "--data", str(positions), "--out", str(out), "--shots", "2",
            "--epochs", "1", "--image-size", str(SIZE)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output
    evaluated = runner.invoke(app, ["evaluate", "--model", str(out), "--data", str(positions), "--json"])
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["n_images"] == 4
    table = runner.invoke(app, ["evaluate", "--model", str(out), "--data", str(positions)])
    assert table.exit_code == 0 and "supra_aortic" in table.output
    predicted = runner.invoke(app, ["predict", "--model", str(out), str(positions / "aortic_arch" / "img_00000.png")])
    assert predicted.exit_code == 0
    assert json.loads(predicted.stdout.splitlines()[0])["image"] == "img_00000"


def test_cli_synth_position_writes_balanced_class_folders(tmp_path):
    result = runner.invoke(app, ["synth", "position", str(tmp_path / "pos"), "--n", "4", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pos").iterdir() if p.is_dir()) == list(POSITION_CLASSES)


# --------------------------------------------------------------------------- multi-label CSV


def test_multilabel_csv_trains_on_per_label_targets_and_reports_auroc(tmp_path):
    rows = [(f"img_{k}.png", str(k % 2), str(k // 2 % 2)) for k in range(12)]
    data = write_multilabel(tmp_path / "csv", rows)
    splits, labels = find_multilabel_splits(data, seed=0)
    assert labels == ["ett_abnormal", "cvc_normal"]
    items = [item for split in splits.values() for item in split]
    assert sorted(item.name for item in items) == sorted(name for name, *_ in rows)
    assert all(item.label == (k % 2, k // 2 % 2) for item in items for k in [int(item.name[4:-4])])
    out = tmp_path / "run"
    classify.run(quick_config(data / "labels.csv", out, multilabel=True, shots=4), progress=False)
    result = evaluate_model(out, data, "val")
    assert set(result["per_class"]["cvc_normal"]) == {"precision", "recall", "f1", "auroc"}
    assert "macro_auroc" in result and len(result["confusion"]) == 2


@pytest.mark.parametrize(
    "rows, header, match",
    [
        ([("a.png", "0", "1"), ("missing.png", "1", "0")], "image,ett_abnormal,cvc_normal",
         r"line 3: image .*missing.png not found"),
        ([("a.png", "0", "2")], "image,ett_abnormal,cvc_normal", r"line 2: label 'cvc_normal' is '2'; label cells hold 0 or 1"),
        ([("a.png", "0", "1")], "file,ett_abnormal", "header must be image,LABEL_1"),
        ([("a.png", "0", "1")], "image,ett,ett", "label column 'ett' appears twice"),
    ],
)
def test_bad_multilabel_csv_names_the_line_and_the_problem(tmp_path, rows, header, match):
    data = write_multilabel(tmp_path / "csv", rows, header)
    if "missing" in match:
        (data / "missing.png").unlink()
    with pytest.raises(DataError, match=match):
        find_multilabel_splits(data)


# --------------------------------------------------------------------------- bad folders


def test_an_empty_class_folder_is_named(tmp_path):
    write_position_dataset(tmp_path / "pos", 12, size=SIZE)
    for path in (tmp_path / "pos" / "looped").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="class folder 'looped' has no images"):
        classify.run(quick_config(tmp_path / "pos", tmp_path / "run"), progress=False)


def test_a_single_class_dataset_is_refused(tmp_path):
    (tmp_path / "only" / "arch").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "only" / "arch" / "a.png")
    with pytest.raises(DataError, match="only class 'arch'; a classification dataset needs at least two"):
        classify.run(quick_config(tmp_path / "only", tmp_path / "run"), progress=False)


def test_multilabel_belongs_to_the_classify_task(tmp_path):
    with pytest.raises(ConfigError, match="--multilabel belongs to --task classify"):
        FinetuneConfig(data=tmp_path, out=tmp_path / "run", multilabel=True).validate()


def test_segmenter_weights_are_not_taken_for_a_classifier(tmp_path):
    from fedefm.models.segmenters import build_segmenter

    model = build_segmenter("transunet", get_preset("tiny"))
    save_weights(tmp_path / "seg.safetensors", model, model_metadata(model))
    with pytest.raises(ConfigError, match="segmenter, which predicts masks"):
        classify_images(tmp_path / "seg.safetensors", [tmp_path])
