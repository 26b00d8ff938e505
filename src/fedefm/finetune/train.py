"""Few-shot fine-tuning of a catheter/guidewire segmenter (its samples, model, loss and score; the loop is loop.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from monai.losses import DiceCELoss, SoftclDiceLoss, SoftDiceclDiceLoss

from fedefm.config import resolve_device
from fedefm.data.augment import train_transforms
from fedefm.data.datasets import SegmentationDataset, SegmentationItem, find_segmentation_splits
from fedefm.data.labels import LABEL_NAMES
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.loop import FinetuneTask, fit, require_validation_split, run_folder, select_shots
from fedefm.finetune.metrics import SegmentationScores
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import build_segmenter
from fedefm.models.weights import TransferReport, load_pretrained, model_metadata

log = logging.getLogger(__name__)


def load_samples(items: list[SegmentationItem], size: int) -> dict[str, torch.Tensor]:
    """Read and resize every item once: {"image": (N, 1, S, S), "mask": (N, S, S)}.

    Few-shot sets are small, so holding them decoded keeps PNG/DICOM decoding out of the loop.
    """
    dataset = SegmentationDataset(items, size=size)
    samples = [dataset[i] for i in range(len(dataset))]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: dict[str, torch.Tensor], batch_size: int = 8) -> dict:
    """Score ``model`` on decoded samples; returns the evaluate JSON of DESIGN.md §6."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = SegmentationScores(LABEL_NAMES)
    for start in range(0, samples["image"].shape[0], batch_size):
        logits = model(samples["image"][start : start + batch_size].to(device))
        scores.update(logits.argmax(1).cpu(), samples["mask"][start : start + batch_size])
    model.train(was_training)
    return scores.aggregate()


def selection_score(result: dict) -> float:
    """The validation number a run is selected on: mean foreground Dice (0 when undefined)."""
    dice = result["mean"]["dice"]
    return -1.0 if dice is None else dice


def val_columns(result: dict) -> dict:
    """The metrics.jsonl columns of a validation: mean Dice and clDice, and Dice per class."""
    return {"val_dice": result["mean"]["dice"], "val_cldice": result["mean"]["cldice"],
            **{f"val_dice_{name}": scores["dice"] for name, scores in result["per_class"].items()}}


# Weight of the soft clDice term next to Dice + cross-entropy in the "cldice" loss, and its skeleton iterations
# (3 erosions reach the centreline of structures up to about 6 px wide: the wire and the catheter).
_CLDICE_WEIGHT = 0.5
_CLDICE_ITERATIONS = 3


def segmentation_loss(cfg: FinetuneConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``cfg.loss`` names: (logits (B, C, H, W), labels (B, 1, H, W)) -> scalar, over the foreground classes.

    "dicece": MONAI Dice + cross-entropy, class-weighted, Dice over the whole batch; "cldice": the same plus
    0.5 x MONAI's soft clDice (Shit et al. 2021), which rewards covering the wire's centreline end to end;
    "dicecldice": MONAI's SoftDiceclDiceLoss (Dice and clDice averaged, no cross-entropy).
    """
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                         weight=torch.tensor(cfg.class_weights, device=device))
    if cfg.loss == "dicece":
        return dice_ce
    if cfg.loss == "dicecldice":
        return SoftDiceclDiceLoss(iter_=_CLDICE_ITERATIONS, alpha=0.5, to_onehot_y=True, softmax=True,
                                  include_background=False)
    cldice = SoftclDiceLoss(iter_=_CLDICE_ITERATIONS, to_onehot_y=True, softmax=True, include_background=False)
    return lambda logits, labels: dice_ce(logits, labels) + _CLDICE_WEIGHT * cldice(logits, labels)


def build_model(cfg: FinetuneConfig) -> tuple[torch.nn.Module, TransferReport | None]:
    """The segmenter named by the config, from scratch or from pre-trained weights (``cfg.init_parts`` of them)."""
    model = build_segmenter(cfg.arch, get_preset(cfg.preset), n_classes=len(LABEL_NAMES))
    if cfg.init == "scratch":
        return model, None
    return model, load_pretrained(model, Path(cfg.init), cfg.init_parts, LABEL_NAMES)


def run(cfg: FinetuneConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Fine-tune a segmenter; writes OUT/{run.json, config.json, metrics.jsonl, model.safetensors, log.txt, checkpoints/}.

    With ``resume``, continues from the newest intact checkpoint in OUT (every epoch writes one) and
    refuses a folder written with other settings; with ``overwrite``, replaces the run in OUT.

    Returns:
        {"best_epoch", "best_val", "val": evaluate JSON of the selected model, "transfer": summary or None}.
    """
    with run_folder(cfg, resume, overwrite) as out:
        return _train(cfg, out, resume, progress)


def _train(cfg: FinetuneConfig, out: Path, resume: bool, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    splits = find_segmentation_splits(Path(cfg.data), cfg.seed, cfg.val_fraction, cfg.test_fraction)
    require_validation_split(splits, cfg.data)
    train_items = select_shots(splits["train"], cfg.shots, cfg.seed)
    train = load_samples(train_items, cfg.image_size)
    val = load_samples(splits["val"], cfg.image_size)
    log.info("training on %d images, validating on %d (%s)", len(train_items), len(splits["val"]), cfg.data)

    device = resolve_device(cfg.device)
    model, transfer = build_model(cfg)
    model.to(device).train()
    loss_fn = segmentation_loss(cfg, device)
    task = FinetuneTask(
        train=train, val=val, model=model, transfer=transfer, augment=train_transforms(cfg.seed, crop=cfg.crop),
        loss=lambda batch: loss_fn(model(batch["image"]), batch["mask"].unsqueeze(1)),
        evaluate=lambda samples: evaluate(model, samples), score=selection_score, val_columns=val_columns,
        score_name="Dice",
        # The training resolution, not the preset's: evaluate and predict resize inputs to it.
        metadata=model_metadata(model) | {"classes": list(LABEL_NAMES), "image_size": cfg.image_size},
        record={"train_images": [i.name for i in train_items]})
    return fit(cfg, out, task, resume, progress)
