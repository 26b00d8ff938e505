"""Catheter position from where the device is: locate the catheter tip in a predicted mask and pool features there.

The plain classifier (models/heads.py) mean-pools tokens over the whole image, which throws away exactly what a
position class is about: where the tip lies relative to the anatomy. :class:`PositionClassifier` segments the
catheter with TransUNet's decoder, finds the tip (the end of the catheter farthest along it from where it enters
the field), and classifies from the features at and around the tip, the mask-weighted features, the tip's
coordinates and the mean token. Two models hold a fine-tuned segmenter as loaded and classify the catheter it
predicts: :class:`MaskPositionClassifier` through a small CNN on its probability map, and
:class:`PathPositionClassifier` through a linear head on its course, traced from entry to tip.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from fedefm.models.encoder import HybridEncoder
from fedefm.models.presets import Preset
from fedefm.models.segmenters import DecoderCup, build_segmenter

CATHETER = 1  # the catheter's channel of the segmentation head (background, catheter, guidewire)
NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
PATH_POINTS = 16  # points a catheter's course is resampled to, entry to tip (path_features)
PATH_FEATURES = 4 * PATH_POINTS + 11  # the points (2 each), the directions between them (2 each), 13 more
# The widest gap between pieces of a predicted mask that the course (read_course) bridges, as a share of the image
# height. On T6's validation frames (128 px) the Dice-CE segmenter's mask breaks where the catheter fades, and joining
# the pieces ahead brings the traced tip nearer the true one (median 22.3 → 19.1 px; the --loss tips TransUNet's
# 23.7 → 15.5 px); the tip pooling and locate_tips keep the largest piece alone.
COURSE_GAP = 0.1


def pixel_index(rows: np.ndarray, cols: np.ndarray) -> dict[tuple[int, int], int]:
    """Where each pixel (row, col) of a component given as rows, cols (N,) sits in them: {(row, col): k}."""
    return {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols))}


def geodesic_distances(rows: np.ndarray, cols: np.ndarray, start: int) -> np.ndarray:
    """Steps (8-connected, breadth first) from pixel ``start`` to every pixel of a component given as rows, cols (N,)."""
    index = pixel_index(rows, cols)
    distance = np.full(rows.size, -1)
    distance[start] = 0
    queue = deque([start])
    while queue:
        k = queue.popleft()
        for dr, dc in NEIGHBOURS:
            j = index.get((int(rows[k]) + dr, int(cols[k]) + dc))
            if j is not None and distance[j] < 0:
                distance[j] = distance[k] + 1
                queue.append(j)
    return distance


def walk(rows: np.ndarray, cols: np.ndarray, distance: np.ndarray, end: int) -> np.ndarray:
    """The shortest 8-connected walk (M, 2) row, col through a component (rows, cols (N,)) from the pixel its
    ``distance`` (:func:`geodesic_distances`) is measured from to its pixel ``end``."""
    index = pixel_index(rows, cols)
    steps = [end]
    while distance[steps[-1]] > 0:  # step back towards the start, one pixel nearer each time
        k = steps[-1]
        steps.append(next(j for j in (index.get((int(rows[k]) + dr, int(cols[k]) + dc)) for dr, dc in NEIGHBOURS)
                          if j is not None and distance[j] == distance[k] - 1))
    return np.stack([rows[steps[::-1]], cols[steps[::-1]]], axis=1)


def at_border(row: int, col: int, shape: tuple[int, int]) -> bool:
    """Whether pixel (row, col) lies within 1 px of the edge of an image of ``shape`` (H, W)."""
    return min(row, col, shape[0] - 1 - row, shape[1] - 1 - col) <= 1


def enters_first(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> bool:
    """Whether a catheter whose ends are pixels a and b (row, col) of an image of ``shape`` (H, W) enters at a:
    the end touching the border when exactly one does, else the lower end (a femoral catheter reaches the chest
    from below; collimator blades often cut it off before the border)."""
    touching = (at_border(*a, shape), at_border(*b, shape))
    return touching == (True, False) or (touching[0] == touching[1] and a[0] >= b[0])


def bridge_gap(path: np.ndarray, candidates: dict[int, np.ndarray], max_gap: float, cone: float,
               heading_px: int) -> tuple[np.ndarray, int] | None:
    """The path (M, 2) carried on from its last pixel into the nearest of the ``candidates`` pieces (label → its
    pixels (N, 2)) that lies within ``max_gap`` px ahead — within the angle whose cosine is ``cone`` of the
    heading over the path's last ``heading_px`` px — across the gap in a straight line and through that piece
    to its far end, and the label of that piece; None when no piece lies there."""
    end = path[-1].astype(float)
    heading = end - path[max(0, len(path) - 1 - heading_px)]
    heading /= max(float(np.linalg.norm(heading)), 1e-6)
    best = None
    for label, pixels in candidates.items():
        gaps = np.hypot(*(pixels - end).T)
        k = int(np.argmin(gaps))
        ahead = len(path) == 1 or (pixels[k] - end) @ heading >= cone * gaps[k]
        if gaps[k] <= max_gap and ahead and (best is None or gaps[k] < best[0]):
            best = (gaps[k], label, k)
    if best is None:
        return None
    _, label, k = best
    pixels = candidates[label]
    distance = geodesic_distances(pixels[:, 0], pixels[:, 1], k)
    inside = walk(pixels[:, 0], pixels[:, 1], distance, int(np.argmax(distance)))  # to its far end
    steps = int(np.ceil(np.abs(inside[0] - end).max()))
    across = np.round(end + np.linspace(0, 1, steps + 1)[1:-1, None] * (inside[0] - end)).astype(int)
    return np.concatenate([path, across, inside]), label


def catheter_path(mask: np.ndarray, max_gap: float = 0.0, cone: float = 0.5) -> np.ndarray | None:
    """The pixels (M, 2) row, col of a device mask (H, W) bool along its catheter, from where it enters to its
    tip, None when the mask is empty.

    In the largest 8-connected piece the two ends are the pixels farthest apart along it (the farthest pixel
    from any pixel is one end, the farthest from that the other), so a curved or looped catheter's ends are
    where it stops, not the points farthest apart in a line; the path is a shortest 8-connected walk between
    them (a loop the catheter closes on itself is cut short), and starts where the catheter enters
    (:func:`enters_first`). A segmenter's mask breaks where the catheter fades: with ``max_gap`` > 0 the path
    goes on from either end into the nearest piece that lies ahead within ``max_gap`` · H px (within the angle
    whose cosine is ``cone`` of its heading over the last H/16 px), again and again, and the entry is decided
    on the ends so reached. Pieces under H/16 px are specks, never joined.
    """
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel())
    largest = int(np.argmax(sizes[1:])) + 1
    rows, cols = np.nonzero(pieces == largest)
    first = int(np.argmax(geodesic_distances(rows, cols, 0)))
    from_first = geodesic_distances(rows, cols, first)
    second = int(np.argmax(from_first))
    ends = [(rows[k], cols[k]) for k in (first, second)]
    entry, tip = (first, second) if enters_first(*ends, mask.shape) else (second, first)
    path = walk(rows, cols, from_first if entry == first else geodesic_distances(rows, cols, entry), tip)
    height = mask.shape[0]
    if max_gap > 0 and count > 1:
        candidates = {label: np.argwhere(pieces == label) for label in range(1, count + 1)
                      if label != largest and sizes[label] >= height // 16}
        heading_px = max(2, height // 16)
        for _ in range(2):  # on from the tip end, then from the entry end
            while (joined := bridge_gap(path, candidates, max_gap * height, cone, heading_px)) is not None:
                path, label = joined
                del candidates[label]
            path = path[::-1]
        if not enters_first(path[0], path[-1], mask.shape):
            path = path[::-1]
    return path


def locate_tip(mask: np.ndarray) -> tuple[float, float] | None:
    """The catheter tip (row, col) of a device mask (H, W) bool (the end of :func:`catheter_path`), None when empty."""
    path = catheter_path(mask)
    return None if path is None else (float(path[-1, 0]), float(path[-1, 1]))


def trace_catheter(probability: np.ndarray, threshold: float = 0.5, max_gap: float = 0.0) -> np.ndarray:
    """The catheter path (M, 2) row, col from entry to tip (:func:`catheter_path`, bridging gaps up to ``max_gap``
    · H) of a probability map (H, W).

    The mask is the pixels at ``probability >= threshold``; a map with none (an untrained or unsure segmenter)
    gives its most probable pixel as a path of one, so every image gets a location.
    """
    path = catheter_path(probability >= threshold, max_gap)
    if path is None:
        path = np.array([np.unravel_index(int(np.argmax(probability)), probability.shape)])
    return path


def locate_tips(probability: Tensor, threshold: float = 0.5) -> Tensor:
    """Tip (row, col) in px of each catheter probability map (B, H, W) → (B, 2) float: where its traced path ends."""
    tips = [trace_catheter(prob, threshold)[-1] for prob in probability.detach().cpu().numpy()]
    return torch.tensor(np.asarray(tips, dtype=np.float32), device=probability.device)


def resample_path(path: np.ndarray, n: int = PATH_POINTS) -> np.ndarray:
    """``n`` points (n, 2) evenly spaced by arc length along a path (M, 2), its first and last point included."""
    steps = np.linalg.norm(np.diff(path.astype(float), axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    where = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(where, arc, path[:, 0]), np.interp(where, arc, path[:, 1])], axis=1)


def path_features(path: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the catheter's course says about where it lies, from its path (M, 2) in a device mask (H, W) bool:
    (PATH_FEATURES,) float32, every entry scale-free (the same catheter at another image size reads the same).

    [PATH_POINTS points along the path, entry to tip, as row, col in [-1, 1]; the unit direction between each
    pair (where it runs and where it turns); the path's length / image height; the share of the catheter's
    pixels off the path (a loop the shortest walk cuts short, a branch); the area the catheter encloses /
    length²; its signed and its absolute turning / 2π (a loop turns by a full circle), and those of its last
    quarter (how the tip end bends); where the tip lies from the entry and from the path's highest point (the
    crest of the arch it ran over), row and col / length; the rows and the columns it spans / length].
    """
    height, width = mask.shape
    points = resample_path(path)
    steps = np.diff(points, axis=0)
    directions = steps / np.maximum(np.linalg.norm(steps, axis=1, keepdims=True), 1e-6)
    turns = np.angle(np.exp(1j * np.diff(np.arctan2(directions[:, 0], directions[:, 1]))))  # wrapped to (-π, π]
    pieces = ndimage.label(mask, structure=np.ones((3, 3), bool))[0]
    on_path = np.zeros_like(mask)
    on_path[path[:, 0], path[:, 1]] = True
    crossed = np.unique(pieces[on_path])
    catheter = np.isin(pieces, crossed[crossed > 0]) | on_path  # the pieces it runs through and the gaps it bridges
    from_path = ndimage.distance_transform_edt(~on_path)
    half_width = float(np.median(ndimage.distance_transform_edt(catheter)[on_path])) if catheter.any() else 0.0
    off_path = (catheter & (from_path > 2 * half_width + 1)).sum() / max(catheter.sum(), 1)
    length = len(path)
    enclosed = (ndimage.binary_fill_holes(catheter) & ~catheter).sum() / length**2
    last = turns[-(PATH_POINTS // 4) :]
    scalars = [length / height, off_path, enclosed, turns.sum() / (2 * np.pi), np.abs(turns).sum() / (2 * np.pi),
               last.sum() / (2 * np.pi), np.abs(last).sum() / (2 * np.pi)]
    crest = points[np.argmin(points[:, 0])]
    relative = [(points[-1] - points[0]) / length, (points[-1] - crest) / length, np.ptp(points, axis=0) / length]
    corners = np.array([height - 1, width - 1], float)
    return np.concatenate([(points / np.maximum(corners, 1) * 2 - 1).ravel(), directions.ravel(), scalars,
                           *relative]).astype(np.float32)


def read_course(probability: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The catheter path (M, 2) traced in a probability map (H, W) across the gaps of its mask (COURSE_GAP) and its
    :func:`path_features` (PATH_FEATURES,), both from the mask at ``probability >= threshold``."""
    path = trace_catheter(probability, threshold, COURSE_GAP)
    return path, path_features(path, probability >= threshold)


def pool_at(features: Tensor, points: Tensor, image_size: Sequence[int], radius: float) -> Tensor:
    """Features (B, C, h, w) sampled bilinearly at points (B, 2) (row, col in px of an image ``image_size``)
    and on a ring of 8 points ``radius`` px around each: (B, 2C), the centre then the ring's mean.
    """
    height, width = image_size
    offsets = torch.tensor([(0.0, 0.0), *NEIGHBOURS], device=points.device) * radius  # (9, 2)
    where = points[:, None, :] + offsets[None]  # (B, 9, 2) row, col
    # grid_sample takes (x, y) in [-1, 1] over the image's extent (align_corners=False: pixel centres at +0.5).
    grid = torch.stack([(where[..., 1] + 0.5) / width, (where[..., 0] + 0.5) / height], dim=-1) * 2 - 1
    sampled = F.grid_sample(features, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[:, :, 0]  # (B, C, 9)
    return torch.cat([sampled[..., 0], sampled[..., 1:].mean(-1)], dim=1)


def mask_pool(features: Tensor, weight: Tensor) -> Tensor:
    """Mean of features (B, C, H, W) weighted by a map (B, H, W) ≥ 0: (B, C) — attention pooling guided by the mask."""
    weight = weight / weight.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return torch.einsum("bchw,bhw->bc", features, weight)


class PositionClassifier(nn.Module):
    """TransUNet (encoder, decoder, segmentation head) + a head on what the predicted catheter and its tip show.

    The head reads LayerNorm of [mean token (D), decoder features pooled under the catheter probability (C),
    decoder features at the tip and around it (2C), token features at the tip and around it (2D), the tip's
    coordinates in [-1, 1] (2)]. Its tensors ``encoder.*``, ``decoder.*`` and ``segmentation_head.*`` are a
    TransUNet's, so a fine-tuned segmenter loads whole into it (``finetune --task classify --pooling tip``); the
    tip is where the catheter mask (probability >= 0.5) ends, located without gradient; the segmentation head
    learns on through the mask-weighted pooling.
    """

    arch = "position"
    segmenter_arch = "transunet"  # the architecture whose whole weights it takes

    def __init__(self, preset: Preset, n_classes: int, radius: float = 4.0) -> None:
        super().__init__()
        self.preset = preset
        self.n_classes = n_classes
        self.radius = radius
        self.encoder = HybridEncoder(preset)
        self.decoder = DecoderCup(preset, preset.n_skip)
        channels = preset.decoder_channels[-1]
        self.segmentation_head = nn.Conv2d(channels, 3, kernel_size=3, padding=1)
        width = 3 * preset.hidden + 3 * channels + 2
        self.head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(width, eps=1e-6), linear=nn.Linear(width, n_classes)))

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W); returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "tip", "catheter") it returns those by name from one pass:
        "tip" (B, 2) row, col in px of x, "catheter" the catheter probability (B, H, W) it looked at.
        """
        tokens, grid, skips = self.encoder(x)
        decoded = self.decoder(tokens, grid, skips, x)  # (B, C, H, W)
        catheter = torch.softmax(self.segmentation_head(decoded), dim=1)[:, CATHETER]  # (B, H, W)
        tips = locate_tips(catheter)
        size = x.shape[-2:]
        token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        scale = torch.tensor([size[0] - 1, size[1] - 1], device=x.device, dtype=tips.dtype)
        representation = torch.cat([
            tokens.mean(dim=1), mask_pool(decoded, catheter), pool_at(decoded, tips, size, self.radius),
            pool_at(token_map, tips, size, self.radius), tips / scale.clamp_min(1) * 2 - 1,
        ], dim=1)
        logits = self.head(representation)
        if parts is None:
            return logits
        return {name: {"logits": logits, "tip": tips, "catheter": catheter}[name] for name in parts}


def shape_encoder(width: int = 32, blocks: int = 4, grid: int = 4) -> nn.Sequential:
    """A small CNN over a catheter probability map (B, 1, H, W) → (B, width · grid²): ``blocks`` stride-2
    conv, GroupNorm, ReLU blocks, then an average pool to a grid × grid map, flattened so that where the
    catheter's parts lie (not only what they look like) reaches the head."""
    layers: list[nn.Module] = []
    for k in range(blocks):
        layers += [nn.Conv2d(1 if k == 0 else width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten())


def course_head(n_classes: int) -> nn.Sequential:
    """(B, PATH_FEATURES) course features → (B, n_classes) logits: standardised, then linear.

    The features' spreads differ up to thirtyfold (on synthetic catheters: the enclosed area's standard deviation
    0.02, a coordinate's up to 0.6), and one learning rate for all of them fits the wide ones and starves the
    narrow, so each is standardised by its mean and variance over every training batch: a BatchNorm without
    affine terms that averages all batches alike (momentum None), since a held segmenter's features do not drift.
    """
    return nn.Sequential(OrderedDict(standardise=nn.BatchNorm1d(PATH_FEATURES, affine=False, momentum=None),
                                     linear=nn.Linear(PATH_FEATURES, n_classes)))


class HeldSegmenterClassifier(nn.Module):
    """A whole segmenter (any models/segmenters.py arch) held as loaded, for a classifier of the catheter it predicts.

    The class labels of a few frames cannot teach a segmenter where the catheter is, and would pull it from
    the masks it was fine-tuned on, so its probability is computed without gradient and it stays in eval mode;
    only what a subclass adds learns. Its tensors are the segmenter's under ``segmenter.*`` and weights files
    record its arch (``segmenter_arch``), so a fine-tuned TransUNet, U-Net, residual U-Net or SwinUNETR loads
    whole (finetune/classify.py).
    """

    def __init__(self, preset: Preset, n_classes: int, segmenter_arch: str = "transunet") -> None:
        super().__init__()
        self.preset = preset
        self.n_classes = n_classes
        self.segmenter = build_segmenter(segmenter_arch, preset, n_classes=3)

    def train(self, mode: bool = True) -> HeldSegmenterClassifier:
        """Set train or eval mode; the segmenter stays in eval (no dropout): it is held as loaded."""
        super().train(mode)
        self.segmenter.eval()
        return self

    @torch.no_grad()
    def catheter(self, x: Tensor) -> Tensor:
        """The catheter probability (B, H, W) the held segmenter predicts for images x (B, in_channels, H, W)."""
        return torch.softmax(self.segmenter(x), dim=1)[:, CATHETER]


class MaskPositionClassifier(HeldSegmenterClassifier):
    """A held segmenter + a small CNN on the catheter it predicts, then a linear head.

    The position classes are the shape and place of the device: where it runs and where it stops relative to
    the arch. A CNN on the TRUE catheter mask alone reads them from K = 16 frames per class, where image
    features do not (benchmarks/t6_oracles.py), so this model classifies the predicted catheter probability
    (B, 1, H, W) through :func:`shape_encoder` and Dropout→Linear (``finetune --task classify --pooling mask``).
    """

    arch = "position_mask"

    def __init__(self, preset: Preset, n_classes: int, segmenter_arch: str = "transunet", width: int = 32,
                 dropout: float = 0.3) -> None:
        super().__init__(preset, n_classes, segmenter_arch)
        self.shape_encoder = shape_encoder(width)
        self.head = nn.Sequential(OrderedDict(dropout=nn.Dropout(dropout), linear=nn.Linear(width * 16, n_classes)))

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W), H and W multiples of 32; returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "tip", "catheter") it returns those by name from one pass:
        "catheter" the probability (B, H, W) it classified, "tip" (B, 2) row, col in px where that catheter ends.
        """
        catheter = self.catheter(x)
        logits = self.head(self.shape_encoder(catheter[:, None]))
        if parts is None:
            return logits
        seen = {"logits": logits, "catheter": catheter}
        return {name: seen[name] if name != "tip" else locate_tips(catheter) for name in parts}


class PathPositionClassifier(HeldSegmenterClassifier):
    """A held segmenter + a linear head on the course of the catheter it predicts (:func:`path_features`).

    The position classes are geometric relations: whether the catheter runs straight up the descending
    aorta, turns over the arch, turns up again into a branch, or buckles into a loop. Traced from the predicted
    mask (probability >= 0.5) and resampled to PATH_POINTS points, that course is 75 numbers a linear head
    learns from a few frames per class, where a CNN on the same mask must first learn to follow a line
    (``finetune --task classify --pooling path``), through :func:`course_head`.
    """

    arch = "position_path"

    def __init__(self, preset: Preset, n_classes: int, segmenter_arch: str = "transunet") -> None:
        super().__init__(preset, n_classes, segmenter_arch)
        self.head = course_head(n_classes)

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W), H and W multiples of 32; returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "tip", "path", "catheter") it returns those by name from one pass:
        "catheter" the probability (B, H, W), "path" (B, PATH_POINTS, 2) row, col in px along the course it
        read, entry to tip, and "tip" (B, 2) the last of them.
        """
        catheter = self.catheter(x)
        paths, features = zip(*(read_course(prob) for prob in catheter.cpu().numpy()))
        logits = self.head(torch.from_numpy(np.stack(features)).to(x.device))
        if parts is None:
            return logits
        points = torch.tensor(np.stack([resample_path(path) for path in paths]), dtype=torch.float32, device=x.device)
        seen = {"logits": logits, "catheter": catheter, "path": points, "tip": points[:, -1]}
        return {name: seen[name] for name in parts}


# --pooling → the position model (``mean``, the plain classifier, is models/heads.py)
POSITION_MODELS: dict[str, type[nn.Module]] = {"tip": PositionClassifier, "mask": MaskPositionClassifier,
                                               "path": PathPositionClassifier}
