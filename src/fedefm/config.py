"""Validated run configurations; each run writes its fully resolved config to ``RUN/config.json``."""

from __future__ import annotations

import dataclasses
import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedefm import __version__
from fedefm.errors import ConfigError, choose


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["beta=0.9", "update=ours"]`` → {"beta": 0.9, "update": "ours"}: values read as JSON when they parse, else text."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair}: expected NAME=VALUE, e.g. --option beta=0.9")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cpu' or 'cuda[:N]' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build sees no CUDA device; use --device cpu or install a CUDA torch")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: not a device name; use auto, cpu or cuda") from exc


FINETUNE_TASKS = ("segment", "classify")
# classify: the mean token over the image, features where the catheter tip lies, or the predicted catheter's shape
POOLINGS = ("mean", "tip", "mask")
SEGMENTER_NEEDED = ("classifies the catheter a segmenter predicts and keeps that segmenter as loaded; pass --init "
                    "the model.safetensors of a catheter segmenter (fedefm finetune --task segment), or use "
                    "--pooling mean or tip")
# Segmentation losses (finetune/train.py segmentation_loss): MONAI Dice + cross-entropy; the same plus
# MONAI's soft clDice (topology of thin structures, weight 0.5); MONAI's Dice + clDice without cross-entropy.
SEGMENTATION_LOSSES = ("dicece", "cldice", "dicecldice")
# Segmentation above this side trains on device-centred crops of it by default: a 256 px frame costs four
# 128 px crops, and the crops show the 1-2 px wire more often (benchmarks/results/thin_wires/README.md).
DEFAULT_CROP = 128


