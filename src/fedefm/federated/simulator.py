"""In-process federated pre-training: every silo in this process, one after another, with checkpoints and resume.

``run`` reads the corpus, cuts it into silos and hands the round loop (federated/rounds.py) an
``InProcess`` executor, which runs each round's tasks here, watched by federated/health.py's RoundGuard.
Every random draw comes from a generator seeded by the run's seed and saved in each checkpoint, so a
resumed run is the uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from fedefm.checkpoints import CheckpointStore
from fedefm.config import resolve_device
from fedefm.data.datasets import check_label_masks
from fedefm.data.precheck import check_decodable
from fedefm.federated import topology
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import LocalTraining, MixAt, SiloState, Task
from fedefm.federated.config import PretrainConfig
from fedefm.federated.health import Fault, RoundGuard
from fedefm.federated.objectives import needs_masks
from fedefm.federated.rounds import scored_here, train_rounds
from fedefm.federated.runs import RESUMABLE_CHANGES, finish, initial_model, load_round, save_round, start_run_folder
from fedefm.federated.silo_data import (
    Corpus,
    ImageSource,
    SiloData,
    decoded_bytes,
    partition_tables,
    silo_data,
    silo_partition,
)
from fedefm.files import atomic_write, drop_rows_after
from fedefm.runfolder import field_defaults, owned_run_folder

log = logging.getLogger(__name__)


@dataclass
class InProcess:
    """The round executor of one process: runs a plan's tasks in order on the silos' batches, then ``mix``.

    A silo's work that raises, comes back later than ``time_limit_s`` or returns unusable weights is a
    Fault (RoundGuard); in one process a late silo cannot be stopped, only discarded once it is done.
    """

    algorithm: ModuleType
    cfg: LocalTraining
    model: nn.Module
    silos: list[SiloData]
    time_limit_s: float | None = None

    def train(self, round_: int, tasks: list[Task], states: list[SiloState]) -> tuple[list[SiloState], list[Fault]]:
        """Every task in order, each reading only round-start states, so the result is the parallel round's.

        An expert lives only until its user's home update: memory holds the S states, their updates and
        the experts of one silo.
        """
        guard = RoundGuard(self.time_limit_s)
        batches = [silo.batches() for silo in self.silos]
        trained: dict[int, list[SiloState]] = {i: [] for i in range(len(states))}
        updated = list(states)
        for task in tasks:
            visitor = states[task.model]
            if task.kind == "expert":
                with guard.watch(task.model, visitor.weights, host=task.silo) as expert:
                    expert.state = self.algorithm.overseas_expert(self.model, visitor, batches[task.silo], self.cfg)
                if expert.state is not None:
                    trained[task.user].append(expert.state)
                continue
            with guard.watch(task.silo, visitor.weights) as new:
                new.state = self.algorithm.local_update(self.model, visitor, batches[task.silo], self.cfg,
                                                        trained.pop(task.silo))
            updated[task.silo] = replace(visitor, grad_steps=0) if new.state is None else new.state
        return updated, guard.faults

    def mix(self, mix_at: MixAt, updated: list[SiloState], start: list[SiloState], W: np.ndarray
            ) -> tuple[list[SiloState], list[Fault]]:
        """``algorithm.mix`` over every row here: where the rows would be mixed makes no difference in one process."""
        return self.algorithm.mix(updated, W, self.cfg), []

    def round_metrics(self) -> dict:
        """Nothing beyond the round loop's own row."""
        return {}


class Checkpoint:
    """RUN/checkpoints/round_NNNNN.safetensors: every silo's weights and memory, plus the RNG states in metadata.

    Written and verified by checkpoints.CheckpointStore (atomic, checksummed, newest two kept: a
    paper-size federation is S x 178 MB per checkpoint).
    """

    def __init__(self, run: Path, generators: list[torch.Generator], rng: np.random.Generator) -> None:
        self.store = CheckpointStore(run / "checkpoints", prefix="round")
        self.folder = self.store.folder
        self.generators = generators
        self.rng = rng

    def save(self, round_: int, states: list[SiloState]) -> None:
        """Write the checkpoint of the end of ``round_``; older ones stay until this one is complete."""
        save_round(self.store, round_, states, generators=[g.get_state().tolist() for g in self.generators],
                   rng=self.rng.bit_generator.state,
                   torch_rng=torch.random.get_rng_state().tolist())  # dropout draws from the global generator

    def load_latest(self) -> tuple[int, list[SiloState]] | None:
        """Restore silo states and RNG states from the newest intact checkpoint; returns (round, states) or None."""
        found = load_round(self.store)
        if found is None:
            return None
        round_, states, _, info = found
        for generator, state in zip(self.generators, info["generators"]):
            generator.set_state(torch.tensor(state, dtype=torch.uint8))
        self.rng.bit_generator.state = info["rng"]
        torch.random.set_rng_state(torch.tensor(info["torch_rng"], dtype=torch.uint8))
        return round_, states


