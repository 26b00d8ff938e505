"""Start-up cost of run-folder ownership and of the up-front check of a streamed pre-training corpus.

1. Manifest + lock: ``runfolder.owned_run_folder`` on a new folder (mkdir, flock, manifest written and
   fsynced, lock removed) and on the resume of an existing run (manifest read and compared), median of
   --repeats, in milliseconds.
2. Corpus check on a synthetic corpus of --images PNG images (--size px, 6 data types): discovery
   (``find_classification_splits``, which reads every file's header: header-only) and the pixel check a
   streamed run adds before round 1 (``precheck.check_decodable``: decodes every image).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_runfolder.py --out /tmp/bench_runfolder
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fedefm.config import PretrainConfig
from fedefm.data.datasets import find_classification_splits
from fedefm.data.precheck import check_decodable
from fedefm.data.synth import write_pretrain_corpus
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
    """Seconds of discovery (header-only) and of decoding every image of ``corpus``."""
    started = time.perf_counter()
    splits, _ = find_classification_splits(corpus, 0)
    headers = time.perf_counter() - started
    items = [item for split in splits.values() for item in split]
    started = time.perf_counter()
    check_decodable(items, progress=False)
    return {"images": len(items), "headers_s": headers, "decode_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the corpus, the run folders and result.json")
    parser.add_argument("--images", type=int, default=10_000, help="images in the corpus")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=50, help="claims timed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"claim": claim_ms(args.out, args.repeats)}
    print(f"manifest + lock: new folder {result['claim']['new_folder_ms']:.2f} ms, "
          f"resume {result['claim']['resume_ms']:.2f} ms (median of {args.repeats})", flush=True)
    corpus = args.out / f"corpus_{args.images}_{args.size}"
    if not corpus.is_dir():
        write_pretrain_corpus(corpus, per_class=-(-args.images // CLASSES), size=args.size, seed=0)
    result["corpus"] = corpus_check_s(corpus) | {"size": args.size}
    check = result["corpus"]
    print(f"corpus of {check['images']} images ({args.size} px PNG): headers (discovery) {check['headers_s']:.1f} s, "
          f"decoding every image {check['decode_s']:.1f} s ({1e3 * check['decode_s'] / check['images']:.2f} ms/image)")
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
