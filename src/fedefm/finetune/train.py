"""Few-shot fine-tuning of a catheter/guidewire segmenter (its samples, model, loss and score; the loop is loop.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, SoftclDiceLoss, SoftDiceclDiceLoss
from scipy import ndimage

from fedefm.config import resolve_device
from fedefm.data.augment import train_transforms
from fedefm.data.datasets import SegmentationDataset, SegmentationItem, find_segmentation_splits
from fedefm.data.labels import LABEL_NAMES
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.loop import FinetuneTask, fit, require_validation_split, run_folder, select_shots
from fedefm.finetune.metrics import SegmentationScores
from fedefm.models.position import at_border, catheter_path
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


# The "tips" loss: the share of each device's length, from its tip back, that the extra cross-entropy covers, and
# the pixels around it that it also covers (so that the prediction stops where the device does); its weight is
# FinetuneConfig.tip_weight.
# A segmenter trained on Dice-CE finds 80-86% of a catheter's first three fifths but 40% of the last
# (benchmarks/results/t6, course_reach), though the last fifth is no fainter. The term is not class-weighted:
# weighted, a background pixel just past the tip counted a tenth of a catheter pixel on it, and the segmenter
# learnt to run on past the tip (T6: 119 false-positive px a frame against 53 without the weights, on validation).
_TIP_SHARE = 0.2
_TIP_MARGIN_PX = 2


def tip_ends(labels: torch.Tensor, share: float = _TIP_SHARE, margin: int = _TIP_MARGIN_PX) -> torch.Tensor:
    """Pixels at the tip end of each device in label maps (B, H, W) → (B, H, W) bool.

    Per foreground class, the last ``share`` of its path from entry to tip (models/position.py catheter_path,
    largest component), widened by ``margin`` px. A path whose tip touches the border (the device leaves the
    image or the crop) has no tip in view and marks nothing.
    """
    out = np.zeros(labels.shape, dtype=bool)
    for b, label in enumerate(labels.cpu().numpy()):
        for c in np.unique(label[label > 0]):
            path = catheter_path(label == c)
            if len(path) < 2 or at_border(*path[-1], label.shape):
                continue
            end = path[len(path) - max(1, int(np.ceil(share * len(path)))):]
            out[b, end[:, 0], end[:, 1]] = True
        if margin:
            out[b] = ndimage.binary_dilation(out[b], iterations=margin)
    return torch.from_numpy(out).to(labels.device)


def segmentation_loss(cfg: FinetuneConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``cfg.loss`` names: (logits (B, C, H, W), labels (B, 1, H, W)) -> scalar, over the foreground classes.

    "dicece": MONAI Dice + cross-entropy, class-weighted, Dice over the whole batch; "cldice": the same plus
    0.5 x MONAI's soft clDice (Shit et al. 2021), which rewards covering the wire's centreline end to end;
    "dicecldice": MONAI's SoftDiceclDiceLoss (Dice and clDice averaged, no cross-entropy); "tips": Dice-CE
    plus ``cfg.tip_weight`` x the (not class-weighted) cross-entropy of the pixels at each device's tip end
    (:func:`tip_ends`).
    """
    class_weights = torch.tensor(cfg.class_weights, device=device)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, weight=class_weights)
    if cfg.loss == "dicece":
        return dice_ce
    if cfg.loss == "tips":
        def dice_ce_tips(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            at_tips = tip_ends(labels[:, 0])
            if not at_tips.any():
                return dice_ce(logits, labels)
            tips_ce = F.cross_entropy(logits.movedim(1, -1)[at_tips], labels[:, 0][at_tips])
            return dice_ce(logits, labels) + cfg.tip_weight * tips_ce
        return dice_ce_tips
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
