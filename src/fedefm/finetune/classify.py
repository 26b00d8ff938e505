"""Few-shot fine-tuning of an image classifier (catheter position), with model selection on validation only.

The encoder comes from a foundation checkpoint (or starts from scratch) and gets a new LayerNorm→Linear
head over the downstream classes. Multi-class runs train on K images per class with cross-entropy and
select the epoch of best validation balanced accuracy; multi-label runs train on K images in all with
per-label binary cross-entropy and select on validation macro AUROC. Ties go to the lower validation loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedefm.config import resolve_device
from fedefm.data.augment import train_transforms
from fedefm.data.datasets import (
    ClassificationDataset,
    ClassificationItem,
    find_classification_splits,
    find_multilabel_splits,
)
from fedefm.data.labels import LABEL_NAMES
from fedefm.errors import ConfigError, DataError
from fedefm.finetune.classification_metrics import class_scores, confusion_matrix, multilabel_scores
from fedefm.finetune.config import HELD_SEGMENTER, SEGMENTER_NEEDED, FinetuneConfig
from fedefm.finetune.loop import FinetuneTask, fit, require_validation_split, run_folder, select_shots
from fedefm.models.heads import Classifier
from fedefm.models.position import POSITION_MODELS
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import ARCHS
from fedefm.models.weights import (
    TransferReport,
    describe_keys,
    load_metadata,
    load_pretrained,
    load_segmenter,
    model_metadata,
)

log = logging.getLogger(__name__)


def find_splits(cfg: FinetuneConfig) -> tuple[dict[str, list[ClassificationItem]], list[str]]:
    """The train/val/test items and class (or label) names of the run's dataset: class folders or a multi-label CSV."""
    find = find_multilabel_splits if cfg.multilabel else find_classification_splits
    return find(Path(cfg.data), cfg.seed, cfg.val_fraction, cfg.test_fraction)


def check_class_sizes(splits: dict[str, list[ClassificationItem]], class_names: list[str], data: Path) -> None:
    """Raise DataError naming the class when a class holds one image in all: it cannot be both learned and validated."""
    counts = np.bincount([item.label for items in splits.values() for item in items], minlength=len(class_names))
    single = [name for name, count in zip(class_names, counts) if count == 1]
    if single:
        raise DataError(f"{data}: class {', '.join(repr(n) for n in single)} holds a single image; a class needs at "
                        "least two (one to train on, one to validate), so add images or drop the class folder")


def select_class_shots(items: list[ClassificationItem], shots: int | None, seed: int, class_names: list[str]
                       ) -> list[ClassificationItem]:
    """K training images of every class, drawn per class by the seed (all of them when K is None)."""
    chosen = []
    for label, name in enumerate(class_names):
        of_class = [item for item in items if item.label == label]
        chosen += select_shots(of_class, shots, [seed, label], f"class '{name}' of the training split")
    return sorted(chosen, key=lambda item: item.name)


