"""Start-up cost of run-folder ownership and of the up-front check of a streamed pre-training corpus.

1. Manifest + lock: ``runfolder.owned_run_folder`` on a new folder (mkdir, flock, manifest written and
   fsynced, lock removed) and on the resume of an existing run (manifest read and compared), median of
   --repeats, in milliseconds.
2. Corpus check on a corpus of --images PNG images (--size px, 6 data types; --distinct synthetic images per
   type, copied to fill, since synthesising 10,000 at 256 px takes half an hour here): discovery
   (``find_classification_splits``: lists the files and reads DICOM/NPY/TIFF headers; a PNG is only
   found), a header-only pass over the PNGs (what a check that decodes nothing would cost; it misses
   corrupt pixel data) and the pixel check a streamed run adds before round 1
   (``precheck.check_decodable``: decodes every image). The files were just
   written, so they are read from the page cache: a cold disk adds its read time.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_runfolder.py --out /tmp/bench_runfolder
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from PIL import Image

from fedefm.data.datasets import find_classification_splits
from fedefm.data.precheck import check_decodable
from fedefm.data.synth import write_pretrain_corpus
from fedefm.federated.config import PretrainConfig
from fedefm.runfolder import owned_run_folder

CLASSES = 6


def claim_ms(root: Path, repeats: int) -> dict[str, float]:
    """Median milliseconds of claiming a new run folder and of resuming one, each with a full pretrain config."""
    config = PretrainConfig(data=root, out=root / "run").to_dict()
    fresh, resumed = [], []
    for k in range(repeats):
        started = time.perf_counter()
        with owned_run_folder(root / "runs" / f"run_{k}", "pretrain", config):
            pass
        fresh.append(time.perf_counter() - started)
        started = time.perf_counter()
        with owned_run_folder(root / "runs" / f"run_{k}", "pretrain", config, resume=True):
            pass
        resumed.append(time.perf_counter() - started)
    return {"new_folder_ms": 1e3 * statistics.median(fresh), "resume_ms": 1e3 * statistics.median(resumed)}


def corpus_check_s(corpus: Path) -> dict[str, float]:
    """Seconds of discovery (lists files; reads DICOM/NPY/TIFF headers), of opening every PNG's header, and of
    decoding every image of ``corpus``."""
    started = time.perf_counter()
    splits, _ = find_classification_splits(corpus, 0)
    headers = time.perf_counter() - started
    items = [item for split in splits.values() for item in split]
    started = time.perf_counter()
    for item in items:
        with Image.open(item.image) as image:
            image.size  # the PNG signature and IHDR chunk only
    png_headers = time.perf_counter() - started
    started = time.perf_counter()
    check_decodable(items, progress=False)
    return {"images": len(items), "discovery_s": headers, "png_headers_s": png_headers,
            "decode_s": time.perf_counter() - started}


def write_corpus(corpus: Path, images: int, size: int, distinct: int) -> None:
    """A corpus of ``images`` PNGs over the 6 data types: ``distinct`` synthetic images per type, copied to fill."""
    write_pretrain_corpus(corpus, per_class=distinct, size=size, seed=0)
    per_class = -(-images // CLASSES)
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        sources = sorted(folder.glob("*.png"))
        for k in range(len(sources), per_class):
            shutil.copyfile(sources[k % len(sources)], folder / f"copy_{k:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the corpus, the run folders and result.json")
    parser.add_argument("--images", type=int, default=10_000, help="images in the corpus")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=50, help="claims timed")
    parser.add_argument("--distinct", type=int, default=100, help="synthetic images per data type; copies fill the rest")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"claim": claim_ms(args.out, args.repeats)}
    print(f"manifest + lock: new folder {result['claim']['new_folder_ms']:.2f} ms, "
          f"resume {result['claim']['resume_ms']:.2f} ms (median of {args.repeats})", flush=True)
    corpus = args.out / f"corpus_{args.images}_{args.size}"
    if not corpus.is_dir():
        write_corpus(corpus, args.images, args.size, args.distinct)
    result["corpus"] = corpus_check_s(corpus) | {"size": args.size}
    check = result["corpus"]
    print(f"corpus of {check['images']} images ({args.size} px PNG): discovery {check['discovery_s']:.1f} s, "
          f"PNG headers only {check['png_headers_s']:.1f} s, decoding every image {check['decode_s']:.1f} s "
          f"({1e3 * check['decode_s'] / check['images']:.2f} ms/image)")
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
