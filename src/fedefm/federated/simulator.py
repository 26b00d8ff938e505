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

from fedefm.config import PretrainConfig, resolve_device, run_record
from fedefm.data.datasets import ClassificationDataset, ClassificationItem, find_classification_splits
from fedefm.data.partition import partition_dirichlet, partition_unseen, silo_class_table
from fedefm.errors import ConfigError, DataError
from fedefm.federated import topology
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import Batch, NonFiniteLoss, SiloState, mean_weights
from fedefm.files import append_jsonl, atomic_write, write_json
from fedefm.models.heads import Classifier
from fedefm.models.weights import load_weights, model_metadata, save_weights

log = logging.getLogger(__name__)


@dataclass
class SiloData:
    """A silo's training images, decoded once, and the seeded generator its batches are drawn from."""

    images: torch.Tensor  # (N, 1, H, W) in [0, 1]
    labels: torch.Tensor  # (N,) int64
    batch_size: int
    generator: torch.Generator

    def batches(self) -> Iterator[Batch]:
        """Endless random batches (without replacement within a batch); the generator holds all the state."""
        n = self.labels.shape[0]
        while True:
            index = torch.randperm(n, generator=self.generator)[: self.batch_size]
            yield self.images[index], self.labels[index]


def load_items(items: list[ClassificationItem], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and resize items: images (N, 1, size, size), labels (N,)."""
    if not items:
        return torch.empty(0, 1, size, size), torch.empty(0, dtype=torch.long)
    dataset = ClassificationDataset(items, size)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples])


def partition(cfg: PretrainConfig, labels: list[int]) -> list[np.ndarray]:
    """Silo index arrays of the training items; centralized pools everything into one silo."""
    if cfg.algorithm == "centralized":
        return [np.arange(len(labels))]
    if len(labels) < cfg.silos:
        raise ConfigError(f"--silos {cfg.silos}: only {len(labels)} training images; use fewer silos")
    if cfg.partition == "dirichlet":
        return partition_dirichlet(labels, cfg.silos, cfg.alpha, cfg.seed)
    return partition_unseen(labels, cfg.silos, cfg.unseen, cfg.seed)


@torch.no_grad()
def accuracy(model: torch.nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 64) -> float:
    """Top-1 accuracy of ``weights`` on images (N, 1, H, W) with labels (N,)."""
    model.load_state_dict(weights)
    model.eval()
    correct = 0
    for start in range(0, labels.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += (logits.argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / max(1, labels.shape[0])


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


class Checkpoint:
    """RUN/checkpoints/round_NNNNN.safetensors: every silo's weights and memory, plus the RNG states in metadata.

    The newest ``keep`` checkpoints stay on disk (a paper-size federation is S x 178 MB per checkpoint).
    """

    keep = 2

    def __init__(self, run: Path) -> None:
        self.folder = run / "checkpoints"

    def save(self, round_: int, states: list[SiloState], generators: list[torch.Generator],
             rng: np.random.Generator) -> None:
        """Write the checkpoint of the end of ``round_`` atomically; older ones stay until this one is complete."""
        tensors = {}
        for i, state in enumerate(states):
            tensors.update({f"silo{i}.weights.{k}": v for k, v in state.weights.items()})
            for slot, weights in state.memory.items():
                tensors.update({f"silo{i}.memory.{slot}.{k}": v for k, v in weights.items()})
        metadata = {
            "round": round_,
            "silos": [{"num_examples": s.num_examples, "train_loss": s.train_loss, "grad_steps": s.grad_steps}
                      for s in states],
            "generators": [g.get_state().tolist() for g in generators],
            "rng": rng.bit_generator.state,
            "torch_rng": torch.random.get_rng_state().tolist(),  # dropout draws from the global generator
        }
        save_weights(self.folder / f"round_{round_:05d}.safetensors", tensors, {"checkpoint": metadata})
        for old in sorted(self.folder.glob("round_*.safetensors"))[: -self.keep]:
            old.unlink()

    def latest(self) -> Path | None:
        """The newest checkpoint file, or None."""
        found = sorted(self.folder.glob("round_*.safetensors"))
        return found[-1] if found else None

    def load(self, path: Path, generators: list[torch.Generator], rng: np.random.Generator) -> tuple[int, list[SiloState]]:
        """Restore silo states and RNG states from ``path``; returns (round, states)."""
        tensors, metadata = load_weights(path)
        info = metadata["checkpoint"]
        states = []
        for i, scalars in enumerate(info["silos"]):
            prefix = f"silo{i}."
            weights = {k.removeprefix(prefix + "weights."): v for k, v in tensors.items() if k.startswith(prefix + "weights.")}
            memory: dict[str, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(prefix + "memory."):
                    slot, name = key.removeprefix(prefix + "memory.").split(".", 1)
                    memory.setdefault(slot, {})[name] = value
            states.append(SiloState(weights=weights, memory=memory, **scalars))
        for generator, state in zip(generators, info["generators"]):
            generator.set_state(torch.tensor(state, dtype=torch.uint8))
        rng.bit_generator.state = info["rng"]
        torch.random.set_rng_state(torch.tensor(info["torch_rng"], dtype=torch.uint8))
        return info["round"], states


def check_resume(cfg: PretrainConfig, run: Path) -> None:
    """Refuse to resume a run folder written by a different configuration (rounds may grow)."""
    saved = json.loads((run / "config.json").read_text())["config"]
    current = cfg.to_dict()
    differing = sorted(k for k in current if k not in ("rounds", "out") and saved.get(k) != current[k])
    if differing:
        key = differing[0]
        raise ConfigError(f"--resume {run}: the run was started with {key}={saved.get(key)!r}, not {current[key]!r}; "
                          "resume with the same settings or choose a new --out")


def silo_partition(cfg: PretrainConfig) -> tuple[dict[str, list[ClassificationItem]], list[str], list[np.ndarray]]:
    """The corpus's splits, its class names and the silos' indices into the training split, as every driver cuts them."""
    splits, class_names = find_classification_splits(Path(cfg.data), cfg.seed, cfg.val_fraction, cfg.test_fraction)
    if not splits["val"] or not splits["test"]:
        raise DataError(f"{cfg.data}: need validation and test images; raise --val-fraction/--test-fraction")
    return splits, class_names, partition(cfg, [item.label for item in splits["train"]])


def silo_data(cfg: PretrainConfig, items: list[ClassificationItem], silo: int, device: torch.device) -> SiloData:
    """Silo ``silo``'s training images, decoded, and its batch generator seeded from the run's seed."""
    images, labels = load_items(items, cfg.image_size)
    return SiloData(images.to(device), labels.to(device), cfg.batch_size,
                    torch.Generator(device=device).manual_seed(cfg.seed * 1000 + silo))


def initial_model(cfg: PretrainConfig, n_classes: int, device: torch.device) -> Classifier:
    """The run's classifier, initialised from the run's seed: every driver starts every silo from these weights."""
    torch.manual_seed(cfg.seed)
    return Classifier(cfg.model_preset(), n_classes=n_classes).to(device)


def start_run_folder(cfg: PretrainConfig, command: str, algo_cfg, class_names: list[str], silo_sizes: list[int],
                     model_size: int) -> None:
    """Write RUN/config.json and clear metrics.jsonl for a fresh run."""
    out = Path(cfg.out)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    write_json(out / "config.json", run_record(cfg, command) | {
        "classes": class_names, "algorithm_config": dataclasses.asdict(algo_cfg),
        "silo_sizes": silo_sizes, "model_bytes": model_size,
    })


def run(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Pre-train the foundation classifier federatedly; writes the run folder of DESIGN.md §6.

    Returns:
        {"test_acc", "final_val_acc", "rounds", "grad_steps", "bytes_sent"} of the finished run.
    """
    cfg.validate()
    out = Path(cfg.out)
    if resume and not (out / "config.json").is_file():
        raise ConfigError(f"--resume {out}: no config.json there; start without --resume")
    if resume:
        check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    algorithm = get_algorithm(cfg.algorithm)
    algo_cfg = cfg.algorithm_config()

    splits, class_names, silo_indices = silo_partition(cfg)
    labels = [item.label for item in splits["train"]]
    log.info("silo x class partition:\n%s", silo_class_table(labels, silo_indices, class_names))
    silos = [silo_data(cfg, [splits["train"][k] for k in indices], i, device) for i, indices in enumerate(silo_indices)]
    val = load_items(splits["val"], cfg.image_size)
    val = (val[0].to(device), val[1])

    model = initial_model(cfg, len(class_names), device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [SiloState(weights={k: v.clone() for k, v in initial.items()}, num_examples=len(idx)) for idx in silo_indices]
    rng = np.random.default_rng(cfg.seed)
    generators = [silo.generator for silo in silos]
    checkpoint = Checkpoint(out)

    first_round = 1
    if resume and checkpoint.latest() is not None:
        done, states = checkpoint.load(checkpoint.latest(), generators, rng)
        states = [replace(s, weights={k: v.to(device) for k, v in s.weights.items()}) for s in states]
        first_round = done + 1
        kept = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["round"] <= done]
        with atomic_write(out / "metrics.jsonl", "w") as f:
            f.writelines(line + "\n" for line in kept)
        log.info("resuming %s after round %d", out, done)
    else:
        start_run_folder(cfg, "pretrain", algo_cfg, class_names, [len(idx) for idx in silo_indices],
                         topology.model_bytes(model))
        with atomic_write(out / "partition.txt", "w") as f:
            f.write(silo_class_table(labels, silo_indices, class_names) + "\n")

    def step(round_: int, states: list[SiloState], neighbours: list[list[int]], W: np.ndarray):
        batches = [silo.batches() for silo in silos]
        return algorithm.run_round(model, states, batches, neighbours, W, algo_cfg), {}

    def save(round_: int, states: list[SiloState]) -> None:
        checkpoint.save(round_, states, generators, rng)

    states = train_rounds(cfg, algo_cfg, model, states, step, rng, val, first_round=first_round, save=save,
                          last_good=f"The last good checkpoint is in {checkpoint.folder}", progress=progress)
    return finish(cfg, out, model, states, splits["test"], class_names)


RoundStep = Callable[[int, list[SiloState], list[list[int]], np.ndarray], tuple[list[SiloState], dict]]


def train_rounds(cfg: PretrainConfig, algo_cfg, model: torch.nn.Module, states: list[SiloState], step: RoundStep,
                 rng: np.random.Generator, val: tuple[torch.Tensor, torch.Tensor] | None, first_round: int = 1,
                 save: Callable[[int, list[SiloState]], None] | None = None, last_good: str = "",
                 progress: bool = True) -> list[SiloState]:
    """The round loop every driver shares: this round's links, ``step``, checks, one metrics row, evaluation.

    Args:
        step: runs one round, (round, states, neighbours, W) → (new states, extra metrics for the row);
            the simulator calls the algorithm's run_round, the Flower relay sends messages.
        val: validation images (N, 1, H, W) and labels (N,), or None to leave val_acc null.
        save: writes a checkpoint after a round (every cfg.checkpoint_every rounds and the last).
        last_good: where the last good state is, appended to a NonFiniteLoss message.
    """
    out = Path(cfg.out)
    n = len(states)
    model_size = topology.model_bytes(model)
    underlay = topology.get_underlay(cfg.underlay)
    overlay = topology.build_overlay(cfg.topology, underlay, max(n, 2), 0.0, model_size) if n > 1 else None
    matchings = topology.matcha_matchings(overlay.to_undirected()) if cfg.topology == "matcha" and overlay else None
    val_acc = math.nan
    with Progress(TextColumn(f"pretrain {cfg.algorithm}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("rounds", total=cfg.rounds, completed=first_round - 1, status="")
        for round_ in range(first_round, cfg.rounds + 1):
            started = time.perf_counter()
            neighbours, W, graph = round_links(cfg, algo_cfg, overlay, matchings, rng, [s.num_examples for s in states])
            try:
                states, extra = step(round_, states, neighbours, W)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"round {round_}, {exc}. {last_good}".rstrip()) from exc
            compute_s = (time.perf_counter() - started) / n
            for i, state in enumerate(states):
                if not all(torch.isfinite(t).all() for t in state.weights.values() if t.is_floating_point()):
                    raise NonFiniteLoss(f"round {round_}, silo {i}: non-finite weights; lower --lr. {last_good}".rstrip())
            row = {
                "round": round_,
                "train_loss": float(np.mean([s.train_loss for s in states])),
                "grad_steps": int(sum(s.grad_steps for s in states)),
                "bytes_sent": round_bytes(cfg, algo_cfg, neighbours, W, model_size),
                "cycle_time_s": cycle_time(graph, underlay, compute_s, transfers_per_link(cfg, algo_cfg) * model_size),
                "val_acc": None,
                "silo_val_acc": None,
            } | extra
            if val is not None and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds):
                val_acc = accuracy(model, mean_weights(states), *val)
                row["val_acc"] = val_acc
                row["silo_val_acc"] = [accuracy(model, s.weights, *val) for s in states] if n > 1 else [val_acc]
            row["wall_s"] = time.perf_counter() - started
            append_jsonl(out / "metrics.jsonl", row)
            if save is not None and (round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds):
                save(round_, states)
            bar.update(task, completed=round_, status=f"val acc {val_acc:.3f}")
    return states


def cycle_time(graph, underlay, compute_s: float, transfer_bytes: int) -> float | None:
    """Marfoq's cycle time of this round's graph with the measured compute time (None without links)."""
    if graph is None:
        return None
    server = graph.graph.get("server")
    return topology.cycle_time(topology.delay_graph(graph, underlay, compute_s, transfer_bytes, server=server))


def finish(cfg: PretrainConfig, out: Path, model: torch.nn.Module, states: list[SiloState],
           test_items: list[ClassificationItem] | None, class_names: list[str]) -> dict:
    """Score the global model on the test split once (None: no test split here); write weights and summary.json."""
    global_weights = mean_weights(states)
    test_acc = None
    if test_items is not None:
        test = load_items(test_items, cfg.image_size)
        test_acc = accuracy(model, global_weights, test[0].to(next(model.parameters()).device), test[1])
    metadata = model_metadata(model) | {"classes": class_names, "image_size": cfg.image_size,
                                        "algorithm": cfg.algorithm, "seed": cfg.seed}
    save_weights(out / "global.safetensors", {k: v.cpu() for k, v in global_weights.items()}, metadata)
    for i, state in enumerate(states):
        save_weights(out / "silos" / f"silo_{i}.safetensors", {k: v.cpu() for k, v in state.weights.items()},
                     metadata | {"silo": i})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["val_acc"] for r in rows if r["val_acc"] is not None]
    summary = {
        "test_acc": test_acc,
        "final_val_acc": float(np.mean(evaluated[-5:])) if evaluated else None,
        "rounds": rows[-1]["round"] if rows else 0,
        "grad_steps": int(sum(r["grad_steps"] for r in rows)),
        "bytes_sent": int(sum(r["bytes_sent"] for r in rows)),
    }
    write_json(out / "summary.json", summary)
    return summary
