"""Measured compute time of one local step, the compute term of the cycle-time model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedefm.federated.topology import measure_compute_time


def local_step_seconds(model: nn.Module, batch_size: int, image_size: int, repeats: int = 3) -> float:
    """Median seconds of one SGD step (forward, cross-entropy, backward, update) of ``model`` on random images."""
    images = torch.rand(batch_size, 1, image_size, image_size)
    labels = torch.zeros(batch_size, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: first calls allocate
    return measure_compute_time(step, repeats=repeats)
