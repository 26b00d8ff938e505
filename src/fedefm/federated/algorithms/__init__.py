"""Federated algorithms, one module each, behind one interface (see base.py).

Each module holds a frozen ``Config``, ``EXCHANGE`` (how models travel: "none", "client_server",
"gossip" or "overseas"), ``local_update``, ``mix`` and ``run_round``.
"""

from __future__ import annotations

from types import ModuleType

from fedefm.errors import choose
from fedefm.federated.algorithms import centralized, dpsgd, fedavg, fedefm, fedprox, matcha, moon

ALGORITHMS: dict[str, ModuleType] = {
    "centralized": centralized,
    "fedavg": fedavg,
    "fedprox": fedprox,
    "moon": moon,
    "dpsgd": dpsgd,
    "matcha": matcha,
    "fedefm": fedefm,
}


def get_algorithm(name: str) -> ModuleType:
    """The algorithm module called ``name``; an unknown name raises ConfigError with a did-you-mean hint."""
    return ALGORITHMS[choose("--algorithm", name, ALGORITHMS)]
