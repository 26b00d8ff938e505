"""Validated configuration of federated pre-training (``fedefm pretrain`` and the Flower apps).

What an algorithm allows (its overlays, whether it pools the data) is the algorithm's own declaration
(``FACTS``, federated/algorithms/base.py); this file only reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedefm.config import resolve_device
from fedefm.errors import ConfigError, choose
from fedefm.federated.algorithms import ALGORITHMS, get_algorithm
from fedefm.federated.objectives import get_objective
from fedefm.federated.topology import OVERLAYS, get_underlay
from fedefm.models.presets import Preset, get_preset


@dataclass
class PretrainConfig:
    """Federated pre-training of the foundation classifier (``fedefm pretrain``).

    ``options`` holds the algorithm's own settings by name (``beta``, ``mu``, ``return_weight``, ...); every
    field of the algorithm's Config not given there keeps its documented default. ``objective`` names the
    pre-training objective (federated/objectives/: classify, segment, mim, segment+mim, ...);
    ``images_only`` lists data-type classes whose masks are ignored, as a silo that holds frames but no
    annotations.

    Fault tolerance (federated/health.py): a round goes on without the silos whose update fails, comes
    back later than ``silo_timeout_s`` (None: no limit) or returns unusable weights, as long as at least
    ``min_healthy_silos`` silos are healthy (2, Flower's default minimum of training nodes; capped at the
    number of silos). Images are decoded into memory when the training and validation images take at
    most ``data_memory_mb`` decoded, else every batch is read from disk (same numbers either way). ``dropout`` replaces
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
        config_type = get_algorithm(self.algorithm).Config
        known = {f.name for f in dataclasses.fields(config_type)} - {"objective"}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(f"--option {unknown[0]}: not a setting of {self.algorithm}; known: {', '.join(sorted(known))}")
        return config_type(**{"lr": self.lr, "local_steps": self.local_steps, **self.options,
                              "objective": get_objective(self.objective)})

    def model_preset(self) -> Preset:
        """The preset's sizes, with ``dropout`` replaced when given."""
        preset = get_preset(self.preset)
        return preset if self.dropout is None else dataclasses.replace(preset, dropout=self.dropout)

    def validate(self) -> PretrainConfig:
        """Check every field (and the algorithm's settings); raise ConfigError naming the option."""
        facts = get_algorithm(self.algorithm).FACTS
        self.topology = self.topology or facts.topologies[0]
        choose("--topology", self.topology, OVERLAYS)
        if self.topology not in facts.topologies:
            fits = [name for name, algorithm in ALGORITHMS.items()
                    if self.topology in algorithm.FACTS.topologies and not algorithm.FACTS.pooled]
            raise ConfigError(f"--topology {self.topology}: --algorithm {self.algorithm} runs on "
                              f"{', '.join(facts.topologies)}; on {self.topology} run {', '.join(fits)}")
        get_underlay(self.underlay)
        choose("--partition", self.partition, ("unseen", "dirichlet"))
        preset = get_preset(self.preset)
        if self.image_size is None:
            self.image_size = preset.image_size
        if self.image_size % 16:
            raise ConfigError(f"--image-size {self.image_size}: must be a multiple of 16")
        if self.silos < 2 and not facts.pooled:
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
        if facts.relays_shots and self.topology == "star" and not 1 <= self.shots < self.silos:
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
