"""Score a fine-tuned segmenter on a split of a dataset (``fedefm evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

from fedefm.data.datasets import find_segmentation_splits
from fedefm.errors import ConfigError, DataError
from fedefm.finetune.train import evaluate, load_samples
from fedefm.models.weights import build_from_weights


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


def evaluate_model(model: Path, data: Path, split: str = "test") -> dict:
    """Evaluate JSON (DESIGN.md §6) of the segmenter at ``model`` on ``split`` of ``data``."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split}: choose train, val or test")
    network, metadata = build_from_weights(weights_path(model))
    items = find_segmentation_splits(Path(data), **split_settings(model))[split]
    if not items:
        raise DataError(f"{data}: the {split} split has no images")
    return evaluate(network, load_samples(items, int(metadata["image_size"])))
