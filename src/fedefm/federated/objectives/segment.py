"""Supervised dense pre-training on whatever masks each silo holds, with a partial-label (marginal) loss.

Silos annotate different label sets (devices here, vessels there, nothing at a third). A label an image's
silo does not annotate is *unknown* there, not background, so the loss must not teach "background" for
it: for image b with annotated set A_b, the probability of "none of A_b" is the background's plus that of
every label outside A_b (the marginal loss of Shi et al., MedIA 2021), and the Dice term covers A_b only.
An expert trained where vessels are labelled can then teach vessels, by pixel-wise distillation of its
class maps, to a silo that never labelled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.federated.objectives.base import Batch, ModelCall, Outputs
from fedefm.federated.objectives.classify import tempered_kl
from fedefm.models.foundation import DenseFoundation
from fedefm.models.presets import Preset


def partial_label_loss(logits: Tensor, masks: Tensor, annotated: Tensor, foreground_weight: float = 10.0,
                       dice_weight: float = 1.0, smooth: float = 1.0) -> Tensor:
    """Marginal cross-entropy plus soft Dice over each image's annotated labels only.

    Args:
        logits: (B, L, H, W) scores over the corpus's labels, label 0 background.
        masks: (B, H, W) int64; 0 means "none of this image's annotated labels", l > 0 an annotated label.
        annotated: (B, L) bool, label l annotated in image b; column 0 is ignored. Images annotating nothing add 0.
        foreground_weight: cross-entropy weight of a pixel of an annotated label (background pixels weigh 1;
            devices cover about 1% of a frame).
        dice_weight: share of the Dice term, averaged over the labels annotated somewhere in the batch.
        smooth: Dice smoothing.

    Returns:
        () loss, connected to ``logits`` even when no image of the batch is annotated (then 0).
    """
    annotated = annotated.clone()
    annotated[:, 0] = False
    labelled = annotated.any(dim=1)  # (B,)
    if not labelled.any():
        return logits.sum() * 0.0
    logits, masks, annotated = logits[labelled], masks[labelled], annotated[labelled]
    log_probs = F.log_softmax(logits, dim=1)  # (b, L, H, W)
    unknown = ~annotated  # (b, L): background and every label the image does not annotate
    unknown[:, 0] = True
    none_of_annotated = torch.logsumexp(log_probs.masked_fill(~unknown[:, :, None, None], float("-inf")), dim=1)
    target_log_prob = torch.where(masks > 0, log_probs.gather(1, masks.unsqueeze(1)).squeeze(1), none_of_annotated)
    pixel_weight = torch.where(masks > 0, foreground_weight, 1.0)  # (b, H, W)
    cross_entropy = -(pixel_weight * target_log_prob).sum() / pixel_weight.sum()
    if dice_weight == 0:
        return cross_entropy
    probs = log_probs.exp()
    dice_terms = []
    for label in torch.nonzero(annotated.any(dim=0)).flatten().tolist():
        images = annotated[:, label]
        p, t = probs[images, label], (masks[images] == label).to(probs.dtype)
        dice_terms.append(1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth))
    return cross_entropy + dice_weight * torch.stack(dice_terms).mean()


def marginal_prediction(logits: Tensor, annotated: Tensor) -> Tensor:
    """Per-pixel label (B, H, W) from logits (B, L, H, W), with labels image b does not annotate read as 0."""
    prediction = logits.argmax(dim=1)
    known = annotated.clone()
    known[:, 0] = True
    return torch.where(known.gather(1, prediction.flatten(1)).view_as(prediction), prediction, 0)


@dataclass(frozen=True)
class Segment:
    """Partial-label segmentation over the corpus's labels; validation: mean Dice over annotated labels.

    Attributes:
        foreground_weight: cross-entropy weight of annotated-label pixels (background 1).
        dice_weight: share of the Dice term.
    """

    foreground_weight: float = 10.0
    dice_weight: float = 1.0
    name: str = "segment"
    metric: str = "dice"
    untrained_parts: tuple[str, ...] = ("reconstruction_head.",)

    def build_model(self, preset: Preset, n_classes: int) -> nn.Module:
        """The whole TransUNet body over ``n_classes`` labels (label 0 background)."""
        return DenseFoundation(preset, n_classes)

    def prepare(self, batch: Batch) -> Batch:
        """Nothing random to draw."""
        return batch

    def outputs(self, call: ModelCall, batch: Batch) -> Outputs:
        """{"segmentation" (B, L, H, W), "representation" (B, D)} of the images."""
        return call(batch.images, ("segmentation", "representation"))

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """partial_label_loss of the label logits against the batch's masks."""
        return partial_label_loss(outputs["segmentation"], batch.masks, batch.annotated, self.foreground_weight,
                                  self.dice_weight)

    def soft(self, student: Outputs, teacher: Outputs, temperature: float) -> tuple[Tensor, float]:
        """Pixel-wise KL of the tempered class maps, averaged over pixels, scaled by T²: every label crosses over."""
        return tempered_kl(student["segmentation"], teacher["segmentation"], temperature), temperature**2

    @torch.no_grad()
    def score(self, model: nn.Module, source, batch_size: int = 32) -> float:
        """Mean over labels of the Dice pooled over the validation images that annotate the label (NaN if none)."""
        model.eval()
        n_labels = model.n_classes
        intersection, total = torch.zeros(n_labels), torch.zeros(n_labels)
        seen = torch.zeros(n_labels, dtype=torch.bool)
        for start in range(0, len(source), batch_size):
            batch = source.batch(torch.arange(start, min(start + batch_size, len(source))))
            prediction = marginal_prediction(model(batch.images), batch.annotated).cpu()
            masks, annotated = batch.masks.cpu(), batch.annotated.cpu()
            for label in range(1, n_labels):
                images = annotated[:, label]
                if images.any():
                    p, t = prediction[images] == label, masks[images] == label
                    intersection[label] += (p & t).sum()
                    total[label] += p.sum() + t.sum()
                    seen[label] = True
        scored = seen & (total > 0)
        return float((2 * intersection[scored] / total[scored]).mean()) if scored.any() else float("nan")
