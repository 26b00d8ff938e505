"""The end-to-end demo behind ``fedefm demo`` and ``make demo``: small, seeded, minutes on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from fedefm.config import FinetuneConfig
from fedefm.data.synth import GENERATOR_VERSION, write_seg_dataset
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.train import run as finetune

DEMO_DOMAIN = "clinical"
DEMO_IMAGES = 160
DEMO_SIZE = 128
DEMO_SHOTS = 16
DEMO_EPOCHS = 30


def synthetic_segmentation(root: Path, domain: str, n: int, size: int, seed: int) -> Path:
    """Write (or reuse, when its manifest matches) a synthetic segmentation dataset at ``root``."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        wanted = {"generator_version": GENERATOR_VERSION, "domain": domain, "n": n, "size": size, "seed": seed}
        if all(found.get(key) == value for key, value in wanted.items()):
            return root
    write_seg_dataset(root, domain, n, size=size, seed=seed)
    return root


def run_demo(out: Path, seed: int = 0, console: Console | None = None) -> dict[str, dict]:
    """Synthesise a clinical dataset, fine-tune a tiny TransUNet on K images, evaluate on test.

    Returns:
        {run name: evaluate JSON on the test split}.
    """
    console = console or Console()
    out = Path(out)
    console.rule("1. synthetic fluoroscopy")
    data = synthetic_segmentation(out / "data" / f"seg_{DEMO_DOMAIN}", DEMO_DOMAIN, DEMO_IMAGES, DEMO_SIZE, seed)
    console.print(f"{DEMO_IMAGES} {DEMO_DOMAIN} images with catheter/guidewire masks in {data}")
    results = {}
    console.rule(f"2. few-shot fine-tuning from scratch, K = {DEMO_SHOTS}")
    run = out / "finetune_scratch"
    finetune(FinetuneConfig(data=data, out=run, shots=DEMO_SHOTS, epochs=DEMO_EPOCHS, seed=seed))
    results["scratch"] = evaluate_model(run, data, "test")
    return results
