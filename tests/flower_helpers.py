"""What the end-to-end Flower tests share: run settings, the corpus, the simulator's run and the comparison."""

import json
from pathlib import Path

import pytest
import torch

from fedefm.data.synth import write_pretrain_corpus
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run as simulate
from fedefm.models.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 400  # each end-to-end run, bounded (seconds)
SETTINGS = {"silos": 3, "rounds": 2, "batch-size": 8, "image-size": 32, "eval-every": 1, "local-steps": 1,
            "dropout": 0.0, "reply-timeout": 120}
FEDERATION_ENV = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}  # for every Flower process of a test


def settings(corpus, out, **overrides):
    """The run config of a test run: SETTINGS on ``corpus`` into ``out``, with ``overrides``."""
    return SETTINGS | {"data": str(corpus), "out": str(out)} | overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A pre-training corpus of 12 images per class at 32 px."""
    root = tmp_path_factory.mktemp("flower_corpus") / "pretrain"
    write_pretrain_corpus(root, per_class=12, size=32, seed=0)
    return root


def loopback(folder, corpus, **kwargs):
    """A LoopbackFederation in ``folder`` serving ``corpus``, its processes under FEDERATION_ENV."""
    from fedefm.federated.flower import deploy

    return deploy.LoopbackFederation(folder, corpus, env=FEDERATION_ENV, **kwargs)


def simulated(corpus, out, algorithm, objective="classify", rounds=2):
    """The simulator's run folder ``out`` for SETTINGS with ``algorithm``, ``objective`` and ``rounds``."""
    # One thread, as the SuperNodes' ClientApps run: another thread count may sum in another order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulate(PretrainConfig(data=corpus, out=out, algorithm=algorithm, objective=objective, silos=3, rounds=rounds,
                                batch_size=8, image_size=32, eval_every=1, local_steps=1, dropout=0.0), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_run(flower_run: Path, simulator_run: Path, metric: str = "acc", at_silos: bool = False):
    """Assert a Flower run folder holds the simulator's metrics, global weights (bit for bit) and summary.

    ``at_silos``: the silos scored the global model on their shares of the validation and test splits (a
    weighted mean of their scores: the simulator's to rounding) and each its own model on its own share.
    """
    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    scores = (f"val_{metric}",) if at_silos else (f"val_{metric}", f"silo_val_{metric}")
    keys = ("round", "train_loss", "grad_steps", "bytes_sent") + (() if at_silos else scores)
    assert [{k: r[k] for k in keys} for r in rows(flower_run)] == [{k: r[k] for k in keys} for r in rows(simulator_run)]
    if at_silos:
        assert [r[scores[0]] for r in rows(flower_run)] == pytest.approx([r[scores[0]] for r in rows(simulator_run)],
                                                                          abs=1e-12)
    assert all(r["relay_bytes"] > 0 for r in rows(flower_run))
    a, _ = load_weights(flower_run / "global.safetensors")
    b, _ = load_weights(simulator_run / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def summary(run):  # peak memory is the process's own, not a result
        return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k != "peak_rss_mb"}

    assert summary(flower_run) == pytest.approx(summary(simulator_run), abs=1e-12 if at_silos else 0)
    assert json.loads((flower_run / "config.json").read_text())["command"] == "flower"
