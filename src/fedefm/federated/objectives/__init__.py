"""Pre-training objectives, one module each, behind one interface (base.py): ``fedefm pretrain --objective``.

``classify`` is the paper's (which data type is this image); ``segment`` learns from whatever masks each
silo holds; ``mim`` reconstructs masked, noisy frames; ``NAME+NAME`` (optionally ``NAME*WEIGHT``) adds
them. Every algorithm runs every objective unchanged.
"""

from __future__ import annotations

from fedefm.errors import ConfigError, choose
from fedefm.federated.objectives.base import Batch, Objective, local_loss
from fedefm.federated.objectives.classify import Classify
from fedefm.federated.objectives.combined import Combined
from fedefm.federated.objectives.mim import MaskedImageModelling
from fedefm.federated.objectives.segment import Segment

OBJECTIVES = {"classify": Classify, "segment": Segment, "mim": MaskedImageModelling}
DENSE = ("segment", "mim")

__all__ = ["Batch", "Objective", "OBJECTIVES", "get_objective", "is_dense", "local_loss", "needs_masks"]


def parse(spec: str) -> list[tuple[str, float]]:
    """'segment+mim*0.5' → [("segment", 1.0), ("mim", 0.5)]; raise ConfigError naming a bad part."""
    parts = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition("*")
        choose("--objective", name, OBJECTIVES)
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--objective {spec}: weight {weight!r} of {name} is not a number") from None
        if value <= 0:
            raise ConfigError(f"--objective {spec}: weight of {name} must be positive")
        parts.append((name, value))
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise ConfigError(f"--objective {spec}: an objective is listed twice")
    if len(parts) > 1 and "classify" in names:
        raise ConfigError(f"--objective {spec}: classify trains another model; combine the dense objectives only")
    return parts


def get_objective(spec: str) -> Objective:
    """The objective ``spec`` names (module docstring): 'classify', 'segment', 'mim', 'segment+mim', ..."""
    parts = parse(spec)
    if len(parts) == 1 and parts[0][1] == 1.0:
        return OBJECTIVES[parts[0][0]]()
    return Combined(tuple((OBJECTIVES[name](), weight) for name, weight in parts))


def is_dense(spec: str) -> bool:
    """Whether ``spec`` trains the dense foundation model (every objective but classify)."""
    return parse(spec)[0][0] in DENSE


def needs_masks(spec: str) -> bool:
    """Whether ``spec`` learns from masks (it holds segment)."""
    return any(name == "segment" for name, _ in parse(spec))
