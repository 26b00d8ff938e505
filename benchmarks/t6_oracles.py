"""T6 oracles — what the synthetic position task allows, on validation only (the test split is never read).

    python benchmarks/t6_oracles.py --out benchmarks/results/t6 --threads 1 --sizes 64
    python benchmarks/t6_oracles.py --out benchmarks/results/t6 --threads 1 --sizes 128 --per-class 16 \
        --inputs true_mask segmenter_mask true_mask_path segmenter_mask_path \
        --segmenter benchmarks/results/t6/runs/segmenter/model.safetensors

Upper bounds with inputs a deployed model does not have: a small CNN (4 strided conv blocks, GroupNorm,
flattened 4x4 map → linear; it keeps where things are) trained on the image alone, on the TRUE catheter
mask alone, and on both as two channels, at K = 16 per class and on a pool of 1000 frames (learnability),
at 64 and 128 px; with ``--segmenter`` (T6's segmenter init) also, at its image size, on the catheter
probability it predicts (what a deployed model can have), alone and with the image; ``segmenter_hits_path`` is the
TRUE catheter where the segmenter finds it (what its misses alone leave) and ``true_mask+segmenter_path`` the TRUE
catheter with what it finds besides (what its false positives alone leave). The ``_path`` inputs read
instead the course of the catheter traced in that mask, entry to tip (``--pooling path``'s features), through
its standardised linear head (models/position.py course_head): how much of the class the course alone gives a
linear read-out; the ``_ends`` inputs only where that course enters and ends (4 numbers, through a standardised
head with one hidden layer; on the TRUE mask, what a perfect tip locator alone would give). Frames:
``render_position`` with its device mask, training pool generator seed 1000, validation seed 1001 (200
frames, 50 per class: accuracy is balanced accuracy). Two seeds per cell; 400 steps of 32.
Also records the catheter's median contrast-to-noise on the validation frames, in its tip half and its entry
half: whether the pixels show the part of the catheter that decides the class. Rows go to OUT/results.jsonl
(T6's file; ``kind`` "oracle": ``size``, ``input``, ``per_class``, ``seed``, ``steps``, ``val_balanced_accuracy``;
``kind`` "contrast": ``size``, ``frames``, ``tip_half``, ``entry_half``; with ``--segmenter``, ``kind``
"segmenter_reach": ``size``, ``frames``, ``segmenter``, ``tip_error_px``, ``tip_within_5px``,
``course_tip_error_px``, ``course_tip_within_5px``, ``found_tip_half``, ``found_entry_half``, how far along the
true catheter its mask reaches, and ``kind`` "course_reach": ``size``, ``frames``, ``segmenter``, ``contrast``,
``found``, ``on_traced`` and ``missed_probability`` per fifth of the true course, entry to tip);
runs already there are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from fedefm.data.synth import POSITION_CLASSES, render_position
from fedefm.models.position import COURSE_GAP, catheter_path, course_head, read_course, trace_catheter
from fedefm.models.weights import build_from_weights, load_metadata
from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T6"  # its rows sit in T6's result file (kinds "oracle", "contrast", "segmenter_reach", "course_reach")

# input → the channels of frames() (plus with_segmenter_mask) it reads; a "_path" input reads the catheter's course
# traced from that mask (models/position.py path_features) through course_head instead of the small CNN, an "_ends"
# input only where that course starts and ends (ends_head)
INPUTS = {"image": (0,), "true_mask": (1,), "image+true_mask": (0, 1), "true_mask_path": (1,), "true_mask_ends": (1,),
          "segmenter_mask": (2,), "image+segmenter_mask": (0, 2), "segmenter_mask_path": (2,),
          "segmenter_mask_ends": (2,), "segmenter_hits_path": (3,), "true_mask+segmenter_path": (4,)}
DEFAULT_INPUTS = ("image", "true_mask", "image+true_mask", "true_mask_path", "true_mask_ends")
READS = {"path": "course", "ends": "ends"}  # an input's suffix → what train_and_score reads of its mask


def mask_frame(size: int, seed: int, i: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Position frame ``i`` of generator ``seed`` (class i mod 4, its own generator): image (S, S) uint8, device mask
    (S, S) uint8 labels, class index."""
    label = i % len(POSITION_CLASSES)
    image, mask, _ = render_position(POSITION_CLASSES[label], size, np.random.default_rng([seed, i]))
    return image, mask, label


