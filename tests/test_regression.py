"""The paper's objective trains the same numbers as before the objective seam existed (main 9cc69cc).

Every algorithm and topology runs two rounds on a corpus made here from a seeded random generator (not the
synthetic X-ray generator, whose version may change), and the global weights must hash to what the code of
9cc69cc wrote on a machine of the same CPU kernel family (torch 2.13 CPU, one thread). AVX-512 and AVX2 round
some sums differently, so each family has its own digests, recorded by running these cases with 9cc69cc's
code on such a machine. A refactor of federated/ that changes a single bit of a round fails here. Since main
5ecb0f9 every silo's weights and the metrics rows (less their timings) are pinned too, on the kernel families
that main was run on.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedefm.config import cpu_kernels
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run
from fedefm.models.weights import load_weights

CASES = {
    # name: (algorithm, topology, options)
    "centralized_None": ('centralized', None, {}),
    "fedavg_star": ('fedavg', 'star', {}),
    "fedprox_star_mu=0.5": ('fedprox', 'star', {'mu': 0.5}),
    "moon_star": ('moon', 'star', {}),
    "dpsgd_ring": ('dpsgd', 'ring', {}),
    "matcha_matcha": ('matcha', 'matcha', {}),
    "fedefm_ring": ('fedefm', 'ring', {}),
    "fedefm_star": ('fedefm', 'star', {}),
    "fedefm_ring_update=literal": ('fedefm_literal', 'ring', {}),
    "fedefm_ring_update=released": ('fedefm_released', 'ring', {}),
}
# The CPU vendor a family's digests were written on, where known: on an Intel Xeon the AVX-512 kernels give other
# weights for the same seed than on the AMD EPYC the digests come from.
DIGESTS_VENDOR = {"x86_64 AVX512": "AuthenticAMD"}
# Per CPU kernel family (config.cpu_kernels), the sha256 prefix of the global weights main 9cc69cc wrote there.
DIGESTS = {
    "x86_64 AVX512": {
        "centralized_None": "87378b7b6a866567",
        "fedavg_star": "19ce449631e2264b",
        "fedprox_star_mu=0.5": "ce6535af3c2ef44e",
        "moon_star": "5ea7c6c34bb3f362",
        "dpsgd_ring": "19ce449631e2264b",
        "matcha_matcha": "91c62e0f7c40f774",
        "fedefm_ring": "ec660f304c0747df",
        "fedefm_star": "ec660f304c0747df",
        "fedefm_ring_update=literal": "f015adda7ab6b48a",
        "fedefm_ring_update=released": "731352e1196adef2",
    },
    "x86_64 AVX2": {
        "centralized_None": "fb83044c9d7a3507",
        "fedavg_star": "5d409c88e35f1113",
        "fedprox_star_mu=0.5": "4739d6e45518634f",
        "moon_star": "2a69eb3942aaa537",
        "dpsgd_ring": "5d409c88e35f1113",
        "matcha_matcha": "8dd84b47fc0e7e61",
        "fedefm_ring": "8718e6928c28dcff",
        "fedefm_star": "8718e6928c28dcff",
        "fedefm_ring_update=literal": "2df50cd04000c9ab",
        "fedefm_ring_update=released": "c652a4850ba7aaf2",
    },
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression") / "corpus"
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / f"type{c}").mkdir(parents=True)
        for i in range(10):
            image = np.clip(rng.normal(40 * c + 20, 30, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / f"type{c}" / f"img_{i:03d}.png")
    return root


# Per CPU kernel family, the sha256 prefix of every silo's weights and of the metrics rows (less the timings)
# that main 5ecb0f9 wrote, before the round had one executor (issue 13).
RUN_DIGESTS = {
    "x86_64 AVX2": {
        "centralized_None": "be20dd75863b37bd",
        "dpsgd_ring": "ada468f5c05da436",
        "fedavg_star": "ada468f5c05da436",
        "fedefm_ring": "5141958d7cc0bb99",
        "fedefm_ring_update=literal": "c3360654c216fe62",
        "fedefm_ring_update=released": "c55326db5d633e02",
        "fedefm_star": "e108c6635ae5eb4d",
        "fedprox_star_mu=0.5": "38d610209da5b198",
        "matcha_matcha": "214108e65e89c8b4",
        "moon_star": "2f84e8bfcf5c7edc",
    },
}
TIMINGS = ("wall_s", "peak_rss_mb", "cycle_time_s")


def run_case(corpus, out, name) -> dict[str, str]:
    """Run case ``name`` two rounds on one thread; the digests of its global weights, silo weights and metrics."""
    algorithm, topology, options = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(PretrainConfig(data=corpus, out=out, algorithm=algorithm, topology=topology, silos=3, rounds=2,
                           batch_size=4, image_size=32, eval_every=1, checkpoint_every=2, local_steps=2,
                           options=options), progress=False)
    finally:
        torch.set_num_threads(threads)

    def digest(path: Path) -> str:
        weights, _ = load_weights(path)
        return hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()[:16]

    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    silos = "".join(digest(path) for path in sorted((out / "silos").glob("*.safetensors")))
    return {"global": digest(out / "global.safetensors"),
            "run": hashlib.sha256((silos + json.dumps(rows, sort_keys=True)).encode()).hexdigest()[:16]}


def cpu_vendor() -> str:
    """The CPU vendor as /proc/cpuinfo names it (e.g. "AuthenticAMD", "GenuineIntel"), "" where it cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


@pytest.mark.parametrize("name", sorted(CASES))
def test_classify_pretraining_is_bit_identical_to_before_the_objective_seam(corpus, tmp_path, name):
    if cpu_kernels() not in DIGESTS:
        pytest.skip(f"no digests of main 9cc69cc for CPU kernels {cpu_kernels()!r}: run these cases with its code to add them")
    if DIGESTS_VENDOR.get(cpu_kernels(), cpu_vendor()) != cpu_vendor():
        pytest.skip(f"the digests for {cpu_kernels()!r} were written on a {DIGESTS_VENDOR[cpu_kernels()]} CPU, this is "
                    f"{cpu_vendor() or 'unknown'}")
    digests = run_case(corpus, tmp_path, name)
    assert digests["global"] == DIGESTS[cpu_kernels()][name]
    if cpu_kernels() in RUN_DIGESTS:
        assert digests["run"] == RUN_DIGESTS[cpu_kernels()][name], "silo weights or metrics rows changed"