def run(cfg: PretrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Pre-train the foundation model federatedly with the run's objective; writes the run folder of DESIGN.md §6.

    The run owns ``cfg.out`` (runfolder.owned_run_folder): a folder holding another run is refused unless
    ``resume`` (same settings but RESUMABLE_CHANGES) or ``overwrite``; a second writer is locked out.

    Returns:
        {"test_<metric>", "final_val_<metric>", "rounds", "grad_steps", "bytes_sent", "peak_rss_mb"} of the
        finished run, <metric> the objective's (acc for classify, dice for segment, psnr for mim).

    Raises:
        TooFewHealthySilos: fewer than ``cfg.min_healthy_silos`` silos came through a round; the last good
            checkpoint is left as it was.
    """
    cfg.validate()
    out = Path(cfg.out)
    with owned_run_folder(out, "pretrain", cfg.to_dict(), resume, overwrite, RESUMABLE_CHANGES, field_defaults(cfg)):
        device = resolve_device(cfg.device)
        algorithm = get_algorithm(cfg.algorithm)
        algo_cfg = cfg.algorithm_config()
        corpus = silo_partition(cfg)
        splits = corpus.splits
        log.info("silo partition:\n%s", partition_tables(corpus))
        in_memory = fits_in_memory(cfg, corpus, progress)
        silos = [silo_data(cfg, corpus, [splits["train"][k] for k in indices], i, device, in_memory)
                 for i, indices in enumerate(corpus.silo_indices)]
        model = initial_model(cfg, len(corpus.model_classes(cfg)), device)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        states = [SiloState(weights={k: v.clone() for k, v in initial.items()}, num_examples=len(idx))
                  for idx in corpus.silo_indices]
        rng = np.random.default_rng(cfg.seed)
        checkpoint = Checkpoint(out, [silo.generator for silo in silos], rng)

        first_round = 1
        restored = checkpoint.load_latest() if resume else None
        if restored is not None:
            done, states = restored
            states = [replace(s, weights={k: v.to(device) for k, v in s.weights.items()}) for s in states]
            first_round = done + 1
            drop_rows_after(out / "metrics.jsonl", "round", done)
            log.info("resuming %s after round %d", out, done)
        else:
            start_run_folder(cfg, "pretrain", algo_cfg, corpus, [len(idx) for idx in corpus.silo_indices],
                             topology.model_bytes(model))
            with atomic_write(out / "partition.txt", "w") as f:
                f.write(partition_tables(corpus) + "\n")

        objective = algo_cfg.objective
        val = ImageSource(splits["val"], cfg.image_size, in_memory, device, corpus.source_spec(cfg))
        executor = InProcess(algorithm, algo_cfg, model, silos, cfg.silo_timeout_s)
        states = train_rounds(cfg, algorithm, algo_cfg, model, states, executor, rng,
                              scored_here(objective, model, val), first_round=first_round, save=checkpoint.save,
                              last_good=f"The last good checkpoint is in {checkpoint.folder}", progress=progress)
        test = ImageSource(splits["test"], cfg.image_size, in_memory, device, corpus.source_spec(cfg))
        return finish(cfg, out, model, states, scored_here(objective, model, test), corpus, objective)


def fits_in_memory(cfg: PretrainConfig, corpus: Corpus, progress: bool) -> bool:
    """Whether the decoded training and validation images fit in --data-memory-mb; if not, check every file now.

    Read per batch, a file that cannot be decoded would otherwise stop the run at the batch that draws it.
    """
    splits = corpus.splits
    per_image = 3 if needs_masks(cfg.objective) else 1  # a mask decodes to int64: twice an image's float32 bytes
    n_decoded = (len(splits["train"]) + len(splits["val"])) * per_image
    if decoded_bytes(n_decoded, cfg.image_size) <= cfg.data_memory_mb * 2**20:
        return True
    log.info("decoded images exceed --data-memory-mb %g: reading each batch from disk", cfg.data_memory_mb)
    every = [item for split in splits.values() for item in split]
    check_decodable(every, progress)
    if needs_masks(cfg.objective):
        check_label_masks(every, corpus.spec)
    return False