def frames(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` position frames (:func:`mask_frame`): (n, 2, S, S) image in [0, 1] and catheter mask, labels (n,)."""
    rendered = [mask_frame(size, seed, i) for i in range(n)]
    images = [np.stack([image / 255.0, (mask == 1).astype(float)]) for image, mask, _ in rendered]
    return torch.tensor(np.array(images), dtype=torch.float32), torch.tensor([label for *_, label in rendered])


@torch.no_grad()
def with_segmenter_mask(x: torch.Tensor, weights: Path) -> torch.Tensor:
    """x (N, 2, S, S) with three channels more: the catheter probability the segmenter of ``weights`` predicts, the
    TRUE catheter's pixels it finds (p >= 0.5; its misses without its false positives) and the TRUE catheter with
    what it finds besides (its false positives without its misses)."""
    network, _ = build_from_weights(weights)
    network.eval()
    probability = torch.cat([torch.softmax(network(x[i : i + 32, :1]), 1)[:, 1:2] for i in range(0, len(x), 32)])
    found = (probability >= 0.5).float()
    return torch.cat([x, probability, x[:, 1:2] * found, torch.maximum(x[:, 1:2], found)], dim=1)


def small_cnn(channels: int, size: int, width: int = 32) -> nn.Module:
    """Four conv blocks halving the size each, GroupNorm, ReLU, then the flattened map → 4 logits."""
    layers, c = [], channels
    for _ in range(4):
        layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
        c = width
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.3), nn.Linear(width * 16, len(POSITION_CLASSES))]
    return nn.Sequential(*layers)


def course(masks: torch.Tensor) -> torch.Tensor:
    """The catheter's course (N, PATH_FEATURES) traced in each mask or probability map (N, 1, S, S) at 0.5."""
    return torch.from_numpy(np.stack([read_course(m)[1] for m in masks[:, 0].numpy()]))


def ends(masks: torch.Tensor) -> torch.Tensor:
    """Where the catheter traced in each mask or probability map (N, 1, S, S) at 0.5 enters and where its tip
    lies: (N, 4) entry row, col, tip row, col in [-1, 1]."""
    size = masks.shape[-1]
    points = [trace_catheter(m, max_gap=COURSE_GAP)[[0, -1]].astype(np.float32).ravel() for m in masks[:, 0].numpy()]
    return torch.from_numpy(np.stack(points)) / (size - 1) * 2 - 1


def ends_head(n_classes: int, hidden: int = 32) -> nn.Sequential:
    """(B, 4) entry and tip → (B, n_classes) logits: standardised as course_head, then one hidden layer (the
    classes are regions of the image, not half-planes of these four numbers)."""
    return nn.Sequential(nn.BatchNorm1d(4, affine=False, momentum=None), nn.Linear(4, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes))


def train_and_score(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, seed: int,
                    steps: int, reads: str = "pixels") -> float:
    """AdamW for ``steps`` batches of 32, the best validation accuracy of 10 checks: the small CNN on the frames
    (``reads`` "pixels": random shifts of up to 3 px; lr 2e-3), or a head on what their one mask channel's traced
    catheter gives: "course", a linear head on its course (models/position.py course_head, --pooling path's),
    or "ends", ends_head on its entry and tip alone; lr 1e-2 for both heads (finetune's default for --pooling path)."""
    torch.manual_seed(seed)
    pixels = reads == "pixels"
    if pixels:
        model = small_cnn(x.shape[1], x.shape[-1])
    else:
        features, head = {"course": (course, course_head), "ends": (ends, ends_head)}[reads]
        x, val_x, model = features(x), features(val_x), head(len(POSITION_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3 if pixels else 1e-2, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    for step in range(1, steps + 1):
        index = torch.randint(0, x.shape[0], (32,), generator=generator)
        shift = torch.randint(-3, 4, (2,), generator=generator).tolist()
        batch = torch.roll(x[index], shift, dims=(2, 3)) if pixels else x[index]
        loss = F.cross_entropy(model(batch), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % (steps // 10) == 0:
            model.eval()
            with torch.no_grad():
                accuracy = float((model(val_x).argmax(1) == val_y).float().mean())
            model.train()
            best = max(best, accuracy)
    return best


def surroundings(catheter: np.ndarray) -> np.ndarray:
    """The ring (H, W) bool 2-3 px around a catheter mask (H, W) bool, against which its contrast is measured."""
    return ndimage.binary_dilation(catheter, iterations=3) & ~ndimage.binary_dilation(catheter, iterations=1)


def contrast_to_noise(image: np.ndarray, part, around: np.ndarray) -> float:
    """(mean of ``around`` - mean of ``part``) / std of ``around`` in an image (H, W); both index it (a mask or
    rows, cols): how far a dark device stands out from its surroundings' noise."""
    return float((image[around].mean() - image[part].mean()) / max(image[around].std(), 1e-6))


def catheter_contrast(images: torch.Tensor) -> dict[str, float]:
    """Median contrast-to-noise of the catheter in frames (N, 2, S, S), its tip half (rows above the median
    catheter row) and its entry half: (ring mean - catheter mean) / ring std, the ring 2-3 px around it."""
    halves: dict[str, list[float]] = {"tip half": [], "entry half": []}
    for image, mask in images[:, :2].numpy():
        catheter = mask > 0
        ring = surroundings(catheter)
        rows = np.nonzero(catheter)[0]
        if rows.size < 8:
            continue
        cut = np.median(rows)
        for name, keep in (("tip half", lambda r: r < cut), ("entry half", lambda r: r >= cut)):
            part, around = catheter.copy(), ring.copy()
            part[~keep(np.arange(mask.shape[0]))] = False
            around[~keep(np.arange(mask.shape[0]))] = False
            if part.any() and around.sum() > 4:
                halves[name].append(contrast_to_noise(image, part, around))
    return {name: float(np.median(values)) for name, values in halves.items()}


def segmenter_reach(images: torch.Tensor) -> dict[str, float]:
    """How far along the true catheter the segmenter's mask reaches, in frames (N, 3+, S, S) (image, true mask,
    segmenter probability): the median distance in px between the true tip and the tip traced in the segmenter's
    mask, in its largest piece (as ``--pooling tip`` locates it; ``tip_error_px``) and at the end of the course
    across its pieces (as ``path`` reads it; ``course_tip_error_px``), the shares within 5 px, and the share of the
    true catheter's pixels the segmenter finds (p >= 0.5) in its tip and entry half (as catheter_contrast splits
    them)."""
    errors, course_errors, found = [], [], {"tip_half": [], "entry_half": []}
    for _, truth, probability in images[:, :3].numpy():
        catheter = truth > 0
        tip = trace_catheter(truth)[-1]
        errors.append(float(np.hypot(*(tip - trace_catheter(probability)[-1]))))
        course_errors.append(float(np.hypot(*(tip - trace_catheter(probability, max_gap=COURSE_GAP)[-1]))))
        rows, cols = np.nonzero(catheter)
        upper = rows < np.median(rows)
        for name, part in (("tip_half", upper), ("entry_half", ~upper)):
            if part.any():
                found[name].append(float((probability[rows[part], cols[part]] >= 0.5).mean()))
    return {"tip_error_px": float(np.median(errors)), "tip_within_5px": float(np.mean(np.array(errors) <= 5)),
            "course_tip_error_px": float(np.median(course_errors)),
            "course_tip_within_5px": float(np.mean(np.array(course_errors) <= 5))} | {
        f"found_{name}": float(np.mean(values)) for name, values in found.items()}


def reach_along_course(images: torch.Tensor, parts: int = 5) -> dict[str, list[float]]:
    """Where along the true catheter the segmenter loses it, in frames (N, 3+, S, S) (image, true mask, segmenter
    probability): the true course (catheter_path, entry to tip) cut into ``parts`` equal pieces, per piece the
    median contrast-to-noise of its pixels against a ring 2-3 px around the catheter within 4 px of them, the
    mean share of them the segmenter finds (p >= 0.5), of those found the share in the pieces of its mask that the
    course (read_course) runs through (what lies in other pieces the course head never sees), and the median
    probability it gives those it misses (whether a lower threshold or a tracer could still follow them)."""
    contrast: list[list[float]] = [[] for _ in range(parts)]
    found: list[list[float]] = [[] for _ in range(parts)]
    traced: list[list[float]] = [[] for _ in range(parts)]
    missed: list[list[float]] = [[] for _ in range(parts)]
    for image, truth, probability in images[:, :3].numpy():
        catheter = truth > 0
        path = catheter_path(catheter)
        if path is None or len(path) < 2 * parts:
            continue
        ring = surroundings(catheter)
        pieces = ndimage.label(probability >= 0.5, structure=np.ones((3, 3), bool))[0]
        course = trace_catheter(probability, max_gap=COURSE_GAP)
        crossed = np.setdiff1d(pieces[course[:, 0], course[:, 1]], [0])
        for k, piece in enumerate(np.array_split(path, parts)):
            rows, cols = piece[:, 0], piece[:, 1]
            hit = probability[rows, cols] >= 0.5
            found[k].append(float(hit.mean()))
            missed[k] += probability[rows[~hit], cols[~hit]].tolist()
            if hit.any():
                traced[k].append(float(np.isin(pieces[rows[hit], cols[hit]], crossed).mean()))
            near = np.zeros_like(catheter)
            near[rows, cols] = True
            around = ring & ndimage.binary_dilation(near, iterations=4)
            if around.sum() > 4:
                contrast[k].append(contrast_to_noise(image, (rows, cols), around))
    return {"contrast": [float(np.median(c)) for c in contrast], "found": [float(np.mean(f)) for f in found],
            "on_traced": [float(np.mean(t)) if t else float("nan") for t in traced],
            "missed_probability": [float(np.median(m)) if m else float("nan") for m in missed]}


def reads_segmenter(kind: str, input_name: str | None) -> bool:
    """Whether a row of this kind and input measures a segmenter (its reach, or an oracle on its mask)."""
    return kind in ("segmenter_reach", "course_reach") or "segmenter" in (input_name or "")


def segmenter_run(row: dict) -> str | None:
    """The segmenter weights a row was measured with (its command's ``--segmenter``, as typed), None for rows that
    do not read a segmenter: several segmenters of one size may sit in the file."""
    if not reads_segmenter(row.get("kind"), row.get("input")):
        return None
    words = row["command"].split()
    return words[words.index("--segmenter") + 1] if "--segmenter" in words else row.get("segmenter")


def segmenter_name(row: dict) -> str:
    """How the tables name the segmenter of a row: its run folder (``runs/NAME/model.safetensors``)."""
    return Path(segmenter_run(row)).parent.name


def oracle_tables(results: list[dict]) -> str:
    """The catheter's contrast per image size, how far the segmenter's mask reaches, and the oracle table (mean
    over seeds), from T6 result rows."""
    lines = [f"Catheter contrast-to-noise on the {r['frames']} validation frames at {r['size']} px (median; ring 2-3 px "
             f"around it): tip half {r['tip_half']:.2f}, entry half {r['entry_half']:.2f}."
             for r in results if r.get("kind") == "contrast"]
    lines += [f"The catheter of segmenter `{segmenter_name(r)}` on the {r['frames']} validation frames at {r['size']} px: "
              f"the tip traced in the largest piece of its mask lies a median {r['tip_error_px']:.1f} px from the true "
              f"one ({100 * r['tip_within_5px']:.0f}% within 5 px), the end of the course across its pieces "
              f"{r['course_tip_error_px']:.1f} px ({100 * r['course_tip_within_5px']:.0f}%); it finds "
              f"{100 * r['found_tip_half']:.0f}% of the true catheter's pixels in the tip half and "
              f"{100 * r['found_entry_half']:.0f}% in the entry half."
              for r in results if r.get("kind") == "segmenter_reach"]
    lines += [f"Along the true catheter's course at {r['size']} px, entry to tip in {len(r['found'])} equal pieces: "
              f"contrast-to-noise {', '.join(f'{c:.2f}' for c in r['contrast'])}; segmenter `{segmenter_name(r)}` finds "
              f"{', '.join(f'{100 * f:.0f}%' for f in r['found'])} of it, and of what it finds "
              f"{', '.join(f'{100 * t:.0f}%' for t in r['on_traced'])} lies in the pieces of its mask that the course "
              f"runs through; to what it misses it gives a median probability of "
              f"{', '.join(f'{p:.3f}' for p in r['missed_probability'])}."
              for r in results if r.get("kind") == "course_reach"]
    runs = [r for r in results if r.get("kind") == "oracle"]
    by_cell = group(runs, lambda r: (r["size"], r["input"] + (f" (`{segmenter_name(r)}`)" if segmenter_run(r) else ""),
                                     r["per_class"]))
    rows = [[str(size), name, str(per_class), mean_std(r["val_balanced_accuracy"] for r in cell), str(len(cell))]
            for (size, name, per_class), cell in sorted(by_cell.items())]
    if rows:
        header = ["px", "input (small CNN; _path: --pooling path's standardised linear head on the course; _ends: a "
                  "small MLP on its entry and tip)",
                  "training frames per class", "val balanced accuracy (best of 10 checks: an upper bound)", "seeds"]
        lines.append(markdown((header, rows)))
    return "\n\n".join(lines)


def main() -> None:
    parser = common.parser_for(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--per-class", nargs="+", type=int, default=[16, 250], help="training frames per class")
    parser.add_argument("--inputs", nargs="+", default=list(DEFAULT_INPUTS), choices=list(INPUTS))
    parser.add_argument("--segmenter", type=Path, help="TransUNet weights for the segmenter inputs (at their size only)")
    args = parser.parse_args()
    if args.tables:
        print(oracle_tables(read_results(args.out / common.RESULT_FILE)))
        return
    pool, val = (1000, 200) if not args.quick else (40, 16)  # frames; classes in turn, so a quarter per class
    if args.quick:
        args.sizes, args.seeds, args.steps, args.per_class = [32], [0], 20, [4]
    torch.set_num_threads(args.threads)
    segmenter_size = int(load_metadata(args.segmenter)["image_size"]) if args.segmenter else None
    done = common.recorded(args.out, lambda r: (r.get("kind"), r.get("size"), r.get("input"), r.get("per_class"),
                                                r.get("seed"), segmenter_run(r)))
    segmenter = str(args.segmenter) if args.segmenter else None
    for size in args.sizes:
        pool_x, pool_y = frames(pool, size, 1000)
        val_x, val_y = frames(val, size, 1001)
        if ("contrast", size, None, None, None, None) not in done:
            common.record(args.out, TABLE, {"kind": "contrast", "size": size, "frames": len(val_x)} | {
                name.replace(" ", "_"): value for name, value in catheter_contrast(val_x).items()}, time.perf_counter())
        inputs = [name for name in args.inputs if not reads_segmenter("oracle", name) or size == segmenter_size]
        if size == segmenter_size:
            pool_x, val_x = with_segmenter_mask(pool_x, args.segmenter), with_segmenter_mask(val_x, args.segmenter)
            if ("segmenter_reach", size, None, None, None, segmenter) not in done:
                common.record(args.out, TABLE, {"kind": "segmenter_reach", "size": size, "frames": len(val_x),
                                                "segmenter": str(args.segmenter)} | segmenter_reach(val_x),
                              time.perf_counter())
            if ("course_reach", size, None, None, None, segmenter) not in done:
                common.record(args.out, TABLE, {"kind": "course_reach", "size": size, "frames": len(val_x),
                                                "segmenter": str(args.segmenter)} | reach_along_course(val_x),
                              time.perf_counter())
        for name in inputs:
            for n_train in args.per_class:  # 16: K = 16; 250: the whole pool
                for seed in args.seeds:
                    read = segmenter if reads_segmenter("oracle", name) else None
                    if ("oracle", size, name, n_train, seed, read) in done:
                        continue
                    started = time.perf_counter()
                    draw = torch.Generator().manual_seed(seed)
                    per_class = pool // len(POSITION_CLASSES)
                    pick = torch.cat([torch.nonzero(pool_y == c)[:, 0][torch.randperm(per_class, generator=draw)]
                                      [:n_train] for c in range(len(POSITION_CLASSES))])
                    channels = INPUTS[name]
                    accuracy = train_and_score(pool_x[pick][:, channels], pool_y[pick], val_x[:, channels], val_y,
                                               seed, args.steps, reads=READS.get(name.rpartition("_")[2], "pixels"))
                    row = common.record(args.out, TABLE, {"kind": "oracle", "size": size, "input": name,
                                                          "per_class": n_train, "seed": seed, "steps": args.steps,
                                                          "val_balanced_accuracy": accuracy}, started)
                    print(f"{size} px {name:20s} {n_train:4d}/class seed {seed}: val balanced accuracy "
                          f"{accuracy:.3f} ({row['wall_s']:.0f} s)", flush=True)
    print("\n" + oracle_tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
