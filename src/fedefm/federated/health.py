"""Silo health in a round: which updates may be mixed, the mixing matrix over them, and when to stop.

A silo is excluded from a round's mixing when its update raised, came back late, or holds weights
that cannot be mixed (NaN/Inf, missing or extra tensors, another shape or dtype). The excluded silo
keeps its previous weights (its row of W becomes e_i) and the others renormalise their rows over the
healthy silos. An overseas expert that fails at its host is dropped the same way, without excluding
its owner. Fewer healthy silos than the run's minimum stop the run with a message naming the round
and every fault, before anything is mixed or saved.

``weights_fault``, ``renormalise`` and ``check_quorum`` are pure, and the round (federated/rounds.py)
applies them the same way whichever executor ran its tasks. ``RoundGuard`` is the in-process
executor's watch over a silo's work: it catches what the work raises, times it and checks its weights;
the Flower executor turns an error reply, a timeout or unusable weights into the same faults. In one
process a late silo cannot be preempted: its update runs to the end and is then discarded as late; a
transport with real timeouts stops waiting instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedefm.errors import FedefmError

Weights = dict[str, Tensor]


class TooFewHealthySilos(FedefmError, RuntimeError):
    """Fewer silos than the configured minimum came through a round; the message names the round and faults."""


@dataclass(frozen=True)
class Fault:
    """Why silo ``silo``'s update (or, with ``host``, its overseas expert at ``host``) was left out of a round."""

    silo: int
    reason: str
    host: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """{"silo", "reason"} plus "host" for a dropped expert, as metrics rows record it."""
        row: dict[str, Any] = {"silo": self.silo, "reason": self.reason}
        if self.host is not None:
            row["host"] = self.host
        return row


def weights_fault(weights: Weights, reference: Weights) -> str | None:
    """Why ``weights`` cannot be mixed with models shaped like ``reference``, or None when they can."""
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    if missing or unexpected:
        return f"tensor names differ from the model's: missing {missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}"
    for name, tensor in weights.items():
        expected = reference[name]
        if not isinstance(tensor, Tensor):
            return f"{name} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            return (f"{name} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"expected {tuple(expected.shape)} {expected.dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds NaN or infinite values"
    return None


def renormalise(W: np.ndarray, healthy: Sequence[bool]) -> np.ndarray:
    """W (S, S) restricted to healthy senders, rows renormalised; an excluded silo's row becomes e_i.

    A healthy silo whose every sender was excluded keeps its own weights (row e_i) as well.
    """
    W = np.asarray(W, dtype=np.float64)
    keep = np.asarray(healthy, dtype=bool)
    if W.shape != (keep.size, keep.size):
        raise ValueError(f"mixing matrix is {W.shape} for {keep.size} silos")
    out = W * keep[None, :]
    totals = out.sum(axis=1)
    for i in range(keep.size):
        if not keep[i] or totals[i] <= 0:
            out[i] = 0.0
            out[i, i] = 1.0
        else:
            out[i] /= totals[i]
    return out


def check_quorum(faults: Sequence[Fault], n_silos: int, min_healthy: int, round_: int) -> None:
    """Raise TooFewHealthySilos when fewer than ``min_healthy`` of ``n_silos`` silos are healthy."""
    excluded = {f.silo for f in faults if f.host is None}
    healthy = n_silos - len(excluded)
    if healthy < min(min_healthy, n_silos):
        listed = "; ".join(f"silo {f.silo}: {f.reason}" for f in faults if f.host is None)
        raise TooFewHealthySilos(f"round {round_}: {healthy} of {n_silos} silos healthy, the run needs "
                                 f"{min(min_healthy, n_silos)} (--min-healthy-silos). {listed}")


@dataclass
class Watched:
    """The result of a piece of work RoundGuard.watch watches (a SiloState), or None once it failed."""

    state: Any = None


class RoundGuard:
    """Watches each piece of a silo's work in one in-process round and turns a failure into a Fault, not an abort.

    Args:
        time_limit_s: a silo's update or an expert's training that takes longer is late; None: no limit.
        clock: seconds, monotonic; None: time.perf_counter.
    """

    def __init__(self, time_limit_s: float | None = None, clock: Callable[[], float] | None = None) -> None:
        self.time_limit_s = time_limit_s
        self.clock = clock or time.perf_counter
        self.faults: list[Fault] = []

    @contextmanager
    def watch(self, silo: int, reference: Weights, host: int | None = None) -> Iterator[Watched]:
        """Watch one piece of a silo's work: set ``.state`` inside the block; after it, ``.state`` is the result
        with healthy weights, or None with the fault recorded.

        ``reference`` is the model the result must match in names, shapes and dtypes; ``host`` is set
        when the block trains silo ``silo``'s overseas expert at silo ``host``.
        """
        watched = Watched()
        started = self.clock()
        try:
            yield watched
        except Exception as exc:  # a silo's failure, whatever it is, must not end the other silos' round
            self._fail(watched, silo, host, f"raised {type(exc).__name__}: {exc}")
            return
        elapsed = self.clock() - started
        if self.time_limit_s is not None and elapsed > self.time_limit_s:
            self._fail(watched, silo, host, f"late: took {elapsed:.2f} s, the limit is {self.time_limit_s:g} s")
            return
        reason = weights_fault(watched.state.weights, reference)
        if reason is not None:
            self._fail(watched, silo, host, f"returned unusable weights: {reason}")

    def _fail(self, watched: Watched, silo: int, host: int | None, reason: str) -> None:
        """Record the fault and drop the work's result."""
        where = reason if host is None else f"expert trained at silo {host} dropped: {reason}"
        self.faults.append(Fault(silo, where, host))
        watched.state = None
