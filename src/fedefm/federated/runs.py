"""What every driver starts a run from and writes to its run folder: the initial model, config.json,
checkpoint tensors, the final weights and summary.json (DESIGN.md §6)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fedefm.checkpoints import CheckpointStore
from fedefm.config import run_record
from fedefm.federated.algorithms.base import SiloState, mean_weights
from fedefm.federated.config import PretrainConfig
from fedefm.federated.objectives import Objective, get_objective
from fedefm.federated.rounds import Evaluate
from fedefm.federated.silo_data import Corpus
from fedefm.files import write_json
from fedefm.memory import peak_rss_mb
from fedefm.models.weights import model_metadata, save_weights

# Settings that may change on --resume: they do not change the numbers of a round that goes well.
RESUMABLE_CHANGES = ("rounds", "out", "min_healthy_silos", "silo_timeout_s", "data_memory_mb")


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


def save_round(store: CheckpointStore, round_: int, states: list[SiloState],
               tensors: dict[str, torch.Tensor] | None = None, **metadata) -> None:
    """Checkpoint the end of ``round_``: every silo's weights, memory and scalars, plus a driver's ``tensors`` and
    ``metadata`` (its generators' states); older checkpoints stay until this one is complete."""
    store.save(round_, states_tensors(states) | (tensors or {}),
               {"round": round_, "silos": states_scalars(states)} | metadata)


def load_round(store: CheckpointStore) -> tuple[int, list[SiloState], dict[str, torch.Tensor], dict] | None:
    """The newest intact checkpoint ``save_round`` wrote: (round, silo states, its tensors, its metadata), or None."""
    found = store.load_latest()
    if found is None:
        return None
    tensors, info = found
    return info["round"], tensor_states(tensors, info["silos"]), tensors, info


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