def load_samples(items: list[ClassificationItem], size: int, multilabel: bool) -> dict[str, torch.Tensor]:
    """Read and resize every item once: {"image": (N, 1, S, S), "label": (N,) long or (N, L) float 0/1}."""
    dataset = ClassificationDataset(items, size=size)
    samples = [dataset[i] for i in range(len(dataset))]
    labels = torch.tensor([s["label"] for s in samples])
    return {"image": torch.stack([s["image"] for s in samples]), "label": labels.float() if multilabel else labels}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for labels (B,) class indices, per-label binary cross-entropy for labels (B, L) 0/1."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, multilabel: bool, batch_size: int = 32
                          ) -> torch.Tensor:
    """Class probabilities (N, C) of images (N, 1, S, S): softmax over classes, or a sigmoid per label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(images[start : start + batch_size].to(device)).cpu()
                        for start in range(0, images.shape[0], batch_size)])
    model.train(was_training)
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def evaluate(model: torch.nn.Module, samples: dict[str, torch.Tensor], class_names: list[str]) -> dict:
    """Score ``model`` on decoded samples: the classification evaluate JSON, plus "loss" (mean on these samples)."""
    multilabel = samples["label"].ndim == 2
    probabilities = predict_probabilities(model, samples["image"], multilabel)
    if multilabel:
        result = multilabel_scores(probabilities.numpy(), samples["label"].numpy(), class_names)
        loss = F.binary_cross_entropy(probabilities.clamp(1e-7, 1 - 1e-7), samples["label"])
    else:
        pred = probabilities.argmax(1).numpy()
        result = class_scores(confusion_matrix(pred, samples["label"].numpy(), len(class_names)), class_names)
        loss = F.nll_loss(probabilities.clamp_min(1e-7).log(), samples["label"])
    return result | {"loss": float(loss)}


def selection_score(result: dict) -> tuple[float, float]:
    """What a run is selected on, higher is better: (balanced accuracy or macro AUROC, minus the loss)."""
    main = result["macro_auroc"] if "macro_auroc" in result else result["balanced_accuracy"]
    return (-1.0 if main is None else main, -result["loss"])


def val_columns(result: dict) -> dict:
    """The metrics.jsonl columns of a validation: loss, accuracy, balanced accuracy, macro F1 and macro AUROC."""
    return {"val_loss": result["loss"], "val_accuracy": result["accuracy"],
            "val_balanced_accuracy": result["balanced_accuracy"], "val_macro_f1": result["macro_f1"],
            "val_macro_auroc": result.get("macro_auroc")}


def build_model(cfg: FinetuneConfig, n_classes: int) -> tuple[torch.nn.Module, TransferReport | None]:
    """A classifier with a new head over ``n_classes``, by ``cfg.pooling``, from scratch or from fedefm weights.

    ``mean`` takes any fedefm weights' encoder; ``tip`` also a segmenter's (or dense foundation's) decoder and
    segmentation head (background, catheter, guidewire by name) under ``--init-parts auto`` or ``all``. ``mask``
    and ``path`` hold the whole segmenter of ``init`` as loaded, of the arch its file names (a TransUNet, or a
    dense foundation's body and head; a U-Net, residual U-Net or SwinUNETR), so they need one whose segmentation
    head was trained.

    Raises:
        ConfigError: ``mask`` or ``path`` from weights that leave part of the segmenter new.
    """
    preset = get_preset(cfg.preset)
    if cfg.pooling == "mean":
        return load_init(Classifier(preset, n_classes), cfg, "encoder")
    if cfg.pooling not in HELD_SEGMENTER:
        return load_init(POSITION_MODELS[cfg.pooling](preset, n_classes), cfg, cfg.init_parts)
    # config validation refuses mask and path from scratch; a file of a MONAI arch gives the segmenter its arch
    arch = load_metadata(Path(cfg.init)).get("arch")
    model = POSITION_MODELS[cfg.pooling](preset, n_classes, segmenter_arch=arch if arch in ARCHS else "transunet")
    transfer = load_segmenter(model.segmenter, Path(cfg.init), cfg.init_parts, LABEL_NAMES)
    if transfer.new:
        raise ConfigError(f"--init {cfg.init}: gives no trained segmenter ({transfer.head or transfer.parts}; new: "
                          f"{describe_keys(transfer.new)}); --pooling {cfg.pooling} {SEGMENTER_NEEDED}")
    return model, transfer


def load_init(model: torch.nn.Module, cfg: FinetuneConfig, parts: str) -> tuple[torch.nn.Module, TransferReport | None]:
    """``model`` and what it took from ``cfg.init`` (``parts`` of it), or no report from scratch."""
    if cfg.init == "scratch":
        return model, None
    return model, load_pretrained(model, Path(cfg.init), parts, LABEL_NAMES)


def run(cfg: FinetuneConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Fine-tune a classifier; writes OUT/{run.json, config.json, metrics.jsonl, model.safetensors, log.txt, checkpoints/}.

    With ``resume``, continues from the newest intact checkpoint in OUT (every epoch writes one) and
    refuses a folder written with other settings; with ``overwrite``, replaces the run in OUT.

    Returns:
        {"best_epoch", "best_val": selection score, "val": evaluate JSON of the selected model,
        "transfer": summary or None}.
    """
    with run_folder(cfg, resume, overwrite) as out:
        return _train(cfg, out, resume, progress)


def _train(cfg: FinetuneConfig, out: Path, resume: bool, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    splits, class_names = find_splits(cfg)
    if not cfg.multilabel:
        check_class_sizes(splits, class_names, Path(cfg.data))
    require_validation_split(splits, cfg.data)
    train_items = (select_shots(splits["train"], cfg.shots, cfg.seed) if cfg.multilabel
                   else select_class_shots(splits["train"], cfg.shots, cfg.seed, class_names))
    train = load_samples(train_items, cfg.image_size, cfg.multilabel)
    val = load_samples(splits["val"], cfg.image_size, cfg.multilabel)
    log.info("training on %d images, validating on %d (%s; classes %s)", len(train_items), len(splits["val"]),
             cfg.data, ", ".join(class_names))

    device = resolve_device(cfg.device)
    model, transfer = build_model(cfg, len(class_names))
    model.to(device).train()
    task = FinetuneTask(
        train=train, val=val, model=model, transfer=transfer, augment=train_transforms(cfg.seed, keep_orientation=True),
        loss=lambda batch: classification_loss(model(batch["image"]), batch["label"]),
        evaluate=lambda samples: evaluate(model, samples, class_names), score=selection_score,
        val_columns=val_columns, score_name="macro AUROC" if cfg.multilabel else "balanced accuracy",
        metadata=model_metadata(model) | {"task": "classify", "classes": class_names, "multilabel": cfg.multilabel,
                                          "image_size": cfg.image_size},
        record={"classes": class_names, "train_images": [i.name for i in train_items]})
    return fit(cfg, out, task, resume, progress)
