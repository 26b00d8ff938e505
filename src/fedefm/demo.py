"""The end-to-end demo behind ``fedefm demo`` and ``make demo``: small, seeded, minutes on a CPU.

synthetic corpus → FedEFM pre-training over 6 silos with 100% unseen data types (ring on Gaia) →
few-shot fine-tuning from the federated weights and from scratch → evaluation of both on test, for
catheter/guidewire segmentation and for catheter tip position classification. The demo owns its
folder: running it again replaces the runs it wrote there before.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from fedefm.data.synth import GENERATOR_VERSION, write_position_dataset, write_pretrain_corpus, write_seg_dataset
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run as pretrain
from fedefm.finetune.classify import run as finetune_classifier
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.train import run as finetune

DEMO_DOMAIN = "clinical"
DEMO_IMAGES = 160
DEMO_SIZE = 64
DEMO_SHOTS = 4
DEMO_EPOCHS = 30
CORPUS_PER_CLASS = 120
CORPUS_SIZE = 64
PRETRAIN_OBJECTIVE = "segment"
PRETRAIN_SILOS = 6
PRETRAIN_ROUNDS = 20
PRETRAIN_BATCH = 8
POSITION_IMAGES = 200
POSITION_SHOTS = 16
POSITION_EPOCHS = 20


def synthetic_data(root: Path, kind: str, seed: int, **params) -> Path:
    """Write (or reuse, when its manifest matches) a synthetic dataset: kind "seg", "pretrain" or "position"."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        wanted = {"generator_version": GENERATOR_VERSION, "kind": kind, "seed": seed, **params}
        if all(found.get(key) == value for key, value in wanted.items()):
            return root
    if kind == "seg":
        write_seg_dataset(root, params["domain"], params["n"], size=params["size"], seed=seed)
    elif kind == "position":
        write_position_dataset(root, params["n"], size=params["size"], seed=seed)
    else:
        write_pretrain_corpus(root, params["per_class"], size=params["size"], seed=seed)
    return root


def run_demo(out: Path, seed: int = 0, console: Console | None = None) -> dict[str, dict[str, dict]]:
    """Run the whole pipeline; returns {"segment": {run name: evaluate JSON}, "classify": {...}}, on the test splits."""
    console = console or Console()
    out = Path(out)
    console.rule("1. synthetic data")
    corpus = synthetic_data(out / "data" / "pretrain", "pretrain", seed, per_class=CORPUS_PER_CLASS, size=CORPUS_SIZE)
    data = synthetic_data(out / "data" / f"seg_{DEMO_DOMAIN}", "seg", seed, domain=DEMO_DOMAIN, n=DEMO_IMAGES,
                          size=DEMO_SIZE)
    positions = synthetic_data(out / "data" / "position", "position", seed, n=POSITION_IMAGES, size=CORPUS_SIZE)
    console.print(f"pre-training corpus (6 data types) in {corpus}; {DEMO_DOMAIN} segmentation set in {data}; "
                  f"catheter position set in {positions}")

    console.rule(f"2. FedEFM pre-training ({PRETRAIN_OBJECTIVE}): {PRETRAIN_SILOS} silos, one data type each, ring "
                 "over Gaia; the clinical silo holds frames without masks")
    foundation = out / "pretrain_fedefm"
    summary = pretrain(PretrainConfig(data=corpus, out=foundation, algorithm="fedefm", objective=PRETRAIN_OBJECTIVE,
                                      images_only=(DEMO_DOMAIN,), silos=PRETRAIN_SILOS, rounds=PRETRAIN_ROUNDS,
                                      batch_size=PRETRAIN_BATCH, image_size=CORPUS_SIZE, eval_every=10, seed=seed),
                       overwrite=True)
    metric = next(key.removeprefix("test_") for key in summary if key.startswith("test_"))
    console.print(f"foundation model: test {metric} {summary[f'test_{metric}']:.3f} on the corpus's labels "
                  f"(silo x class and silo x label tables in {foundation / 'partition.txt'})")

    results: dict[str, dict[str, dict]] = {"segment": {}, "classify": {}}
    inits = (("scratch", "scratch"), ("fedefm", str(foundation / "global.safetensors")))
    for name, init in inits:
        console.rule(f"3. few-shot segmentation from {name}, K = {DEMO_SHOTS}")
        run = out / f"finetune_{name}"
        finetune(FinetuneConfig(data=data, out=run, init=init, shots=DEMO_SHOTS, epochs=DEMO_EPOCHS,
                                image_size=DEMO_SIZE, seed=seed), overwrite=True)
        results["segment"][name] = evaluate_model(run, data, "test")
    for name, init in inits:
        console.rule(f"4. few-shot catheter position from {name}, K = {POSITION_SHOTS} per class")
        run = out / f"classify_{name}"
        finetune_classifier(FinetuneConfig(data=positions, out=run, init=init, task="classify", shots=POSITION_SHOTS,
                                           epochs=POSITION_EPOCHS, image_size=CORPUS_SIZE, seed=seed),
                            overwrite=True)
        results["classify"][name] = evaluate_model(run, positions, "test")
    return results
