"""Score a fine-tuned segmenter or classifier on a split of a dataset (``fedefm evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedefm.data.datasets import find_classification_splits, find_multilabel_splits, find_segmentation_splits
from fedefm.errors import ConfigError, DataError
from fedefm.finetune import classify
from fedefm.finetune.train import evaluate, load_samples
from fedefm.models.position import POSITION_MODELS
from fedefm.models.weights import build_from_weights, load_metadata


def weights_path(model: Path) -> Path:
    """The weights file of ``model``: a run folder (its model.safetensors) or a .safetensors file."""
    model = Path(model)
    path = model / "model.safetensors" if model.is_dir() else model
    if not path.is_file():
        raise ConfigError(f"--model {model}: no weights at {path}; pass a finetune run folder or a .safetensors file")
    return path


def split_settings(model: Path) -> dict:
    """Seed and split fractions the model was trained with (from the run's config.json), so carved splits match."""
    config = weights_path(model).parent / "config.json"
    if not config.is_file():
        return {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}
    cfg = json.loads(config.read_text())["config"]
    return {key: cfg[key] for key in ("seed", "val_fraction", "test_fraction")}


def is_classifier(metadata: dict) -> bool:
    """Whether a weights file's metadata describes an image classifier (fine-tuned or pre-trained), not a segmenter."""
    return metadata.get("arch") in ("classifier", *(model.arch for model in POSITION_MODELS.values()))


def holds_classifier(model: Path) -> bool:
    """Whether the weights of ``model`` (run folder or .safetensors file) are a classifier's."""
    return is_classifier(load_metadata(weights_path(model)))


def evaluate_model(model: Path, data: Path, split: str = "test") -> dict:
    """Evaluate JSON (DESIGN.md §6) of the segmenter or classifier at ``model`` on ``split`` of ``data``.

    The weights' metadata decides which: a classifier is scored on the class folders (or the multi-label
    CSV) of ``data``, whose class names must be the model's.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split}: choose train, val or test")
    network, metadata = build_from_weights(weights_path(model))
    if is_classifier(metadata):
        return _evaluate_classifier(network, metadata, model, data, split)
    items = find_segmentation_splits(Path(data), **split_settings(model))[split]
    if not items:
        raise DataError(f"{data}: the {split} split has no images")
    return evaluate(network, load_samples(items, int(metadata["image_size"])))


def _evaluate_classifier(network: torch.nn.Module, metadata: dict, model: Path, data: Path, split: str) -> dict:
    multilabel = bool(metadata.get("multilabel", False))
    find = find_multilabel_splits if multilabel else find_classification_splits
    splits, class_names = find(Path(data), **split_settings(model))
    if class_names != list(metadata.get("classes", [])):
        raise DataError(f"{data}: classes {', '.join(class_names)} differ from the model's "
                        f"({', '.join(metadata.get('classes', [])) or 'none recorded'}); evaluate on the task it learned")
    if not splits[split]:
        raise DataError(f"{data}: the {split} split has no images")
    samples = classify.load_samples(splits[split], int(metadata["image_size"]), multilabel)
    result = classify.evaluate(network, samples, class_names)
    del result["loss"]
    return result
