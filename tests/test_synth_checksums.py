"""The generator's output for fixed seeds, pinned by checksums: a refactor that changes a pixel fails here.

tests/data/synth_checksums.json holds, per GENERATOR_VERSION and CPU kernel family (config.cpu_kernels: numpy's
AVX-512 and AVX2 kernels round some functions differently), one SHA-256 per small dataset (every decoded image
and mask array plus the manifest). A change that alters output on purpose bumps GENERATOR_VERSION and adds that
version's checksums; ``python tests/test_synth_checksums.py`` writes them for this machine's kernel family.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedefm.config import cpu_kernels
from fedefm.data.synth import GENERATOR_VERSION, write_position_dataset, write_pretrain_corpus, write_seg_dataset

CHECKSUMS = Path(__file__).parent / "data" / "synth_checksums.json"
# (name, writer, keyword arguments): every writer, each fluoroscopy domain, two sizes, two seeds.
CASES = [
    *[(f"seg_{domain}_{size}_s{seed}", write_seg_dataset, {"domain": domain, "n": 2, "size": size, "seed": seed})
      for domain in ("clinical", "animal", "phantom", "simulation") for size in (64, 256) for seed in (0, 1)],
    *[(f"pretrain_{size}_s{seed}", write_pretrain_corpus, {"per_class": 1, "size": size, "seed": seed, "masks": False})
      for size in (64, 256) for seed in (0, 1)],
    # With masks: the same images (the cases above), plus masks/ and labels.json.
    *[(f"pretrain_masks_{size}_s{seed}", write_pretrain_corpus, {"per_class": 1, "size": size, "seed": seed})
      for size in (64, 256) for seed in (0, 1)],
    *[(f"position_{size}_s{seed}", write_position_dataset, {"n": 4, "size": size, "seed": seed})
      for size in (64, 256) for seed in (0, 3)],
]


def dataset_digest(root: Path) -> str:
    """SHA-256 over a written dataset: each PNG's path, shape and decoded pixels, then the manifest's JSON."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(path))
        digest.update(f"{path.relative_to(root).as_posix()}:{pixels.shape}:{pixels.dtype}".encode())
        digest.update(pixels.tobytes())
    manifest = json.loads((root / "manifest.json").read_text())
    digest.update(json.dumps(manifest, sort_keys=True).encode())
    return digest.hexdigest()


def _write(writer, out: Path, kwargs: dict) -> Path:
    """Call a dataset writer into ``out`` and return ``out``."""
    writer(out, **kwargs)
    return out


@pytest.mark.parametrize("writer, kwargs", [
    (write_seg_dataset, {"domain": "clinical", "n": 5, "size": 64, "seed": 2}),
    (write_pretrain_corpus, {"per_class": 1, "size": 64, "seed": 2}),
    (write_position_dataset, {"n": 5, "size": 64, "seed": 2}),
], ids=["seg", "pretrain", "position"])
def test_every_writer_writes_the_same_files_in_several_processes_as_in_one(tmp_path, writer, kwargs):
    one = dataset_digest(_write(writer, tmp_path / "one", kwargs))
    assert dataset_digest(_write(writer, tmp_path / "two", kwargs | {"workers": 2})) == one


@pytest.mark.parametrize("name, writer, kwargs", CASES, ids=[case[0] for case in CASES])
def test_fixed_seed_output_matches_the_stored_checksum(tmp_path, name, writer, kwargs):
    stored = json.loads(CHECKSUMS.read_text())
    assert GENERATOR_VERSION in stored, (f"no checksums for generator {GENERATOR_VERSION}; "
                                         "run python tests/test_synth_checksums.py to add them")
    if cpu_kernels() not in stored[GENERATOR_VERSION]:
        pytest.skip(f"no checksums of generator {GENERATOR_VERSION} for CPU kernels {cpu_kernels()!r}; "
                    "python tests/test_synth_checksums.py records them from the same code on such a machine")
    assert dataset_digest(_write(writer, tmp_path / name, kwargs)) == stored[GENERATOR_VERSION][cpu_kernels()][name]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = {name: dataset_digest(_write(writer, Path(tmp) / name, kwargs)) for name, writer, kwargs in CASES}
    stored = json.loads(CHECKSUMS.read_text()) if CHECKSUMS.exists() else {}
    stored.setdefault(GENERATOR_VERSION, {})[cpu_kernels()] = digests
    CHECKSUMS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(digests)} checksums for generator {GENERATOR_VERSION} on {cpu_kernels()} to {CHECKSUMS}",
          file=sys.stderr)
