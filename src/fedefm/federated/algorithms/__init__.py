"""Federated algorithms, one module each, behind one interface (base.py says what a module declares).

A new algorithm is one module here and one line in ALGORITHMS.
"""

from __future__ import annotations

from types import ModuleType

from fedefm.errors import choose
from fedefm.federated.algorithms import (
    centralized,
    dpsgd,
    fedavg,
    fedefm,
    fedefm_literal,
    fedefm_released,
    fedprox,
    matcha,
    moon,
)

ALGORITHMS: dict[str, ModuleType] = {
    "centralized": centralized,
    "fedavg": fedavg,
    "fedprox": fedprox,
    "moon": moon,
    "dpsgd": dpsgd,
    "matcha": matcha,
    "fedefm": fedefm,
    "fedefm_literal": fedefm_literal,
    "fedefm_released": fedefm_released,
}


def get_algorithm(name: str) -> ModuleType:
    """The algorithm module called ``name``; an unknown name raises ConfigError with a did-you-mean hint."""
    return ALGORITHMS[choose("--algorithm", name, ALGORITHMS)]
