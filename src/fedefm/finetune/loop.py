"""The fine-tuning loop shared by segmentation and classification: batches, schedule, validation, selection, resume.

A task (finetune/train.py for segmentation, finetune/classify.py for classification) decodes its samples, builds
its model and says what its loss, validation score and metrics columns are (:class:`FinetuneTask`); :func:`fit`
trains it epoch by epoch, selects the epoch on validation only and checkpoints every epoch so a run can resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fedefm.checkpoints import CheckpointStore
from fedefm.config import run_record
from fedefm.data.augment import TrainTransforms
from fedefm.errors import ConfigError, DataError
from fedefm.files import append_jsonl, drop_rows_after, write_json
from fedefm.finetune.config import FinetuneConfig
from fedefm.memory import peak_rss_mb
from fedefm.models.weights import TransferReport, save_weights
from fedefm.runfolder import field_defaults, owned_run_folder

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Batch = dict[str, torch.Tensor]


def require_validation_split(splits: dict[str, list], data: Path) -> None:
    """Raise DataError naming ``data`` when its validation split is empty: a run selects its epoch there."""
    if not splits["val"]:
        raise DataError(f"{data}: no validation images after splitting; add a val/ split or raise --val-fraction")


def lr_at(step: int, total_steps: int, cfg: FinetuneConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to 1% of ``cfg.lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def select_shots(items: list[Item], shots: int | None, seed: int | Sequence[int], what: str = "the training split"
                 ) -> list[Item]:
    """The K training images of a few-shot run, drawn by the seed (all of them when K is None)."""
    if shots is None:
        return items
    if shots > len(items):
        raise ConfigError(f"--shots {shots}: {what} has only {len(items)} images; lower K")
    order = np.random.default_rng(seed).permutation(len(items))[:shots]
    return [items[i] for i in sorted(order)]


def training_batches(
    samples: dict[str, torch.Tensor], batch_size: int, augment: TrainTransforms, seed: int, first_step: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless augmented batches drawn without replacement within each pass over the samples, from ``first_step`` on.

    ``samples`` holds "image" (N, 1, S, S) and per-sample targets ("mask" (N, S, S), or "label" (N,) or
    (N, L)); the augmentation moves a mask with its image and passes labels through. Batch k is a function
    of (seed, k) alone: pass p shuffles with a generator seeded by (seed, p) and the augmentation is
    reseeded by (seed, k), so a resumed run draws the batches the interrupted one would.
    """
    n = samples["image"].shape[0]
    per_pass = n // batch_size if n >= batch_size else 1  # full batches only; the next pass reshuffles
    step = first_step
    while True:
        pass_index, position = divmod(step, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + pass_index))
        chosen = order[position * batch_size : (position + 1) * batch_size]
        augment.set_random_state(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
        views = [augment({key: value[i] for key, value in samples.items()}) for i in chosen]
        yield {key: torch.stack([torch.as_tensor(v[key]) for v in views]).to(value.dtype)
               for key, value in samples.items()}
        step += 1


@contextlib.contextmanager
def run_folder(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Validate ``cfg``, claim its run folder (runfolder.owned_run_folder) and log into OUT/log.txt.

    A resumed folder must hold a finetune run with the same settings; another run there is refused unless
    ``overwrite``. The log file gets INFO messages however the caller set up logging (the CLI, a script, a
    test); the fedefm logger's level is restored afterwards.
    """
    cfg.validate()
    with owned_run_folder(Path(cfg.out), "finetune", cfg.to_dict(), resume, overwrite,
                          defaults=field_defaults(cfg)) as out:
        logger = logging.getLogger("fedefm")
        file_log = logging.FileHandler(out / "log.txt", mode="a" if resume else "w")
        level = logger.level
        logger.addHandler(file_log)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        try:
            yield out
        finally:
            logger.setLevel(level)
            logger.removeHandler(file_log)
            file_log.close()


def epoch_bar(progress: bool) -> Progress:
    """The rich progress bar of a fine-tuning run (hidden when ``progress`` is False)."""
    return Progress(TextColumn("finetune"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not progress)


def optimisation_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                      where: str) -> float:
    """Backward, clip, step and clear the gradients; returns the loss. A non-finite loss stops the run."""
    if not torch.isfinite(loss):
        raise ConfigError(f"loss became {loss.item()} at {where}; lower --lr")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, torch.Tensor]],
                batch_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], cfg: FinetuneConfig, epoch: int,
                step: int, steps: int, total_steps: int) -> tuple[list[float], int, int]:
    """``steps`` optimiser steps from global ``step`` on, at ``lr_at``'s rate; returns (losses, images seen, next step)."""
    device = next(model.parameters()).device
    losses, seen = [], 0
    for _ in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        batch = {key: value.to(device) for key, value in next(batches).items()}
        losses.append(optimisation_step(batch_loss(batch), model, optimizer, cfg.grad_clip, f"epoch {epoch}, step {step}"))
        seen += batch["image"].shape[0]
        step += 1
    return losses, seen, step


def validates(epoch: int, cfg: FinetuneConfig) -> bool:
    """Whether ``epoch`` (1-based) ends with a validation: every ``cfg.eval_every`` epochs and the last."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def save_checkpoint(store: CheckpointStore, epoch: int, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, best: dict) -> None:
    """RUN/checkpoints/epoch_NNNNN.safetensors: model, optimizer moments, global RNG, step and best so far."""
    optim = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, slots in optim["state"].items():
        tensors.update({f"optimizer.{index}.{name}": value for name, value in slots.items()})
    metadata = {"epoch": epoch, "step": step, "best": best, "param_groups": optim["param_groups"],
                "torch_rng": torch.random.get_rng_state().tolist()}
    store.save(epoch, tensors, metadata)


def load_checkpoint(store: CheckpointStore, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model, optimizer and global RNG from the newest intact checkpoint; returns its metadata or None."""
    found = store.load_latest()
    if found is None:
        return None
    tensors, info = found
    device = next(model.parameters()).device
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            index, name = key.removeprefix("optimizer.").split(".", 1)
            state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.random.set_rng_state(torch.tensor(info["torch_rng"], dtype=torch.uint8))
    return info


def resume_point(out: Path, store: CheckpointStore, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 resume: bool, record: dict) -> tuple[int, int, dict | None]:
    """(first epoch, step, best so far) after the newest intact checkpoint; a fresh start writes config.json."""
    restored = load_checkpoint(store, model, optimizer) if resume else None
    if restored is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a run killed before its first checkpoint starts over
        write_json(out / "config.json", record)
        return 1, 0, None
    drop_rows_after(out / "metrics.jsonl", "epoch", restored["epoch"])
    log.info("resuming %s after epoch %d", out, restored["epoch"])
    return restored["epoch"] + 1, restored["step"], restored["best"]


@dataclass
class FinetuneTask:
    """What a task brings to :func:`fit`: its decoded samples, its model, and how it is trained, scored and recorded.

    ``train`` and ``val`` hold "image" (N, 1, S, S) and the task's target ("mask" (N, S, S), or "label" (N,) or
    (N, L)). ``score`` of an ``evaluate`` result is what the epoch is selected on (higher is better: a number, or a
    tuple compared in order, whose first entry the log shows as ``score_name``); ``val_columns`` are the
    metrics.jsonl columns of a validation. ``metadata`` goes into model.safetensors, ``record`` into config.json.
    """

    train: Batch
    val: Batch
    model: torch.nn.Module
    transfer: TransferReport | None
    augment: TrainTransforms
    loss: Callable[[Batch], torch.Tensor]
    evaluate: Callable[[Batch], dict]
    score: Callable[[dict], Any]
    val_columns: Callable[[dict], dict]
    score_name: str
    metadata: dict
    record: dict


def fit(cfg: FinetuneConfig, out: Path, task: FinetuneTask, resume: bool, progress: bool) -> dict:
    """Train ``task.model`` for ``cfg.epochs`` into the run folder ``out``, selecting the epoch on validation.

    Writes OUT/{config.json, metrics.jsonl, model.safetensors (the selected epoch's weights), checkpoints/}; with
    ``resume``, continues after the newest intact checkpoint.

    Returns:
        {"best_epoch", "best_val": the selected epoch's score, "val": its evaluate JSON, "transfer": summary or None}.
    """
    model = task.model
    if task.transfer is not None:
        log.info("foundation weights from %s: %s", cfg.init, task.transfer.summary())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = task.train["image"].shape[0]
    steps_per_epoch = math.ceil(max(n_train, cfg.samples_per_epoch) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    store = CheckpointStore(out / "checkpoints", prefix="epoch")
    record = run_record(cfg, "finetune") | task.record
    first_epoch, step, best = resume_point(out, store, model, optimizer, resume, record)
    if best is None:
        best = {"best_epoch": 0, "best_val": None, "val": None}
    elif isinstance(best["best_val"], list):  # JSON turned a tuple score into a list
        best["best_val"] = tuple(best["best_val"])
    batches = training_batches(task.train, cfg.batch_size, task.augment, cfg.seed, first_step=step)

    with epoch_bar(progress) as bar:
        progress_task = bar.add_task("epochs", total=cfg.epochs, completed=first_epoch - 1, status="")
        for epoch in range(first_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            losses, seen, step = train_epoch(model, optimizer, batches, task.loss, cfg, epoch, step, steps_per_epoch,
                                             total_steps)
            train_s = time.perf_counter() - started
            row = {"epoch": epoch, "step": step, "lr": lr_at(step - 1, total_steps, cfg),
                   "train_loss": float(np.mean(losses)), "train_images_per_s": seen / train_s, "selected": False}
            status = f"loss {row['train_loss']:.3f}"
            if validates(epoch, cfg):
                result = task.evaluate(task.val)
                score = task.score(result)
                row["selected"] = best["best_val"] is None or score > best["best_val"]
                if row["selected"]:
                    best = {"best_epoch": epoch, "best_val": score, "val": result}
                    save_weights(out / "model.safetensors", model, task.metadata)
                row |= task.val_columns(result)
                status += f" val {task.score_name} {score[0] if isinstance(score, tuple) else score:.3f}"
            row |= {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
            append_jsonl(out / "metrics.jsonl", row)
            save_checkpoint(store, epoch, step, model, optimizer, best)
            log.info("epoch %d: %s%s", epoch, status, " (selected)" if row["selected"] else "")
            bar.update(progress_task, completed=epoch, status=status)
    if best["best_epoch"] == cfg.epochs:
        log.warning("%s: validation %s still rose in the last epoch (%d); a longer run (--epochs) may do better",
                    out, task.score_name, cfg.epochs)
    return best | {"transfer": task.transfer.summary() if task.transfer else None}
