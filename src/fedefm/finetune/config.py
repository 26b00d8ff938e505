"""Validated configuration of few-shot fine-tuning (``fedefm finetune``)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedefm.config import resolve_device
from fedefm.errors import ConfigError, choose
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import ARCHS
from fedefm.models.weights import INIT_PARTS, load_metadata

FINETUNE_TASKS = ("segment", "classify")
# classify: the mean token over the image, features where the catheter tip lies, the predicted catheter's shape
# through a CNN, or its course traced from entry to tip
POOLINGS = ("mean", "tip", "mask", "path")
SEGMENTER_NEEDED = ("classifies the catheter a segmenter predicts and keeps that segmenter as loaded; pass --init "
                    "the model.safetensors of a catheter segmenter (fedefm finetune --task segment), or use "
                    "--pooling mean or tip")
HELD_SEGMENTER = ("mask", "path")  # poolings that classify the catheter a held (loaded, frozen) segmenter predicts
# Segmentation losses (finetune/train.py segmentation_loss): MONAI Dice + cross-entropy; the same plus
# MONAI's soft clDice (topology of thin structures, weight 0.5); MONAI's Dice + clDice without cross-entropy;
# Dice + cross-entropy plus cross-entropy at each device's tip end.
SEGMENTATION_LOSSES = ("dicece", "cldice", "dicecldice", "tips")
# Segmentation above this side trains on device-centred crops of it by default: a 256 px frame costs four
# 128 px crops, and the crops show the 1-2 px wire more often (benchmarks/results/thin_wires/README.md).
DEFAULT_CROP = 128


@dataclass
class FinetuneConfig:
    """Few-shot fine-tuning of a segmenter (``fedefm finetune``).

    An epoch shows the model ``max(training images, samples_per_epoch)`` augmented samples (K with ``shots``).
    ``class_weights`` weigh background, catheter and guidewire in the Dice-CE loss: devices cover about
    1% of the pixels (0.9% catheter, 0.2% guidewire in the synthetic clinical domain), and without
    weights few-shot runs often settle on predicting background everywhere.

    The budget scales with the image and the shots when left unset: ``epochs`` 30 at 128 px, in
    proportion to the image side beyond (60 at 256 px), ``samples_per_epoch`` max(64, 4 K). ``crop``
    trains on crops of that side (a multiple of 32) centred on a guidewire, catheter or background
    pixel in the ratio 2 : 1 : 1, so that a 1-2 px wire fills more of each sample; validation and
    prediction see whole images. Left unset, ``crop`` is DEFAULT_CROP for images larger than that and whole
    images otherwise; ``crop`` equal to ``image_size`` trains on whole images. ``loss`` is one of
    SEGMENTATION_LOSSES; ``tip_weight`` weighs the "tips" loss's tip-end cross-entropy against its Dice-CE.

    ``eval_every`` is the epochs between validations (the last epoch is always validated). Left unset it is 1,
    except on crops: a whole validation frame costs (image_size / crop)^2 crops' forward passes, so a run on
    crops validates every round((image_size / crop)^2 / 2) epochs (2 at 256 px with 128 px crops), which keeps
    validation near a third of the run instead of half.

    ``task="classify"`` fine-tunes an image classifier instead (folder-per-class data, ``shots`` images
    per class; with ``multilabel`` a CSV ``image,LABEL_1,LABEL_2,...`` of 0/1 columns and ``shots``
    images in all); ``arch`` and ``class_weights`` then do not apply. ``lr`` defaults to 1e-2 for
    segmentation and 1e-3 for classification.

    ``pooling`` (classify) is what the head reads: ``mean`` the mean token over the whole image (the plain
    classifier), ``tip`` a :class:`~fedefm.models.position.PositionClassifier` that segments the catheter and
    reads the features at and around its tip, ``mask`` a :class:`~fedefm.models.position.MaskPositionClassifier`
    that classifies the catheter its segmenter predicts through a small CNN, ``path`` a
    :class:`~fedefm.models.position.PathPositionClassifier` that classifies that catheter's course, traced from
    where it enters to its tip, through a linear head (all three: image size a multiple of 32). ``mask`` and
    ``path`` (HELD_SEGMENTER) hold the segmenter of ``init`` as loaded; ``image_size`` then defaults to the size
    it was fine-tuned at (another size warns), and ``lr`` to 1e-2 for ``path``, whose head alone learns.

    ``init_parts`` says what ``init`` gives the segmenter: ``encoder``, ``all`` (every tensor whose name and
    shape match, the head by class name) or ``auto`` (``all`` when the file holds a decoder, else ``encoder``);
    a ``mean`` classifier takes the encoder only, a ``tip``, ``mask`` or ``path`` classifier also a segmenter's decoder
    and head.
    """

    data: Path
    out: Path
    init: str = "scratch"
    init_parts: str = "auto"
    task: str = "segment"
    multilabel: bool = False
    pooling: str = "mean"
    arch: str = "transunet"
    preset: str = "tiny"
    shots: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    class_weights: tuple[float, float, float] = (1.0, 10.0, 20.0)
    grad_clip: float = 1.0
    samples_per_epoch: int | None = None
    image_size: int | None = None
    loss: str = "dicece"
    tip_weight: float = 1.0
    crop: int | None = None
    eval_every: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str = "auto"
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        """Check every field; raise ConfigError naming the option and the fix."""
        choose("--task", self.task, FINETUNE_TASKS)
        choose("--pooling", self.pooling, POOLINGS)
        if self.pooling != "mean" and self.task != "classify":
            raise ConfigError(f"--pooling {self.pooling} belongs to --task classify")
        choose("--arch", self.arch, ARCHS)
        if self.multilabel and self.task != "classify":
            raise ConfigError("--multilabel belongs to --task classify")
        preset = get_preset(self.preset)
        if self.init != "scratch" and not Path(self.init).is_file():
            raise ConfigError(f"--init {self.init}: no such weights file; pass 'scratch' or a .safetensors path")
        # A held segmenter must see the catheter at the scale it was fine-tuned at.
        trained_at = (load_metadata(Path(self.init)).get("image_size")
                      if self.pooling in HELD_SEGMENTER and self.init != "scratch" else None)
        if self.image_size is None:
            self.image_size = int(trained_at) if trained_at else preset.image_size
        elif trained_at and int(trained_at) != self.image_size:
            warnings.warn(f"--image-size {self.image_size}: the segmenter of --init {self.init} was fine-tuned at "
                          f"{trained_at} px, so it sees the catheter at another scale; omit --image-size to use "
                          f"{trained_at}", stacklevel=2)
        # The segmenter's decoder needs stride 32; the classifier only the encoder's patch stride of 16.
        stride = 32 if self.task == "segment" or self.pooling != "mean" else 16
        if self.image_size % stride:
            raise ConfigError(f"--image-size {self.image_size}: must be a multiple of {stride}")
        if self.lr is None:
            self.lr = 1e-2 if self.task == "segment" or self.pooling == "path" else 1e-3
        choose("--loss", self.loss, SEGMENTATION_LOSSES)
        if self.tip_weight != 1.0 and self.loss != "tips":
            raise ConfigError(f"--tip-weight {self.tip_weight} belongs to --loss tips (this run's is {self.loss})")
        if not 0 < self.tip_weight < math.inf:  # also refuses nan
            raise ConfigError(f"--tip-weight {self.tip_weight}: must be a positive number")
        if self.crop is None and self.task == "segment" and self.image_size > DEFAULT_CROP:
            self.crop = DEFAULT_CROP
        if self.crop is not None and (self.crop % 32 or not 32 <= self.crop <= self.image_size):
            raise ConfigError(f"--crop {self.crop}: must be a multiple of 32 between 32 and --image-size "
                              f"{self.image_size}; omit it to train on whole images")
        if self.eval_every is None:
            self.eval_every = max(1, round((self.image_size / self.crop) ** 2 / 2)) if self.crop else 1
        if self.epochs is None:
            self.epochs = max(30, round(30 * self.image_size / 128)) if self.task == "segment" else 30
        if self.samples_per_epoch is None:
            self.samples_per_epoch = max(64, 4 * self.shots) if self.shots and self.task == "segment" else 64
        choose("--init-parts", self.init_parts, INIT_PARTS)
        if self.task == "classify" and self.pooling == "mean" and self.init_parts == "all":
            raise ConfigError("--init-parts all: --task classify --pooling mean takes only the encoder of --init (its "
                              "head is new); use --init-parts encoder or auto, or --pooling tip, mask or path")
        if self.pooling in HELD_SEGMENTER and self.init == "scratch":
            raise ConfigError(f"--pooling {self.pooling} --init scratch: {SEGMENTER_NEEDED}")
        if self.init == "scratch" and self.init_parts != "auto":
            warnings.warn(f"--init-parts {self.init_parts} has no effect with --init scratch", stacklevel=2)
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots {self.shots}: must be at least 1 (omit it to use every training image)")
        for name in ("epochs", "batch_size", "samples_per_epoch", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if len(self.class_weights) != 3 or min(self.class_weights) <= 0:
            raise ConfigError(f"class weights {self.class_weights}: need 3 positive weights (background, catheter, guidewire)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be positive")
        resolve_device(self.device)
        if self.multilabel:
            if not Path(self.data).exists():
                raise ConfigError(f"--data {self.data}: no such CSV file or folder")
        elif not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: no such folder")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the resolved configuration."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