@dataclass
class FinetuneConfig:
    """Few-shot fine-tuning of a segmenter (``fedefm finetune``).

    An epoch shows the model ``max(shots, samples_per_epoch)`` augmented training samples.
    ``class_weights`` weigh background, catheter and guidewire in the Dice-CE loss: devices cover about
    1% of the pixels (0.9% catheter, 0.2% guidewire in the synthetic clinical domain), and without
    weights few-shot runs often settle on predicting background everywhere.

    The budget scales with the image and the shots when left unset: ``epochs`` 30 at 128 px, in
    proportion to the image side beyond (60 at 256 px), ``samples_per_epoch`` max(64, 4 K). ``crop``
    trains on crops of that side (a multiple of 32) centred on a guidewire, catheter or background
    pixel in the ratio 2 : 1 : 1, so that a 1-2 px wire fills more of each sample; validation and
    prediction see whole images. Left unset, ``crop`` is DEFAULT_CROP for images larger than that and whole
    images otherwise; ``crop`` equal to ``image_size`` trains on whole images. ``loss`` is one of
    SEGMENTATION_LOSSES.

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
    that classifies the catheter its segmenter predicts through a small CNN (both: image size a multiple of 32).

    ``init_parts`` says what ``init`` gives the segmenter: ``encoder``, ``all`` (every tensor whose name and
    shape match, the head by class name) or ``auto`` (``all`` when the file holds a decoder, else ``encoder``);
    a ``mean`` classifier takes the encoder only, a ``tip`` or ``mask`` classifier also a segmenter's decoder and head.
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
    crop: int | None = None
    eval_every: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str = "auto"
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        """Check every field; raise ConfigError naming the option and the fix."""
        from fedefm.models.presets import get_preset
        from fedefm.models.segmenters import ARCHS
        from fedefm.models.weights import INIT_PARTS

        choose("--task", self.task, FINETUNE_TASKS)
        choose("--pooling", self.pooling, POOLINGS)
        if self.pooling != "mean" and self.task != "classify":
            raise ConfigError(f"--pooling {self.pooling} belongs to --task classify")
        choose("--arch", self.arch, ARCHS)
        if self.multilabel and self.task != "classify":
            raise ConfigError("--multilabel belongs to --task classify")
        preset = get_preset(self.preset)
        if self.image_size is None:
            self.image_size = preset.image_size
        # The segmenter's decoder needs stride 32; the classifier only the encoder's patch stride of 16.
        stride = 32 if self.task == "segment" or self.pooling != "mean" else 16
        if self.image_size % stride:
            raise ConfigError(f"--image-size {self.image_size}: must be a multiple of {stride}")
        if self.lr is None:
            self.lr = 1e-2 if self.task == "segment" else 1e-3
        choose("--loss", self.loss, SEGMENTATION_LOSSES)
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
        if self.init != "scratch" and not Path(self.init).is_file():
            raise ConfigError(f"--init {self.init}: no such weights file; pass 'scratch' or a .safetensors path")
        choose("--init-parts", self.init_parts, INIT_PARTS)
        if self.task == "classify" and self.pooling == "mean" and self.init_parts == "all":
            raise ConfigError("--init-parts all: --task classify --pooling mean takes only the encoder of --init (its "
                              "head is new); use --init-parts encoder or auto, or --pooling mask or tip")
        if self.pooling == "mask" and self.init == "scratch":
            raise ConfigError(f"--pooling mask --init scratch: {SEGMENTER_NEEDED}")
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


def cpu_kernels() -> str:
    """The machine's CPU kernel family, e.g. "x86_64 AVX2": torch and numpy pick vector kernels by it at run time.

    The same seed gives bit-identical numbers only on the same kernel family: an AVX-512 machine rounds some
    sums and transcendental functions differently from an AVX2 one.
    """
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def run_record(cfg: Any, command: str) -> dict[str, Any]:
    """What ``RUN/config.json`` holds: the command, resolved config, seed, software versions and CPU kernels."""
    return {
        "command": command,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "fedefm_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_kernels": cpu_kernels(),
    }


TOPOLOGY_BY_EXCHANGE = {"none": "star", "client_server": "star", "gossip": "ring", "overseas": "ring"}


@dataclass
class PretrainConfig:
    """Federated pre-training of the foundation classifier (``fedefm pretrain``).

    ``options`` holds the algorithm's own settings by name (``beta``, ``mu``, ``update``, ...); every
    field of the algorithm's Config not given there keeps its documented default. ``objective`` names the
    pre-training objective (federated/objectives/: classify, segment, mim, segment+mim, ...);
    ``images_only`` lists data-type classes whose masks are ignored, as a silo that holds frames but no
    annotations.

    Fault tolerance (federated/health.py): a round goes on without the silos whose update fails, comes
    back later than ``silo_timeout_s`` (None: no limit) or returns unusable weights, as long as at least
    ``min_healthy_silos`` silos are healthy (2, Flower's default minimum of training nodes; capped at the
    number of silos). Images are decoded into memory when the training and validation images take at
    most ``data_memory_mb`` decoded, else every batch is read from disk (same numbers either way).
    field of the algorithm's Config not given there keeps its documented default. ``dropout`` replaces
    the preset's (None keeps it); 0 makes a Flower run draw no random masks, so it can match the simulator.
    """

    data: Path
    out: Path
    algorithm: str = "fedefm"
    objective: str = "classify"
    images_only: tuple[str, ...] = ()
    topology: str | None = None
    underlay: str = "gaia"
    silos: int = 6
    partition: str = "unseen"
    unseen: float = 1.0
    alpha: float = 0.5
    rounds: int = 50
    local_steps: int = 2
    batch_size: int = 16
    lr: float = 0.05
    preset: str = "tiny"
    image_size: int | None = None
    dropout: float | None = None
    shots: int = 2
    eval_every: int = 5
    checkpoint_every: int = 10
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_healthy_silos: int = 2
    silo_timeout_s: float | None = None
    data_memory_mb: float = 4096.0
    device: str = "cpu"
    seed: int = 0

    def algorithm_config(self):
        """The algorithm's frozen Config with the shared and the per-algorithm settings applied."""
        from fedefm.federated.algorithms import get_algorithm

        from fedefm.federated.objectives import get_objective

        config_type = get_algorithm(self.algorithm).Config
        known = {f.name for f in dataclasses.fields(config_type)} - {"objective"}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(f"--option {unknown[0]}: not a setting of {self.algorithm}; known: {', '.join(sorted(known))}")
        return config_type(**{"lr": self.lr, "local_steps": self.local_steps, **self.options,
                              "objective": get_objective(self.objective)})

    def model_preset(self):
        """The preset's sizes, with ``dropout`` replaced when given."""
        from fedefm.models.presets import get_preset

        preset = get_preset(self.preset)
        return preset if self.dropout is None else dataclasses.replace(preset, dropout=self.dropout)

    def validate(self) -> PretrainConfig:
        """Check every field (and the algorithm's settings); raise ConfigError naming the option."""
        from fedefm.federated.algorithms import get_algorithm
        from fedefm.federated.topology import OVERLAYS, get_underlay
        from fedefm.models.presets import get_preset

        exchange = get_algorithm(self.algorithm).EXCHANGE
        self.topology = self.topology or TOPOLOGY_BY_EXCHANGE[exchange]
        choose("--topology", self.topology, OVERLAYS)
        if exchange == "client_server" and self.topology != "star":
            raise ConfigError(f"--algorithm {self.algorithm} is client-server: use --topology star, "
                              "or a decentralised algorithm (dpsgd, matcha, fedefm) for other overlays")
        if self.algorithm == "matcha" and self.topology != "matcha":
            raise ConfigError("--algorithm matcha draws its own rounds: use --topology matcha")
        if self.topology == "matcha" and self.algorithm != "matcha":
            raise ConfigError(f"--topology matcha belongs to --algorithm matcha, not {self.algorithm}")
        get_underlay(self.underlay)
        choose("--partition", self.partition, ("unseen", "dirichlet"))
        preset = get_preset(self.preset)
        if self.image_size is None:
            self.image_size = preset.image_size
        if self.image_size % 16:
            raise ConfigError(f"--image-size {self.image_size}: must be a multiple of 16")
        if self.silos < 2 and self.algorithm != "centralized":
            raise ConfigError(f"--silos {self.silos}: a federation needs at least 2 silos")
        if not 0 <= self.unseen <= 1:
            raise ConfigError(f"--unseen {self.unseen}: must be in [0, 1]")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout {self.dropout}: must be in [0, 1)")
        for name in ("rounds", "local_steps", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.min_healthy_silos < 1:
            raise ConfigError(f"--min-healthy-silos {self.min_healthy_silos}: must be at least 1")
        if self.silo_timeout_s is not None and self.silo_timeout_s <= 0:
            raise ConfigError(f"--silo-timeout {self.silo_timeout_s}: must be positive (omit it for no limit)")
        if self.data_memory_mb < 0:
            raise ConfigError(f"--data-memory-mb {self.data_memory_mb}: must be >= 0 (0 reads every batch from disk)")
        if exchange == "overseas" and self.topology == "star" and not 1 <= self.shots < self.silos:
            raise ConfigError(f"--shots {self.shots}: must be between 1 and silos - 1 = {self.silos - 1}")
        if not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: no such folder")
        resolve_device(self.device)
        self.images_only = tuple(self.images_only)
        self.algorithm_config()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the resolved configuration."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
