"""In-process federated pre-training: silos one at a time, rounds, evaluation, checkpoints and resume.

The simulator is a thin driver: data, topology and accounting live here, the algorithm's own
``run_round`` (federated/algorithms/) does the learning. Every random draw comes from a generator
seeded by the run's seed and saved in each checkpoint, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fedefm.checkpoints import CheckpointStore
from fedefm.config import PretrainConfig, resolve_device, run_record
from fedefm.data.datasets import (
    ClassificationDataset,
    ClassificationItem,
    LabelSpec,
    check_label_masks,
    find_classification_splits,
    read_label_mask,
    read_label_spec,
)
from fedefm.data.partition import partition_dirichlet, partition_unseen, silo_class_table, silo_label_table
from fedefm.data.precheck import check_decodable
from fedefm.errors import ConfigError, DataError
from fedefm.federated import topology
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import NonFiniteLoss, SiloState, mean_weights
from fedefm.federated.health import RoundGuard, TooFewHealthySilos
from fedefm.federated.objectives import Batch, Objective, get_objective, is_dense, needs_masks
from fedefm.files import append_jsonl, atomic_write, drop_rows_after, write_json
from fedefm.memory import peak_rss_mb
from fedefm.models.weights import model_metadata, save_weights
from fedefm.runfolder import owned_run_folder

log = logging.getLogger(__name__)


class ImageSource:
    """Images, labels and (for a dense corpus) masks of a list of items, decoded once into memory or read per batch.

    Both modes decode and resize each image the same way, so a batch holds the same numbers either way.

    Args:
        items: the images, their data-type labels and mask paths.
        size: side every image (and mask) is resized to.
        in_memory: decode everything now (fast) or read the images of each requested batch (bounded memory).
        device: where the returned tensors live.
        spec: the corpus's label table and class names, to read masks with; None for images and labels only.
    """

    def __init__(self, items: list[ClassificationItem], size: int, in_memory: bool, device: torch.device,
                 spec: tuple[LabelSpec, list[str]] | None = None) -> None:
        self.items = items
        self.dataset = ClassificationDataset(items, size)
        self.labels = torch.tensor([item.label for item in items], dtype=torch.long)
        self.device = device
        self.spec = spec
        self.annotated = None if spec is None else annotated_labels(items, *spec)
        self.decoded = self.read(torch.arange(len(items))) if in_memory else None
        self.decoded_masks = self.read_masks(torch.arange(len(items))) if in_memory and spec is not None else None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """Decode the images at ``index`` from disk: (B, 1, size, size) on the source's device."""
        if index.numel() == 0:
            return torch.empty(0, 1, self.dataset.size, self.dataset.size, device=self.device)
        return torch.stack([self.dataset[int(k)]["image"] for k in index]).to(self.device)

    def read_masks(self, index: torch.Tensor) -> torch.Tensor:
        """Decode the masks at ``index``: (B, size, size) int64 label ids, zeros for an image without a mask."""
        size = self.dataset.size
        spec, class_names = self.spec
        masks = [torch.zeros(size, size, dtype=torch.long) if item.mask is None
                 else read_label_mask(item.mask, spec.allowed(class_names[item.label]), size)
                 for item in (self.items[int(k)] for k in index)]
        return torch.stack(masks).to(self.device) if masks else torch.empty(0, size, size, dtype=torch.long)

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` (B,): (B, 1, size, size) in [0, 1]."""
        return self.read(index) if self.decoded is None else self.decoded[index.to(self.decoded.device)]

    def batch(self, index: torch.Tensor) -> Batch:
        """The objective's batch of the items at ``index``: images, labels and, for a dense corpus, masks."""
        labels = self.labels[index].to(self.device)
        if self.spec is None:
            return Batch(self.images(index), labels)
        masks = self.read_masks(index) if self.decoded_masks is None else self.decoded_masks[index.to(self.device)]
        return Batch(self.images(index), labels, masks, self.annotated[index].to(self.device))


def annotated_labels(items: list[ClassificationItem], spec: LabelSpec, class_names: list[str]) -> torch.Tensor:
    """(N, L) bool: label l is annotated in item n (its class annotates l and the item has a mask); column 0 False."""
    annotated = torch.zeros(len(items), len(spec.labels), dtype=torch.bool)
    for n, item in enumerate(items):
        if item.mask is not None:
            annotated[n, list(spec.annotated.get(class_names[item.label], ()))] = True
    annotated[:, 0] = False
    return annotated


def decoded_bytes(n_images: int, size: int) -> int:
    """Memory the decoded float32 images take: n x 1 x size x size x 4 bytes."""
    return n_images * size * size * 4


@dataclass
class SiloData:
    """A silo's training images and the seeded generator its batches are drawn from."""

    source: ImageSource
    batch_size: int
    generator: torch.Generator

    def batches(self) -> Iterator[Batch]:
        """Endless random batches (without replacement within a batch); the generator holds all the state."""
        n = len(self.source)
        while True:
            index = torch.randperm(n, generator=self.generator, device=self.generator.device)[: self.batch_size].cpu()
            yield self.source.batch(index)


def partition(cfg: PretrainConfig, labels: list[int]) -> list[np.ndarray]:
    """Silo index arrays of the training items; centralized pools everything into one silo."""
    if cfg.algorithm == "centralized":
        return [np.arange(len(labels))]
    if len(labels) < cfg.silos:
        raise ConfigError(f"--silos {cfg.silos}: only {len(labels)} training images; use fewer silos")
    if cfg.partition == "dirichlet":
        return partition_dirichlet(labels, cfg.silos, cfg.alpha, cfg.seed)
    return partition_unseen(labels, cfg.silos, cfg.unseen, cfg.seed)


def score(objective: Objective, model: torch.nn.Module, weights: dict[str, torch.Tensor], source: ImageSource) -> float:
    """The objective's validation score (accuracy, Dice, PSNR, ...) of ``weights`` on every item of ``source``."""
    model.load_state_dict(weights)
    return objective.score(model, source)


# Scores the mean of the silos' weights and, when asked (True), each silo's own: (global, per silo or None);
# None where nothing could be scored. The simulator scores here (``scored_here``), a Flower relay may ask the silos.
Evaluate = Callable[[list[SiloState], bool], tuple[float | None, list[float | None] | None]]


def scored_here(objective: Objective, model: torch.nn.Module, source: ImageSource) -> Evaluate:
    """An Evaluate that scores on ``source`` in this process, with ``model``'s architecture."""

    def evaluate(states: list[SiloState], own: bool) -> tuple[float, list[float] | None]:
        global_score = score(objective, model, mean_weights(states), source)
        return global_score, [score(objective, model, s.weights, source) for s in states] if own else None

    return evaluate


def transfers_per_link(cfg: PretrainConfig, algo_cfg) -> int:
    """Model transfers per (silo, neighbour) pair and round: FedEFM's trips there and back (and gossip), else 1."""
    algorithm = get_algorithm(cfg.algorithm)
    return algorithm.TRANSFERS_PER_LINK[algo_cfg.update] if algorithm.EXCHANGE == "overseas" else 1


def round_links(cfg: PretrainConfig, algo_cfg, overlay, matchings, rng: np.random.Generator, counts: list[int]):
    """This round's neighbours per silo, mixing matrix W (S, S) and the graph the models travel on."""
    n = len(counts)
    exchange = get_algorithm(cfg.algorithm).EXCHANGE
    if exchange in ("none", "client_server"):
        return [[] for _ in range(n)], topology.fedavg_matrix(counts), overlay
    if cfg.topology == "matcha":
        graph = topology.sample_matcha_round(matchings, algo_cfg.budget, rng)
        return [topology.neighbours(graph, i) for i in range(n)], topology.mixing_matrix(graph), graph
    if cfg.topology == "star":
        # Client-server FedEFM: the server relays each silo's model to `shots` other silos this round.
        neighbours = [sorted(rng.choice([j for j in range(n) if j != i], cfg.shots, replace=False).tolist())
                      for i in range(n)]
        return neighbours, topology.fedavg_matrix(counts), overlay
    # Gossip and overseas trips go both ways round a ring, as in the released code (reference §6 row 11).
    links = overlay.to_undirected()
    return [topology.neighbours(links, i) for i in range(n)], topology.mixing_matrix(links), overlay


def round_bytes(cfg: PretrainConfig, algo_cfg, neighbours: list[list[int]], W: np.ndarray, model_bytes: int) -> int:
    """Bytes every link carried this round, as the algorithm's exchange needs them."""
    algorithm = get_algorithm(cfg.algorithm)
    n = W.shape[0]
    if algorithm.EXCHANGE == "none":
        return 0
    if algorithm.EXCHANGE == "client_server":
        return 2 * n * model_bytes  # every silo uploads its model and downloads the average
    if algorithm.EXCHANGE == "gossip":
        return int(((W > 0).sum() - n) * model_bytes)
    transfers = transfers_per_link(cfg, algo_cfg)
    if cfg.topology == "star":
        # Relayed through the server: each transfer is two hops, plus the upload/download of the average.
        return int(2 * transfers * sum(map(len, neighbours)) * model_bytes + 2 * n * model_bytes)
    return int(transfers * sum(map(len, neighbours)) * model_bytes)


def tensors_under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, named without it."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def memory_tensors(memory: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An algorithm's memory {slot: weights} as flat tensors "{slot}.{name}"."""
    return {f"{slot}.{name}": value for slot, weights in memory.items() for name, value in weights.items()}


def memory_slots(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The memory {slot: weights} that ``memory_tensors`` flattened."""
    memory: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        slot, name = key.split(".", 1)
        memory.setdefault(slot, {})[name] = value
    return memory


def states_tensors(states: list[SiloState]) -> dict[str, torch.Tensor]:
    """Every silo's weights and memory as checkpoint tensors: "silo{i}.weights.{name}", "silo{i}.memory.{slot}.{name}"."""
    tensors = {}
    for i, state in enumerate(states):
        tensors.update({f"silo{i}.weights.{k}": v for k, v in state.weights.items()})
        tensors.update({f"silo{i}.memory.{k}": v for k, v in memory_tensors(state.memory).items()})
    return tensors


def states_scalars(states: list[SiloState]) -> list[dict]:
    """Every silo's scalars as checkpoint metadata."""
    return [{"num_examples": s.num_examples, "train_loss": s.train_loss, "grad_steps": s.grad_steps} for s in states]


def tensor_states(tensors: dict[str, torch.Tensor], scalars: list[dict]) -> list[SiloState]:
    """The silo states ``states_tensors`` and ``states_scalars`` wrote (other tensors are ignored)."""
    return [SiloState(weights=tensors_under(tensors, f"silo{i}.weights."),
                      memory=memory_slots(tensors_under(tensors, f"silo{i}.memory.")), **values)
            for i, values in enumerate(scalars)]


class Checkpoint:
    """RUN/checkpoints/round_NNNNN.safetensors: every silo's weights and memory, plus the RNG states in metadata.

    Written and verified by checkpoints.CheckpointStore (atomic, checksummed, newest two kept: a
    paper-size federation is S x 178 MB per checkpoint).
    """

    def __init__(self, run: Path) -> None:
        self.store = CheckpointStore(run / "checkpoints", prefix="round")
        self.folder = self.store.folder

    def save(self, round_: int, states: list[SiloState], generators: list[torch.Generator],
             rng: np.random.Generator) -> None:
        """Write the checkpoint of the end of ``round_``; older ones stay until this one is complete."""
        metadata = {
            "round": round_,
            "silos": states_scalars(states),
            "generators": [g.get_state().tolist() for g in generators],
            "rng": rng.bit_generator.state,
            "torch_rng": torch.random.get_rng_state().tolist(),  # dropout draws from the global generator
        }
        self.store.save(round_, states_tensors(states), metadata)

    def load_latest(self, generators: list[torch.Generator], rng: np.random.Generator) -> tuple[int, list[SiloState]] | None:
        """Restore silo states and RNG states from the newest intact checkpoint; returns (round, states) or None."""
        found = self.store.load_latest()
        if found is None:
            return None
        tensors, info = found
        for generator, state in zip(generators, info["generators"]):
            generator.set_state(torch.tensor(state, dtype=torch.uint8))
        rng.bit_generator.state = info["rng"]
        torch.random.set_rng_state(torch.tensor(info["torch_rng"], dtype=torch.uint8))
        return info["round"], tensor_states(tensors, info["silos"])


# Settings that may change on --resume: they do not change the numbers of a round that goes well.
RESUMABLE_CHANGES = ("rounds", "out", "min_healthy_silos", "silo_timeout_s", "data_memory_mb")


@dataclass
class Corpus:
    """A pre-training corpus as every driver cuts it: splits, class (data-type) names, the label table, silo indices."""

    splits: dict[str, list[ClassificationItem]]
    class_names: list[str]
    spec: LabelSpec
    silo_indices: list[np.ndarray]

    def model_classes(self, cfg: PretrainConfig) -> list[str]:
        """What the model's outputs are: data types for classify, the corpus's labels for a dense objective."""
        return (list(self.spec.labels) or ["background"]) if is_dense(cfg.objective) else self.class_names

    def source_spec(self, cfg: PretrainConfig) -> tuple[LabelSpec, list[str]] | None:
        """What ImageSource needs to read masks, or None when the objective learns from none."""
        return (self.spec, self.class_names) if needs_masks(cfg.objective) else None


def read_corpus(cfg: PretrainConfig) -> Corpus:
    """The corpus's splits, class names and label table (no silos yet), as every driver reads it.

    Raises:
        DataError: no validation or test images; ``--objective segment`` on a corpus without masks.
        ConfigError: ``--images-only`` names a class the corpus does not hold.
    """
    root = Path(cfg.data)
    splits, class_names = find_classification_splits(root, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                                                     images_only=cfg.images_only)
    if not splits["val"] or not splits["test"]:
        raise DataError(f"{cfg.data}: need validation and test images; raise --val-fraction/--test-fraction")
    spec = read_label_spec(root)
    if needs_masks(cfg.objective):
        for split in ("train", "val"):
            if not any(item.mask is not None and spec.annotated.get(class_names[item.label]) for item in splits[split]):
                raise DataError(f"--objective {cfg.objective}: no {split} image of {cfg.data} has a mask "
                                "(CLASS/masks/NAME.png and labels.json); write them with `fedefm synth pretrain`, "
                                "or pre-train with --objective mim or classify")
    return Corpus(splits, class_names, spec, [])


def silo_partition(cfg: PretrainConfig) -> Corpus:
    """The corpus (read_corpus) with the silos' indices into its training split."""
    corpus = read_corpus(cfg)
    return replace(corpus, silo_indices=partition(cfg, [item.label for item in corpus.splits["train"]]))


def silo_data(cfg: PretrainConfig, corpus: Corpus, items: list[ClassificationItem], silo: int, device: torch.device,
              in_memory: bool = True) -> SiloData:
    """Silo ``silo``'s training images (decoded, or read per batch) and its batch generator seeded from the run's seed."""
    source = ImageSource(items, cfg.image_size, in_memory, device, corpus.source_spec(cfg))
    return SiloData(source, cfg.batch_size, torch.Generator(device=device).manual_seed(cfg.seed * 1000 + silo))


def initial_model(cfg: PretrainConfig, n_classes: int, device: torch.device) -> torch.nn.Module:
    """The run's model, initialised from the run's seed: every driver starts every silo from these weights."""
    torch.manual_seed(cfg.seed)
    return get_objective(cfg.objective).build_model(cfg.model_preset(), n_classes).to(device)


def start_run_folder(cfg: PretrainConfig, command: str, algo_cfg, corpus: Corpus, silo_sizes: list[int],
                     model_size: int) -> None:
    """Write RUN/config.json and clear metrics.jsonl for a fresh run."""
    out = Path(cfg.out)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    settings = {f.name: getattr(algo_cfg, f.name) for f in dataclasses.fields(algo_cfg) if f.name != "objective"}
    write_json(out / "config.json", run_record(cfg, command) | {
        "classes": corpus.class_names, "labels": list(corpus.spec.labels), "objective": algo_cfg.objective.name,
        "metric": algo_cfg.objective.metric, "algorithm_config": settings, "silo_sizes": silo_sizes,
        "model_bytes": model_size,
    })


def partition_tables(corpus: Corpus) -> str:
    """The silo × class table and, for a corpus with masks, the silo × label-type table."""
    labels = [item.label for item in corpus.splits["train"]]
    table = silo_class_table(labels, corpus.silo_indices, corpus.class_names)
    if not corpus.spec.annotated:
        return table
    silo_items = [[corpus.splits["train"][k] for k in indices] for indices in corpus.silo_indices]
    return table + "\n\n" + silo_label_table(silo_items, corpus.spec)


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
    with owned_run_folder(Path(cfg.out), "pretrain", cfg.to_dict(), resume, overwrite, RESUMABLE_CHANGES):
        return _run(cfg, resume, progress)


def _run(cfg: PretrainConfig, resume: bool, progress: bool) -> dict:
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    algorithm = get_algorithm(cfg.algorithm)
    algo_cfg = cfg.algorithm_config()

    corpus = silo_partition(cfg)
    splits = corpus.splits
    log.info("silo partition:\n%s", partition_tables(corpus))
    # A mask decodes to int64: twice an image's float32 bytes.
    per_image = 3 if needs_masks(cfg.objective) else 1
    n_decoded = (len(splits["train"]) + len(splits["val"])) * per_image
    in_memory = decoded_bytes(n_decoded, cfg.image_size) <= cfg.data_memory_mb * 2**20
    if not in_memory:
        log.info("decoded images exceed --data-memory-mb %g: reading each batch from disk", cfg.data_memory_mb)
        every = [item for split in splits.values() for item in split]
        check_decodable(every, progress)
        if needs_masks(cfg.objective):
            check_label_masks(every, corpus.spec)
    silos = [silo_data(cfg, corpus, [splits["train"][k] for k in indices], i, device, in_memory)
             for i, indices in enumerate(corpus.silo_indices)]
    val = ImageSource(splits["val"], cfg.image_size, in_memory, device, corpus.source_spec(cfg))
    model = initial_model(cfg, len(corpus.model_classes(cfg)), device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [SiloState(weights={k: v.clone() for k, v in initial.items()}, num_examples=len(idx))
              for idx in corpus.silo_indices]
    rng = np.random.default_rng(cfg.seed)
    generators = [silo.generator for silo in silos]
    checkpoint = Checkpoint(out)

    first_round = 1
    restored = checkpoint.load_latest(generators, rng) if resume else None
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

    def step(round_: int, states: list[SiloState], neighbours: list[list[int]], W: np.ndarray):
        batches = [silo.batches() for silo in silos]
        guard = RoundGuard(round_, len(states), cfg.min_healthy_silos, cfg.silo_timeout_s)
        states = algorithm.run_round(model, states, batches, neighbours, W, algo_cfg, guard=guard)
        for fault in guard.faults:
            log.warning("round %d, silo %d: %s", round_, fault.silo, fault.reason)
        return states, {"excluded": [f.to_dict() for f in guard.faults if f.host is None],
                        "dropped_experts": [f.to_dict() for f in guard.faults if f.host is not None]}

    def save(round_: int, states: list[SiloState]) -> None:
        checkpoint.save(round_, states, generators, rng)

    objective = algo_cfg.objective
    states = train_rounds(cfg, algo_cfg, model, states, step, rng, scored_here(objective, model, val),
                          first_round=first_round, save=save,
                          last_good=f"The last good checkpoint is in {checkpoint.folder}", progress=progress)
    test = ImageSource(splits["test"], cfg.image_size, in_memory, device, corpus.source_spec(cfg))
    return finish(cfg, out, model, states, scored_here(objective, model, test), corpus, objective)


RoundStep = Callable[[int, list[SiloState], list[list[int]], np.ndarray], tuple[list[SiloState], dict]]


def train_rounds(cfg: PretrainConfig, algo_cfg, model: torch.nn.Module, states: list[SiloState], step: RoundStep,
                 rng: np.random.Generator, val: Evaluate | None, first_round: int = 1,
                 save: Callable[[int, list[SiloState]], None] | None = None, last_good: str = "",
                 progress: bool = True) -> list[SiloState]:
    """The round loop every driver shares: this round's links, ``step``, checks, one metrics row, evaluation.

    Args:
        step: runs one round, (round, states, neighbours, W) → (new states, extra metrics for the row);
            the simulator calls the algorithm's run_round, the Flower relay sends messages.
        val: scores on the validation images (``scored_here`` or at the silos), or None to leave val_acc null.
        save: writes a checkpoint after a round (every cfg.checkpoint_every rounds and the last).
        last_good: where the last good state is, appended to a NonFiniteLoss message.
    """
    out = Path(cfg.out)
    n = len(states)
    model_size = topology.model_bytes(model)
    underlay = topology.get_underlay(cfg.underlay)
    overlay = topology.build_overlay(cfg.topology, underlay, max(n, 2), 0.0, model_size) if n > 1 else None
    matchings = topology.matcha_matchings(overlay.to_undirected()) if cfg.topology == "matcha" and overlay else None
    objective = algo_cfg.objective
    val_key = f"val_{objective.metric}"
    val_score: float | None = math.nan
    with Progress(TextColumn(f"pretrain {cfg.algorithm} {objective.name}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("rounds", total=cfg.rounds, completed=first_round - 1, status="")
        for round_ in range(first_round, cfg.rounds + 1):
            started = time.perf_counter()
            neighbours, W, graph = round_links(cfg, algo_cfg, overlay, matchings, rng, [s.num_examples for s in states])
            try:
                states, extra = step(round_, states, neighbours, W)
            except TooFewHealthySilos as exc:
                raise TooFewHealthySilos(f"{exc}. {last_good}".rstrip()) from exc
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"round {round_}, {exc}. {last_good}".rstrip()) from exc
            compute_s = (time.perf_counter() - started) / n
            for i, state in enumerate(states):
                if not all(torch.isfinite(t).all() for t in state.weights.values() if t.is_floating_point()):
                    raise NonFiniteLoss(f"round {round_}, silo {i}: non-finite weights; lower --lr. {last_good}".rstrip())
            excluded = {fault["silo"] for fault in extra.get("excluded", [])}
            healthy = [s for i, s in enumerate(states) if i not in excluded]
            row = {
                "round": round_,
                "train_loss": float(np.mean([s.train_loss for s in healthy])),
                "grad_steps": int(sum(s.grad_steps for s in states)),
                "bytes_sent": round_bytes(cfg, algo_cfg, neighbours, W, model_size),
                "cycle_time_s": cycle_time(graph, underlay, compute_s, transfers_per_link(cfg, algo_cfg) * model_size),
                "excluded": [],
                "dropped_experts": [],
                val_key: None,
                f"silo_{val_key}": None,
            } | extra
            if val is not None and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds):
                val_score, own = val(states, n > 1)
                row[val_key] = val_score
                row[f"silo_{val_key}"] = own if n > 1 else [val_score]
            row["wall_s"] = time.perf_counter() - started
            row["peak_rss_mb"] = peak_rss_mb()
            append_jsonl(out / "metrics.jsonl", row)
            if save is not None and (round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds):
                save(round_, states)
            shown = "-" if val_score is None else f"{val_score:.3f}"
            bar.update(task, completed=round_, status=f"{val_key.replace('_', ' ')} {shown}")
    return states


def cycle_time(graph, underlay, compute_s: float, transfer_bytes: int) -> float | None:
    """Marfoq's cycle time of this round's graph with the measured compute time (None without links)."""
    if graph is None:
        return None
    server = graph.graph.get("server")
    return topology.cycle_time(topology.delay_graph(graph, underlay, compute_s, transfer_bytes, server=server))


def finish(cfg: PretrainConfig, out: Path, model: torch.nn.Module, states: list[SiloState], test: Evaluate | None,
           corpus: Corpus, objective: Objective) -> dict:
    """Score the global model on the test split once (``test``; None: no test split); write weights and summary.json.

    The weights leave out the heads the objective never trained (MIM's segmentation head, say), so a
    fine-tune never starts from random numbers labelled as pre-trained.
    """
    global_weights = mean_weights(states)
    test_score = test(states, False)[0] if test is not None else None
    metadata = model_metadata(model) | {"classes": corpus.model_classes(cfg), "data_types": corpus.class_names,
                                        "objective": objective.name, "image_size": cfg.image_size,
                                        "algorithm": cfg.algorithm, "seed": cfg.seed}

    def trained(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in weights.items() if not k.startswith(objective.untrained_parts)}

    save_weights(out / "global.safetensors", trained(global_weights), metadata)
    for i, state in enumerate(states):
        save_weights(out / "silos" / f"silo_{i}.safetensors", trained(state.weights), metadata | {"silo": i})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = f"val_{objective.metric}"
    evaluated = [r[key] for r in rows if r.get(key) is not None]
    summary = {
        f"test_{objective.metric}": test_score,
        f"final_val_{objective.metric}": float(np.mean(evaluated[-5:])) if evaluated else None,
        "rounds": rows[-1]["round"] if rows else 0,
        "grad_steps": int(sum(r["grad_steps"] for r in rows)),
        "bytes_sent": int(sum(r["bytes_sent"] for r in rows)),
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(out / "summary.json", summary)
    return summary
