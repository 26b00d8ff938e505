"""What every run's configuration shares: option parsing, the device, and the record each run writes.

The configurations themselves live with what they configure: ``federated/config.py`` (pre-training)
and ``finetune/config.py`` (fine-tuning); each run writes its fully resolved one to ``RUN/config.json``
with ``run_record``.
"""

from __future__ import annotations

import json
import platform
from typing import Any

import torch

from fedefm import __version__
from fedefm.errors import ConfigError


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["beta=0.9", "weighting=sum"]`` → {"beta": 0.9, "weighting": "sum"}: values read as JSON when they parse, else text."""
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
