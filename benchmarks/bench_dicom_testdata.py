"""Read every DICOM file of pydicom's test data (pydicom + pydicom-data) as fedefm does; count read, refused, crashed.

A file is *read* when every frame comes back as a float32 image in [0, 1] (at most --max-frames frames are
decoded per file), *refused* when fedefm raises a DataError naming it, and a *crash* on any other exception.
Prints one line per file that is not read and the three counts; --json writes them.

    PYTHONPATH=src python benchmarks/bench_dicom_testdata.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_files

from fedefm.data.readers import count_frames, read_image
from fedefm.errors import DataError


def read_all_frames(path: Path, max_frames: int) -> None:
    """Decode up to ``max_frames`` frames of ``path``; raise AssertionError when one is not a [0, 1] image."""
    n_frames = count_frames(path)
    for frame in range(min(n_frames, max_frames)):
        image = read_image(path, frame if n_frames > 1 else None)
        assert image.dtype == np.float32 and image.ndim == 2 and 0 <= image.min() <= image.max() <= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-frames", type=int, default=200, help="frames decoded per file at most")
    parser.add_argument("--json", type=Path, help="write {read, refused, crashed, files} here")
    args = parser.parse_args()
    logging.getLogger("pydicom").propagate = False
    warnings.filterwarnings("ignore")
    with warnings.catch_warnings():
        files = sorted({Path(p).resolve() for p in get_testdata_files("*") if Path(p).suffix.lower() == ".dcm"})
    outcome: dict[str, list[str]] = {"read": [], "refused": [], "crashed": []}
    started = time.perf_counter()
    for path in files:
        try:
            read_all_frames(path, args.max_frames)
            outcome["read"].append(path.name)
        except DataError as exc:
            outcome["refused"].append(path.name)
            print(f"refused {path.name}: {str(exc).removeprefix(str(path) + ': ')[:160]}")
        except Exception as exc:  # noqa: BLE001 - counting crashes is the point
            outcome["crashed"].append(path.name)
            print(f"CRASH   {path.name}: {type(exc).__name__}: {exc}")
    counts = {kind: len(names) for kind, names in outcome.items()}
    print(f"{len(files)} files in {time.perf_counter() - started:.1f} s: {counts['read']} read, "
          f"{counts['refused']} refused cleanly, {counts['crashed']} crashed")
    if args.json:
        args.json.write_text(json.dumps(counts | {"files": outcome}, indent=2) + "\n")


if __name__ == "__main__":
    main()
